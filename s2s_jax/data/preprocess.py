"""prepare(config): raw parallel text -> normalised, SentencePiece-tokenised TFDS array_record.

Runs once per corpus and setting; the result is cached under `data.cache_dir` in a folder keyed
by a hash of the inputs' contents (size + sha256 of every file, or the TFDS dataset's identity)
and of every setting that changes the output. Layout of a prepared folder:

    manifest.json   key, settings, inputs, split name -> role
    stats.json      per split: lines read, examples kept, dropped by reason (train: the pairs
                    SentencePiece was trained on)
    vocab/          vocab.json + SentencePiece model file(s) (copied to workdir/vocab by build_data)
    lengths.npz     per role: token counts of source and target (uint16, int32 if longer), for
                    the batch plan, so the loader never decodes every record to learn lengths
    tfds/           the TFDS dataset (array_record): splits "train" / "valid" / "test" (roles),
                    features source int32[None], target int32[None], source_text, target_text;
                    one shard per SHARD_LINES input lines, records in corpus order

Streaming, in memory bounded independently of the corpus size: (1) a cheap validation pass
reads every file once in blocks (missing/empty/misaligned files, invalid UTF-8, empty lines
with data.empty_lines=error: errors name the file and line, before any slow work); (2)
SentencePiece trains on a seeded sample of data.spm_sample_size training sentences; (3)
data.prepare_workers processes each read, normalise, tokenise and write whole shards, in
order, so the result is byte-identical for any number of workers. What grows with the corpus
is the token lengths (4 bytes a pair) and the sample.

It is built in a temporary sibling folder and renamed into place, so a crash never leaves a
half-written cache and concurrent processes (one per host) can race safely.
Nothing here imports TensorFlow (TFDS writes array_record without it) or JAX.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import sys
import time

import numpy as np

from s2s_jax import rundir
from s2s_jax.data.errors import DataError
from s2s_jax.data.text import check_aligned, check_exists, clean_pairs, empty_line_error, scan_lines
from s2s_jax.data.tokenizer import train_sentencepiece
from s2s_jax.vocab import VOCAB_JSON, read_vocab_dir, write_vocab_json

log = logging.getLogger(__name__)

# Bump when the prepared layout or the tokenisation changes: old caches are then rebuilt.
FORMAT_VERSION = 2
# Input lines per shard (and per worker task). Part of the output layout: changing it changes
# the shard files, so bump FORMAT_VERSION with it.
SHARD_LINES = 100_000
BLOCK_LINES = 10_000  # lines a worker holds at once
SPM_SAMPLE_SEED = 0
ROLES = ("train", "valid", "test")
BUILDER_NAME = "s2s_jax_prepared"


def cache_root(config) -> str:
    return os.path.expanduser(config.data.cache_dir or "~/.cache/s2s_jax")


def split_roles(d) -> dict[str, str]:
    """{role: split name} for the configured, non-empty split names (train is required)."""
    roles = {"train": d.train_split, "valid": d.valid_split, "test": d.test_split}
    if not d.train_split:
        raise DataError("data.train_split is empty; set it to the training split's name, e.g. train")
    return {r: s for r, s in roles.items() if s}


# ----------------------------------------------------------------------------------- sources

def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class TextFolderSource:
    """`dir/{split}.{lang}` line-aligned files."""

    kind = "text"
    unit = "line"

    def __init__(self, d):
        self.d = d
        self.dir = os.path.abspath(os.path.expanduser(d.dir))
        self.roles = split_roles(d)
        if not os.path.isdir(self.dir):
            raise DataError(f"{self.dir}: data.dir is not a folder; point --set data.dir=... at the folder "
                            f"holding {d.train_split}.{d.src_lang} and {d.train_split}.{d.tgt_lang}")

    def paths(self, role: str) -> tuple[str, str]:
        split = self.roles[role]
        return (os.path.join(self.dir, f"{split}.{self.d.src_lang}"),
                os.path.join(self.dir, f"{split}.{self.d.tgt_lang}"))

    def fingerprint(self) -> dict:
        """Contents identity of every input file; missing files are reported here, first."""
        out = {}
        for role in self.roles:
            for path in self.paths(role):
                check_exists(path)
                out[os.path.basename(path)] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
        return {"kind": "text", "files": out}

    def name(self) -> str:
        return os.path.basename(self.dir.rstrip("/")) or "text"

    def scan(self, role: str, every: int, *, find_empty: bool):
        """The cheap validation pass over a split (streaming): SplitScan with the line count and
        the byte offset of every `every`-th line of both files, for the workers to seek to."""
        sp, tp = self.paths(role)
        n_src, off_src, empty_src = scan_lines(sp, every, find_empty=find_empty)
        n_tgt, off_tgt, empty_tgt = scan_lines(tp, every, find_empty=find_empty)
        check_aligned(sp, n_src, tp, n_tgt)
        found = [(line, path) for line, path in ((empty_src, sp), (empty_tgt, tp)) if line]
        if found:  # the first pair with an empty side; its source side if both are empty
            line, path = min(found, key=lambda x: x[0])
            raise empty_line_error(path, line)
        return SplitScan(role, n_src, list(zip(off_src, off_tgt)), (sp, tp))

    def reader(self, role: str) -> tuple:
        return ("text",) + self.paths(role)


@dataclasses.dataclass
class SplitScan:
    """What the validation pass learnt about a split: its size, where each shard starts (byte
    offsets of source and target for text; None for TFDS) and the names used in errors."""

    role: str
    lines: int
    offsets: list
    names: tuple

    def shards(self, every: int) -> list[tuple[int, int, object]]:
        """(first line, end line, start offsets) of each shard: `every` lines, the last fewer."""
        return [(a, min(a + every, self.lines), self.offsets[i] if self.offsets else None)
                for i, a in enumerate(range(0, self.lines, every))]


class TfdsSource:
    """A TFDS catalogue dataset already prepared in array_record, read with tfds.data_source.

    Building a catalogue dataset goes through tf.data and so needs TensorFlow; without it we
    stop with a DataError that says how to install it and prepare the dataset once.
    """

    kind = "tfds"
    unit = "example"

    def __init__(self, d):
        import tensorflow_datasets as tfds

        self.d = d
        self.roles = split_roles(d)
        self.data_dir = os.path.expanduser(d.tfds_data_dir) if d.tfds_data_dir else None
        where = self.data_dir or "~/tensorflow_datasets"
        howto = (f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{d.tfds_name}'"
                 f"{', data_dir=' + repr(self.data_dir) if self.data_dir else ''}, file_format='array_record')"
                 f".download_and_prepare()\"")
        try:
            builder = tfds.builder(d.tfds_name, data_dir=self.data_dir, file_format="array_record")
        except tfds.core.registered.DatasetNotFoundError:
            builder = None
        except Exception as e:  # a catalogue module that needs TensorFlow fails to import
            if "tensorflow" not in str(e).lower():
                raise DataError(f"data.tfds_name={d.tfds_name!r}: TFDS cannot load it ({e}); check the name") from None
            builder = None
        tf_missing = _find_spec("tensorflow") is None
        if builder is None or not _is_prepared(builder):
            if tf_missing:
                raise DataError(f"data.tfds_name={d.tfds_name!r} is not prepared as array_record under {where} and "
                                f"building it needs TensorFlow: pip install tensorflow-cpu (the optional install), "
                                f"then run once: {howto}")
            if builder is None:
                raise DataError(f"data.tfds_name={d.tfds_name!r}: TFDS has no such dataset; check the name "
                                f"(tfds.list_builders()) and data.tfds_data_dir")
            log.info("preparing TFDS dataset %s as array_record (uses TensorFlow)", d.tfds_name)
            builder.download_and_prepare(file_format="array_record")
        fmt = str(getattr(builder.info, "file_format", "") or "")
        if fmt and "array_record" not in fmt.lower():
            raise DataError(f"data.tfds_name={d.tfds_name!r} under {where} is stored as {fmt}, which needs "
                            f"TensorFlow to read; re-prepare it as array_record: {howto}")
        self.builder = builder
        self.splits = {}
        available = list(builder.info.splits.keys())
        for role, split in self.roles.items():
            name = split
            if name not in available and name in ("valid", "dev") and "validation" in available:
                name = "validation"
            if name not in available:
                raise DataError(f"data.{role}_split={split!r}: TFDS dataset {d.tfds_name} has splits "
                                f"{', '.join(available)}; set data.{role}_split to one of them (or '' to skip)")
            self.splits[role] = name
        features = list(builder.info.features.keys())
        for lang, field in ((d.src_lang, "src_lang"), (d.tgt_lang, "tgt_lang")):
            if lang not in features:
                raise DataError(f"data.{field}={lang!r}: TFDS dataset {d.tfds_name} has features "
                                f"{', '.join(features)}; set data.src_lang/tgt_lang to two of them")

    def fingerprint(self) -> dict:
        # Hashing gigabytes of records would dominate; the dataset's name, version, split sizes and
        # shard file sizes identify a prepared TFDS dataset.
        b = self.builder
        files = {}
        for root, _, names in os.walk(str(b.data_dir)):
            for n in names:
                files[n] = os.path.getsize(os.path.join(root, n))
        return {"kind": "tfds", "name": self.d.tfds_name, "version": str(b.info.version),
                "splits": {r: b.info.splits[s].num_examples for r, s in self.splits.items()},
                "files": files}

    def name(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.d.tfds_name)

    def paths(self, role: str) -> tuple[str, str]:
        """Names of the two sides in messages (there are no files to point at)."""
        label = f"tfds:{self.d.tfds_name}[{self.splits[role]}]"
        return f"{label}.{self.d.src_lang}", f"{label}.{self.d.tgt_lang}"

    def scan(self, role: str, every: int, *, find_empty: bool):
        """Sizes come from the dataset's metadata; the records (TFDS wrote them, so the text is
        valid UTF-8) are checked for empty sides by the workers as they read them."""
        return SplitScan(role, int(self.builder.info.splits[self.splits[role]].num_examples), [], self.paths(role))

    def reader(self, role: str) -> tuple:
        return ("tfds", str(self.builder.data_dir), self.splits[role], self.d.src_lang, self.d.tgt_lang)


def _find_spec(name):
    import importlib.util

    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _is_prepared(builder) -> bool:
    try:
        return bool(builder.info.splits) and os.path.isdir(str(builder.data_dir))
    except Exception:  # noqa: BLE001 - any failure means "not usable as is"
        return False


def _to_str(x) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray):
        x = x.item()
        return x.decode("utf-8") if isinstance(x, bytes) else str(x)
    return str(x)


def make_source(d):
    if d.source == "text":
        if not d.dir:
            raise DataError("data.dir is empty; set --set data.dir=PATH/TO/CORPUS for data.source='text'")
        return TextFolderSource(d)
    if d.source == "tfds":
        return TfdsSource(d)
    raise DataError(f"data.source={d.source!r} needs no preparation (built-in tasks are generated in memory)")


# ----------------------------------------------------------------------------------- TFDS writer
#
# The workers write the array_record shards themselves (shard i of a split holds what is left of
# input lines [i * SHARD_LINES, (i + 1) * SHARD_LINES), so the layout does not depend on how many
# workers there are); the main process then writes TFDS's metadata (dataset_info.json,
# features.json) with tfds.folder_dataset.write_metadata, which tfds.builder_from_directory and
# the data sources read as they read any TFDS dataset.

def _features():
    """The prepared dataset's features (one definition: the metadata and the record bytes)."""
    import tensorflow_datasets as tfds

    seq = tfds.features.Tensor(shape=(None,), dtype=np.int32)
    return tfds.features.FeaturesDict({"source": seq, "target": seq,
                                       "source_text": tfds.features.Text(), "target_text": tfds.features.Text()})


