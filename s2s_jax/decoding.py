"""Greedy and beam search over a step function; knows nothing of the model.

Both searches drive a `step_fn(tokens, cache) -> (logits, cache, attention)` (see `StepFn`), so
this module imports only jax, numpy, the special ids of `s2s_jax.vocab` and the token-selection
kernels (as t5x's decoding.py knows nothing of the model); `inference/translator.py` adapts the model (`model_step_fn`).
`continuous_search` runs either search over a queue of sentences through a fixed pool of
decoding slots, refilling a slot as soon as its sentence finishes (continuous batching); its
step function also gets per-sentence context that beam search never reorders (`ContextStepFn`),
either per row or, with `slot_context=True`, once per slot for its K beam rows (so a step reads
e.g. the encoder memory once per sentence instead of once per beam).
Every sentence's result is the same however it is batched.

Speed: the per-step work outside the step function is a few passes over the [rows, V] logits,
so log-probs are never stored; greedy's argmax and beam's top-k are the `best_token` and
`top_extensions` of each search's `kernels` argument (the model's KernelSet, kernels/topk.py:
the cpu set takes chunk maxima first, searching only the chunks that can hold the answer; the
portable set the plain top_k / argmax; the same result, ties included). The search loop itself is a `while_loop` that ends when every sentence has finished,
on every backend: its trip count is data-dependent by nature.

Conventions shared by both searches:

* Output sequences do not start with BOS; they end with EOS, which counts in `lengths`, and are
  PAD after it. Every returned hypothesis ends in EOS: at position `min(max_lengths[b],
  max_len) - 1` every token except EOS is masked out, so sentence b never exceeds
  `max_lengths[b]` tokens. A forced EOS is scored with the model's own (unrenormalised)
  log-probability.
* Scores are sums of natural-log probabilities of the emitted tokens, EOS included.
* Shapes: B sentences, K beams, N n-best entries, T = `max_len`, V vocabulary, S source length.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.export
import jax.numpy as jnp
import numpy as np
from jax import lax

from s2s_jax.kernels import KernelSet, topk
from s2s_jax.vocab import BOS_ID, EOS_ID, PAD_ID  # the one definition of the special ids

# step_fn(tokens [N] int32 (the previous token of each row), cache (pytree, leading dim N on
# every leaf)) -> (logits [N, V] (unnormalised), new cache (same structure), attention [N, S]
# (the weights used for this step, zero on padded source positions) or None).
StepFn = Callable[[jax.Array, Any], "tuple[jax.Array, Any, jax.Array | None]"]

_NEG_INF = topk.NEG_INF
# Coverage below this is treated as this, so an unattended source word costs a large but finite
# penalty (log(1e-10) ~ -23) instead of -inf, which would also make the hypothesis unrankable.
_MIN_COVERAGE = 1e-10


def greedy_search(
    step_fn: StepFn,
    cache: Any,
    *,
    batch_size: int,
    max_lengths: jax.Array | None,
    max_len: int,
    bos_id: int = BOS_ID,
    eos_id: int = EOS_ID,
    kernels: KernelSet,
) -> dict[str, jax.Array | None]:
    """Picks the most probable next token until every sentence has emitted EOS.

    Args:
      step_fn: see `StepFn`; called with B rows.
      cache: decoder state for B sentences (leading dim B on every leaf).
      batch_size: B.
      max_lengths: [B] int, the most tokens (EOS included) sentence b may have; None = `max_len`.
      max_len: static upper bound T on every output length.

    Returns:
      tokens [B, T] int32 (EOS included, PAD after), lengths [B] int32, scores [B] float32 (sum
      of log-probs), attention [B, T, S] float32 (zero after EOS) or None when `step_fn` gives
      no attention.
    """
    _check_sizes(batch_size=batch_size, max_len=max_len)
    limits = _length_limits(max_lengths, batch_size, max_len)  # [B]
    _, source_len = _probe(step_fn, jnp.full((batch_size,), bos_id, jnp.int32), cache)
    ops = _Greedy(max_len=max_len, source_len=source_len, bos_id=bos_id, eos_id=eos_id, kernels=kernels)
    return _run_slots(ops, lambda tokens, rows, _: step_fn(tokens, rows), cache, None, slots=batch_size,
                      queue_size=batch_size, num_sentences=batch_size, limits=limits,
                      source_lengths=jnp.full((batch_size,), source_len or 1, jnp.int32),
                      source_len=source_len, max_len=max_len, refill=0)


def beam_search(
    step_fn: StepFn,
    cache: Any,
    *,
    batch_size: int,
    beam_size: int,
    max_lengths: jax.Array | None,
    max_len: int,
    length_penalty: float = 0.0,
    coverage_penalty: float = 0.0,
    source_lengths: jax.Array | None = None,
    nbest: int = 1,
    bos_id: int = BOS_ID,
    eos_id: int = EOS_ID,
    kernels: KernelSet,
) -> dict[str, jax.Array | None]:
    """Beam search with GNMT length and coverage penalties (Wu et al. 2016, eq. 14).

    Each sentence keeps K live (no EOS yet) hypotheses and its N best finished ones. A step
    extends every live hypothesis by every token, keeps the 2K most probable extensions, moves
    those that end in EOS *and rank among the top K* to the finished set (as fairseq and
    OpenNMT-py do; this is what makes K=1 identical to greedy search), and keeps the K most
    probable of the rest alive. Live hypotheses compete by raw log-probability; finished ones by

        score = log_prob / ((5 + |Y|) / 6) ** length_penalty
                + coverage_penalty * sum_{i < source_length} log(min(sum_j attention_ij, 1))

    where |Y| counts the EOS and j runs over all target steps, EOS included. A sentence stops
    when no live hypothesis remains, or when its N finished slots are full and no live hypothesis
    can beat the worst of them even at its most favourable length (log-probs only fall as a
    hypothesis grows and the coverage penalty is never positive, so the bound is safe). The loop
    ends when every sentence has stopped.

    Args:
      step_fn: see `StepFn`; called with B*K rows, row b*K + k being beam k of sentence b.
      cache: decoder state for B sentences (leading dim B); tiled to B*K here and reordered
        each step to follow the surviving hypotheses.
      batch_size: B.  beam_size: K (static).  nbest: N <= K (static).
      max_lengths: [B] int, most tokens (EOS included) per sentence; None = `max_len`.
      max_len: static upper bound T on every output length.
      length_penalty: GNMT alpha; 0 = off.  coverage_penalty: GNMT beta; 0 = off (needs
        attention from `step_fn`).
      source_lengths: [B] int, real source positions per sentence, for the coverage penalty;
        None = all S positions are real.

    Returns:
      tokens [B, N, T] int32, lengths [B, N] int32, scores [B, N] float32 (ranking score with
      penalties, best first), log_probs [B, N] float32 (raw sums), attention [B, N, T, S] or
      None. When fewer than N distinct hypotheses exist (tiny vocabularies), the missing
      entries have score -inf, length 0 and PAD tokens.
    """
    _check_sizes(batch_size=batch_size, max_len=max_len, beam_size=beam_size, nbest=nbest)
    limits = _length_limits(max_lengths, batch_size, max_len)  # [B]
    tiled = jax.tree.map(lambda leaf: jnp.repeat(leaf, beam_size, axis=0), cache)
    vocab_size, source_len = _probe(
        step_fn, jnp.full((batch_size * beam_size,), bos_id, jnp.int32), tiled
    )
    ops = _Beam(beam_size=beam_size, nbest=nbest, vocab_size=vocab_size, max_len=max_len,
                source_len=source_len, length_penalty=length_penalty,
                coverage_penalty=coverage_penalty, bos_id=bos_id, eos_id=eos_id, kernels=kernels)
    source_lengths = _source_lengths(source_lengths, batch_size, source_len)
    return _run_slots(ops, lambda tokens, rows, _: step_fn(tokens, rows), cache, None, slots=batch_size,
                      queue_size=batch_size, num_sentences=batch_size, limits=limits,
                      source_lengths=source_lengths, source_len=source_len, max_len=max_len, refill=0)


# ContextStepFn(tokens [N] int32, state (pytree, leading dim N; follows the beams), context
# (pytree, leading dim N; the same for every beam of a sentence, never reordered)) ->
# (logits [N, V], new state, attention [N, S] or None). With continuous_search(slot_context=True)
# the context has leading dim N / K instead: entry p serves the K beam rows p*K .. p*K+K-1.
ContextStepFn = Callable[[jax.Array, Any, Any], "tuple[jax.Array, Any, jax.Array | None]"]


def continuous_search(
    step_fn: ContextStepFn,
    state: Any,
    context: Any,
    *,
    num_sentences: jax.Array | int,
    slots: int,
    beam_size: int = 1,
    max_lengths: jax.Array | None,
    max_len: int,
    length_penalty: float = 0.0,
    coverage_penalty: float = 0.0,
    source_lengths: jax.Array | None = None,
    nbest: int = 1,
    refill: int | None = None,
    slot_context: bool = False,
    output_sizes: tuple[int, int | None] | None = None,
    bos_id: int = BOS_ID,
    eos_id: int = EOS_ID,
    kernels: KernelSet,
) -> dict[str, jax.Array | None]:
    """Greedy (beam_size 1) or beam search of a queue of Q sentences through P decoding slots.

    Every sentence gets exactly the search `greedy_search` / `beam_search` would give it (same
    tokens, lengths and scores, same output layout with Q for B), but a slot whose sentence has
    finished is refilled with the next queue sentence at the same step, so no step computes rows
    of finished sentences and a batch never waits for its longest sentence. Put the longest
    sentences first in the queue: the loop ends with the last ones, and short ones finish fast.

    Args:
      step_fn: see `ContextStepFn`; called with P*K rows, row p*K + k being beam k of slot p.
      state: per-sentence decoder state, leading dim Q (tiled to K rows when a sentence starts,
        then reordered with its beams).  context: per-sentence step inputs that never change
        (e.g. encoder memory), leading dim Q, or None.
      num_sentences: how many queue entries (the first ones) to decode; may be traced. Entries
        after it are not decoded and their results are zeros.
      slots: P (static).  refill: most slots refilled in one step (static; default P // 8,
        at least 1); further free slots wait a step.
      slot_context: False: step_fn gets the context with leading dim P*K (tiled to every beam
        row); True: with leading dim P, one entry per slot for its K rows (see `ContextStepFn`).
      output_sizes: (V, S or None), the sizes step_fn's logits [N, V] and attention [N, S] (None:
        it gives no attention) will have, when the caller knows them; saves tracing step_fn
        once more to find them.
      Other arguments as `beam_search` with Q for B (greedy ignores the penalties).

    Returns:
      `greedy_search`'s dict (beam_size 1) or `beam_search`'s dict, leading dim Q.
    """
    leaves = jax.tree.leaves(state)
    if not leaves:
        raise ValueError("state must have at least one array (leading dim = queue size).")
    queue_size = leaves[0].shape[0]
    _check_sizes(slots=slots, max_len=max_len, beam_size=beam_size, nbest=nbest)
    refill = max(1, slots // 8) if refill is None else refill
    _check_sizes(refill=refill)
    limits = _length_limits(max_lengths, queue_size, max_len)
    rows = slots * beam_size
    def abstract_rows(tree, n):
        return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct((n, *leaf.shape[1:]), leaf.dtype), tree)

    if output_sizes is None:
        probe_rows = (abstract_rows(state, rows), abstract_rows(context, slots if slot_context else rows))
        output_sizes = _probe(lambda t, sc: step_fn(t, *sc), jnp.full((rows,), bos_id, jnp.int32), probe_rows)
    vocab_size, source_len = output_sizes
    if beam_size == 1:
        ops = _Greedy(max_len=max_len, source_len=source_len, bos_id=bos_id, eos_id=eos_id, kernels=kernels)
    else:
        ops = _Beam(beam_size=beam_size, nbest=nbest, vocab_size=vocab_size, max_len=max_len,
                    source_len=source_len, length_penalty=length_penalty,
                    coverage_penalty=coverage_penalty, bos_id=bos_id, eos_id=eos_id, kernels=kernels)
    return _run_slots(ops, step_fn, state, context, slots=slots, queue_size=queue_size,
                      num_sentences=jnp.minimum(jnp.asarray(num_sentences, jnp.int32), queue_size),
                      limits=limits, source_lengths=_source_lengths(source_lengths, queue_size, source_len),
                      source_len=source_len, max_len=max_len, refill=refill, slot_context=slot_context)


# ------------------------------------------------------------------ the search, slot by slot
#
# Both searches run one `lax.while_loop` over a pool of P decoding slots (K rows each). A slot
# holds one sentence's search ("search" below: per-slot arrays of the greedy or beam state) and
# its K rows of decoder state ("rows", reordered along beams) and its per-sentence context
# ("context", fixed, e.g. encoder memory; K rows, or one with slot_context). The plain searches fill every slot once (P = B).
# The continuous searches take sentences from a queue of Q >= P: when a slot's sentence
# finishes, its result is written out and the slot is refilled from the queue at the same step,
# so no step computes rows of a sentence that has already finished.


class _Search:
    """The per-slot part of a search (greedy or beam): how to start, advance and read out."""

    num_beams: int

    def fresh(self, n: int) -> dict:
        """Search state of n new slots (every leaf has leading dim n)."""
        raise NotImplementedError

    def advance(self, search, logits, attention, limits, source_mask):
        """One step -> (search, parent [P, K] int (rows to follow) or None, stopped [P] bool)."""
        raise NotImplementedError

    def result(self, search) -> dict:
        """Per-slot results (leading dim P) in decoding.py's output layout."""
        raise NotImplementedError


