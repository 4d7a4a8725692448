"""Greedy and beam search over a step function; knows nothing of the model.

Both searches drive a `step_fn(tokens, cache) -> (logits, cache, attention)` (see `StepFn`), so
this module imports only jax and numpy (as t5x's decoding.py does); `steps.py` adapts the model.

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

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2

# step_fn(tokens [N] int32 (the previous token of each row), cache (pytree, leading dim N on
# every leaf)) -> (logits [N, V] (unnormalised), new cache (same structure), attention [N, S]
# (the weights used for this step, zero on padded source positions) or None).
StepFn = Callable[[jax.Array, Any], "tuple[jax.Array, Any, jax.Array | None]"]

_NEG_INF = -np.inf
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
    first_tokens = jnp.full((batch_size,), bos_id, jnp.int32)
    _, source_len = _probe(step_fn, first_tokens, cache)
    has_attention = source_len is not None

    state = {
        "step": jnp.zeros((), jnp.int32),
        "previous": first_tokens,  # [B]
        "cache": cache,
        "tokens": jnp.full((batch_size, max_len), PAD_ID, jnp.int32),
        "lengths": jnp.zeros((batch_size,), jnp.int32),
        "scores": jnp.zeros((batch_size,), jnp.float32),
        "finished": jnp.zeros((batch_size,), bool),
    }
    if has_attention:
        state["attention"] = jnp.zeros((batch_size, max_len, source_len), jnp.float32)

    def cond(state):
        return (state["step"] < max_len) & ~jnp.all(state["finished"])

    def body(state):
        i = state["step"]
        logits, cache, attention = step_fn(state["previous"], state["cache"])
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, V]
        log_probs = _force_eos(log_probs, i >= limits - 1, eos_id)
        live = ~state["finished"]
        token = jnp.where(live, jnp.argmax(log_probs, axis=-1).astype(jnp.int32), PAD_ID)
        token_log_prob = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
        new_state = {
            "step": i + 1,
            "previous": token,
            "cache": cache,
            "tokens": state["tokens"].at[:, i].set(token),
            "lengths": state["lengths"] + live.astype(jnp.int32),
            "scores": state["scores"] + jnp.where(live, token_log_prob, 0.0),
            "finished": state["finished"] | (token == eos_id),
        }
        if has_attention:
            step_attention = jnp.where(live[:, None], attention.astype(jnp.float32), 0.0)
            new_state["attention"] = state["attention"].at[:, i].set(step_attention)
        return new_state

    state = lax.while_loop(cond, body, state)
    return {
        "tokens": state["tokens"],
        "lengths": state["lengths"],
        "scores": state["scores"],
        "attention": state.get("attention"),
    }


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
    num_beams, num_best = beam_size, nbest
    limits = _length_limits(max_lengths, batch_size, max_len)  # [B]
    # Row b*K + k is beam k of sentence b.
    cache = jax.tree.map(lambda leaf: jnp.repeat(leaf, num_beams, axis=0), cache)
    vocab_size, source_len = _probe(
        step_fn, jnp.full((batch_size * num_beams,), bos_id, jnp.int32), cache
    )
    has_attention = source_len is not None
    if not has_attention and not _is_zero(coverage_penalty):
        raise ValueError(
            "coverage_penalty needs attention weights, but the step function returns None for "
            "them; set coverage_penalty to 0."
        )
    if has_attention:
        positions = jnp.arange(source_len)[None, None, :]
        if source_lengths is None:
            source_mask = jnp.ones((batch_size, 1, source_len), bool)  # [B, 1, S]
        else:
            source_lengths = jnp.asarray(source_lengths, jnp.int32).reshape(batch_size)
            source_mask = positions < source_lengths[:, None, None]  # [B, 1, S]
    # Keeping 2K candidates leaves K non-EOS ones even if K of them end in EOS.
    num_candidates = min(2 * num_beams, num_beams * vocab_size)
    candidate_rank = jnp.arange(num_candidates)

    state = {
        "step": jnp.zeros((), jnp.int32),
        "cache": cache,
        "alive_last": jnp.full((batch_size, num_beams), bos_id, jnp.int32),
        "alive_tokens": jnp.full((batch_size, num_beams, max_len), PAD_ID, jnp.int32),
        # Only beam 0 is live at first, so the first step cannot fill the beam with K copies of
        # the same hypothesis.
        "alive_log_probs": jnp.tile(
            jnp.where(jnp.arange(num_beams) == 0, 0.0, _NEG_INF).astype(jnp.float32),
            (batch_size, 1),
        ),
        "finished_tokens": jnp.full((batch_size, num_best, max_len), PAD_ID, jnp.int32),
        "finished_lengths": jnp.zeros((batch_size, num_best), jnp.int32),
        "finished_scores": jnp.full((batch_size, num_best), _NEG_INF, jnp.float32),
        "finished_log_probs": jnp.full((batch_size, num_best), _NEG_INF, jnp.float32),
        "finished_flags": jnp.zeros((batch_size, num_best), bool),
        "done": jnp.zeros((batch_size,), bool),
    }
    if has_attention:
        attention_shape = (max_len, source_len)
        state["alive_attention"] = jnp.zeros((batch_size, num_beams, *attention_shape))
        state["alive_coverage"] = jnp.zeros((batch_size, num_beams, source_len))
        state["finished_attention"] = jnp.zeros((batch_size, num_best, *attention_shape))

    def cond(state):
        return (state["step"] < max_len) & ~jnp.all(state["done"])

    def body(state):
        i = state["step"]
        logits, cache, attention = step_fn(
            state["alive_last"].reshape(batch_size * num_beams), state["cache"]
        )
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        log_probs = log_probs.reshape(batch_size, num_beams, vocab_size)
        log_probs = _force_eos(log_probs, (i >= limits - 1)[:, None], eos_id)

        # Every (parent beam, next token) extension, by the raw log-prob of the longer prefix.
        extended = state["alive_log_probs"][:, :, None] + log_probs  # [B, K, V]
        candidate_log_probs, flat_index = lax.top_k(
            extended.reshape(batch_size, num_beams * vocab_size), num_candidates
        )  # [B, C]
        parent = flat_index // vocab_size  # [B, C]
        token = (flat_index % vocab_size).astype(jnp.int32)  # [B, C]
        candidate_tokens = _gather(state["alive_tokens"], parent).at[:, :, i].set(token)
        if has_attention:
            step_attention = attention.astype(jnp.float32).reshape(batch_size, num_beams, -1)
            step_attention = _gather(step_attention, parent)  # [B, C, S]
            candidate_attention = _gather(state["alive_attention"], parent)
            candidate_attention = candidate_attention.at[:, :, i].set(step_attention)
            candidate_coverage = _gather(state["alive_coverage"], parent) + step_attention

        # Finished candidates: EOS within the top K, a real (finite) hypothesis, and a sentence
        # that has not stopped (a stopped sentence's n-best is final).
        is_eos = token == eos_id
        newly_finished = (
            is_eos
            & (candidate_rank < num_beams)[None, :]
            & jnp.isfinite(candidate_log_probs)
            & ~state["done"][:, None]
        )
        candidate_scores = candidate_log_probs / _gnmt_length_penalty(i + 1, length_penalty)
        if has_attention:
            candidate_scores = candidate_scores + _gnmt_coverage_penalty(
                candidate_coverage, source_mask, coverage_penalty
            )
        candidate_scores = jnp.where(newly_finished, candidate_scores, _NEG_INF)

        # Merge the new finished hypotheses into the n-best; valid entries sort before empty
        # ones because empty ones have score -inf, so finished_flags stays sorted too.
        merged_flags = jnp.concatenate([state["finished_flags"], newly_finished], axis=1)
        merged_scores = jnp.concatenate([state["finished_scores"], candidate_scores], axis=1)
        _, keep = lax.top_k(jnp.where(merged_flags, merged_scores, _NEG_INF), num_best)

        def merge(name, candidate_value):
            merged = jnp.concatenate([state[name], candidate_value], axis=1)
            return _gather(merged, keep)

        candidate_lengths = jnp.full(token.shape, i + 1, jnp.int32)
        new_state = {
            "step": i + 1,
            "finished_tokens": merge("finished_tokens", candidate_tokens),
            "finished_lengths": merge("finished_lengths", candidate_lengths),
            "finished_scores": merge("finished_scores", candidate_scores),
            "finished_log_probs": merge("finished_log_probs", candidate_log_probs),
            "finished_flags": merge("finished_flags", newly_finished),
        }
        if has_attention:
            new_state["finished_attention"] = merge("finished_attention", candidate_attention)

        # The K most probable candidates without EOS stay alive.
        alive_log_probs, pick = lax.top_k(
            jnp.where(is_eos, _NEG_INF, candidate_log_probs), num_beams
        )  # [B, K]
        alive_parent = jnp.take_along_axis(parent, pick, axis=1)  # [B, K]
        rows = (jnp.arange(batch_size)[:, None] * num_beams + alive_parent).reshape(-1)
        new_state["cache"] = jax.tree.map(lambda leaf: leaf[rows], cache)
        new_state["alive_log_probs"] = alive_log_probs
        new_state["alive_last"] = jnp.take_along_axis(token, pick, axis=1)
        new_state["alive_tokens"] = _gather(candidate_tokens, pick)
        if has_attention:
            new_state["alive_attention"] = _gather(candidate_attention, pick)
            new_state["alive_coverage"] = _gather(candidate_coverage, pick)

        # Best score any live hypothesis could still reach: its log-prob can only fall, and the
        # length penalty is monotone in length, so the best case is at one end of the lengths
        # it may still finish at (i+2 .. limit); with alpha >= 0 that is the limit.
        best_alive = alive_log_probs[:, 0]
        bound = jnp.maximum(
            best_alive / _gnmt_length_penalty(i + 2, length_penalty),
            best_alive / _gnmt_length_penalty(limits, length_penalty),
        )
        nbest_full = new_state["finished_flags"][:, -1]
        cannot_improve = nbest_full & (new_state["finished_scores"][:, -1] >= bound)
        new_state["done"] = state["done"] | ~jnp.isfinite(best_alive) | cannot_improve
        return new_state

    state = lax.while_loop(cond, body, state)
    flags = state["finished_flags"]
    result = {
        "tokens": jnp.where(flags[:, :, None], state["finished_tokens"], PAD_ID),
        "lengths": jnp.where(flags, state["finished_lengths"], 0),
        "scores": state["finished_scores"],
        "log_probs": jnp.where(flags, state["finished_log_probs"], _NEG_INF),
        "attention": None,
    }
    if has_attention:
        result["attention"] = jnp.where(flags[:, :, None, None], state["finished_attention"], 0.0)
    return result


def _gnmt_length_penalty(length, alpha):
    """((5 + |Y|) / 6) ** alpha; exactly 1 when alpha is 0."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _gnmt_coverage_penalty(coverage, source_mask, beta):
    """beta * sum over real source words of log(min(coverage, 1)); coverage [..., S]."""
    log_coverage = jnp.log(jnp.clip(coverage, _MIN_COVERAGE, 1.0))
    return beta * jnp.sum(jnp.where(source_mask, log_coverage, 0.0), axis=-1)


def _force_eos(log_probs, force, eos_id):
    """Masks every token but EOS where `force` ([...] bool, log_probs [..., V]) is set."""
    not_eos = jnp.arange(log_probs.shape[-1]) != eos_id
    return jnp.where(force[..., None] & not_eos, _NEG_INF, log_probs)


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
