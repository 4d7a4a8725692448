"""data.spm_sampling_alpha: SentencePiece sampling in the loader (pipeline.SubwordSampler), seeded
by (seed, epoch, example index): valid segmentations of the same text, repeatable, different
across epochs, and the same batches for a resumed iterator and for 1 or 2 processes."""

from __future__ import annotations

import numpy as np
import pytest
import sentencepiece as spm

from s2s_jax.config import Config, ConfigError, DataConfig, ModelConfig, validate
from s2s_jax.data.pipeline import Loader, SubwordSampler, TrainIterator
from s2s_jax.vocab import SentencePieceVocab

WORDS = "the a man woman dog runs jumps over little big red green house street ball plays with".split()


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, rng.integers(3, 9))) for _ in range(400)]
    prefix = str(tmp_path_factory.mktemp("spm") / "m")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=60,
                                   model_type="unigram", pad_id=0, bos_id=1, eos_id=2, unk_id=3,
                                   hard_vocab_limit=False, minloglevel=2)
    return SentencePieceVocab(prefix + ".model")


def records(vocab, n=24, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s, t = (" ".join(rng.choice(WORDS, rng.integers(3, 7))) for _ in range(2))
        out.append({"source": np.asarray(vocab.encode(s), np.int32), "target": np.asarray(vocab.encode(t), np.int32),
                    "source_text": s, "target_text": t})
    return out


def test_samples_are_segmentations_seeded_by_epoch_and_index(vocab):
    sampler = SubwordSampler(vocab, vocab, 0.5, seed=3)
    recs = records(vocab)
    shape = (64, 64)
    e0 = [sampler(r, i, 0, shape) for i, r in enumerate(recs)]
    for (src, tgt), r in zip(e0, recs):
        assert vocab.decode(src) == r["source_text"] and vocab.decode(tgt) == r["target_text"]
    again = [sampler(r, i, 0, shape) for i, r in reversed(list(enumerate(recs)))][::-1]  # other order
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(e0, again))
    e1 = [sampler(r, i, 1, shape) for i, r in enumerate(recs)]
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(e0, e1))  # a new epoch, new samples
    assert any(not np.array_equal(a[0], r["source"]) for a, r in zip(e0, recs))  # not the usual pieces
    short = sampler(recs[0], 0, 0, (1, 2))  # does not fit: the prepared pieces
    assert np.array_equal(short[0], recs[0]["source"]) and np.array_equal(short[1], recs[0]["target"])


def _loader(vocab, recs, process_index=0, process_count=1):
    ids = np.arange(len(recs))
    return Loader(recs, np.zeros(len(recs), np.int64), ids, [(16, 17)], [4], seed=5, process_index=process_index,
                  process_count=process_count, prefetch=2, worker_count=0,
                  sampler=SubwordSampler(vocab, vocab, 0.5, seed=5))


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_resumed_and_two_process_iterators_see_the_same_samples(vocab):
    recs = records(vocab)
    whole = _take(TrainIterator(_loader(vocab, recs)), 14)  # 6 batches an epoch: into epoch 2
    resumed = _take(TrainIterator(_loader(vocab, recs), {"epoch": 1, "batch": 2}), 6)
    for a, b in zip(whole[8:], resumed):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    halves = [_take(TrainIterator(_loader(vocab, recs, p, 2)), 14) for p in (0, 1)]
    for k, batch in enumerate(whole):
        for key in ("source", "target_output", "source_lengths"):
            np.testing.assert_array_equal(np.concatenate([halves[0][k][key], halves[1][k][key]]), batch[key])
    unsampled = Loader(recs, np.zeros(len(recs), np.int64), np.arange(len(recs)), [(16, 17)], [4], seed=5,
                       process_index=0, process_count=1, prefetch=2, worker_count=0)
    plain = _take(TrainIterator(unsampled), 6)
    assert any(not np.array_equal(a["source"], b["source"]) for a, b in zip(plain, whole[:6]))


def test_config_refuses_sampling_where_it_cannot_apply():
    with pytest.raises(ConfigError, match="data.spm_sampling_alpha"):
        validate(Config(data=DataConfig(source="task", spm_sampling_alpha=0.1)))
    with pytest.raises(ConfigError, match="data.spm_sampling_alpha"):
        validate(Config(data=DataConfig(spm_sampling_alpha=1.5)))
    with pytest.raises(ConfigError, match="data.spm_sampling_alpha"):
        validate(Config(data=DataConfig(source="text", dir="x", spm_sampling_alpha=0.1),
                        model=ModelConfig(copy_attention=True)))
