"""The loader: a global, seeded batch plan per epoch, materialised and prefetched by Grain.

Batch plan (identical on every process, computed from the seed alone):
  1. survivors = training examples whose lengths fit (source <= max_source_length and <= the
     largest bucket's S; target + 1 <= the largest bucket's T and target <= max_target_length);
     each is assigned the cheapest bucket (S, T) with len(source) <= S and len(target) + 1 <= T
     (bucket_cost). The buckets are data.buckets, or (empty) at most data.max_buckets shapes
     chosen from the survivors' lengths (auto_buckets; deterministic given the data).
  2. rows: bucket b's batches have R_b rows, data.batch_size or, with data.batch_tokens, the
     most rows whose tokens (batch_token_count: R x max(S, T + 1), OpenNMT-py's tokens rule)
     fit, rounded down to a multiple of process_count * batch_multiple.
  3. epoch e: permute the survivors with numpy's default_rng(data.shuffle_seed + e) and walk
     that order. Without pools (data.pool_batches = 0) each example is appended to its bucket,
     which emits a batch the moment it holds R_b rows. With pools, the walk is cut into pools of
     data.pool_batches batches' worth of examples; in each pool every bucket takes its examples
     (after those left over from the previous pool), sorts as many as fill whole batches by
     (target, source) length, cuts them into batches and keeps the latest arrivals for the next
     pool; the pool's batches are then emitted in a random order (the same generator), so a
     batch holds sentences of similar length (OpenNMT-py's pooled batching). At the end of the
     walk each bucket's partial batch is emitted (bucket order), padded with filler rows
     (index -1: all zeros, lengths 0); with pools, a bucket's leftovers first move up to the
     next bucket that holds them all, so only the last of such a chain has filler rows. So
     every survivor is in exactly one batch per epoch and nothing is dropped.
  4. global batch k of bucket b has R_b rows; R_b is a multiple of process_count * batch_multiple
     and process p takes rows [p*R_b/P, (p+1)*R_b/P). All processes therefore see the same
     sequence of bucket shapes (same compiled programs, same step count), and together they see
     each example exactly once per epoch.
The iterator state is {"epoch": e, "batch": k} (k = batches of epoch e already returned; with
auto buckets also "buckets": the shapes): restoring recomputes epoch e's plan and starts at
batch k, so a resumed run gets exactly the batches an uninterrupted one would have got (with
auto buckets, on the saved shapes).

Grain does the per-batch work: `MapDataset.source(plan)[k:].map(materialise)` reads the records
of a batch (tfds array_record data source, or the in-memory task examples), pads them into the
bucket shape, and `to_iter_dataset(ReadOptions(...))` prefetches on threads (or worker processes
with data.worker_count > 0), keeping order deterministic.

Batches are the dicts of `batch.py` (one definition of the fields and of which the model gets).
"""

from __future__ import annotations

import logging
import sys
import threading

import numpy as np

from s2s_jax.data.batch import Batch, pad_rows
from s2s_jax.data.errors import DataError
from s2s_jax.data.text import as_text
from s2s_jax.vocab import extended_ids

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

# Auto buckets (data.buckets empty) have lengths that are multiples of this. On XLA:CPU the
# padding a coarser grid adds costs more than it saves (measured on Multi30k, docs/data.md);
# the number of shapes (compiled programs) is bounded by data.max_buckets, not by this.
AUTO_BUCKET_MULTIPLE = 2
# Candidate lengths per side considered by auto_buckets (quantiles of the rounded lengths
# when a corpus has more distinct lengths), which bounds its cost on long-tailed corpora.
_AUTO_CANDIDATES = 48


def bucket_cost(shape) -> int:
    """Relative cost of one row of a bucket (S, T): a target position costs about twice a source
    position (input-fed decoder, attention and the output projection over the vocabulary), so
    cost = S + 2 T. It orders the buckets ("smallest" = cheapest) and drives auto_buckets."""
    s, t = shape
    return int(s) + 2 * int(t)


def _order(shapes):
    return sorted(set(shapes), key=lambda st: (bucket_cost(st), st[0] * st[1], st[0], st[1]))


