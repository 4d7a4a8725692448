"""LSTM and GRU layers: parameters, the cell math, and a (bi)directional layer built from the
hoisted input projection and one scan for both directions (the scan itself, with its
hand-derived backward pass, is kernels/recurrence.py).

Parameters of one recurrent layer (`RecurrentParams`), K = number of directions (1 or 2),
G = 4 (LSTM, gate order i, f, g, o) or 3 (GRU, gate order r, z, n):
    input_kernel      [D, K, G·H]   x_t @ W_ih, hoisted out of the scan
    bias              [K, G·H]      added to the hoisted projection
    recurrent_kernel  [K, H, G·H]   h_{t-1} @ W_hh, the only matmul inside the scan body
    recurrent_bias    [K, G·H]      GRU only (b_hn sits inside r * (h W_hn + b_hn))
    input_norm_scale, recurrent_norm_scale [K, g, G·H/g]   model.layer_norm only: the gains of
                      the layer normalisation of x·W_ih and h·W_hh in g blocks (g = G per gate,
                      1 whole; kernels/recurrence.py layer_norm_gates), ones at init

All matmuls take the compute dtype (float32 or bfloat16) and accumulate in float32; the carry
and gate nonlinearities stay float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from s2s_jax.kernels import KernelSet
from s2s_jax.kernels.recurrence import layer_norm_gates

Array = jax.Array

GATES = {"lstm": 4, "gru": 3}


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
    layer_norm: str = "off"  # model.layer_norm

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
        if self.layer_norm != "off":
            blocks = GATES[self.cell] if self.layer_norm == "per_gate" else 1
            shape = (self.directions, blocks, g // blocks)
            p["input_norm_scale"] = self.param("input_norm_scale", nn.initializers.ones, shape)
            p["recurrent_norm_scale"] = self.param("recurrent_norm_scale", nn.initializers.ones, shape)
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


def cell_update(cell: str, gates_x: Array, gates_h: Array, carry, ks: KernelSet) -> tuple[Any, Array]:
    """One step given the input-side and hidden-side gate pre-activations (float32); ks: the
    model's kernel set (its LSTM gate nonlinearity).

    LSTM: gates_x + gates_h are the fused [i f g o] pre-activations.
    GRU: kept apart because the candidate uses r * (h W_hn + b_hn).
    Returns (new carry, new hidden).
    """
    if cell == "lstm":
        _, c = carry
        i, f, g, o = jnp.split(ks.lstm_activations(gates_x + gates_h), 4, axis=-1)
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


def run_layer(params: dict, cell: str, x: Array, lengths: Array, *, ks: KernelSet, initial=None,
              dtype=jnp.float32, unroll: int = 1, state_mask: Array | None = None):
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
    The projection and the scan are the kernel set's (`ks.matmul`, `ks.recurrence`).
    With model.layer_norm (params hold `input_norm_scale`), the projection is normalised before
    the bias is added and the scan normalises h·W_hh; state_mask [K, B, H]: the per-sequence
    recurrent dropout mask (model.recurrent_dropout) on h where it enters h·W_hh.
    Returns outputs [T, B, K·H] (zero at padded steps; direction 0 first) and the final carry
    (per direction, stacked [K, B, H]; the state at each column's last real step).
    """
    K, H, G = params["recurrent_kernel"].shape
    T, B, D = x.shape
    if "input_norm_scale" in params:  # LN(x·W_ih) + b: the statistics are per step, so still hoisted
        xp = ks.matmul(x, params["input_kernel"].reshape(D, K * G), dtype).reshape(T, B, K, G)
        xp = layer_norm_gates(xp, params["input_norm_scale"]) + params["bias"]
    else:
        xp = ks.matmul(x, params["input_kernel"].reshape(D, K * G), dtype).reshape(T, B, K, G) + params["bias"]
    mask = (jnp.arange(T)[:, None] < lengths[None, :])[:, None, :, None]  # [T, 1, B, 1]
    if K == 1:
        xp = xp[:, None, :, 0]  # [T, 1, B, G]
    else:  # direction 1 runs over the time-flipped sequence: padding first, then x_{len-1} .. x_0
        xp = jnp.stack([xp[:, :, 0], jnp.flip(xp[:, :, 1], 0)], axis=1)  # [T, 2, B, G]
        mask = jnp.concatenate([mask, jnp.flip(mask, 0)], axis=1)  # [T, 2, B, 1]
    if initial is None:
        initial = initial_carry(cell, xp[0, :, :, :H])  # [K, B, H]
    ys, final = ks.recurrence(cell, dtype, unroll, xp, params["recurrent_kernel"],
                              params.get("recurrent_bias"), mask, initial,
                              recurrent_norm=params.get("recurrent_norm_scale"), state_mask=state_mask)  # [T, K, B, H]
    outs = [ys[:, 0]] if K == 1 else [ys[:, 0], jnp.flip(ys[:, 1], 0)]
    return jnp.concatenate(outs, axis=-1), final
