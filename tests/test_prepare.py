"""Streaming prepare (issue 17): workers, shards, the SentencePiece sample, bounded memory,
errors before the slow work, the TFDS source, and the synthetic corpus of experiments/make_corpus.py.

Corpora are generated from ../shared/data into tmp_path (never copied into the repo). Shard
sizes are shrunk with monkeypatch so that small corpora have several shards and use workers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from s2s_jax.config import Config, ConfigError, DataConfig, override
from s2s_jax.data import cache, records, sources, workers
from s2s_jax.data import preprocess as P
from s2s_jax.data.errors import DataError
from s2s_jax.vocab import normalize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")

pytestmark = pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "multi30k")) or
                                not os.path.isdir(os.path.join(SHARED, "tatoeba_fra_eng")),
                                reason="../shared/data not available")


def _make_corpus_module():
    spec = importlib.util.spec_from_file_location("make_corpus", os.path.join(REPO, "experiments", "make_corpus.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


make_corpus = _make_corpus_module()


def _corpus(folder, pairs, seed=0, eval_pairs=200) -> str:
    assert make_corpus.main(["--pairs", str(pairs), "--out", str(folder), "--seed", str(seed),
                             "--eval-pairs", str(eval_pairs)]) == 0
    return str(folder)


def _cfg(folder, cache, **kw) -> Config:
    base = dict(source="text", dir=str(folder), cache_dir=str(cache), vocab_size=500)
    base.update(kw)
    return Config(data=DataConfig(**base))


def _digest(folder) -> dict:
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def corpus5k(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("c5k"), 5000)


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(P, "SHARD_LINES", 1000)
    monkeypatch.setattr(sources, "BLOCK_LINES", 300)


# ------------------------------------------------------------------------------ workers / shards

def test_one_and_two_workers_byte_identical(corpus5k, tmp_path, small_shards):
    paths = {}
    for w in (1, 2):
        paths[w] = P.prepare(_cfg(corpus5k, tmp_path / f"cache{w}", prepare_workers=w, spm_sample_size=3000))
    # Same cache key (data.prepare_workers is not part of it) and the same bytes, file by file.
    assert os.path.basename(paths[1]) == os.path.basename(paths[2])
    d1, d2 = _digest(paths[1]), _digest(paths[2])
    assert d1 == d2
    shards = [f for f in d1 if "train.array_record" in f]
    assert len(shards) == 5 and any(f.startswith("vocab/") and f.endswith(".model") for f in d1)

    # The published dataset reads back as the corpus: record i = normalised line i, ids = the
    # vocabulary's encoding, lengths.npz = the records' lengths.
    manifest, stats, lengths, (sv, tv) = P.load_prepared(paths[2])
    ds = records.open_split(paths[2], "train")
    assert len(ds) == stats["train"]["examples"] == 5000 == len(lengths["train_source"])
    assert lengths["train_source"].dtype == np.uint16
    src = open(os.path.join(corpus5k, "train.en"), encoding="utf-8").read().split("\n")
    tgt = open(os.path.join(corpus5k, "train.de"), encoding="utf-8").read().split("\n")
    for i in (0, 999, 1000, 2345, 4999):
        r = ds[i]
        s, t = normalize(src[i]), normalize(tgt[i])
        assert r["source_text"].decode() == s and r["target_text"].decode() == t
        assert list(r["source"]) == sv.encode(s) and list(r["target"]) == tv.encode(t)
        assert lengths["train_source"][i] == len(r["source"]) and lengths["train_target"][i] == len(r["target"])
    assert stats["train"]["source_tokens"] == int(lengths["train_source"].sum())


def test_serialize_record_decodes_as_tfds_serializer():
    feats = records.features()
    ex = {"source": np.asarray([5, 6, 70000], np.int32), "target": np.asarray([9], np.int32),
          "source_text": "Ein Mann \u00fcber", "target_text": "a man"}
    ours = feats.deserialize_example_np(records.serialize_record([5, 6, 70000], [9], ex["source_text"], ex["target_text"]))
    ref = feats.deserialize_example_np(feats.serialize_example(ex))
    assert ours.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(np.asarray(ours[k]), np.asarray(ref[k]))


def test_empty_shard_left_out(tmp_path, small_shards):
    """A shard whose every pair is dropped is not written; the others are renumbered."""
    folder = tmp_path / "c"
    folder.mkdir()
    src = [f"the cat {i} sat" if not 1000 <= i < 2000 else " " for i in range(2500)]
    (folder / "train.en").write_text("\n".join(src) + "\n", encoding="utf-8")
    (folder / "train.de").write_text("".join(f"die katze {i}\n" for i in range(2500)), encoding="utf-8")
    for split in ("valid", "test"):
        (folder / f"{split}.en").write_text("the cat sat\n", encoding="utf-8")
        (folder / f"{split}.de").write_text("die katze\n", encoding="utf-8")
    path = P.prepare(_cfg(folder, tmp_path / "cache", vocab_size=40, prepare_workers=2))
    names = sorted(f for f in os.listdir(records.tfds_dir(path)) if "train.array_record" in f)
    assert names == [f"{records.BUILDER_NAME}-train.array_record-0000{i}-of-00002" for i in range(2)]
    ds = records.open_split(path, "train")
    assert len(ds) == 1500 and ds[1000]["source_text"].decode() == "the cat 2000 sat"
    assert json.load(open(os.path.join(path, "stats.json")))["train"]["dropped"]["empty"] == 1000


# ------------------------------------------------------------------------------ cache key / config

def test_key_has_sample_size_not_workers(corpus5k, tmp_path):
    key = lambda **kw: os.path.basename(cache.prepared_path(_cfg(corpus5k, tmp_path, **kw))[0])  # noqa: E731
    assert key(prepare_workers=1) == key(prepare_workers=2) == key()
    assert key(spm_sample_size=1000) != key()


def test_config_rejects_negative_counts():
    for field in ("prepare_workers", "spm_sample_size"):
        with pytest.raises(ConfigError, match=f"data.{field}=-1: must be >= 0"):
            override(Config(), [f"data.{field}=-1"])
    assert P.resolve_workers(DataConfig(prepare_workers=0), 10 ** 7) == workers.available_cores()
    assert P.resolve_workers(DataConfig(prepare_workers=2), 10) == 1  # one shard: no processes


# ------------------------------------------------------------------------------ SentencePiece sample

def test_spm_sample_indices():
    a = P.spm_sample(100_000, 3000)
    assert len(a) == 3000 and len(np.unique(a)) == 3000 and np.all(np.diff(a) > 0)
    assert a.min() >= 0 and a.max() < 100_000
    np.testing.assert_array_equal(a, P.spm_sample(100_000, 3000))
    assert not np.array_equal(a, P.spm_sample(100_000, 3000, seed=1))
    assert P.spm_sample(3000, 3000) is None and P.spm_sample(10, 0) is None


def test_spm_sample_used_and_deterministic_across_processes(corpus5k, tmp_path):
    seen = []
    real = P.train_sentencepiece

    def spy(sentences, *a, **k):
        sentences = list(sentences)
        seen.append(len(sentences))
        return real(sentences, *a, **k)

    cfg = _cfg(corpus5k, tmp_path / "a", spm_sample_size=2000)
    P.train_sentencepiece = spy
    try:
        path = P.prepare(cfg)
        full = P.prepare(_cfg(corpus5k, tmp_path / "full", spm_sample_size=0))
    finally:
        P.train_sentencepiece = real
    assert seen == [2000, 10000]  # joint: 1000 sampled pairs, both sides; then every pair
    assert json.load(open(os.path.join(path, "stats.json")))["train"]["spm_sample_pairs"] == 1000
    model = open(os.path.join(path, "vocab", "spm.model"), "rb").read()
    assert model != open(os.path.join(full, "vocab", "spm.model"), "rb").read()
    # Another process (SentencePiece's own RNG seeded anew) trains the same bytes.
    script = textwrap.dedent(f"""
        from s2s_jax.config import Config, DataConfig
        from s2s_jax.data.preprocess import prepare
        print(prepare(Config(data=DataConfig(source="text", dir={corpus5k!r}, cache_dir={str(tmp_path / 'b')!r},
                                             vocab_size=500, spm_sample_size=2000))))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 0, r.stderr[-2000:]
    other = r.stdout.strip().splitlines()[-1]
    assert open(os.path.join(other, "vocab", "spm.model"), "rb").read() == model
    assert _digest(other) == _digest(path)