_PROTOS = None


def serialize_record(source_ids, target_ids, source_text: str, target_text: str) -> bytes:
    """One example as the tf.train.Example that `_features().serialize_example` builds, built
    with the same protobuf classes without its generic per-feature conversions (3x faster; the
    test pins the two to decode alike). Map entries are written sorted (deterministic=True),
    so the bytes are the same in every process."""
    global _PROTOS
    if _PROTOS is None:
        from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2

        _PROTOS = tf_example_pb2.Example, tf_feature_pb2
    example, F = _PROTOS
    return example(features=F.Features(feature={
        "source": F.Feature(int64_list=F.Int64List(value=source_ids)),
        "target": F.Feature(int64_list=F.Int64List(value=target_ids)),
        "source_text": F.Feature(bytes_list=F.BytesList(value=[source_text.encode("utf-8")])),
        "target_text": F.Feature(bytes_list=F.BytesList(value=[target_text.encode("utf-8")])),
    })).SerializeToString(deterministic=True)


def _shard_name(role: str, index: int, count: int) -> str:
    # TFDS's default template {DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}
    return f"{BUILDER_NAME}-{role}.array_record-{index:05d}-of-{count:05d}"


def _write_metadata(folder: str, shards: dict) -> None:
    """dataset_info.json + features.json for the shards in `folder` ({role: [(examples, bytes)]})."""
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    infos = [tfds.core.SplitInfo(name=role, shard_lengths=[n for n, _ in sh], num_bytes=sum(b for _, b in sh))
             for role, sh in shards.items()]
    banner = io.StringIO()
    with contextlib.redirect_stdout(banner):  # keep stdout clean (the CLI may print JSON there)
        tfds.folder_dataset.write_metadata(
            data_dir=folder, features=_features(), split_infos=infos, check_data=False,
            description="s2s_jax prepared parallel text (SentencePiece ids + normalised text).",
            # Corpus order: record i is line i (after drops), so eval batches/BLEU references
            # line up without a separate index.
            disable_shuffling=True)


