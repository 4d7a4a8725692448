"""Scores (metrics.py), the test sets `eval` reads (inference/evaluate.py), the config rules of
data.task_kind / train.best_metric / data.truncate_*, and truncation in the data layer."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from s2s_jax import config as config_lib
from s2s_jax import metrics
from s2s_jax.config import Config, ConfigError, UserError
from tests.conftest import ROOT, SHARED, run_cli

MULTI30K = SHARED / "data" / "multi30k"
DIALOGSUM = SHARED / "data" / "dialogsum"
TINY = ROOT / "experiments/configs/tiny.py"


def _lines(path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


# ------------------------------------------------------------------ lowercased Moses-tokenised BLEU

@pytest.mark.skipif(not MULTI30K.is_dir(), reason="../shared/data/multi30k not found")
def test_moses_pipeline_reproduces_the_official_multi30k_tokenised_files():
    """scripts/task1-tokenize.sh (lowercase | normalize-punctuation | tokenizer -l L) as sacremoses."""
    for split, lang, differing in (("test", "de", []), ("test", "en", []), ("valid", "de", [655])):
        raw, official = _lines(MULTI30K / f"{split}.{lang}"), _lines(MULTI30K / "tok" / f"{split}.{lang}")
        ours = metrics.lc_moses_tokenize(raw, lang)
        assert len(ours) == len(official) > 1000 - 1
        assert [i for i, (a, b) in enumerate(zip(ours, official)) if a != b] == differing, (split, lang)
    # the one valid.de line: old Moses moved the final period outside the closing quote
    assert metrics.lc_moses_tokenize(['steht: „Come on now ... tea.“'], "de") == \
        ["steht : &quot; come on now ... tea . &quot;"]


def test_bleu_lc_tok_ignores_case_and_tokenisation_and_names_its_protocol():
    hyps, refs = ["Ein Mann, der läuft."], ["ein Mann , der läuft ."]
    out = metrics.corpus_scores(hyps, refs, lang="de")
    assert out["bleu_lc_tok"] == pytest.approx(100.0)
    assert out["bleu"] == pytest.approx(75.98, abs=0.01)  # sacreBLEU is cased: "Ein" != "ein" (13a splits ",")
    assert out["bleu_lc_tok_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:none|")
    assert "moses:de|sacremoses:" in out["bleu_lc_tok_signature"]
    assert "task1-tokenize.sh" in out["bleu_lc_tok_protocol"]
    assert out["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|")
    # the same value as sacreBLEU on the tokens, written by hand
    import sacrebleu

    hyp, ref = ["A dog runs on the grass."], ["A dog is running on green grass."]
    want = sacrebleu.corpus_bleu(["a dog runs on the grass ."], [["a dog is running on green grass ."]],
                                 tokenize="none", force=True).score
    assert metrics.corpus_scores(hyp, ref, lang="en")["bleu_lc_tok"] == pytest.approx(want)
    assert metrics.moses_lang("tgt") == "en" and metrics.moses_lang("de") == "de"


# ------------------------------------------------------------------ ROUGE

def test_rouge_values_by_hand():
    out = metrics.corpus_scores(["the cat sat on the mat"], ["the cat lay on the mat"], kind="summarization")
    assert out["rouge1"] == pytest.approx(100 * 5 / 6)  # 5 of 6 unigrams each way
    assert out["rouge2"] == pytest.approx(100 * 3 / 5)  # the cat, on the, the mat of 5 bigrams
    assert out["rougeL"] == pytest.approx(100 * 5 / 6)  # LCS "the cat on the mat"
    assert "bleu" not in out and out["references"] == 1
    assert out["rouge_signature"] == "nrefs:1|multi:max|stem:porter|lsum:split|rouge-score:" + \
        metrics.package_version("rouge-score")
    assert out["rouge_settings"]["use_stemmer"] is True
    # Porter stemming: "runs" and "running" are one word
    assert metrics.corpus_scores(["he runs"], ["he running"], kind="summarization")["rouge1"] == pytest.approx(100)


def test_rouge_several_references_take_the_best_per_sentence_and_type():
    hyps = ["a b c d", "x y"]
    first, second = ["d c b a", "x y"], ["a b q r", "p q"]
    out = metrics.corpus_scores(hyps, first, [second], kind="summarization")
    # sentence 1: rouge1 best from `first` (1.0), rouge2 from `second` (1/3 each way), rougeL from
    # `second` (LCS 2 of 4); sentence 2: `first` is exact
    assert out["rouge1"] == pytest.approx(100 * (1.0 + 1.0) / 2)
    assert out["rouge2"] == pytest.approx(100 * (1 / 3 + 1.0) / 2)
    assert out["rougeL"] == pytest.approx(100 * (0.5 + 1.0) / 2)
    assert out["references"] == 2 and out["exact_match"] == 0.5
    with pytest.raises(ValueError, match="reference stream 1 has 1 lines for 2"):
        metrics.corpus_scores(hyps, first, [["one"]], kind="summarization")


def test_rouge_lsum_splits_sentences():
    out = metrics.corpus_scores(["c d. a b."], ["a b. c d."], kind="summarization")
    assert out["rougeLsum"] == pytest.approx(100.0)  # each reference sentence found whole in a hypothesis one
    assert out["rougeL"] == pytest.approx(50.0)  # one sequence: LCS "a b" (or "c d") of 4


@pytest.mark.skipif(not DIALOGSUM.is_dir(), reason="../shared/data/dialogsum not found")
def test_dialogsum_first_30_words_score_the_issue_anchor():
    """Issue 26: the first 30 words of each test dialogue, best of the three references."""
    lead = [" ".join(s.split()[:30]) for s in _lines(DIALOGSUM / "test.src")]
    refs = [_lines(DIALOGSUM / f"test.{n}") for n in ("tgt", "ref1", "ref2")]
    out = metrics.corpus_scores(lead, refs[0], refs[1:], kind="summarization")
    assert (round(out["rouge1"], 1), round(out["rouge2"], 1), round(out["rougeL"], 1)) == (32.6, 10.4, 25.4)


# ------------------------------------------------------------------ config rules

def _text(**data) -> Config:
    base = Config()
    return base.replace(data=dataclasses.replace(base.data, **{"source": "text", "dir": "/c", **data}))


def test_task_kind_picks_the_metric_and_refuses_the_other_kinds():
    assert config_lib.best_metric_and_mode(_text(task_kind="summarization")) == ("rougeL", "max")
    assert config_lib.best_metric_and_mode(_text()) == ("bleu", "max")
    lc = _text()
    lc = lc.replace(train=dataclasses.replace(lc.train, best_metric="bleu_lc_tok"))
    assert config_lib.best_metric_and_mode(config_lib.validate(lc)) == ("bleu_lc_tok", "max")
    rouge = _text()
    rouge = rouge.replace(train=dataclasses.replace(rouge.train, best_metric="rougeL"))
    with pytest.raises(ConfigError, match=r"train.best_metric='rougeL' is computed for data.task_kind='summarization'"):
        config_lib.validate(rouge)
    with pytest.raises(ConfigError, match="task_kind"):
        config_lib.override(config_lib.load(TINY), ["data.task_kind=qa"])


def test_truncation_above_the_length_limit_is_refused():
    with pytest.raises(ConfigError, match=r"data.truncate_source=80 is above data.max_source_length=64"):
        config_lib.validate(_text(truncate_source=80))
    with pytest.raises(ConfigError, match=r"data.truncate_target=-1: must be >= 0"):
        config_lib.override(config_lib.load(TINY), ["data.truncate_target=-1"])


def test_experiment_configs_are_the_summarisation_recipe():
    recipes = config_lib.load_module(ROOT / "experiments/configs/_recipes.py")
    for name, (src, tgt) in {"dialogsum": (400, 100), "aeslc": (400, 32)}.items():
        cfg = config_lib.load(ROOT / f"experiments/configs/{name}.py")
        recipe = recipes.text_summarization(name, src, tgt)
        assert cfg.data == recipe.data and cfg.decode == recipe.decode, name
        assert cfg.data.task_kind == "summarization" and cfg.data.joint_vocab
        assert (cfg.data.truncate_source, cfg.data.truncate_target) == (src, tgt)
        assert cfg.train == dataclasses.replace(recipe.train, steps=4000, eval_sentences=500)
        assert cfg.model == dataclasses.replace(recipe.model, dtype="bfloat16")
        assert config_lib.best_metric_and_mode(cfg) == ("rougeL", "max")


def test_early_stopping_on_rouge():
    from s2s_jax.training.trainer import EvalTracker

    cfg = _text(task_kind="summarization")
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, early_stopping_patience=2))
    tracker = EvalTracker.from_config(cfg)
    assert (tracker.metric, tracker.mode) == ("rougeL", "max")
    verdicts = [tracker.update(v) for v in (20.0, 25.0, 24.0, 25.0)]
    assert [v.improved for v in verdicts] == [True, True, False, False] and verdicts[-1].stop


# ------------------------------------------------------------------ truncation in the data layer

def test_truncation_cuts_and_counts_instead_of_dropping():
    from s2s_jax.data import build_data, truncate_sources

    cfg = config_lib.override(config_lib.load(TINY), ["data.truncate_source=8", "data.truncate_target=5"])
    plain = build_data(config_lib.load(TINY))
    data = build_data(cfg)
    train = plain._splits["train"]
    assert data.truncated["train"] == {"source": int(np.sum(train.src_len > 8)), "target": int(np.sum(train.tgt_len > 5))}
    assert data.truncated["train"]["source"] > 100
    assert data.stats["examples"]["train"] == 2000 and not data.stats["dropped"]["train"]
    assert data.stats["truncated_pairs"] == data.truncated
    assert "truncated" in data.describe_plan()
    batch = next(iter(data.train_batches()))
    assert batch["source_lengths"].max() <= 8 and batch["target_lengths"].max() <= 6  # + EOS
    # a cut row holds the first pieces of its record, the target still ends with EOS
    records = {tuple(r["source"][:8]): r for r in plain._splits["train"].source}
    row = int(np.argmax(batch["source_lengths"]))
    rec = records[tuple(batch["source"][row, :8])]
    n = batch["target_lengths"][row]
    assert list(batch["target_output"][row, :n - 1]) == list(rec["target"][:n - 1])
    for b in data.eval_batches("valid"):
        assert b["source_lengths"].max() <= 8
    # texts stay whole (references are scored in full); decoding sources are cut
    assert data.eval_examples("valid") == plain.eval_examples("valid")
    assert truncate_sources(cfg.data, [list(range(12)), [1, 2]]) == [list(range(8)), [1, 2]]
    assert truncate_sources(config_lib.load(TINY).data, [list(range(12))]) == [list(range(12))]


def test_auto_buckets_reach_long_sources():
    """Summarisation lengths (sources up to 400 pieces): the auto buckets cover the range with
    the largest one at the limits and pack the pairs tighter than one bucket."""
    from s2s_jax.data.pipeline import auto_buckets, bucket_cost

    rng = np.random.default_rng(0)
    src = np.minimum(rng.gamma(3.0, 60.0, 12000).astype(int) + 5, 400)
    tgt = np.minimum(rng.gamma(4.0, 7.0, 12000).astype(int) + 2, 100)
    shapes = auto_buckets(src, tgt, 12, (400, 101))
    assert len(shapes) == 12 and shapes[-1] == (400, 101)
    cost = np.array([min(bucket_cost(sh) for sh in shapes if s <= sh[0] and t + 1 <= sh[1]) for s, t in zip(src, tgt)])
    assert cost.mean() < 0.6 * bucket_cost((400, 101))


# ------------------------------------------------------------------ the test sets `eval` reads

def _corpus(tmp_path, n=4, refs=("ref1", "ref2")):
    for suffix in ("src", "tgt") + tuple(refs):
        (tmp_path / f"test.{suffix}").write_text("".join(f"{suffix} line {i}\n" for i in range(n)))
    return tmp_path


def _summ_config(folder) -> Config:
    return _text(task_kind="summarization", dir=str(folder), src_lang="src", tgt_lang="tgt")


def test_reference_files_are_found_in_number_order(tmp_path):
    from s2s_jax.inference.evaluate import reference_files, test_set

    _corpus(tmp_path, refs=("ref1", "ref2", "ref10", "refx"))
    assert [p.rsplit("/", 1)[-1] for p in reference_files(str(tmp_path), "test", "tgt")] == \
        ["test.tgt", "test.ref1", "test.ref2", "test.ref10"]
    ts = test_set(_summ_config(tmp_path), str(tmp_path))
    assert ts.references[1] == "tgt line 1" and [r[3] for r in ts.extra_references] == \
        ["ref1 line 3", "ref2 line 3", "ref10 line 3"]
    assert ts.files["ref"][0].endswith("test.tgt")


def test_a_reference_with_other_line_counts_is_refused_before_decoding(tmp_path):
    from s2s_jax.inference.evaluate import test_set

    _corpus(tmp_path)
    (tmp_path / "test.ref2").write_text("only one line\n")
    with pytest.raises(UserError, match=r"test.src has 4 lines but .*test.ref2 has 1"):
        test_set(_summ_config(tmp_path), str(tmp_path))
    with pytest.raises(UserError, match=r"test.ref2 has 1"):
        test_set(_summ_config(tmp_path), str(tmp_path), src_file=str(tmp_path / "test.src"),
                 ref_file=[str(tmp_path / "test.tgt"), str(tmp_path / "test.ref2")])


def test_empty_lines_skipped_in_every_reference(tmp_path):
    from s2s_jax.inference.evaluate import test_set

    _corpus(tmp_path)
    (tmp_path / "test.src").write_text("a\n\nc\nd\n")
    ts = test_set(_summ_config(tmp_path), str(tmp_path))
    assert ts.sources == ["a", "c", "d"]
    assert ts.extra_references[0] == ["ref1 line 0", "ref1 line 2", "ref1 line 3"]


class _EchoTranslator:
    """A stand-in Translator: the hypothesis of a source is its first words (its ids cut to
    data.truncate_source by evaluate)."""

    def __init__(self, config):
        self.config = config

    def encode_lines(self, lines):
        return [line.split() for line in lines]

    def translate_ids(self, sources, *, beam):
        return [{"tokens": [s], "scores": [0.0]} for s in sources]

    def hypotheses(self, result, copy=None):
        return [{"text": " ".join(result["tokens"][0])}]


def test_eval_scores_rouge_for_a_summarisation_run_with_every_reference(tmp_path):
    from s2s_jax.inference.evaluate import evaluate

    _corpus(tmp_path)
    (tmp_path / "test.src").write_text("tgt line 0 more\nref1 line 1 x\nnothing like it\nref2 line 3\n")
    cfg = _summ_config(tmp_path)
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, truncate_source=3))
    record = evaluate(_EchoTranslator(cfg), str(tmp_path), beam=1)
    assert "bleu" not in record and record["task_kind"] == "summarization" and record["references"] == 3
    # truncation to 3 words: sentences 0, 1 and 3 equal one of their references; 2 shares nothing
    assert record["rouge1"] == pytest.approx(75.0) and record["exact_match"] == 0.75
    # against test.tgt alone: 1, 2/3 ("line 1" of 3 words), 0, 2/3
    assert record["first_reference"]["rouge1"] == pytest.approx(100 * 7 / 12)
    assert (tmp_path / "eval_test_beam1.txt").read_text().split("\n")[:2] == ["tgt line 0", "ref1 line 1"]
    saved = json.loads((tmp_path / "eval_test_beam1.json").read_text())
    assert saved["rouge_settings"]["multiple_references"].startswith("per sentence and type the maximum")
    translation = _text(dir=str(tmp_path), src_lang="src", tgt_lang="tgt")
    record = evaluate(_EchoTranslator(translation), str(tmp_path), beam=1, write=False)
    assert "rouge1" not in record and {"bleu", "bleu_lc_tok", "chrf", "bleu_signature"} <= set(record)


def test_eval_cli_misaligned_reference_exits_2_before_loading_anything(tmp_path):
    from s2s_jax import rundir

    _corpus(tmp_path)
    (tmp_path / "test.ref1").write_text("short\n")
    workdir = tmp_path / "run"
    workdir.mkdir()
    rundir.write_config(str(workdir), _summ_config(tmp_path))  # no checkpoint: only the test set is read
    proc = run_cli("eval", "--workdir", str(workdir))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path}/test.src has 4 lines but {tmp_path}/test.ref1 "
                                                "has 1; parallel files must be line-aligned (line N of one "
                                                "translates line N of the other)"]


# ------------------------------------------------------------------ end to end (slow: trains)

@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.skipif(not DIALOGSUM.is_dir(), reason="../shared/data/dialogsum not found")
def test_summarisation_run_validates_and_evaluates_by_rouge_without_being_told(tmp_path):
    """dialogsum.py on 300 dialogues with a toy model: validation and `eval` score ROUGE."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, n in (("train", 300), ("valid", 12), ("test", 12)):
        for suffix in ("src", "tgt") + (("ref1", "ref2") if split == "test" else ()):
            lines = _lines(DIALOGSUM / f"{split}.{suffix}")[:n]
            (corpus / f"{split}.{suffix}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    workdir = tmp_path / "run"
    sets = [f"data.dir={corpus}", f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=400",
            "data.max_source_length=64", "data.truncate_source=64", "data.max_target_length=24",
            "data.truncate_target=24", "data.batch_tokens=640", "data.max_buckets=2", "model.dtype=float32",
            "model.source_embed_dim=16", "model.target_embed_dim=16", "model.hidden_dim=16",
            "model.encoder_layers=1", "model.decoder_layers=1", "train.steps=4", "train.eval_every=2",
            "train.checkpoint_every=4", "train.eval_sentences=12", "decode.beam_size=1", "decode.max_len_b=6"]
    proc = run_cli("train", "--config", "experiments/configs/dialogsum.py", "--workdir", str(workdir), "--no-progress",
                   *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "truncated" in proc.stderr
    evals = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    assert {"rouge1", "rouge2", "rougeL", "rougeLsum", "rouge_signature"} <= set(evals[-1])
    assert "bleu" not in evals[-1] and "rouge_settings" not in evals[-1]
    assert evals[-1]["best"] == max(r["rougeL"] for r in evals)
    proc = run_cli("eval", "--workdir", str(workdir), "--beam", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout)
    assert record["references"] == 3 and record["rouge_signature"].startswith("nrefs:3|")
    assert record["sentences"] == 12 and "bleu" not in record and "rouge1" in record["first_reference"]
    assert record["rougeL"] >= record["first_reference"]["rougeL"]
