"""The fast model against the plain reference (tests/reference_model.py), and the properties the
speed tricks must not break: padding invariance, attention masking, step decoding, chunked loss,
bfloat16 training, batch-split-invariant dropout.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_model as ref
from s2s_jax import losses, steps
from s2s_jax.config import ModelConfig, TrainConfig, load
from s2s_jax.model import Seq2Seq
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


def init(cfg, seed=0, batch=None):
    model = Seq2Seq(cfg, VOCAB, VOCAB)
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
                                chunk=chunk)
    return sums["loss"] / sums["weight"]


def assert_close(a, b, tol=1e-5, what=""):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol, err_msg=what)


# Every cell x attention/input-feeding x direction combination: 28 programs to compile, so the
# default run checks a covering subset (every value of every factor, every attention/feeding pair)
# and the full product runs with the slow tests.
QUICK = {("lstm", "dot", True, True), ("gru", "dot", False, False), ("lstm", "general", True, False),
         ("gru", "general", False, True), ("gru", "mlp", True, False), ("lstm", "mlp", False, True),
         ("lstm", "none", False, False), ("gru", "none", False, True), ("gru", "general", True, True)}
PARAMS = [pytest.param(i, case, id="-".join(map(str, case)),
                       marks=() if case in QUICK else pytest.mark.slow) for i, case in enumerate(CASES)]


@pytest.mark.parametrize("i,case", PARAMS)
def test_matches_reference(i, case):
    """Outputs (hidden, logits, attention weights) and parameter gradients of a masked loss."""
    cell, att, feed, bi = case
    cfg = model_config(cell, att, feed, bi, i)
    model, params = init(cfg, seed=i)
    batch = make_batch(seed=i)

    def fast(params):
        hidden, weights = model.apply({"params": params}, batch["source"], batch["source_lengths"],
                                      batch["target_input"])
        logits = model.apply({"params": params}, hidden, method=Seq2Seq.logits)
        return fast_loss(model, cfg, params, batch), (hidden, logits, weights)

    def plain(params):
        hidden, logits, weights = ref.forward(cfg, params, batch["source"], batch["source_lengths"],
                                              batch["target_input"])
        return ref.loss(logits, batch), (hidden, logits, weights)

    g_fast, (hidden, logits, weights) = jax.jit(jax.grad(fast, has_aux=True))(params)
    g_ref, (h_ref, l_ref, w_ref) = jax.grad(plain, has_aux=True)(params)
    for b in range(len(SOURCE_LENGTHS)):
        T = int(batch["target_lengths"][b])
        assert_close(hidden[b, :T], h_ref[b, :T], what=f"hidden row {b}")
        assert_close(logits[b, :T], l_ref[b, :T], what=f"logits row {b}")
        if att != "none":
            assert_close(weights[b, :T], w_ref[b, :T], what=f"weights row {b}")
    assert jax.tree.structure(g_fast) == jax.tree.structure(g_ref)
    for path, a in jax.tree_util.tree_leaves_with_path(g_fast):
        b = functools.reduce(lambda t, k: t[k.key], path, g_ref)
        assert_close(a, b, what=f"grad {jax.tree_util.keystr(path)}")


def test_matches_reference_uneven_depths():
    """Decoder deeper than the encoder: every decoder layer starts from the top encoder layer."""
    cfg = model_config("lstm", "general", True, True, 2, encoder_layers=1, decoder_layers=3, bridge="dense",
                       residual=True)
    model, params = init(cfg, seed=7)
    batch = make_batch(seed=7)
    hidden, _ = model.apply({"params": params}, batch["source"], batch["source_lengths"], batch["target_input"])
    h_ref, _, _ = ref.forward(cfg, params, batch["source"], batch["source_lengths"], batch["target_input"])
    for b in range(len(SOURCE_LENGTHS)):
        assert_close(hidden[b, :int(batch["target_lengths"][b])], h_ref[b, :int(batch["target_lengths"][b])])


@pytest.mark.parametrize("cell,att,feed", [("lstm", "general", True), ("gru", "mlp", False),
                                           ("lstm", "none", False)])
def test_padding_invariance(cell, att, feed):
    cfg = model_config(cell, att, feed, True, 1)
    model, params = init(cfg)
    batch = make_batch()
    apply = jax.jit(model.apply)
    h0, w0 = apply({"params": params}, batch["source"], batch["source_lengths"], batch["target_input"])
    loss0 = fast_loss(model, cfg, params, batch)
    for extra_s, extra_t in ((3, 0), (0, 4), (2, 3)):
        padded = pad_batch(batch, extra_s, extra_t)
        h1, w1 = apply({"params": params}, padded["source"], padded["source_lengths"], padded["target_input"])
        for b in range(len(SOURCE_LENGTHS)):
            T, S = int(TARGET_LENGTHS[b]), int(SOURCE_LENGTHS[b])
            assert_close(h1[b, :T], h0[b, :T], tol=1e-6)
            if w0 is not None:
                assert_close(w1[b, :T, :S], w0[b, :T, :S], tol=1e-6)
        assert_close(fast_loss(model, cfg, params, padded), loss0, tol=1e-6)


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


def test_chunked_loss_equals_unchunked():
    cfg = model_config("lstm", "general", True, True, 1)
    model, params = init(cfg)
    batch = make_batch(T=7, target_lengths=np.array([7, 2, 5], np.int32))
    f = jax.jit(jax.value_and_grad(functools.partial(fast_loss, model, cfg)), static_argnums=2)
    v0, g0 = f(params, batch, 0)
    for chunk in (2, 3, 7):
        v, g = f(params, batch, chunk)
        assert_close(v, v0, tol=1e-6)
        jax.tree.map(lambda a, b: assert_close(a, b, tol=1e-6), g, g0)


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


@pytest.mark.parametrize("att,layers,residual,dtype", [("general", 2, False, "float32"),
                                                       ("dot", 3, True, "float32"),
                                                       ("general", 1, False, "float32"),
                                                       ("general", 2, True, "bfloat16")])
def test_fused_decoder_equals_autodiff_scan(att, layers, residual, dtype, monkeypatch):
    """model/fused_decoder.py (hand-derived backward) == the generic scan differentiated by JAX.

    With dropout between layers, on the attention weights and on the output (masks the plain
    reference does not model), residual connections, 1–3 layers, a loss that also reads the
    attention weights (so their cotangent is used), and bfloat16 compute.
    """
    from s2s_jax.model import fused_decoder
    cfg = model_config("lstm", att, True, True, 0, decoder_layers=layers, encoder_layers=layers,
                       residual=residual, dropout=0.3, attention_dropout=0.2, bridge="dense", dtype=dtype)
    assert fused_decoder.supported(cfg)
    model, params = init(cfg, seed=layers)
    batch = make_batch(seed=layers)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5, 6)), jnp.float32)

    def loss(params):
        hidden, weights = model.apply({"params": params}, batch["source"], batch["source_lengths"],
                                      batch["target_input"], deterministic=False, rngs={"dropout": jax.random.key(5)})
        return fast_loss_from(model, params, hidden, batch) + (weights * w).sum(), (hidden, weights)

    fused = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    monkeypatch.setattr(fused_decoder, "supported", lambda cfg: False)
    generic = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    tol = 1e-5 if dtype == "float32" else 2e-2
    (v1, (h1, w1)), g1 = fused
    (v0, (h0, w0)), g0 = generic
    assert_close(v1, v0, tol, "loss")
    assert_close(h1, h0, tol, "hidden")
    assert_close(w1, w0, tol, "attention weights")
    assert not np.allclose(np.asarray(h1), np.asarray(model.apply({"params": params}, batch["source"],
                           batch["source_lengths"], batch["target_input"])[0]))  # dropout did something
    for path, a in jax.tree_util.tree_leaves_with_path(g1):
        b = functools.reduce(lambda t, k: t[k.key], path, g0)
        assert_close(a, b, tol, f"grad {jax.tree_util.keystr(path)}")


def fast_loss_from(model, params, hidden, batch):
    kernel, bias = model.apply({"params": params}, method=Seq2Seq.output_weights)
    sums = losses.sequence_loss(hidden, kernel, bias, batch["target_output"], steps.target_weights(batch))
    return sums["loss"] / sums["weight"]


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
    model = Seq2Seq(cfg.model, 20, 20)
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
    m16 = Seq2Seq(dataclasses.replace(cfg, dtype="bfloat16"), VOCAB, VOCAB)
    h16, w16 = m16.apply({"params": params}, batch["source"], batch["source_lengths"], batch["target_input"])
    assert h16.dtype == jnp.float32 and w16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(h16), np.asarray(h32), atol=5e-2)


def test_fused_loss_of_an_all_padding_batch_is_zero():
    """A batch with no real target row (all filler) adds nothing: sums and gradients are zero."""
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(3, 70, 5)), jnp.float32)  # 210 rows: several blocks
    kernel = jnp.asarray(rng.normal(size=(5, 11)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(11,)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (3, 70)), jnp.int32)
    for weight in (0.0, 1.0):
        f = jax.jit(jax.value_and_grad(lambda h, k, b: losses.sequence_loss(h, k, b, targets, jnp.full((3, 70), weight))["loss"],
                                       argnums=(0, 1, 2)))
        v, g = f(hidden, kernel, bias)
        if weight == 0.0:
            assert float(v) == 0.0 and all(float(jnp.abs(x).max()) == 0.0 for x in g)
        else:  # every row real: the blocks past the first are all counted
            assert_close(v, losses.token_losses(hidden @ kernel + bias, targets)[0].sum())


def check_fused_loss_against_autodiff(T, lengths, eps=0.0, chunk=0, seed=0, dtype="float32"):
    """losses.sequence_loss (gradient formed in its forward pass) == autodiff of token_losses on
    a [3, T] batch whose rows have the given real lengths: sums, metrics and all gradients.
    In float32 the output bias is folded into the products; with bfloat16 compute it is a
    separate float32 add (the reference rounds the product's inputs alike)."""
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(dtype)
    B, H, V = len(lengths), 5, 11
    hidden = jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(H, V)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(V,)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    weights = jnp.asarray(np.arange(T)[None] < np.array(lengths)[:, None], jnp.float32)

    def plain(hidden, kernel, bias):
        logits = jnp.matmul(hidden.astype(dt), kernel.astype(dt), preferred_element_type=jnp.float32) + bias
        loss, nll, correct = losses.token_losses(logits, targets, eps)
        return (loss * weights).sum(), ((nll * weights).sum(), (correct * weights).sum(), weights.sum())

    def fused(hidden, kernel, bias):
        s = losses.sequence_loss(hidden, kernel, bias, targets, weights, label_smoothing=eps, chunk=chunk,
                                 dtype=dt)
        return s["loss"], (s["nll"], s["correct"], s["weight"])

    (v0, aux0), g0 = jax.value_and_grad(plain, argnums=(0, 1, 2), has_aux=True)(hidden, kernel, bias)
    (v1, aux1), g1 = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2), has_aux=True))(hidden, kernel, bias)
    assert float(aux1[2]) == sum(lengths)
    tol = 1e-5 if dtype == "float32" else 2e-2  # bfloat16: the gradient's products round g
    assert_close(v1, v0, tol)
    assert_close(aux1, aux0, tol)
    for a, b in zip(g1, g0):
        assert a.dtype == jnp.float32
        assert_close(a, b, tol)


