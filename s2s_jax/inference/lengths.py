"""Length rules shared by the in-process Translator and the export-bundle runtime (no jax here)."""

from __future__ import annotations

import math

import numpy as np

LENGTH_MULTIPLE = 16  # source lengths are padded to a multiple of this: few compiled shapes


def round_up(n: int, m: int = LENGTH_MULTIPLE) -> int:
    """n rounded up to a multiple of m (at least m)."""
    return max(m, -(-int(n) // m) * m)


def output_ids(tokens, length) -> list[int]:
    """One decoded hypothesis as token ids: tokens[:length] without its final EOS (the decoders
    count the EOS in `length`; a hypothesis cut by the length limit has none)."""
    from s2s_jax.vocab import EOS_ID

    seq = [int(t) for t in tokens[:int(length)]]
    return seq[:-1] if seq and seq[-1] == EOS_ID else seq


def max_output_length(max_len_a: float, max_len_b: float, source_len):
    """Most output tokens (EOS included) for a source of `source_len` tokens (int or array):
    floor(a * source_len + b), at least 1."""
    if np.ndim(source_len) == 0:
        return max(1, int(math.floor(max_len_a * int(source_len) + max_len_b)))
    return np.maximum(1, np.floor(max_len_a * np.asarray(source_len) + max_len_b).astype(np.int64))
