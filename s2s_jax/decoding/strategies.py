"""Greedy and beam search as per-slot strategies, built from one `SearchSettings` (`make_strategy`).

A strategy says how one slot's search starts (`fresh`), takes one step given the step
function's logits (`advance`) and reads out (`result`); the engine (`engine.py`) runs it over a
pool of slots. Shapes: n (or B) slots, K beams, C = 2K candidates, N n-best, T = max_len, V
vocabulary, S source positions.

Greedy picks the most probable next token; beam search keeps the K most probable live
hypotheses and the N best finished ones, ranked with GNMT length and coverage penalties (Wu et
al. 2016, eq. 14):

    score = log_prob / ((5 + |Y|) / 6) ** length_penalty
            + coverage_penalty * sum_{i < source_length} log(min(sum_j attention_ij, 1))

where |Y| counts the EOS and j runs over all target steps, EOS included. A step extends every
live hypothesis by every token, keeps the 2K most probable extensions, moves those that end in
EOS *and rank among the top K* to the finished set (as fairseq and OpenNMT-py do; this is what
makes K=1 identical to greedy search), and keeps the K most probable of the rest alive. A
sentence stops when no live hypothesis remains, or when its N finished slots are full and no
live hypothesis can beat the worst of them even at its most favourable length (log-probs only
fall as a hypothesis grows and the coverage penalty is never positive, so the bound is safe).

The token selections are the settings' kernel set's `best_token` and `top_extensions`
(`kernels/topk.py`: the cpu set takes chunk maxima first, the portable set the plain top_k /
argmax; the same result, ties included); log-probs over [rows, V] are never stored.

Controls (`SearchSettings`): `length_penalty_type` "avg" divides by |Y| instead, "none" not at
all; `coverage_penalty_type` "summary" adds -beta * sum_i (max(c_i, 1) - 1) instead;
`stepwise_penalty` also ranks each step's extensions by log-prob + the coverage penalty of the
coverage so far; `min_length` and `block_ngram_repeat` ban tokens (log-prob -inf after the
softmax, through the selections' `banned` positions) in greedy and beam search alike.

The logits' last axis need not be the vocabulary: `advance` takes `vocab_ids` [W] int32 (the
vocabulary id of each logit position, sorted ascending, with the special ids 0..3 at their own
positions: a shortlist), and maps the selected positions to vocabulary ids at once, so search
states hold vocabulary ids; None means position = id (any width W: e.g. V + k extended ids of a
copy distribution). The token bans are computed in id space and mapped to positions.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax import lax

from s2s_jax.decoding.settings import SearchSettings, is_zero
from s2s_jax.decoding.state import BeamState, GreedyState
from s2s_jax.kernels import topk
from s2s_jax.vocab import PAD_ID

NEG_INF = topk.NEG_INF
# Coverage below this is treated as this, so an unattended source word costs a large but finite
# penalty (log(1e-10) ~ -23) instead of -inf, which would also make the hypothesis unrankable.
MIN_COVERAGE = 1e-10


class Strategy(Protocol):
    """The per-slot part of a search (greedy or beam): how to start, advance and read out."""

    num_beams: int  # K: rows of decoder state per slot
    source_len: int | None  # S: attention width of the step function; None: it gives no attention

    def fresh(self, n: int):
        """Search state of n new slots (every leaf has leading dim n)."""

    def advance(self, search, logits, attention, limits, source_mask, vocab_ids=None):
        """One step: logits [n*K, W], attention [n*K, S] or None, limits [n], source_mask
        [n, 1, S] or None, vocab_ids [W] int32 or None (position = id) -> (search, parent [n, K]
        int (rows to follow) or None, stopped [n] bool)."""

    def result(self, search) -> dict:
        """Per-slot results (leading dim n) in the searches' output layout (see `search`)."""