def bucket_shapes(d, src_len=None, tgt_len=None) -> list[tuple[int, int]]:
    """(S, T) shapes, cheapest first; T counts the BOS/EOS position.

    data.buckets when given; else auto_buckets() over the training lengths `src_len`,
    `tgt_len` (tokens, without EOS) of the pairs that pass the length filter, or the single
    bucket (max_source_length, max_target_length + 1) when no lengths are given.
    """
    if not d.buckets:
        cover = (d.max_source_length, d.max_target_length + 1)
        if src_len is None:
            return [cover]
        return auto_buckets(src_len, tgt_len, d.max_buckets, cover)
    shapes = _order(tuple(int(x) for x in b) for b in d.buckets)
    big = (max(s for s, _ in shapes), max(t for _, t in shapes))
    if big not in shapes:
        raise DataError(f"data.buckets={list(d.buckets)!r}: no bucket is at least as large as all others in "
                        f"both lengths; add the bucket {big} so every example that passes the length "
                        f"filter has a shape to go to")
    if min(t for _, t in shapes) < 2:
        raise DataError(f"data.buckets={list(d.buckets)!r}: a target length must be >= 2 (one token + EOS)")
    return shapes


def _round_up(x, m):
    return -(-np.asarray(x, np.int64) // m) * m


def auto_buckets(src_len, tgt_len, max_buckets: int, cover, multiple: int | None = None):
    """At most `max_buckets` (S, T) shapes chosen from the length distribution, cheapest first.

    The largest is `cover` (= (max_source_length, max_target_length + 1): every pair that passes
    the length filter fits, and evaluation truncates nothing that training would keep). The
    others are added greedily: each round adds the shape (lengths multiples of `multiple`,
    capped at `cover`) that lowers the total bucket_cost of the pairs the most, every pair going
    to the cheapest shape that holds it; it stops early when no shape lowers it. Deterministic:
    a pure function of the lengths (ties go to the smaller shape).
    """
    multiple = multiple or AUTO_BUCKET_MULTIPLE
    cover = (int(cover[0]), int(cover[1]))
    s = np.asarray(src_len, np.int64)
    t1 = np.asarray(tgt_len, np.int64) + 1
    if len(s) == 0 or max_buckets <= 1:
        return [cover]
    rs = np.minimum(_round_up(s, multiple), cover[0])
    rt = np.minimum(np.maximum(_round_up(t1, multiple), 2), cover[1])
    counts = np.bincount(rs * (cover[1] + 1) + rt)  # pairs per rounded (S, T) cell
    key = np.nonzero(counts)[0]
    cs, ct, weight = key // (cover[1] + 1), key % (cover[1] + 1), counts[key].astype(np.float64)

    def values(x, w):  # distinct lengths, or quantiles of them when there are many
        v = np.unique(x)
        if len(v) > _AUTO_CANDIDATES:
            cum = np.cumsum(np.bincount(np.searchsorted(v, x), weights=w)) / w.sum()
            v = np.unique(v[np.minimum(np.searchsorted(cum, np.linspace(0, 1, _AUTO_CANDIDATES)), len(v) - 1)])
        return v

    cand = np.array([(a, b) for a in values(cs, weight) for b in values(ct, weight) if (a, b) != cover],
                    np.int64).reshape(-1, 2)
    cand_cost = cand[:, 0] + 2 * cand[:, 1]
    cur = np.full(len(weight), float(bucket_cost(cover)))  # cost of each cell's cheapest shape so far
    shapes = [cover]
    while len(shapes) < max_buckets and len(cand):
        gains = np.empty(len(cand))
        for k in range(0, len(cand), 256):  # [candidates, cells] in chunks: bounded memory
            a, b, c = cand[k:k + 256, :1], cand[k:k + 256, 1:], cand_cost[k:k + 256, None]
            fits = (cs[None] <= a) & (ct[None] <= b)
            gains[k:k + 256] = (np.where(fits, np.maximum(cur[None] - c, 0.0), 0.0) * weight[None]).sum(1)
        best = int(np.argmax(gains))
        if gains[best] <= 0:
            break
        a, b = (int(x) for x in cand[best])
        shapes.append((a, b))
        fits = (cs <= a) & (ct <= b)
        cur = np.where(fits, np.minimum(cur, bucket_cost((a, b))), cur)
        cand, cand_cost = np.delete(cand, best, 0), np.delete(cand_cost, best)
    return _order(shapes)


def assign_buckets(shapes, src_len: np.ndarray, tgt_len: np.ndarray) -> np.ndarray:
    """Index of the cheapest bucket holding each example (len(src) <= S, len(tgt)+1 <= T), -1 if
    none; `shapes` are ordered cheapest first (bucket_shapes)."""
    out = np.full(len(src_len), -1, np.int32)
    for b in range(len(shapes) - 1, -1, -1):  # cheapest wins: assign from the last to the first
        s, t = shapes[b]
        out[(src_len <= s) & (tgt_len + 1 <= t)] = b
    return out


def batch_token_count(shape) -> int:
    """Tokens one row of a bucket (S, T) counts against data.batch_tokens: OpenNMT-py's
    `-batch_type tokens` rule, rows x max(source length, target length with BOS and EOS), at the
    bucket's padded lengths; T counts one of BOS/EOS, so a row counts max(S, T + 1)."""
    s, t = shape
    return max(int(s), int(t) + 1)


def bucket_rows(d, shapes, granularity: int) -> list[int]:
    """Global rows per bucket: batch_tokens // batch_token_count(shape) rounded down to a
    multiple of `granularity` (= process_count * batch_multiple), or data.batch_size, which
    must be such a multiple."""
    if d.batch_tokens > 0:
        rows = []
        for s, t in shapes:
            r = (d.batch_tokens // batch_token_count((s, t))) // granularity * granularity
            if r == 0:
                log.warning("data.batch_tokens=%d is below one row per device for bucket (%d, %d); "
                            "using %d rows", d.batch_tokens, s, t, granularity)
                r = granularity
            rows.append(r)
        return rows
    check_batch_size(d, granularity)
    return [d.batch_size] * len(shapes)


def check_batch_size(d, granularity: int) -> None:
    """DataError when sentence-counted batches (data.batch_tokens = 0) have a data.batch_size
    that is not a multiple of `granularity` (= process_count * batch_multiple)."""
    if d.batch_tokens <= 0 and d.batch_size % granularity:
        raise DataError(f"data.batch_size={d.batch_size} is not a multiple of process_count x batch_multiple = "
                        f"{granularity}; set data.batch_size to a multiple of {granularity} (it is the global batch)")


def padding_efficiency(plan, shapes, src_len: np.ndarray, tgt_len: np.ndarray) -> dict:
    """Real / padded positions of a batch plan (epoch_plan's list), source and target (target
    positions count EOS), filler rows included; `src_len`/`tgt_len` are indexed by example id."""
    real_s = real_t = pad_s = pad_t = 0
    for b, i in plan:
        s, t = shapes[b]
        real = i[i >= 0]
        real_s += int(np.sum(src_len[real]))
        real_t += int(np.sum(tgt_len[real])) + len(real)
        pad_s += len(i) * s
        pad_t += len(i) * t
    return {"source": real_s / max(pad_s, 1), "target": real_t / max(pad_t, 1)}


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


def train_shapes(d, src_len, tgt_len) -> list[tuple[int, int]]:
    """The buckets of a training split with lengths `src_len`, `tgt_len` (tokens, without EOS):
    data.buckets, or auto buckets chosen from the lengths of the pairs that pass the length
    filter (the filter then uses the length limits: the largest auto bucket is exactly them)."""
    if d.buckets:
        return bucket_shapes(d)
    src_len, tgt_len = np.asarray(src_len), np.asarray(tgt_len)
    keep, _ = length_filter(d, bucket_shapes(d), src_len, tgt_len)
    return bucket_shapes(d, src_len[keep], tgt_len[keep])


def survivors(d, shapes, src_len, tgt_len):
    """(ids of the pairs that pass the length filter for `shapes`, their buckets, {reason: count}
    of the dropped): the training pairs a batch plan is made of."""
    keep, reasons = length_filter(d, shapes, src_len, tgt_len)
    ids = np.nonzero(keep)[0]
    bucket = assign_buckets(shapes, src_len[ids], tgt_len[ids])
    assert np.all(bucket >= 0), "length filter and buckets disagree"
    return ids, bucket, reasons


# ----------------------------------------------------------------------------------- plans

def epoch_plan(bucket: np.ndarray, ids: np.ndarray, rows, seed: int, epoch: int, *, pool: int = 0,
               src_len: np.ndarray | None = None, tgt_len: np.ndarray | None = None, shapes=None):
    """The global batch plan of one epoch: a list of (bucket index, int64 [R_b] example ids,
    -1 = filler row). `ids` are the surviving example indices, `bucket` their buckets and
    `src_len`/`tgt_len` their lengths (needed when pool > 0). See the module doc."""
    rng = np.random.default_rng(seed + epoch)
    perm = rng.permutation(len(ids))
    order_ids, order_b = ids[perm], bucket[perm]
    if pool <= 0:
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
    key_s, key_t = np.asarray(src_len)[perm], np.asarray(tgt_len)[perm]

    def by_length(pos):  # walk positions sorted by (target, source) length, then walk order
        return pos[np.lexsort((pos, key_s[pos], key_t[pos]))]

    def shapes_hold(c, pos):
        return shapes is not None and bool(np.all((key_s[pos] <= shapes[c][0]) & (key_t[pos] + 1 <= shapes[c][1])))

    plan = []
    carry = [np.zeros(0, np.int64) for _ in rows]  # walk positions waiting for a full batch
    for start in range(0, len(perm), pool):
        pos = np.arange(start, min(start + pool, len(perm)))
        batches = []
        for b, r in enumerate(rows):
            members = np.concatenate([carry[b], pos[order_b[pos] == b]])
            n_full = len(members) // r * r
            ready, carry[b] = by_length(members[:n_full]), members[n_full:]  # the latest arrivals wait
            batches += [(b, order_ids[ready[k:k + r]]) for k in range(0, n_full, r)]
        plan += [batches[i] for i in rng.permutation(len(batches))]
    # The walk's leftovers: cheapest bucket first, whole batches are cut, and what remains moves
    # up to the next bucket that holds it all (fewer filler rows than one partial batch per
    # bucket); only what no later bucket can take becomes a partial batch.
    for b, r in enumerate(rows):
        if not len(carry[b]):
            continue
        members = carry[b]
        n_full = len(members) // r * r
        ready, rest = by_length(members[:n_full]), members[n_full:]
        plan += [(b, order_ids[ready[k:k + r]]) for k in range(0, n_full, r)]
        if not len(rest):
            continue
        up = [c for c in range(b + 1, len(rows)) if shapes_hold(c, rest)]
        if up:
            carry[up[0]] = np.concatenate([carry[up[0]], rest])
        else:
            rest = order_ids[by_length(rest)]
            plan.append((b, np.concatenate([rest, np.full(r - len(rest), -1, rest.dtype)])))
    return plan


def pool_size(pool_batches: int, rows, bucket: np.ndarray) -> int:
    """Examples per length-sorted pool: pool_batches x the mean rows per batch (each example
    weighted by its bucket's rows); 0 = no pools."""
    if pool_batches <= 0 or len(bucket) == 0:
        return 0
    mean_rows = float(np.mean(np.asarray(rows)[bucket]))
    return max(1, int(round(pool_batches * mean_rows)))


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
    """Grain map function: (bucket, example ids) -> padded Batch (batch.py; ids -1 = filler rows).

    Over-long examples (possible only in eval splits, which are never filtered) are truncated to
    the bucket: source to S tokens, target to T - 1 tokens.
    """

    def __init__(self, source, shapes, copy_vocab=None, sampler=None):
        self.source = source  # random-access: tfds ArrayRecordDataSource or a list of dicts
        self.shapes = shapes
        self.copy_vocab = copy_vocab  # copy attention: the vocabulary of the extended ids
        self.sampler = sampler  # data.spm_sampling_alpha: SubwordSampler (plan items carry the epoch)

    def _records(self, ids):
        getitems = getattr(self.source, "__getitems__", None)
        if getitems is not None:
            return getitems(ids)
        return [self.source[i] for i in ids]

    def __call__(self, item) -> Batch:
        b, ids = item[0], np.asarray(item[1])
        real = ids[ids >= 0]
        records = self._records([int(i) for i in real]) if len(real) else []
        pairs = [(ex["source"], ex["target"]) for ex in records]
        if self.sampler is not None and len(item) > 2:  # training batch: (bucket, ids, epoch)
            pairs = [self.sampler(ex, int(i), int(item[2]), self.shapes[b]) for ex, i in zip(records, real)]
        return pad_rows(pairs, ids, self.shapes[b],
                        None if self.copy_vocab is None else [copy_row(self.copy_vocab, ex) for ex in records])


# -------------------------------------------------------------- subword regularisation

_SAMPLING_LOCK = threading.Lock()  # SentencePiece's sampling generator is process-wide


class SubwordSampler:
    """data.spm_sampling_alpha: a fresh SentencePiece segmentation of each training example every
    epoch (Kudo 2018, subword regularisation: sampled from the whole lattice, nbest_size=-1, with
    smoothing alpha), instead of the prepared one.

    Example i of epoch e is sampled with SentencePiece's generator seeded by (seed, e, i)
    (`seed_of`; set and used under one lock, so prefetch threads cannot interleave): the sample
    depends on nothing else, so a resumed run sees the same samples, and 1 and N processes (or
    Grain workers) the same batches. A sample that does not fit the example's bucket (the plan
    is made from the prepared lengths) falls back to the prepared pieces.
    """

    def __init__(self, source_vocab, target_vocab, alpha: float, seed: int):
        self.source_vocab, self.target_vocab = source_vocab, target_vocab
        self.alpha, self.seed = float(alpha), int(seed)

    def seed_of(self, epoch: int, index: int) -> int:
        return int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])

    def __call__(self, ex, index: int, epoch: int, shape) -> tuple:
        """A record (source/target ids and texts) -> (source ids, target ids), no BOS/EOS."""
        import sentencepiece as spm
        kw = dict(out_type=int, enable_sampling=True, alpha=self.alpha, nbest_size=-1)
        with _SAMPLING_LOCK:
            spm.set_random_generator_seed(self.seed_of(epoch, index))
            src = self.source_vocab.sp.encode(as_text(ex["source_text"]), **kw)
            tgt = self.target_vocab.sp.encode(as_text(ex["target_text"]), **kw)
        if len(src) > shape[0] or len(tgt) + 1 > shape[1]:
            return ex["source"], ex["target"]
        return np.asarray(src, np.int32), np.asarray(tgt, np.int32)