# ----------------------------------------------------------------------------------- workers
#
# Everything per line (reading, normalising, tokenising, serialising, writing) runs in the
# workers, one task per shard; results come back in task order, so the output is the same for
# any number of workers. A worker holds BLOCK_LINES lines at a time.

_CACHE: dict = {}


def _cached(key, make):
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def _encode_ids(vocab, texts: list) -> list:
    if getattr(vocab, "kind", None) == "sentencepiece":  # one thread: the workers are the parallelism
        return vocab.sp.encode(texts, out_type=int, num_threads=1)
    return vocab.encode_batch(texts)


def _read_blocks(reader: tuple, shard: tuple, names: tuple, picks=None):
    """Yields (1-based first line, source strings, target strings) of a shard's raw lines, at
    most BLOCK_LINES at a time; with `picks` (sorted absolute line numbers) only those lines
    matter (TFDS reads only them; text reads the block and keeps them)."""
    start, stop, offsets = shard
    if reader[0] == "tfds":
        _, bdir, split, sk, tk = reader
        ds = _cached(("tfds", bdir, split), lambda: _tfds_split(bdir, split))
        wanted = picks if picks is not None else range(start, stop)
        for i in range(0, len(wanted), BLOCK_LINES):
            idx = [int(j) for j in wanted[i:i + BLOCK_LINES]]
            recs = ds.__getitems__(idx) if hasattr(ds, "__getitems__") else [ds[j] for j in idx]
            yield idx, [_to_str(r[sk]) for r in recs], [_to_str(r[tk]) for r in recs]
        return
    _, src_path, tgt_path = reader
    with open(src_path, "rb") as fs, open(tgt_path, "rb") as ft:
        fs.seek(offsets[0])
        ft.seek(offsets[1])
        line = start
        while line < stop:
            k = min(BLOCK_LINES, stop - line)
            sides = []
            for f, name in ((fs, names[0]), (ft, names[1])):
                parts = b"".join(itertools.islice(f, k)).decode("utf-8").split("\n")[:k]
                if len(parts) < k:
                    raise DataError(f"{name}: the file changed while it was being prepared; run prepare again")
                if line == 0 and parts[0].startswith("\ufeff"):
                    parts[0] = parts[0][1:]  # the byte-order mark, as read_lines drops it
                sides.append(parts)
            idx = range(line, line + k)
            if picks is not None:
                lo, hi = np.searchsorted(picks, [line, line + k])
                keep = [int(j) - line for j in picks[lo:hi]]
                yield [idx[j] for j in keep], [sides[0][j] for j in keep], [sides[1][j] for j in keep]
            else:
                yield idx, sides[0], sides[1]
            line += k