def make_strategy(settings: SearchSettings, *, vocab_size: int, source_len: int | None) -> Strategy:
    """The strategy `settings` asks for; source_len S is None when the step function gives no attention."""
    if settings.greedy:
        return Greedy(settings, source_len)
    return Beam(settings, vocab_size, source_len)


class Greedy:
    """Greedy search: each step takes the most probable token (the forced EOS at the limit)."""

    num_beams = 1

    def __init__(self, settings: SearchSettings, source_len: int | None):
        self.settings, self.source_len = settings, source_len

    def fresh(self, n) -> GreedyState:
        T = self.settings.max_len
        attention = None if self.source_len is None else jnp.zeros((n, T, self.source_len), jnp.float32)
        return GreedyState(
            last=jnp.full((n, 1), self.settings.bos_id, jnp.int32),
            step=jnp.zeros((n,), jnp.int32),
            tokens=jnp.full((n, T), PAD_ID, jnp.int32),
            lengths=jnp.zeros((n,), jnp.int32),
            scores=jnp.zeros((n,), jnp.float32),
            finished=jnp.zeros((n,), bool),
            attention=attention,
        )

    def advance(self, search: GreedyState, logits, attention, limits, source_mask, vocab_ids=None):
        eos_id = self.settings.eos_id
        step = search.step  # [B]
        force = step >= limits - 1
        banned = banned_positions(self.settings, search.tokens, step, force, vocab_ids, logits.shape[-1])
        token, token_log_prob = self.settings.kernels.best_token(logits, force, eos_id, banned=banned)  # [B], [B]
        token = to_vocab_ids(token, vocab_ids)
        live = ~search.finished
        token = jnp.where(live, token, PAD_ID)
        at_step = jnp.arange(self.settings.max_len)[None, :] == step[:, None]  # [B, T]
        new_attention = None
        if attention is not None:
            step_attention = jnp.where(live[:, None], attention.astype(jnp.float32), 0.0)
            new_attention = jnp.where(at_step[:, :, None], step_attention[:, None, :], search.attention)
        new = GreedyState(
            last=token[:, None],
            step=step + 1,
            tokens=jnp.where(at_step, token[:, None], search.tokens),
            lengths=search.lengths + live.astype(jnp.int32),
            scores=search.scores + jnp.where(live, token_log_prob, 0.0),
            finished=search.finished | (token == eos_id),
            attention=new_attention,
        )
        return new, None, new.finished

    def result(self, search: GreedyState) -> dict:
        return {"tokens": search.tokens, "lengths": search.lengths, "scores": search.scores,
                "attention": search.attention}


class _Candidates(NamedTuple):
    """The C best one-token extensions of a step (leading dims [B, C])."""

    log_probs: jax.Array  # [B, C] raw log-prob of the longer prefix
    parent: jax.Array  # [B, C] the beam each extends
    token: jax.Array  # [B, C] int32, the token added
    step_attention: jax.Array | None  # [B, C, S] this step's attention of each (its parent's row)
    coverage: jax.Array | None  # [B, C, S]
    ranking: jax.Array  # [B, C] what the beam keeps the best of: log_probs (+ the stepwise penalty)


