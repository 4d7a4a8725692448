"""Warm start (`train --init-from RUN[@best|@STEP]`, train.init_optimizer, data.vocab_from).

A tiny model trained briefly on the `reverse` task is fine-tuned on `copy`: the new run starts
from its parameters exactly (fresh step, optimizer and schedule, unless train.init_optimizer), its first
evaluation loss is far below a fresh model's, and SIGKILL + restart ends bit-identical to an
uninterrupted fine-tune. Mismatches (architecture, vocabulary, the kind of data) exit 2 before
any work, naming the field. Subprocesses share the persistent XLA compilation cache.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess

import jax
import numpy as np
import pytest

from s2s_jax import cli
from s2s_jax import config as config_lib
from s2s_jax.training import warm_start
from s2s_jax.metrics import read_metrics
from s2s_jax.train_state import make_model

from _helpers import REPO, TINY, run_env, train_cmd  # noqa: E402
from test_resume import SETS, assert_same_state, load_state, run_and_kill, saving, started, trace  # noqa: E402

BASE_STEPS = 60
FINE_TUNE = [*SETS, "data.task=copy", "train.eval_every=2", "train.ema_decay=0.0"]


def train(workdir, *sets, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(workdir, *sets), cwd=REPO, env=run_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == expect, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """tiny.py on `reverse`, with EMA (so the parameters taken are the EMA ones)."""
    workdir = tmp_path_factory.mktemp("base") / "run"
    train(workdir, "data.buckets=[[20,21]]", f"train.steps={BASE_STEPS}", f"train.eval_every={BASE_STEPS}",
          "train.eval_sentences=16", f"train.checkpoint_every={BASE_STEPS // 2}", "train.ema_decay=0.9",
          "train.keep_best=2")
    return workdir


def _config(*sets) -> config_lib.Config:
    return config_lib.override(config_lib.load(TINY), list(sets))


def test_warm_state_is_the_other_runs_parameters_with_a_fresh_optimizer(base, tmp_path):
    theirs, _, step = load_state(base)
    assert step == BASE_STEPS
    config = _config(*FINE_TUNE, f"train.init_from={base}")
    model = make_model(config, 99, 99)
    init = warm_start.resolve(config, str(tmp_path / "new"))
    state = jax.device_get(init.state(config, model))
    assert_same_state(state.params, theirs.ema_params)  # the EMA: what translate would use
    assert int(state.step) == 0 and float(state.lr_scale) == 1.0
    assert all(not np.any(x) for x in jax.tree.leaves(state.opt_state) if x.ndim)  # fresh Adam moments
    assert state.ema_params is None  # this run keeps no EMA
    # train.init_optimizer: the raw parameters, Adam's moments, step and scale carry over
    keep = _config(*FINE_TUNE, "train.ema_decay=0.9", f"train.init_from={base}@{BASE_STEPS // 2}",
                   "train.init_optimizer=True", "train.steps=100")
    init = warm_start.resolve(keep, str(tmp_path / "new"))
    theirs_30, _, _ = load_state(base, BASE_STEPS // 2)
    state = jax.device_get(init.state(keep, make_model(keep, 99, 99)))
    assert int(state.step) == BASE_STEPS // 2
    assert_same_state(state.params, theirs_30.params)
    assert_same_state(state.opt_state, theirs_30.opt_state)
    assert_same_state(state.ema_params, theirs_30.ema_params)
    # @best: the best checkpoint by the run's metric
    assert warm_start.resolve(_config(f"train.init_from={base}@best"), str(tmp_path / "x")).which == "best"


def test_parse_init_from():
    assert warm_start.parse("runs/a") == ("runs/a", "latest", None)
    assert warm_start.parse("runs/a@best") == ("runs/a", "best", None)
    assert warm_start.parse("runs/a@1500") == ("runs/a", "step", 1500)
    assert warm_start.parse("runs/me@home") == ("runs/me@home", "latest", None)


def _cli_error(capsys, workdir, *sets) -> str:
    argv = ["train", "--config", TINY, "--workdir", str(workdir), "--no-progress"]
    for s in sets:
        argv += ["--set", s]
    rc = cli.main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


def test_mismatches_exit_2_before_any_work(base, capsys, tmp_path):
    new = tmp_path / "new"
    msg = _cli_error(capsys, new, f"train.init_from={base}", "model.hidden_dim=64")
    assert "model.hidden_dim (32 there, 64 here)" in msg
    msg = _cli_error(capsys, new, f"train.init_from={base}", "model.cell=gru")
    assert "model.cell" in msg
    msg = _cli_error(capsys, new, f"train.init_from={base}@7")
    assert "no checkpoint 7" in msg and f"[{BASE_STEPS // 2}, {BASE_STEPS}]" in msg
    msg = _cli_error(capsys, new, f"train.init_from={tmp_path / 'nothing'}")
    assert "train.init_from" in msg and "config.json missing" in msg
    msg = _cli_error(capsys, new, f"train.init_from={base}", "data.source=text", f"data.dir={tmp_path}")
    assert "data.source" in msg
    msg = _cli_error(capsys, new, f"train.init_from={base}", "model.source_embeddings=x.txt")
    assert "train.init_from" in msg and "model.source_embeddings" in msg
    assert not os.path.exists(new / "config.json")


def test_vocabulary_mismatch_exits_2_naming_data_vocab_from(base, capsys, tmp_path):
    """A run whose vocabulary differs (here: the base run's vocab.json describes other
    characters) is refused after the data is opened, before anything is compiled."""
    other = tmp_path / "other"
    subprocess.run(["cp", "-r", str(base), str(other)], check=True)
    path = other / "vocab" / "vocab.json"
    desc = json.loads(path.read_text())
    desc["source"] = desc["target"] = {"kind": "char", "itos": ["<pad>", "<s>", "</s>", "<unk>"] + list("abc")}
    path.write_text(json.dumps(desc))
    msg = _cli_error(capsys, tmp_path / "new", f"train.init_from={other}", *FINE_TUNE)
    assert "different vocabulary" in msg and f"data.vocab_from={other}" in msg
    assert not os.path.exists(tmp_path / "new" / "checkpoints")


@pytest.mark.slow
def test_fine_tune_starts_from_the_trained_model_and_resumes_bit_identically(base, tmp_path):
    fresh, tuned = tmp_path / "fresh", tmp_path / "tuned"
    train(fresh, *FINE_TUNE)
    proc = train(tuned, *FINE_TUNE, f"train.init_from={base}")
    assert f"starting at step 0 of 12, initialised from {base}" in proc.stderr
    first = {w: next(r for r in read_metrics(w) if r["kind"] == "eval") for w in (fresh, tuned)}
    assert first[fresh]["step"] == first[tuned]["step"] == 2
    # The reverse model already knows the output alphabet (36 characters of 99), the lengths and
    # EOS: it starts below a uniform guess over those 37 outcomes, which a fresh model, still
    # near uniform over all 99 ids, is far above (measured: 3.39 against 4.53 nats per token).
    print("first evaluation loss: fresh", first[fresh]["loss"], "fine-tuned", first[tuned]["loss"])
    assert first[tuned]["loss"] < math.log(37) < first[fresh]["loss"] - 0.5, first
    assert first[tuned]["loss"] < first[fresh]["loss"] - 0.75, first
    saved = json.loads((tuned / "config.json").read_text())
    assert saved["train"]["init_from"] == str(base) and saved["data"]["task"] == "copy"

    # SIGKILL during an asynchronous save, then restart (with the same command): bit-identical
    killed = tmp_path / "killed"
    k = run_and_kill(killed, saving(4), sets=[*FINE_TUNE, f"train.init_from={base}"])
    assert k["killed"] and k["tmp"], k
    again = train(killed, *FINE_TUNE, f"train.init_from={base}")
    assert "resuming from step" in again.stderr
    assert_same_state(load_state(killed)[0], load_state(tuned)[0])
    assert trace(killed) == trace(tuned)
    # killed before its first checkpoint and restarted without --init-from: the saved
    # config's init_from still holds, so it also ends bit-identical
    early = tmp_path / "early"
    k = run_and_kill(early, started, sets=[*FINE_TUNE, f"train.init_from={base}"])
    assert k["killed"] and not k["committed"], k
    train(early, *FINE_TUNE)
    assert_same_state(load_state(early)[0], load_state(tuned)[0])


@pytest.mark.slow
def test_text_fine_tune_with_data_vocab_from(tmp_path):
    """Text runs: a different SentencePiece vocabulary is refused (exit 2, naming
    data.vocab_from); with data.vocab_from the new data is tokenised with the old vocabulary."""
    from test_data import MULTI30K

    if not os.path.isdir(MULTI30K):
        pytest.skip("no Multi30k in ../shared/data")
    corpora = {}
    for name, start in (("a", 0), ("b", 1000)):  # two slices of Multi30k: "old" and "new" data
        d = tmp_path / name
        d.mkdir()
        for split, n in (("train", 600), ("valid", 50)):
            for lang in ("en", "de"):
                with open(os.path.join(MULTI30K, f"{split}.{lang}"), encoding="utf-8") as f:
                    lines = f.readlines()[start:start + n]
                (d / f"{split}.{lang}").write_text("".join(lines), encoding="utf-8")
        corpora[name] = str(d)
    text = ["data.source=text", "data.src_lang=en", "data.tgt_lang=de", "data.test_split=", "data.vocab_size=200",
            f"data.cache_dir={tmp_path / 'cache'}", "data.max_source_length=40", "data.max_target_length=40",
            "data.buckets=[[40,41]]", "data.max_dropped_fraction=1.0", "train.steps=4", "train.eval_every=4",
            "train.eval_sentences=8", "train.checkpoint_every=4", "train.ema_decay=0.0", "decode.max_len_b=4"]
    old = tmp_path / "old"
    train(old, *text, f"data.dir={corpora['a']}")
    new = tmp_path / "new"
    proc = train(new, *text, f"data.dir={corpora['b']}", f"train.init_from={old}", expect=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"data.vocab_from={old}" in errors[0], proc.stderr[-3000:]
    assert not os.path.exists(new / "checkpoints")
    new2 = tmp_path / "new2"
    train(new2, *text, f"data.dir={corpora['b']}", f"train.init_from={old}", f"data.vocab_from={old}")
    for name in os.listdir(old / "vocab"):
        assert (new2 / "vocab" / name).read_bytes() == (old / "vocab" / name).read_bytes()
    state, _, step = load_state(new2)
    assert step == 4 and dataclasses.is_dataclass(state)