def _run_slots(search_ops: _Search, step_fn, state, context, *, slots, queue_size, num_sentences,
               limits, source_lengths, source_len, max_len, refill, slot_context=False):
    """Decodes `num_sentences` sentences of a queue through `slots` slots -> results [Q, ...].

    state/context: pytrees with leading dim Q (per sentence); limits, source_lengths [Q].
    With queue_size == slots and refill == 0 (the plain searches) every slot is filled once and
    the loop runs until every slot has stopped or max_len steps have passed. slot_context (only
    with refill > 0): context is kept per slot (leading dim P), not per row.
    """
    K = search_ops.num_beams
    P, Q = slots, queue_size
    continuous = refill > 0
    if slot_context and not continuous:
        raise ValueError("slot_context needs the continuous search (refill > 0).")

    def tile(tree):
        return jax.tree.map(lambda leaf: jnp.repeat(leaf, K, axis=0), tree)

    if not continuous:
        loop = {"search": search_ops.fresh(P), "rows": tile(state), "context": tile(context),
                "limits": limits, "source_lengths": source_lengths, "step": jnp.zeros((), jnp.int32),
                "stopped": jnp.zeros((P,), bool)}
    else:
        def zeros_rows(tree, n=P * K):
            return jax.tree.map(lambda leaf: jnp.zeros((n, *leaf.shape[1:]), leaf.dtype), tree)

        empty_results = jax.eval_shape(search_ops.result, search_ops.fresh(Q))
        loop = {"search": search_ops.fresh(P), "rows": zeros_rows(state),
                "context": zeros_rows(context, P if slot_context else P * K),
                "limits": jnp.ones((P,), jnp.int32), "source_lengths": jnp.ones((P,), jnp.int32),
                "step": jnp.zeros((), jnp.int32),
                "sentence": jnp.full((P,), Q, jnp.int32),  # queue index of each slot's sentence; Q = idle
                "next": jnp.zeros((), jnp.int32), "emitted": jnp.zeros((), jnp.int32),
                "results": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), empty_results)}

    def fill(loop, slot_ids, sentence_ids):
        return _fill_slots(search_ops, loop, slot_ids, sentence_ids, state, context, limits, source_lengths,
                           beams=K, slot_context=slot_context)

    if continuous:
        first = jnp.arange(P, dtype=jnp.int32)
        valid = first < num_sentences
        loop = fill(loop, jnp.where(valid, first, P), jnp.where(valid, first, Q))
        loop["next"] = jnp.minimum(num_sentences, P).astype(jnp.int32)

    def cond(loop):
        if not continuous:
            return (loop["step"] < max_len) & ~jnp.all(loop["stopped"])
        # Every sentence finishes within max_len steps of starting; the step bound is a guard.
        return (loop["emitted"] < num_sentences) & (loop["step"] < (Q + 1) * max_len)

    def body(loop):
        loop, stopped = _step_slots(search_ops, step_fn, loop, slots=P, beams=K, source_len=source_len)
        search = loop["search"]
        if not continuous:
            loop["stopped"] = stopped
            return loop
        finished = stopped & (loop["sentence"] < Q)  # [P]: write these out, free their slots
        out_index = jnp.where(finished, loop["sentence"], Q)
        loop["results"] = jax.tree.map(lambda r, v: r.at[out_index].set(v, mode="drop"), loop["results"],
                                       search_ops.result(search))
        loop["emitted"] = loop["emitted"] + jnp.sum(finished, dtype=jnp.int32)
        loop["sentence"] = jnp.where(finished, Q, loop["sentence"])
        # Refill up to `refill` idle slots (the rest wait a step) with the next queue sentences.
        idle = loop["sentence"] >= Q
        slot_ids = jnp.nonzero(idle, size=refill, fill_value=P)[0].astype(jnp.int32)
        count = jnp.minimum(jnp.sum(idle, dtype=jnp.int32), num_sentences - loop["next"])
        valid = jnp.arange(refill) < count
        loop = fill(loop, jnp.where(valid, slot_ids, P),
                    jnp.where(valid, loop["next"] + jnp.arange(refill, dtype=jnp.int32), Q))
        loop["next"] = loop["next"] + jnp.clip(count, 0, refill).astype(jnp.int32)
        return loop

    loop = lax.while_loop(cond, body, loop)
    return loop["results"] if continuous else search_ops.result(loop["search"])


