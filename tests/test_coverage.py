"""Coverage (model.coverage, train.coverage_loss_weight): the plain reference (tests/reference_model.py)
on every attention kind, with and without input feeding, for both kernel sets (values and gradients
of cross-entropy + coverage loss, float32, 1e-5), padding invariance, the decoding step, the loss
against hand-computed values, and the config errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_model as ref
from s2s_jax import kernels
from s2s_jax.config import Config, ConfigError, ModelConfig, TrainConfig, validate
from s2s_jax.model import Seq2Seq
from s2s_jax.training import losses, steps
from test_model import SOURCE_LENGTHS, TARGET_LENGTHS, assert_close, assert_trees_close, fast_loss, init, make_batch, model_config, pad_batch

SETS = kernels.SETS
LAMBDA = 0.7


def _objective(model, cfg, params, batch):
    """Mean cross-entropy + LAMBDA * coverage loss / tokens (what the train step minimises)."""
    hidden, weights = model.apply({"params": params}, batch["source"], batch["source_lengths"],
                                  batch["target_input"])
    kernel, bias = model.apply({"params": params}, method=Seq2Seq.output_weights)
    tw = steps.target_weights(batch)
    sums = losses.sequence_loss(hidden, kernel, bias, batch["target_output"], tw, kernels=model.kernels)
    return (sums["loss"] + LAMBDA * losses.coverage_loss_sum(weights, tw)) / sums["weight"], (hidden, weights)


CASES = [(cell, att, feed) for att in ("dot", "general", "mlp") for feed in (True, False)
         for cell in ("lstm", "gru")]
QUICK = {("lstm", "dot", True), ("gru", "general", False), ("gru", "mlp", True)}


@pytest.mark.parametrize("ks", SETS)
@pytest.mark.parametrize("cell,att,feed", [pytest.param(*c, marks=() if c in QUICK else (pytest.mark.slow, pytest.mark.extended))
                                           for c in CASES])
def test_coverage_matches_reference(ks, cell, att, feed):
    i = CASES.index((cell, att, feed))
    cfg = model_config(cell, att, feed, True, i, kernels=ks, coverage=True, matmul_precision="highest")
    model, params = init(cfg, seed=i)
    batch = make_batch(seed=i)

    def fast(params):
        with kernels.precision_scope(cfg):
            return _objective(model, cfg, params, batch)

    def plain(params):
        hidden, logits, weights = ref.forward(cfg, params, batch["source"], batch["source_lengths"],
                                              batch["target_input"])
        tokens = batch["target_lengths"].sum()
        return ref.loss(logits, batch) + LAMBDA * ref.coverage_loss(weights, batch) / tokens, (hidden, weights)

    g_fast, (hidden, weights) = jax.jit(jax.grad(fast, has_aux=True))(params)
    g_ref, (h_ref, w_ref) = jax.grad(plain, has_aux=True)(params)
    assert "coverage_weight" in params["decoder"]["attention"]
    for b in range(len(SOURCE_LENGTHS)):
        T = int(batch["target_lengths"][b])
        assert_close(hidden[b, :T], h_ref[b, :T], what=f"hidden row {b}")
        assert_close(weights[b, :T], w_ref[b, :T], what=f"weights row {b}")
    assert_trees_close(g_fast, g_ref)
    # the coverage term changes the scores: without it the weights differ
    off = model_config(cell, att, feed, True, i, kernels=ks, matmul_precision="highest")
    _, _, w_off = ref.forward(off, params, batch["source"], batch["source_lengths"], batch["target_input"])
    assert float(jnp.abs(w_off[:, 1:] - w_ref[:, 1:]).max()) > 5e-6


@pytest.mark.parametrize("ks", SETS)
@pytest.mark.parametrize("att,feed", [("general", True), ("mlp", False)])
def test_coverage_padding_invariance(ks, att, feed):
    cfg = model_config("lstm", att, feed, True, 1, kernels=ks, coverage=True)
    model, params = init(cfg)
    batch = make_batch()
    f = jax.jit(functools.partial(_objective, model, cfg))
    l0, (h0, w0) = f(params, batch)
    for extra_s, extra_t in ((3, 0), (0, 4), (2, 3)):
        l1, (h1, w1) = f(params, pad_batch(batch, extra_s, extra_t))
        for b in range(len(SOURCE_LENGTHS)):
            T, S = int(TARGET_LENGTHS[b]), int(SOURCE_LENGTHS[b])
            assert_close(h1[b, :T], h0[b, :T], tol=1e-6)
            assert_close(w1[b, :T, :S], w0[b, :T, :S], tol=1e-6)
        assert_close(l1, l0, tol=1e-6)


@pytest.mark.parametrize("att,feed", [("general", True), ("mlp", False)])
def test_coverage_decoding_steps_equal_teacher_forcing(att, feed):
    """decode_step carries the coverage vector in the decoder state: step by step it gives the
    teacher-forced weights and hidden states."""
    cfg = model_config("lstm", att, feed, True, 1, coverage=True)
    model, params = init(cfg)
    batch = make_batch()
    v = {"params": params}
    hidden, weights = model.apply(v, batch["source"], batch["source_lengths"], batch["target_input"])
    logits_tf = model.apply(v, hidden, method=Seq2Seq.logits)
    cache = model.apply(v, batch["source"], batch["source_lengths"], method=Seq2Seq.encode)
    assert cache["state"]["coverage"].shape == batch["source"].shape
    for t in range(batch["target_input"].shape[1]):
        logits, cache, w = model.apply(v, batch["target_input"][:, t], cache, method=Seq2Seq.decode_step)
        assert_close(w, weights[:, t], tol=1e-5)
        assert_close(logits, logits_tf[:, t], tol=1e-5)
    assert_close(cache["state"]["coverage"], weights.sum(1), tol=1e-5)


def test_coverage_loss_equals_hand_computed_values():
    """One sentence, 3 target steps (the third is padding), 3 source positions (the third is padding):
        a_0 = (.5, .5, 0)  c_0 = (0, 0, 0)      min-sum 0
        a_1 = (.25,.75,0)  c_1 = (.5, .5, 0)    min-sum .25 + .5 = .75
        a_2 = (.9, .1, 0)  padding step: not counted
    plus a second sentence with one real step (c_0 = 0: 0). Total 0.75."""
    a = np.zeros((2, 3, 3), np.float32)
    a[0, 0, :2] = (0.5, 0.5)
    a[0, 1, :2] = (0.25, 0.75)
    a[0, 2, :2] = (0.9, 0.1)
    a[1, :, 0] = 1.0
    tw = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    assert float(losses.coverage_loss_sum(jnp.asarray(a), jnp.asarray(tw))) == pytest.approx(0.75, abs=1e-7)
    # all three steps real in row 0: + min(.9, .75) + min(.1, 1.25) = .85; row 1 with 3 real steps: 0 + 1 + 1
    tw = np.ones((2, 3), np.float32)
    assert float(losses.coverage_loss_sum(jnp.asarray(a), jnp.asarray(tw))) == pytest.approx(0.75 + 0.85 + 2.0,
                                                                                              abs=1e-6)


def test_train_step_adds_the_weighted_coverage_loss():
    cfg = model_config("lstm", "general", True, True, 1, coverage=True)
    model, params = init(cfg)
    batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
    config = Config(model=cfg, train=TrainConfig(coverage_loss_weight=LAMBDA))
    with_cov = steps.loss_sums(params, batch, model=model, config=config, rng=jax.random.key(0))
    plain = steps.loss_sums(params, batch, model=model, config=config)  # evaluation: cross-entropy only
    _, weights = model.apply({"params": params}, batch["source"], batch["source_lengths"], batch["target_input"])
    expected = LAMBDA * float(ref.coverage_loss(weights, batch))
    assert expected > 0.01
    assert float(with_cov["loss"] - plain["loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(with_cov["nll"]) == pytest.approx(float(plain["nll"]), rel=1e-6)


def test_coverage_config_errors():
    with pytest.raises(ConfigError, match="model.coverage=True needs an attention type"):
        validate(Config(model=ModelConfig(coverage=True, attention="none", input_feeding=False)))
    with pytest.raises(ConfigError, match="train.coverage_loss_weight"):
        validate(Config(train=TrainConfig(coverage_loss_weight=1.0)))
    validate(Config(model=ModelConfig(coverage=True), train=TrainConfig(coverage_loss_weight=1.0)))
