"""Data layer: input validation, prepare cache, bucketing, multi-process plans, iterator state.

Real text comes from the first lines of ../shared/data/multi30k (written to tmp_path; corpora are
never copied into the repo). Everything runs on CPU in well under a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import s2s_jax.data as D
from s2s_jax.config import Config, DataConfig, UserError
from s2s_jax.data import preprocess as prep_mod

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")
MULTI30K = os.path.join(SHARED, "multi30k")
TATOEBA = os.path.join(SHARED, "tatoeba_fra_eng")


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
    if prep_mod._find_spec("tensorflow") is None:
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
    other, _ = prep_mod.prepared_path(_m30k_cfg(m30k, dir=str(copy)))
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
    assert prep_mod.is_prepared(path)


# ------------------------------------------------------------------------------ batches

def test_batches_shapes_and_contents(m30k_data):
    data = m30k_data
    shapes = {tuple(s) for s in data.stats["buckets"]}
    batches, _ = _epoch(data)
    seen_shapes = set()
    for b in batches:
        s, t = b["source"].shape[1], b["target_input"].shape[1]
        seen_shapes.add((s, t))
        assert (s, t) in shapes
        assert b["target_output"].shape == b["target_input"].shape
        for k in ("source", "source_lengths", "target_input", "target_output", "target_lengths", "index"):
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
            # smallest bucket that holds it
            smaller = [(S, T) for S, T in shapes if S * T < s * t]
            assert not any(sl <= S and tl <= T for S, T in smaller)
    assert len(seen_shapes) > 1
    # token-based rows: rows * T <= batch_tokens for each bucket
    for (S, T), rows in zip(data.stats["buckets"], data.stats["bucket_rows"]):
        assert rows == 600 // T


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


@pytest.mark.parametrize("source", ["task", "text"])
def test_epoch_exactly_once_across_processes(m30k, source):
    if source == "task":
        cfg = _cfg(source="task", task="reverse", task_train_size=1500, task_eval_size=50,
                   buckets=((8, 9), (16, 17), (24, 25)), batch_tokens=400)
    else:
        cfg = _m30k_cfg(m30k)
    reference_shapes = None
    for procs in (1, 2, 4):
        datas = [D.build_data(cfg, process_index=p, process_count=procs, batch_multiple=2) for p in range(procs)]
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
            assert rows % (procs * 2) == 0
        for b in per_proc[0]:
            assert b["source"].shape[0] % 2 == 0
        if procs == 1:
            reference_shapes = {s for s, _ in shapes[0]}
        assert {s for s, _ in shapes[0]} <= reference_shapes | {s for s, _ in shapes[0]}


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
    src, tgt = D.load_vocabs(str(tmp_path / "run"))
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
    s, t = D.load_vocabs(str(tmp_path / "task"))
    assert s.to_json() == {"kind": "char"} and t.decode(t.encode("abc")) == "abc"


def test_loader_throughput_smoke(m30k):
    out = D.loader_throughput(_m30k_cfg(m30k), seconds=0.5, windows=2)
    assert out["target_tokens_per_second"] > 0 and len(out["window_tokens_per_second"]) == 2


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
