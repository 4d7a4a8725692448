"""Data layer: input validation, prepare cache, bucketing, multi-process plans, iterator state.

Real text comes from the first lines of ../shared/data/multi30k (written to tmp_path; corpora are
never copied into the repo). Everything runs on CPU in well under a minute.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import s2s_jax.data as D
from s2s_jax import rundir
from s2s_jax.config import Config, DataConfig, UserError
from s2s_jax.data import cache, pipeline, sources
from s2s_jax.data import preprocess as prep_mod

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")
MULTI30K = os.path.join(SHARED, "multi30k")
TATOEBA = os.path.join(SHARED, "tatoeba_fra_eng")
TINY_CONFIG = os.path.join(REPO, "experiments", "configs", "tiny.py")


def _cfg(**data) -> Config:
    return Config(data=DataConfig(**data))


def _write_corpus(folder, files: dict) -> str:
    os.makedirs(folder, exist_ok=True)
    for name, content in files.items():
        mode = "wb" if isinstance(content, bytes) else "w"
        with open(os.path.join(folder, name), mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
            f.write(content)
    return str(folder)


def _tiny(n=30, **overrides):
    files = {}
    for split in ("train", "valid", "test"):
        files[f"{split}.en"] = "".join(f"the cat number {i} sat on the mat\n" for i in range(n))
        files[f"{split}.de"] = "".join(f"die katze nummer {i} sass auf der matte\n" for i in range(n))
    files.update(overrides)
    return files


@pytest.fixture(scope="module")
def m30k(tmp_path_factory):
    """First lines of Multi30k (train 2000, valid/test 300) in a tmp folder, plus a cache dir."""
    if not os.path.isdir(MULTI30K):
        pytest.skip("../shared/data/multi30k not available")
    root = tmp_path_factory.mktemp("m30k")
    corpus = root / "corpus"
    corpus.mkdir()
    for split, n in (("train", 2000), ("valid", 300), ("test", 300)):
        for lang in ("en", "de"):
            with open(os.path.join(MULTI30K, f"{split}.{lang}"), encoding="utf-8") as f:
                lines = [next(f) for _ in range(n)]
            (corpus / f"{split}.{lang}").write_text("".join(lines), encoding="utf-8")
    return {"dir": str(corpus), "cache": str(root / "cache")}


def _m30k_cfg(m30k, **kw) -> Config:
    base = dict(source="text", dir=m30k["dir"], cache_dir=m30k["cache"], vocab_size=400,
                buckets=((12, 14), (20, 22), (32, 34), (64, 65)), batch_tokens=600, prefetch=2,
                max_dropped_fraction=0.05)  # a 400-piece vocabulary makes ~1 % of the pairs longer than 64
    base.update(kw)
    return _cfg(**base)


@pytest.fixture(scope="module")
def m30k_data(m30k):
    return D.build_data(_m30k_cfg(m30k))


def _epoch(data, state=None):
    it = data.train_batches(state)
    return [next(it) for _ in range(data.stats["train_batches_per_epoch"])], it


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("case", ["missing_split", "missing_lang", "counts", "utf8", "empty_file", "empty_line"])
def test_bad_input_names_file(tmp_path, case):
    files = _tiny()
    expect = []
    kw = {}
    if case == "missing_split":
        del files["valid.en"], files["valid.de"]
        expect = ["valid.en", "no such file"]
    elif case == "missing_lang":
        del files["train.de"]
        expect = ["train.de", "no such file"]
    elif case == "counts":
        files["test.de"] = files["test.de"] + "ein extra satz\n"
        expect = ["test.en", "test.de", "30", "31"]
    elif case == "utf8":
        files["train.en"] = ("ok line\n" * 6 + "bad \xff line\n").encode("latin-1")
        files["train.de"] = "zeile\n" * 7
        expect = ["train.en", "line 7", "UTF-8"]
    elif case == "empty_file":
        files["valid.de"] = ""
        expect = ["valid.de", "empty"]
    elif case == "empty_line":
        lines = files["train.de"].splitlines(keepends=True)
        lines[4] = "  \u00a0 \n"  # only (non-breaking) spaces: empty after normalisation
        files["train.de"] = "".join(lines)
        kw = {"empty_lines": "error"}
        expect = ["train.de", "line 5", "empty_lines"]
    folder = _write_corpus(tmp_path / "c", files)
    with pytest.raises(D.DataError) as e:
        D.build_data(_cfg(source="text", dir=folder, cache_dir=str(tmp_path / "cache"), vocab_size=35, **kw))
    assert isinstance(e.value, UserError)
    msg = str(e.value)
    for piece in expect:
        assert piece in msg, (piece, msg)
    assert str(tmp_path / "c") in msg or case == "counts" and "test.en" in msg
    # Nothing half-written is left in the cache.
    prepared = tmp_path / "cache" / "prepared"
    assert not prepared.exists() or not any(p.name.startswith(".tmp") for p in prepared.iterdir())


def test_empty_lines_skipped_and_counted(tmp_path):
    files = _tiny()
    lines = files["train.en"].splitlines(keepends=True)
    lines[3] = "\n"
    lines[10] = "   \n"
    files["train.en"] = "".join(lines)
    folder = _write_corpus(tmp_path / "c", files)
    data = D.build_data(_cfg(source="text", dir=folder, cache_dir=str(tmp_path / "cache"), vocab_size=35))
    assert data.stats["dropped"]["train"]["empty"] == 2
    assert data.stats["examples"]["train"] == 28
    assert data.stats["lines"]["train"] == 30


def test_vocab_too_large_says_what_works(tmp_path):
    folder = _write_corpus(tmp_path / "c", _tiny())
    with pytest.raises(D.DataError) as e:
        D.prepare(_cfg(source="text", dir=folder, cache_dir=str(tmp_path / "cache"), vocab_size=5000))
    msg = str(e.value)
    assert "train.en" in msg and "data.vocab_size" in msg and "at most" in msg
    limit = int(msg.split("at most ")[1].split()[0].rstrip(";.,"))
    # The size the message suggests does work.
    D.prepare(_cfg(source="text", dir=folder, cache_dir=str(tmp_path / "cache"), vocab_size=limit))


def test_tfds_dataset_missing_says_how_to_install(tmp_path):
    with pytest.raises(D.DataError) as e:
        D.prepare(_cfg(source="tfds", tfds_name="no_such_translate_ds/de-en", tfds_data_dir=str(tmp_path)))
    msg = str(e.value)
    if sources.find_spec("tensorflow") is None:
        assert "pip install tensorflow-cpu" in msg and "no_such_translate_ds" in msg
    else:
        assert "no_such_translate_ds" in msg


def test_tfds_source_prepared_array_record(tmp_path):
    """A TFDS dataset already in array_record is read with tfds.data_source, no TensorFlow."""
    import tensorflow_datasets as tfds

    class TinyTranslate(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "tiny_translate"
        VERSION = tfds.core.Version("1.0.0")
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"en": tfds.features.Text(), "de": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(40), "validation": self._generate_examples(10)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"en": f"the dog {i} runs", "de": f"der hund {i} rennt"}

    TinyTranslate(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare(
        download_dir=str(tmp_path / "dl"))
    cfg = _cfg(source="tfds", tfds_name="tiny_translate", tfds_data_dir=str(tmp_path / "tfds"),
               src_lang="en", tgt_lang="de", test_split="", cache_dir=str(tmp_path / "cache"), vocab_size=30)
    data = D.build_data(cfg)
    assert data.stats["examples"] == {"train": 40, "valid": 10}  # "valid" falls back to "validation"
    pairs = data.eval_examples("valid")
    assert sorted(pairs) == sorted((f"the dog {i} runs", f"der hund {i} rennt") for i in range(10))
    assert "tensorflow" not in sys.modules


# ------------------------------------------------------------------------------ normalisation

def test_nfkc_maps_tatoeba_spaces():
    assert D.normalize("Cours\u202f!", "nfkc") == "Cours !"
    assert D.normalize("10\u00a0000 \ufb01n", "nfkc") == "10 000 fin"
    # NFC keeps compatibility characters but still maps every kind of space to ' '.
    assert D.normalize("Cours\u202f!\u00a0", "nfc") == "Cours !"
    assert D.normalize("\ufb01\u2009x", "none") == "\ufb01 x"
    if os.path.isdir(TATOEBA):
        with open(os.path.join(TATOEBA, "train.fr"), encoding="utf-8") as f:
            lines = [line for line, _ in zip(f, range(20000)) if "\u202f" in line or "\u00a0" in line]
        assert lines, "expected Tatoeba lines with narrow/non-breaking spaces"
        for line in lines:
            out = D.normalize(line, "nfkc")
            assert "\u202f" not in out and "\u00a0" not in out and out == out.strip()


# ------------------------------------------------------------------------------ prepare cache

def test_prepare_cache_reused_and_keyed(m30k, monkeypatch, tmp_path):
    cfg = _m30k_cfg(m30k)
    path = D.prepare(cfg)
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    assert manifest["inputs"]["files"]["train.en"]["size"] > 0

    def no_training(*a, **k):
        raise AssertionError("SentencePiece was retrained although the cache is valid")

    monkeypatch.setattr(prep_mod, "train_sentencepiece", no_training)
    assert D.prepare(cfg) == path
    # Loader-only settings (lengths, buckets, batching, seed) reuse the same prepared data.
    assert D.prepare(_m30k_cfg(m30k, max_source_length=20, buckets=(), batch_size=8, batch_tokens=0,
                               shuffle_seed=3)) == path
    # A setting that changes the output gives another cache entry (it would need training).
    for change in ({"vocab_size": 300}, {"normalization": "nfc"}, {"joint_vocab": False}):
        with pytest.raises(AssertionError, match="retrained"):
            D.prepare(_m30k_cfg(m30k, **change))
    # So does a change of the input files' contents (same size, one byte differs).
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in os.listdir(m30k["dir"]):
        text = open(os.path.join(m30k["dir"], name), encoding="utf-8").read()
        if name == "valid.de":
            text = text.replace("Ein", "Eine", 1).replace("ein ", "en ", 1)
        (copy / name).write_text(text, encoding="utf-8")
    other, _ = cache.prepared_path(_m30k_cfg(m30k, dir=str(copy)))
    assert os.path.basename(other)[-16:] != os.path.basename(path)[-16:]


def test_prepare_crash_leaves_no_cache(tmp_path, monkeypatch):
    folder = _write_corpus(tmp_path / "c", _tiny())
    cfg = _cfg(source="text", dir=folder, cache_dir=str(tmp_path / "cache"), vocab_size=35)

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep_mod, "_write_tfds", crash)
    with pytest.raises(KeyboardInterrupt):
        D.prepare(cfg)
    assert os.listdir(tmp_path / "cache" / "prepared") == []
    monkeypatch.undo()
    path = D.prepare(cfg)
    assert cache.is_prepared(path)


# ------------------------------------------------------------------------------ batches

def test_batches_shapes_and_contents(m30k_data):
    data = m30k_data
    shapes = {tuple(s) for s in data.stats["buckets"]}
    batches, _ = _epoch(data)
    seen_shapes = set()
    n_tail = len(shapes)  # the epoch's last batches may hold leftovers moved up to a larger bucket
    for pos, b in enumerate(batches):
        s, t = b["source"].shape[1], b["target_input"].shape[1]
        seen_shapes.add((s, t))
        assert (s, t) in shapes
        assert b["target_output"].shape == b["target_input"].shape
        for k in D.FIELDS:
            assert b[k].dtype == np.int32 and b[k].shape[0] == b["source"].shape[0]
        real = b["index"] >= 0
        # filler rows: all zeros, lengths 0
        assert not b["source"][~real].any() and not b["target_input"][~real].any()
        assert not b["source_lengths"][~real].any() and not b["target_lengths"][~real].any()
        for row in np.nonzero(real)[0]:
            sl, tl = b["source_lengths"][row], b["target_lengths"][row]
            assert sl >= 1 and tl >= 2 and sl <= s and tl <= t
            assert not b["source"][row, sl:].any() and b["source"][row, :sl].all()
            assert b["target_input"][row, 0] == D.BOS_ID and b["target_output"][row, tl - 1] == D.EOS_ID
            np.testing.assert_array_equal(b["target_input"][row, 1:tl], b["target_output"][row, :tl - 1])
            assert not b["target_output"][row, tl:].any()
            # the cheapest bucket that holds it
            cheaper = [(S, T) for S, T in shapes if pipeline.bucket_cost((S, T)) < pipeline.bucket_cost((s, t))]
            assert pos >= len(batches) - n_tail or not any(sl <= S and tl <= T for S, T in cheaper)
    assert len(seen_shapes) > 1
    # token-based rows, OpenNMT-py's rule: rows x max(S, T + 1) <= batch_tokens for each bucket
    for (S, T), rows in zip(data.stats["buckets"], data.stats["bucket_rows"]):
        assert rows == 600 // max(S, T + 1)


def test_length_filter_counted(m30k):
    short = dict(max_source_length=12, max_target_length=12, buckets=())
    # more than data.max_dropped_fraction (1 %) would go: refused, saying how many
    with pytest.raises(D.DataError, match=r"would drop (\d+) of 2000 training pairs .*data.max_dropped_fraction") as e:
        D.build_data(_m30k_cfg(m30k, **short))
    data = D.build_data(_m30k_cfg(m30k, max_dropped_fraction=1.0, **short))
    dropped = data.stats["dropped"]["train"]
    assert f"drop {sum(dropped.values())} of 2000" in str(e.value)
    assert sum(dropped.values()) + data.stats["examples"]["train"] == 2000
    assert dropped["source_longer_than_12"] > 0 and dropped["target_longer_than_12"] > 0
    batches, _ = _epoch(data)
    assert {(b["source"].shape[1], b["target_input"].shape[1]) for b in batches} == {(12, 13)}
    assert all((b["source_lengths"] <= 12).all() and (b["target_lengths"] <= 13).all() for b in batches)


@pytest.mark.parametrize("source", ["task", "text", "text_auto_unpooled"])
def test_epoch_exactly_once_across_processes(m30k, source):
    if source == "task":
        cfg = _cfg(source="task", task="reverse", task_train_size=1500, task_eval_size=50,
                   buckets=((8, 9), (16, 17), (24, 25)), batch_tokens=400)
    elif source == "text":
        cfg = _m30k_cfg(m30k, buckets=(), max_buckets=6)  # auto buckets, pooled (the default)
    else:
        cfg = _m30k_cfg(m30k, pool_batches=0)
    reference_shapes = None
    for procs in (1, 2, 4):
        # batch_multiple * procs = 8 for every count: the rows (and so the plan) are equal
        datas = [D.build_data(cfg, process_index=p, process_count=procs, batch_multiple=8 // procs)
                 for p in range(procs)]
        n_batches = datas[0].stats["train_batches_per_epoch"]
        assert all(d.stats["train_batches_per_epoch"] == n_batches for d in datas)
        per_proc = [_epoch(d)[0] for d in datas]
        shapes = [[(b["source"].shape, b["target_input"].shape) for b in bs] for bs in per_proc]
        assert all(s == shapes[0] for s in shapes), "processes disagree on the bucket sequence"
        seen = np.concatenate([b["index"] for bs in per_proc for b in bs])
        seen = seen[seen >= 0]
        n = datas[0].stats["examples"]["train"]
        assert len(seen) == n and len(np.unique(seen)) == n
        for rows in datas[0].stats["bucket_rows"]:
            assert rows % 8 == 0
        for b in per_proc[0]:
            assert b["source"].shape[0] % (8 // procs) == 0
        # the global plan is the same whatever the process count: process p's rows are its
        # slice of the global batch (rows here are multiples of 4 * 2 for all counts)
        global_rows = [np.concatenate([bs[k]["index"] for bs in per_proc]) for k in range(n_batches)]
        if reference_shapes is None:
            reference_shapes = global_rows
        else:
            assert all(np.array_equal(a, b) for a, b in zip(global_rows, reference_shapes))


def test_restore_state_mid_epoch(m30k_data):
    data = m30k_data
    n = data.stats["train_batches_per_epoch"]
    it = data.train_batches()
    stream = [next(it) for _ in range(n + 7)]  # crosses into epoch 1
    for cut in (0, 5, n - 1, n, n + 3):
        it2 = data.train_batches()
        for _ in range(cut):
            next(it2)
        state = json.loads(json.dumps(it2.get_state()))  # JSON round trip, as in a checkpoint
        resumed = data.train_batches(state)
        for expected in stream[cut:cut + 4]:
            got = next(resumed)
            for k in expected:
                np.testing.assert_array_equal(got[k], expected[k])
    assert it.get_state() == {"epoch": 1, "batch": 7}


def test_restore_auto_buckets_mid_epoch_keeps_saved_shapes(m30k):
    cfg = _m30k_cfg(m30k, buckets=(), max_buckets=6)
    data = D.build_data(cfg)
    n = data.stats["train_batches_per_epoch"]
    stream, _ = _epoch(data)
    it = data.train_batches()
    for _ in range(n // 2):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state == {"epoch": 0, "batch": n // 2, "buckets": [list(s) for s in data.shapes]}
    # a fresh process (new Data) resumes bit-identically
    resumed = D.build_data(cfg).train_batches(state)
    for expected in stream[n // 2:n // 2 + 4]:
        got = next(resumed)
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k])
    # where the lengths would now give other buckets, the resumed run keeps the saved ones
    other = D.build_data(_m30k_cfg(m30k, buckets=(), max_buckets=3))
    assert other.shapes != data.shapes
    resumed = other.train_batches(state)
    assert other.shapes == data.shapes and other.stats["buckets"] == data.stats["buckets"]
    for expected in stream[n // 2:n // 2 + 4]:
        got = next(resumed)
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k])


def test_auto_buckets_on_real_lengths(m30k, m30k_data):
    """Real Multi30k lengths (2000 pairs, 400-piece vocabulary): deterministic, bounded, every
    kept pair has a bucket, and the padding is lower than with one bucket or the fixed four."""
    train = m30k_data._splits["train"]
    keep = (train.src_len <= 64) & (train.tgt_len <= 64)
    s, t = train.src_len[keep], train.tgt_len[keep]
    for k in (1, 3, 8):
        shapes = pipeline.auto_buckets(s, t, k, (64, 65))
        assert shapes == pipeline.auto_buckets(s[::-1].copy(), t[::-1].copy(), k, (64, 65))  # order-free
        assert 1 <= len(shapes) <= k and shapes[-1] == (64, 65)
        assert all(a % 2 == 0 or a == 64 for a, _ in shapes) and all(b % 2 == 0 or b == 65 for _, b in shapes)
        assert np.all(pipeline.assign_buckets(shapes, s, t) >= 0)
    eff = {}
    for name, kw in {"single": dict(buckets=(), max_buckets=1), "fixed4": {},
                     "auto8": dict(buckets=())}.items():
        data = D.build_data(_m30k_cfg(m30k, **kw))
        eff[name] = data.stats["padding_efficiency"]
        assert data.stats["examples"]["train"] == m30k_data.stats["examples"]["train"]
    # measured: single 0.41 / 0.47 (source / target), fixed4 0.63 / 0.71, auto8 0.82 / 0.88
    assert eff["single"]["target"] < 0.5 and eff["single"]["source"] < 0.45, eff
    assert eff["auto8"]["target"] > eff["fixed4"]["target"] + 0.1, eff
    assert eff["auto8"]["source"] > eff["fixed4"]["source"] + 0.1, eff
    assert eff["auto8"]["target"] >= 0.85, eff


def test_padding_efficiency_stat_matches_the_batches(m30k):
    data = D.build_data(_m30k_cfg(m30k, buckets=()))
    batches, _ = _epoch(data)
    real_s = sum(int(b["source_lengths"].sum()) for b in batches)
    real_t = sum(int(b["target_lengths"].sum()) for b in batches)
    pad_s = sum(b["source"].size for b in batches)
    pad_t = sum(b["target_output"].size for b in batches)
    eff = data.stats["padding_efficiency"]
    assert eff == {"source": round(real_s / pad_s, 4), "target": round(real_t / pad_t, 4)}
    assert f"source {eff['source']:.3f}, target {eff['target']:.3f}" in data.describe_plan()


def test_pooled_batches_hold_similar_lengths(m30k):
    spread, seen = {}, {}
    for pool in (0, 16):
        data = D.build_data(_m30k_cfg(m30k, pool_batches=pool))
        batches, _ = _epoch(data)
        real = [b["target_lengths"][b["index"] >= 0] for b in batches]
        spread[pool] = float(np.mean([np.ptp(r) for r in real if len(r) > 1]))
        idx = np.concatenate([b["index"] for b in batches])
        seen[pool] = np.sort(idx[idx >= 0])
        assert data.stats["pool_examples"] == (0 if pool == 0 else round(16 * np.mean(
            np.asarray(data.rows)[data.loader.bucket])))
    assert np.array_equal(seen[0], seen[16])  # the same examples, once each
    assert spread[16] < 0.3 * spread[0], spread  # measured: 3.8 vs 18.3 target positions
    # the pooled plan is a pure function of seed and epoch
    a = [b["index"] for b in _epoch(D.build_data(_m30k_cfg(m30k, pool_batches=16)))[0]]
    b = [b["index"] for b in _epoch(D.build_data(_m30k_cfg(m30k, pool_batches=16)))[0]]
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)


def test_batch_tokens_rule_counts_like_opennmt():
    d = DataConfig(batch_tokens=3000)
    # rows x max(source, target + BOS + EOS) <= batch_tokens; T counts EOS, so max(S, T + 1)
    assert pipeline.bucket_rows(d, [(10, 10), (30, 20), (12, 40)], 1) == [3000 // 11, 3000 // 30, 3000 // 41]
    assert pipeline.bucket_rows(d, [(30, 20)], 8) == [96]  # 100 rounded down to a multiple of 8
    assert pipeline.bucket_rows(DataConfig(batch_tokens=0, batch_size=64), [(10, 10), (30, 20)], 8) == [64, 64]


@pytest.mark.parametrize("field,value,expect", [("max_buckets", 0, "must be > 0"), ("max_buckets", 65, "at most 64"),
                                                ("pool_batches", -1, "must be >= 0")])
def test_batching_fields_validated(field, value, expect):
    from s2s_jax.config import ConfigError, validate

    with pytest.raises(ConfigError, match=f"data.{field}={value}.*{expect}"):
        validate(_cfg(**{field: value}))


def test_seed_determines_order(m30k):
    a = [b["index"] for b in _epoch(D.build_data(_m30k_cfg(m30k, shuffle_seed=1)))[0]]
    b = [b["index"] for b in _epoch(D.build_data(_m30k_cfg(m30k, shuffle_seed=1)))[0]]
    c = [b["index"] for b in _epoch(D.build_data(_m30k_cfg(m30k, shuffle_seed=2)))[0]]
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    # and epochs differ from each other
    data = D.build_data(_m30k_cfg(m30k, shuffle_seed=1))
    _, it = _epoch(data)
    e1 = [next(it)["index"] for _ in range(len(a))]
    assert not all(np.array_equal(x, y) for x, y in zip(a, e1))


def test_batch_size_rows_must_divide(m30k):
    with pytest.raises(D.DataError, match="data.batch_size"):
        D.build_data(_m30k_cfg(m30k, batch_tokens=0, batch_size=30), process_count=4, process_index=0)
    data = D.build_data(_m30k_cfg(m30k, batch_tokens=0, batch_size=32), process_count=4, process_index=3)
    b = next(data.train_batches())
    assert b["source"].shape[0] == 8


# ------------------------------------------------------------------------------ eval + vocab

def test_eval_batches_and_examples(m30k_data):
    data = m30k_data
    examples = data.eval_examples("valid")
    assert len(examples) == 300 and examples[0][0].startswith("A group of men")
    batches = data.eval_batches("valid")
    idx = np.concatenate([b["index"] for b in batches])
    assert sorted(idx[idx >= 0].tolist()) == list(range(300))
    shapes = {tuple(s) for s in data.stats["buckets"]}
    truncated = 0
    for b in batches:
        assert (b["source"].shape[1], b["target_input"].shape[1]) in shapes
        for row, i in enumerate(b["index"]):
            if i >= 0:
                src, tgt = examples[i]
                S, T = b["source"].shape[1], b["target_input"].shape[1]
                if len(data.source_vocab.encode(src)) <= S and len(data.target_vocab.encode(tgt)) < T:
                    assert data.source_vocab.decode(b["source"][row]) == src
                    assert data.target_vocab.decode(b["target_output"][row]) == tgt
                else:  # longer than the largest bucket: truncated, never dropped
                    truncated += 1
                    assert b["source_lengths"][row] <= S and b["target_lengths"][row] <= T
    assert truncated == data.stats.get("truncated", {}).get("valid", 0)
    limited = data.eval_batches("valid", limit=10)
    idx = np.concatenate([b["index"] for b in limited])
    assert sorted(idx[idx >= 0].tolist()) == list(range(10))
    assert data.eval_examples("valid", limit=10) == examples[:10]
    with pytest.raises(D.DataError, match="not configured"):
        data.eval_batches("dev")


def test_workdir_vocab_roundtrip(m30k, tmp_path):
    data = D.build_data(_m30k_cfg(m30k), workdir=str(tmp_path / "run"))
    src, tgt = rundir.read_vocabs(str(tmp_path / "run"))
    text = "Two young, White males are outside near many bushes."
    assert src.encode(text) == data.source_vocab.encode(text)
    assert tgt.decode(tgt.encode(text) + [D.EOS_ID, 7]) == text
    assert src.to_json() == data.source_vocab.to_json() and src.vocab_size == 400
    assert len(src.pieces(src.encode(text))) == len(src.encode(text))
    with pytest.raises(D.DataError, match="different vocabulary"):
        D.build_data(_m30k_cfg(m30k, vocab_size=300), workdir=str(tmp_path / "run"))
    # tasks: character vocabulary
    D.build_data(_cfg(source="task", task="copy", task_train_size=100, task_eval_size=10),
                 workdir=str(tmp_path / "task"))
    s, t = rundir.read_vocabs(str(tmp_path / "task"))
    assert s.to_json() == {"kind": "char"} and t.decode(t.encode("abc")) == "abc"


def test_loader_throughput_smoke(m30k):
    out = D.loader_throughput(_m30k_cfg(m30k), seconds=0.5, windows=2)
    assert out["target_tokens_per_second"] > 0 and len(out["window_tokens_per_second"]) == 2
    assert set(out["padding_efficiency"]) == {"source", "target"} and 0 < out["padding_efficiency"]["target"] <= 1


# ------------------------------------------------------------------------------ no TF / no JAX

def test_full_pass_imports_neither_tensorflow_nor_jax(m30k, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        import s2s_jax.data as D
        assert "jax" not in sys.modules, "import s2s_jax.data imported jax"
        from s2s_jax.config import Config, DataConfig
        cfg = Config(data=DataConfig(source="text", dir={m30k['dir']!r}, cache_dir={str(tmp_path / 'cache')!r},
                                     vocab_size=300, batch_tokens=800, max_dropped_fraction=0.05))
        data = D.build_data(cfg)
        it = data.train_batches()
        n = sum(int((next(it)["index"] >= 0).sum()) for _ in range(data.stats["train_batches_per_epoch"]))
        assert n == data.stats["examples"]["train"], n
        data.eval_batches("valid")
        bad = [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "jax", "jaxlib", "orbax")]
        assert not bad, bad
        print("OK", n)
    """)
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK" in r.stdout