# ------------------------------------------------------------------------------ errors first

@pytest.mark.parametrize("case", ["utf8", "empty_line", "counts"])
def test_errors_in_late_shards_before_slow_work(tmp_path, small_shards, monkeypatch, case):
    folder = tmp_path / "c"
    folder.mkdir()
    en = [f"sentence {i}" for i in range(3500)]
    de = [f"satz {i}" for i in range(3500)]
    raw_en = None
    kw = {}
    if case == "utf8":
        raw_en = ("\n".join(en[:3210]) + "\nbad \xff\n" + "\n".join(en[3211:]) + "\n").encode("latin-1")
        expect = ["train.en", "line 3211", "UTF-8"]
    elif case == "empty_line":
        de[2999] = " \u202f "
        kw = {"empty_lines": "error"}
        expect = ["train.de", "line 3000", "empty_lines"]
    else:
        de.append("extra")
        expect = ["train.en has 3500 lines", "train.de has 3501"]
    (folder / "train.en").write_bytes(raw_en or ("\n".join(en) + "\n").encode())
    (folder / "train.de").write_text("\n".join(de) + "\n", encoding="utf-8")
    for split in ("valid", "test"):
        (folder / f"{split}.en").write_text("a b\n", encoding="utf-8")
        (folder / f"{split}.de").write_text("c d\n", encoding="utf-8")

    def no_training(*a, **k):
        raise AssertionError("SentencePiece trained before the input was checked")

    monkeypatch.setattr(P, "train_sentencepiece", no_training)
    with pytest.raises(DataError) as e:
        P.prepare(_cfg(folder, tmp_path / "cache", vocab_size=40, prepare_workers=2, **kw))
    for piece in expect:
        assert piece in str(e.value), (piece, str(e.value))
    assert not any(n.startswith(".tmp") for n in os.listdir(tmp_path / "cache" / "prepared"))


