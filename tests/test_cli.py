"""End to end through the CLI on the tiny config: train (loss falls), then translate."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, input=None):
    return subprocess.run([sys.executable, "-m", "s2s_jax", *args], cwd=ROOT, capture_output=True, text=True,
                          input=input, timeout=600)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny") / "run"
    proc = run_cli("train", "--config", "experiments/configs/tiny.py", "--workdir", str(workdir), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return workdir, proc


def test_train_writes_resolved_config_metrics_and_loss_falls(tiny_run):
    workdir, proc = tiny_run
    config = json.loads((workdir / "config.json").read_text())
    assert config["name"] == "tiny" and config["train"]["steps"] == 40
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [10, 20, 30, 40]
    assert train[-1]["loss"] < train[0]["loss"] - 0.2, [r["loss"] for r in train]
    assert all(r["tokens_per_sec"] > 0 for r in train)
    assert [r["step"] for r in evals] == [20, 40]
    assert {"loss", "perplexity", "accuracy", "exact_match", "bleu", "chrf", "bleu_signature"} <= set(evals[-1])
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final["loss"] == pytest.approx(evals[-1]["loss"], abs=1e-4)


def test_translate_one_line_per_input_in_order(tiny_run, tmp_path):
    workdir, _ = tiny_run
    lines = ["abc", "hello", "", "x", "a much longer line", "q"]
    proc = run_cli("translate", "--workdir", str(workdir), input="\n".join(lines) + "\n")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.split("\n")[:-1]
    assert len(out) == len(lines)
    assert out[2] == ""  # empty input line -> empty output line
    # Order: each line alone gives the same translation as in the batch.
    for i in (0, 3, 4):
        alone = run_cli("translate", "--workdir", str(workdir), input=lines[i] + "\n")
        assert alone.stdout == out[i] + "\n"
    assert "sentences/s" in proc.stderr


def test_translate_from_file(tiny_run, tmp_path):
    workdir, _ = tiny_run
    src = tmp_path / "in.txt"
    src.write_text("abc\ndef\n")
    outp = tmp_path / "out.txt"
    proc = run_cli("translate", "--workdir", str(workdir), "--input", str(src), "--output", str(outp))
    assert proc.returncode == 0, proc.stderr
    assert len(outp.read_text().splitlines()) == 2


def test_train_rejects_foreign_workdir_and_unknown_task(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    proc = run_cli("train", "--config", "experiments/configs/tiny.py", "--workdir", str(foreign))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not empty" in proc.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    proc = run_cli("train", "--config", "experiments/configs/tiny.py", "--workdir", str(tmp_path / "w"),
                   "--set", "data.task=dates2")
    assert proc.returncode == 2 and "data.task" in proc.stderr and proc.stderr.count("\n") == 1


def test_tuned_host_allocator_keeps_xla_temporaries_mapped():
    """runtime.tune_host_allocator: XLA:CPU's per-execution temporaries (here ~70 MB) are reused
    from a heap that stays mapped instead of being mmap'ed and page-faulted in on every call."""
    prog = ("import resource, sys\n"
            "from s2s_jax.runtime import tune_host_allocator\n"
            "tune_host_allocator()\n"
            "import jax, jax.numpy as jnp\n"
            "f = jax.jit(lambda x: (jnp.sin(x) @ jnp.cos(x)).sum())\n"
            "x = jnp.ones((3000, 3000))\n"
            "f(x).block_until_ready()\n"
            "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(5): f(x).block_until_ready()\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 5)\n")
    faults = {}
    for mode in ("tuned", "default"):
        env = dict(__import__("os").environ, S2S_JAX_HOST_ALLOCATOR=mode, JAX_PLATFORMS="cpu")
        proc = subprocess.run([sys.executable, "-c", prog], cwd=ROOT, capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        faults[mode] = float(proc.stdout.split()[-1])
    assert faults["default"] > 10_000, faults  # 2 x 36 MB of fresh 4 KiB pages per call
    assert faults["tuned"] < faults["default"] / 10, faults
