"""The vocabulary shortlist (inference/shortlist.py): building, candidates, decoding over them.

Decoding over a shortlist that covers the whole vocabulary equals full decoding (greedy, beam,
an ensemble); greedy over any superset of the tokens full greedy picks gives the same tokens
(the column -> vocabulary id mapping); the shortlist's logits equal the plain reference for both
kernel sets; a shortlist that drops pieces the references need costs accuracy on a trained model.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from s2s_jax import cli, kernels, rundir
from s2s_jax import config as config_lib
from s2s_jax.config import ModelConfig
from s2s_jax.inference import shortlist as shortlist_lib
from s2s_jax.inference.adapter import SingleModel
from s2s_jax.inference.ensemble import Ensemble
from s2s_jax.inference.shortlist import Shortlist
from s2s_jax.inference.translator import Translator
from s2s_jax.model import Seq2Seq
from s2s_jax.train_state import init_params, make_model
from s2s_jax.vocab import CharVocab
from tests import reference_model as ref

TINY = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs", "tiny.py")


# -- building and candidates (numpy only) -------------------------------------------------------

def _toy_corpus(n=400, seed=0):
    """Source words 10..29 translate to target words 110..129 (ids offset by 100, order
    shuffled), plus a target filler 105 in every sentence; target vocabulary 140."""
    rng = np.random.default_rng(seed)
    sources, targets = [], []
    for _ in range(n):
        words = rng.choice(np.arange(10, 30), size=int(rng.integers(2, 6)), replace=False)
        sources.append(words.astype(np.int32))
        targets.append(np.concatenate([rng.permutation(words + 100), [105]]).astype(np.int32))
    return sources, targets


def test_model1_ranks_the_translation_first_and_the_build_is_deterministic():
    sources, targets = _toy_corpus()
    a = shortlist_lib.build(sources, targets, 30, 140, top_k=3)
    b = shortlist_lib.build(sources, targets, 30, 140, top_k=3)
    np.testing.assert_array_equal(a.translations, b.translations)
    np.testing.assert_array_equal(a.frequent, b.frequent)
    # Each source word's best translation is its own target word, not the filler that
    # co-occurs with every word (co-occurrence counts alone would tie or prefer it).
    np.testing.assert_array_equal(a.translations[10:30, 0], np.arange(110, 130))
    assert (a.translations[:10] == -1).all()  # never seen: no translations
    assert a.frequent[0] == 105 and sorted(a.frequent.tolist()) == list(range(140))
    assert a.meta["pairs"] == 400 and a.meta["method"] == "ibm_model1"


def test_candidates_are_sorted_with_every_special_id_at_its_own_column():
    sources, targets = _toy_corpus()
    sl = shortlist_lib.build(sources, targets, 30, 140, top_k=3)
    ids = sl.candidates([[10, 11], [12]], top_k=1, frequent=1)
    np.testing.assert_array_equal(ids, [0, 1, 2, 3, 105, 110, 111, 112])
    assert ids.dtype == np.int32
    assert len(sl.candidates([[10]], top_k=3, frequent=0)) == 4 + 3
    padded = shortlist_lib.padded_ids(ids, 1000)
    assert padded.shape == (256,) and (padded[len(ids):] == -1).all()
    np.testing.assert_array_equal(shortlist_lib.padded_ids(ids, 140), np.r_[ids, [-1] * (140 - len(ids))])


@pytest.mark.parametrize("count,size", [(1, 256), (256, 256), (257, 512), (1100, 1280), (2500, 2560),
                                        (5000, 5120), (7900, 8000)])
def test_static_sizes_are_few_and_waste_at_most_a_quarter(count, size):
    assert shortlist_lib.static_size(count, 8000) == size
    sizes = {shortlist_lib.static_size(c, 8000) for c in range(1, 8001)}
    assert len(sizes) <= 20


def test_save_load_round_trip_and_checks(tmp_path):
    sources, targets = _toy_corpus()
    sl = shortlist_lib.build(sources, targets, 30, 140, top_k=3)
    back = shortlist_lib.load(sl.save(str(tmp_path / "s.npz")))
    np.testing.assert_array_equal(back.translations, sl.translations)
    np.testing.assert_array_equal(back.frequent, sl.frequent)
    assert back.meta == sl.meta
    with pytest.raises(shortlist_lib.ShortlistError, match="--top-k 4"):
        back.check(top_k=4, source_vocab_size=30, target_vocab_size=140)
    with pytest.raises(shortlist_lib.ShortlistError, match="vocabularies"):
        back.check(top_k=3, source_vocab_size=31, target_vocab_size=140)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(shortlist_lib.ShortlistError, match="unreadable"):
        shortlist_lib.load(str(tmp_path / "bad.npz"))


# -- the model side: shortlist logits = the plain reference, both kernel sets ----------------------

@pytest.mark.parametrize("kernel_set", ["cpu", "portable"])
@pytest.mark.parametrize("tie", [False, True])
def test_shortlist_logits_equal_reference(kernel_set, tie):
    cfg = ModelConfig(hidden_dim=16, source_embed_dim=8, target_embed_dim=16 if tie else 8, encoder_layers=1,
                      decoder_layers=1, tie_output=tie, kernels=kernel_set)
    model = Seq2Seq(cfg, 11, 37, kernels.select(kernel_set))
    params = init_params(model, jax.random.key(1))
    params = jax.tree.map(lambda x: x + 0.01 * np.arange(x.size).reshape(x.shape) % 0.3, params)  # non-zero bias
    hidden = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    vocab_ids = np.array([0, 1, 2, 3, 7, 20, 36, -1, -1], np.int32)
    weights = model.apply({"params": params}, vocab_ids, method=Seq2Seq.candidate_output_weights)
    got = model.apply({"params": params}, hidden, *weights, method=Seq2Seq.project)
    want = ref.shortlist_logits(cfg, params, hidden, vocab_ids)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.isneginf(np.asarray(got)[:, 7:]).all()
    full = model.apply({"params": params}, hidden, method=Seq2Seq.logits)
    np.testing.assert_allclose(np.asarray(got)[:, :7], np.asarray(full)[:, vocab_ids[:7]], rtol=1e-5, atol=1e-6)


# -- decoding over a shortlist ------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_model():
    """The tiny config's model with random parameters (its outputs are long and varied)."""
    config = config_lib.override(config_lib.load(TINY), ["decode.max_len_b=6"])
    vocab = CharVocab()
    model = make_model(config, vocab.vocab_size, vocab.vocab_size)
    return config, model, init_params(model, jax.random.key(3)), vocab


