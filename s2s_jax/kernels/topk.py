"""Decoding's token selections over the vocabulary: the greedy pick and beam search's top-k.

Math: log_softmax(logits) with every token but EOS masked out where only EOS is allowed
(`force`); greedy takes the first maximum (as jnp.argmax), beam search the C largest
alive_log_prob + log_prob over the K·V flat extensions (as lax.top_k: highest first, lower flat
index first among equal values).

cpu: each logit row is cut into chunks; chunk maxima come from one pass over the logits (kept a
pass of their own by an optimisation barrier: otherwise XLA takes the row maximum straight from
the logits and the chunk maxima again in a second pass), and only the chunks that can hold the
winners are searched, so top_k runs over C chunks instead of K·V tokens; the first maximum is a
float max reduction, which vectorises on XLA:CPU where an int argmax does not.
portable: the plain forms (lax.top_k over the flat values, jnp.argmax): no barrier, which would
block fusion on GPUs/TPUs, whose top-k and argmax are fast.
Both give the same tokens and values (tests/test_decoding.py, tests/test_kernels.py).

`banned` (optional, both selections): [..., M] int32 positions in the logits' last axis whose
log-prob is set to -inf *after* normalisation (as OpenNMT-py masks log-probs for min_length and
n-gram blocking: the other tokens keep their probabilities); a position >= the axis size means
none. None (the default) leaves the selections exactly as without it.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

NEG_INF = -np.inf  # log-prob of a masked token (decoding uses this one)


def _normaliser(logits):
    """logits [..., V] -> (max, log-sum-exp of logits - max), both [..., 1], as jax.nn.log_softmax
    computes them, so that log_softmax = (logits - max) - lse can be formed where it is needed."""
    logits = logits.astype(jnp.float32)
    top = jnp.max(logits, axis=-1, keepdims=True)
    return top, jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1, keepdims=True))


def _log_probs(logits, top, lse, force, token_ids, eos_id):
    """log_softmax of logits [..., n] (n of the V tokens, ids token_ids broadcastable to it) with
    every token but EOS masked out where force [...] is set. Elementwise, so XLA fuses it into
    its consumers instead of storing [rows, V] log-probs."""
    log_probs = (logits.astype(jnp.float32) - top) - lse
    return jnp.where(force[..., None] & (token_ids != eos_id), NEG_INF, log_probs)


def ban(values, banned):
    """values [..., V] with the positions banned [..., M] (a position >= V: none) set to -inf."""
    if banned is None:
        return values
    V, M = values.shape[-1], banned.shape[-1]
    flat, positions = values.reshape(-1, V), banned.reshape(-1, M)
    rows = jnp.arange(flat.shape[0])[:, None]
    return flat.at[rows, positions].set(NEG_INF, mode="drop").reshape(values.shape)


def _first_index(mask):
    """mask [..., V] bool -> [...] int32, the first True position (V if none). A float max
    reduction (exact for V < 2**24) vectorises on CPU where an int argmin/argmax does not."""
    positions = jnp.arange(mask.shape[-1], dtype=jnp.float32)
    return (-jnp.max(jnp.where(mask, -positions, -jnp.inf), axis=-1)).astype(jnp.int32)


def best_token_chunked(logits, force, eos_id, banned=None):
    """cpu: logits [B, V], force [B] (only EOS allowed) -> (token [B] int32, log-prob [B]): the
    first maximum of the (masked) log_softmax, as jnp.argmax of it gives, but without XLA's
    CPU argmax reduction (slow) and without storing [B, V] log-probs.

    With V cut into chunks (see `top_extensions_chunked`): log-probs are monotone in the logit,
    so the best value is that of the row maximum, the first token reaching it lies in the first
    chunk whose maximum reaches it, and only that chunk is searched. A V too small for chunks:
    the first maximum as a float max reduction (`_first_index`)."""
    B, V = logits.shape
    logits = logits.astype(jnp.float32)
    chunk = _chunk_size(V, 1)
    if chunk is None:
        top, lse = _normaliser(logits)
        log_probs = ban(_log_probs(logits, top, lse, force, jnp.arange(V), eos_id), banned)
        best = jnp.max(log_probs, axis=-1)
        return _first_index(log_probs == best[:, None]), best
    n_chunks = V // chunk
    if banned is None:
        chunked = logits.reshape(B, n_chunks, chunk)  # every pass reads this one shape
        chunk_logits = lax.optimization_barrier(jnp.max(chunked, axis=-1))  # [B, n]; see top_extensions_chunked
        top = jnp.max(chunk_logits, axis=-1, keepdims=True)  # [B, 1]
        lse = jnp.log(jnp.sum(jnp.exp(chunked - top[..., None]), axis=(-2, -1)))[..., None]
        best = ((top - top) - lse)[:, 0]
    else:  # normalised over every token, searched over the allowed ones
        top, lse = _normaliser(logits)
        chunked = ban(logits, banned).reshape(B, n_chunks, chunk)
        chunk_logits = jnp.max(chunked, axis=-1)
        best = ((jnp.max(chunk_logits, axis=-1, keepdims=True) - top) - lse)[:, 0]
    first_chunk = _first_index(((chunk_logits - top) - lse) == best[:, None])  # [B]
    picked = jnp.take_along_axis(chunked, first_chunk[:, None, None], axis=1)[:, 0]
    token = first_chunk * chunk + _first_index(((picked - top) - lse) == best[:, None])
    # Where only EOS is allowed, it is the best token unless it is impossible (then every
    # value is -inf and the first maximum is token 0).
    eos_log_prob = ((chunked[:, eos_id // chunk, eos_id % chunk][:, None] - top) - lse)[:, 0]
    forced_token = jnp.where(eos_log_prob == NEG_INF, 0, eos_id).astype(jnp.int32)
    return jnp.where(force, forced_token, token), jnp.where(force, eos_log_prob, best)


def best_token_plain(logits, force, eos_id, banned=None):
    """portable: `best_token_chunked`'s result as jnp.argmax of the masked log_softmax (GPUs'
    and TPUs' argmax is fast; no barrier to block fusion)."""
    B, V = logits.shape
    logits = logits.astype(jnp.float32)
    top, lse = _normaliser(logits)
    log_probs = ban(_log_probs(logits, top, lse, force, jnp.arange(V), eos_id), banned)
    return jnp.argmax(log_probs, axis=-1).astype(jnp.int32), jnp.max(log_probs, axis=-1)


