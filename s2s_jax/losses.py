"""Masked, label-smoothed cross-entropy, with the output projection chunked over time.

Every function returns *sums* and the weight they were summed over, never means, so that
gradient accumulation and data-parallel reduction divide once, by the true token count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
                  label_smoothing: float = 0.0, chunk: int = 0, dtype=jnp.float32) -> dict[str, Array]:
    """Projects hidden [B, T, H] to the vocabulary and scores targets [B, T] with weights [B, T].

    chunk > 0: the projection runs `chunk` time steps at a time inside a rematerialised scan,
    so the [B, T, V] logits (and their gradient) never exist at once.
    Returns sums: loss, nll, correct, weight (all float32 scalars).
    """
    def score(h, y, w):
        logits = jnp.matmul(h.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32) + bias
        loss, nll, correct = token_losses(logits, y, label_smoothing)
        return jnp.stack([(loss * w).sum(), (nll * w).sum(), (correct * w).sum(), w.sum()])

    B, T, H = hidden.shape
    if chunk <= 0 or chunk >= T:
        sums = score(hidden, targets, weights)
    else:
        n = -(-T // chunk)
        pad = n * chunk - T
        def split(x):  # [B, T, ...] -> [n, B, chunk, ...]
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
            return jnp.swapaxes(x.reshape((B, n, chunk) + x.shape[2:]), 0, 1)

        def body(acc, xs):
            return acc + jax.checkpoint(score)(*xs), None

        sums, _ = jax.lax.scan(body, jnp.zeros(4, jnp.float32),
                               (split(hidden), split(targets), split(weights.astype(jnp.float32))))
    return {"loss": sums[0], "nll": sums[1], "correct": sums[2], "weight": sums[3]}