def _fill_slots(search_ops: _Search, loop, slot_ids, sentence_ids, state, context, limits, source_lengths, *,
                beams: int, slot_context: bool):
    """Starts sentences sentence_ids [M] (indices into state/context/limits/source_lengths,
    leading dim Q) in slots slot_ids [M]; a slot id P (out of range) is a no-op."""
    K = beams
    Q = limits.shape[0]
    take = jnp.minimum(sentence_ids, Q - 1)
    row_ids = (slot_ids[:, None] * K + jnp.arange(K)[None, :]).reshape(-1)  # >= P*K: dropped

    def put_rows(rows, queue):
        return jax.tree.map(lambda r, q: r.at[row_ids].set(jnp.repeat(q[take], K, axis=0), mode="drop"),
                            rows, queue)

    loop = dict(loop)
    loop["rows"] = put_rows(loop["rows"], state)
    if slot_context:
        loop["context"] = jax.tree.map(lambda r, q: r.at[slot_ids].set(q[take], mode="drop"),
                                       loop["context"], context)
    else:
        loop["context"] = put_rows(loop["context"], context)
    loop["search"] = jax.tree.map(lambda s, f: s.at[slot_ids].set(f, mode="drop"), loop["search"],
                                  search_ops.fresh(slot_ids.shape[0]))
    loop["limits"] = loop["limits"].at[slot_ids].set(limits[take], mode="drop")
    loop["source_lengths"] = loop["source_lengths"].at[slot_ids].set(source_lengths[take], mode="drop")
    if "sentence" in loop:
        loop["sentence"] = loop["sentence"].at[slot_ids].set(sentence_ids, mode="drop")
    return loop


