"""The slot engine: one `lax.while_loop` over a pool of P decoding slots, K rows each.

A slot holds one sentence's search (a strategy's per-slot state), its K rows of decoder state
(reordered along the beams each step) and its per-sentence context (fixed, e.g. encoder memory;
K rows, or one per slot with `slot_context`). Each pass of the loop

  1. starts waiting sentences (tickets head, head+1, ... of a `Queue`) in up to `refill` idle
     slots (`start`),
  2. runs the step function on all P*K rows and advances every slot's search (`step`),
  3. retires the slots whose search stopped: their results are written at their sentence's
     result index and the slot becomes idle (`retire`),

and the loop ends when no slot is busy and no sentence waits, or after `steps` passes. The three
uses (`searches.search`, `searches.continuous_search`, `pool.SlotPool.run`) differ only in how
the loop is set up and how long it runs:

* plain decoding is a pool whose P sentences all start before the loop and which never refills
  (refill = 0): run to completion, its results stay in the slots and are read after the loop;
* continuous decoding starts a fixed queue of Q sentences through P slots;
* the server's pool runs a few steps per call, fed from a ring that sentences join between calls.

Every sentence gets the same search however it is batched: the search is per slot and the step
function per row. Trip counts are data-dependent by nature (sentences finish when they emit EOS),
on every backend.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
from jax import lax

from s2s_jax.decoding.state import Loop, Queue, Slots
from s2s_jax.decoding.strategies import Strategy


class StepFn(Protocol):
    """The model as plain decoding sees it.

    tokens [N] int32 (the previous token of each row), cache (pytree, leading dim N on every
    leaf) -> (logits [N, V] (unnormalised), new cache (same structure), attention [N, S] (the
    weights used for this step, zero on padded source positions) or None).
    """

    def __call__(self, tokens: jax.Array, cache: Any) -> tuple[jax.Array, Any, jax.Array | None]: ...


class ContextStepFn(Protocol):
    """The model as the slot engine sees it: the decoder state follows the beams, the context
    does not.

    tokens [N] int32, state (pytree, leading dim N; reordered along the beams), context (pytree,
    leading dim N, the same for every beam of a sentence and never reordered; with slot_context
    leading dim N / K: entry p serves the K beam rows p*K .. p*K+K-1) -> (logits [N, V], new
    state, attention [N, S] or None).
    """

    def __call__(self, tokens: jax.Array, state: Any, context: Any) -> tuple[jax.Array, Any, jax.Array | None]: ...


@dataclasses.dataclass(frozen=True)
class Engine:
    """The static rules of one slot loop.

    strategy: greedy or beam (per slot).
    num_results: R, the size of the results' leading dim; a slot whose `sentence` is R is idle.
    refill: most idle slots started per step (the rest wait a step); 0 = never refill (plain
      decoding: every sentence starts before the loop and its result stays in its slot).
    slot_context: the context has one entry per slot (leading dim P), not per row (P*K).
    vocab_ids: [V] int32 or None, the vocabulary id of each logit column when the step
      function scores a shortlist of the vocabulary (`Strategy.advance`); None: all of it.
    """

    strategy: Strategy
    num_results: Any
    refill: int
    slot_context: bool = False
    vocab_ids: Any = None

    def __post_init__(self):
        if self.slot_context and not self.refill:
            raise ValueError("slot_context needs refilled slots (refill > 0, the continuous search); "
                             "plain decoding keeps its context per row.")


def empty_slots(engine: Engine, slots: int, state_like, context_like) -> Slots:
    """P idle slots for per-sentence state/context shaped like `*_like` (leading dim ignored)."""
    K = engine.strategy.num_beams
    return Slots(
        search=engine.strategy.fresh(slots),
        rows=zeros_like_rows(state_like, slots * K),
        context=zeros_like_rows(context_like, slots if engine.slot_context else slots * K),
        limits=jnp.ones((slots,), jnp.int32),
        source_lengths=jnp.ones((slots,), jnp.int32),
        sentence=jnp.full((slots,), engine.num_results, jnp.int32),
    )


def empty_results(engine: Engine) -> tuple[Any, jax.Array]:
    """Zero results [R, ...] in the strategy's layout, and done [R] all False."""
    shapes = jax.eval_shape(engine.strategy.result, engine.strategy.fresh(engine.num_results))
    results = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return results, jnp.zeros((engine.num_results,), bool)


