"""LSTM and GRU recurrences written for XLA: hoisted input projections, fused gates, both
directions of a bidirectional layer in one scan.

Parameters of one recurrent layer (`RecurrentParams`), K = number of directions (1 or 2),
G = 4 (LSTM, gate order i, f, g, o) or 3 (GRU, gate order r, z, n):
    input_kernel      [D, K, G·H]   x_t @ W_ih, hoisted out of the scan
    bias              [K, G·H]      added to the hoisted projection
    recurrent_kernel  [K, H, G·H]   h_{t-1} @ W_hh, the only matmul inside the scan body
    recurrent_bias    [K, G·H]      GRU only (b_hn sits inside r * (h W_hn + b_hn))

All matmuls take the compute dtype (float32 or bfloat16) and accumulate in float32; the carry
and gate nonlinearities stay float32.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

GATES = {"lstm": 4, "gru": 3}


def matmul(x: Array, w: Array, dtype) -> Array:
    """x [..., D] @ w [D, G] with inputs in the compute dtype and a float32 result.

    Leading axes are flattened into rows and the product is `dense`, whose backward pass forms
    the weight gradient as an explicitly transposed xᵀ [D, rows] times dy [rows, G].
    """
    lead = x.shape[:-1]
    y = dense(x.reshape(-1, x.shape[-1]), w, jnp.dtype(dtype).name)
    return y.reshape(lead + (w.shape[-1],))


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x: Array, w: Array, dtype: str) -> Array:
    """x [N, D] @ w [D, G] in `dtype` with a float32 result.

    Autodiff of a time-major projection ([T, B, D] @ [D, G]) leaves XLA:CPU a weight gradient
    contracting over two leading axes; it transposes the [T·B, G] cotangent and runs the product
    on its slower generic path (8.96 ms for [1024, 256] x [256, 1024] forward + backward on the
    dev CPU). Here the backward pass multiplies the materialised xᵀ [D, N] (a small copy: D is
    the narrow side) by dy [N, G] and dy by wᵀ, both plain row-major products (5.62 ms); on
    bench_cpu's step (three such projections) 1.7 % by the median, 4.6 % by the best round of an
    in-process A/B.
    """
    dt = jnp.dtype(dtype)
    return jnp.matmul(x.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)


def _dense_fwd(x, w, dtype):
    return dense(x, w, dtype), (x, w)


def rows_transposed_product(x: Array, dy: Array, dtype) -> Array:
    """xᵀ [D, N] @ dy [N, G] in `dtype` with a float32 result: a weight gradient summed over rows.

    Contracting x's row axis in place sends the product to XLA:CPU's generic (Eigen) dot; an
    explicitly transposed copy of x (small: D is the narrow side), kept by an optimization
    barrier because XLA would fold the transpose back into the dot, runs it on the YNN path.
    """
    dt = jnp.dtype(dtype)
    xt = jax.lax.optimization_barrier(x.astype(dt).T)
    return jnp.matmul(xt, dy.astype(dt), preferred_element_type=jnp.float32)


def _dense_bwd(dtype, res, dy):
    x, w = res
    dt = jnp.dtype(dtype)
    dy = dy.astype(dt)
    dx = jnp.matmul(dy, w.astype(dt).T, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), rows_transposed_product(x, dy, dt).astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def _bias_init(cell: str, hidden: int):
    def init(key, shape, dtype=jnp.float32):
        b = jnp.zeros(shape, dtype)
        if cell == "lstm":  # forget-gate bias 1 (Jozefowicz et al., 2015): remember by default
            b = b.at[..., hidden:2 * hidden].set(1.0)
        return b
    return init


class RecurrentParams(nn.Module):
    """Holds one recurrent layer's parameters and returns them as a dict of arrays."""

    cell: str
    in_dim: int
    hidden: int
    directions: int = 1

    @nn.compact
    def __call__(self) -> dict[str, Array]:
        g = GATES[self.cell] * self.hidden
        glorot = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=-2, out_axis=-1,
                                                  batch_axis=())
        p = {
            "input_kernel": self.param(
                "input_kernel",
                nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=0, out_axis=-1,
                                                 batch_axis=(1,)),
                (self.in_dim, self.directions, g)),
            "recurrent_kernel": self.param("recurrent_kernel", glorot, (self.directions, self.hidden, g)),
            "bias": self.param("bias", _bias_init(self.cell, self.hidden), (self.directions, g)),
        }
        if self.cell == "gru":
            p["recurrent_bias"] = self.param("recurrent_bias", nn.initializers.zeros, (self.directions, g))
        return p