def _step_slots(search_ops: _Search, step_fn, loop, *, slots: int, beams: int, source_len):
    """One decoding step of every slot (step_fn on all P*K rows; rows follow their beams)
    -> (loop, stopped [P])."""
    P, K = slots, beams
    search = loop["search"]
    source_mask = None
    if source_len is not None:  # [P, 1, S]
        source_mask = jnp.arange(source_len)[None, None, :] < loop["source_lengths"][:, None, None]
    logits, rows, attention = step_fn(search["last"].reshape(P * K), loop["rows"], loop["context"])
    search, parent, stopped = search_ops.advance(search, logits, attention, loop["limits"], source_mask)
    if parent is not None:
        follow = (jnp.arange(P)[:, None] * K + parent).reshape(-1)
        rows = jax.tree.map(lambda leaf: leaf[follow], rows)
    return dict(loop, search=search, rows=rows, step=loop["step"] + 1), stopped


class SlotPool:
    """Continuous batching across calls: P decoding slots fed from a ring of W admitted sentences.

    `continuous_search` decodes a queue known in advance; a server learns of sentences while it
    decodes. Here the pool lives between calls. Sentences are numbered in the order they are
    admitted (their ticket). `admit` appends newly encoded sentences to a ring of W entries
    (ticket % W), and `run` decodes up to `steps` steps, starting ring sentences in free slots
    as they free up (all free slots before the first step, then up to `refill` per step, as
    `continuous_search` does) and writing each finished sentence's result at ticket % R. The
    caller keeps fewer than W admitted sentences not yet started (`run` reports how many wait)
    and fewer than R between the oldest unfinished ticket and the next one, so no entry is
    overwritten while it is still needed. Each sentence gets exactly the search
    `greedy_search` / `beam_search` gives it (the search is per slot, the step function per
    row), whatever it shared the pool with.

    `run` works on the first `active` slots only (static; a power of two the caller picks to
    cover the busy slots, reported by `run`, and the waiting sentences), so a lightly loaded
    pool computes few rows. All functions are pure: jit them, donating the pool. The step
    function is built per call from `make_step_fn(*step_args)`, so arrays such as parameters
    are arguments rather than constants baked into the program.
    """

    def __init__(self, make_step_fn, *, slots: int, queue: int, results: int, beam_size: int = 1, nbest: int = 1,
                 vocab_size: int, source_len: int | None, max_len: int, length_penalty: float = 0.0,
                 coverage_penalty: float = 0.0, refill: int | None = None, slot_context: bool = True,
                 bos_id: int = BOS_ID, eos_id: int = EOS_ID, kernels: KernelSet):
        refill = max(1, slots // 8) if refill is None else refill
        _check_sizes(slots=slots, queue=queue, results=results, max_len=max_len, beam_size=beam_size, nbest=nbest,
                     refill=refill)
        self.make_step_fn, self.slots, self.queue, self.results, self.beams = make_step_fn, slots, queue, results, beam_size
        self.max_len, self.refill, self.source_len, self.slot_context = max_len, refill, source_len, slot_context
        if beam_size == 1:
            self.ops = _Greedy(max_len=max_len, source_len=source_len, bos_id=bos_id, eos_id=eos_id, kernels=kernels)
        else:
            self.ops = _Beam(beam_size=beam_size, nbest=nbest, vocab_size=vocab_size, max_len=max_len,
                             source_len=source_len, length_penalty=length_penalty,
                             coverage_penalty=coverage_penalty, bos_id=bos_id, eos_id=eos_id, kernels=kernels)

    def empty(self, state_like, context_like) -> dict:
        """An idle pool for per-sentence state/context shaped like `*_like` (leading dim ignored)."""
        P, K, W = self.slots, self.beams, self.queue

        def zeros(tree, n):
            return jax.tree.map(lambda leaf: jnp.zeros((n, *leaf.shape[1:]), leaf.dtype), tree)

        return {"search": self.ops.fresh(P), "rows": zeros(state_like, P * K),
                "context": zeros(context_like, P if self.slot_context else P * K),
                "limits": jnp.ones((P,), jnp.int32), "source_lengths": jnp.ones((P,), jnp.int32),
                "sentence": jnp.full((P,), self.results, jnp.int32),  # ticket % R of each slot's sentence; R = idle
                "step": jnp.zeros((), jnp.int32),
                "ring": {"state": zeros(state_like, W), "context": zeros(context_like, W),
                         "limits": jnp.ones((W,), jnp.int32), "source_lengths": jnp.ones((W,), jnp.int32)},
                "head": jnp.zeros((), jnp.int32), "tail": jnp.zeros((), jnp.int32)}

    def admit(self, pool, count, state, context, limits, source_lengths) -> dict:
        """Appends the first `count` of M encoded sentences (state/context leading dim M;
        limits: most output tokens, EOS included; source_lengths: real source positions) to the
        ring: they get the next `count` tickets."""
        W = self.queue
        M = jax.tree.leaves(state)[0].shape[0]
        i = jnp.arange(M, dtype=jnp.int32)
        positions = jnp.where(i < count, (pool["tail"] + i) % W, W)  # W: dropped
        ring = pool["ring"]
        put = lambda r, x: r.at[positions].set(x, mode="drop")  # noqa: E731
        ring = {"state": jax.tree.map(put, ring["state"], state), "context": jax.tree.map(put, ring["context"], context),
                "limits": put(ring["limits"], jnp.clip(jnp.asarray(limits, jnp.int32), 1, self.max_len)),
                "source_lengths": put(ring["source_lengths"], jnp.asarray(source_lengths, jnp.int32))}
        return dict(pool, ring=ring, tail=pool["tail"] + jnp.asarray(count, jnp.int32))

    def run(self, pool, step_args, *, steps: int, active: int):
        """Decodes the first `active` slots (static) for up to `steps` steps (stopping early when
        nothing is busy or waiting). Returns (pool, done [R] bool: ticket % R of the sentences
        that finished, results in the search's output layout with leading dim R (valid where
        done), {"busy": slots busy, "last_busy": highest busy slot (-1: none), "waiting":
        admitted sentences not yet started})."""
        K, A, W, R = self.beams, active, self.queue, self.results
        step_fn = self.make_step_fn(*step_args)
        per_slot = ("search", "limits", "source_lengths", "sentence")
        loop = {k: jax.tree.map(lambda x: x[:A], pool[k]) for k in per_slot}
        loop["rows"] = jax.tree.map(lambda x: x[:A * K], pool["rows"])
        loop["context"] = jax.tree.map(lambda x: x[:A if self.slot_context else A * K], pool["context"])
        loop["step"] = jnp.zeros((), jnp.int32)
        loop["head"] = pool["head"]
        ring, tail = pool["ring"], pool["tail"]
        loop["done"] = jnp.zeros((R,), bool)
        loop["results"] = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                       jax.eval_shape(self.ops.result, self.ops.fresh(R)))

        def start(loop, n):
            """Starts up to n waiting ring sentences in the lowest idle slots."""
            idle = loop["sentence"] >= R
            slot_ids = jnp.nonzero(idle, size=n, fill_value=A)[0].astype(jnp.int32)
            count = jnp.minimum(jnp.sum(idle, dtype=jnp.int32), tail - loop["head"])
            valid = jnp.arange(n) < count
            slot_ids = jnp.where(valid, slot_ids, A)  # A: no slot (dropped)
            tickets = loop["head"] + jnp.arange(n, dtype=jnp.int32)
            loop = _fill_slots(self.ops, loop, slot_ids, jnp.where(valid, tickets % W, W),
                               ring["state"], ring["context"], ring["limits"], ring["source_lengths"],
                               beams=K, slot_context=self.slot_context)
            loop["sentence"] = loop["sentence"].at[slot_ids].set(tickets % R, mode="drop")
            loop["head"] = loop["head"] + jnp.clip(count, 0, n).astype(jnp.int32)
            return loop

        def cond(loop):
            return (loop["step"] < steps) & (jnp.any(loop["sentence"] < R) | (loop["head"] < tail))

        def body(loop):
            loop = start(loop, min(self.refill, A))
            loop, stopped = _step_slots(self.ops, step_fn, loop, slots=A, beams=K, source_len=self.source_len)
            finished = stopped & (loop["sentence"] < R)
            out = jnp.where(finished, loop["sentence"], R)
            loop["results"] = jax.tree.map(lambda r, v: r.at[out].set(v, mode="drop"), loop["results"],
                                           self.ops.result(loop["search"]))
            loop["done"] = loop["done"].at[out].set(True, mode="drop")
            loop["sentence"] = jnp.where(finished, R, loop["sentence"])
            return loop

        loop = lax.while_loop(cond, body, start(loop, A))
        pool = dict(pool, head=loop["head"])
        for k in (*per_slot, "rows", "context"):  # slots started in this run got their context here
            pool[k] = jax.tree.map(lambda full, part: lax.dynamic_update_slice_in_dim(full, part, 0, 0),
                                   pool[k], loop[k])
        busy = loop["sentence"] < R
        info = {"busy": jnp.sum(busy, dtype=jnp.int32),
                "last_busy": jnp.max(jnp.where(busy, jnp.arange(A), -1)).astype(jnp.int32),
                "waiting": tail - loop["head"]}
        return pool, loop["done"], loop["results"], info


