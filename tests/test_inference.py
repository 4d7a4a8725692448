"""One inference path: text in = text as trained, and translate / eval / bundle / server agree.

A small French -> English SentencePiece run on raw Tatoeba text (which writes U+202F before
'!' and '?') is decoded through every entry point with inputs that are *not* normalised
(U+202F, U+00A0, NFD accents, surrounding spaces): each must encode them as prepare encoded
the training data, so every path gives the same translations and scores.
"""

from __future__ import annotations

import json
import unicodedata

import numpy as np
import pytest

from s2s_jax import cli
from s2s_jax.vocab import normalize
from tests.conftest import run_cli

RAW = ["Je suis fatigué\u202f!", "Où est la gare\u00a0?", "  Il fait très beau aujourd'hui.  ",
       "Qu'est-ce que c'est\u202f?", "Elle a mangé une pomme.", "Tom est allé à Paris en été."]


def variants(line: str) -> list[str]:
    """Spellings that NFKC + space mapping turn into the same training text."""
    return [line, unicodedata.normalize("NFD", line), line.replace("\u202f", "\u00a0"), "\u2009" + line + " "]


@pytest.fixture(scope="module")
def translator(fr_en_run):
    from s2s_jax.inference.runs import load_translator

    return load_translator(str(fr_en_run))


def test_inputs_are_normalised_as_in_training(translator):
    sp = translator.source_vocab
    for line in RAW:
        expected = sp.encode(normalize(line, "nfkc"))
        for v in variants(line):
            assert translator.encode_lines([v])[0] == expected
    # Without the normalisation the raw SentencePiece encoding really differs (so the check bites).
    nfd = unicodedata.normalize("NFD", RAW[0])
    assert sp.encode(nfd) != sp.encode(normalize(nfd, "nfkc"))