# ------------------------------------------------------------------------------ the plan, once per run start

def test_resumed_run_with_other_auto_buckets_plans_once(tmp_path, monkeypatch, caplog):
    """A resumed run whose saved auto buckets differ from those the lengths would give now
    builds its batch plan once, on the saved buckets (the checkpoint's data state is read first)."""
    import logging

    from s2s_jax import cli
    from s2s_jax.data import corpus
    from tests._helpers import TINY

    workdir = str(tmp_path / "run")
    sets = ["data.buckets=()", "data.max_buckets=2", "train.steps=2", "train.eval_every=1000",
            "train.checkpoint_every=2", "train.log_every=1", "train.eval_sentences=8", "model.hidden_dim=8"]

    def train() -> int:
        argv = ["train", "--config", TINY, "--workdir", workdir, "--no-progress"]
        for s in sets:
            argv += ["--set", s]
        return cli.main(argv)

    assert train() == 0
    plans = []
    real_plan = corpus.Data._plan

    def counted(self, shapes):
        plans.append(shapes)
        return real_plan(self, shapes)

    monkeypatch.setattr(corpus.Data, "_plan", counted)
    monkeypatch.setattr(pipeline, "AUTO_BUCKET_MULTIPLE", 5)  # the auto buckets it would choose now differ
    with caplog.at_level(logging.INFO, logger="s2s_jax.data.corpus"):
        assert train() == 0  # resumes at its last step: the run start only
    assert "resuming with the saved auto buckets" in caplog.text
    assert len(plans) == 1 and plans[0] is not None  # once, with the saved shapes


