"""LSTM gate nonlinearities and the hand-derived derivative of one LSTM step's gates.

Gate order i, f, g, o: acts = [σ(z_i) σ(z_f) tanh(z_g) σ(z_o)].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def lstm_activations_one_tanh(z: Array) -> Array:
    """cpu: pre-activations [..., 4H] (gate order i f g o) -> [σ(i) σ(f) tanh(g) σ(o)], with
    σ(x) = (1 + tanh(x/2)) / 2, so each element takes one tanh (XLA:CPU's vectorised rational
    approximation) instead of a tanh and an exp plus a division for every column: two kernels
    per layer-step become one (docs/speed.md). Equal to jax.nn.sigmoid within 2e-7.

    One full-width elementwise op selecting per column, instead of four slices and a concatenate:
    inside a scan each separate kernel costs a launch per step (both forms).
    """
    is_g = _is_g(z)
    t = jnp.tanh(jnp.where(is_g, z, 0.5 * z))
    return jnp.where(is_g, t, 0.5 * t + 0.5)


def lstm_activations_sigmoid(z: Array) -> Array:
    """portable: the same gates with jax.nn.sigmoid, which GPU/TPU backends lower to their own
    fast logistic; one full-width select, as `lstm_activations_one_tanh`."""
    return jnp.where(_is_g(z), jnp.tanh(z), jax.nn.sigmoid(z))


def _is_g(z: Array) -> Array:
    """[4H] bool: the g gate's columns of pre-activations z [..., 4H]."""
    H = z.shape[-1] // 4
    col = jnp.arange(4 * H)
    return (col >= 2 * H) & (col < 3 * H)


def lstm_gate_grads(acts: Array, c_new: Array, c_prev: Array, dh: Array, dc: Array) -> tuple[Array, Array]:
    """LSTM backward through one step's gates: acts [..., 4H] post-activation, c_new/c_prev [..., H],
    dh, dc [..., H] the cotangents of h_new and c_new -> (dz [..., 4H] w.r.t. the pre-activations,
    the cotangent of c_prev).

    Math: with c' = f c + i g, h' = o tanh c', dc_tot = dc + dh·o·(1 − tanh² c'):
    dz_i = dc_tot·g·σ'(i), dz_f = dc_tot·c·σ'(f), dz_g = dc_tot·i·(1 − g²), dz_o = dh·tanh c'·σ'(o),
    dc_prev = dc_tot·f (σ' = a(1 − a) on the post-activation a).

    dz = outer ⊙ local in a [.., 4, H] view: `outer` stacks the four per-gate factors and `local`
    is each gate's own derivative chosen by one select per element, so XLA emits one fused kernel
    instead of one per gate and a concatenate (docs/speed.md). Backend-neutral: both sets use it.
    """
    H = c_new.shape[-1]
    i, f, g, o = jnp.split(acts, 4, axis=-1)
    tc = jnp.tanh(c_new)
    dc_tot = dc + dh * o * (1.0 - tc * tc)
    outer = jnp.stack([dc_tot * g, dc_tot * c_prev, dc_tot * i, dh * tc], axis=-2)  # [.., 4, H]
    a = acts.reshape(acts.shape[:-1] + (4, H))
    local = jnp.where(jnp.arange(4)[:, None] == 2, 1.0 - a * a, a * (1.0 - a))
    return (outer * local).reshape(acts.shape), dc_tot * f