def test_translate_eval_bundle_and_server_agree(fr_en_run, translator, tmp_path):
    from s2s_jax.inference.bundle import load_bundle
    from s2s_jax.inference.export import export_bundle

    lines = [v for line in RAW for v in variants(line)]
    beam = translator.config.decode.beam_size
    offline = [(h[0][0], h[0][1]) for h in translator.translate(lines, beam=beam)]
    # Every spelling of a sentence gets the translation (and score) of its normalised form.
    for i in range(0, len(lines), 4):
        assert len(set(offline[i:i + 4])) == 1, lines[i:i + 4]

    # CLI translate (a file), with n-best as text<TAB>score.
    src = tmp_path / "in.fr"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.en"
    proc = run_cli("translate", "--workdir", str(fr_en_run), "--input", str(src), "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_text(encoding="utf-8").split("\n")[:-1] == [t for t, _ in offline]

    # eval of a file pair the run was never prepared with: hypotheses are the translations.
    ref = tmp_path / "ref.en"
    ref.write_text("\n".join(["I am tired!"] * len(lines)) + "\n", encoding="utf-8")
    proc = run_cli("eval", "--workdir", str(fr_en_run), "--src", str(src), "--ref", str(ref))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout)
    assert record["sentences"] == len(lines) and record["split"] == "in"
    hyps = (fr_en_run / f"eval_in_beam{beam}.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert hyps == [t for t, _ in offline]

    # The export bundle.
    bundle = load_bundle(export_bundle(str(fr_en_run), str(tmp_path / "bundle"), platforms=("cpu",)))
    got = bundle.translate_full(lines, beam=beam)
    assert [h[0]["text"] for h in got] == [t for t, _ in offline]
    np.testing.assert_allclose([h[0]["score"] for h in got], [s for _, s in offline], rtol=1e-5, atol=1e-5)

    # The server (the run, and the bundle).
    from tests.test_server import serve

    for kind, path in (("--workdir", fr_en_run), ("--bundle", tmp_path / "bundle")):
        with serve(kind, path) as client:
            r = client.post("/translate", json={"text": lines, "beam": beam})
            assert r.status_code == 200, r.text
            answered = r.json()["translations"]
            assert [a["text"] for a in answered] == [t for t, _ in offline]
            np.testing.assert_allclose([a["score"] for a in answered], [s for _, s in offline], rtol=1e-5, atol=1e-5)


def test_eval_scores_a_split_the_run_was_not_prepared_with(fr_en_run, fr_en_corpus):
    """A split name that is not one of the run's data.*_split: read from data.dir, encoded with
    the run's vocabulary (no re-prepare, no 'different vocabulary' error)."""
    extra = fr_en_corpus / "extra.fr"
    extra.write_text((fr_en_corpus / "test.fr").read_text(encoding="utf-8"), encoding="utf-8")
    (fr_en_corpus / "extra.en").write_text((fr_en_corpus / "test.en").read_text(encoding="utf-8"), encoding="utf-8")
    proc = run_cli("eval", "--workdir", str(fr_en_run), "--split", "extra", "--beam", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    extra_record = json.loads(proc.stdout)
    proc = run_cli("eval", "--workdir", str(fr_en_run), "--split", "test", "--beam", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    test_record = json.loads(proc.stdout)
    assert extra_record["split"] == "extra" and extra_record["sentences"] == test_record["sentences"] == 200
    assert extra_record["bleu"] == test_record["bleu"] and extra_record["chrf"] == test_record["chrf"]


@pytest.mark.parametrize("args,expect", [
    (["--src", "NOFILE", "--ref", "NOFILE"], "--src NOFILE: no such file"),
    (["--split", "nosuchsplit"], "nosuchsplit.fr: no such file"),
])
def test_eval_bad_test_set_is_one_line_error(fr_en_run, args, expect):
    proc = run_cli("eval", "--workdir", str(fr_en_run), *args)
    assert proc.returncode == 2 and expect in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_eval_misaligned_pair_is_one_line_error(fr_en_run, tmp_path):
    (tmp_path / "a").write_text("un\ndeux\n", encoding="utf-8")
    (tmp_path / "b").write_text("one\n", encoding="utf-8")
    proc = run_cli("eval", "--workdir", str(fr_en_run), "--src", str(tmp_path / "a"), "--ref", str(tmp_path / "b"))
    assert proc.returncode == 2 and "line-aligned" in proc.stderr, proc.stderr


def test_jsonl_output_has_tokens_scores_and_alignments(fr_en_run, translator, tmp_path, capsys):
    src = tmp_path / "in.fr"
    src.write_text("\n".join(RAW[:3]) + "\n\n", encoding="utf-8")
    assert cli.main(["translate", "--workdir", str(fr_en_run), "--input", str(src), "--beam", "3", "--nbest", "2",
                     "--format", "jsonl"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 4 and records[3]["hypotheses"][0]["text"] == ""
    full = translator.translate_full(RAW[:3], beam=3, nbest=2, attention=True)
    for rec, line, hyps in zip(records, RAW, full):
        assert rec["source"] == line
        assert rec["source_tokens"] == translator.source_vocab.pieces(translator.encode_lines([line])[0])
        assert len(rec["hypotheses"]) == 2
        for got, want in zip(rec["hypotheses"], hyps):
            assert got["text"] == want["text"] and got["tokens"] == want["tokens"]
            assert got["score"] == pytest.approx(want["score"], abs=1e-5)
            att = np.asarray(got["attention"])
            assert att.shape == (len(got["tokens"]) + 1, len(rec["source_tokens"]))  # + the EOS row
            np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-3)
        assert rec["hypotheses"][0]["score"] >= rec["hypotheses"][1]["score"]


def test_attention_plot_reads_top_down(translator):
    from s2s_jax.inference.translator import attention_figure

    fig = attention_figure(translator, [RAW[4]], beam=1)
    ax = fig.axes[0]
    top, bottom = ax.get_ylim()[1], ax.get_ylim()[0]
    assert top < bottom  # row 0 (the first output token) is drawn at the top
    labels = [t.get_text() for t in ax.get_yticklabels()]
    best = translator.translate_full([RAW[4]], beam=1)[0][0]
    assert labels == best["tokens"] + ["</s>"]
    assert ax.xaxis.get_ticks_position() == "top"  # source pieces read along the top, as JoeyNMT


def test_streaming_stdin_answers_each_line_before_the_input_ends(tiny_task_run):
    """A line written to stdin comes back translated while stdin stays open (interactive use)."""
    import subprocess
    import sys

    from tests._helpers import run_env
    from tests.conftest import ROOT

    proc = subprocess.Popen([sys.executable, "-m", "s2s_jax", "translate", "--workdir", str(tiny_task_run)],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=run_env())
    try:
        from s2s_jax.inference.runs import load_translator

        expected = [h[0][0] for h in load_translator(str(tiny_task_run)).translate(["hello", "abc"])]
        for line, want in zip(["hello", "abc"], expected):
            proc.stdin.write((line + "\n").encode())
            proc.stdin.flush()
            assert proc.stdout.readline().decode().rstrip("\n") == want  # stdin is still open
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def test_streaming_into_head_ends_early(tiny_task_run):
    """An endless input piped through translate into `head -n 5` ends when head does."""
    import subprocess

    from tests._helpers import run_env
    from tests.conftest import ROOT

    cmd = (f"yes 'hello world' | {__import__('sys').executable} -m s2s_jax translate --workdir {tiny_task_run} "
           f"--batch-size 8 | head -n 5")
    proc = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=120, env=run_env())
    assert proc.returncode == 0
    assert len(proc.stdout.splitlines()) == 5 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