def copy_row(vocab, ex) -> tuple[list, list]:
    """(source_ext, target_ext) of a record (vocab.extended_ids, words from its texts)."""
    src_text, tgt_text = as_text(ex["source_text"]), as_text(ex["target_text"])
    src, tgt, _ = extended_ids(vocab, ex["source"], vocab.surfaces(src_text), ex["target"], vocab.surfaces(tgt_text))
    return src, tgt


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

    State {"epoch": e, "batch": k}: k batches of epoch e have been returned (prefetched but not
    yet returned batches are not counted, so the state is exact). With auto buckets it also
    holds "buckets": [[S, T], ...], the plan's shapes, which a resumed run keeps
    (Data.train_batches).
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
        state = {"epoch": self.epoch, "batch": self.batch}
        if self._loader.auto_buckets:
            state["buckets"] = [list(s) for s in self._loader.shapes]
        return state

    def set_state(self, state: dict) -> None:
        self.__init__(self._loader, state)


class Loader:
    """Plans and materialises batches of one split for one process (see module doc).

    `src_len`/`tgt_len` are the lengths of the examples `ids` (aligned); `pool_batches` > 0
    forms the batches from length-sorted pools of that many batches' worth of examples.
    """

    def __init__(self, source, bucket: np.ndarray, ids: np.ndarray, shapes, rows, *, seed: int,
                 process_index: int, process_count: int, prefetch: int, worker_count: int,
                 src_len: np.ndarray | None = None, tgt_len: np.ndarray | None = None, pool_batches: int = 0,
                 auto_buckets: bool = False, copy_vocab=None, sampler=None):
        self.source, self.bucket, self.ids = source, bucket, ids
        self.shapes, self.rows = shapes, rows
        self.seed = seed
        self.src_len, self.tgt_len = src_len, tgt_len
        self.pool = pool_size(pool_batches, rows, bucket)
        self.auto_buckets = auto_buckets  # the shapes go into the iterator state
        self.process_index, self.process_count = process_index, process_count
        self.prefetch, self.worker_count = prefetch, worker_count
        self.materialize = Materialize(source, shapes, copy_vocab, sampler)

    def global_epoch_plan(self, epoch: int):
        return epoch_plan(self.bucket, self.ids, self.rows, self.seed, epoch, pool=self.pool,
                          src_len=self.src_len, tgt_len=self.tgt_len, shapes=self.shapes)

    def local_epoch_plan(self, epoch: int):
        plan = [(b, local_rows(i, self.process_index, self.process_count)) for b, i in self.global_epoch_plan(epoch)]
        return plan if self.materialize.sampler is None else [(b, i, epoch) for b, i in plan]

    def iterate(self, plan, start: int = 0):
        return grain_batches(plan, self.materialize, start=start, prefetch=self.prefetch,
                             worker_count=self.worker_count)
