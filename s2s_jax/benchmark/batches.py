"""The benchmark's synthetic batches, made by the data layer's own rules.

Lengths: the word counts of `{data.dir}/tok/train.{src,tgt}` (or `{data.dir}/train.*`) when that
corpus is there, else a seeded log-normal fitted to Multi30k's tokenised lengths (the same
numbers on every machine; `lengths_source` in the record says which). From the lengths the
loader's functions (`s2s_jax.data.pipeline`) give the buckets (data.buckets, or the automatic
ones chosen from these lengths), the length filter, each pair's bucket and the rows per bucket
(data.batch_size, or data.batch_tokens // max(S, T + 1) rounded down to a multiple of the
devices x train.grad_accum, as training on one process rounds). Ids are uniform random regular
ids of the vocabulary (`vocab.SPECIALS` come first); the rows are padded by the batch
definition (`data.batch.pad_rows`: BOS, EOS, padding), and the benchmark steps get its model
inputs (`data.batch.model_inputs`). A fixed list of batches is drawn with the buckets'
frequencies (in batches: a bucket's share of the sentences over its rows per batch).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from s2s_jax.data.batch import model_inputs, pad_rows
from s2s_jax.data.pipeline import bucket_rows as loader_rows
from s2s_jax.data.pipeline import survivors, train_shapes
from s2s_jax.vocab import SPECIALS

FIRST_REGULAR_ID = len(SPECIALS)  # ids below are PAD, BOS, EOS, UNK


def corpus_lengths(config, rng: np.random.Generator, n: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """(source lengths, target lengths without EOS) in tokens: the corpus's words, or the fit."""
    return _lengths(config, rng, n)[:2]


def _lengths(config, rng: np.random.Generator, n: int = 20_000):
    """(source lengths, target lengths without EOS, where they came from)."""
    d = config.data
    base = Path(d.dir) if d.dir else None
    for folder in ([base / "tok", base] if base else []):
        src, tgt = folder / f"train.{d.src_lang}", folder / f"train.{d.tgt_lang}"
        if src.is_file() and tgt.is_file():
            with open(src, encoding="utf-8") as f:
                s = np.array([len(line.split()) for line in f])
            with open(tgt, encoding="utf-8") as f:
                t = np.array([len(line.split()) for line in f])
            return s, t, f"corpus:{folder}"
    # Multi30k (tok) fit: mean 13.0 / 13.4 (target with EOS), sd ≈ 4.5.
    s = np.maximum(1, np.round(rng.lognormal(np.log(12.3), 0.33, n))).astype(int)
    t = np.maximum(2, np.round(s * rng.lognormal(0.0, 0.15, n) + 0.5)).astype(int) - 1
    return s, t, "lognormal-fit-multi30k"


def lengths_source(config) -> str:
    return _lengths(config, np.random.default_rng(0), 10)[2]


def bucket_shapes(config) -> list[tuple[int, int]]:
    """The buckets (S, T) the benchmark's batches have: the loader's for these lengths."""
    src_len, tgt_len, _ = _lengths(config, np.random.default_rng(0))
    return train_shapes(config.data, src_len, tgt_len)


def bucket_rows(config, devices: int = 1) -> list[int]:
    """Rows per batch for each bucket, the loader's rule for `devices` devices of one process."""
    return loader_rows(config.data, bucket_shapes(config), devices * config.train.grad_accum)


def make_batches(config, count: int, seed: int = 0, *, devices: int = 1) -> list[dict[str, np.ndarray]]:
    """`count` padded batches (model inputs; bucket_rows(config, devices) rows each), drawn by
    bucket frequency."""
    d = config.data
    rng = np.random.default_rng(seed)
    src_len, tgt_len, _ = _lengths(config, rng)
    shapes = train_shapes(d, src_len, tgt_len)
    rows_of = loader_rows(d, shapes, devices * config.train.grad_accum)
    ids, bucket, _ = survivors(d, shapes, src_len, tgt_len)
    bucket_of = np.full(len(src_len), -1)
    bucket_of[ids] = bucket
    # batches per bucket ∝ its sentences / its rows per batch (= sentence frequency at a fixed size)
    freq = np.array([np.mean(bucket_of == i) / rows_of[i] for i in range(len(shapes))])
    # largest-remainder allocation, every bucket at least once (all shapes get compiled and timed)
    counts = np.maximum(1, np.floor(freq / freq.sum() * count)).astype(int)
    while counts.sum() < count:
        counts[np.argmax(freq / freq.sum() * count - counts)] += 1
    batches = []
    for i, n in enumerate(counts):
        members = np.flatnonzero(bucket_of == i)
        for _ in range(n):
            batches.append(_random_batch(rng, members, src_len, tgt_len, shapes[i], rows_of[i], d.vocab_size))
    order = rng.permutation(len(batches))
    return [batches[j] for j in order]


def _random_batch(rng, members, src_len, tgt_len, shape, rows: int, vocab: int) -> dict[str, np.ndarray]:
    """One batch of `rows` pairs drawn from `members`, with their lengths and random ids."""
    S, T = shape
    chosen = rng.choice(members, rows, replace=len(members) < rows)
    src = rng.integers(FIRST_REGULAR_ID, vocab, (rows, S), dtype=np.int32)
    tgt = rng.integers(FIRST_REGULAR_ID, vocab, (rows, T), dtype=np.int32)  # y = columns 1..len
    # One more column, as the benchmark drew before its batches were padded by pad_rows: it keeps
    # the generator's stream, so the rows chosen for later batches (the lengths timed) stay those
    # of the earlier records.
    rng.integers(FIRST_REGULAR_ID, vocab, (rows, 1), dtype=np.int32)
    pairs = ((src[r, :src_len[k]], tgt[r, 1:tgt_len[k] + 1]) for r, k in enumerate(chosen))
    return model_inputs(pad_rows(pairs, chosen, shape))
