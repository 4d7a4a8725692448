"""prepare(config): raw parallel text -> normalised, SentencePiece-tokenised TFDS array_record.

Runs once per corpus and setting; the result is cached under `data.cache_dir` in a folder keyed
by a hash of the inputs' contents (size + sha256 of every file, or the TFDS dataset's identity)
and of every setting that changes the output. Layout of a prepared folder:

    manifest.json   key, settings, inputs, split name -> role
    stats.json      per split: lines read, examples kept, dropped by reason
    vocab/          vocab.json + SentencePiece model file(s) (copied to workdir/vocab by build_data)
    lengths.npz     per role: int32 token counts of source and target (for the batch plan,
                    so the loader never decodes every record to learn lengths)
    tfds/           the TFDS dataset (array_record): splits "train" / "valid" / "test" (roles),
                    features source int32[None], target int32[None], source_text, target_text

It is built in a temporary sibling folder and renamed into place, so a crash never leaves a
half-written cache and concurrent processes (one per host) can race safely.
Nothing here imports TensorFlow (TFDS writes array_record without it) or JAX.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
import uuid

import numpy as np

from s2s_jax.data.errors import DataError
from s2s_jax.data.text import clean_pairs, read_lines, read_parallel
from s2s_jax.data.tokenizer import train_sentencepiece
from s2s_jax.vocab import VOCAB_JSON, read_vocab_dir, write_vocab_json

log = logging.getLogger(__name__)

# Bump when the prepared layout or the tokenisation changes: old caches are then rebuilt.
FORMAT_VERSION = 1
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
                read_lines_check_exists(path)
                out[os.path.basename(path)] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
        return {"kind": "text", "files": out}

    def name(self) -> str:
        return os.path.basename(self.dir.rstrip("/")) or "text"

    def raw(self, role: str):
        """(source lines, target lines, source file, target file) of a split."""
        sp, tp = self.paths(role)
        src, tgt = read_parallel(sp, tp)
        return src, tgt, sp, tp


def read_lines_check_exists(path: str) -> None:
    if not os.path.isfile(path):
        read_lines(path)  # raises the DataError naming the file and what the folder holds


class TfdsSource:
    """A TFDS catalogue dataset already prepared in array_record, read with tfds.data_source.

    Building a catalogue dataset goes through tf.data and so needs TensorFlow; without it we
    stop with a DataError that says how to install it and prepare the dataset once.
    """

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

    def raw(self, role: str):
        ds = self.builder.as_data_source(self.splits[role])
        src, tgt = [], []
        for i in range(len(ds)):
            ex = ds[i]
            src.append(_to_str(ex[self.d.src_lang]))
            tgt.append(_to_str(ex[self.d.tgt_lang]))
        label = f"tfds:{self.d.tfds_name}[{self.splits[role]}]"
        return src, tgt, f"{label}.{self.d.src_lang}", f"{label}.{self.d.tgt_lang}"


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

_BUILDER_CLASS = None


def _builder_class():
    """The GeneratorBasedBuilder that writes prepared splits (defined lazily: importing TFDS
    costs ~0.4 s, which `import s2s_jax.data` should not pay)."""
    global _BUILDER_CLASS
    if _BUILDER_CLASS is not None:
        return _BUILDER_CLASS
    import tensorflow_datasets as tfds

    class S2sJaxPrepared(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Tokenised parallel text; examples in corpus order (shuffling happens in the loader)."""

        name = BUILDER_NAME
        VERSION = tfds.core.Version("1.0.0")

        # TFDS looks for a checksums file next to a builder's code, resolving the package through
        # `importlib_resources` (not installed); this builder downloads nothing, so it has none.
        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            return None

        def __init__(self, *, examples=None, **kwargs):
            self._examples = examples or {}  # role -> list of feature dicts
            super().__init__(**kwargs)

        def _info(self):
            seq = tfds.features.Tensor(shape=(None,), dtype=np.int32)  # one blob: fast to read
            return tfds.core.DatasetInfo(
                builder=self,
                description="s2s_jax prepared parallel text (SentencePiece ids + normalised text).",
                features=tfds.features.FeaturesDict({
                    "source": seq, "target": seq,
                    "source_text": tfds.features.Text(), "target_text": tfds.features.Text()}),
                # Keep corpus order, so record i is line i (after empty-line drops) and eval
                # batches/BLEU references line up without a separate index.
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            return {role: self._generate_examples(exs) for role, exs in self._examples.items()}

        def _generate_examples(self, examples):
            for i, ex in enumerate(examples):
                yield i, ex

    _BUILDER_CLASS = S2sJaxPrepared
    return S2sJaxPrepared


def _write_tfds(out_dir: str, examples: dict) -> None:
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    cls = _builder_class()
    builder = cls(examples=examples, data_dir=out_dir, file_format="array_record")
    # TFDS prints "Downloading and preparing dataset ..." banners on stdout; keep stdout clean
    # (the CLI may print JSON there) and send them to the log instead.
    banner = io.StringIO()
    with contextlib.redirect_stdout(banner):
        builder.download_and_prepare(download_dir=os.path.join(out_dir, "downloads"))
    if banner.getvalue().strip():
        log.debug("tfds: %s", banner.getvalue().strip())
    shutil.rmtree(os.path.join(out_dir, "downloads"), ignore_errors=True)


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
    vdir = os.path.join(os.path.expanduser(d.vocab_from), "vocab")
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
    root = os.path.dirname(path)
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-{os.path.basename(path)}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        t0 = time.time()
        _prepare_into(tmp, d, source, manifest)
        log.info("prepared %s in %.1fs", path, time.time() - t0)
        if force and os.path.isdir(path):
            shutil.rmtree(path)
        try:
            os.rename(tmp, path)  # atomic: the folder appears complete or not at all
        except OSError:
            if not is_prepared(path):
                raise
            log.info("another process prepared %s first; using it", path)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _prepare_into(out: str, d, source, manifest: dict) -> None:
    roles = source.roles
    # 1. Read, validate and normalise every split first: all input errors surface before the
    #    (slow) tokenizer training.
    pairs, stats = {}, {}
    for role in roles:
        src, tgt, sname, tname = source.raw(role)
        kept, _, empty = clean_pairs(src, tgt, d.normalization, d.empty_lines, src_name=sname, tgt_name=tname)
        if not kept:
            raise DataError(f"{sname}: no usable sentence pairs after dropping {empty} with an empty side; "
                            f"check that {sname} and {tname} hold text")
        pairs[role] = kept
        stats[roles[role]] = {"role": role, "lines": len(src), "dropped": {"empty": empty}}
        if empty:
            log.warning("%s: dropped %d of %d pairs with an empty side (data.empty_lines='skip')",
                        sname, empty, len(src))

    # 2. SentencePiece on the training split only (never on valid/test: no leakage).
    vocab_dir = os.path.join(out, "vocab")
    os.makedirs(vocab_dir)
    train_src = [s for s, _ in pairs["train"]]
    train_tgt = [t for _, t in pairs["train"]]
    what = (f"{source.paths('train')[0]} + {source.paths('train')[1]}" if isinstance(source, TextFolderSource)
            else f"tfds:{d.tfds_name} train split")
    spm_args = dict(vocab_size=d.vocab_size, model_type=d.spm_model_type,
                    character_coverage=d.spm_character_coverage)
    reused = vocab_from_dir(d)
    if reused:  # data.vocab_from: tokenise with that run's vocabulary, train nothing
        for name in _folder_digest(reused):
            shutil.copyfile(os.path.join(reused, name), os.path.join(vocab_dir, name))
        src_vocab, tgt_vocab = read_vocab_dir(vocab_dir)
        log.info("data.vocab_from: tokenising with the vocabulary of %s", d.vocab_from)
    elif d.joint_vocab:
        src_vocab = tgt_vocab = train_sentencepiece(train_src + train_tgt, os.path.join(vocab_dir, "spm"),
                                                    what=what, **spm_args)
    else:
        src_vocab = train_sentencepiece(train_src, os.path.join(vocab_dir, "source"), what=what.split(" + ")[0], **spm_args)
        tgt_vocab = train_sentencepiece(train_tgt, os.path.join(vocab_dir, "target"), what=what.split(" + ")[-1], **spm_args)
    for suffix in (".vocab",):  # human-readable piece lists are not needed at run time
        for f in os.listdir(vocab_dir):
            if f.endswith(suffix):
                os.remove(os.path.join(vocab_dir, f))
    if not reused:
        write_vocab_json(vocab_dir, src_vocab, tgt_vocab)

    # 3. Tokenise every split once; drop (and count) pairs a side of which encodes to nothing.
    examples, lengths = {}, {}
    for role, ps in pairs.items():
        s_ids = src_vocab.encode_batch([s for s, _ in ps])
        t_ids = tgt_vocab.encode_batch([t for _, t in ps])
        exs, ls, lt = [], [], []
        empty = 0
        for (s, t), si, ti in zip(ps, s_ids, t_ids):
            if not si or not ti:
                empty += 1
                continue
            exs.append({"source": np.asarray(si, np.int32), "target": np.asarray(ti, np.int32),
                        "source_text": s, "target_text": t})
            ls.append(len(si))
            lt.append(len(ti))
        st = stats[roles[role]]
        st["dropped"]["empty_after_tokenization"] = empty
        st["examples"] = len(exs)
        st["source_tokens"] = int(sum(ls))
        st["target_tokens"] = int(sum(lt))
        examples[role] = exs
        lengths[f"{role}_source"] = np.asarray(ls, np.int32)
        lengths[f"{role}_target"] = np.asarray(lt, np.int32)
    np.savez(os.path.join(out, "lengths.npz"), **lengths)

    # 4. Write the TFDS dataset (array_record) and the metadata, manifest last.
    _write_tfds(os.path.join(out, "tfds"), examples)
    manifest = dict(manifest, roles=roles, vocab_size={"source": src_vocab.vocab_size,
                                                      "target": tgt_vocab.vocab_size})
    with open(os.path.join(out, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2, sort_keys=True)
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)


def load_prepared(path: str):
    """(manifest, stats, lengths dict, (source_vocab, target_vocab)) of a prepared folder."""
    with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    with open(os.path.join(path, "stats.json"), encoding="utf-8") as f:
        stats = json.load(f)
    with np.load(os.path.join(path, "lengths.npz")) as z:
        lengths = {k: z[k] for k in z.files}
    return manifest, stats, lengths, read_vocab_dir(os.path.join(path, "vocab"))
