"""The recurrence of one (bi)directional LSTM/GRU layer with a hand-derived backward pass.

Math (per direction k, step t, with the input projection xp_t = x_t W_ih + b hoisted out):
LSTM z = xp_t + h W_hh, [i f g o] = [σ σ tanh σ](z), c' = f c + i g, h' = o tanh c';
GRU  [r u] = σ(xp_r,u + h W_hr,u + b_hr,u), n = tanh(xp_n + r (h W_hn + b_hn)), h' = (1-u) n + u h.
A masked step (m = 0, padding) keeps the carry; outputs are zero there.

Why (both kernel sets): autodiff of a scanned LSTM step saves a dozen per-step residuals (each
gate, its derivative pieces, the select masks) and emits ~25 small fused kernels per step forward
and more backward; each costs a launch (XLA:CPU ~10-30 µs; on GPUs a kernel launch too). Here
the forward saves three arrays per step (the post-activation gates, the cell, the hidden carry),
the backward loop is one elementwise kernel plus the one truly sequential matmul dz_t·W_hhᵀ, and
the recurrent kernel's gradient is formed after the loop as one matmul over time × batch. Every
loop has the static trip count T. The kernel set only changes the gate nonlinearity
(kernels/activations.py). tests/test_kernels.py checks values and gradients against the
plain reference.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from s2s_jax.kernels.activations import lstm_gate_grads

Array = jax.Array


def _dot(x, w, dtype):  # [K, B, H] @ [K, H, G] -> [K, B, G] float32
    return jnp.einsum("kbh,khg->kbg", x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _dot_t(dz, w, dtype):  # [K, B, G] @ [K, H, G]ᵀ -> [K, B, H] float32
    return jnp.einsum("kbg,khg->kbh", dz.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def previous_steps(seq: Array, first: Array) -> Array:
    """Time-major seq [T, ...] shifted one step later: the value at t-1, `first` at t = 0."""
    return jnp.concatenate([first[None], seq[:-1]], 0)


def _lstm_step(gx, gh, h, c, m, activations):
    """-> new (h, c) after the mask, post-activation gates [i f g o] (activations: the set's
    gate nonlinearity)."""
    acts = activations(gx + gh)
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


def _recurrence_forward(cell, dtype, unroll, activations, xp, w_hh, b_hh, mask, initial, save: bool):
    """Runs the scan; with `save`, also returns the per-step residuals of the backward pass."""
    def body(carry, inp):
        gx, m = inp
        if cell == "lstm":
            h, c = carry
            h, c, acts = _lstm_step(gx, _dot(h, w_hh, dtype), h, c, m, activations)
            return (h, c), ((h, c, acts) if save else h)
        h = carry
        gh = _dot(h, w_hh, dtype) + b_hh[:, None, :]
        h, acts = _gru_step(gx, gh, h, m)
        return h, ((h, gh[..., 2 * h.shape[-1]:], acts) if save else h)

    return jax.lax.scan(body, initial, (xp, mask), unroll=unroll)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _recurrence(cell, dtype, unroll, activations, xp, w_hh, b_hh, mask, initial):
    final, hs = _recurrence_forward(cell, jnp.dtype(dtype), unroll, activations, xp, w_hh, b_hh, mask, initial, False)
    return jnp.where(mask, hs, 0.0), final


def _recurrence_fwd(cell, dtype, unroll, activations, xp, w_hh, b_hh, mask, initial):
    final, saved = _recurrence_forward(cell, jnp.dtype(dtype), unroll, activations, xp, w_hh, b_hh, mask, initial, True)
    hs = saved[0]
    return (jnp.where(mask, hs, 0.0), final), (saved, w_hh, b_hh, mask, initial)


def _recurrence_bwd(cell, dtype, unroll, activations, res, ct):
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


def recurrence(activations, cell: str, dtype, unroll: int, xp: Array, w_hh: Array, b_hh, mask: Array, initial,
               *, recurrent_norm: Array | None = None, state_mask: Array | None = None):
    """The scan over time-major projected inputs xp [T, K, B, G·H] (bias included), recurrent
    kernels w_hh [K, H, G·H] (GRU: b_hh [K, G·H], else None), mask [T, K, B, 1] (True at real
    steps), initial carry ([K, B, H] or its (h, c) pair) -> (outputs [T, K, B, H], zero at masked
    steps; final carry). activations: the LSTM gate nonlinearity (kernels/activations.py), bound
    by the kernel set (KernelSet.recurrence takes the rest).

    recurrent_norm [K, g, G·H/g]: layer normalisation of h·W_hh in g blocks (`layer_norm_gates`;
    model.layer_norm); state_mask [K, B, H]: one dropout mask per sequence on h before h·W_hh
    (model.recurrent_dropout). With either, the step is `_recurrence_plain`'s, differentiated by
    JAX; without both, the hand-derived backward pass above (unchanged)."""
    if recurrent_norm is not None or state_mask is not None:
        return _recurrence_plain(cell, jnp.dtype(dtype), int(unroll), activations, xp, w_hh, b_hh, mask, initial,
                                 recurrent_norm, state_mask)
    return _recurrence(cell, jnp.dtype(dtype).name, int(unroll), activations, xp, w_hh, b_hh, mask, initial)


# -- layer normalisation and variational recurrent dropout (model.layer_norm, recurrent_dropout) --

LAYER_NORM_EPS = 1e-5


def layer_norm_gates(z: Array, scale: Array) -> Array:
    """Layer normalisation of gate pre-activations z [..., G·H] in g blocks, gain only.

    scale [..., g, n] (g·n = G·H; leading axes broadcast against z's): z is viewed as [..., g, n],
    each block of n is normalised to zero mean and unit variance (eps LAYER_NORM_EPS), then
    multiplied by its gains. g = G is per gate block (each gate's H units on their own), g = 1 the
    whole G·H vector at once. No shift: the cell's own biases are added after it.
    """
    g, n = scale.shape[-2:]
    blocks = z.reshape(z.shape[:-1] + (g, n))
    mean = blocks.mean(-1, keepdims=True)
    centred = blocks - mean
    var = jnp.square(centred).mean(-1, keepdims=True)
    return (centred * jax.lax.rsqrt(var + LAYER_NORM_EPS) * scale).reshape(z.shape)


def _recurrence_plain(cell, dtype, unroll, activations, xp, w_hh, b_hh, mask, initial, norm, state_mask):
    """`recurrence` with layer normalisation and/or a per-sequence dropout mask on the state fed
    to W_hh: the plain step in one lax.scan (static trip count T, no cond: both sets), its
    gradient by JAX. norm [K, g, n] -> [K, 1, g, n] against gh [K, B, G·H]."""
    norm = None if norm is None else norm[:, None]

    def body(carry, inp):
        gx, m = inp
        h = carry[0] if cell == "lstm" else carry
        gh = _dot(h if state_mask is None else h * state_mask, w_hh, dtype)
        if norm is not None:
            gh = layer_norm_gates(gh, norm)
        if cell == "lstm":
            h, c, _ = _lstm_step(gx, gh, h, carry[1], m, activations)
            return (h, c), h
        h, _ = _gru_step(gx, gh + b_hh[:, None, :], h, m)
        return h, h

    final, hs = jax.lax.scan(body, initial, (xp, mask), unroll=unroll)
    return jnp.where(mask, hs, 0.0), final
