"""The corpus of one run, for one process: `Data` (vocabularies, statistics, batch iterators) and
`build_data`, which prepares the corpus (cached), opens it and returns its Data.

The batch plan (length filter, buckets, rows per bucket, the training loader and `stats`) is
built once, on first use: by `train_batches(state)` with the buckets a checkpoint's data state
saved (a resumed run keeps its plan), or by the first look at `stats` / `shapes` / `rows` /
`eval_batches` with the configured ones. A trainer therefore reads the checkpoint's data state
before it asks for anything of the plan, and the plan is made once per run start.
"""

from __future__ import annotations

import logging

import numpy as np

from s2s_jax import rundir
from s2s_jax.data import tasks
from s2s_jax.data.errors import DataError
from s2s_jax.data.pipeline import (Loader, Materialize, SubwordSampler, TrainIterator, assign_buckets, bucket_rows,
                                   bucket_shapes, check_batch_size, eval_plan, grain_batches, length_filter, local_rows,
                                   padding_efficiency, survivors, train_shapes)
from s2s_jax.data.preprocess import load_prepared, prepare
from s2s_jax.data.records import open_split
from s2s_jax.data.sources import split_roles
from s2s_jax.data.text import as_text
from s2s_jax.vocab import CharVocab, WordVocab

log = logging.getLogger(__name__)


def truncate_sources(data_config, sources):
    """Token-id sources cut to data.truncate_source pieces (0 = whole): what a model trained
    with truncation reads when validation and `eval` decode."""
    limit = data_config.truncate_source or None
    return [list(ids)[:limit] for ids in sources]


class _Split:
    """One split: a random-access record source plus token lengths (corpus order)."""

    def __init__(self, name: str, source, src_len: np.ndarray, tgt_len: np.ndarray):
        self.name, self.source = name, source
        self.src_len, self.tgt_len = src_len.astype(np.int64), tgt_len.astype(np.int64)

    def __len__(self) -> int:
        return len(self.src_len)

    def truncated(self, max_source: int, max_target: int) -> tuple["_Split", dict]:
        """This split with sources longer than `max_source` pieces cut to it (targets to
        `max_target`; 0 = no limit), and {"source": pairs cut, "target": pairs cut}."""
        limits = (max_source or None, max_target or None)
        counts = {"source": int(np.sum(self.src_len > max_source)) if max_source else 0,
                  "target": int(np.sum(self.tgt_len > max_target)) if max_target else 0}
        if not any(counts.values()):
            return self, counts
        return _Split(self.name, _Truncated(self.source, *limits), np.minimum(self.src_len, limits[0] or 1 << 62),
                      np.minimum(self.tgt_len, limits[1] or 1 << 62)), counts


class _Truncated:
    """A random-access record source whose "source" / "target" ids are cut to their first
    `max_source` / `max_target` pieces (None: whole); the texts stay whole (references are
    scored in full). Picklable, for Grain workers."""

    def __init__(self, records, max_source: int | None, max_target: int | None):
        self.records, self.max_source, self.max_target = records, max_source, max_target

    def __len__(self) -> int:
        return len(self.records)

    def _cut(self, record: dict) -> dict:
        return dict(record, source=record["source"][:self.max_source], target=record["target"][:self.max_target])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._cut(r) for r in self.records[i]]
        return self._cut(self.records[i])

    def __getitems__(self, ids):
        getitems = getattr(self.records, "__getitems__", None)
        records = getitems(ids) if getitems else [self.records[i] for i in ids]
        return [self._cut(r) for r in records]


def task_vocab(d, train_pairs):
    """A built-in task's vocabulary: characters, or (data.spm_model_type="word") the words of
    its training split (vocab.WordVocab, one vocabulary for both sides)."""
    if d.spm_model_type == "word":
        return WordVocab.build([f"{s} {t}" for s, t in train_pairs], d.vocab_size)
    return CharVocab()


def _task_splits(d, vocab, generated):
    splits = {}
    for role, name in split_roles(d).items():
        exs, ls, lt = [], [], []
        for s, t in generated[role]:
            si, ti = vocab.encode(s), vocab.encode(t)
            exs.append({"source": np.asarray(si, np.int32), "target": np.asarray(ti, np.int32),
                        "source_text": s, "target_text": t})
            ls.append(len(si))
            lt.append(len(ti))
        splits[role] = _Split(name, exs, np.asarray(ls), np.asarray(lt))
    return splits