def placed(engine: Engine, queue: Queue) -> Loop:
    """Plain decoding's start: sentence b of a queue of P in slot b, all before the loop."""
    K = engine.strategy.num_beams
    P = queue.limits.shape[0]
    slots = Slots(search=engine.strategy.fresh(P), rows=tile_rows(queue.state, K),
                  context=tile_rows(queue.context, K), limits=queue.limits,
                  source_lengths=queue.source_lengths, sentence=jnp.arange(P, dtype=jnp.int32))
    return Loop(slots=slots, step=jnp.zeros((), jnp.int32), head=queue.tail)


def run(engine: Engine, step_fn: ContextStepFn, loop: Loop, queue: Queue, *, steps, first: int = 0) -> Loop:
    """Starts up to `first` waiting sentences, then runs the loop (see the module docstring)
    for at most `steps` passes."""
    loop = start(engine, queue, loop, first)
    return lax.while_loop(functools.partial(_running, engine, queue, steps),
                          functools.partial(_one_pass, engine, step_fn, queue), loop)


def _running(engine: Engine, queue: Queue, steps, loop: Loop):
    busy = jnp.any(loop.slots.sentence < engine.num_results)
    return (loop.step < steps) & (busy | (loop.head < queue.tail))


def _one_pass(engine: Engine, step_fn: ContextStepFn, queue: Queue, loop: Loop) -> Loop:
    loop = start(engine, queue, loop, min(engine.refill, loop.slots.sentence.shape[0]))
    loop, stopped = step(engine, step_fn, loop)
    return retire(engine, loop, stopped)


def start(engine: Engine, queue: Queue, loop: Loop, n: int) -> Loop:
    """Starts up to n (static) waiting sentences of the queue in the lowest idle slots."""
    if n == 0:
        return loop
    P, W = loop.slots.sentence.shape[0], queue.limits.shape[0]
    idle = loop.slots.sentence >= engine.num_results
    slot_ids = jnp.nonzero(idle, size=n, fill_value=P)[0].astype(jnp.int32)
    count = jnp.minimum(jnp.sum(idle, dtype=jnp.int32), queue.tail - loop.head)
    valid = jnp.arange(n) < count
    slot_ids = jnp.where(valid, slot_ids, P)  # P: no slot (dropped)
    tickets = loop.head + jnp.arange(n, dtype=jnp.int32)
    slots = _fill(engine, loop.slots, queue, slot_ids, jnp.where(valid, tickets % W, W), tickets % engine.num_results)
    return loop.replace(slots=slots, head=loop.head + jnp.clip(count, 0, n).astype(jnp.int32))


def _fill(engine: Engine, slots: Slots, queue: Queue, slot_ids, entries, sentences) -> Slots:
    """Starts queue entries [M] in slots slot_ids [M] (a slot id P, out of range, is a no-op),
    their results to go to sentences [M]."""
    K = engine.strategy.num_beams
    take = jnp.minimum(entries, queue.limits.shape[0] - 1)
    row_ids = (slot_ids[:, None] * K + jnp.arange(K)[None, :]).reshape(-1)  # >= P*K: dropped
    put_rows = functools.partial(_put_rows, row_ids, take, K)
    put_slots = functools.partial(_put_slots, slot_ids, take)
    context = (jax.tree.map(put_slots, slots.context, queue.context) if engine.slot_context
               else jax.tree.map(put_rows, slots.context, queue.context))
    fresh = engine.strategy.fresh(slot_ids.shape[0])
    return Slots(
        search=jax.tree.map(lambda s, f: s.at[slot_ids].set(f, mode="drop"), slots.search, fresh),
        rows=jax.tree.map(put_rows, slots.rows, queue.state),
        context=context,
        limits=put_slots(slots.limits, queue.limits),
        source_lengths=put_slots(slots.source_lengths, queue.source_lengths),
        sentence=slots.sentence.at[slot_ids].set(sentences, mode="drop"),
    )