class _Greedy(_Search):
    num_beams = 1

    def __init__(self, *, max_len, source_len, bos_id, eos_id, kernels: KernelSet):
        self.max_len, self.source_len, self.bos_id, self.eos_id = max_len, source_len, bos_id, eos_id
        self.kernels = kernels

    def fresh(self, n):
        search = {
            "last": jnp.full((n, 1), self.bos_id, jnp.int32),
            "step": jnp.zeros((n,), jnp.int32),
            "tokens": jnp.full((n, self.max_len), PAD_ID, jnp.int32),
            "lengths": jnp.zeros((n,), jnp.int32),
            "scores": jnp.zeros((n,), jnp.float32),
            "finished": jnp.zeros((n,), bool),
        }
        if self.source_len is not None:
            search["attention"] = jnp.zeros((n, self.max_len, self.source_len), jnp.float32)
        return search

    def advance(self, search, logits, attention, limits, source_mask):
        step = search["step"]  # [B]
        token, token_log_prob = self.kernels.best_token(logits, step >= limits - 1, self.eos_id)  # [B], [B]
        live = ~search["finished"]
        token = jnp.where(live, token, PAD_ID)
        at_step = jnp.arange(self.max_len)[None, :] == step[:, None]  # [B, T]
        new = {
            "last": token[:, None],
            "step": step + 1,
            "tokens": jnp.where(at_step, token[:, None], search["tokens"]),
            "lengths": search["lengths"] + live.astype(jnp.int32),
            "scores": search["scores"] + jnp.where(live, token_log_prob, 0.0),
            "finished": search["finished"] | (token == self.eos_id),
        }
        if attention is not None:
            step_attention = jnp.where(live[:, None], attention.astype(jnp.float32), 0.0)
            new["attention"] = jnp.where(at_step[:, :, None], step_attention[:, None, :], search["attention"])
        return new, None, new["finished"]

    def result(self, search):
        return {"tokens": search["tokens"], "lengths": search["lengths"], "scores": search["scores"],
                "attention": search.get("attention")}