def _tfds_split(builder_dir: str, split: str):
    import tensorflow_datasets as tfds

    return tfds.builder_from_directory(builder_dir).as_data_source(split)


def _clean(idx, src, tgt, d_form: str, empty_lines: str, names: tuple):
    """clean_pairs over lines that may not be contiguous (a sample): (pairs, dropped)."""
    if isinstance(idx, range):
        pairs, _, dropped = clean_pairs(src, tgt, d_form, empty_lines, src_name=names[0], tgt_name=names[1],
                                        first_line=idx.start + 1)
        return pairs, dropped
    pairs, dropped = [], 0
    for j, s, t in zip(idx, src, tgt):
        p, _, n = clean_pairs([s], [t], d_form, empty_lines, src_name=names[0], tgt_name=names[1], first_line=j + 1)
        pairs += p
        dropped += n
    return pairs, dropped


def _sample_task(task) -> list:
    """The normalised, non-empty pairs at the picked lines of one shard (for SentencePiece)."""
    reader, shard, names, picks, form, empty_lines = task
    out = []
    for idx, src, tgt in _read_blocks(reader, shard, names, picks):
        out += _clean(idx, src, tgt, form, empty_lines, names)[0]
    return out


def _encode_task(task) -> dict:
    """Normalises, tokenises and writes one shard as array_record; returns its counts and the
    token lengths of the examples it kept."""
    from array_record.python.array_record_module import ArrayRecordWriter

    reader, shard, names, form, empty_lines, vocab_dir, path = task
    src_vocab, tgt_vocab = _cached(("vocab", vocab_dir), lambda: read_vocab_dir(vocab_dir))
    writer = ArrayRecordWriter(path, "group_size:1")  # TFDS's own options (random access)
    ls, lt, num_bytes, empty, empty_tok = [], [], 0, 0, 0
    try:
        for idx, src, tgt in _read_blocks(reader, shard, names):
            pairs, dropped = _clean(idx, src, tgt, form, empty_lines, names)
            empty += dropped
            if not pairs:
                continue
            s_ids = _encode_ids(src_vocab, [s for s, _ in pairs])
            t_ids = _encode_ids(tgt_vocab, [t for _, t in pairs])
            for (s, t), si, ti in zip(pairs, s_ids, t_ids):
                if not si or not ti:
                    empty_tok += 1
                    continue
                rec = serialize_record(si, ti, s, t)
                writer.write(rec)
                num_bytes += len(rec)
                ls.append(len(si))
                lt.append(len(ti))
    finally:
        writer.close()
    return {"examples": len(ls), "empty": empty, "empty_after_tokenization": empty_tok, "num_bytes": num_bytes,
            "source_lengths": np.asarray(ls, np.int32), "target_lengths": np.asarray(lt, np.int32)}


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# Native libraries with thread pools that a forked child inherits broken (array_record's
# writer/reader pool segfaults in a child forked after the parent used it; JAX warns).
_THREADED = ("array_record", "grain", "jax", "tensorflow", "torch")


