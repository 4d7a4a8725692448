"""Reproducibility and exact resume of `python -m s2s_jax train` (subprocesses, CPU).

One uninterrupted reference run of tiny.py (12 steps, a checkpoint every 2, evaluations at 6
and 12, EMA and dropout on, log_every=1) is compared bit for bit — every logged loss and every
array of the final train state — with: a second run of the same config; runs SIGKILLed at
chosen moments (during an asynchronous save, before the first checkpoint, between checkpoints)
and restarted; a run whose latest checkpoint was truncated or overwritten. Also: SIGTERM and
SIGINT exit 0 within seconds with a checkpoint at the step reached, the non-finite guard stops a
run with exit code 2 and leaves the last good checkpoint intact, and an asynchronous save is not
disturbed by the next steps donating the state's buffers.

All subprocesses share a persistent XLA compilation cache (only the first compiles).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2s_jax import config as config_lib
from s2s_jax.checkpoint import Checkpoints, unfinished_saves
from s2s_jax.rundir import read_vocabs
from s2s_jax.metrics import read_metrics
from s2s_jax.train_state import abstract_state, make_model

from _helpers import REPO, run_env, train_cmd  # noqa: E402

STEPS = 12
SETS = ["data.buckets=[[20,21]]", f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=6",
        "train.eval_sentences=16", "train.checkpoint_every=2", "train.keep_checkpoints=3", "train.ema_decay=0.9"]


def train(workdir, *extra, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(workdir, *SETS, *extra), cwd=REPO, env=run_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == expect, proc.stderr[-4000:]
    return proc


def trace(workdir) -> list[dict]:
    """metrics.jsonl without the wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in ("time", "tokens_per_sec", "sentences_per_sec")} for r in read_metrics(workdir)]


def load_state(workdir, step: int | None = None):
    """(state as numpy, meta, step) of a run's checkpoint (default: the newest readable one)."""
    config = config_lib.load(os.path.join(workdir, "config.json"))
    sv, tv = read_vocabs(str(workdir))
    model = make_model(config, sv.vocab_size, tv.vocab_size)
    ckpts = Checkpoints(str(workdir), keep=10 ** 6, keep_best=0, async_save=False)
    try:
        state, meta, s = ckpts.restore(abstract_state(config, model), step)
    finally:
        ckpts.close()
    return jax.device_get(state), meta, s


def assert_same_state(a, b) -> None:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y), "train states differ"


def committed_steps(workdir, sub="checkpoints") -> list[int]:
    d = os.path.join(workdir, sub)
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference") / "run"
    train(workdir)
    state, meta, step = load_state(workdir)
    assert step == STEPS
    return {"workdir": workdir, "state": state, "meta": meta, "trace": trace(workdir)}


# --------------------------------------------------------------------------- (a) reproducibility

def test_same_config_and_seed_give_bit_identical_losses_and_params(reference, tmp_path):
    train(tmp_path / "again")
    ref = reference["trace"]
    assert [r["step"] for r in ref if r["kind"] == "train"] == list(range(1, STEPS + 1))
    assert [r["step"] for r in ref if r["kind"] == "eval"] == [6, 12]
    assert trace(tmp_path / "again") == ref
    assert_same_state(load_state(tmp_path / "again")[0], reference["state"])
    # the checkpoint describes itself: data-iterator state, config and vocabulary reference
    meta = reference["meta"]
    assert meta["data_state"] == {"epoch": 0, "batch": STEPS}
    assert meta["config"]["train"]["steps"] == STEPS and meta["config"]["model"]["hidden_dim"] == 32
    assert meta["vocab"]["dir"] == "vocab" and "vocab.json" in meta["vocab"]["files"]


# --------------------------------------------------------------------------- (b) SIGKILL + resume

def _mtime(path) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def saving(min_step: int):
    """Kill trigger: an asynchronous save of a step >= min_step is in flight (its tmp folder
    exists and was made by this process, not left over by a previous kill)."""
    def when(workdir, since):
        return any(int(os.path.basename(p).split(".")[0]) >= min_step and _mtime(os.path.join(workdir, p)) >= since
                   for p in unfinished_saves(workdir))
    when.label = f"during the async save of a step >= {min_step}"
    return when