def _put_rows(row_ids, take, K, rows, entries):
    return rows.at[row_ids].set(jnp.repeat(entries[take], K, axis=0), mode="drop")


def _put_slots(slot_ids, take, values, entries):
    return values.at[slot_ids].set(entries[take], mode="drop")


def step(engine: Engine, step_fn: ContextStepFn, loop: Loop) -> tuple[Loop, jax.Array]:
    """One decoding step of every slot (step_fn on all P*K rows; rows follow their beams)
    -> (loop, stopped [P] bool)."""
    strategy, slots = engine.strategy, loop.slots
    P, K = slots.sentence.shape[0], strategy.num_beams
    source_mask = None
    if strategy.source_len is not None:  # [P, 1, S]
        source_mask = jnp.arange(strategy.source_len)[None, None, :] < slots.source_lengths[:, None, None]
    logits, rows, attention = step_fn(slots.search.last.reshape(P * K), slots.rows, slots.context)
    search, parent, stopped = strategy.advance(slots.search, logits, attention, slots.limits, source_mask,
                                               engine.vocab_ids)
    if parent is not None:
        follow = (jnp.arange(P)[:, None] * K + parent).reshape(-1)
        rows = jax.tree.map(lambda leaf: leaf[follow], rows)
    return loop.replace(slots=slots.replace(search=search, rows=rows), step=loop.step + 1), stopped


def retire(engine: Engine, loop: Loop, stopped) -> Loop:
    """Frees the slots whose sentence stopped; with refills, their results are written out first
    (a loop that never refills leaves them in the slots, read after it)."""
    slots = loop.slots
    R = engine.num_results
    # An idle slot's sentence is R already: where it "stops" again, nothing is written or freed.
    if engine.refill:
        out = jnp.where(stopped, slots.sentence, R)  # R: dropped
        results = jax.tree.map(lambda r, v: r.at[out].set(v, mode="drop"), loop.results,
                               engine.strategy.result(slots.search))
        loop = loop.replace(results=results, done=loop.done.at[out].set(True, mode="drop"))
    return loop.replace(slots=slots.replace(sentence=jnp.where(stopped, R, slots.sentence)))


def tile_rows(tree, K: int):
    """Each leaf [n, ...] -> [n*K, ...], row i repeated K times (one copy per beam)."""
    return jax.tree.map(lambda leaf: jnp.repeat(leaf, K, axis=0), tree)


def zeros_like_rows(tree, n):
    """Zeros [n, ...] shaped like each leaf [*, ...] of `tree`."""
    return jax.tree.map(lambda leaf: jnp.zeros((n, *leaf.shape[1:]), leaf.dtype), tree)


def probe(step_fn: Callable, tokens, *args) -> tuple[int, int | None]:
    """Traces step_fn(tokens, *args) once (no compute) -> (vocab size V, source length S or None)."""
    rows = tokens.shape[0]
    logits, _, attention = jax.eval_shape(step_fn, tokens, *args)
    if logits.ndim != 2 or logits.shape[0] != rows:
        raise ValueError(f"step_fn must return logits of shape [{rows}, V], got {logits.shape}.")
    if attention is None:
        return logits.shape[1], None
    if attention.ndim != 2 or attention.shape[0] != rows:
        raise ValueError(
            f"step_fn must return attention of shape [{rows}, S] or None, got {attention.shape}."
        )
    return logits.shape[1], attention.shape[1]