class Beam:
    """Beam search with GNMT length and coverage penalties (see the module docstring)."""

    def __init__(self, settings: SearchSettings, vocab_size: int, source_len: int | None):
        if source_len is None and not is_zero(settings.coverage_penalty):
            raise ValueError(
                "coverage_penalty needs attention weights, but the step function returns None for "
                "them; set coverage_penalty to 0."
            )
        self.settings, self.vocab_size, self.source_len = settings, vocab_size, source_len
        self.num_beams, self.num_best = settings.beam_size, settings.nbest
        # Keeping 2K candidates leaves K non-EOS ones even if K of them end in EOS.
        self.num_candidates = min(2 * settings.beam_size, settings.beam_size * vocab_size)

    def fresh(self, n) -> BeamState:
        K, N, T, S = self.num_beams, self.num_best, self.settings.max_len, self.source_len
        has_attention = S is not None
        return BeamState(
            step=jnp.zeros((n,), jnp.int32),
            last=jnp.full((n, K), self.settings.bos_id, jnp.int32),
            alive_tokens=jnp.full((n, K, T), PAD_ID, jnp.int32),
            # Only beam 0 is live at first, so the first step cannot fill the beam with K copies
            # of the same hypothesis.
            alive_log_probs=jnp.tile(jnp.where(jnp.arange(K) == 0, 0.0, NEG_INF).astype(jnp.float32), (n, 1)),
            finished_tokens=jnp.full((n, N, T), PAD_ID, jnp.int32),
            finished_lengths=jnp.zeros((n, N), jnp.int32),
            finished_scores=jnp.full((n, N), NEG_INF, jnp.float32),
            finished_log_probs=jnp.full((n, N), NEG_INF, jnp.float32),
            finished_flags=jnp.zeros((n, N), bool),
            done=jnp.zeros((n,), bool),
            alive_attention=jnp.zeros((n, K, T, S), jnp.float32) if has_attention else None,
            alive_coverage=jnp.zeros((n, K, S), jnp.float32) if has_attention else None,
            finished_attention=jnp.zeros((n, N, T, S), jnp.float32) if has_attention else None,
        )

    def advance(self, state: BeamState, logits, attention, limits, source_mask, vocab_ids=None):
        step = state.step  # [B]
        candidates = self._extend(state, logits, attention, limits, source_mask, vocab_ids)
        finished = self._finish(state, candidates, source_mask)
        alive_log_probs, alive_parent, alive = self._keep_alive(state, candidates)
        done = self._stop(state, alive_log_probs, finished, limits)
        new_state = BeamState(step=step + 1, **finished, **alive, done=done)
        return new_state, alive_parent, done

    def _extend(self, state: BeamState, logits, attention, limits, source_mask, vocab_ids) -> _Candidates:
        """Every (parent beam, next token) extension, by the raw log-prob of the longer prefix
        (with stepwise_penalty: ranked by it plus the parent's coverage penalty): the C best of
        them with their prefixes (and attention, coverage)."""
        K, T, settings = self.num_beams, self.settings.max_len, self.settings
        step = state.step
        batch_size, width = step.shape[0], logits.shape[-1]
        if width != self.vocab_size:
            raise ValueError(f"the step function's logits have {width} positions, but the search was made for "
                             f"{self.vocab_size} (make_strategy's vocab_size; output_sizes)")
        force = step >= limits - 1
        step_attention = None if self.source_len is None else attention.astype(jnp.float32).reshape(batch_size, K, -1)
        alive, step_penalty = state.alive_log_probs, None
        if settings.stepwise_penalty:  # [B, K]: the penalty of each parent's coverage, this step included
            step_penalty = self._coverage_penalty(state.alive_coverage + step_attention, source_mask)
            alive = alive + step_penalty
        banned = banned_positions(settings, state.alive_tokens.reshape(batch_size * K, T), jnp.repeat(step, K),
                                  jnp.repeat(force, K), vocab_ids, width)
        log_probs, flat_index = settings.kernels.top_extensions(
            alive, logits.reshape(batch_size, K, width), force, settings.eos_id, self.num_candidates,
            banned=None if banned is None else banned.reshape(batch_size, K, -1),
        )  # [B, C]
        parent = flat_index // width  # [B, C]
        token = to_vocab_ids((flat_index % width).astype(jnp.int32), vocab_ids)  # [B, C]
        ranking = log_probs
        if step_penalty is not None:
            log_probs = log_probs - jnp.take_along_axis(step_penalty, parent, axis=1)
        coverage = None
        if self.source_len is not None:
            step_attention = gather_beams(step_attention, parent)  # [B, C, S]
            coverage = gather_beams(state.alive_coverage, parent) + step_attention
        return _Candidates(log_probs, parent, token, step_attention, coverage, ranking)

    def _prefixes(self, state: BeamState, candidates: _Candidates, index):
        """The whole prefixes of the candidates index [B, M] -> (tokens [B, M, T], attention
        [B, M, T, S] or None). Built only for the M candidates kept (K alive, N finished), never
        for all C."""
        at_step = jnp.arange(self.settings.max_len)[None, None, :] == state.step[:, None, None]  # [B, 1, T]
        parent = jnp.take_along_axis(candidates.parent, index, axis=1)
        token = jnp.take_along_axis(candidates.token, index, axis=1)
        tokens = jnp.where(at_step, token[:, :, None], gather_beams(state.alive_tokens, parent))
        if self.source_len is None:
            return tokens, None
        step_attention = gather_beams(candidates.step_attention, index)
        attention = jnp.where(at_step[..., None], step_attention[:, :, None, :], gather_beams(state.alive_attention, parent))
        return tokens, attention

    def _coverage_penalty(self, coverage, source_mask):
        settings = self.settings
        return coverage_penalty(coverage, source_mask, settings.coverage_penalty, settings.coverage_penalty_type)

    def _length_penalty(self, length):
        return length_penalty(length, self.settings.length_penalty, self.settings.length_penalty_type)

    def _finish(self, state: BeamState, candidates: _Candidates, source_mask) -> dict:
        """The n-best merged with the candidates that finish now -> BeamState's finished_* fields.

        Finished candidates: EOS within the top K, a real (finite) hypothesis, and a sentence
        that has not stopped (a stopped sentence's n-best is final). Valid entries sort before
        empty ones because empty ones have score -inf, so finished_flags stays sorted too."""
        step, token = state.step, candidates.token
        newly_finished = (
            (token == self.settings.eos_id)
            & (jnp.arange(self.num_candidates) < self.num_beams)[None, :]
            & jnp.isfinite(candidates.log_probs)
            & ~state.done[:, None]
        )
        scores = candidates.log_probs / self._length_penalty(step + 1)[:, None]
        if self.source_len is not None:
            scores = scores + self._coverage_penalty(candidates.coverage, source_mask)
        scores = jnp.where(newly_finished, scores, NEG_INF)
        merged_flags = jnp.concatenate([state.finished_flags, newly_finished], axis=1)
        merged_scores = jnp.concatenate([state.finished_scores, scores], axis=1)
        _, keep = lax.top_k(jnp.where(merged_flags, merged_scores, NEG_INF), self.num_best)
        lengths = jnp.broadcast_to((step + 1)[:, None], token.shape).astype(jnp.int32)
        merged = {
            "finished_lengths": (state.finished_lengths, lengths),
            "finished_scores": (state.finished_scores, scores),
            "finished_log_probs": (state.finished_log_probs, candidates.log_probs),
            "finished_flags": (state.finished_flags, newly_finished),
        }
        finished = {name: _merge(old, new, keep) for name, (old, new) in merged.items()}
        # Prefixes (tokens, attention) of only the kept entries: an old one, or a candidate's built now.
        N = self.num_best
        is_new = keep >= N
        tokens, attention = self._prefixes(state, candidates, jnp.clip(keep - N, 0, self.num_candidates - 1))
        old = jnp.minimum(keep, N - 1)
        finished["finished_tokens"] = jnp.where(is_new[..., None], tokens, gather_beams(state.finished_tokens, old))
        finished["finished_attention"] = None if attention is None else jnp.where(
            is_new[..., None, None], attention, gather_beams(state.finished_attention, old))
        return finished

    def _keep_alive(self, state: BeamState, candidates: _Candidates):
        """The K most probable candidates without EOS stay alive -> (alive_log_probs [B, K],
        their parents [B, K], BeamState's other alive fields)."""
        is_eos = candidates.token == self.settings.eos_id
        alive_log_probs, pick = lax.top_k(jnp.where(is_eos, NEG_INF, candidates.ranking), self.num_beams)
        if candidates.ranking is not candidates.log_probs:  # stepwise penalty: keep the raw sums
            alive_log_probs = jnp.where(jnp.isfinite(alive_log_probs),
                                        jnp.take_along_axis(candidates.log_probs, pick, axis=1), NEG_INF)
        tokens, attention = self._prefixes(state, candidates, pick)
        alive = {
            "alive_log_probs": alive_log_probs,
            "last": jnp.take_along_axis(candidates.token, pick, axis=1),
            "alive_tokens": tokens,
            "alive_attention": attention,
            "alive_coverage": _gather_optional(candidates.coverage, pick),
        }
        return alive_log_probs, jnp.take_along_axis(candidates.parent, pick, axis=1), alive

    def _stop(self, state: BeamState, alive_log_probs, finished: dict, limits):
        """done [B]: no live hypothesis left, or a full n-best that no live one can beat.

        Best score a live hypothesis could still reach: its log-prob can only fall, and the
        length penalty is monotone in length, so the best case is at one end of the lengths it
        may still finish at (step+2 .. limit); with alpha >= 0 that is the limit. (min_length
        only narrows those lengths, and every coverage penalty is <= 0, so the bound holds.)
        stop_rule "current_length" takes the first end only (SearchSettings)."""
        best_alive = jnp.max(alive_log_probs, axis=1)  # (sorted by the stepwise ranking, not by it)
        bound = best_alive / self._length_penalty(state.step + 2)
        if self.settings.stop_rule == "exact":
            bound = jnp.maximum(bound, best_alive / self._length_penalty(limits))
        nbest_full = finished["finished_flags"][:, -1]
        cannot_improve = nbest_full & (finished["finished_scores"][:, -1] >= bound)
        return state.done | ~jnp.isfinite(best_alive) | cannot_improve

    def result(self, state: BeamState) -> dict:
        flags = state.finished_flags
        attention = None
        if self.source_len is not None:
            attention = jnp.where(flags[:, :, None, None], state.finished_attention, 0.0)
        return {
            "tokens": jnp.where(flags[:, :, None], state.finished_tokens, PAD_ID),
            "lengths": jnp.where(flags, state.finished_lengths, 0),
            "scores": state.finished_scores,
            "log_probs": jnp.where(flags, state.finished_log_probs, NEG_INF),
            "attention": attention,
        }


