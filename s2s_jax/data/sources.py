"""Where prepare reads a corpus from: a folder of line-aligned text files or a TFDS dataset.

A source knows its splits (`roles`: train / valid / test -> split name), fingerprints its inputs
for the cache key, runs the cheap validation pass (`scan`: sizes, shard offsets, the input
errors) and describes, as a picklable tuple (`reader`), how a worker reads a shard of a split;
`read_blocks` is that reading, BLOCK_LINES lines at a time.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import logging
import os
import re

import numpy as np

from s2s_jax.data.errors import DataError
from s2s_jax.data.text import as_text, check_aligned, check_file, empty_line_error, scan_lines
from s2s_jax.data.workers import worker_cache
from s2s_jax.rundir import file_digest

log = logging.getLogger(__name__)

BLOCK_LINES = 10_000  # lines a worker holds at once


def split_roles(d) -> dict[str, str]:
    """{role: split name} for the configured, non-empty split names (train is required)."""
    roles = {"train": d.train_split, "valid": d.valid_split, "test": d.test_split}
    if not d.train_split:
        raise DataError("data.train_split is empty; set it to the training split's name, e.g. train")
    return {r: s for r, s in roles.items() if s}


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
                check_file(path)
                out[os.path.basename(path)] = {"size": os.path.getsize(path), "sha256": file_digest(path)}
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
        tf_missing = find_spec("tensorflow") is None
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


def find_spec(name):
    """importlib's find_spec, None where the module is not installed (or its parent is not)."""
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _is_prepared(builder) -> bool:
    try:
        return bool(builder.info.splits) and os.path.isdir(str(builder.data_dir))
    except Exception:  # noqa: BLE001 - any failure means "not usable as is"
        return False


def make_source(d):
    if d.source == "text":
        if not d.dir:
            raise DataError("data.dir is empty; set --set data.dir=PATH/TO/CORPUS for data.source='text'")
        return TextFolderSource(d)
    if d.source == "tfds":
        return TfdsSource(d)
    raise DataError(f"data.source={d.source!r} needs no preparation (built-in tasks are generated in memory)")


def read_blocks(reader: tuple, shard: tuple, names: tuple, picks=None):
    """Yields (1-based first line, source strings, target strings) of a shard's raw lines, at
    most BLOCK_LINES at a time; with `picks` (sorted absolute line numbers) only those lines
    matter (TFDS reads only them; text reads the block and keeps them)."""
    start, stop, offsets = shard
    if reader[0] == "tfds":
        _, bdir, split, sk, tk = reader
        ds = worker_cache(("tfds", bdir, split), lambda: _tfds_split(bdir, split))
        wanted = picks if picks is not None else range(start, stop)
        for i in range(0, len(wanted), BLOCK_LINES):
            idx = [int(j) for j in wanted[i:i + BLOCK_LINES]]
            recs = ds.__getitems__(idx) if hasattr(ds, "__getitems__") else [ds[j] for j in idx]
            yield idx, [as_text(r[sk]) for r in recs], [as_text(r[tk]) for r in recs]
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