# ------------------------------------------------------------------------------ TFDS source

def test_tfds_source_streams_like_text(corpus5k, tmp_path, small_shards):
    """A TFDS dataset (built here without TensorFlow, as array_record) goes through the same
    streaming prepare: with the same sentences it writes the same shards as the text folder."""
    import tensorflow_datasets as tfds

    def lines(split, lang):
        with open(os.path.join(corpus5k, f"{split}.{lang}"), encoding="utf-8") as f:
            return f.read().split("\n")[:-1]

    class SynthTranslate(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "synth_translate"
        VERSION = tfds.core.Version("1.0.0")
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=tfds.features.FeaturesDict(
                {"en": tfds.features.Text(), "de": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s) for s in ("train", "validation", "test")}

        def _generate_examples(self, split):
            name = "valid" if split == "validation" else split
            for i, (e, d) in enumerate(zip(lines(name, "en"), lines(name, "de"))):
                yield i, {"en": e, "de": d}

    SynthTranslate(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare(
        download_dir=str(tmp_path / "dl"))
    tfds_path = P.prepare(Config(data=DataConfig(source="tfds", tfds_name="synth_translate",
                                                 tfds_data_dir=str(tmp_path / "tfds"), cache_dir=str(tmp_path / "c1"),
                                                 vocab_size=500, spm_sample_size=3000, prepare_workers=2)))
    text_path = P.prepare(_cfg(corpus5k, tmp_path / "c2", spm_sample_size=3000, prepare_workers=2))
    dt, dx = _digest(tfds_path), _digest(text_path)
    for name in dx:
        if name.startswith(("tfds/", "vocab/")) or name == "lengths.npz":
            assert dt[name] == dx[name], name
    assert "tensorflow" not in sys.modules


# ------------------------------------------------------------------------------ make_corpus

def test_make_corpus_deterministic_and_aligned(tmp_path):
    a = _corpus(tmp_path / "a", 3000, seed=7)
    b = _corpus(tmp_path / "b", 3000, seed=7)
    c = _corpus(tmp_path / "c", 3000, seed=8)
    assert _digest(a) == _digest(b) and _digest(a) != _digest(c)
    assert sorted(os.listdir(a)) == [f"{s}.{l}" for s in ("test", "train", "valid") for l in ("de", "en")]
    pool_src, pool_tgt = make_corpus.load_pool("train")
    aligned = {}
    for s, t in zip(pool_src, pool_tgt):
        aligned.setdefault(s, set()).add(t)
    for split, n in (("train", 3000), ("valid", 200), ("test", 200)):
        en = open(os.path.join(a, f"{split}.en"), encoding="utf-8").read().split("\n")
        de = open(os.path.join(a, f"{split}.de"), encoding="utf-8").read().split("\n")
        assert len(en) == len(de) == n + 1 and en[-1] == de[-1] == ""  # n lines, final newline
        assert all(x.strip() for x in en[:-1]) and all(x.strip() for x in de[:-1])
    # Single-pair lines carry a real aligned translation; joined lines are longer on average.
    en = open(os.path.join(a, "train.en"), encoding="utf-8").read().split("\n")[:-1]
    de = open(os.path.join(a, "train.de"), encoding="utf-8").read().split("\n")[:-1]
    single = [(s, t) for s, t in zip(en, de) if s in aligned]
    assert len(single) > 0.3 * len(en)
    assert all(t in aligned[s] for s, t in single)
    mean_words = np.mean([len(s.split()) for s in en])
    assert 1.6 * np.mean([len(s.split()) for s in pool_src]) < mean_words < 2.6 * np.mean([len(s.split()) for s in pool_src])


# ------------------------------------------------------------------------------ bounded memory

_MEASURE = textwrap.dedent("""
    import json, resource, sys
    from s2s_jax.config import Config, DataConfig
    from s2s_jax.data.preprocess import prepare
    if __name__ == "__main__":
        prepare(Config(data=DataConfig(source="text", dir=sys.argv[1], cache_dir=sys.argv[2], vocab_size=2000,
                                       spm_sample_size=20000, prepare_workers=2)))
        print(json.dumps({"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                          "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
""")


@pytest.mark.slow
def test_memory_bounded_20k_vs_200k(tmp_path):
    """Peak RSS (KiB; the largest of the main process and its workers) of prepare on 200k pairs
    stays within 1.5x of that on 20k pairs: nothing held grows with the corpus but 4 bytes a pair."""
    script = tmp_path / "measure.py"
    script.write_text(_MEASURE)
    peaks = {}
    for n in (20_000, 200_000):
        folder = _corpus(tmp_path / f"c{n}", n, eval_pairs=500)
        r = subprocess.run([sys.executable, str(script), folder, str(tmp_path / f"cache{n}")], capture_output=True,
                           text=True, timeout=600, env=dict(os.environ, PYTHONPATH=REPO))
        assert r.returncode == 0, r.stderr[-3000:]
        rss = json.loads(r.stdout.strip().splitlines()[-1])
        assert n < 100_000 or rss["children"] > 0  # 200k pairs = 2 shards: the workers ran
        peaks[n] = max(rss["self"], rss["children"])
    print("peak RSS KiB", peaks)
    assert peaks[200_000] <= 1.5 * peaks[20_000], peaks
