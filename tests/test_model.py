"""Model properties: attention masking, step decoding, batch-split-invariant dropout, bfloat16
training. The kernels against the plain reference (every model combination, per kernel set)
are in tests/test_kernels.py; the helpers here are shared with it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_model as ref
from s2s_jax import kernels
from s2s_jax.training import losses, steps
from s2s_jax.config import ModelConfig, TrainConfig, load
from s2s_jax.model import Seq2Seq
from s2s_jax.model.decoder import input_projection_table
from s2s_jax.train_state import create_state

VOCAB = 13
SOURCE_LENGTHS = np.array([5, 2, 4], np.int32)
TARGET_LENGTHS = np.array([4, 1, 3], np.int32)


def make_batch(S=6, T=5, seed=0, source_lengths=SOURCE_LENGTHS, target_lengths=TARGET_LENGTHS):
    """Right-padded batch with distinct lengths; token ids 3..V-1 at real positions, 0 at padding."""
    rng = np.random.default_rng(seed)
    B = len(source_lengths)
    src = rng.integers(3, VOCAB, (B, S)).astype(np.int32)
    tin = rng.integers(3, VOCAB, (B, T)).astype(np.int32)
    tout = rng.integers(3, VOCAB, (B, T)).astype(np.int32)
    src[np.arange(S)[None] >= source_lengths[:, None]] = 0
    tin[np.arange(T)[None] >= target_lengths[:, None]] = 0
    tout[np.arange(T)[None] >= target_lengths[:, None]] = 0
    return {"source": src, "source_lengths": source_lengths.copy(), "target_input": tin,
            "target_output": tout, "target_lengths": target_lengths.copy()}


def pad_batch(batch, extra_s, extra_t):
    out = dict(batch)
    for key, extra in (("source", extra_s), ("target_input", extra_t), ("target_output", extra_t)):
        out[key] = np.pad(batch[key], [(0, 0), (0, extra)])
    return out


def model_config(cell, attention, feeding, bidirectional, i=0, **kw):
    """Tiny 2-layer configs; residual / bridge / sharing vary with the case index i."""
    base = dict(cell=cell, attention=attention, input_feeding=feeding, bidirectional=bidirectional,
                source_embed_dim=8, target_embed_dim=8, hidden_dim=8, encoder_layers=2, decoder_layers=2,
                residual=i % 2 == 1, bridge=("zero", "last", "dense")[i % 3],
                share_embeddings=i % 4 == 2, tie_output=i % 4 == 3)
    base.update(kw)
    return ModelConfig(**base)


CASES = [(cell, att, feed, bi)
         for cell in ("lstm", "gru")
         for att, feed in (("dot", True), ("dot", False), ("general", True), ("general", False),
                           ("mlp", True), ("mlp", False), ("none", False))
         for bi in (False, True)]


def build(cfg, source_vocab=VOCAB, target_vocab=VOCAB):
    """The model of a ModelConfig with the kernel set its `kernels` names (as make_model does)."""
    return Seq2Seq(cfg, source_vocab, target_vocab, kernels.select(cfg.kernels))


def init(cfg, seed=0, batch=None):
    model = build(cfg)
    batch = batch or make_batch()
    params = model.init(jax.random.key(seed), batch["source"], batch["source_lengths"],
                        batch["target_input"])["params"]
    # random (not zero) biases so that every parameter matters in the comparison
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return model, jax.tree.unflatten(treedef, leaves)


def fast_loss(model, cfg, params, batch, chunk=0):
    hidden, _ = model.apply({"params": params}, batch["source"], batch["source_lengths"], batch["target_input"])
    kernel, bias = model.apply({"params": params}, method=Seq2Seq.output_weights)
    sums = losses.sequence_loss(hidden, kernel, bias, batch["target_output"], steps.target_weights(batch),
                                chunk=chunk, kernels=model.kernels)
    return sums["loss"] / sums["weight"]


def assert_close(a, b, tol=1e-5, what=""):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol, err_msg=what)


def assert_trees_close(fast, ref, tol=1e-5, what="grad"):
    """Every leaf of `fast` against the leaf at the same path of `ref` (a gradient tree)."""
    for path, a in jax.tree_util.tree_leaves_with_path(fast):
        b = functools.reduce(lambda t, k: t[k.key], path, ref)
        assert_close(a, b, tol, what=f"{what} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("att", ["dot", "general", "mlp"])
def test_attention_masks_padding_and_normalises(att):
    cfg = model_config("lstm", att, True, True)
    model, params = init(cfg)
    batch = make_batch(S=8)
    _, weights = model.apply({"params": params}, batch["source"], batch["source_lengths"], batch["target_input"])
    weights = np.asarray(weights)
    pad = np.arange(8)[None, None, :] >= SOURCE_LENGTHS[:, None, None]
    assert np.all(weights[np.broadcast_to(pad, weights.shape)] == 0.0)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("cell,att,feed", [("lstm", "general", True), ("gru", "dot", False),
                                           ("lstm", "mlp", False), ("gru", "none", False)])
def test_step_decoding_equals_teacher_forcing(cell, att, feed):
    cfg = model_config(cell, att, feed, True, 2, bridge="dense")
    model, params = init(cfg)
    batch = make_batch()
    hidden, weights = model.apply({"params": params}, batch["source"], batch["source_lengths"],
                                  batch["target_input"])
    expected = model.apply({"params": params}, hidden, method=Seq2Seq.logits)
    cache = model.apply({"params": params}, batch["source"], batch["source_lengths"], method=Seq2Seq.encode)
    step = jax.jit(lambda tok, cache: model.apply({"params": params}, tok, cache, method=Seq2Seq.decode_step))
    for t in range(batch["target_input"].shape[1]):
        logits, cache, w = step(batch["target_input"][:, t], cache)
        assert_close(logits, expected[:, t], tol=1e-5, what=f"step {t}")
        if weights is not None:
            assert_close(w, weights[:, t], tol=1e-6)


def test_dropout_masks_independent_of_batch_split():
    cfg = model_config("lstm", "general", True, True, 1, dropout=0.3, attention_dropout=0.2)
    model, params = init(cfg)
    batch = make_batch(source_lengths=np.array([5, 2, 4, 6], np.int32),
                       target_lengths=np.array([4, 1, 3, 5], np.int32))
    key = jax.random.key(3)

    def run(rows):
        sl = slice(rows[0], rows[-1] + 1)
        h, _ = model.apply({"params": params}, batch["source"][sl], batch["source_lengths"][sl],
                           batch["target_input"][sl], deterministic=False, row_ids=jnp.asarray(rows),
                           rngs={"dropout": key})
        return h

    full = run([0, 1, 2, 3])
    halves = jnp.concatenate([run([0, 1]), run([2, 3])])
    assert_close(halves, full, tol=1e-6)
    det, _ = model.apply({"params": params}, batch["source"], batch["source_lengths"], batch["target_input"])
    assert not np.allclose(full, det)  # dropout did something


def reverse_batches(rng, n_batches, B=16, S=12, V=20):
    """The `reverse` task in numpy: target = source reversed (BOS=1, EOS=2, PAD=0)."""
    for _ in range(n_batches):
        lengths = rng.integers(4, S - 1, B).astype(np.int32)
        src = np.zeros((B, S), np.int32)
        tin = np.zeros((B, S + 1), np.int32)
        tout = np.zeros((B, S + 1), np.int32)
        for b, n in enumerate(lengths):
            x = rng.integers(3, V, n)
            src[b, :n] = x
            tin[b, 0] = 1
            tin[b, 1:n + 1] = x[::-1]
            tout[b, :n] = x[::-1]
            tout[b, n] = 2
        yield {"source": src, "source_lengths": lengths, "target_input": tin, "target_output": tout,
               "target_lengths": lengths + 1}


def test_bfloat16_training_converges():
    """The tiny config in bfloat16: loss falls clearly within a short in-process run."""
    tiny = load("experiments/configs/tiny.py")
    cfg = tiny.replace(model=dataclasses.replace(tiny.model, dtype="bfloat16", dropout=0.0),
                       train=TrainConfig(learning_rate=1e-2, clip_norm=5.0))
    model = build(cfg.model, 20, 20)
    state = create_state(cfg, model)
    step = jax.jit(functools.partial(steps.train_step, model=model, config=cfg))
    losses_seen = []
    for batch in reverse_batches(np.random.default_rng(0), 80):
        state, m = step(state, batch)
        losses_seen.append(float(m["loss"] / m["weight"]))
    assert all(np.isfinite(losses_seen))
    first, last = np.mean(losses_seen[:5]), np.mean(losses_seen[-5:])
    assert last < 0.6 * first, (first, last)
    assert jax.tree.leaves(state.params)[0].dtype == jnp.float32  # parameters stay float32


def test_bfloat16_close_to_float32():
    cfg = model_config("lstm", "general", True, True, 1)
    model, params = init(cfg)
    batch = make_batch()
    h32, _ = model.apply({"params": params}, batch["source"], batch["source_lengths"], batch["target_input"])
    m16 = build(dataclasses.replace(cfg, dtype="bfloat16"))
    h16, w16 = m16.apply({"params": params}, batch["source"], batch["source_lengths"], batch["target_input"])
    assert h16.dtype == jnp.float32 and w16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(h16), np.asarray(h32), atol=5e-2)




# -- recipe dropouts (model.embedding_dropout, output_dropout, recurrent_dropout, word dropout) --

RECIPE_DROPOUTS = dict(embedding_dropout=0.2, output_dropout=0.2, recurrent_dropout=0.3, source_word_dropout=0.2,
                       target_word_dropout=0.2)


@pytest.mark.parametrize("cell,att,feed", [("lstm", "general", True), ("gru", "mlp", False)])
def test_recipe_dropouts_independent_of_batch_split_and_repeatable(cell, att, feed):
    """Every recipe dropout on: masks are drawn per row from the step key, so half batches give
    the full batch's rows, the same key gives the same output bit for bit (bit-exact resume), and
    they change the output."""
    cfg = model_config(cell, att, feed, True, 1, layer_norm="per_gate", **RECIPE_DROPOUTS)
    model, params = init(cfg)
    batch = make_batch(source_lengths=np.array([5, 2, 4, 6], np.int32), target_lengths=np.array([4, 1, 3, 5], np.int32))
    apply = jax.jit(lambda src, sl, tin, rows, key: model.apply(
        {"params": params}, src, sl, tin, deterministic=False, row_ids=rows, rngs={"dropout": key})[0])

    def run(rows, key=jax.random.key(3)):
        sl = slice(rows[0], rows[-1] + 1)
        return apply(batch["source"][sl], batch["source_lengths"][sl], batch["target_input"][sl], jnp.asarray(rows), key)

    full = run([0, 1, 2, 3])
    assert_close(jnp.concatenate([run([0, 1]), run([2, 3])]), full, tol=1e-6)
    np.testing.assert_array_equal(np.asarray(run([0, 1, 2, 3])), np.asarray(full))
    det, _ = model.apply({"params": params}, batch["source"], batch["source_lengths"], batch["target_input"])
    assert not np.allclose(full, det)
    assert not np.allclose(run([0, 1, 2, 3], jax.random.key(4)), full)


def test_word_dropout_zeroes_whole_tokens():
    """Word dropout: each token's embedding is either zero or scaled by 1/(1-p) as a whole, about
    p of them zero; embedding_dropout drops single elements."""
    cfg = model_config("lstm", "general", True, True, 0, source_word_dropout=0.5)
    model, params = init(cfg)
    emb = jnp.asarray(np.random.default_rng(0).normal(size=(40, 8, 8)) + 3.0, jnp.float32)  # [T, B, E], no zeros
    noisy = np.asarray(model.apply({"params": params}, emb, jnp.arange(8), 0.5, False, method=Seq2Seq._embedding_noise,
                                   rngs={"dropout": jax.random.key(0)}))
    zero = np.all(noisy == 0.0, axis=-1)  # [T, B]
    np.testing.assert_allclose(noisy[~zero], 2.0 * np.asarray(emb)[~zero], rtol=1e-6)
    assert 0.35 < zero.mean() < 0.65
    elems = dataclasses.replace(cfg, source_word_dropout=0.0, embedding_dropout=0.5)
    noisy = np.asarray(build(elems).apply({"params": params}, emb, jnp.arange(8), 0.0, False,
                                          method=Seq2Seq._embedding_noise, rngs={"dropout": jax.random.key(0)}))
    assert 0.35 < (noisy == 0.0).mean() < 0.65
    assert np.any((noisy == 0.0).any(-1) & ~(noisy == 0.0).all(-1))  # some tokens only partly dropped


@pytest.mark.parametrize("cell,att", [("gru", "mlp"), ("gru", "general")])
def test_conditional_step_decoding_equals_teacher_forcing(cell, att):
    """decode_step (one token at a time, the path beam search takes) == the teacher-forced scan,
    with layer norm; and the recipe dropouts stay batch-split invariant."""
    cfg = model_config(cell, att, False, True, 2, bridge="dense", decoder_type="conditional", decoder_layers=1,
                       layer_norm="whole")
    model, params = init(cfg)
    batch = make_batch()
    hidden, weights = model.apply({"params": params}, batch["source"], batch["source_lengths"], batch["target_input"])
    expected = model.apply({"params": params}, hidden, method=Seq2Seq.logits)
    cache = model.apply({"params": params}, batch["source"], batch["source_lengths"], method=Seq2Seq.encode)
    step = jax.jit(lambda tok, cache: model.apply({"params": params}, tok, cache, method=Seq2Seq.decode_step))
    for t in range(batch["target_input"].shape[1]):
        logits, cache, w = step(batch["target_input"][:, t], cache)
        assert_close(logits, expected[:, t], tol=1e-5, what=f"step {t}")
        assert_close(w, weights[:, t], tol=1e-6)
    # the inference adapter's path: rows of the projected-embedding table instead of embeddings
    table = model.apply({"params": params}, method=lambda m: input_projection_table(m.decoder, m.target_embedding))
    cache = model.apply({"params": params}, batch["source"], batch["source_lengths"], method=Seq2Seq.encode)
    tok = batch["target_input"][:, 0]
    h, _, _ = model.apply({"params": params}, None, cache["state"], cache["memory"], cache["keys"], cache["mask"],
                          table[tok], method=lambda m, *a: m.decoder.step(*a))
    assert_close(model.apply({"params": params}, h, method=Seq2Seq.logits), expected[:, 0], tol=1e-5)
