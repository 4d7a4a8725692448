"""The config audit: each mistake a user can make in a config is one line `error: ...` naming the
field and the fix, exit code 2, before any work (no workdir written, nothing prepared or compiled).

Driven through the CLI's main() in-process (the config errors need no jax), on tiny.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest

from s2s_jax import cli
from s2s_jax import config as config_lib
from s2s_jax.config import Config, ConfigError

from _helpers import TINY  # noqa: E402


def run_train(capsys, workdir, *sets) -> tuple[int, list[str]]:
    argv = ["train", "--config", TINY, "--workdir", str(workdir), "--no-progress"]
    for s in sets:
        argv += ["--set", s]
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, [line for line in err.splitlines() if line.startswith("error:")]


# (--set assignments, the field the message must name, a fragment of the fix)
MISTAKES = {
    "negative learning rate": (["train.learning_rate=-1"], "train.learning_rate", "must be > 0"),
    "zero learning rate": (["train.learning_rate=0"], "train.learning_rate", "must be > 0"),
    "infinite learning rate": (["train.learning_rate=1e999"], "train.learning_rate", "finite"),
    "best metric not computed": (["train.best_metric=blue"], "train.best_metric", "did you mean bleu"),
    "buckets smaller than max lengths": (["data.buckets=[[5,5]]"], "data.buckets", "add the bucket [20, 21]"),
    "target max length + EOS does not fit": (["data.buckets=[[20,20]]"], "data.buckets", "the target side counts EOS"),
    "no largest bucket": (["data.buckets=[[20,12],[12,21]]"], "data.buckets", "add the bucket [20, 21]"),
    "warmup longer than the run": (["train.warmup_steps=100"], "train.warmup_steps", "lower train.warmup_steps"),
    "cosine warmup = run": (["train.schedule=cosine", "train.warmup_steps=40"], "train.warmup_steps",
                            "schedule='cosine'"),
    "beam 0": (["decode.beam_size=0"], "decode.beam_size", "1 is greedy"),
    "nbest 0": (["decode.nbest=0"], "decode.nbest", "must be > 0"),
    "nbest > beam": (["decode.beam_size=2", "decode.nbest=3"], "decode.nbest", "decode.beam_size=2"),
    "no output length": (["decode.max_len_a=0", "decode.max_len_b=0"], "decode.max_len_a", "allow no output"),
    "weight decay ignored by adam": (["train.weight_decay=0.01"], "train.weight_decay", "adamw"),
    "momentum ignored by adam": (["train.momentum=0.9"], "train.momentum", "train.optimizer=sgd"),
    "plateau factor 0": (["train.schedule=plateau", "train.plateau_factor=0"], "train.plateau_factor", "(0, 1)"),
    "plateau factor > 1": (["train.schedule=plateau", "train.plateau_factor=2"], "train.plateau_factor", "(0, 1)"),
    "plateau patience 0": (["train.schedule=plateau", "train.plateau_patience=0"], "train.plateau_patience", ">= 1"),
    "no validation split": (["data.valid_split="], "data.valid_split", "evaluates on"),
    "negative shuffle seed": (["data.shuffle_seed=-1"], "data.shuffle_seed", ">= 0"),
    "dropped-fraction above 1": (["data.max_dropped_fraction=2"], "data.max_dropped_fraction", "[0, 1]"),
    "batch not divisible by accumulation": (["train.grad_accum=3"], "data.batch_size", "train.grad_accum=3"),
    "init_optimizer alone": (["train.init_optimizer=True"], "train.init_optimizer", "--init-from"),
    "freeze without vectors": (["model.freeze_embeddings=True"], "model.freeze_embeddings",
                               "model.source_embeddings"),
    "vocab_from on a task": (["data.vocab_from=runs/x"], "data.vocab_from", "character vocabulary"),
    "attention dropout without attention": (["model.attention=none", "model.input_feeding=False",
                                             "model.attention_dropout=0.1"], "model.attention_dropout", "no effect"),
    "process id out of range": (["train.num_processes=2", "train.process_id=2"], "train.process_id", "[0,"),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_config_mistake_is_one_line_exit_2_before_any_work(capsys, tmp_path, name):
    sets, field_name, fix = MISTAKES[name]
    rc, errors = run_train(capsys, tmp_path / "run", *sets)
    assert rc == 2
    assert len(errors) == 1, errors
    assert field_name in errors[0] and fix in errors[0], errors[0]
    assert not (tmp_path / "run").exists()  # refused before the workdir was made


def test_text_corpus_mistakes_name_the_field():
    text = dataclasses.replace(Config().data, source="text", dir="/corpus")
    for change, field_name in (({"src_lang": "de"}, "data.src_lang"), ({"tgt_lang": ""}, "data.tgt_lang"),
                               ({"spm_character_coverage": 0.0}, "data.spm_character_coverage"),
                               ({"spm_character_coverage": 1.5}, "data.spm_character_coverage")):
        with pytest.raises(ConfigError, match=field_name.replace(".", r"\.")):
            config_lib.validate(Config(data=dataclasses.replace(text, **change)))


def test_not_a_number_is_refused_for_every_float_field():
    # NaN cannot be written as a --set literal, but a config file can hold one
    for section, field_name in (("train", "learning_rate"), ("decode", "length_penalty"), ("model", "dropout")):
        cfg = Config()
        cfg = cfg.replace(**{section: dataclasses.replace(getattr(cfg, section), **{field_name: math.nan})})
        with pytest.raises(ConfigError, match=rf"{section}\.{field_name}=nan"):
            config_lib.validate(cfg)


def test_intervals_longer_than_the_run_stay_allowed():
    """Users switch evaluation or checkpoints off by setting the interval beyond the run."""
    cfg = config_lib.override(config_lib.load(TINY), ["train.eval_every=1000000", "train.checkpoint_every=1000000",
                                                      "train.log_every=1000000"])
    assert cfg.train.eval_every == 1_000_000
    # and the fields the mistakes above touch accept their sensible values
    config_lib.override(config_lib.load(TINY), ["train.warmup_steps=40", "train.best_metric=loss",
                                                "decode.beam_size=3", "decode.nbest=3", "data.buckets=[[20,21]]",
                                                "train.optimizer=sgd", "train.momentum=0.9"])


def test_every_best_metric_choice_is_computed_by_evaluation():
    """EVAL_METRICS (the choices of train.best_metric) is what evaluate() reports."""
    from s2s_jax import metrics

    computed = set(metrics.scalars_from_sums({"loss": 2.0, "nll": 2.0, "correct": 1.0, "weight": 4.0}))
    for kind in config_lib.KIND_METRICS:
        computed |= set(metrics.corpus_scores(["a b"], ["a b"], kind=kind))
    assert set(config_lib.EVAL_METRICS) <= computed
    assert config_lib.best_metric_and_mode(Config()) == ("exact_match", "max")
    text = Config(data=dataclasses.replace(Config().data, source="text", dir="/c"))
    assert config_lib.best_metric_and_mode(text) == ("bleu", "max")
    loss = Config(train=dataclasses.replace(Config().train, best_metric="perplexity"))
    assert config_lib.best_metric_and_mode(loss) == ("perplexity", "min")


def test_length_filter_dropping_more_than_1_percent_is_refused_with_the_count(capsys, tmp_path):
    """tiny.py's reverse pairs are 1-20 characters: a limit of 10 drops about half of the 2000."""
    from s2s_jax.data import build_data

    short = ["data.max_source_length=10", "data.max_target_length=10", "data.buckets=[[10,11]]"]
    rc, errors = run_train(capsys, tmp_path / "run", *short)
    assert rc == 2 and len(errors) == 1, errors
    cfg = config_lib.override(config_lib.load(TINY), short + ["data.max_dropped_fraction=1.0"])
    data = build_data(cfg)  # asked for explicitly: the same pairs are dropped and training may go on
    dropped = sum(data.stats["dropped"]["train"].values())
    assert 800 < dropped < 1200
    assert f"would drop {dropped} of 2000 training pairs" in errors[0]
    assert "data.max_dropped_fraction" in errors[0] and "data.max_source_length" in errors[0]
    # refused before anything was written or compiled
    assert not os.path.exists(tmp_path / "run" / "config.json")
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_a_saved_run_from_before_a_rule_still_loads_but_does_not_train(tmp_path, capsys):
    """config.json of a run trained before the audit tightened (dates.py had max_target_length=12
    with buckets of target length 11): translate/export can still read it; training refuses."""
    old = config_lib.to_dict(config_lib.load(TINY))
    old["data"].update(max_target_length=12, buckets=[[16, 11], [40, 11]], max_source_length=40)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))
    assert config_lib.load(str(path)).data.max_target_length == 12
    with pytest.raises(ConfigError, match="data.buckets"):
        config_lib.override(config_lib.load(str(path)), [])
    rc = cli.main(["train", "--config", str(path), "--workdir", str(tmp_path / "run"), "--no-progress"])
    assert rc == 2 and "data.buckets" in capsys.readouterr().err