def _start_method() -> str:
    """fork (fast, and no `if __name__ == "__main__"` guard needed in the calling script)
    unless this process has loaded a library whose threads a fork would break; then spawn,
    which re-imports the main module (the CLI and pytest guard theirs)."""
    loaded = {name.split(".")[0] for name in list(sys.modules)}
    return "spawn" if sys.platform != "linux" or loaded.intersection(_THREADED) else "fork"


class _Workers:
    """`map(fn, tasks)` in task order: in this process (n == 1) or in n worker processes, with
    at most 2n tasks in flight so results never pile up."""

    def __init__(self, n: int):
        self.n, self.pool = n, None

    def __enter__(self):
        if self.n > 1:
            import multiprocessing

            self.pool = multiprocessing.get_context(_start_method()).Pool(self.n)
        return self

    def __exit__(self, exc_type, *_):
        if self.pool is not None:
            if exc_type is None:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()

    def map(self, fn, tasks):
        if self.pool is None:
            yield from map(fn, tasks)
            return
        pending = collections.deque()
        for t in tasks:
            pending.append(self.pool.apply_async(fn, (t,)))
            if len(pending) >= 2 * self.n:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _write_tfds(root: str, d, source, scans: dict, vocab_dir: str, workers: _Workers, stats: dict) -> dict:
    """Tokenises every split into array_record shards under `root` (the TFDS data_dir) and
    writes the metadata; returns {role_source / role_target: token lengths}."""
    folder = os.path.join(root, BUILDER_NAME, "1.0.0")
    os.makedirs(folder)
    lengths, shards = {}, {}
    for role, sc in scans.items():
        plan = sc.shards(SHARD_LINES)
        tasks = [(source.reader(role), shard, sc.names, d.normalization, d.empty_lines, vocab_dir,
                  os.path.join(folder, _shard_name(role, i, len(plan)))) for i, shard in enumerate(plan)]
        results = list(workers.map(_encode_task, tasks))
        st = stats[source.roles[role]]
        empty = sum(r["empty"] for r in results)
        st["dropped"] = {"empty": empty, "empty_after_tokenization": sum(r["empty_after_tokenization"] for r in results)}
        st["examples"] = sum(r["examples"] for r in results)
        if st["examples"] == 0:
            raise DataError(f"{sc.names[0]}: no usable sentence pairs after dropping {empty} with an empty side; "
                            f"check that {sc.names[0]} and {sc.names[1]} hold text")
        if empty:
            log.warning("%s: dropped %d of %d pairs with an empty side (data.empty_lines='skip')",
                        sc.names[0], empty, sc.lines)
        ls = np.concatenate([r["source_lengths"] for r in results])
        lt = np.concatenate([r["target_lengths"] for r in results])
        st["source_tokens"], st["target_tokens"] = int(ls.sum()), int(lt.sum())
        dtype = np.uint16 if max(ls.max(), lt.max()) <= np.iinfo(np.uint16).max else np.int32
        lengths[f"{role}_source"], lengths[f"{role}_target"] = ls.astype(dtype), lt.astype(dtype)
        # A shard whose every pair was dropped is left out (TFDS wants no empty files).
        kept = [(i, r) for i, r in enumerate(results) if r["examples"]]
        for j, (i, _) in enumerate(kept):
            old = os.path.join(folder, _shard_name(role, i, len(plan)))
            if len(kept) != len(plan):
                os.rename(old, os.path.join(folder, _shard_name(role, j, len(kept))))
        for i, r in enumerate(results):
            if not r["examples"]:
                os.remove(os.path.join(folder, _shard_name(role, i, len(plan))))
        shards[role] = [(r["examples"], r["num_bytes"]) for _, r in kept]
    _write_metadata(folder, shards)
    return lengths