class _Beam(_Search):
    def __init__(self, *, beam_size, nbest, vocab_size, max_len, source_len, length_penalty,
                 coverage_penalty, bos_id, eos_id, kernels: KernelSet):
        self.kernels = kernels
        has_attention = source_len is not None
        if not has_attention and not _is_zero(coverage_penalty):
            raise ValueError(
                "coverage_penalty needs attention weights, but the step function returns None for "
                "them; set coverage_penalty to 0."
            )
        self.num_beams, self.num_best, self.vocab_size = beam_size, nbest, vocab_size
        self.max_len, self.source_len = max_len, source_len
        self.length_penalty, self.coverage_penalty = length_penalty, coverage_penalty
        self.bos_id, self.eos_id = bos_id, eos_id
        # Keeping 2K candidates leaves K non-EOS ones even if K of them end in EOS.
        self.num_candidates = min(2 * beam_size, beam_size * vocab_size)

    def fresh(self, n):
        K, N, T = self.num_beams, self.num_best, self.max_len
        search = {
            "step": jnp.zeros((n,), jnp.int32),
            "last": jnp.full((n, K), self.bos_id, jnp.int32),
            "alive_tokens": jnp.full((n, K, T), PAD_ID, jnp.int32),
            # Only beam 0 is live at first, so the first step cannot fill the beam with K copies
            # of the same hypothesis.
            "alive_log_probs": jnp.tile(
                jnp.where(jnp.arange(K) == 0, 0.0, _NEG_INF).astype(jnp.float32), (n, 1)
            ),
            "finished_tokens": jnp.full((n, N, T), PAD_ID, jnp.int32),
            "finished_lengths": jnp.zeros((n, N), jnp.int32),
            "finished_scores": jnp.full((n, N), _NEG_INF, jnp.float32),
            "finished_log_probs": jnp.full((n, N), _NEG_INF, jnp.float32),
            "finished_flags": jnp.zeros((n, N), bool),
            "done": jnp.zeros((n,), bool),
        }
        if self.source_len is not None:
            S = self.source_len
            search["alive_attention"] = jnp.zeros((n, K, T, S), jnp.float32)
            search["alive_coverage"] = jnp.zeros((n, K, S), jnp.float32)
            search["finished_attention"] = jnp.zeros((n, N, T, S), jnp.float32)
        return search

    def advance(self, state, logits, attention, limits, source_mask):
        K, V, T = self.num_beams, self.vocab_size, self.max_len
        step = state["step"]  # [B]
        batch_size = step.shape[0]
        has_attention = self.source_len is not None
        # Every (parent beam, next token) extension, by the raw log-prob of the longer prefix.
        candidate_log_probs, flat_index = self.kernels.top_extensions(
            state["alive_log_probs"], logits.reshape(batch_size, K, V), step >= limits - 1,
            self.eos_id, self.num_candidates,
        )  # [B, C]
        parent = flat_index // V  # [B, C]
        token = (flat_index % V).astype(jnp.int32)  # [B, C]
        at_step = jnp.arange(T)[None, None, :] == step[:, None, None]  # [B, 1, T]
        candidate_tokens = jnp.where(at_step, token[:, :, None], _gather(state["alive_tokens"], parent))
        if has_attention:
            step_attention = attention.astype(jnp.float32).reshape(batch_size, K, -1)
            step_attention = _gather(step_attention, parent)  # [B, C, S]
            candidate_attention = jnp.where(at_step[..., None], step_attention[:, :, None, :],
                                            _gather(state["alive_attention"], parent))
            candidate_coverage = _gather(state["alive_coverage"], parent) + step_attention

        # Finished candidates: EOS within the top K, a real (finite) hypothesis, and a sentence
        # that has not stopped (a stopped sentence's n-best is final).
        is_eos = token == self.eos_id
        candidate_rank = jnp.arange(self.num_candidates)
        newly_finished = (
            is_eos
            & (candidate_rank < K)[None, :]
            & jnp.isfinite(candidate_log_probs)
            & ~state["done"][:, None]
        )
        candidate_scores = candidate_log_probs / _gnmt_length_penalty(step + 1, self.length_penalty)[:, None]
        if has_attention:
            candidate_scores = candidate_scores + _gnmt_coverage_penalty(
                candidate_coverage, source_mask, self.coverage_penalty
            )
        candidate_scores = jnp.where(newly_finished, candidate_scores, _NEG_INF)

        # Merge the new finished hypotheses into the n-best; valid entries sort before empty
        # ones because empty ones have score -inf, so finished_flags stays sorted too.
        merged_flags = jnp.concatenate([state["finished_flags"], newly_finished], axis=1)
        merged_scores = jnp.concatenate([state["finished_scores"], candidate_scores], axis=1)
        _, keep = lax.top_k(jnp.where(merged_flags, merged_scores, _NEG_INF), self.num_best)

        def merge(name, candidate_value):
            merged = jnp.concatenate([state[name], candidate_value], axis=1)
            return _gather(merged, keep)

        candidate_lengths = jnp.broadcast_to((step + 1)[:, None], token.shape).astype(jnp.int32)
        new_state = {
            "step": step + 1,
            "finished_tokens": merge("finished_tokens", candidate_tokens),
            "finished_lengths": merge("finished_lengths", candidate_lengths),
            "finished_scores": merge("finished_scores", candidate_scores),
            "finished_log_probs": merge("finished_log_probs", candidate_log_probs),
            "finished_flags": merge("finished_flags", newly_finished),
        }
        if has_attention:
            new_state["finished_attention"] = merge("finished_attention", candidate_attention)

        # The K most probable candidates without EOS stay alive.
        alive_log_probs, pick = lax.top_k(jnp.where(is_eos, _NEG_INF, candidate_log_probs), K)  # [B, K]
        alive_parent = jnp.take_along_axis(parent, pick, axis=1)  # [B, K]
        new_state["alive_log_probs"] = alive_log_probs
        new_state["last"] = jnp.take_along_axis(token, pick, axis=1)
        new_state["alive_tokens"] = _gather(candidate_tokens, pick)
        if has_attention:
            new_state["alive_attention"] = _gather(candidate_attention, pick)
            new_state["alive_coverage"] = _gather(candidate_coverage, pick)

        # Best score any live hypothesis could still reach: its log-prob can only fall, and the
        # length penalty is monotone in length, so the best case is at one end of the lengths
        # it may still finish at (step+2 .. limit); with alpha >= 0 that is the limit.
        best_alive = alive_log_probs[:, 0]
        bound = jnp.maximum(
            best_alive / _gnmt_length_penalty(step + 2, self.length_penalty),
            best_alive / _gnmt_length_penalty(limits, self.length_penalty),
        )
        nbest_full = new_state["finished_flags"][:, -1]
        cannot_improve = nbest_full & (new_state["finished_scores"][:, -1] >= bound)
        new_state["done"] = state["done"] | ~jnp.isfinite(best_alive) | cannot_improve
        return new_state, alive_parent, new_state["done"]

    def result(self, state):
        flags = state["finished_flags"]
        result = {
            "tokens": jnp.where(flags[:, :, None], state["finished_tokens"], PAD_ID),
            "lengths": jnp.where(flags, state["finished_lengths"], 0),
            "scores": state["finished_scores"],
            "log_probs": jnp.where(flags, state["finished_log_probs"], _NEG_INF),
            "attention": None,
        }
        if self.source_len is not None:
            result["attention"] = jnp.where(flags[:, :, None, None], state["finished_attention"], 0.0)
        return result


