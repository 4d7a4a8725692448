"""Both kernel sets (s2s_jax/kernels/, chosen by model.kernels) against the plain reference
(tests/reference_model.py: a Python loop over time steps, no scan, no tricks): every cell x
attention/input-feeding x direction combination, padding invariance, the fused decoder against
the generic scan, the fused loss, dense and gate derivatives, the non-finite guard (decoding's
token selections per set are in tests/test_decoding.py); and the lowered programs: the portable
train step has no conditional, no data-dependent loop and no optimisation barrier, the cpu one
still has them (the switch switches), and float32 dots carry the configured precision.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_model as ref
from s2s_jax import benchmark, kernels
from s2s_jax.training import losses, steps
from s2s_jax.config import Config, ModelConfig, TrainConfig
from s2s_jax.kernels import activations, dense as dense_kernel
from s2s_jax.kernels import loss as loss_kernel
from s2s_jax.model import Seq2Seq
from s2s_jax.train_state import create_state
from test_model import (SOURCE_LENGTHS, TARGET_LENGTHS, VOCAB, assert_close, build, fast_loss, init, make_batch,
                        model_config, pad_batch)

SETS = kernels.SETS


def test_auto_resolves_per_backend():
    assert kernels.resolve("auto", "cpu") == "cpu"
    assert kernels.resolve("auto", "gpu") == kernels.resolve("auto", "cuda") == kernels.resolve("auto", "tpu") == "portable"
    assert kernels.resolve("portable", "cpu") == "portable" and kernels.resolve("cpu", "cuda") == "cpu"
    assert kernels.resolve("auto") == "cpu"  # this machine
    with kernels.target(("cpu", "cuda")):  # an export for cuda made here gets the portable set
        assert kernels.resolve("auto") == "portable"
    with kernels.target("cpu"):
        assert kernels.resolve("auto") == "cpu"
    with pytest.raises(ValueError, match="model.kernels"):
        kernels.resolve("fast")


def test_select_gives_one_hashable_set_per_name_built_where_the_model_is():
    """select returns the set object (the same one each time, hashable, with its name); the
    model takes it once, chosen for the `target` in effect where it is built (export)."""
    from s2s_jax.train_state import make_model
    cpu, portable = kernels.select("cpu"), kernels.select("portable")
    assert (cpu.name, portable.name) == ("cpu", "portable") and cpu != portable
    assert kernels.select("auto", "cuda") is portable and kernels.select("auto") is cpu
    assert len({cpu, portable, kernels.select("auto", "cpu")}) == 2
    config = Config(model=model_config("lstm", "general", True, True))
    assert make_model(config, VOCAB, VOCAB).kernels is cpu
    with kernels.target(("cuda",)):
        model = make_model(config, VOCAB, VOCAB)
    assert model.kernels is portable


# Every cell x attention/input-feeding x direction combination: 28 programs per kernel set, so
# the default run checks a covering subset per set (every value of every factor, every
# attention/feeding pair) and the full product is marked `extended` (`make test-all`; CI runs the subset).
CASES = [(cell, att, feed, bi)
         for cell in ("lstm", "gru")
         for att, feed in (("dot", True), ("dot", False), ("general", True), ("general", False),
                           ("mlp", True), ("mlp", False), ("none", False))
         for bi in (False, True)]
QUICK = {"cpu": {("lstm", "dot", True, True), ("gru", "dot", False, False), ("lstm", "general", True, False),
                 ("gru", "general", False, True), ("gru", "mlp", True, False), ("lstm", "mlp", False, True),
                 ("lstm", "none", False, False), ("gru", "none", False, True), ("gru", "general", True, True)},
         "portable": {("lstm", "general", True, True), ("gru", "dot", True, False), ("lstm", "mlp", False, False),
                      ("gru", "none", False, True), ("lstm", "dot", False, True), ("gru", "general", False, False),
                      ("gru", "mlp", True, True)}}
PARAMS = [pytest.param(ks, i, case, id=f"{ks}-" + "-".join(map(str, case)),
                       marks=() if case in QUICK[ks] else (pytest.mark.slow, pytest.mark.extended))
          for ks in SETS for i, case in enumerate(CASES)]


@pytest.mark.parametrize("ks,i,case", PARAMS)
def test_matches_reference(ks, i, case):
    """Outputs (hidden, logits, attention weights) and parameter gradients of a masked loss,
    float32 at highest precision, within 1e-5."""
    check_against_reference(model_config(*case, i, kernels=ks, matmul_precision="highest"), i)


def check_against_reference(cfg, i):
    """The model of `cfg` against ref.forward: outputs at real positions and every parameter
    gradient of the masked loss, within 1e-5 (seeds from i)."""
    att = cfg.attention
    model, params = init(cfg, seed=i)
    batch = make_batch(seed=i)

    def fast(params):
        with kernels.precision_scope(cfg):
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


@pytest.mark.parametrize("ks", SETS)
def test_matches_reference_uneven_depths(ks):
    """Decoder deeper than the encoder: every decoder layer starts from the top encoder layer."""
    cfg = model_config("lstm", "general", True, True, 2, encoder_layers=1, decoder_layers=3, bridge="dense",
                       residual=True, kernels=ks)
    model, params = init(cfg, seed=7)
    batch = make_batch(seed=7)
    hidden, _ = model.apply({"params": params}, batch["source"], batch["source_lengths"], batch["target_input"])
    h_ref, _, _ = ref.forward(cfg, params, batch["source"], batch["source_lengths"], batch["target_input"])
    for b in range(len(SOURCE_LENGTHS)):
        assert_close(hidden[b, :int(batch["target_lengths"][b])], h_ref[b, :int(batch["target_lengths"][b])])


@pytest.mark.parametrize("ks", SETS)
@pytest.mark.parametrize("cell,att,feed", [("lstm", "general", True), ("gru", "mlp", False),
                                           ("lstm", "none", False)])
def test_padding_invariance(ks, cell, att, feed):
    """Appending source or target padding changes no output at real positions, nor the loss."""
    cfg = model_config(cell, att, feed, True, 1, kernels=ks)
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


@pytest.mark.parametrize("ks", SETS)
def test_chunked_loss_equals_unchunked(ks):
    cfg = model_config("lstm", "general", True, True, 1, kernels=ks)
    model, params = init(cfg)
    batch = make_batch(T=7, target_lengths=np.array([7, 2, 5], np.int32))
    f = jax.jit(jax.value_and_grad(functools.partial(fast_loss, model, cfg)), static_argnums=2)
    v0, g0 = f(params, batch, 0)
    for chunk in (2, 3, 7):
        v, g = f(params, batch, chunk)
        assert_close(v, v0, tol=1e-6)
        jax.tree.map(lambda a, b: assert_close(a, b, tol=1e-6), g, g0)


def _loss_from(model, cfg, params, hidden, batch):
    kernel, bias = model.apply({"params": params}, method=Seq2Seq.output_weights)
    sums = losses.sequence_loss(hidden, kernel, bias, batch["target_output"], steps.target_weights(batch),
                                kernels=model.kernels)
    return sums["loss"] / sums["weight"]


@pytest.mark.parametrize("ks", SETS)
@pytest.mark.parametrize("att,layers,residual,dtype", [("general", 2, False, "float32"),
                                                       ("dot", 3, True, "float32"),
                                                       ("general", 1, False, "float32"),
                                                       ("general", 2, True, "bfloat16")])
def test_fused_decoder_equals_autodiff_scan(ks, att, layers, residual, dtype):
    """kernels/fused_decoder.py (hand-derived backward) == the generic scan differentiated by JAX
    (model.fused_decoder=false).

    With dropout between layers, on the attention weights and on the output (masks the plain
    reference does not model), residual connections, 1–3 layers, a loss that also reads the
    attention weights (so their cotangent is used), and bfloat16 compute.
    """
    from s2s_jax.kernels import fused_decoder
    cfg = model_config("lstm", att, True, True, 0, decoder_layers=layers, encoder_layers=layers,
                       residual=residual, dropout=0.3, attention_dropout=0.2, bridge="dense", dtype=dtype, kernels=ks)
    generic_cfg = dataclasses.replace(cfg, fused_decoder=False)
    assert fused_decoder.supported(cfg) and not fused_decoder.supported(generic_cfg)
    model, params = init(cfg, seed=layers)
    batch = make_batch(seed=layers)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5, 6)), jnp.float32)

    def run(cfg):
        model = build(cfg)

        def loss(params):
            hidden, weights = model.apply({"params": params}, batch["source"], batch["source_lengths"],
                                          batch["target_input"], deterministic=False,
                                          rngs={"dropout": jax.random.key(5)})
            return _loss_from(model, cfg, params, hidden, batch) + (weights * w).sum(), (hidden, weights)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (v1, (h1, w1)), g1 = run(cfg)
    (v0, (h0, w0)), g0 = run(generic_cfg)
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert_close(v1, v0, tol, "loss")
    assert_close(h1, h0, tol, "hidden")
    assert_close(w1, w0, tol, "attention weights")
    assert not np.allclose(np.asarray(h1), np.asarray(model.apply({"params": params}, batch["source"],
                           batch["source_lengths"], batch["target_input"])[0]))  # dropout did something
    for path, a in jax.tree_util.tree_leaves_with_path(g1):
        b = functools.reduce(lambda t, k: t[k.key], path, g0)
        assert_close(a, b, tol, f"grad {jax.tree_util.keystr(path)}")


# -- the fused loss ---------------------------------------------------------------------------

@pytest.mark.parametrize("ks", SETS)
def test_fused_loss_of_an_all_padding_batch_is_zero(ks):
    """A batch with no real target row (all filler) adds nothing: sums and gradients are zero."""
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(3, 70, 5)), jnp.float32)  # 210 rows: several blocks
    kernel = jnp.asarray(rng.normal(size=(5, 11)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(11,)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (3, 70)), jnp.int32)
    for weight in (0.0, 1.0):
        f = jax.jit(jax.value_and_grad(lambda h, k, b: losses.sequence_loss(
            h, k, b, targets, jnp.full((3, 70), weight), kernels=kernels.select(ks))["loss"], argnums=(0, 1, 2)))
        v, g = f(hidden, kernel, bias)
        if weight == 0.0:
            assert float(v) == 0.0 and all(float(jnp.abs(x).max()) == 0.0 for x in g)
        else:  # every row real: the blocks past the first are all counted
            assert_close(v, losses.token_losses(hidden @ kernel + bias, targets)[0].sum())


def check_fused_loss_against_autodiff(T, lengths, eps=0.0, chunk=0, seed=0, dtype="float32", ks="cpu"):
    """losses.sequence_loss (gradient formed in its forward pass) == autodiff of token_losses on
    a [B, T] batch whose rows have the given real lengths: sums, metrics and all gradients.
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
                                 dtype=dt, kernels=kernels.select(ks))
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
    """cpu: 600 rows; real-row counts 0, 45, 270, 401 and 600 take 1 or 2 big blocks of BIG_ROWS
    and 0 to 3 small ones (kernels/loss.py _compacted)."""
    check_fused_loss_against_autodiff(200, lengths, seed=1, ks="cpu")