def tfds_dir(prepared_dir: str) -> str:
    return os.path.join(prepared_dir, "tfds", BUILDER_NAME, "1.0.0")


def open_split(prepared_dir: str, role: str):
    """Random-access data source of a prepared split (tfds.data_source; no TensorFlow)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(tfds_dir(prepared_dir))
    return builder.as_data_source(role)


# ----------------------------------------------------------------------------------- prepare

def vocab_from_dir(d) -> str | None:
    """The vocab/ folder of the run named by data.vocab_from (checked), or None."""
    if not d.vocab_from:
        return None
    vdir = rundir.vocab_dir(os.path.expanduser(d.vocab_from))
    if not os.path.isfile(os.path.join(vdir, VOCAB_JSON)):
        raise DataError(f"data.vocab_from={d.vocab_from!r}: holds no vocabulary ({vdir}/{VOCAB_JSON} is missing); "
                        "give the workdir of a trained run")
    return vdir


def _folder_digest(folder: str) -> dict:
    return {n: _sha256(os.path.join(folder, n)) for n in sorted(os.listdir(folder))
            if not n.startswith(".") and os.path.isfile(os.path.join(folder, n))}


def settings_key(d) -> dict:
    """Every setting that changes the prepared output (lengths/buckets/batching do not: they are
    applied by the loader, so changing them reuses the cache). data.vocab_from counts by the
    contents of that run's vocabulary, not by its path."""
    vdir = vocab_from_dir(d)
    return {**({"vocab_from": _folder_digest(vdir)} if vdir else {}),
        "format": FORMAT_VERSION, "source": d.source, "src_lang": d.src_lang, "tgt_lang": d.tgt_lang,
        "splits": split_roles(d), "vocab_size": d.vocab_size, "joint_vocab": d.joint_vocab,
        "spm_model_type": d.spm_model_type, "spm_character_coverage": d.spm_character_coverage,
        "spm_sample_size": d.spm_sample_size,  # (data.prepare_workers is not here: same output)
        "normalization": d.normalization, "empty_lines": d.empty_lines,
        "tfds_name": d.tfds_name if d.source == "tfds" else "",
    }


