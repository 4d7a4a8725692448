"""translate / eval / attention plots through the Translator and the CLI, on a tiny trained model.

One tiny `reverse` model is trained once for the module (in-process, ~40 steps); every test
reuses its workdir.
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import pytest

from s2s_jax import cli, decoding, kernels
from s2s_jax.inference import adapter, translator as translator_lib
from s2s_jax.inference import runs as runs_lib
from s2s_jax.vocab import BOS_ID, EOS_ID
from s2s_jax.model import Seq2Seq

TINY = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs", "tiny.py")
LINES = ["hello world", "", "abc", "  ", "quick brown fox", "x", "jax and flax", "seq2seq"]  # <= 16 chars: one shape


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("tiny_run"))
    assert cli.main(["train", "--config", TINY, "--workdir", wd, "--no-progress", "--set", "train.steps=40",
                     "--set", "train.eval_every=40", "--set", "train.checkpoint_every=40"]) == 0
    return wd


@pytest.fixture(scope="module")
def translator(workdir):
    return runs_lib.load_translator(workdir)


def test_translate_keeps_order_and_empty_lines_and_batching_changes_nothing(translator):
    lines = LINES + ["the quick brown fox jumps"]  # a second source-length bucket
    batched = translator.translate(lines, beam=1, batch_size=4)  # several batches, a padded last one
    assert len(batched) == len(lines)
    for line, hyps in zip(lines, batched):
        if not line.strip():
            assert hyps == [("", 0.0)]
            continue
        alone = translator.translate([line], beam=1)[0]
        assert hyps[0][0] == alone[0][0]
        assert hyps[0][1] == pytest.approx(alone[0][1], abs=1e-4)
    assert translator.last_stats["sentences"] == 1  # stats describe the last call


def test_beam_search_batched_equals_one_at_a_time(translator):
    sources = [translator.source_vocab.encode(line) for line in LINES if line.strip()]
    together = translator.translate_ids(sources, beam=3, nbest=2, batch_size=4)
    for src, res in zip(sources, together):
        alone = translator.translate_ids([src], beam=3, nbest=2)[0]
        assert res["tokens"] == alone["tokens"]
        np.testing.assert_allclose(res["scores"], alone["scores"], atol=1e-4)
        assert res["scores"][0] >= res["scores"][1]


def test_beam_size_one_equals_greedy(translator):
    sources = [translator.source_vocab.encode(line) for line in LINES if line.strip()]
    greedy = translator.translate_ids(sources, beam=1)
    # Beam search (K=1) over the same encoded batch, bypassing the greedy shortcut.
    n = len(sources)
    S = max(map(len, sources))
    src = np.zeros((n, S), np.int32)
    for r, s in enumerate(sources):
        src[r, :len(s)] = s
    lengths = np.asarray([len(s) for s in sources], np.int32)
    model, params = translator.model.module, translator.params
    cache = translator.model.encode(params, src, lengths)
    static = {k: cache[k] for k in ("memory", "keys", "mask")}

    def step_fn(tokens, state):
        logits, new, _ = model.apply({"params": params}, tokens, dict(static, state=state),
                                     method=Seq2Seq.decode_step)
        return logits, new["state"], None

    limits = translator.max_len_for(lengths).astype(np.int32)
    settings = decoding.SearchSettings(max_len=int(limits.max()), kernels=model.kernels, strategy="beam",
                                       beam_size=1, length_penalty=0.0, bos_id=BOS_ID, eos_id=EOS_ID)
    search = jax.jit(lambda state: decoding.search(step_fn, state, settings, batch_size=n, max_lengths=limits))
    out = jax.device_get(search(cache["state"]))
    for r, g in enumerate(greedy):
        seq = out["tokens"][r, 0, :out["lengths"][r, 0]].tolist()
        assert seq[-1] == EOS_ID
        assert seq[:-1] == g["tokens"][0]
        assert float(out["log_probs"][r, 0]) == pytest.approx(g["scores"][0], abs=1e-4)


def test_beam_translation_equals_plain_beam_search_over_tiled_memory(translator):
    """The Translator keeps encoder memory once per slot (the beams share it); decoding.search
    over the same encoded batch with memory tiled to every beam row finds the same n-best."""
    sources = [translator.source_vocab.encode(line) for line in LINES if line.strip()]
    got = translator.translate_ids(sources, beam=3, nbest=2)
    n, S = len(sources), max(map(len, sources))
    src = np.zeros((n, S), np.int32)
    for r, s in enumerate(sources):
        src[r, :len(s)] = s
    lengths = np.asarray([len(s) for s in sources], np.int32)
    model, params, dc = translator.model.module, translator.params, translator.config.decode
    cache = translator.model.encode(params, src, lengths)

    def step_fn(tokens, cache):
        logits, new, _ = model.apply({"params": params}, tokens, cache, method=Seq2Seq.decode_step)
        return logits, new, None

    limits = translator.max_len_for(lengths).astype(np.int32)
    settings = decoding.SearchSettings(max_len=int(limits.max()), kernels=model.kernels, beam_size=3,
                                       nbest=2, length_penalty=dc.length_penalty, bos_id=BOS_ID, eos_id=EOS_ID)
    out = jax.device_get(jax.jit(lambda cache: decoding.search(step_fn, cache, settings, batch_size=n,
                                                               max_lengths=limits))(cache))
    for r, res in enumerate(got):
        for k in range(2):
            seq = out["tokens"][r, k, :out["lengths"][r, k]].tolist()
            assert seq[-1] == EOS_ID and seq[:-1] == res["tokens"][k]
        np.testing.assert_allclose(res["scores"], out["scores"][r], atol=1e-5)


@pytest.mark.parametrize("attention", ["general", "dot", "mlp"])
def test_decoder_step_with_memory_shared_by_beam_rows_equals_tiled_memory(attention):
    """Decoder.step with memory/keys/mask given once per sentence for its K rows (what the
    Translator's beam search does) = the step with them tiled to every row."""
    from s2s_jax.config import ModelConfig

    cfg = ModelConfig(hidden_dim=32, source_embed_dim=16, target_embed_dim=16, encoder_layers=2,
                      decoder_layers=2, attention=attention, bridge="dense")
    model = Seq2Seq(cfg, 11, 13, kernels.select(cfg.kernels))
    B, K, S = 3, 4, 6
    rng = np.random.default_rng(0)
    source = rng.integers(3, 11, size=(B, S)).astype(np.int32)
    source_lengths = np.array([6, 2, 4], np.int32)
    params = model.init(jax.random.key(0), source, source_lengths, np.ones((B, 3), np.int32))["params"]
    cache = model.apply({"params": params}, source, source_lengths, method=Seq2Seq.encode)
    tile = lambda a: jax.numpy.repeat(a, K, axis=0)  # noqa: E731
    state = jax.tree.map(lambda a: tile(a) + 0.1 * rng.standard_normal((B * K, *a.shape[1:])).astype(np.float32),
                         cache["state"])  # beams of a sentence in different states
    tokens = rng.integers(0, 13, size=(B * K,)).astype(np.int32)
    shared = dict(cache, state=state)
    tiled = dict(shared, **{k: tile(cache[k]) for k in ("memory", "keys", "mask")})
    step = jax.jit(lambda c: model.apply({"params": params}, tokens, c, method=Seq2Seq.decode_step))
    logits_s, new_s, weights_s = step(shared)
    logits_t, new_t, weights_t = step(tiled)
    assert logits_s.shape == (B * K, 13) and weights_s.shape == (B * K, S)
    assert new_s["memory"].shape[0] == B  # the shared memory is passed through, not tiled
    np.testing.assert_allclose(logits_s, logits_t, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(weights_s, weights_t, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), new_s["state"], new_t["state"])
    np.testing.assert_array_equal(np.asarray(weights_s)[K:2 * K, 2:], 0.0)  # sentence 1 has 2 source tokens
    assert not np.allclose(logits_s[0], logits_s[1])  # the rows really differ
    with pytest.raises(ValueError, match="evenly"):
        model.apply({"params": params}, tokens[:5], shared, method=Seq2Seq.decode_step)

    # Layer 1's projected input gathered from the per-token table = projecting the embeddings.
    table = model.apply({"params": params}, method=adapter._input_projection_table)
    assert table.shape == (13, 4 * 32)
    logits_p, state_p, weights_p = jax.jit(lambda c: model.apply(
        {"params": params}, tokens, table, c["state"], c, method=adapter._decode_step))(shared)
    np.testing.assert_allclose(logits_p, logits_s, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(weights_p, weights_s, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), state_p, new_s["state"])


@pytest.mark.parametrize("beam", [1, 3])
def test_input_projection_table_changes_no_translation(translator, monkeypatch, beam):
    """Decoding with layer 1's input projection gathered from a per-token table (what long inputs
    use) and with it computed from the embeddings each step give the same hypotheses."""
    use_table = translator_lib._use_input_table
    assert use_table(1024, 5, 82, 8000) and not use_table(1, 5, 40, 8000)
    sources = [translator.source_vocab.encode(line) for line in LINES if line.strip()]
    got = {}
    for use in (False, True):
        monkeypatch.setattr(translator_lib, "_use_input_table", lambda *a, use=use: use)
        monkeypatch.setattr(translator_lib, "_DECODERS", {})  # trace again with the other choice
        got[use] = translator.translate_ids(sources, beam=beam, nbest=min(beam, 2))
    for a, b in zip(got[False], got[True]):
        assert a["tokens"] == b["tokens"]
        np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-6, atol=1e-6)