SOURCES = [[5, 9, 12, 40], [33, 7], [60, 61, 62, 63, 64, 65, 66], [8], [70, 71, 72]]


def _covering(vocab_size: int) -> Shortlist:
    table = np.tile(np.arange(vocab_size, dtype=np.int32), (vocab_size, 1))
    return Shortlist(table, np.arange(vocab_size, dtype=np.int32), {})


def _config(config, **decode):
    return config.replace(decode=dataclasses.replace(config.decode, **decode))


@pytest.mark.parametrize("beam,nbest", [(1, 1), (3, 2)])
def test_covering_shortlist_equals_full_decoding(random_model, beam, nbest):
    config, model, params, vocab = random_model
    V = vocab.vocab_size
    config = _config(config, shortlist=True, shortlist_top_k=V, shortlist_frequent=V)
    full = Translator(config, SingleModel(model), params, vocab, vocab)
    short = Translator(config, SingleModel(model), params, vocab, vocab, shortlist=_covering(V))
    a = full.translate_ids(SOURCES, beam=beam, nbest=nbest, batch_size=2)
    b = short.translate_ids(SOURCES, beam=beam, nbest=nbest, batch_size=2)
    assert short.last_stats["candidates"] == V
    assert any(len(r["tokens"][0]) > 2 for r in a)  # real outputs, not just EOS
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]
        np.testing.assert_allclose(x["scores"], y["scores"], rtol=1e-6, atol=1e-6)


def test_covering_shortlist_equals_full_decoding_for_an_ensemble(random_model):
    config, model, params, vocab = random_model
    V = vocab.vocab_size
    other = init_params(model, jax.random.key(4))
    ensemble = Ensemble((SingleModel(model), SingleModel(model)), (0.6, 0.4))
    config = _config(config, shortlist_top_k=V, shortlist_frequent=V)
    full = Translator(config, ensemble, [params, other], vocab, vocab)
    short = Translator(config, ensemble, [params, other], vocab, vocab, shortlist=_covering(V))
    for x, y in zip(full.translate_ids(SOURCES, beam=3), short.translate_ids(SOURCES, beam=3)):
        assert x["tokens"] == y["tokens"]
        np.testing.assert_allclose(x["scores"], y["scores"], rtol=1e-6, atol=1e-6)


