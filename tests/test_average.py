"""`average`: a run directory holding the mean of another run's checkpoints, which translate,
eval, export and serve take like any run, and which equals the export bundle's average."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import run_cli

LINES = ["abc", "hello world", "", "x", "a much longer line", "q7", "12345", "zyx wvu"]


@pytest.fixture(scope="module")
def two_checkpoint_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("average") / "run"
    proc = run_cli("train", "--config", "experiments/configs/tiny.py", "--workdir", str(workdir), "--no-progress",
                   "--set", "train.steps=20", "--set", "train.checkpoint_every=10", "--set", "train.eval_every=20",
                   "--set", "train.eval_sentences=16", "--set", "train.learning_rate=0.02")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_averaged_run_equals_the_averaged_bundle(two_checkpoint_run, tmp_path):
    from s2s_jax.inference.bundle import load_bundle
    from s2s_jax.inference.export import export_bundle
    from s2s_jax.inference.bundle import flatten_params
    from s2s_jax.inference.runs import load_run
    from s2s_jax.rundir import average_params
    from s2s_jax.inference.runs import load_translator

    out = tmp_path / "avg"
    proc = run_cli("average", "--workdir", str(two_checkpoint_run), "--last", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout)
    assert record["steps"] == [10, 20] and json.loads((out / "average.json").read_text())["steps"] == [10, 20]

    run = load_run(str(out))
    assert run.checkpoint["which"] == "average" and run.checkpoint["steps"] == [10, 20]
    expected = average_params([load_run(str(two_checkpoint_run), step=s).params for s in (10, 20)])
    for name, value in flatten_params(run.params).items():
        np.testing.assert_array_equal(np.asarray(value), flatten_params(expected)[name])

    bundle = load_bundle(export_bundle(str(two_checkpoint_run), str(tmp_path / "bundle"), average_last=2,
                                       beams=[3], platforms=("cpu",)))
    averaged = [h[0][0] for h in load_translator(str(out)).translate(LINES, beam=3)]
    assert averaged == bundle.translate(LINES, beam=3)
    latest = [h[0][0] for h in load_translator(str(two_checkpoint_run)).translate(LINES, beam=3)]
    assert averaged != latest  # the average is another model than the last checkpoint

    src = tmp_path / "in.txt"
    src.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    proc = run_cli("translate", "--workdir", str(out), "--input", str(src), "--beam", "3")
    assert proc.returncode == 0 and proc.stdout.split("\n")[:-1] == averaged, proc.stderr[-2000:]
    proc = run_cli("eval", "--workdir", str(out), "--beam", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["parameters"]["which"] == "average"
    proc = run_cli("export", "--workdir", str(out), "--out", str(tmp_path / "bundle2"), "--platforms", "cpu",
                   "--beam", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert load_bundle(str(tmp_path / "bundle2")).translate(LINES, beam=3) == averaged


@pytest.mark.parametrize("args,expect", [
    (["--last", "5"], "--last 5: "),
    (["--steps", "10,7"], "--steps 10,7: "),
    (["--steps", "ten"], "--steps ten: give checkpoint steps as integers"),
    (["--best", "3"], "--best 3: "),
    (["--last", "0"], "--last 0: must be at least 1"),
])
def test_average_mistakes_exit_2(two_checkpoint_run, tmp_path, args, expect):
    proc = run_cli("average", "--workdir", str(two_checkpoint_run), *args, "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and expect in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "o").exists()


def test_average_never_writes_over_a_folder(two_checkpoint_run, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    for out in (tmp_path / "full", two_checkpoint_run):
        proc = run_cli("average", "--workdir", str(two_checkpoint_run), "--last", "1", "--out", str(out))
        assert proc.returncode == 2 and "--out" in proc.stderr, proc.stderr
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