def row_dropout_mask(key: Array, rate: float, row_ids: Array, shape: tuple) -> Array:
    """Inverted-dropout keep mask [B, *shape], drawn per row from fold_in(key, row_ids[b]).

    Each example's mask depends only on its global row index, never on how the batch is split,
    so a data-parallel step draws exactly the masks a single-device step draws.
    """
    def one(row):
        keep = jax.random.bernoulli(jax.random.fold_in(key, row), 1.0 - rate, shape)
        return keep.astype(jnp.float32) / (1.0 - rate)
    return jax.vmap(one)(row_ids)


def initial_carry(cell: str, like: Array) -> Any:
    """Zero carry shaped like `like` [..., H]; built from an input so shard_map sees its axes."""
    z = jnp.zeros_like(like, dtype=jnp.float32)
    return (z, z) if cell == "lstm" else z


def carry_hidden(cell: str, carry) -> Array:
    return carry[0] if cell == "lstm" else carry


def cell_update(cell: str, gates_x: Array, gates_h: Array, carry) -> tuple[Any, Array]:
    """One step given the input-side and hidden-side gate pre-activations (float32).

    LSTM: gates_x + gates_h are the fused [i f g o] pre-activations.
    GRU: kept apart because the candidate uses r * (h W_hn + b_hn).
    Returns (new carry, new hidden).
    """
    if cell == "lstm":
        _, c = carry
        i, f, g, o = jnp.split(lstm_activations(gates_x + gates_h), 4, axis=-1)
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (h, c), h
    h = carry
    xr, xz, xn = jnp.split(gates_x, 3, axis=-1)
    hr, hz, hn = jnp.split(gates_h, 3, axis=-1)
    r = jax.nn.sigmoid(xr + hr)
    z = jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    h = (1.0 - z) * n + z * h
    return h, h


def select_carry(mask: Array, new, old):
    """Keeps `old` where mask [.., B, 1] is False (padded steps leave the state untouched)."""
    return jax.tree.map(lambda a, b: jnp.where(mask, a, b), new, old)


# -- the recurrence with a hand-derived backward pass ---------------------------------------
#
# Autodiff of a scanned LSTM step saves a dozen per-step residuals (each gate, its derivative
# pieces, the select masks) and emits ~25 small fused kernels per step forward and more
# backward; on CPU each costs a dispatch, and together they, not the matmul, bound the step.
# `recurrence` saves three arrays per step (the post-activation gates, the cell, the hidden
# carry), its backward loop is one elementwise kernel plus the one truly sequential matmul
# dz_t·W_hhᵀ, and the recurrent kernel's gradient is formed after the loop as one matmul over
# time × batch. tests/test_model.py checks values and gradients against the plain reference.