def test_greedy_over_a_superset_of_its_tokens_picks_the_same_tokens(random_model):
    """Candidates = the tokens full greedy emits plus others, at columns that are not their ids:
    argmax over a superset of the winners is the same winner, mapped back to its vocabulary id."""
    config, model, params, vocab = random_model
    V = vocab.vocab_size
    full = Translator(config, SingleModel(model), params, vocab, vocab).translate_ids(SOURCES, batch_size=8)
    used = sorted({t for r in full for t in r["tokens"][0]})
    extra = [i for i in range(4, V, 7) if i not in used]
    table = np.full((V, len(used) + len(extra)), -1, np.int32)
    table[:, :] = np.array(used + extra, np.int32)
    shortlist = Shortlist(table, np.arange(V, dtype=np.int32), {})
    config = _config(config, shortlist_top_k=table.shape[1], shortlist_frequent=0)
    short = Translator(config, SingleModel(model), params, vocab, vocab, shortlist=shortlist)
    got = short.translate_ids(SOURCES, batch_size=8)
    assert short.last_stats["candidates"] == 4 + len(used) + len(extra) < V
    assert [r["tokens"] for r in got] == [r["tokens"] for r in full]
    for x, y in zip(full, got):  # renormalised over fewer tokens: each token at least as probable
        assert y["scores"][0] >= x["scores"][0] - 1e-5


@pytest.mark.parametrize("beam", [1, 3])
def test_a_shortlist_of_every_possible_token_equals_full_decoding(random_model, beam):
    """A model that can only emit some ids (the others' bias -1e9: probability exactly 0 in
    float32) decodes the same over those ids as over the whole vocabulary: beam search maps
    each chosen column to its id (here no column but the special ones is its own id)."""
    config, model, params, vocab = random_model
    V = vocab.vocab_size
    allowed = np.array([0, 1, 2, 3] + list(range(9, V, 5)), np.int32)
    bias = np.full((V,), -1e9, np.float32)
    bias[allowed] = np.asarray(params["output_bias"])[allowed]
    params = dict(params, output_bias=bias)
    table = np.tile(allowed, (V, 1))
    config = _config(config, shortlist_top_k=len(allowed), shortlist_frequent=0)
    full = Translator(config, SingleModel(model), params, vocab, vocab)
    short = Translator(config, SingleModel(model), params, vocab, vocab,
                       shortlist=Shortlist(table, np.arange(V, dtype=np.int32), {}))
    a, b = full.translate_ids(SOURCES, beam=beam), short.translate_ids(SOURCES, beam=beam)
    assert short.last_stats["candidates"] == len(allowed) < V
    assert any(len(r["tokens"][0]) > 2 for r in a)
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"] and set(x["tokens"][0]) <= set(allowed.tolist())
        np.testing.assert_allclose(x["scores"], y["scores"], rtol=1e-5, atol=1e-5)


def test_copy_attention_models_refuse_the_shortlist(random_model):
    config, _, _, vocab = random_model
    config = config.replace(model=dataclasses.replace(config.model, copy_attention=True),
                            decode=dataclasses.replace(config.decode, shortlist=True))
    with pytest.raises(shortlist_lib.ShortlistError, match="copy_attention"):
        shortlist_lib.for_decoding("/nonexistent", config, vocab.vocab_size, vocab.vocab_size)


# -- a run: build, decode, validate, export --------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny config on the `copy` task, trained enough to copy a third of its eval strings."""
    wd = str(tmp_path_factory.mktemp("shortlist_run"))
    assert cli.main(["train", "--config", TINY, "--workdir", wd, "--no-progress", "--set", "data.task=copy",
                     "--set", "train.steps=200", "--set", "train.eval_every=200", "--set",
                     "train.checkpoint_every=200", "--set", "model.dropout=0.0"]) == 0
    return wd


def _accuracy(translator, pairs):
    """(exact match, chrF (sacreBLEU), outputs) of greedy translations."""
    import sacrebleu

    out = [hyps[0][0] for hyps in translator.translate([s for s, _ in pairs])]
    exact = np.mean([o == t for o, (_, t) in zip(out, pairs)])
    return float(exact), sacrebleu.corpus_chrf(out, [[t for _, t in pairs]]).score, out


