"""The loader: a global, seeded batch plan per epoch, materialised and prefetched by Grain.

Batch plan (identical on every process, computed from the seed alone):
  1. survivors = training examples whose lengths fit (source <= max_source_length and <= the
     largest bucket's S; target + 1 <= the largest bucket's T and target <= max_target_length);
     each is assigned the smallest bucket (S, T) with len(source) <= S and len(target) + 1 <= T.
  2. epoch e: permute the survivors with numpy's default_rng(data.shuffle_seed + e), walk that
     order and append each example to its bucket; a bucket emits a batch the moment it holds its
     row count R_b. At the end of the walk each bucket's partial batch is emitted (bucket order),
     padded with filler rows (index -1: all zeros, lengths 0). So every survivor is in exactly one
     batch per epoch and nothing is dropped.
  3. global batch k of bucket b has R_b rows; R_b is a multiple of process_count * batch_multiple
     and process p takes rows [p*R_b/P, (p+1)*R_b/P). All processes therefore see the same
     sequence of bucket shapes (same compiled programs, same step count), and together they see
     each example exactly once per epoch.
The iterator state is {"epoch": e, "batch": k} (k = batches of epoch e already returned):
restoring recomputes epoch e's plan and starts at batch k, so a resumed run gets exactly the
batches an uninterrupted one would have got.

Grain does the per-batch work: `MapDataset.source(plan)[k:].map(materialise)` reads the records
of a batch (tfds array_record data source, or the in-memory task examples), pads them into the
bucket shape, and `to_iter_dataset(ReadOptions(...))` prefetches on threads (or worker processes
with data.worker_count > 0), keeping order deterministic.

Batch dict (numpy; B = local rows of the bucket, S, T = the bucket shape):
  source          int32 [B, S]  source ids, no BOS/EOS, 0-padded
  source_lengths  int32 [B]     0 for filler rows
  target_input    int32 [B, T]  BOS y_1 .. y_n, 0-padded
  target_output   int32 [B, T]  y_1 .. y_n EOS, 0-padded
  target_lengths  int32 [B]     n + 1 (0 for filler rows)
  index           int32 [B]     example index in its split (corpus order), -1 for filler rows
"""

from __future__ import annotations

import logging
import sys
import time

import numpy as np

from s2s_jax.data.errors import DataError
from s2s_jax.vocab import BOS_ID, EOS_ID

log = logging.getLogger(__name__)

_GRAIN = None


def import_grain():
    """Imports grain without dragging in JAX when JAX is not loaded yet.

    grain 0.2.18 imports jax (and orbax.checkpoint, which imports jax) at import time when they
    are installed, only for optional extras: jax pytrees, the jax profiler, the Orbax checkpoint
    handler. The data layer must not pay ~1.5 s and a JAX runtime for that (data-only processes,
    tests, `benchmark --data-only`), so grain is imported with jax/orbax hidden and takes its
    documented no-jax fallbacks. Our iterator state is a plain dict, so the Orbax handler is not
    needed. If jax is already imported (inside the trainer), grain is imported normally.
    """
    global _GRAIN
    if _GRAIN is not None:
        return _GRAIN
    if "grain" in sys.modules or "jax" in sys.modules:
        import grain

        _GRAIN = grain
        return grain
    hidden = ("jax", "jaxlib", "orbax", "orbax.checkpoint")
    saved = {m: sys.modules[m] for m in hidden if m in sys.modules}
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # silence "Failed to load jax profiler"
    try:
        for m in hidden:
            sys.modules[m] = None  # makes `import jax` raise ImportError inside grain
        import grain
    finally:
        for m in hidden:
            del sys.modules[m]
        sys.modules.update(saved)
        absl_logger.setLevel(level)
    _GRAIN = grain
    return grain


# ----------------------------------------------------------------------------------- buckets

def bucket_shapes(d) -> list[tuple[int, int]]:
    """Configured (S, T) shapes, smallest first; T counts the BOS/EOS position."""
    shapes = [tuple(int(x) for x in b) for b in d.buckets] or [(d.max_source_length, d.max_target_length + 1)]
    shapes = sorted(set(shapes), key=lambda st: (st[0] * st[1], st[0], st[1]))
    big = (max(s for s, _ in shapes), max(t for _, t in shapes))
    if big not in shapes:
        raise DataError(f"data.buckets={list(d.buckets)!r}: no bucket is at least as large as all others in "
                        f"both lengths; add the bucket {big} so every example that passes the length "
                        f"filter has a shape to go to")
    if min(t for _, t in shapes) < 2:
        raise DataError(f"data.buckets={list(d.buckets)!r}: a target length must be >= 2 (one token + EOS)")
    return shapes


def assign_buckets(shapes, src_len: np.ndarray, tgt_len: np.ndarray) -> np.ndarray:
    """Index of the smallest bucket holding each example (len(src) <= S, len(tgt)+1 <= T), -1 if none."""
    out = np.full(len(src_len), -1, np.int32)
    for b in range(len(shapes) - 1, -1, -1):  # smallest wins: assign from largest to smallest
        s, t = shapes[b]
        out[(src_len <= s) & (tgt_len + 1 <= t)] = b
    return out