def _dot(x, w, dtype):  # [K, B, H] @ [K, H, G] -> [K, B, G] float32
    return jnp.einsum("kbh,khg->kbg", x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _dot_t(dz, w, dtype):  # [K, B, G] @ [K, H, G]ᵀ -> [K, B, H] float32
    return jnp.einsum("kbg,khg->kbh", dz.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def lstm_activations(z: Array) -> Array:
    """Pre-activations [..., 4H] (gate order i f g o) -> [σ(i) σ(f) tanh(g) σ(o)].

    One full-width elementwise op selecting per column, instead of four slices and a
    concatenate: inside a scan each separate kernel costs a launch per step. The sigmoids are
    σ(x) = (1 + tanh(x/2)) / 2, so each element takes one tanh (XLA:CPU's vectorised rational
    approximation) instead of a tanh and an exp plus a division for every column: on the
    decoder's [64, 1024] two kernels per layer-step (19–27 + 18 µs) become one (20–22 µs) in a
    bench_cpu step trace (dev CPU); step −1 % (in-process A/B). Equal to jax.nn.sigmoid within
    2e-7 absolute.
    """
    H = z.shape[-1] // 4
    col = jnp.arange(4 * H)
    is_g = (col >= 2 * H) & (col < 3 * H)
    t = jnp.tanh(jnp.where(is_g, z, 0.5 * z))
    return jnp.where(is_g, t, 0.5 * t + 0.5)


def lstm_gate_grads(acts: Array, c_new: Array, c_prev: Array, dh: Array, dc: Array) -> tuple[Array, Array]:
    """LSTM backward through one step's gates: acts [..., 4H] post-activation, c_new/c_prev [..., H],
    dh, dc [..., H] the cotangents of h_new and c_new -> (dz [..., 4H] w.r.t. the pre-activations,
    the cotangent of c_prev).

    dz = outer ⊙ local in a [.., 4, H] view: `outer` stacks the four per-gate [.., H] factors
    (dc·g, dc·c_prev, dc·i, dh·tanh c) and `local` is each gate's own derivative (tanh' for g,
    σ' for i, f, o) chosen by one select per element. XLA emits it as one fused kernel.
    Measured in a 200-step loop on the decoder's [64, 1024] (bench_cpu, dev CPU): 40 µs, against
    70 µs for four per-gate products and a concatenate (XLA emits a kernel per gate, each
    recomputing dc) and 137 µs for picking each element's `outer` by nested selects (every
    gate's formula evaluated for every column; it was also recomputed in both consumers).
    """
    H = c_new.shape[-1]
    i, f, g, o = jnp.split(acts, 4, axis=-1)
    tc = jnp.tanh(c_new)
    dc_tot = dc + dh * o * (1.0 - tc * tc)
    outer = jnp.stack([dc_tot * g, dc_tot * c_prev, dc_tot * i, dh * tc], axis=-2)  # [.., 4, H]
    a = acts.reshape(acts.shape[:-1] + (4, H))
    local = jnp.where(jnp.arange(4)[:, None] == 2, 1.0 - a * a, a * (1.0 - a))
    return (outer * local).reshape(acts.shape), dc_tot * f


def previous_steps(seq: Array, first: Array) -> Array:
    """Time-major seq [T, ...] shifted one step later: the value at t-1, `first` at t = 0."""
    return jnp.concatenate([first[None], seq[:-1]], 0)


def _lstm_step(gx, gh, h, c, m):
    """-> new (h, c) after the mask, post-activation gates [i f g o]."""
    acts = lstm_activations(gx + gh)
    i, f, g, o = jnp.split(acts, 4, axis=-1)
    c_new = f * c + i * g
    h_new = o * jnp.tanh(c_new)
    return jnp.where(m, h_new, h), jnp.where(m, c_new, c), acts


def _gru_step(gx, gh, h, m):
    """gh includes b_hh. -> new h after the mask, post-activation gates [r u n]."""
    xr, xu, xn = jnp.split(gx, 3, axis=-1)
    hr, hu, hn = jnp.split(gh, 3, axis=-1)
    r, u = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xu + hu)
    n = jnp.tanh(xn + r * hn)
    h_new = (1.0 - u) * n + u * h
    return jnp.where(m, h_new, h), jnp.concatenate([r, u, n], -1)


def _recurrence_forward(cell, dtype, unroll, xp, w_hh, b_hh, mask, initial, save: bool):
    """Runs the scan; with `save`, also returns the per-step residuals of the backward pass."""
    def body(carry, inp):
        gx, m = inp
        if cell == "lstm":
            h, c = carry
            h, c, acts = _lstm_step(gx, _dot(h, w_hh, dtype), h, c, m)
            return (h, c), ((h, c, acts) if save else h)
        h = carry
        gh = _dot(h, w_hh, dtype) + b_hh[:, None, :]
        h, acts = _gru_step(gx, gh, h, m)
        return h, ((h, gh[..., 2 * h.shape[-1]:], acts) if save else h)

    return jax.lax.scan(body, initial, (xp, mask), unroll=unroll)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _recurrence(cell, dtype, unroll, xp, w_hh, b_hh, mask, initial):
    final, hs = _recurrence_forward(cell, jnp.dtype(dtype), unroll, xp, w_hh, b_hh, mask, initial, False)
    return jnp.where(mask, hs, 0.0), final


def _recurrence_fwd(cell, dtype, unroll, xp, w_hh, b_hh, mask, initial):
    final, saved = _recurrence_forward(cell, jnp.dtype(dtype), unroll, xp, w_hh, b_hh, mask, initial, True)
    hs = saved[0]
    return (jnp.where(mask, hs, 0.0), final), (saved, w_hh, b_hh, mask, initial)


def _recurrence_bwd(cell, dtype, unroll, res, ct):
    saved, w_hh, b_hh, mask, initial = res
    dtype = jnp.dtype(dtype)
    d_ys, d_final = ct
    d_ys = jnp.where(mask, d_ys, 0.0)  # outputs are zero (constant) at padded steps

    if cell == "lstm":
        hs, cs, acts = saved
        h_prev, c_prev = previous_steps(hs, initial[0]), previous_steps(cs, initial[1])

        def body(carry, inp):
            dh, dc = carry
            a, c, cp, m, dy = inp
            dz, dc_prev = lstm_gate_grads(a, c, cp, dh + dy, dc)
            dz = jnp.where(m, dz, 0.0)
            dh_prev = jnp.where(m, _dot_t(dz, w_hh, dtype), dh)
            dc_prev = jnp.where(m, dc_prev, dc)
            return (dh_prev, dc_prev), dz

        d_initial, dz = jax.lax.scan(body, d_final, (acts, cs, c_prev, mask, d_ys), reverse=True, unroll=unroll)
        d_x, d_h_side = dz, dz
        d_b_hh = None
    else:
        hs, hn, acts = saved
        h_prev = previous_steps(hs, initial)

        def body(dh, inp):
            a, n_h, hp, m, dy = inp
            r, u, n = jnp.split(a, 3, axis=-1)
            dh_tot = dh + dy
            dn = dh_tot * (1.0 - u) * (1.0 - n * n)  # w.r.t. n's pre-activation
            dr = dn * n_h * r * (1.0 - r)
            du = dh_tot * (hp - n) * u * (1.0 - u)
            dgx = jnp.where(m, jnp.concatenate([dr, du, dn], -1), 0.0)
            dgh = jnp.where(m, jnp.concatenate([dr, du, dn * r], -1), 0.0)
            dh_prev = jnp.where(m, dh_tot * u + _dot_t(dgh, w_hh, dtype), dh)
            return dh_prev, (dgx, dgh)

        d_initial, (d_x, d_h_side) = jax.lax.scan(body, d_final, (acts, hn, h_prev, mask, d_ys), reverse=True,
                                                  unroll=unroll)
        d_b_hh = d_h_side.sum((0, 2))
    # the recurrent kernel's gradient, once, over all steps: Σ_t h_{t-1}ᵀ · dz_t
    d_w = jnp.einsum("tkbh,tkbg->khg", h_prev.astype(dtype), d_h_side.astype(dtype),
                     preferred_element_type=jnp.float32).astype(w_hh.dtype)
    return d_x, d_w, d_b_hh, None, d_initial


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def run_layer(params: dict, cell: str, x: Array, lengths: Array, *, initial=None, dtype=jnp.float32,
              unroll: int = 1):
    """A (bi)directional recurrent layer over time-major x [T, B, D] with right padding.

    Direction 1 (if present) reads each sequence backwards, in the same scan as direction 0
    (stacked weights, one batched matmul per step), so a bidirectional layer costs T sequential
    steps, not 2T. The input projection of both directions is one [T·B, D] × [D, K·G·H] matmul
    before the scan (a projection commutes with reordering the steps). Direction 1 scans the
    time-flipped sequence with the flipped mask: its leading padded steps keep the initial state
    (the mask holds the carry), then it reads x_{len-1} .. x_0, so its final carry is the state
    after x_0, as if each column had been reversed within its own length. A flip is a plain
    strided copy that XLA fuses into its neighbours; reversing within lengths was a gather
    (take_along_axis) on the projection, the outputs and both their cotangents (~1.7 % of a
    bench_cpu step, in-process A/B).
    Returns outputs [T, B, K·H] (zero at padded steps; direction 0 first) and the final carry
    (per direction, stacked [K, B, H]; the state at each column's last real step).
    """
    K, H, G = params["recurrent_kernel"].shape
    T, B, D = x.shape
    xp = matmul(x, params["input_kernel"].reshape(D, K * G), dtype).reshape(T, B, K, G) + params["bias"]
    mask = (jnp.arange(T)[:, None] < lengths[None, :])[:, None, :, None]  # [T, 1, B, 1]
    if K == 1:
        xp = xp[:, None, :, 0]  # [T, 1, B, G]
    else:  # direction 1 runs over the time-flipped sequence: padding first, then x_{len-1} .. x_0
        xp = jnp.stack([xp[:, :, 0], jnp.flip(xp[:, :, 1], 0)], axis=1)  # [T, 2, B, G]
        mask = jnp.concatenate([mask, jnp.flip(mask, 0)], axis=1)  # [T, 2, B, 1]
    if initial is None:
        initial = initial_carry(cell, xp[0, :, :, :H])  # [K, B, H]
    ys, final = _recurrence(cell, jnp.dtype(dtype).name, unroll, xp, params["recurrent_kernel"],
                            params.get("recurrent_bias"), mask, initial)  # [T, K, B, H]
    outs = [ys[:, 0]] if K == 1 else [ys[:, 0], jnp.flip(ys[:, 1], 0)]
    return jnp.concatenate(outs, axis=-1), final