class Data:
    """Vocabularies, statistics and batch iterators of one configured corpus, for one process."""

    def __init__(self, config, splits: dict, source_vocab, target_vocab, prepare_stats: dict, *,
                 prepared_dir: str | None, process_index: int, process_count: int, batch_multiple: int):
        d = self.d = config.data
        self.config = config
        self.source_vocab, self.target_vocab = source_vocab, target_vocab
        self.prepared_dir = prepared_dir
        self.process_index, self.process_count = process_index, process_count
        self.batch_multiple = batch_multiple
        # data.truncate_source / truncate_target: every split cut before the length filter
        self.truncated = {}  # {split name: {"source": pairs cut, "target": pairs cut}}
        for role, sp in list(splits.items()):
            splits[role], counts = sp.truncated(d.truncate_source, d.truncate_target)
            if any(counts.values()):
                self.truncated[sp.name] = counts
                log.info("data: %s: truncated %d sources to %d pieces and %d targets to %d pieces", sp.name,
                         counts["source"], d.truncate_source, counts["target"], d.truncate_target)
        self._splits = splits
        self._prepare_stats = prepare_stats
        self._planned = False
        # The length limits are checked now (they do not depend on which buckets the plan gets:
        # the largest auto bucket is exactly them), so a config that drops too much fails here.
        train = splits["train"]
        keep, reasons = length_filter(d, bucket_shapes(d), train.src_len, train.tgt_len)
        self._check_kept(int(keep.sum()), reasons)
        check_batch_size(d, process_count * batch_multiple)

    # ------------------------------------------------------------------ the plan (built once, on first use)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """The buckets (S, T) of the plan, cheapest first."""
        self._ensure_plan()
        return self._shapes

    @property
    def rows(self) -> list[int]:
        """Global rows per bucket."""
        self._ensure_plan()
        return self._rows

    @property
    def stats(self) -> dict:
        self._ensure_plan()
        return self._stats

    @property
    def loader(self) -> Loader:
        """The training split's loader (this process's batches)."""
        self._ensure_plan()
        return self._loader

    def _ensure_plan(self) -> None:
        if not self._planned:
            self._plan(None)

    def _plan(self, shapes) -> None:
        """Length filter, buckets (`shapes`, or None: from data.buckets / auto_buckets), rows,
        the training loader and the stats."""
        d, train = self.d, self._splits["train"]
        if shapes is None:
            shapes = train_shapes(d, train.src_len, train.tgt_len)
        self._shapes = [tuple(int(x) for x in s) for s in shapes]
        self._rows = bucket_rows(d, self._shapes, self.process_count * self.batch_multiple)
        ids, bucket, reasons = survivors(d, self._shapes, train.src_len, train.tgt_len)
        self._check_kept(len(ids), reasons)
        self._loader = Loader(train.source, bucket, ids, self._shapes, self._rows, seed=d.shuffle_seed,
                              process_index=self.process_index, process_count=self.process_count,
                              prefetch=d.prefetch, worker_count=d.worker_count,
                              src_len=train.src_len[ids], tgt_len=train.tgt_len[ids], pool_batches=d.pool_batches,
                              auto_buckets=not d.buckets, copy_vocab=self._copy_vocab(),
                              sampler=SubwordSampler(self.source_vocab, self.target_vocab, d.spm_sampling_alpha,
                                                     d.shuffle_seed) if d.spm_sampling_alpha > 0 else None)
        self._planned = True
        self._stats = self._plan_stats(ids, bucket, reasons)

    def _check_kept(self, kept: int, reasons: dict) -> None:
        """DataError when the length filter keeps no training pair, or drops too many."""
        d, train = self.d, self._splits["train"]
        if kept == 0:
            raise DataError(f"split {train.name!r}: all {len(train)} training pairs are longer than "
                            f"data.max_source_length={d.max_source_length} / data.max_target_length="
                            f"{d.max_target_length} (or the largest bucket); raise those limits")
        check_length_drops(d, train.name, len(train), reasons)

    def _plan_stats(self, ids, bucket, reasons) -> dict:
        d, splits, prepare_stats = self.d, self._splits, self._prepare_stats
        train = splits["train"]
        plan0 = self._loader.global_epoch_plan(0)
        n_batches = len(plan0)

        examples, dropped = {}, {}
        for role, sp in splits.items():
            pst = prepare_stats.get(sp.name, {})
            dropped[sp.name] = {k: v for k, v in pst.get("dropped", {}).items() if v}
            examples[sp.name] = len(sp)
        examples[train.name] = int(len(ids))
        dropped[train.name].update({k: v for k, v in reasons.items() if v})
        bucket_examples = np.bincount(bucket, minlength=len(self._shapes))
        efficiency = padding_efficiency(plan0, self._shapes, train.src_len, train.tgt_len)  # epoch 0
        stats = {
            "source": d.source,
            "prepared_dir": self.prepared_dir,
            "splits": {sp.name: role for role, sp in splits.items()},
            "examples": examples,  # train: after the length filter; eval splits: all
            "dropped": dropped,  # {split: {reason: count}}
            "lines": {sp.name: prepare_stats.get(sp.name, {}).get("lines", len(sp)) for sp in splits.values()},
            "buckets": [list(s) for s in self._shapes],
            "auto_buckets": not d.buckets,
            "bucket_rows": list(self._rows),  # global rows per bucket
            "bucket_examples": [int(x) for x in bucket_examples],
            # data.truncate_source / truncate_target: {split: {"source": pairs cut, "target": pairs cut}}
            "truncated_pairs": self.truncated,
            "train_batches_per_epoch": n_batches,
            # real / padded positions of an epoch's batches (filler rows included)
            "padding_efficiency": {k: round(v, 4) for k, v in efficiency.items()},
            "pool_examples": self._loader.pool,
            "vocab_size": {"source": self.source_vocab.vocab_size, "target": self.target_vocab.vocab_size},
            "process_count": self.process_count,
        }
        for name, reasons_ in dropped.items():
            for reason, count in reasons_.items():
                log.info("data: %s: dropped %d pairs (%s)", name, count, reason)
        log.info("data: %s training pairs in %d %sbuckets %s (rows %s) -> %d batches/epoch; padding efficiency "
                 "(real/padded positions) source %.3f, target %.3f; eval: %s",
                 examples[train.name], len(self._shapes), "auto " if not d.buckets else "", stats["buckets"],
                 self._rows, n_batches, efficiency["source"], efficiency["target"],
                 {sp.name: len(sp) for r, sp in splits.items() if r != "train"})
        return stats

    def describe_plan(self) -> str:
        """One line for the training start: buckets and padding efficiency of the batch plan."""
        eff = self.stats["padding_efficiency"]
        kind = "auto " if self.stats["auto_buckets"] else ""
        cut = self.truncated.get(self._splits["train"].name)
        cut = f", truncated {cut['source']} sources / {cut['target']} targets" if cut else ""
        return (f"{len(self.shapes)} {kind}buckets, {self.stats['train_batches_per_epoch']} batches/epoch, padding "
                f"efficiency (real/padded positions) source {eff['source']:.3f}, target {eff['target']:.3f}{cut}")

    # ------------------------------------------------------------------ splits

    def _role(self, split: str) -> str:
        for role, sp in self._splits.items():
            if split == sp.name:
                return role
        if split in self._splits:  # role names ("valid", "test") work too
            return split
        names = ", ".join(sp.name for sp in self._splits.values())
        raise DataError(f"split {split!r} is not configured; use one of {names} "
                        f"(data.train_split / valid_split / test_split)")

    def split_size(self, split: str) -> int:
        return len(self._splits[self._role(split)])

    # ------------------------------------------------------------------ iterators

    def train_batches(self, state: dict | None = None) -> TrainIterator:
        """Infinite iterator over this process's training batches (epoch after epoch).

        `state` is a dict from a previous iterator's get_state(); None starts at epoch 0. With
        auto buckets (data.buckets empty) the state's buckets are kept, so that a resumed run
        has the plan of the run that saved it even if the lengths it would choose now differ.
        """
        saved = (state or {}).get("buckets")
        if saved and not self.d.buckets:
            saved = [tuple(int(x) for x in s) for s in saved]
            train = self._splits["train"]
            now = self._shapes if self._planned else train_shapes(self.d, train.src_len, train.tgt_len)
            if saved != now:
                log.info("data: resuming with the saved auto buckets %s (now they would be %s)",
                         [list(s) for s in saved], [list(s) for s in now])
            if not self._planned or saved != self._shapes:
                self._plan(saved)
        return TrainIterator(self.loader, state)

    def eval_batches(self, split: str, limit: int | None = None) -> list[dict]:
        """Batches of the first `limit` examples of `split` (all if None), never filtered.

        Grouped by bucket (fixed shapes), corpus order within a bucket, filler rows (index -1)
        at the end of each bucket's last batch; use "index" to map rows back to
        eval_examples(). Examples longer than the largest bucket are truncated to it (counted in
        stats["truncated"]). Like training, process p gets its 1/P slice of each batch's rows.
        """
        sp = self._splits[self._role(split)]
        n = len(sp) if limit is None else min(int(limit), len(sp))
        big_s = max(s for s, _ in self.shapes)
        big_t = max(t for _, t in self.shapes)
        src_len, tgt_len = sp.src_len[:n], sp.tgt_len[:n]
        truncated = int(np.sum((src_len > big_s) | (tgt_len + 1 > big_t)))
        if truncated:
            self.stats.setdefault("truncated", {})[sp.name] = truncated
            log.warning("data: %s: %d of %d eval pairs are longer than the largest bucket (%d, %d) and are "
                        "truncated for evaluation", sp.name, truncated, n, big_s, big_t)
        bucket = assign_buckets(self.shapes, np.minimum(src_len, big_s), np.minimum(tgt_len, big_t - 1))
        plan = [(b, local_rows(i, self.process_index, self.process_count)) for b, i in eval_plan(bucket, self.rows)]
        return list(grain_batches(plan, Materialize(sp.source, self.shapes, self._copy_vocab()), prefetch=self.d.prefetch))

    def _copy_vocab(self):
        """The vocabulary of copy attention's extended ids (batches then carry COPY_FIELDS), or None."""
        return self.source_vocab if self.config.model.copy_attention else None

    def training_ids(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(source ids, target ids) of every training pair in corpus order, before the length
        filter (no BOS/EOS): what corpus statistics such as the decoding shortlist are built from."""
        sp = self._splits["train"]
        getitems = getattr(sp.source, "__getitems__", None)
        records = getitems(list(range(len(sp)))) if getitems else sp.source[:len(sp)]
        return ([np.asarray(r["source"], np.int32) for r in records],
                [np.asarray(r["target"], np.int32) for r in records])

    def eval_examples(self, split: str, limit: int | None = None) -> list[tuple[str, str]]:
        """Normalised (source_text, target_text) pairs of `split` in corpus order (all processes
        get all of them), for BLEU / exact match; index i matches batch "index" i."""
        sp = self._splits[self._role(split)]
        n = len(sp) if limit is None else min(int(limit), len(sp))
        getitems = getattr(sp.source, "__getitems__", None)
        records = getitems(list(range(n))) if getitems else sp.source[:n]
        return [(as_text(r["source_text"]), as_text(r["target_text"])) for r in records]


def check_length_drops(d, split: str, total: int, reasons: dict) -> None:
    """DataError when the length filter drops more than data.max_dropped_fraction of the
    training pairs (`reasons`: length_filter's {reason: count}); says how many and why."""
    dropped = sum(reasons.values())
    if dropped <= d.max_dropped_fraction * total:
        return
    why = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in reasons.items() if n)
    needed = -(-dropped * 1000 // max(total, 1)) / 1000  # the fraction, rounded up to 0.1 %
    raise DataError(f"split {split!r}: the length filter would drop {dropped} of {total} training pairs "
                    f"({100 * dropped / total:.1f} %; {why}), more than data.max_dropped_fraction="
                    f"{d.max_dropped_fraction}: raise data.max_source_length / data.max_target_length (and the "
                    f"largest of data.buckets), or accept the loss with --set data.max_dropped_fraction={needed}")


# ---------------------------------------------------------------------- build

def build_data(config, workdir: str | None = None, *, process_index: int = 0, process_count: int = 1,
               batch_multiple: int = 1) -> Data:
    """Prepares the corpus if not cached, opens it, and builds this process's loaders.

    process_index/process_count: this process among all data-parallel processes (each gets its
    slice of every global batch). batch_multiple: the local batch must divide by this (e.g. the
    number of local devices); global rows are multiples of process_count * batch_multiple.
    With `workdir`, the tokenizer files are copied to workdir/vocab/ so translate/export never
    need the raw data again.
    """
    if not (0 <= process_index < process_count) or batch_multiple < 1:
        raise ValueError(f"bad process_index={process_index} / process_count={process_count} / "
                         f"batch_multiple={batch_multiple}")
    d = config.data
    if d.source == "task":
        generated = tasks.generate_splits(d.task, d.task_train_size, d.task_eval_size, d.task_seed)
        vocab = task_vocab(d, generated["train"])
        splits = _task_splits(d, vocab, generated)
        source_vocab = target_vocab = vocab
        prep_stats, path = {}, None
    else:
        path = prepare(config)
        manifest, prep_stats, lengths, (source_vocab, target_vocab) = load_prepared(path)
        splits = {}
        for role, name in manifest["roles"].items():
            splits[role] = _Split(name, open_split(path, role), lengths[f"{role}_source"], lengths[f"{role}_target"])
    data = Data(config, splits, source_vocab, target_vocab, prep_stats, prepared_dir=path,
                process_index=process_index, process_count=process_count, batch_multiple=batch_multiple)
    if workdir:
        try:
            rundir.install_vocabs(workdir, source_vocab, target_vocab)
        except rundir.VocabularyMismatch as e:
            raise DataError(str(e)) from None
    return data