def prepared_path(config, source=None) -> tuple[str, dict]:
    """(prepared folder, manifest) for this config; the folder may not exist yet."""
    d = config.data
    source = source or make_source(d)
    manifest = {"settings": settings_key(d), "inputs": source.fingerprint()}
    key = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    manifest["key"] = key
    folder = f"{source.name()}_{d.src_lang}-{d.tgt_lang}_{key[:16]}"
    return os.path.join(cache_root(config), "prepared", folder), manifest


def is_prepared(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "manifest.json"))


def prepare(config, *, force: bool = False) -> str | None:
    """Prepares config's corpus if not cached; returns the prepared folder.

    Built-in tasks (data.source="task") need no preparation: returns None. All input problems
    raise DataError here, before any training.
    """
    d = config.data
    if d.source == "task":
        log.info("data.source='task': generated in memory, nothing to prepare")
        return None
    source = make_source(d)
    path, manifest = prepared_path(config, source)
    if is_prepared(path) and not force:
        log.info("reusing prepared data %s", path)
        return path
    # the folder appears complete or not at all; when another process prepared it first, that one is used
    with rundir.atomic_folder(path, replace=force, keep_existing=is_prepared) as tmp:
        t0 = time.time()
        _prepare_into(tmp, d, source, manifest)
        log.info("prepared %s in %.1fs", path, time.time() - t0)
    return path


