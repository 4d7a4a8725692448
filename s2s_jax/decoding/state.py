"""The typed state of the searches and of the slot loop (`flax.struct` dataclasses: pytrees).

Shapes: n slots (P in the engine), K beams, N n-best entries, T = max_len, S source positions,
W queue (or ring) entries, R result entries. Fields that hold None (attention when the step
function gives none; the results of a loop that keeps them in its slots) are empty subtrees.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import struct


@struct.dataclass
class GreedyState:
    """One greedy search per slot.

    last [n, 1] int32: each slot's previous token (BOS at first; PAD once finished).
    step [n] int32: tokens emitted so far (the position the next token goes to).
    tokens [n, T] int32: the output (EOS included, PAD after it).
    lengths [n] int32, scores [n] float32 (sum of log-probs), finished [n] bool.
    attention [n, T, S] float32 (zero after EOS), or None without attention.
    """

    last: jax.Array
    step: jax.Array
    tokens: jax.Array
    lengths: jax.Array
    scores: jax.Array
    finished: jax.Array
    attention: jax.Array | None = None


@struct.dataclass
class BeamState:
    """One beam search per slot: K live hypotheses and the N best finished ones.

    step [n] int32: tokens emitted so far by the live hypotheses.
    last [n, K] int32: each live hypothesis's previous token (BOS at first).
    alive_tokens [n, K, T] int32, alive_log_probs [n, K] float32 (-inf: no hypothesis).
    finished_tokens [n, N, T] int32, finished_lengths [n, N] int32, finished_scores [n, N]
      float32 (with penalties; -inf: empty), finished_log_probs [n, N] float32 (raw sums),
      finished_flags [n, N] bool (sorted: valid entries first).
    done [n] bool: the sentence has stopped; its n-best is final.
    alive_attention [n, K, T, S], alive_coverage [n, K, S], finished_attention [n, N, T, S]
      float32, or None without attention.
    """

    step: jax.Array
    last: jax.Array
    alive_tokens: jax.Array
    alive_log_probs: jax.Array
    finished_tokens: jax.Array
    finished_lengths: jax.Array
    finished_scores: jax.Array
    finished_log_probs: jax.Array
    finished_flags: jax.Array
    done: jax.Array
    alive_attention: jax.Array | None = None
    alive_coverage: jax.Array | None = None
    finished_attention: jax.Array | None = None


@struct.dataclass
class Slots:
    """P decoding slots of K rows each; a slot holds one sentence's search.

    search: GreedyState | BeamState, leading dim P.
    rows: the step function's decoder state (pytree), leading dim P*K; row p*K + k is beam k of
      slot p, and rows follow their beams each step.
    context: the step function's per-sentence inputs (pytree, never reordered), leading dim P*K,
      or P with slot_context (one entry per slot for its K rows).
    limits [P] int32: most tokens (EOS included) of each slot's sentence.
    source_lengths [P] int32: real source positions of each slot's sentence (coverage penalty).
    sentence [P] int32: where each slot's result goes (an index into the results); R = idle.
    """

    search: Any
    rows: Any
    context: Any
    limits: jax.Array
    source_lengths: jax.Array
    sentence: jax.Array


@struct.dataclass
class Queue:
    """Sentences waiting for a slot, leading dim W: a whole queue, or the server's ring (the
    sentence of ticket t sits at t % W).

    state, context: pytrees [W, ...] (one sentence each; tiled to K rows when it starts).
    limits [W] int32, source_lengths [W] int32: as in `Slots`.
    tail [] int32: tickets admitted so far (sentences head .. tail-1 wait).
    """

    state: Any
    context: Any
    limits: jax.Array
    source_lengths: jax.Array
    tail: jax.Array


@struct.dataclass
class Loop:
    """The carry of the slot loop.

    slots: `Slots` (P slots).
    step [] int32: steps run in this loop.
    head [] int32: tickets started so far (the next sentence to start is ticket head).
    results: the strategy's result dict, leading dim R, or None when the results stay in the
      slots (a loop that never refills reads them from there after the loop).
    done [R] bool: the results written by this loop, or None as results.
    """

    slots: Slots
    step: jax.Array
    head: jax.Array
    results: Any = None
    done: jax.Array | None = None


@struct.dataclass
class PoolState:
    """A `SlotPool` between calls: its P slots and the ring of W admitted sentences.

    slots: `Slots` (P slots; `sentence` holds ticket % R).
    ring: `Queue` of W entries (ticket t at t % W; `tail` = tickets admitted).
    head [] int32: tickets started so far.
    """

    slots: Slots
    ring: Queue
    head: jax.Array