def test_cli_translate_file_nbest_and_throughput(workdir, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    assert cli.main(["translate", "--workdir", workdir, "--input", str(src), "--output", str(out),
                     "--beam", "3", "--nbest", "2"]) == 0
    err = capsys.readouterr().err
    assert f"translated {len(LINES)} sentences" in err and "sentences/s" in err and "tokens/s" in err
    rows = out.read_text(encoding="utf-8").split("\n")
    assert rows[-1] == "" and len(rows) - 1 == 2 * len(LINES)
    for i, line in enumerate(LINES):
        pair = [r.split("\t") for r in rows[2 * i:2 * i + 2]]
        assert all(len(p) == 2 for p in pair)
        scores = [float(p[1]) for p in pair]  # text<TAB>score, as OpenNMT-py's -with_score
        if not line.strip():
            assert [p[0] for p in pair] == ["", ""]
        else:
            assert scores[0] >= scores[1]

    one_best = tmp_path / "one.txt"
    assert cli.main(["translate", "--workdir", workdir, "--input", str(src), "--output", str(one_best)]) == 0
    got = one_best.read_text(encoding="utf-8").split("\n")[:-1]
    translator = runs_lib.load_translator(workdir)
    beam = translator.config.decode.beam_size
    assert got == [h[0][0] for h in translator.translate(LINES, beam=beam)]


def test_compile_time_is_counted_once_and_reported_apart(workdir, translator, tmp_path, capsys):
    """A call that meets a new program counts its compilation in last_stats["compile_seconds"];
    the same call again compiles nothing (0.0 exactly). The CLI reports the rate without it."""
    sources = [translator.source_vocab.encode(line) for line in ["abc", "quick brown fox jumps over"]]
    translator.translate_ids(sources, beam=4, nbest=3)  # (beam 4, nbest 3): a program no other test builds
    first = translator.last_stats["compile_seconds"]
    translator.translate_ids(sources, beam=4, nbest=3)
    assert first > 0.0 and translator.last_stats["compile_seconds"] == 0.0

    src = tmp_path / "in.txt"
    src.write_text("abc\nhello\n", encoding="utf-8")
    assert cli.main(["translate", "--workdir", workdir, "--input", str(src), "--output", str(tmp_path / "o"),
                     "--beam", "2"]) == 0
    err = capsys.readouterr().err
    total, compile_s = (float(x) for x in re.search(r"in ([\d.]+)s: .* without the ([\d.]+)s of compilation", err).groups())
    assert 0.0 <= compile_s <= total


def test_cli_attention_plot_is_png(workdir, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("abc\n\nhello\n", encoding="utf-8")
    png = tmp_path / "att.png"
    assert cli.main(["translate", "--workdir", workdir, "--input", str(src), "--output", str(tmp_path / "o"),
                     "--attention-plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attention_rows_sum_to_one(translator):
    res = translator.translate_ids([translator.source_vocab.encode("hello")], attention=True)[0]
    att = res["attention"]
    assert att.shape == (len(res["tokens"][0]) + 1, 5)
    np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-5)


def test_cli_eval_writes_scores(workdir, capsys):
    assert cli.main(["eval", "--workdir", workdir, "--beam", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    path = os.path.join(workdir, "eval_test_beam2.json")
    record = json.load(open(path, encoding="utf-8"))
    assert printed["output"] == path
    for key in ("bleu", "chrf", "exact_match", "bleu_signature", "chrf_signature"):
        assert key in record
    assert record["bleu_signature"].startswith("nrefs:1|case:mixed")
    assert record["beam"] == 2 and record["split"] == "test" and record["sentences"] > 0
    assert 0.0 <= record["compile_seconds"] <= record["translate_seconds"]
    assert record["decode_sentences_per_second"] >= record["sentences_per_second"]
    hyps = open(os.path.join(workdir, "eval_test_beam2.txt"), encoding="utf-8").read().split("\n")
    assert len(hyps) - 1 == record["sentences"]


@pytest.mark.parametrize("content,expect", [(None, "no such file"), (b"ok\n\xff\xfe bad\n", "invalid UTF-8 at line 2")])
def test_cli_bad_input_is_one_line_error(workdir, tmp_path, capsys, content, expect):
    path = tmp_path / "input.txt"
    if content is not None:
        path.write_bytes(content)
    assert cli.main(["translate", "--workdir", workdir, "--input", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expect in err and "\n" not in err


def test_cli_missing_run_is_one_line_error(tmp_path, capsys):
    assert cli.main(["eval", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_several_queues_and_few_slots_change_nothing(translator, monkeypatch):
    """Continuous batching through 2 slots, one batch per queue (so 4 queues), gives every
    sentence what it gets alone, greedy and beam."""
    sources = [translator.source_vocab.encode(line) for line in LINES + ["the quick brown fox jumps"]
               if line.strip()]
    alone = {beam: [translator.translate_ids([s], beam=beam, nbest=min(beam, 2))[0] for s in sources]
             for beam in (1, 3)}
    monkeypatch.setattr(translator_lib, "QUEUE_BATCHES", 1)
    for beam in (1, 3):
        got = translator.translate_ids(sources, beam=beam, nbest=min(beam, 2), batch_size=2)
        assert translator.last_stats["queues"] == -(-len(sources) // 2)
        for res, ref in zip(got, alone[beam]):
            assert res["tokens"] == ref["tokens"]
            np.testing.assert_allclose(res["scores"], ref["scores"], atol=1e-4)


def test_decode_dtype_is_opt_in_and_validated(workdir, tmp_path, capsys):
    default = runs_lib.load_translator(workdir)
    assert default.config.decode.dtype == "model" and default.model.config.dtype == "float32"
    bf16 = runs_lib.load_translator(workdir, overrides=["decode.dtype=bfloat16"])
    assert bf16.model.config.dtype == "bfloat16"
    sources = [default.source_vocab.encode(line) for line in LINES if line.strip()]
    ref, got = default.translate_ids(sources), bf16.translate_ids(sources)
    same = [r["tokens"] == g["tokens"] for r, g in zip(ref, got)]
    assert sum(same) >= len(same) // 2  # an approximation of the same model, not another model
    for r, g, s in zip(ref, got, same):
        if s:  # bfloat16 matmuls: the same hypothesis scores within a few percent
            assert g["scores"][0] == pytest.approx(r["scores"][0], rel=0.05, abs=0.05)
    with pytest.raises(ValueError, match="decode.dtype"):
        runs_lib.load_translator(workdir, overrides=["decode.dtype=float16"])
    src = tmp_path / "in.txt"
    src.write_text("abc\n", encoding="utf-8")
    assert cli.main(["translate", "--workdir", workdir, "--input", str(src), "--set", "decode.dtype=half"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: decode.dtype='half'") and "\n" not in err