@pytest.mark.slow
@pytest.mark.extended
def test_shortlist_of_a_run_and_the_cost_of_dropping_reference_pieces(trained, tmp_path, capsys):
    from s2s_jax.data import tasks
    from s2s_jax.inference import runs as runs_lib

    # Asked for before it is built: one error that names the command.
    with pytest.raises(shortlist_lib.ShortlistError, match=r"s2s-jax shortlist --workdir"):
        runs_lib.load_run(trained).translator(["decode.shortlist=true"])
    assert cli.main(["translate", "--workdir", trained, "--set", "decode.shortlist=true"]) == 2
    assert "s2s-jax shortlist --workdir" in capsys.readouterr().err

    assert cli.main(["shortlist", "--workdir", trained, "--top-k", "8"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["pairs"] == 2000 and meta["top_k"] == 8
    built = shortlist_lib.load(rundir.shortlist_path(trained))
    first = built.translations.copy()
    assert cli.main(["shortlist", "--workdir", trained, "--top-k", "8"]) == 0  # deterministic rebuild
    np.testing.assert_array_equal(shortlist_lib.load(rundir.shortlist_path(trained)).translations, first)
    vocab = CharVocab()
    for ch in "a7z":  # copy: every character's best translation is itself
        assert first[vocab.encode(ch)[0], 0] == vocab.encode(ch)[0]
    with pytest.raises(shortlist_lib.ShortlistError, match="--top-k 9"):
        runs_lib.load_run(trained).translator(["decode.shortlist=true", "decode.shortlist_top_k=9"])

    run = runs_lib.load_run(trained)
    config = run.config
    d = config.data
    pairs = tasks.generate_splits(d.task, d.task_train_size, d.task_eval_size, d.task_seed)["test"]
    full_exact, full_chrf, _ = _accuracy(run.translator(), pairs)
    short = run.translator(["decode.shortlist=true", "decode.shortlist_top_k=1", "decode.shortlist_frequent=0"])
    assert short.shortlist is not None
    short_exact, short_chrf, _ = _accuracy(short, pairs)
    assert short.last_stats["candidates"] < vocab.vocab_size / 2
    # Each source character's own translation suffices for copying: nothing is lost.
    assert short_exact == full_exact > 0.1 and short_chrf == pytest.approx(full_chrf, abs=0.5)

    # Drop the six most frequent reference characters from every candidate list.
    dropped = np.argsort(-np.bincount(np.concatenate([vocab.encode(t) for _, t in pairs]),
                                      minlength=vocab.vocab_size), kind="stable")[:6]
    table = np.where(np.isin(built.translations, dropped), -1, built.translations)
    crippled = Shortlist(table, built.frequent[~np.isin(built.frequent, dropped)], built.meta)
    bad = Translator(short.config, short.model, short.params, vocab, vocab, shortlist=crippled)
    bad_exact, bad_chrf, out = _accuracy(bad, pairs)
    assert not any(set(vocab.encode(o)) & set(dropped.tolist()) for o in out)
    needing = [i for i, (_, t) in enumerate(pairs) if set(vocab.encode(t)) & set(dropped.tolist())]
    assert len(needing) > len(pairs) / 4
    assert bad_exact <= full_exact - len(needing) / len(pairs) * full_exact / 2
    assert bad_chrf < full_chrf - 5
    print(f"copy task, 64 eval strings, greedy: exact match / chrF full {full_exact:.3f} / "
          f"{full_chrf:.1f}, shortlist top-1 {short_exact:.3f} / {short_chrf:.1f}, six frequent "
          f"characters dropped {bad_exact:.3f} / {bad_chrf:.1f}")

    # The bundle carries the shortlist.
    from s2s_jax.inference.bundle import load_bundle
    from s2s_jax.inference.export import export_bundle

    out_dir = export_bundle(trained, str(tmp_path / "bundle"), platforms=("cpu",), beams=[2])
    bundle = load_bundle(out_dir)
    np.testing.assert_array_equal(bundle.shortlist.translations, first)
    np.testing.assert_array_equal(bundle.shortlist.frequent, built.frequent)
    assert rundir.SHORTLIST_FILE in bundle.manifest["files"]