def _source_lengths(source_lengths, n, source_len):
    """[n] int32 real source positions (all S when None; 1 when there is no attention)."""
    if source_lengths is None:
        return jnp.full((n,), source_len or 1, jnp.int32)
    return jnp.asarray(source_lengths, jnp.int32).reshape(n)


def _gnmt_length_penalty(length, alpha):
    """((5 + |Y|) / 6) ** alpha; exactly 1 when alpha is 0."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _gnmt_coverage_penalty(coverage, source_mask, beta):
    """beta * sum over real source words of log(min(coverage, 1)); coverage [..., S]."""
    log_coverage = jnp.log(jnp.clip(coverage, _MIN_COVERAGE, 1.0))
    return beta * jnp.sum(jnp.where(source_mask, log_coverage, 0.0), axis=-1)


def _gather(values, index):
    """values [B, K, ...], index [B, C] int -> [B, C, ...]: per-sentence beam selection."""
    return jax.vmap(lambda row, row_index: row[row_index])(values, index)


def _length_limits(max_lengths, batch_size, max_len):
    """[B] int32 per-sentence token limits, clipped to [1, max_len]."""
    if max_lengths is None:
        return jnp.full((batch_size,), max_len, jnp.int32)
    max_lengths = jnp.asarray(max_lengths, jnp.int32)
    if max_lengths.shape != (batch_size,):
        raise ValueError(
            f"max_lengths has shape {max_lengths.shape}; it must be [batch_size] = ({batch_size},)."
        )
    return jnp.clip(max_lengths, 1, max_len)


def _probe(step_fn, tokens, cache):
    """Traces step_fn once (no compute) -> (vocab size V, source length S or None)."""
    rows = tokens.shape[0]
    logits, _, attention = jax.eval_shape(step_fn, tokens, cache)
    if logits.ndim != 2 or logits.shape[0] != rows:
        raise ValueError(f"step_fn must return logits of shape [{rows}, V], got {logits.shape}.")
    if attention is None:
        return logits.shape[1], None
    if attention.ndim != 2 or attention.shape[0] != rows:
        raise ValueError(
            f"step_fn must return attention of shape [{rows}, S] or None, got {attention.shape}."
        )
    return logits.shape[1], attention.shape[1]


def _is_symbolic(value) -> bool:
    """A `jax.export` symbolic dimension (e.g. the batch size of an exported program)."""
    return not isinstance(value, (int, np.integer)) and jax.export.is_symbolic_dim(value)


def _check_sizes(**sizes):
    for name, value in sizes.items():
        if _is_symbolic(value):
            continue
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive Python int (it is static), got {value!r}.")
    if not any(_is_symbolic(v) for v in sizes.values()) and sizes.get("nbest", 1) > sizes.get("beam_size", 1):
        raise ValueError(
            f"nbest ({sizes['nbest']}) cannot exceed beam_size ({sizes['beam_size']})."
        )


def _is_zero(value):
    """True for a concrete zero; a traced value is assumed non-zero."""
    try:
        return float(value) == 0.0
    except (TypeError, jax.errors.ConcretizationTypeError):
        return False
