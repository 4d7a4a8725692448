"""The input-feeding decoder's training scan with a hand-derived backward pass.

For the common configuration — LSTM layers, Luong `dot`/`general` attention, input feeding —
the whole teacher-forced decoder (every layer and the attention, one step per target position)
is one `custom_vjp` function, as the encoder's recurrence is (kernels/recurrence.py). Both
kernel sets use it (every loop has the static trip count T); the set changes only the gate
nonlinearity. `model.fused_decoder=false` turns it off: `decoder_scan` (a set's decoder scan)
then runs the model's generic step through deferred_scan, differentiated by JAX.

Why: autodiff of the scanned step saved ~30 per-step residuals (each gate, the pieces of each
nonlinearity's derivative, the softmax, the concatenations), each one a stacked [T, B, ·] buffer
that XLA zero-fills, copies at the loop boundary and writes every step, and it emitted ~50 small
kernels per step forward and ~40 backward; on CPU each costs a dispatch. Here the forward saves,
per step, each layer's matmul input, post-activation gates and cell, and the attention's
weights, input [context; query] and output; the backward loop runs per step only the truly
sequential products (dz·Wᵀ for each layer, the attention's three small products and its output
layer's dh·W_cᵀ) and a few fused elementwise kernels. Every loop-invariant weight (the layers'
kernels, W_c, the keys and the memory) gets its gradient after the loop as one matmul over
time × batch.

Math per step t (L layers, layer l's input `side` is the previous attentional state for l = 0
and the output of layer l-1 otherwise):
    z_l = [side_l; h_l] · W_l + b_l          (layer 0: b_0 and the embedding part are in gx0_t)
    i, f, g, o = σ, σ, tanh, σ of z_l;  c_l' = f c_l + i g;  h_l' = o tanh(c_l')
    out_l = (h_l' [+ out_{l-1} if residual, l > 0]) [* dropout mask, l < L-1]
    a = softmax_s(q · k_s) over real source positions (q = out_{L-1});  ctx = Σ_s (a ⊙ drop)_s m_s
    hidden = tanh([ctx; q] · W_c) [* output dropout mask];  it is also the next step's `side_0`.
tests/test_kernels.py checks values and gradients against the plain reference (a Python loop)
and against the generic scan with dropout.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from s2s_jax.kernels import deferred_scan
from s2s_jax.kernels.activations import lstm_gate_grads
from s2s_jax.kernels.deferred_scan import plain_dot, weight_grad
from s2s_jax.kernels.recurrence import previous_steps

NEG_INF = -1e9  # attention scores at padded source positions (finite: exp underflows to exactly 0,
#                and an all-padding row stays NaN-free); model/attention.py uses this one

Array = jax.Array


def supported(cfg) -> bool:
    """Whether `decode` handles this ModelConfig (else the decoder's generic scan does). Coverage
    (model.coverage), layer norm and recurrent dropout hand over to the generic scan; copy
    attention needs nothing of the scan beyond the weights it returns."""
    return (cfg.fused_decoder and cfg.input_feeding and cfg.cell == "lstm" and cfg.attention in ("dot", "general")
            and not cfg.coverage and cfg.layer_norm == "off" and cfg.recurrent_dropout == 0)


def decoder_scan(activations, cfg, W: dict, gx0: Array, state, memory: Array, keys: Array, mask: Array,
                 masks: dict | None, *, step, tape_names):
    """The input-feeding decoder's teacher-forced scan, as a kernel set gives it
    (KernelSet.decoder_scan binds `activations`, the set's LSTM gate nonlinearity).

    Where `supported(cfg)` (model.fused_decoder on, LSTM, dot/general attention): `decode`, the
    hand-derived backward pass. Otherwise the model's own step through `deferred_scan.scan`:
    step(W, dot, gx_t, state, step_masks) -> (hidden, state, weights) is one step of all layers
    and the attention (model/decoder.py `_step`); the arrays named in `tape_names` are the ones
    it only multiplies by (their gradients are formed after the loop).
    Arguments as `decode`'s. Returns time-major (hidden [T, B, H], weights [T, B, S] or None).
    """
    if supported(cfg):
        return decode(cfg, activations, W, gx0, state, memory, keys, mask, masks)
    W = dict(W, memory=memory, keys=keys)
    taped = {k: v for k, v in W.items() if k in tape_names}
    params = {k: v for k, v in W.items() if k not in taped}

    def body(tape, params, fixed, carry, gx, step_masks):
        if step_masks is not None:
            step_masks = dict(step_masks, between=list(step_masks["between"]))
        hidden, carry, weights = step({**tape.weights, **params, **fixed}, tape.dot, gx, carry, step_masks)
        return carry, (hidden, weights)

    _, ys = deferred_scan.scan(body, taped, params, {"mask": mask}, state, gx0, masks, unroll=cfg.unroll)
    return ys


def decode(cfg, activations, W: dict, gx0: Array, state, memory: Array, keys: Array, mask: Array,
           masks: dict | None):
    """Teacher-forced decoding. W: Decoder._prepared()'s arrays (fused `layer{i}` kernels,
    `layer{i}_bias`, `att_output_kernel`); gx0 [T, B, 4H]: layer 0's projected embeddings with
    its bias; state: {"layers": ((h, c), ...), "feed": [B, H]}; memory, keys [B, S, H];
    mask [B, S]; masks: the time-major dropout masks (Decoder.__call__) or None;
    activations: the kernel set's LSTM gate nonlinearity (kernels/activations.py).
    Returns (attentional hidden [T, B, H], attention weights [T, B, S]), float32.
    """
    L = cfg.decoder_layers
    kernels = tuple(W[f"layer{i}"] for i in range(L))
    biases = tuple(W[f"layer{i}_bias"] for i in range(1, L))
    if masks is not None:
        masks = {"between": masks["between"], "output": masks["output"],
                 "attention": masks["attention"][:, :, 0, :]}  # [T, B, S]
    static = (L, bool(cfg.residual), jnp.dtype(cfg.dtype).name, int(cfg.unroll), activations)
    return _decode(static, gx0, kernels, biases, W["att_output_kernel"], keys, memory, mask, masks,
                   (tuple(state["layers"]), state["feed"]))


def _mm(spec, x, w, dtype):
    return plain_dot("", spec, x, w, dtype)


def _forward(static, gx0, kernels, biases, w_out, keys, memory, mask, masks, initial, save: bool):
    L, residual, dtype, unroll, activations = static
    dtype = jnp.dtype(dtype)

    def body(carry, xs):
        layers, feed = carry
        gx, m = xs
        inp, new_layers, saved = None, [], []
        for l in range(L):
            h, c = layers[l]
            both = jnp.concatenate([feed if l == 0 else inp, h], -1)
            z = (gx if l == 0 else biases[l - 1]) + _mm("ni,ig->ng", both, kernels[l], dtype)
            acts = activations(z)
            i, f, g, o = jnp.split(acts, 4, axis=-1)
            c_new = f * c + i * g
            h_new = o * jnp.tanh(c_new)
            out = h_new + inp if residual and l > 0 else h_new
            if m is not None and l + 1 < L:
                out = out * m["between"][l]
            new_layers.append((h_new, c_new))
            if save:
                saved.append((both.astype(dtype), acts, c_new))
            inp = out
        q = inp
        scores = jnp.where(mask, _mm("bh,bsh->bs", q, keys, dtype), NEG_INF)
        a = jax.nn.softmax(scores, axis=-1)
        probs = a if m is None else a * m["attention"]
        ctx = _mm("bs,bsh->bh", probs, memory, dtype)
        att_in = jnp.concatenate([ctx, q], -1)
        hid = jnp.tanh(_mm("ni,ih->nh", att_in, w_out, dtype))
        hidden = hid if m is None else hid * m["output"]
        ys = (hidden, a)
        if save:
            ys = ys + (tuple(saved), att_in.astype(dtype), None if m is None else hid)  # else hid is hidden
        return (tuple(new_layers), hidden), ys

    return jax.lax.scan(body, initial, (gx0, masks), unroll=unroll)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _decode(static, gx0, kernels, biases, w_out, keys, memory, mask, masks, initial):
    _, (hidden, a) = _forward(static, gx0, kernels, biases, w_out, keys, memory, mask, masks, initial, False)
    return hidden, a


def _decode_fwd(static, gx0, kernels, biases, w_out, keys, memory, mask, masks, initial):
    _, (hidden, a, saved, att_in, hid) = _forward(static, gx0, kernels, biases, w_out, keys, memory, mask,
                                                  masks, initial, True)
    hid = hidden if hid is None else hid
    dtypes = jax.tree.map(lambda x: jnp.zeros((0,), x.dtype), (gx0, biases, initial))  # cotangent dtypes
    return (hidden, a), (saved, att_in, hid, a, kernels, w_out, keys, memory, masks, initial, dtypes)


def _decode_bwd(static, res, ct):
    L, residual, dtype, unroll, _ = static
    dtype = jnp.dtype(dtype)
    saved, att_in, hid, a, kernels, w_out, keys, memory, masks, initial, dtypes = res
    d_hidden, d_a_out = ct
    H = w_out.shape[1]
    c_prev = tuple(previous_steps(saved[l][2], initial[0][l][1]) for l in range(L))

    def body(carry, xs):
        dh, dc, d_feed = carry
        (sv, cp, a_t, att_t, hid_t, dy, dwa, m) = xs
        d_hid = dy + d_feed
        if m is not None:
            d_hid = d_hid * m["output"]
        d_pre = d_hid * (1.0 - hid_t * hid_t)
        d_att = _mm("nh,ih->ni", d_pre, w_out, dtype)  # [B, 2H] = [d ctx; d q]
        d_ctx, d_q = d_att[:, :H], d_att[:, H:]
        d_probs = _mm("bh,bsh->bs", d_ctx, memory, dtype)
        d_w = (d_probs if m is None else d_probs * m["attention"]) + dwa
        d_s = a_t * (d_w - jnp.sum(a_t * d_w, -1, keepdims=True))  # softmax backward (0 at padding)
        d_out = d_q + _mm("bs,bsh->bh", d_s, keys, dtype)
        dh, dc, dz = list(dh), list(dc), [None] * L
        for l in reversed(range(L)):
            both, acts, c_new = sv[l]
            if m is not None and l + 1 < L:
                d_out = d_out * m["between"][l]
            dz[l], dc[l] = lstm_gate_grads(acts, c_new, cp[l], dh[l] + d_out, dc[l])
            d_both = _mm("ng,ig->ni", dz[l], kernels[l], dtype)
            n_side = d_both.shape[-1] - H
            d_side, dh[l] = d_both[:, :n_side], d_both[:, n_side:]
            if l > 0:
                d_out = d_side + d_out if residual else d_side
            else:
                d_feed = d_side
        return (tuple(dh), tuple(dc), d_feed), (tuple(dz), d_pre, d_ctx, d_s)

    zeros = jnp.zeros_like(initial[1])
    init = (tuple(zeros for _ in range(L)), tuple(zeros for _ in range(L)), zeros)
    xs = (saved, c_prev, a, att_in, hid, d_hidden, d_a_out, masks)
    (dh, dc, d_feed), (dz, d_pre, d_ctx, d_s) = jax.lax.scan(body, init, xs, reverse=True, unroll=unroll)

    # the loop-invariant arrays' gradients, once each, over all steps (the forward products' specs;
    # the saved inputs `both` and `att_in` are already in the compute dtype)
    d_kernels = tuple(weight_grad("ni,ig->ng", saved[l][0], dz[l], kernels[l]) for l in range(L))
    d_w_out = weight_grad("ni,ih->nh", att_in, d_pre, w_out)
    probs = a if masks is None else a * masks["attention"]
    d_keys = weight_grad("bh,bsh->bs", att_in[:, :, H:], d_s, keys)
    d_memory = weight_grad("bs,bsh->bh", probs.astype(dtype), d_ctx, memory)
    gx_t, bias_t, init_t = dtypes
    d_biases = tuple(dz[l].sum((0, 1)).astype(b.dtype) for l, b in zip(range(1, L), bias_t))
    d_initial = (tuple((dh[l].astype(init_t[0][l][0].dtype), dc[l].astype(init_t[0][l][1].dtype))
                       for l in range(L)), d_feed.astype(init_t[1].dtype))
    d_gx0 = dz[0].astype(gx_t.dtype)
    return (d_gx0, d_kernels, d_biases, d_w_out, d_keys, d_memory, None, None, d_initial)


_decode.defvjp(_decode_fwd, _decode_bwd)
