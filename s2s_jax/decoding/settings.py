"""`SearchSettings`: what search every sentence gets, however it is batched; and the checks of
the sizes the searches take (static Python ints, or `jax.export` symbolic dimensions)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.export
import numpy as np

from s2s_jax.vocab import BOS_ID, EOS_ID  # the one definition of the special ids

STRATEGIES = ("auto", "greedy", "beam")
LENGTH_PENALTIES = ("wu", "avg", "none")
COVERAGE_PENALTIES = ("wu", "summary")
STOP_RULES = ("exact", "current_length")


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """The search of one sentence: the same result whether it is decoded in a plain batch, a
    continuous queue or the server's slot pool.

    max_len: T, the static bound on every output length (EOS included); per-sentence limits
      (`max_lengths`) are clipped to it.
    kernels: the `kernels.KernelSet` whose token selections (`best_token`, `top_extensions`)
      the strategies call (the model's set).
    beam_size: K. nbest: N <= K, the finished hypotheses each sentence returns (beam only).
    length_penalty: GNMT alpha, 0 = off (with length_penalty_type "wu").
    length_penalty_type: how finished hypotheses' log-probs are normalised for ranking (beam
      only): "wu" divides by ((5 + |Y|) / 6) ** alpha, "avg" by |Y| (alpha unused), "none" not.
    coverage_penalty: beta, 0 = off (beam only; needs attention from the step function).
    coverage_penalty_type: "wu" adds beta * sum_i log(min(c_i, 1)) (GNMT), "summary" subtracts
      beta * sum_i (max(c_i, 1) - 1) (OpenNMT-py's, for summaries: penalises attending a source
      word more than once); c_i = attention summed over the hypothesis's steps, real source
      positions only.
    stepwise_penalty: also rank the extensions of each step by log-prob + the coverage penalty
      of the coverage so far, this step included (as OpenNMT-py's -stepwise_penalty), so
      hypotheses that neglect or repeat the source drop out early; finished hypotheses are
      ranked as without it.
    min_length: fewest tokens before EOS (EOS is masked until then; a sentence whose length
      limit comes first still ends with EOS at its limit). Greedy and beam alike.
    block_ngram_repeat: N > 0: an extension that would repeat an N-gram of its hypothesis (BOS
      counted as its first token) gets log-prob -inf, as OpenNMT-py's -block_ngram_repeat;
      N-grams holding a token of `ignore_ids` are never blocked. Greedy and beam alike.
    stop_rule: when a beam-search sentence stops once its n-best is full. "exact": when no live
      hypothesis can beat the n-best's worst at any length it may still finish at (with alpha >
      0 that is its length limit): the search's result is then final. "current_length": when
      none beats it scored at its current length (Hugging Face's early_stopping=False; OpenNMT-py
      stops sooner still, when its best extension ends): fewer steps, and a longer hypothesis
      that would have won may be missed (docs/speed.md measures both).
    strategy: "greedy", "beam", or "auto" (greedy when beam_size is 1, else beam). Beam search
      with K = 1 finds greedy's hypothesis but returns beam's n-best layout.
    bos_id, eos_id: the first input token and the token that ends a hypothesis.
    """

    max_len: Any
    kernels: Any
    beam_size: int = 1
    nbest: int = 1
    length_penalty: float = 0.0
    coverage_penalty: float = 0.0
    strategy: str = "auto"
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    length_penalty_type: str = "wu"
    coverage_penalty_type: str = "wu"
    stepwise_penalty: bool = False
    min_length: int = 0
    block_ngram_repeat: int = 0
    ignore_ids: tuple = ()
    stop_rule: str = "exact"

    def __post_init__(self):
        for name, value, options in (("strategy", self.strategy, STRATEGIES),
                                     ("stop_rule", self.stop_rule, STOP_RULES),
                                     ("length_penalty_type", self.length_penalty_type, LENGTH_PENALTIES),
                                     ("coverage_penalty_type", self.coverage_penalty_type, COVERAGE_PENALTIES)):
            if value not in options:
                raise ValueError(f"{name} must be one of {options}, got {value!r}.")
        for name in ("min_length", "block_ngram_repeat"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be a non-negative Python int (it is static), got {value!r}.")
        if not is_symbolic(self.max_len) and self.min_length >= self.max_len:
            raise ValueError(f"min_length ({self.min_length}) must be below max_len ({self.max_len}): every "
                             "output ends with EOS within max_len tokens.")
        if self.stepwise_penalty and is_zero(self.coverage_penalty):
            raise ValueError("stepwise_penalty applies the coverage penalty at every step; set coverage_penalty > 0.")
        object.__setattr__(self, "ignore_ids", tuple(int(i) for i in self.ignore_ids))
        check_sizes(max_len=self.max_len, beam_size=self.beam_size, nbest=self.nbest)
        if self.strategy == "greedy" and self.beam_size != 1:
            raise ValueError(f"the greedy strategy keeps one hypothesis; beam_size is {self.beam_size}.")

    @property
    def masks_tokens(self) -> bool:
        """Whether a step may ban tokens (min_length, block_ngram_repeat)."""
        return self.min_length > 0 or self.block_ngram_repeat > 0

    @property
    def greedy(self) -> bool:
        """Whether the search is greedy (one hypothesis per sentence, no n-best axis)."""
        return self.strategy == "greedy" or (self.strategy == "auto" and self.beam_size == 1)

    @property
    def num_beams(self) -> int:
        """Rows of decoder state per sentence: 1 for greedy, K for beam search."""
        return 1 if self.greedy else self.beam_size


def default_refill(slots: int) -> int:
    """Most slots refilled in one step when the caller does not say: P // 8, at least 1."""
    return max(1, slots // 8)


def is_symbolic(value) -> bool:
    """A `jax.export` symbolic dimension (e.g. the batch size of an exported program)."""
    return not isinstance(value, (int, np.integer)) and jax.export.is_symbolic_dim(value)


def check_sizes(**sizes) -> None:
    """Each size a positive Python int (or symbolic); nbest <= beam_size when both are given."""
    for name, value in sizes.items():
        if is_symbolic(value):
            continue
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive Python int (it is static), got {value!r}.")
    if not any(is_symbolic(v) for v in sizes.values()) and sizes.get("nbest", 1) > sizes.get("beam_size", 1):
        raise ValueError(
            f"nbest ({sizes['nbest']}) cannot exceed beam_size ({sizes['beam_size']})."
        )


def is_zero(value) -> bool:
    """True for a concrete zero; a traced value is assumed non-zero."""
    try:
        return float(value) == 0.0
    except (TypeError, jax.errors.ConcretizationTypeError):
        return False
