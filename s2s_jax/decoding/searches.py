"""Plain and continuous decoding: two uses of the slot engine.

Conventions of every search:

* Output sequences do not start with BOS; they end with EOS, which counts in `lengths`, and are
  PAD after it. Every returned hypothesis ends in EOS: at position `min(max_lengths[b],
  max_len) - 1` every token except EOS is masked out, so sentence b never exceeds
  `max_lengths[b]` tokens. A forced EOS is scored with the model's own (unrenormalised)
  log-probability.
* Scores are sums of natural-log probabilities of the emitted tokens, EOS included (beam: with
  the GNMT penalties; `log_probs` holds the raw sums).
* Results: greedy gives tokens [B, T] int32, lengths [B] int32, scores [B] float32, attention
  [B, T, S] float32 (zero after EOS) or None when the step function gives no attention. Beam
  search gives tokens [B, N, T], lengths [B, N], scores [B, N] (best first), log_probs [B, N],
  attention [B, N, T, S] or None; when fewer than N distinct hypotheses exist (tiny
  vocabularies), the missing entries have score -inf, length 0 and PAD tokens.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from s2s_jax.decoding import engine as engine_lib
from s2s_jax.decoding.engine import ContextStepFn, Engine, StepFn
from s2s_jax.decoding.settings import SearchSettings, check_sizes, default_refill
from s2s_jax.decoding.state import Loop, Queue
from s2s_jax.decoding.strategies import make_strategy


def search(step_fn: StepFn, cache: Any, settings: SearchSettings, *, batch_size: int,
           max_lengths: jax.Array | None, source_lengths: jax.Array | None = None, vocab_ids=None) -> dict:
    """Plain decoding of B sentences: a pool of B slots, every sentence started at once and run
    to completion (the loop ends when every sentence has stopped).

    step_fn: see `StepFn`; called with B*K rows, row b*K + k being beam k of sentence b.
    cache: decoder state for B sentences (leading dim B); tiled to B*K rows and reordered each
      step to follow the surviving hypotheses.
    batch_size: B. max_lengths: [B] int, the most tokens (EOS included) sentence b may have;
      None = `settings.max_len`. source_lengths: [B] int, real source positions per sentence
      (coverage penalty); None = all S positions are real.
    Returns the results of the module docstring.
    """
    check_sizes(batch_size=batch_size)
    limits = length_limits(max_lengths, batch_size, settings.max_len)  # [B]
    rows = batch_size * settings.num_beams
    vocab_size, source_len = engine_lib.probe(step_fn, jnp.full((rows,), settings.bos_id, jnp.int32),
                                              _abstract_rows(cache, rows))
    engine = Engine(make_strategy(settings, vocab_size=vocab_size, source_len=source_len),
                    num_results=batch_size, refill=0, vocab_ids=vocab_ids)
    queue = Queue(state=cache, context=None, limits=limits,
                  source_lengths=_source_lengths(source_lengths, batch_size, source_len),
                  tail=jnp.asarray(batch_size, jnp.int32))
    loop = engine_lib.run(engine, functools.partial(_without_context, step_fn), engine_lib.placed(engine, queue),
                          queue, steps=settings.max_len)
    return engine.strategy.result(loop.slots.search)


def _without_context(step_fn: StepFn, tokens, rows, context):
    return step_fn(tokens, rows)


def continuous_search(step_fn: ContextStepFn, state: Any, context: Any, settings: SearchSettings, *,
                      num_sentences: jax.Array | int, slots: int, max_lengths: jax.Array | None,
                      source_lengths: jax.Array | None = None, refill: int | None = None,
                      slot_context: bool = False, output_sizes: tuple[int, int | None] | None = None,
                      vocab_ids=None) -> dict:
    """Decodes a queue of Q sentences through P slots, refilling a slot with the next queue
    sentence at the step its sentence finishes (continuous batching).

    Every sentence gets exactly the search `search` would give it (same tokens, lengths and
    scores, same layout with Q for B), but no step computes rows of finished sentences and a
    batch never waits for its longest sentence. Put the longest sentences first in the queue:
    the loop ends with the last ones, and short ones finish fast.

    step_fn: see `ContextStepFn`; called with P*K rows, row p*K + k being beam k of slot p.
    state: per-sentence decoder state, leading dim Q (tiled to K rows when a sentence starts,
      then reordered with its beams). context: per-sentence step inputs that never change (e.g.
      encoder memory), leading dim Q, or None.
    num_sentences: how many queue entries (the first ones) to decode; may be traced. Entries
      after it are not decoded and their results are zeros.
    slots: P (static). refill: most slots refilled in one step (static; default P // 8, at
      least 1); further free slots wait a step.
    slot_context: False: step_fn gets the context with leading dim P*K (tiled to every beam
      row); True: with leading dim P, one entry per slot for its K rows.
    output_sizes: (V, S or None), the sizes step_fn's logits [N, V] and attention [N, S] (None:
      it gives no attention) will have, when the caller knows them; saves tracing step_fn once
      more to find them.
    max_lengths, source_lengths: as `search`, leading dim Q. vocab_ids: as `search`.
    """
    leaves = jax.tree.leaves(state)
    if not leaves:
        raise ValueError("state must have at least one array (leading dim = queue size).")
    queue_size = leaves[0].shape[0]
    refill = default_refill(slots) if refill is None else refill
    check_sizes(slots=slots, refill=refill)
    if output_sizes is None:
        output_sizes = _probe_context_step(step_fn, state, context, settings, slots=slots, slot_context=slot_context)
    vocab_size, source_len = output_sizes
    engine = Engine(make_strategy(settings, vocab_size=vocab_size, source_len=source_len),
                    num_results=queue_size, refill=refill, slot_context=slot_context, vocab_ids=vocab_ids)
    queue = Queue(state=state, context=context, limits=length_limits(max_lengths, queue_size, settings.max_len),
                  source_lengths=_source_lengths(source_lengths, queue_size, source_len),
                  tail=jnp.minimum(jnp.asarray(num_sentences, jnp.int32), queue_size))
    results, done = engine_lib.empty_results(engine)
    loop = Loop(slots=engine_lib.empty_slots(engine, slots, state, context), step=jnp.zeros((), jnp.int32),
                head=jnp.zeros((), jnp.int32), results=results, done=done)
    # Every sentence finishes within max_len steps of starting; the step bound is a guard.
    loop = engine_lib.run(engine, step_fn, loop, queue, steps=(queue_size + 1) * settings.max_len, first=slots)
    return loop.results


def _probe_context_step(step_fn: ContextStepFn, state, context, settings: SearchSettings, *, slots: int,
                        slot_context: bool) -> tuple[int, int | None]:
    rows = slots * settings.num_beams
    abstract = (_abstract_rows(state, rows), _abstract_rows(context, slots if slot_context else rows))
    return engine_lib.probe(step_fn, jnp.full((rows,), settings.bos_id, jnp.int32), *abstract)


def _abstract_rows(tree, n):
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct((n, *leaf.shape[1:]), leaf.dtype), tree)


def length_limits(max_lengths, batch_size, max_len):
    """[B] int32 per-sentence token limits, clipped to [1, max_len]."""
    if max_lengths is None:
        return jnp.full((batch_size,), max_len, jnp.int32)
    max_lengths = jnp.asarray(max_lengths, jnp.int32)
    if max_lengths.shape != (batch_size,):
        raise ValueError(
            f"max_lengths has shape {max_lengths.shape}; it must be [batch_size] = ({batch_size},)."
        )
    return jnp.clip(max_lengths, 1, max_len)


def _source_lengths(source_lengths, n, source_len):
    """[n] int32 real source positions (all S when None; 1 when there is no attention)."""
    if source_lengths is None:
        return jnp.full((n,), source_len or 1, jnp.int32)
    return jnp.asarray(source_lengths, jnp.int32).reshape(n)
