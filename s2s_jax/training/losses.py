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


# -- copy attention (model.copy_attention) ----------------------------------------------------
def copy_token_losses(logits: Array, gate: Array, copy_weights: Array, source_ext: Array, targets: Array,
                      target_ext: Array, *, label_smoothing: float = 0.0, force_copy: bool = False):
    """Pointer-generator token losses: -log p(y_t) with p(y) = (1 - g) p_vocab(y) + g Σ_{i: x_i = y} a_i.

    logits [B, T, V]; gate [B, T]; copy_weights [B, T, S] (0 at padded source positions);
    source_ext [B, S], target_ext [B, T]: extended ids (a sentence's unknown words >= V);
    targets [B, T]: vocabulary ids (UNK for unknown words). Only p(y_t) is formed: the copy part
    is a masked sum over source positions (no scatter over the vocabulary). The usual rule
    (OpenNMT-py's copy loss): a target outside the vocabulary that appears in the source
    (target_ext >= V) is scored by its copy probability alone; with force_copy so is every
    target that appears in the source. Label smoothing applies to the vocabulary part:
    loss = (1 - eps) (-log p(y)) + eps mean_v(-log p_vocab(v)).
    Returns (loss, nll, correct) [B, T] float32; correct: y_ext has the largest extended
    probability (ties count as correct), computed without the [V + S] distribution.
    """
    V = logits.shape[-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p_vocab = jnp.exp(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0])
    same = source_ext[:, None, :] == target_ext[:, :, None]  # [B, T, S]
    copy_mass = jnp.sum(jnp.where(same, copy_weights, 0.0), -1)
    copy_only = target_ext >= V
    if force_copy:
        copy_only = copy_only | jnp.any(same, -1)  # source padding (PAD) never equals a real target
    g = gate.astype(jnp.float32)
    p = jnp.where(copy_only, 0.0, (1.0 - g) * p_vocab) + g * copy_mass
    nll = -jnp.log(jnp.maximum(p, jnp.finfo(jnp.float32).tiny))
    loss = nll if label_smoothing == 0 else (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    # the largest extended probability: (1 - g) max_v p_vocab(v) for words absent from the source,
    # else p_ext at a source position: (1 - g) p_vocab(x_i) [x_i < V] + g Σ_{j: x_j = x_i} a_j
    src_vocab = jnp.where(source_ext < V, source_ext, 0)
    p_src_vocab = jnp.exp(jnp.take_along_axis(logp, jnp.broadcast_to(src_vocab[:, None, :], copy_weights.shape),
                                              axis=-1))
    pair = (source_ext[:, :, None] == source_ext[:, None, :]).astype(jnp.float32)  # [B, S, S]
    copy_at = jnp.einsum("btj,bij->bti", copy_weights, pair, precision=jax.lax.Precision.HIGHEST)
    p_at = jnp.where(source_ext[:, None, :] < V, (1.0 - g)[..., None] * p_src_vocab, 0.0) + g[..., None] * copy_at
    best = jnp.maximum((1.0 - g) * jnp.exp(logp.max(-1)), p_at.max(-1))
    p_ext = jnp.where(target_ext >= V, 0.0, (1.0 - g) * p_vocab) + g * copy_mass
    correct = (p_ext >= best).astype(jnp.float32)
    return loss, nll, correct


def copy_sequence_loss(hidden: Array, kernel: Array, bias: Array, gate: Array, copy_weights: Array,
                       source_ext: Array, targets: Array, target_ext: Array, weights: Array, *,
                       kernels: KernelSet, label_smoothing: float = 0.0, force_copy: bool = False,
                       dtype=jnp.float32) -> dict[str, Array]:
    """`sequence_loss` for copy attention (`copy_token_losses`): hidden [B, T, H] projected by the
    kernel set's matmul, all positions at once (model.loss_chunk does not apply). Returns sums."""
    logits = kernels.matmul(hidden, kernel, dtype) + bias
    loss, nll, correct = copy_token_losses(logits, gate, copy_weights, source_ext, targets, target_ext,
                                           label_smoothing=label_smoothing, force_copy=force_copy)
    w = weights.astype(jnp.float32)
    return {"loss": (loss * w).sum(), "nll": (nll * w).sum(), "correct": (correct * w).sum(), "weight": w.sum()}