# ------------------------------------------------------------------------------ control characters, file kinds

def test_control_characters_become_spaces_and_are_counted(tmp_path, caplog):
    files = _tiny()
    src = files["train.en"].splitlines(keepends=True)
    src[2] = "the \x1b[31mcat\x00 number 2 sat\r\n"  # ESC and NUL inside; the CR is a line ending
    src[7] = "the cat\x85number 7 sat on the mat\x0c\n"  # C1 NEL inside; the form feed is trailing whitespace
    tgt = files["train.de"].splitlines(keepends=True)
    tgt[4] = "die\tkatze nummer 4\x7fsass\r\n"  # tab stays; DEL inside
    files["train.en"], files["train.de"] = "".join(src), "".join(tgt)
    folder = _write_corpus(tmp_path / "c", files)
    with caplog.at_level("WARNING"):
        data = D.build_data(_cfg(source="text", dir=folder, cache_dir=str(tmp_path / "cache"), vocab_size=40))
    stats = json.load(open(os.path.join(data.prepared_dir, "stats.json")))
    assert stats["train"]["control_characters"] == 4 and stats["train"]["control_character_lines"] == 3
    assert stats["valid"]["control_characters"] == 0
    texts = dict(enumerate(data.eval_examples("train")))
    assert texts[2][0] == "the  [31mcat  number 2 sat" and texts[7][0] == "the cat number 7 sat on the mat"
    assert texts[4][1] == "die\tkatze nummer 4 sass"
    assert "train.en: 3 control characters inside 2 lines (the first on line 3)" in caplog.text
    assert "train.de: 1 control characters inside 1 lines (the first on line 5)" in caplog.text
    # inference sees the same text as training
    assert D.normalize("the \x1b[31mcat\x00 number 2 sat\r") == texts[2][0]