# Logit rows are cut into chunks of one of these sizes (in order of preference) to pick tokens.
_CHUNK_SIZES = (64, 80, 100, 50, 128, 125, 40, 32)


def _chunk_size(vocab_size: int, num_candidates: int) -> int | None:
    """A chunk size dividing V into at least 4 chunks per candidate, or None (V too small)."""
    return next((c for c in _CHUNK_SIZES if vocab_size % c == 0 and vocab_size // c >= 4 * num_candidates),
                None)


def top_extensions_chunked(alive_log_probs, logits, force, eos_id, num_candidates, banned=None):
    """cpu: the C best one-token extensions of K live hypotheses.

    alive_log_probs [B, K], logits [B, K, V], force [B] (only EOS allowed) -> (values [B, C],
    flat index [B, C] = k * V + token) of the C largest alive_log_probs[b, k] + log_softmax(
    logits[b, k])[token], exactly as lax.top_k over the flattened [B, K*V] values gives them
    (highest first, lower flat index first among equal values).

    For a large V it never forms the [B, K, V] values: each row is cut into chunks, and only the
    C chunks of the sentence (over all K rows) with the highest maxima can hold its C best
    entries (an entry outside them is beaten by each of those C chunk maxima, or tied with a
    maximum at a lower flat index), so top_k runs over C chunks instead of K*V tokens. The
    chunks are taken in flat position order, so ties still go to the lower index. Chunk maxima
    come from the raw logits in one pass, which also gives the row maxima (alive + log-prob is
    monotone in the logit); the log-sum-exp is the only other pass over all the logits.
    """
    B, K, V = logits.shape
    logits = logits.astype(jnp.float32)
    chunk = _chunk_size(V, num_candidates)
    if chunk is None:
        return _flat_top_k(alive_log_probs, logits, force[:, None], eos_id, num_candidates, banned)
    force = force[:, None]  # [B, 1]
    n_chunks = V // chunk
    if banned is None:
        # Every pass reads the logits in one [B, K, n, chunk] shape, so XLA stores them once. The
        # barrier keeps the chunk maxima a pass of their own: otherwise XLA takes the row maximum
        # straight from the logits and the chunk maxima again in a second pass.
        chunked = logits.reshape(B, K, n_chunks, chunk)
        chunk_logits = lax.optimization_barrier(jnp.max(chunked, axis=-1))  # [B, K, n]
        top = jnp.max(chunk_logits, axis=-1, keepdims=True)  # [B, K, 1], the row maximum
        lse = jnp.log(jnp.sum(jnp.exp(chunked - top[..., None]), axis=(-2, -1)))[..., None]
    else:  # normalised over every token; banned ones are -inf logits in the chunks searched
        top, lse = _normaliser(logits)
        chunked = ban(logits, banned).reshape(B, K, n_chunks, chunk)
        chunk_logits = jnp.max(chunked, axis=-1)

    def extended(x, alive, top, lse):  # alive + log-prob, unmasked; monotone non-decreasing in x
        return alive + ((x - top) - lse)

    # A chunk's best value is extended(its largest logit) (extended is monotone, so it commutes
    # with max); where only EOS is allowed, only EOS's chunk has a finite value.
    alive = alive_log_probs[:, :, None]  # [B, K, 1]
    eos_value = extended(chunked[:, :, eos_id // chunk, eos_id % chunk][..., None], alive, top, lse)
    chunk_values = jnp.where(force[..., None], jnp.where(jnp.arange(n_chunks) == eos_id // chunk, eos_value, NEG_INF),
                             extended(chunk_logits, alive, top, lse))  # [B, K, n]
    _, chunks = lax.top_k(chunk_values.reshape(B, K * n_chunks), num_candidates)  # [B, C], k * n + chunk
    chunks = jnp.sort(chunks, axis=-1)
    beam, position = chunks // n_chunks, chunks % n_chunks  # [B, C]
    picked = jnp.take_along_axis(chunked.reshape(B, K * n_chunks, chunk), chunks[..., None], axis=1)  # [B, C, chunk]

    def of_beam(x):  # [B, K, 1] -> [B, C, 1], the value of each picked chunk's beam
        return jnp.take_along_axis(x, beam[..., None], axis=1)

    token_ids = position[..., None] * chunk + jnp.arange(chunk)  # [B, C, chunk]
    values = extended(picked, of_beam(alive), of_beam(top), of_beam(lse))
    values = jnp.where(force[..., None] & (token_ids != eos_id), NEG_INF, values).reshape(B, -1)
    flat_ids = (beam[..., None] * V + token_ids).reshape(B, -1)
    best, at = lax.top_k(values, num_candidates)
    return best, jnp.take_along_axis(flat_ids, at, axis=1)


def top_extensions_plain(alive_log_probs, logits, force, eos_id, num_candidates, banned=None):
    """portable: `top_extensions_chunked`'s result as lax.top_k over the flat [B, K·V] values
    (GPUs' and TPUs' top-k is fast; no barrier to block fusion)."""
    return _flat_top_k(alive_log_probs, logits.astype(jnp.float32), force[:, None], eos_id, num_candidates, banned)


def _flat_top_k(alive_log_probs, logits, force, eos_id, num_candidates, banned=None):
    """lax.top_k over alive_log_probs [B, K] + the masked log_softmax of float32 logits [B, K, V]
    (force [B, 1])."""
    B, K, V = logits.shape
    top, lse = _normaliser(logits)  # [B, K, 1]
    values = alive_log_probs[:, :, None] + ban(_log_probs(logits, top, lse, force, jnp.arange(V), eos_id), banned)
    return lax.top_k(values.reshape(B, K * V), num_candidates)