def bucket_rows(d, shapes, granularity: int) -> list[int]:
    """Global rows per bucket: batch_tokens // T rounded down to a multiple of `granularity`
    (= process_count * batch_multiple), or data.batch_size, which must be such a multiple."""
    if d.batch_tokens > 0:
        rows = []
        for s, t in shapes:
            r = (d.batch_tokens // t) // granularity * granularity
            if r == 0:
                log.warning("data.batch_tokens=%d is below one row per device for bucket (%d, %d); "
                            "using %d rows", d.batch_tokens, s, t, granularity)
                r = granularity
            rows.append(r)
        return rows
    if d.batch_size % granularity:
        raise DataError(f"data.batch_size={d.batch_size} is not a multiple of process_count x batch_multiple = "
                        f"{granularity}; set data.batch_size to a multiple of {granularity} (it is the global batch)")
    return [d.batch_size] * len(shapes)


def length_filter(d, shapes, src_len, tgt_len):
    """(keep mask, {reason: count}) for training: over-long pairs are dropped, not fatal."""
    max_s = min(d.max_source_length, max(s for s, _ in shapes))
    max_t = min(d.max_target_length, max(t for _, t in shapes) - 1)
    long_s, long_t = src_len > max_s, tgt_len > max_t
    reasons = {
        f"source_longer_than_{max_s}": int(np.sum(long_s & ~long_t)),
        f"target_longer_than_{max_t}": int(np.sum(long_t & ~long_s)),
        "source_and_target_too_long": int(np.sum(long_s & long_t)),
    }
    return ~(long_s | long_t), reasons


# ----------------------------------------------------------------------------------- plans

def epoch_plan(bucket: np.ndarray, ids: np.ndarray, rows, seed: int, epoch: int):
    """The global batch plan of one epoch: a list of (bucket index, int64 [R_b] example ids,
    -1 = filler row). `ids` are the surviving example indices and `bucket` their buckets."""
    rng = np.random.default_rng(seed + epoch)
    perm = rng.permutation(len(ids))
    order_ids, order_b = ids[perm], bucket[perm]
    full, tail = [], []
    for b, r in enumerate(rows):
        pos = np.nonzero(order_b == b)[0]  # walk positions of bucket b's examples
        n_full = len(pos) // r
        for k in range(n_full):
            chunk = pos[k * r:(k + 1) * r]
            full.append((int(chunk[-1]), b, order_ids[chunk]))  # emitted when its last row arrives
        rest = order_ids[pos[n_full * r:]]
        if len(rest):
            tail.append((b, np.concatenate([rest, np.full(r - len(rest), -1, rest.dtype)])))
    full.sort(key=lambda x: x[0])
    return [(b, i) for _, b, i in full] + tail


def eval_plan(bucket: np.ndarray, rows):
    """Eval batches: bucket by bucket, examples in corpus order, filler rows at the end."""
    plan = []
    for b, r in enumerate(rows):
        ids = np.nonzero(bucket == b)[0]
        for k in range(0, len(ids), r):
            chunk = ids[k:k + r]
            plan.append((b, np.concatenate([chunk, np.full(r - len(chunk), -1, chunk.dtype)])))
    return plan


def local_rows(ids: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """Process p's contiguous 1/P slice of a global batch's rows."""
    n = len(ids) // process_count
    return ids[process_index * n:(process_index + 1) * n]


# ----------------------------------------------------------------------------------- batches

class Materialize:
    """Grain map function: (bucket, example ids) -> padded batch dict (see module doc).

    Over-long examples (possible only in eval splits, which are never filtered) are truncated to
    the bucket: source to S tokens, target to T - 1 tokens.
    """

    def __init__(self, source, shapes):
        self.source = source  # random-access: tfds ArrayRecordDataSource or a list of dicts
        self.shapes = shapes

    def _records(self, ids):
        getitems = getattr(self.source, "__getitems__", None)
        if getitems is not None:
            return getitems(ids)
        return [self.source[i] for i in ids]

    def __call__(self, item):
        b, ids = item
        s_len, t_len = self.shapes[b]
        n = len(ids)
        src = np.zeros((n, s_len), np.int32)
        tin = np.zeros((n, t_len), np.int32)
        tout = np.zeros((n, t_len), np.int32)
        sl = np.zeros((n,), np.int32)
        tl = np.zeros((n,), np.int32)
        ids = np.asarray(ids)
        real_rows = np.nonzero(ids >= 0)[0]  # filler rows (-1) stay all zeros
        records = self._records([int(i) for i in ids[real_rows]]) if len(real_rows) else []
        for row, ex in zip(real_rows, records):
            s = np.asarray(ex["source"])[:s_len]
            y = np.asarray(ex["target"])[:t_len - 1]
            src[row, :len(s)] = s
            tin[row, 0] = BOS_ID
            tin[row, 1:len(y) + 1] = y
            tout[row, :len(y)] = y
            tout[row, len(y)] = EOS_ID
            sl[row] = len(s)
            tl[row] = len(y) + 1
        return {"source": src, "source_lengths": sl, "target_input": tin, "target_output": tout,
                "target_lengths": tl, "index": np.asarray(ids, np.int32)}


def grain_batches(plan, materialize, *, start: int = 0, prefetch: int = 2, worker_count: int = 0):
    """A Grain iterator over `plan[start:]`, materialised (and prefetched) in order."""
    grain = import_grain()
    ds = grain.MapDataset.source(plan)
    if start:
        ds = ds[start:]
    ds = ds.map(materialize)
    if worker_count > 0:
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                         per_worker_buffer_size=max(1, prefetch)))
        # Worker outputs arrive in shared memory; copy them into plain arrays right away so the
        # shared blocks are released now rather than (noisily) at interpreter exit.
        return (_plain(b) for b in it)
    if prefetch <= 0:
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
    # A couple of threads is enough: materialising is numpy + array_record reads (GIL released).
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=min(2, prefetch), prefetch_buffer_size=prefetch)))


