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


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """The search of one sentence: the same result whether it is decoded in a plain batch, a
    continuous queue or the server's slot pool.

    max_len: T, the static bound on every output length (EOS included); per-sentence limits
      (`max_lengths`) are clipped to it.
    kernels: the `kernels.KernelSet` whose token selections (`best_token`, `top_extensions`)
      the strategies call (the model's set).
    beam_size: K. nbest: N <= K, the finished hypotheses each sentence returns (beam only).
    length_penalty: GNMT alpha, 0 = off. coverage_penalty: GNMT beta, 0 = off (beam only;
      needs attention from the step function).
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

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}.")
        check_sizes(max_len=self.max_len, beam_size=self.beam_size, nbest=self.nbest)
        if self.strategy == "greedy" and self.beam_size != 1:
            raise ValueError(f"the greedy strategy keeps one hypothesis; beam_size is {self.beam_size}.")

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
