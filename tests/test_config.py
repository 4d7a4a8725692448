"""Config validation: every user mistake is one clear ConfigError naming the field."""

import dataclasses
import json
import re
import subprocess
import sys

import pytest

from s2s_jax import config as config_lib
from s2s_jax.config import Config, ConfigError

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_override_sets_typed_values():
    cfg = config_lib.override(Config(), ["train.steps=200", "train.learning_rate=1e-3", "model.bidirectional=false",
                                         "data.buckets=[[8, 9], [16, 17]]", "model.cell=gru",
                                         "data.max_source_length=16", "data.max_target_length=16"])
    assert cfg.train.steps == 200
    assert cfg.train.learning_rate == pytest.approx(1e-3) and isinstance(cfg.train.learning_rate, float)
    assert cfg.model.bidirectional is False
    assert cfg.data.buckets == ((8, 9), (16, 17))
    assert cfg.model.cell == "gru"


@pytest.mark.parametrize("assignment, fragment", [
    ("train.stepz=5", "unknown field train.stepz"),
    ("modle.cell=lstm", "unknown field"),
    ("train.steps=-3", "train.steps=-3: must be > 0"),
    ("train.steps=abc", "train.steps='abc': expected an integer"),
    ("model.cell=rnn", "model.cell='rnn': choose one of lstm, gru"),
    ("model.dropout=1.5", "model.dropout=1.5: must be in [0, 1)"),
    ("data.task=nope", "data.task='nope': choose one of"),
    ("model.bidirectional=maybe", "expected true/false"),
    ("train.steps", "expected section.field=value"),
])
def test_bad_override_names_the_field(assignment, fragment):
    with pytest.raises(ConfigError) as e:
        config_lib.override(Config(), [assignment])
    assert fragment in str(e.value)


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="hidden_dim"):
        config_lib.override(Config(), ["model.hidden_dim=33"])  # odd with a bidirectional encoder
    with pytest.raises(ConfigError, match="input_feeding"):
        config_lib.override(Config(), ["model.attention=none"])
    with pytest.raises(ConfigError, match="data.dir"):
        config_lib.override(Config(), ["data.source=text"])


def test_json_round_trip(tmp_path):
    cfg = config_lib.override(Config(), ["data.buckets=[[8, 9]]", "data.max_source_length=8",
                                         "data.max_target_length=8", "train.steps=7"])
    path = tmp_path / "config.json"
    path.write_text(config_lib.to_json(cfg))
    assert config_lib.load(str(path)) == cfg
    d = json.loads(path.read_text())
    d["model"]["future_field"] = 1
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="unknown field"):
        config_lib.load(str(path))


def test_experiment_files_load_and_validate():
    for name in ("dates", "tiny"):
        cfg = config_lib.override(config_lib.load(str(ROOT / f"experiments/configs/{name}.py")), [])
        assert cfg.name == name


@pytest.mark.parametrize("extra, fragment", [
    (["--set", "train.stepz=1"], "unknown field train.stepz"),
    (["--set", "model.cell=rnn"], "model.cell='rnn'"),
    (["--set", "data.task=nope"], "data.task='nope'"),
])
def test_cli_config_errors_exit_2_with_one_line(tmp_path, extra, fragment):
    proc = subprocess.run([sys.executable, "-m", "s2s_jax", "train", "--config", "experiments/configs/tiny.py",
                           "--workdir", str(tmp_path / "run"), *extra], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()  # failed before any work


def _differences(base, derived) -> dict:
    """{field: derived value} for the fields of a config section where `derived` differs from `base`."""
    return {f.name: getattr(derived, f.name) for f in dataclasses.fields(base)
            if getattr(derived, f.name) != getattr(base, f.name)}


def test_experiment_configs_are_their_recipe_but_for_the_declared_differences():
    """The Luong 2x256 recipe is written once (experiments/configs/_recipes.py); each config that
    uses it differs only where it says so (bench_cpu's bridge "last" is meant: see its comment)."""
    recipes = config_lib.load_module(ROOT / "experiments/configs/_recipes.py")
    load = lambda name: config_lib.load(ROOT / f"experiments/configs/{name}.py")  # noqa: E731
    bench = {"bridge": "last", "dropout": 0.0}
    models = {"multi30k_en_de": {"dtype": "bfloat16"}, "tatoeba_en_fr": {},
              "bench_cpu": bench, "bench_gpu_2x256": {**bench, "dtype": "bfloat16"}}
    for name, differences in models.items():
        assert _differences(recipes.luong_2x256(), load(name).model) == differences, name
    assert load("bench_cpu").train == load("bench_gpu").train == recipes.adam()
    assert _differences(load("bench_cpu").model, load("bench_gpu").model) == dict(
        source_embed_dim=1024, target_embed_dim=1024, hidden_dim=1024, encoder_layers=4, decoder_layers=4,
        dtype="bfloat16")
    for name, train in {"multi30k_en_de": {"steps": 3000, "eval_sentences": 1014},
                        "tatoeba_en_fr": {"steps": 3500}}.items():
        cfg = load(name)
        recipe = recipes.text_translation(name, cfg.data.src_lang, cfg.data.tgt_lang, cfg.data.max_source_length)
        assert _differences(recipe.train, cfg.train) == train, name
        assert cfg.decode == recipe.decode and _differences(recipe.model, cfg.model) == models[name]
        assert set(_differences(recipe.data, cfg.data)) <= {"buckets", "max_buckets"}, name


def test_multi30k_best_is_multi30k_with_the_recipe_parts():
    """multi30k_en_de_best derives from multi30k_en_de: the conditional-GRU recipe model (its
    dtype kept) and label smoothing are its only differences."""
    recipes = config_lib.load_module(ROOT / "experiments/configs/_recipes.py")
    base = config_lib.load(ROOT / "experiments/configs/multi30k_en_de.py")
    best = config_lib.override(config_lib.load(ROOT / "experiments/configs/multi30k_en_de_best.py"),
                               ["data.dir=/tmp/corpus"])
    assert best.data == dataclasses.replace(base.data, dir="/tmp/corpus") and best.decode == base.decode
    assert _differences(base.train, best.train) == {"label_smoothing": 0.1}
    assert _differences(recipes.conditional_gru_256(), best.model) == {"dtype": base.model.dtype}
    assert best.model.decoder_type == "conditional" and best.model.layer_norm == "per_gate"


@pytest.mark.parametrize("fields,says", [
    (dict(decoder_type="conditional", attention="none", input_feeding=False), "model.attention"),
    (dict(decoder_type="conditional", input_feeding=True), "input_feeding=false"),
    (dict(decoder_type="conditional", input_feeding=False, decoder_layers=2), "decoder_layers=1"),
    (dict(layer_norm="on"), "model.layer_norm"),
    (dict(recurrent_dropout=1.0), "model.recurrent_dropout"),
])
def test_recipe_fields_refuse_bad_values(fields, says):
    with pytest.raises(config_lib.ConfigError, match=re.escape(says)):
        config_lib.validate(config_lib.Config(model=config_lib.ModelConfig(**fields)))