@pytest.mark.parametrize("lengths", [(0, 0, 0), (5, 0, 40), (120, 150, 0), (200, 111, 90), (200, 200, 200)])
def test_fused_loss_big_and_small_blocks_match_autodiff(lengths):
    """600 rows: real-row counts 0, 45, 270, 401 and 600 take 1 or 2 big blocks of BIG_ROWS and
    0 to 3 small ones (losses._compacted)."""
    check_fused_loss_against_autodiff(200, lengths, seed=1)


@pytest.mark.parametrize("eps,chunk,dtype", [(0.0, 0, "float32"), (0.1, 0, "float32"), (0.1, 3, "float32"),
                                             (0.0, 0, "bfloat16"), (0.1, 3, "bfloat16")])
def test_fused_loss_matches_autodiff(eps, chunk, dtype):
    """With and without label smoothing, whole or chunked over time, float32 (bias folded into
    the products) and bfloat16 compute (bias a separate float32 add)."""
    check_fused_loss_against_autodiff(7, (7, 2, 5), eps, chunk, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_projection_gradients_equal_autodiff(dtype):
    """cells.matmul (rows flattened, hand-written backward) == autodiff of the plain einsum,
    for a time-major [T, B, D] input, in float32 and with bfloat16 compute."""
    from s2s_jax.model import cells
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(5, 3, 7)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(7, 11)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(5, 3, 11)), jnp.float32)
    dt = jnp.dtype(dtype)

    def plain(x, w):
        return jnp.einsum("tbd,dg->tbg", x.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)

    y0, vjp0 = jax.vjp(plain, x, w)
    y1, vjp1 = jax.jit(lambda x, w: jax.vjp(lambda x, w: cells.matmul(x, w, dt), x, w))(x, w)
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert y1.shape == (5, 3, 11) and y1.dtype == jnp.float32
    assert_close(y1, y0, tol)
    for a, b in zip(vjp1(dy), vjp0(dy)):
        assert a.dtype == jnp.float32
        assert_close(a, b, tol)


def test_lstm_gate_grads_equal_autodiff_of_the_cell():
    """cells.lstm_gate_grads (the backward of one LSTM step's gates) == jax.vjp of the step."""
    from s2s_jax.model import cells
    rng = np.random.default_rng(4)
    z = jnp.asarray(rng.normal(size=(2, 3, 4 * 5)), jnp.float32)  # [K, B, 4H], gate order i f g o
    c_prev = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)
    dh = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)
    dc = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)

    def step(z, c_prev):
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c_prev + jax.nn.sigmoid(i) * jnp.tanh(g)
        return jax.nn.sigmoid(o) * jnp.tanh(c), c

    (_, c_new), vjp = jax.vjp(step, z, c_prev)
    dz0, dc_prev0 = vjp((dh, dc))
    dz1, dc_prev1 = cells.lstm_gate_grads(cells.lstm_activations(z), c_new, c_prev, dh, dc)
    assert_close(dz1, dz0, 1e-5)
    assert_close(dc_prev1, dc_prev0, 1e-5)
