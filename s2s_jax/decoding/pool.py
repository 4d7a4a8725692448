"""`SlotPool`: continuous batching across calls, the slot engine kept alive between them."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from s2s_jax.decoding import engine as engine_lib
from s2s_jax.decoding.engine import Engine
from s2s_jax.decoding.settings import SearchSettings, check_sizes, default_refill
from s2s_jax.decoding.state import Loop, PoolState, Queue, Slots
from s2s_jax.decoding.strategies import make_strategy


class SlotPool:
    """P decoding slots fed from a ring of W admitted sentences, across calls.

    `continuous_search` decodes a queue known in advance; a server learns of sentences while it
    decodes. Here the pool lives between calls (a `PoolState`). Sentences are numbered in the
    order they are admitted (their ticket). `admit` appends newly encoded sentences to a ring of
    W entries (ticket % W), and `run` decodes up to `steps` steps, starting ring sentences in
    free slots as they free up (all free slots before the first step, then up to `refill` per
    step, as `continuous_search` does) and writing each finished sentence's result at ticket % R.
    The caller keeps fewer than W admitted sentences not yet started (`run` reports how many
    wait) and fewer than R between the oldest unfinished ticket and the next one, so no entry is
    overwritten while it is still needed. Each sentence gets exactly the search `search` gives
    it (the search is per slot, the step function per row), whatever it shared the pool with.

    `run` works on the first `active` slots only (static; a power of two the caller picks to
    cover the busy slots, reported by `run`, and the waiting sentences), so a lightly loaded
    pool computes few rows. All functions are pure: jit them, donating the pool. The step
    function is built per call from `make_step_fn(*step_args)`, so arrays such as parameters
    are arguments rather than constants baked into the program.

    settings: the search. slots: P. queue: W. results: R. vocab_size, source_len: the sizes of
    the step function's logits [N, V] and attention [N, S] (None: it gives no attention).
    refill: most slots started per step (default P // 8, at least 1). slot_context: the step
    function gets the context once per slot (leading dim P), not per row.
    """

    def __init__(self, make_step_fn, settings: SearchSettings, *, slots: int, queue: int, results: int,
                 vocab_size: int, source_len: int | None, refill: int | None = None, slot_context: bool = True):
        refill = default_refill(slots) if refill is None else refill
        check_sizes(slots=slots, queue=queue, results=results, refill=refill)
        self.make_step_fn, self.settings, self.slots, self.queue = make_step_fn, settings, slots, queue
        strategy = make_strategy(settings, vocab_size=vocab_size, source_len=source_len)
        self.engine = Engine(strategy, num_results=results, refill=refill, slot_context=slot_context)

    def empty(self, state_like, context_like) -> PoolState:
        """An idle pool for per-sentence state/context shaped like `*_like` (leading dim ignored)."""
        W = self.queue
        ring = Queue(state=engine_lib.zeros_like_rows(state_like, W),
                     context=engine_lib.zeros_like_rows(context_like, W), limits=jnp.ones((W,), jnp.int32),
                     source_lengths=jnp.ones((W,), jnp.int32), tail=jnp.zeros((), jnp.int32))
        return PoolState(slots=engine_lib.empty_slots(self.engine, self.slots, state_like, context_like), ring=ring,
                         head=jnp.zeros((), jnp.int32))

    def admit(self, pool: PoolState, count, state, context, limits, source_lengths) -> PoolState:
        """Appends the first `count` of M encoded sentences (state/context leading dim M;
        limits: most output tokens, EOS included; source_lengths: real source positions) to the
        ring: they get the next `count` tickets."""
        W, ring = self.queue, pool.ring
        M = jax.tree.leaves(state)[0].shape[0]
        i = jnp.arange(M, dtype=jnp.int32)
        put = functools.partial(_put, jnp.where(i < count, (ring.tail + i) % W, W))  # W: dropped
        ring = Queue(state=jax.tree.map(put, ring.state, state), context=jax.tree.map(put, ring.context, context),
                     limits=put(ring.limits, jnp.clip(jnp.asarray(limits, jnp.int32), 1, self.settings.max_len)),
                     source_lengths=put(ring.source_lengths, jnp.asarray(source_lengths, jnp.int32)),
                     tail=ring.tail + jnp.asarray(count, jnp.int32))
        return pool.replace(ring=ring)

    def run(self, pool: PoolState, step_args, *, steps: int, active: int):
        """Decodes the first `active` slots (static) for up to `steps` steps (stopping early when
        nothing is busy or waiting). Returns (pool, done [R] bool: ticket % R of the sentences
        that finished, results in the search's output layout with leading dim R (valid where
        done), {"busy": slots busy, "last_busy": highest busy slot (-1: none), "waiting":
        admitted sentences not yet started})."""
        engine, A = self.engine, active
        results, done = engine_lib.empty_results(engine)
        loop = Loop(slots=_first_slots(pool.slots, A, engine), step=jnp.zeros((), jnp.int32), head=pool.head,
                    results=results, done=done)
        loop = engine_lib.run(engine, self.make_step_fn(*step_args), loop, pool.ring, steps=steps, first=A)
        # Slots started in this run got their state and context here: all of the first A go back.
        slots = jax.tree.map(_write_prefix, pool.slots, loop.slots)
        busy = loop.slots.sentence < engine.num_results
        info = {"busy": jnp.sum(busy, dtype=jnp.int32),
                "last_busy": jnp.max(jnp.where(busy, jnp.arange(A), -1)).astype(jnp.int32),
                "waiting": pool.ring.tail - loop.head}
        return pool.replace(slots=slots, head=loop.head), loop.done, loop.results, info


def _first_slots(slots: Slots, active: int, engine: Engine) -> Slots:
    """The first `active` slots (rows: their K rows each; context: per slot or per row)."""
    rows = active * engine.strategy.num_beams
    first = functools.partial(_prefix, active)
    context = functools.partial(_prefix, active if engine.slot_context else rows)
    return Slots(search=jax.tree.map(first, slots.search),
                 rows=jax.tree.map(functools.partial(_prefix, rows), slots.rows),
                 context=jax.tree.map(context, slots.context), limits=first(slots.limits),
                 source_lengths=first(slots.source_lengths), sentence=first(slots.sentence))


def _prefix(n, leaf):
    return leaf[:n]


def _write_prefix(full, part):
    return lax.dynamic_update_slice_in_dim(full, part, 0, 0)


def _put(positions, ring, values):
    return ring.at[positions].set(values, mode="drop")
