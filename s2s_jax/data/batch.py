"""The batch: one definition of its fields, which of them the model gets, and how rows are padded.

A batch is a dict of numpy int32 arrays (B = rows, S, T = the bucket shape; T counts one of
BOS/EOS):

  source          [B, S]  source ids, no BOS/EOS, 0-padded                       model input
  source_lengths  [B]     0 for filler rows                                       model input
  target_input    [B, T]  BOS y_1 .. y_n, 0-padded                                model input
  target_output   [B, T]  y_1 .. y_n EOS, 0-padded                                model input
  target_lengths  [B]     n + 1 (0 for filler rows)                               model input
  index           [B]     example index in its split (corpus order), -1 for filler rows

With copy attention (model.copy_attention) two more, also model inputs (COPY_FIELDS):
  source_ext      [B, S]  source ids with each unknown word as V + k (vocab.extended_ids)
  target_ext      [B, T]  target_output with unknown words found in the source as V + k

`index` stays on the host: it maps a row back to its example (evaluation, tests) and never
goes to the device; `model_inputs(batch)` is what the training and evaluation steps (and the
benchmark) are given. Filler rows (index -1) are all zeros.
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np

from s2s_jax.vocab import BOS_ID, EOS_ID


class Batch(TypedDict, total=False):
    source: np.ndarray
    source_lengths: np.ndarray
    target_input: np.ndarray
    target_output: np.ndarray
    target_lengths: np.ndarray
    index: np.ndarray
    source_ext: np.ndarray  # copy attention only
    target_ext: np.ndarray  # copy attention only


COPY_FIELDS = ("source_ext", "target_ext")  # model inputs too, in batches of copy-attention runs
FIELDS = tuple(k for k in Batch.__annotations__ if k not in COPY_FIELDS)  # in every batch
MODEL_FIELDS = ("source", "source_lengths", "target_input", "target_output", "target_lengths")


def model_inputs(batch) -> dict:
    """The fields the model's steps take (MODEL_FIELDS, + COPY_FIELDS when the batch has them):
    `index` stays on the host."""
    return {k: batch[k] for k in MODEL_FIELDS + COPY_FIELDS if k in batch}


def pad_rows(rows, index, shape, extended=None) -> Batch:
    """A padded batch of bucket `shape` (S, T) from `rows`: (source ids, target ids) of the real
    rows, no BOS/EOS, in the order of `index`'s non-negative entries (`index` -1 = a filler row).
    Sequences longer than the bucket are truncated to it: source to S, target to T - 1 tokens.
    extended: (source_ext, target_ext) of the real rows (copy attention): adds COPY_FIELDS."""
    s_len, t_len = shape
    index = np.asarray(index)
    n = len(index)
    src = np.zeros((n, s_len), np.int32)
    tin = np.zeros((n, t_len), np.int32)
    tout = np.zeros((n, t_len), np.int32)
    sl = np.zeros((n,), np.int32)
    tl = np.zeros((n,), np.int32)
    for row, (s, y) in zip(np.nonzero(index >= 0)[0], rows):
        s = np.asarray(s)[:s_len]
        y = np.asarray(y)[:t_len - 1]
        src[row, :len(s)] = s
        tin[row, 0] = BOS_ID
        tin[row, 1:len(y) + 1] = y
        tout[row, :len(y)] = y
        tout[row, len(y)] = EOS_ID
        sl[row] = len(s)
        tl[row] = len(y) + 1
    batch = {"source": src, "source_lengths": sl, "target_input": tin, "target_output": tout,
             "target_lengths": tl, "index": np.asarray(index, np.int32)}
    if extended is not None:
        ext = pad_rows(extended, index, shape)
        batch["source_ext"], batch["target_ext"] = ext["source"], ext["target_output"]
    return batch