def _plain(batch: dict) -> dict:
    out = {k: np.array(v, copy=True) for k, v in batch.items()}
    for v in batch.values():
        unlink = getattr(v, "unlink_on_del", None)
        if callable(unlink):
            unlink()
    return out


class TrainIterator:
    """Infinite iterator over training batches; `get_state()` is a JSON-able dict.

    State {"epoch": e, "batch": k}: k batches of epoch e have been returned. Prefetched but not
    yet returned batches are not counted, so the state is exact.
    """

    def __init__(self, loader, state: dict | None = None):
        self._loader = loader
        state = state or {}
        self.epoch = int(state.get("epoch", 0))
        self.batch = int(state.get("batch", 0))
        self._it = None
        self._epoch_len = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            if self._it is None:
                plan = self._loader.local_epoch_plan(self.epoch)
                self._epoch_len = len(plan)
                if self.batch >= len(plan):  # state saved right at an epoch's end
                    self.epoch, self.batch = self.epoch + 1, 0
                    continue
                self._it = self._loader.iterate(plan, start=self.batch)
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                self.epoch, self.batch = self.epoch + 1, 0
                continue
            self.batch += 1
            return batch

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def set_state(self, state: dict) -> None:
        self.__init__(self._loader, state)


class Loader:
    """Plans and materialises batches of one split for one process (see module doc)."""

    def __init__(self, source, bucket: np.ndarray, ids: np.ndarray, shapes, rows, *, seed: int,
                 process_index: int, process_count: int, prefetch: int, worker_count: int):
        self.source, self.bucket, self.ids = source, bucket, ids
        self.shapes, self.rows = shapes, rows
        self.seed = seed
        self.process_index, self.process_count = process_index, process_count
        self.prefetch, self.worker_count = prefetch, worker_count
        self.materialize = Materialize(source, shapes)

    def global_epoch_plan(self, epoch: int):
        return epoch_plan(self.bucket, self.ids, self.rows, self.seed, epoch)

    def local_epoch_plan(self, epoch: int):
        return [(b, local_rows(i, self.process_index, self.process_count))
                for b, i in self.global_epoch_plan(epoch)]

    def iterate(self, plan, start: int = 0):
        return grain_batches(plan, self.materialize, start=start, prefetch=self.prefetch,
                             worker_count=self.worker_count)


def loader_throughput(config, seconds: float = 10.0, *, windows: int = 5, warmup_batches: int = 3) -> dict:
    """Target tokens per second of the train iterator on `config` (median of `windows` timed
    windows of seconds/windows each), after preparing (timed separately) and a short warm-up.

    Counts real target tokens (sum of target_lengths, i.e. len(y)+1), not padding.
    """
    from s2s_jax.data import build_data  # local: avoid an import cycle

    t0 = time.perf_counter()
    data = build_data(config)
    setup_s = time.perf_counter() - t0
    it = data.train_batches()
    for _ in range(warmup_batches):
        next(it)
    per_window = seconds / windows
    rates, batch_rates, pad_fracs = [], [], []
    for _ in range(windows):
        tokens = batches = padded = 0
        start = time.perf_counter()
        while True:
            b = next(it)
            tokens += int(b["target_lengths"].sum())
            padded += b["target_output"].size
            batches += 1
            elapsed = time.perf_counter() - start
            if elapsed >= per_window:
                break
        rates.append(tokens / elapsed)
        batch_rates.append(batches / elapsed)
        pad_fracs.append(1.0 - tokens / max(1, padded))
    return {
        "target_tokens_per_second": float(np.median(rates)),
        "batches_per_second": float(np.median(batch_rates)),
        "window_tokens_per_second": [float(r) for r in rates],
        "target_padding_fraction": float(np.median(pad_fracs)),
        "setup_seconds": setup_s,
        "train_examples": data.stats["examples"][config.data.train_split],
        "batches_per_epoch": data.stats["train_batches_per_epoch"],
        "buckets": data.stats["buckets"],
        "prefetch": config.data.prefetch,
        "worker_count": config.data.worker_count,
    }