def logged(step: int):
    """Kill trigger: the train record of `step` is in metrics.jsonl."""
    def when(workdir, since):
        path = os.path.join(workdir, "metrics.jsonl")
        if not os.path.exists(path):
            return False
        with open(path, "rb") as f:
            return f'"step": {step},'.encode() in f.read()
    when.label = f"after step {step} was logged"
    return when


def started(workdir, since):
    """Kill trigger: the run has written its config (before any checkpoint)."""
    return os.path.exists(os.path.join(workdir, "config.json"))


started.label = "before the first checkpoint"


def run_and_kill(workdir, when, *, sets=SETS, poll: float = 0.002, timeout: float = 600) -> dict:
    """Starts a training run (tiny.py with `sets`) and SIGKILLs it as soon as `when(workdir)`
    holds. Returns what the kill left: whether it landed (the run was still going), the committed
    steps, tmp folders."""
    since = time.time() - 0.01  # file times are a little coarse
    proc = subprocess.Popen(train_cmd(workdir, *sets), cwd=REPO, env=run_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if when(workdir, since):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(poll)
    finally:
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
        proc.wait()
    return {"killed": proc.returncode == -signal.SIGKILL, "label": when.label,
            "committed": committed_steps(workdir), "tmp": unfinished_saves(workdir)}


def kill_and_resume(reference, workdir, triggers) -> list[dict]:
    kills = [run_and_kill(workdir, when) for when in triggers]
    for k in kills:
        assert k["killed"], f"the run ended before the kill ({k['label']})"
    proc = train(workdir)
    if any(k["committed"] for k in kills):
        assert "resuming from step" in proc.stderr
    assert_same_state(load_state(workdir)[0], reference["state"])
    assert trace(workdir) == reference["trace"]  # the resumed log reads like one uninterrupted run
    assert not unfinished_saves(workdir)  # leftovers of interrupted saves are cleaned up
    return kills


def test_sigkill_during_async_save_then_resume_is_bit_identical(reference, tmp_path):
    kills = kill_and_resume(reference, tmp_path / "run", [saving(4)])
    # the kill landed while the save was in flight: its tmp folder was left behind, uncommitted
    assert kills[0]["tmp"], kills


@pytest.mark.slow
def test_sigkill_three_times_at_different_points_then_resume_is_bit_identical(reference, tmp_path):
    kill_and_resume(reference, tmp_path / "run", [started, saving(4), logged(9)])


# --------------------------------------------------------------------------- (d) SIGTERM / SIGINT

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_step_writes_checkpoint_and_exits_0(tmp_path, sig):
    workdir = tmp_path / "run"
    long = ["train.steps=100000", "train.checkpoint_every=100000", "train.eval_every=100000"]
    log_path = tmp_path / "stderr.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(train_cmd(workdir, *SETS, *long), cwd=REPO, env=run_env(),
                                stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 600
        while not logged(3)(workdir, 0) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended early"
        t0 = time.monotonic()
        proc.send_signal(sig)
        proc.wait(timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    err = log_path.read_text()
    assert proc.returncode == 0, err[-3000:]
    print(f"{sig.name}: exited 0 in {elapsed:.2f} s")
    assert elapsed < 10, f"took {elapsed:.1f} s to exit after {sig.name}"
    line = next(line for line in err.splitlines() if "checkpoint written at step" in line)
    assert line.startswith(sig.name)
    step = int(line.split("checkpoint written at step ")[1].split(";")[0])
    assert step >= 3
    assert committed_steps(workdir) == [step]
    state, meta, _ = load_state(workdir)
    assert int(state.step) == step and meta["data_state"] == {"epoch": 0, "batch": step}
    assert max(r["step"] for r in read_metrics(workdir) if r["kind"] == "train") == step


# --------------------------------------------------------------------------- (e) corrupt latest checkpoint

def _corrupt(step_dir: str, how: str) -> None:
    files = [os.path.join(root, f) for root, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
    data_files = [f for f in files if os.sep + "d" + os.sep in f]
    assert data_files
    if how == "truncate":  # a disk filled up / a copy cut short
        for f in data_files:
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
    elif how == "garbage":  # overwritten bytes, same sizes
        rng = np.random.default_rng(0)
        for f in files:
            size = os.path.getsize(f)
            with open(f, "wb") as fh:
                fh.write(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    elif how == "meta":  # the JSON half of the step
        with open(os.path.join(step_dir, "meta", "metadata"), "w") as fh:
            fh.write('{"data_state": ')


@pytest.mark.parametrize("how", ["truncate", pytest.param("garbage", marks=pytest.mark.slow),
                                 pytest.param("meta", marks=pytest.mark.slow)])
def test_corrupt_latest_checkpoint_falls_back_to_previous_with_warning(reference, tmp_path, how):
    workdir = tmp_path / "run"
    shutil.copytree(reference["workdir"], workdir)
    assert committed_steps(workdir) == [8, 10, 12]
    _corrupt(os.path.join(workdir, "checkpoints", "12"), how)
    proc = train(workdir)
    warning = [line for line in proc.stderr.splitlines() if "checkpoints/12 is unreadable" in line]
    assert warning and "falling back" in warning[0], proc.stderr[-3000:]
    assert "resuming from step 10" in proc.stderr
    # the unreadable step was moved aside (kept for inspection) and step 12 trained again, exactly
    assert [n.split("-")[:2] for n in os.listdir(workdir / "corrupt")] == [["latest", "12"]]
    assert committed_steps(workdir) == [8, 10, 12]
    assert_same_state(load_state(workdir)[0], reference["state"])
    assert trace(workdir) == reference["trace"]


# --------------------------------------------------------------------------- non-finite guard

# The config audit refuses a non-finite train.learning_rate, so the fault is injected: the
# schedule the step reads returns infinity, as a diverging run's arithmetic would.
INFINITE_LR = ("import sys; import s2s_jax.training.steps as steps; from s2s_jax.cli import main; "
               "steps.learning_rate_fn = lambda cfg: (lambda step: float('inf')); sys.exit(main(sys.argv[1:]))")


def test_nonfinite_streak_stops_with_exit_2_and_keeps_last_good_checkpoint(reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference["workdir"], workdir)
    # An infinite learning rate: every update is non-finite, so every step is skipped.
    cmd = train_cmd(workdir, *SETS, "train.steps=40", "train.max_nonfinite=3", "train.checkpoint_every=1")
    assert cmd[1:3] == ["-m", "s2s_jax"]
    proc = subprocess.run([cmd[0], "-c", INFINITE_LR, *cmd[3:]], cwd=REPO, env=run_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite" in errors[0] and "step 12" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert committed_steps(workdir) == [8, 10, 12]  # nothing saved during the streak
    assert_same_state(load_state(workdir)[0], reference["state"])
    skipped = [r["skipped_steps"] for r in read_metrics(workdir) if r["kind"] == "train" and r["step"] > STEPS]
    assert skipped and all(s == 1 for s in skipped)  # counted and logged


# --------------------------------------------------------------------------- async save vs donation

def test_async_save_is_not_disturbed_by_donating_the_state(tmp_path):
    """The trainer donates the state to the next step while an asynchronous save of it may still
    be writing. Orbax takes its host copy before save() returns; on CPU that "copy" is a view of
    the device buffer, which makes XLA skip the donation (it copies instead), so the bytes being
    written are never overwritten. Checked on the real thing: save, run donating steps at once,
    then read the checkpoint back."""
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x * 2 + 1, s), donate_argnums=0)
    probe = {"a": jnp.zeros(4)}
    bump(probe)
    assert probe["a"].is_deleted()  # donation is active on this backend
    state = {"a": jnp.arange(1 << 20, dtype=jnp.float32), "b": jnp.ones((256, 256), jnp.float32)}
    # (built apart: a numpy view of `state` taken here would itself block the donation)
    expected = {"a": np.arange(1 << 20, dtype=np.float32), "b": np.ones((256, 256), np.float32)}
    ckpts = Checkpoints(str(tmp_path), keep=2, keep_best=0)
    try:
        ckpts.save(1, state, {"note": "x"})
        for _ in range(5):
            state = bump(state)
        assert float(state["b"][0, 0]) == 63.0
        ckpts.wait()
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), expected)
        restored, meta, step = ckpts.restore(target)
    finally:
        ckpts.close()
    assert step == 1 and meta == {"note": "x"}
    for k in expected:
        assert np.array_equal(np.asarray(restored[k]), expected[k])