@pytest.mark.parametrize("lengths", [(0, 0), (3000, 0), (2048, 2049), (3000, 2500)])
def test_fused_loss_static_blocks_match_autodiff(lengths):
    """portable: 6000 rows run as two equal blocks of 3000 (more than PORTABLE_ROWS), the last
    padded; real rows anywhere (kernels/loss.py _static_rows)."""
    assert 2 * 3000 > loss_kernel.PORTABLE_ROWS >= 3000
    check_fused_loss_against_autodiff(3000, lengths, seed=2, ks="portable")


@pytest.mark.parametrize("ks", SETS)
@pytest.mark.parametrize("eps,chunk,dtype", [(0.0, 0, "float32"), (0.1, 0, "float32"), (0.1, 3, "float32"),
                                             (0.0, 0, "bfloat16"), (0.1, 3, "bfloat16")])
def test_fused_loss_matches_autodiff(ks, eps, chunk, dtype):
    """With and without label smoothing, whole or chunked over time, float32 (bias folded into
    the products) and bfloat16 compute (bias a separate float32 add)."""
    check_fused_loss_against_autodiff(7, (7, 2, 5), eps, chunk, dtype=dtype, ks=ks)


# -- dense, gates -----------------------------------------------------------------------------

@pytest.mark.parametrize("ks", SETS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_projection_gradients_equal_autodiff(ks, dtype):
    """KernelSet.matmul (rows flattened; cpu: hand-written backward) == autodiff of the plain
    einsum, for a time-major [T, B, D] input, in float32 and with bfloat16 compute."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(5, 3, 7)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(7, 11)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(5, 3, 11)), jnp.float32)
    dt = jnp.dtype(dtype)

    def plain(x, w):
        return jnp.einsum("tbd,dg->tbg", x.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)

    y0, vjp0 = jax.vjp(plain, x, w)
    y1, vjp1 = jax.jit(lambda x, w: jax.vjp(lambda x, w: kernels.select(ks).matmul(x, w, dt), x, w))(x, w)
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert y1.shape == (5, 3, 11) and y1.dtype == jnp.float32
    assert_close(y1, y0, tol)
    for a, b in zip(vjp1(dy), vjp0(dy)):
        assert a.dtype == jnp.float32
        assert_close(a, b, tol)


@pytest.mark.parametrize("ks", SETS)
def test_lstm_gate_grads_equal_autodiff_of_the_cell(ks):
    """activations.lstm_gate_grads (the backward of one LSTM step's gates) == jax.vjp of the
    step, with either set's gate nonlinearity."""
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
    acts = kernels.select(ks).lstm_activations(z)
    i, f, g, o = jnp.split(z, 4, axis=-1)
    plain = jnp.concatenate([jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)], -1)
    assert_close(acts, plain, 2e-7)
    dz1, dc_prev1 = activations.lstm_gate_grads(acts, c_new, c_prev, dh, dc)
    assert_close(dz1, dz0, 1e-5)
    assert_close(dc_prev1, dc_prev0, 1e-5)


# -- the train step: guard, precision, lowered programs -------------------------------------

def _train_setup(ks, precision="auto", dtype="float32", **model_fields):
    fields = {**dict(cell="lstm", attention="general", input_feeding=True, bidirectional=True, bridge="dense",
                     kernels=ks, dropout=0.1, matmul_precision=precision, dtype=dtype), **model_fields}
    mcfg = model_config(*(fields.pop(k) for k in ("cell", "attention", "input_feeding", "bidirectional")), 0, **fields)
    config = Config(model=mcfg, train=TrainConfig(learning_rate=1e-2, clip_norm=1.0))
    model = build(mcfg)
    state = create_state(config, model)
    return config, model, state


@pytest.mark.parametrize("ks", SETS)
def test_non_finite_guard_keeps_the_state_bitwise(ks):
    """A NaN in the batch's loss (a NaN parameter row reached by the batch) skips the update:
    parameters and optimizer state come back bitwise unchanged, counters move; a finite step
    updates. Both sets (cond / select) give the same finite update."""
    config, model, state = _train_setup(ks)
    step = jax.jit(functools.partial(steps.train_step, model=model, config=config))
    batch = make_batch()
    new, m = step(state, batch)
    assert float(m["skipped"]) == 0.0 and int(new.step) == 1
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)))
    poisoned = state.replace(params=jax.tree.map(lambda x: x, state.params))
    emb = poisoned.params["target_embedding"]
    poisoned = poisoned.replace(params={**poisoned.params, "target_embedding": emb.at[batch["target_input"][0, 0]].set(jnp.nan)})
    after, m = step(poisoned, batch)
    assert float(m["skipped"]) == 1.0 and int(after.nonfinite) == 1 and int(after.step) == 1
    for a, b in zip(jax.tree.leaves((after.params, after.opt_state)), jax.tree.leaves((poisoned.params, poisoned.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_both_sets_take_the_same_train_step():
    """cpu and portable from the same state and batch: the same loss and parameters (float32,
    within 1e-5: the two compute the same function in a different order)."""
    results = []
    for ks in SETS:
        config, model, state = _train_setup(ks)
        step = jax.jit(functools.partial(steps.train_step, model=model, config=config))
        for seed in range(3):
            state, m = step(state, make_batch(seed=seed))
        results.append((m, state.params))
    (m0, p0), (m1, p1) = results
    assert_close(m0["loss"], m1["loss"])
    jax.tree.map(lambda a, b: assert_close(a, b), p0, p1)


def _lowered_train_step(ks, **kw):
    config, model, state = _train_setup(ks, **kw)
    batch = make_batch()
    fn = jax.jit(functools.partial(steps.train_step, model=model, config=config))
    return fn.lower(state, batch).as_text()


def _while_trip_counts_static(hlo: str) -> list[bool]:
    """For each stablehlo.while in the module text: whether its condition compares the counter
    with a constant (a scan / fori_loop with static bounds) — False when the bound is a value
    computed on the device."""
    out = []
    for m in re.finditer(r"stablehlo\.while\((.*?)\)\s*:.*?cond \{(.*?)\} do \{", hlo, re.S):
        cond = m.group(2)
        cmp = re.search(r"stablehlo\.compare\s+LT,\s*(%[\w#]+),\s*(%[\w#]+)", cond)
        if cmp is None:
            out.append(False)
            continue
        bound = cmp.group(2).split("#")[0]
        out.append(bool(re.search(re.escape(bound) + r"\s*=\s*stablehlo\.constant", cond)))
    return out


def test_lowered_portable_train_step_has_static_control_flow_only():
    """portable: no conditional, no optimisation barrier, and every while loop is a time scan
    (or a static block loop) whose trip count is a compile-time constant; the cpu set still has
    its cond, its device-counted loss loops and its barriers (the switch really switches)."""
    portable = _lowered_train_step("portable")
    cpu = _lowered_train_step("cpu")
    for name, text in (("portable", portable), ("cpu", cpu)):
        assert "stablehlo.while" in text, name  # the time scans are there in both
    assert "stablehlo.case" not in portable and "stablehlo.if" not in portable
    assert "optimization_barrier" not in portable
    static = _while_trip_counts_static(portable)
    assert static and all(static), static
    assert "stablehlo.case" in cpu or "stablehlo.if" in cpu  # the lax.cond guard
    assert "optimization_barrier" in cpu
    assert not all(_while_trip_counts_static(cpu))  # the loss's device-counted block loops


def _cpu_set_constructs(hlo: str) -> list[str]:
    """The cpu set's constructs found in a lowered module: a conditional, an optimisation
    barrier, a while loop whose trip count is computed on the device."""
    found = [c for c in ("stablehlo.case", "stablehlo.if", "optimization_barrier") if c in hlo]
    return found + (["device-counted while"] if not all(_while_trip_counts_static(hlo)) else [])


def test_model_built_with_the_portable_set_reaches_no_cpu_construct():
    """On the CPU backend, with model.kernels naming the cpu set (explicitly, and by auto), a
    model built with the portable set gives a train step with none of the cpu set's constructs:
    the set given to the model once is the one everything downstream uses (the model, the loss,
    the guard), with nothing re-resolved from the config."""
    assert jax.default_backend() == "cpu"
    for name in ("cpu", "auto"):
        assert kernels.select(name).name == "cpu"
        config, _, _ = _train_setup(name)
        model = Seq2Seq(config.model, VOCAB, VOCAB, kernels.select("portable"))
        state = create_state(config, model)
        fn = jax.jit(functools.partial(steps.train_step, model=model, config=config))
        hlo = fn.lower(state, make_batch()).as_text()
        assert "stablehlo.while" in hlo  # the time scans
        assert not _cpu_set_constructs(hlo), (name, _cpu_set_constructs(hlo))


def _decoder_scan_probe(ks, fused: bool):
    """KernelSet.decoder_scan called directly: a 1-layer input-feeding LSTM decoder with general
    attention (the fused decoder, or with model.fused_decoder off the model's step, taped)."""
    from s2s_jax.model.decoder import _step, _tape_names
    cfg = model_config("lstm", "general", True, False, 0, decoder_layers=1, fused_decoder=fused)
    T, B, S, H = 4, 2, 3, 8
    rng = np.random.default_rng(0)

    def r(*shape):
        return jnp.asarray(rng.normal(size=shape) * 0.3, jnp.float32)

    W = {"layer0": r(2 * H, 4 * H), "layer0_bias": r(4 * H), "att_output_kernel": r(2 * H, H),
         "att_key_kernel": r(H, H)}
    gx0, memory, keys = r(T, B, 4 * H), r(B, S, H), r(B, S, H)
    mask = jnp.asarray([[True, True, True], [True, True, False]])
    state = {"layers": ((r(B, H), r(B, H)),), "feed": r(B, H)}

    def f(W, gx0, memory, keys, state):
        hidden, weights = ks.decoder_scan(cfg, W, gx0, state, memory, keys, mask, None,
                                          step=functools.partial(_step, cfg, ks), tape_names=_tape_names(cfg))
        return hidden.sum() + weights.sum()

    return jax.grad(f, argnums=(0, 1, 2, 3, 4)), (W, gx0, memory, keys, state)


def _kernel_set_probes(ks):
    """{operation: (function, args)}: every operation of a KernelSet called with `ks` given
    explicitly, differentiated where it has a hand-written backward pass."""
    rng = np.random.default_rng(0)

    def r(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    T, K, B, H, V = 5, 2, 3, 4, 11
    mask = jnp.asarray(np.arange(T)[:, None, None, None] < np.array([5, 3, 2])[None, None, :, None])
    mask = jnp.broadcast_to(mask, (T, K, B, 1))
    y = jnp.asarray(rng.integers(0, V, (3, 70)), jnp.int32)
    w = jnp.asarray(np.arange(70)[None] < np.array([70, 20, 0])[:, None], jnp.float32)
    big_y, big_w = jnp.zeros((2, 3000), jnp.int32), jnp.ones((2, 3000), jnp.float32)

    def recurrence(cell, G):
        def f(xp, w_hh, b_hh, initial):
            ys, _ = ks.recurrence(cell, jnp.float32, 1, xp, w_hh, b_hh, mask, initial)
            return ys.sum()
        initial = (r(K, B, H), r(K, B, H)) if cell == "lstm" else r(K, B, H)
        return jax.grad(f, argnums=(0, 1, 3)), (r(T, K, B, G * H), r(K, H, G * H),
                                                None if cell == "lstm" else r(K, G * H), initial)

    def loss(chunk, h, y, w):
        f = lambda h, k, b: ks.sequence_sums(h, k, b, y, w, label_smoothing=0.1, chunk=chunk)[0]  # noqa: E731
        return jax.grad(f, argnums=(0, 1, 2)), (h, r(5, V), r(V))

    def update(p):  # -> the new `old` tuple
        return (jax.tree.map(lambda x: x * 0.5, p),)

    return {
        "matmul": (jax.grad(lambda x, w: ks.matmul(x, w, jnp.float32).sum(), argnums=(0, 1)), (r(5, 3, 7), r(7, V))),
        "rows_transposed_product": (lambda x, g: ks.rows_transposed_product(x, g, jnp.bfloat16), (r(24, 40), r(24, 16))),
        "lstm_activations": (ks.lstm_activations, (r(3, 4 * H),)),
        "recurrence/lstm": recurrence("lstm", 4),
        "recurrence/gru": recurrence("gru", 3),
        "decoder_scan/fused": _decoder_scan_probe(ks, True),
        "decoder_scan/taped": _decoder_scan_probe(ks, False),
        "sequence_sums": loss(0, r(3, 70, 5), y, w),
        "sequence_sums/chunked": loss(3, r(3, 70, 5), y, w),
        "sequence_sums/many_rows": loss(0, r(2, 3000, 5), big_y, big_w),
        "global_norm": (ks.global_norm, ({"a": r(3, 4), "b": r(5)},)),
        "apply_if": (lambda keep, p: ks.apply_if(keep, update, (p,)), (jnp.asarray(True), {"a": r(3, 4)})),
        "best_token": (lambda logits, force: ks.best_token(logits, force, 2), (r(8, 1024), jnp.zeros(8, bool))),
        "top_extensions": (lambda alive, logits, force: ks.top_extensions(alive, logits, force, 2, 6),
                           (r(6, 3), r(6, 3, 1024), jnp.zeros(6, bool))),
    }


def test_every_portable_operation_called_directly_reaches_no_cpu_construct():
    """Each operation of the portable set, called with the set explicitly (no model, no config),
    lowered on the CPU backend: no conditional, no optimisation barrier, no device-counted loop.
    The same probes of the cpu set find its constructs where it has them (the probes reach
    them), and every operation of a KernelSet has a probe."""
    ops = {f.name for f in dataclasses.fields(kernels.KernelSet)} - {"name"}
    lowered = {}
    for name in SETS:
        probes = _kernel_set_probes(kernels.select(name))
        assert {p.split("/")[0] for p in probes} == ops
        lowered[name] = {op: jax.jit(f).lower(*args).as_text() for op, (f, args) in probes.items()}
    found = {op: _cpu_set_constructs(text) for op, text in lowered["portable"].items()}
    assert not any(found.values()), found
    cpu = {op: _cpu_set_constructs(text) for op, text in lowered["cpu"].items()}
    for op in ("matmul", "rows_transposed_product", "sequence_sums", "sequence_sums/chunked", "apply_if",
               "best_token", "top_extensions"):
        assert cpu[op], (op, cpu)


def test_float32_dots_carry_the_configured_precision():
    """model.matmul_precision reaches every dot of the train step (forward and the hand-written
    backward passes): auto = HIGHEST for float32 compute; default leaves XLA's choice;
    tensorfloat32 asks for TF32."""
    def precisions(text):
        return set(re.findall(r"precision = \[(\w+), \w+\]", text)) | (
            {"DEFAULT"} if re.search(r"stablehlo\.dot_general(?![^\n]*precision)", text) else set())

    auto = _lowered_train_step("portable")
    assert precisions(auto) == {"HIGHEST"}, precisions(auto)
    assert precisions(_lowered_train_step("portable", precision="default")) == {"DEFAULT"}
    tf32 = _lowered_train_step("portable", precision="tensorfloat32")
    assert precisions(tf32) == {"HIGH"} or "TF32" in tf32, precisions(tf32)
    assert kernels.matmul_precision(ModelConfig(dtype="bfloat16")) == "default"


def _xla_keeps_plain_bfloat16_products() -> bool:
    """Whether XLA:CPU here keeps a plain row-major bfloat16 product in bfloat16 (its library
    path); the tests below hold the train step to that standard."""
    a, b = jnp.ones((32, 64), jnp.bfloat16), jnp.ones((64, 48), jnp.bfloat16)
    text = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32)).lower(a, b).compile().as_text()
    dots = benchmark.dot_operand_types(text)
    return bool(dots) and all(t == ("bf16", "bf16") for t in dots.values())


def test_bfloat16_cpu_step_keeps_every_product_in_bfloat16():
    """cpu set, bfloat16 compute: XLA:CPU runs a bfloat16 product on its fast library path only
    with row-major, untransposed operands, and silently rewrites any other one to float32
    (kernels/dense.py). Every matrix product of the compiled train step — forward, the
    hand-written backward passes, the loss blocks and the weight gradients — keeps bfloat16
    operands; in float32 they are float32 (the check reads real types)."""
    if not _xla_keeps_plain_bfloat16_products():
        pytest.skip("this XLA:CPU build / CPU rewrites even a plain bfloat16 product to float32")
    for dtype, want in (("bfloat16", "bf16"), ("float32", "f32")):
        config, model, state = _train_setup("cpu", dtype=dtype)
        fn = jax.jit(functools.partial(steps.train_step, model=model, config=config))
        # 16 rows: XLA:CPU also upcasts products that contract fewer than ~8 rows (the bridge's
        # weight gradients contract over the batch), which never happens at real batch sizes
        batch = make_batch(source_lengths=np.resize(SOURCE_LENGTHS, 16), target_lengths=np.resize(TARGET_LENGTHS, 16))
        dots = benchmark.dot_operand_types(fn.lower(state, batch).compile().as_text())
        assert len(dots) >= 20, dots  # forward, backward and loss products were all found
        wrong = {name: t for name, t in dots.items() if t != (want, want)}
        assert not wrong, (dtype, wrong)


def test_transposed_is_a_real_row_major_copy():
    """dense.transposed gives xᵀ exactly (any dtype); the weight-gradient product through it is
    xᵀ·g and, where XLA:CPU keeps plain bfloat16 products, a bfloat16 one."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(24, 40)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(dense_kernel.transposed(x, jnp.float32)), np.asarray(x).T)
    np.testing.assert_array_equal(np.asarray(dense_kernel.transposed(x, jnp.bfloat16)),
                                  np.asarray(x.astype(jnp.bfloat16)).T)
    g = jnp.ones((24, 16), jnp.float32)
    product = jax.jit(lambda x, g: kernels.select("cpu").rows_transposed_product(x, g, jnp.bfloat16))
    np.testing.assert_allclose(np.asarray(product(x, g)), np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32)).T @ np.asarray(g),
                               rtol=1e-6, atol=1e-5)
    if _xla_keeps_plain_bfloat16_products():
        dots = benchmark.dot_operand_types(product.lower(x, g).compile().as_text())
        assert dots and all(t == ("bf16", "bf16") for t in dots.values()), dots


def test_deterministic_flags_set_before_the_backend_starts():
    """train.deterministic: configure_backend adds the XLA flag to XLA_FLAGS (keeping the user's
    own flags) before jax starts, and the backend accepts it; off adds nothing."""
    import os
    import subprocess
    import sys
    code = ("import os; from s2s_jax import runtime; print(runtime.configure_backend({on}));"
            "import jax, jax.numpy as jnp; print(float(jnp.ones(3).sum())); print(os.environ.get('XLA_FLAGS', ''))")
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_enable_fast_math=false")
    for on in (True, False):
        out = subprocess.run([sys.executable, "-c", code.format(on=on)], env=env, capture_output=True, text=True,
                             check=True).stdout.splitlines()
        assert out[1] == "3.0"
        if on:
            assert out[0] == "['--xla_gpu_deterministic_ops=true']"
            assert out[2] == "--xla_cpu_enable_fast_math=false --xla_gpu_deterministic_ops=true"
        else:
            assert out[0] == "[]" and out[2] == "--xla_cpu_enable_fast_math=false"


# -- recipe parts (model.layer_norm, the recipe dropouts): docs/model.md ----------------------

RECIPE = dict(layer_norm="per_gate", embedding_dropout=0.2, output_dropout=0.2, recurrent_dropout=0.2,
              source_word_dropout=0.1, target_word_dropout=0.1)
LN_CASES = [("lstm", "general", True, True, "per_gate"), ("gru", "mlp", False, True, "whole"),
            ("gru", "dot", True, False, "per_gate"), ("lstm", "none", False, True, "whole"),
            ("lstm", "mlp", False, False, "per_gate"), ("gru", "general", True, True, "whole")]


@pytest.mark.parametrize("ks,case", [pytest.param(ks, case, id=f"{ks}-" + "-".join(map(str, case)),
                                                  marks=() if (j + (ks == "portable")) % 2 == 0 else (pytest.mark.slow, pytest.mark.extended))
                                     for ks in SETS for j, case in enumerate(LN_CASES)])
def test_layer_norm_matches_reference(ks, case):
    """model.layer_norm (per gate block and whole) in the encoder and decoder cells: outputs and
    gradients against ref.normed_cell_step, both sets (the input-feeding LSTM decoder leaves the
    fused decoder for the generic scan)."""
    *model_case, ln = case
    i = LN_CASES.index(case)
    check_against_reference(model_config(*model_case, i, kernels=ks, matmul_precision="highest", layer_norm=ln), i)


@pytest.mark.parametrize("ks", SETS)
@pytest.mark.parametrize("cell,att,feed", [("lstm", "general", True), ("gru", "mlp", False)])
def test_layer_norm_padding_invariance(ks, cell, att, feed):
    cfg = model_config(cell, att, feed, True, 1, kernels=ks, layer_norm="per_gate")
    model, params = init(cfg)
    batch = make_batch()
    apply = jax.jit(model.apply)
    h0, _ = apply({"params": params}, batch["source"], batch["source_lengths"], batch["target_input"])
    padded = pad_batch(batch, 3, 2)
    h1, _ = apply({"params": params}, padded["source"], padded["source_lengths"], padded["target_input"])
    for b in range(len(SOURCE_LENGTHS)):
        assert_close(h1[b, :int(TARGET_LENGTHS[b])], h0[b, :int(TARGET_LENGTHS[b])], tol=1e-6)


def _plain_recurrence(cell, xp, w_hh, b_hh, mask, initial, norm, state_mask):
    """A Python loop over t of reference_model's equations, with the per-sequence state mask on
    h before h·W_hh and layer norm (gain `norm` [K, g, n]) of h·W_hh; xp includes the input side."""
    outs, state = [], initial
    for t in range(xp.shape[0]):
        h = state[0] if cell == "lstm" else state
        gh = jnp.einsum("kbh,khg->kbg", h * state_mask, w_hh, precision=ref.HIGH)
        gh = jnp.stack([ref.layer_norm(gh[k], norm[k]) for k in range(gh.shape[0])])
        H = h.shape[-1]
        if cell == "lstm":
            z = xp[t] + gh
            c = jax.nn.sigmoid(z[..., H:2 * H]) * state[1] + jax.nn.sigmoid(z[..., :H]) * jnp.tanh(z[..., 2 * H:3 * H])
            new = (jax.nn.sigmoid(z[..., 3 * H:]) * jnp.tanh(c), c)
        else:
            gh = gh + b_hh[:, None]
            r = jax.nn.sigmoid(xp[t][..., :H] + gh[..., :H])
            u = jax.nn.sigmoid(xp[t][..., H:2 * H] + gh[..., H:2 * H])
            n = jnp.tanh(xp[t][..., 2 * H:] + r * gh[..., 2 * H:])
            new = (1 - u) * n + u * h
        state = jax.tree.map(lambda a, b: jnp.where(mask[t], a, b), new, state)
        outs.append(jnp.where(mask[t], state[0] if cell == "lstm" else state, 0.0))
    return jnp.stack(outs), state


@pytest.mark.parametrize("ks", SETS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_recurrence_with_state_dropout_and_layer_norm_matches_plain_loop(ks, cell):
    """KernelSet.recurrence with a per-sequence state mask (model.recurrent_dropout) and layer
    norm of h·W_hh: outputs, final carry and gradients against a Python loop, two directions,
    ragged lengths (the mask is the same at every step)."""
    rng = np.random.default_rng(5)
    T, K, B, H = 5, 2, 3, 4
    G = 4 if cell == "lstm" else 3

    def r(*shape):
        return jnp.asarray(rng.normal(size=shape) * 0.5, jnp.float32)

    mask = jnp.broadcast_to(jnp.asarray(np.arange(T)[:, None, None, None] < np.array([5, 3, 1])[None, None, :, None]),
                            (T, K, B, 1))
    state_mask = jnp.asarray(rng.integers(0, 2, (K, B, H)) / 0.5, jnp.float32)
    norm = 1.0 + r(K, G, H)
    args = (r(T, K, B, G * H), r(K, H, G * H), r(K, G * H), (r(K, B, H), r(K, B, H)) if cell == "lstm" else r(K, B, H))
    b_hh = args[2] if cell == "gru" else None

    def fast(xp, w_hh, b_hh, initial, norm):
        ys, final = kernels.select(ks).recurrence(cell, jnp.float32, 1, xp, w_hh, b_hh, mask, initial,
                                                  recurrent_norm=norm, state_mask=state_mask)
        return (ys ** 2).sum() + sum((x ** 2).sum() for x in jax.tree.leaves(final)), (ys, final)

    def plain(xp, w_hh, b_hh, initial, norm):
        ys, final = _plain_recurrence(cell, xp, w_hh, b_hh, mask, initial, norm, state_mask)
        return (ys ** 2).sum() + sum((x ** 2).sum() for x in jax.tree.leaves(final)), (ys, final)

    argnums = (0, 1, 3, 4) if cell == "lstm" else (0, 1, 2, 3, 4)
    with jax.default_matmul_precision("highest"):
        g1, out1 = jax.jit(jax.grad(fast, argnums, has_aux=True))(args[0], args[1], b_hh, args[3], norm)
    g0, out0 = jax.grad(plain, argnums, has_aux=True)(args[0], args[1], b_hh, args[3], norm)
    jax.tree.map(lambda a, b: assert_close(a, b), out1, out0)
    jax.tree.map(lambda a, b: assert_close(a, b), g1, g0)


def _recipe_gradient(ks, **fields):
    """The loss and gradient of one training batch (dropout drawn from a fixed step key)."""
    config, model, state = _train_setup(ks, **{**RECIPE, **fields})
    batch = make_batch(seed=1)

    def loss(params):
        with kernels.precision_scope(config.model):
            sums = steps.loss_sums(params, batch, model=model, config=config, rng=jax.random.key(4),
                                   row_ids=jnp.arange(len(SOURCE_LENGTHS)))
        return sums["loss"] / sums["weight"]

    return jax.jit(jax.value_and_grad(loss))(state.params)


@pytest.mark.parametrize("fields", [{}, {"cell": "gru", "input_feeding": False, "attention": "mlp"},
                                    {"cell": "gru", "input_feeding": False, "attention": "mlp", "decoder_type": "conditional",
                                     "decoder_layers": 1}], ids=["lstm-feeding", "gru-mlp", "cgru"])
def test_both_sets_give_the_same_gradient_with_the_recipe_parts(fields):
    """Layer norm and every recipe dropout on: cpu and portable draw the same masks from the same
    step key and compute the same loss and gradient, within 1e-5; the dropouts change the loss."""
    (v0, g0), (v1, g1) = (_recipe_gradient(ks, **fields) for ks in SETS)
    assert_close(v0, v1)
    jax.tree.map(lambda a, b: assert_close(a, b), g0, g1)
    quiet, _ = _recipe_gradient("cpu", **fields, **{k: 0.0 for k in RECIPE if k.endswith("dropout")})
    assert abs(float(quiet) - float(v0)) > 1e-4


def test_lowered_portable_train_step_with_the_recipe_parts_has_static_control_flow_only():
    """Layer norm and the recipe dropouts add no conditional, barrier or device-counted loop."""
    portable = _lowered_train_step("portable", **RECIPE)
    assert "stablehlo.while" in portable and not _cpu_set_constructs(portable)


# -- the conditional decoder (model.decoder_type="conditional"): docs/model.md ----------------

CONDITIONAL_CASES = [("gru", "mlp", "off", True), ("gru", "general", "per_gate", False), ("lstm", "dot", "whole", True),
                     ("gru", "dot", "off", False)]


@pytest.mark.parametrize("ks,case", [pytest.param(ks, case, id=f"{ks}-" + "-".join(map(str, case)),
                                                  marks=() if (j + (ks == "portable")) % 2 == 0 else (pytest.mark.slow, pytest.mark.extended))
                                     for ks in SETS for j, case in enumerate(CONDITIONAL_CASES)])
def test_conditional_decoder_matches_reference(ks, case):
    """cGRU (and the conditional LSTM), with and without layer norm: outputs and gradients against
    ref.conditional_forward, both sets."""
    cell, att, ln, bi = case
    i = CONDITIONAL_CASES.index(case)
    check_against_reference(model_config(cell, att, False, bi, i, kernels=ks, matmul_precision="highest",
                                         layer_norm=ln, decoder_type="conditional", decoder_layers=1), i)


@pytest.mark.parametrize("ks", SETS)
def test_conditional_decoder_padding_invariance(ks):
    cfg = model_config("gru", "mlp", False, True, 1, kernels=ks, decoder_type="conditional", decoder_layers=1)
    model, params = init(cfg)
    batch = make_batch()
    apply = jax.jit(model.apply)
    h0, w0 = apply({"params": params}, batch["source"], batch["source_lengths"], batch["target_input"])
    padded = pad_batch(batch, 3, 2)
    h1, w1 = apply({"params": params}, padded["source"], padded["source_lengths"], padded["target_input"])
    for b in range(len(SOURCE_LENGTHS)):
        T, S = int(TARGET_LENGTHS[b]), int(SOURCE_LENGTHS[b])
        assert_close(h1[b, :T], h0[b, :T], tol=1e-6)
        assert_close(w1[b, :T, :S], w0[b, :T, :S], tol=1e-6)


def test_lowered_portable_conditional_train_step_has_static_control_flow_only():
    portable = _lowered_train_step("portable", **RECIPE, decoder_type="conditional", input_feeding=False,
                                   decoder_layers=1, cell="gru")
    assert "stablehlo.while" in portable and not _cpu_set_constructs(portable)