def gnmt_length_penalty(length, alpha):
    """((5 + |Y|) / 6) ** alpha; exactly 1 when alpha is 0."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def length_penalty(length, alpha, kind: str = "wu"):
    """What a finished hypothesis's log-prob is divided by: "wu" GNMT's ((5 + |Y|) / 6) ** alpha,
    "avg" |Y|, "none" 1."""
    if kind == "avg":
        return jnp.asarray(length, jnp.float32)
    if kind == "none":
        return jnp.ones_like(jnp.asarray(length, jnp.float32))
    return gnmt_length_penalty(length, alpha)


def gnmt_coverage_penalty(coverage, source_mask, beta):
    """beta * sum over real source words of log(min(coverage, 1)); coverage [..., S]."""
    log_coverage = jnp.log(jnp.clip(coverage, MIN_COVERAGE, 1.0))
    return beta * jnp.sum(jnp.where(source_mask, log_coverage, 0.0), axis=-1)


def coverage_penalty(coverage, source_mask, beta, kind: str = "wu"):
    """The coverage term added to a hypothesis's score (<= 0 for beta >= 0): "wu" as
    `gnmt_coverage_penalty`; "summary" -beta * sum over real source words of (max(coverage, 1) - 1)."""
    if kind == "summary":
        return -beta * jnp.sum(jnp.where(source_mask, jnp.maximum(coverage, 1.0) - 1.0, 0.0), axis=-1)
    return gnmt_coverage_penalty(coverage, source_mask, beta)


def to_vocab_ids(position, vocab_ids):
    """Selected logit positions -> vocabulary ids (vocab_ids [W], or None: the same)."""
    return position if vocab_ids is None else jnp.asarray(vocab_ids, jnp.int32)[position]


def positions_of(ids, vocab_ids, width: int):
    """Vocabulary ids (-1: none) -> positions in the logits' last axis (width: not there / none).
    vocab_ids [W]: ascending ids, then -1 padding (`shortlist.padded_ids`); None: position = id."""
    if vocab_ids is None:
        return jnp.where((ids >= 0) & (ids < width), ids, width)
    vocab_ids = jnp.asarray(vocab_ids, jnp.int32)
    ascending = jnp.where(vocab_ids < 0, jnp.iinfo(jnp.int32).max, vocab_ids)  # padding sorts last
    at = jnp.minimum(jnp.searchsorted(ascending, ids), vocab_ids.shape[0] - 1)
    return jnp.where((ids >= 0) & (vocab_ids[at] == ids), at, width).astype(jnp.int32)


def banned_positions(settings: SearchSettings, history, step, force, vocab_ids, width: int):
    """The logit positions each row may not take this step -> [R, M] int32 (width: none), or
    None when nothing is ever banned. history [R, T]: the row's tokens so far (vocabulary ids),
    step [R]: how many, force [R]: only EOS allowed (the length limit wins over min_length)."""
    if not settings.masks_tokens:
        return None
    banned = []
    if settings.min_length:
        early = (step < settings.min_length) & ~force
        banned.append(jnp.where(early, settings.eos_id, -1)[:, None])
    if settings.block_ngram_repeat:
        banned.append(ngram_repeats(history, step, settings.block_ngram_repeat, settings.ignore_ids, settings.bos_id))
    return positions_of(jnp.concatenate(banned, axis=1).astype(jnp.int32), vocab_ids, width)


def ngram_repeats(history, step, n: int, ignore_ids, bos_id):
    """Tokens that would repeat an n-gram -> [R, J] ids (-1: none), as OpenNMT-py blocks them.

    The sequence is BOS + history[:step]; token w is banned when (its last n-1 tokens, w) is
    an n-gram that already occurs in it and holds no token of ignore_ids."""
    R, T = history.shape
    sequence = jnp.concatenate([jnp.full((R, 1), bos_id, history.dtype), history], axis=1)  # [R, T+1]
    J = T + 2 - n  # n-gram starts 0 .. T+1-n
    if J <= 0:
        return jnp.full((R, 1), -1, jnp.int32)
    windows = jnp.stack([sequence[:, m:m + J] for m in range(n)], axis=-1)  # [R, J, n]
    length = step + 1  # [R] tokens in the sequence
    suffix = jnp.take_along_axis(sequence, jnp.clip(length[:, None] - (n - 1) + jnp.arange(n - 1), 0, T), axis=1)
    repeats = jnp.all(windows[:, :, :n - 1] == suffix[:, None, :], axis=-1)  # [R, J]
    repeats &= jnp.arange(J)[None, :] <= (length - n)[:, None]  # the n-gram lies within the sequence
    if ignore_ids:
        repeats &= ~jnp.any(jnp.isin(windows, jnp.asarray(ignore_ids, windows.dtype)), axis=-1)
    return jnp.where(repeats, windows[:, :, n - 1], -1).astype(jnp.int32)


def gather_beams(values, index):
    """values [B, K, ...], index [B, C] int -> [B, C, ...]: per-sentence beam selection."""
    return jax.vmap(_take_rows)(values, index)


def _take_rows(row, row_index):
    return row[row_index]


def _gather_optional(values, index):
    return None if values is None else gather_beams(values, index)


def _merge(old, new, keep):
    """The n-best [B, N, ...] and the candidates [B, C, ...] -> the kept entries [B, N, ...]
    (None stays None: no attention)."""
    if old is None:
        return None
    return gather_beams(jnp.concatenate([old, new], axis=1), keep)