def spm_sample(lines: int, pairs: int, seed: int = SPM_SAMPLE_SEED):
    """Sorted line numbers of a seeded sample of `pairs` of `lines` training pairs (O(pairs)
    memory), or None for every line (a corpus no larger than the sample, or pairs == 0)."""
    if pairs <= 0 or lines <= pairs:
        return None
    rng = np.random.default_rng(seed)
    picks = np.unique(rng.integers(0, lines, size=pairs + pairs // 8 + 16))
    while len(picks) < pairs:
        picks = np.unique(np.concatenate([picks, rng.integers(0, lines, size=pairs - len(picks) + 16)]))
    return np.sort(rng.choice(picks, pairs, replace=False))


def resolve_workers(d, lines: int) -> int:
    """Processes prepare uses: data.prepare_workers (0 = every core), but one (this process) for
    a corpus of at most one shard, where starting processes costs more than it saves."""
    n = d.prepare_workers or available_cores()
    return 1 if lines <= SHARD_LINES else max(1, n)


def _prepare_into(out: str, d, source, manifest: dict) -> None:
    roles = source.roles
    # 1. The cheap validation pass (streaming; every split, both sides): all input errors --
    #    missing, empty or misaligned files, invalid UTF-8, empty lines with empty_lines=error --
    #    surface before the slow work, naming the file and line.
    t0 = time.time()
    scans = {role: source.scan(role, SHARD_LINES, find_empty=d.empty_lines == "error") for role in roles}
    t1 = time.time()
    stats = {roles[r]: {"role": r, "lines": sc.lines, "dropped": {}} for r, sc in scans.items()}
    n_workers = resolve_workers(d, sum(sc.lines for sc in scans.values()))
    log.info("prepare: %d lines in %s, %d worker(s)", sum(sc.lines for sc in scans.values()),
             ", ".join(f"{roles[r]}={sc.lines}" for r, sc in scans.items()), n_workers)

    vocab_dir = os.path.join(out, "vocab")
    os.makedirs(vocab_dir)
    try:
        with _Workers(n_workers) as workers:
            # 2. SentencePiece on (a seeded sample of) the training split only: never on valid/test.
            reused = vocab_from_dir(d)
            if reused:  # data.vocab_from: tokenise with that run's vocabulary, train nothing
                for name in _folder_digest(reused):
                    shutil.copyfile(os.path.join(reused, name), os.path.join(vocab_dir, name))
                log.info("data.vocab_from: tokenising with the vocabulary of %s", d.vocab_from)
            else:
                _train_vocab(vocab_dir, d, source, scans["train"], workers, stats[roles["train"]])
            t = time.time()
            log.info("prepare: validation pass %.1fs, vocabulary %.1fs", t1 - t0, t - t1)
            # 3. Tokenise every split once into array_record shards.
            lengths = _write_tfds(os.path.join(out, "tfds"), d, source, scans, vocab_dir, workers, stats)
            log.info("prepare: tokenised and wrote %d examples in %.1fs",
                     sum(st.get("examples", 0) for st in stats.values()), time.time() - t)
    finally:
        _CACHE.clear()
    src_vocab, tgt_vocab = read_vocab_dir(vocab_dir)
    np.savez(os.path.join(out, "lengths.npz"), **lengths)

    # 4. The metadata, manifest last.
    manifest = dict(manifest, roles=roles, vocab_size={"source": src_vocab.vocab_size,
                                                      "target": tgt_vocab.vocab_size})
    with open(os.path.join(out, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2, sort_keys=True)
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)


def _train_vocab(vocab_dir: str, d, source, scan: SplitScan, workers: _Workers, train_stats: dict) -> None:
    """Trains the SentencePiece model(s) on a seeded sample of data.spm_sample_size sentences
    per model (a joint model: half the pairs, both sides) and writes vocab.json."""
    t = time.time()
    per_model = d.spm_sample_size
    picks = spm_sample(scan.lines, -(-per_model // 2) if d.joint_vocab else per_model)
    tasks = []
    for shard in scan.shards(SHARD_LINES):
        mine = None
        if picks is not None:
            lo, hi = np.searchsorted(picks, [shard[0], shard[1]])
            mine = picks[lo:hi]
            if not len(mine):
                continue
        tasks.append((source.reader("train"), shard, scan.names, mine, d.normalization, d.empty_lines))
    pairs = [p for chunk in workers.map(_sample_task, tasks) for p in chunk]
    sname, tname = scan.names
    if not pairs:
        raise DataError(f"{sname}: no usable sentence pairs (every sampled pair has an empty side); "
                        f"check that {sname} and {tname} hold text")
    train_stats["spm_sample_pairs"] = len(pairs)
    log.info("SentencePiece: training on %d of %d training pairs (sampled in %.1fs)", len(pairs), scan.lines,
             time.time() - t)
    spm_args = dict(vocab_size=d.vocab_size, model_type=d.spm_model_type,
                    character_coverage=d.spm_character_coverage)
    if d.joint_vocab:
        src = [s for s, _ in pairs] + [t for _, t in pairs]
        del pairs
        src_vocab = tgt_vocab = train_sentencepiece(src, os.path.join(vocab_dir, "spm"),
                                                    what=f"{sname} + {tname}", **spm_args)
    else:
        src, tgt = [s for s, _ in pairs], [t for _, t in pairs]
        del pairs
        src_vocab = train_sentencepiece(src, os.path.join(vocab_dir, "source"), what=sname, **spm_args)
        tgt_vocab = train_sentencepiece(tgt, os.path.join(vocab_dir, "target"), what=tname, **spm_args)
    for f in os.listdir(vocab_dir):  # human-readable piece lists are not needed at run time
        if f.endswith(".vocab"):
            os.remove(os.path.join(vocab_dir, f))
    write_vocab_json(vocab_dir, src_vocab, tgt_vocab)


def load_prepared(path: str):
    """(manifest, stats, lengths dict, (source_vocab, target_vocab)) of a prepared folder."""
    with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    with open(os.path.join(path, "stats.json"), encoding="utf-8") as f:
        stats = json.load(f)
    with np.load(os.path.join(path, "lengths.npz")) as z:
        lengths = {k: z[k] for k in z.files}
    return manifest, stats, lengths, read_vocab_dir(os.path.join(path, "vocab"))