@pytest.mark.parametrize("kind", ["folder", "fifo", "unreadable"])
def test_a_path_that_is_not_a_readable_file_is_named(tmp_path, monkeypatch, capsys, kind):
    from s2s_jax import cli
    from s2s_jax.data import text

    folder = _write_corpus(tmp_path / "c", _tiny())
    target = os.path.join(folder, "valid.de")
    os.remove(target)
    if kind == "folder":
        os.mkdir(target)
        expect = "is a folder, not a regular file"
    elif kind == "fifo":
        os.mkfifo(target)
        expect = "is a named pipe (FIFO), not a regular file"
    else:
        with open(target, "w", encoding="utf-8") as f:
            f.write("eine zeile\n" * 30)
        os.chmod(target, 0)
        if os.access(target, os.R_OK):  # root reads anything: refuse as the OS would for a user
            real_open = open

            def denied(path, *a, **k):
                if os.fspath(path) == target:
                    raise PermissionError(13, "Permission denied", target)
                return real_open(path, *a, **k)

            monkeypatch.setattr(text, "open", denied, raising=False)
        expect = "is a file this process cannot read (Permission denied)"
    with pytest.raises(D.DataError, match=r".*valid\.de: " + re.escape(expect)):
        D.prepare(_cfg(source="text", dir=folder, cache_dir=str(tmp_path / "cache"), vocab_size=35))
    # from the CLI: that one line and exit code 2, no traceback
    rc = cli.main(["prepare", "--config", TINY_CONFIG, "--set", "data.source=text", "--set", f"data.dir={folder}",
                   "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.vocab_size=35"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"{target}: {expect}" in err
