"""Masked, label-smoothed cross-entropy, with the output projection fused into the loss.

Every function returns *sums* and the weight they were summed over, never means, so that
gradient accumulation and data-parallel reduction divide once, by the true token count.

`sequence_loss` projects the decoder's hidden states to the vocabulary and scores them in one
custom-VJP function that forms the gradients in its forward pass (kernels/loss.py: the given
kernel set's `sequence_sums`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from s2s_jax.kernels import KernelSet

Array = jax.Array


def token_losses(logits: Array, targets: Array, label_smoothing: float = 0.0):
    """logits [..., V] (any dtype), targets [...] -> (loss [...], nll [...], correct [...]) float32.

    Label smoothing spreads eps uniformly over the vocabulary (fairseq/OpenNMT style):
    loss = (1 - eps) * nll + eps * mean_v(-log p_v).
    """
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    loss = nll if label_smoothing == 0 else (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return loss, nll, correct


def sequence_loss(hidden: Array, kernel: Array, bias: Array, targets: Array, weights: Array, *,
                  kernels: KernelSet, label_smoothing: float = 0.0, chunk: int = 0,
                  dtype=jnp.float32) -> dict[str, Array]:
    """Projects hidden [B, T, H] to the vocabulary and scores targets [B, T] with weights [B, T].

    chunk > 0: `chunk` time steps at a time inside a scan, so the [B, T, V] logits (and their
    gradient) never exist at once. kernels: the model's kernel set (`model.kernels`).
    Returns sums: loss, nll, correct, weight (float32 scalars). Differentiable w.r.t. hidden,
    kernel and bias through `loss` only (the rest are metrics).
    """
    sums = kernels.sequence_sums(hidden, kernel, bias, targets, weights, label_smoothing=label_smoothing,
                                 chunk=chunk, dtype=dtype)
    return {"loss": sums[0], "nll": sums[1], "correct": sums[2], "weight": sums[3]}


# -- coverage (model.coverage) ----------------------------------------------------------------
def coverage_loss_sum(weights: Array, target_weights: Array) -> Array:
    """Σ_t w_t Σ_i min(a_{t,i}, c_{t,i}) with c_t = Σ_{t'<t} a_{t'} (See et al., 2017, eq. 12).

    weights [B, T, S]: the attention weights (0 at padded source positions, so those add
    nothing); target_weights [B, T]: 1 at real target positions, 0 at padding. Returns a float32
    scalar (a sum, like every loss term here; train.coverage_loss_weight scales it).
    """
    a = weights.astype(jnp.float32)
    c = jnp.cumsum(a, axis=1)
    c = jnp.concatenate([jnp.zeros_like(c[:, :1]), c[:, :-1]], axis=1)  # exclusive: c_0 = 0
    return (jnp.minimum(a, c).sum(-1) * target_weights).sum()
