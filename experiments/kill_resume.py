"""Exact resume under SIGKILL, N times: each trial trains tiny.py, SIGKILLs it 1-3 times at
random moments (while an asynchronous save is in flight, right after a random step, or after a
random delay), restarts it until it finishes, and compares the final train state (every array,
bit for bit) and the loss trace (metrics.jsonl) with an uninterrupted run of the same length.

    python experiments/kill_resume.py --trials 20            # ~10 min on 2 busy CPU cores
    python experiments/kill_resume.py --trials 5 --init-from runs/tiny --set data.task=copy
                                                             # the same for a warm-started run

Prints one line per trial and `bit-identical: K/N`; exits 1 unless K == N. Subprocesses share a
persistent XLA compilation cache, so only the reference run compiles.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from s2s_jax.checkpoint import unfinished_saves  # noqa: E402  (the checkpoint layout's own reader)
from s2s_jax.rundir import committed_steps  # noqa: E402
TINY = os.path.join(REPO, "experiments", "configs", "tiny.py")


def sets(steps: int) -> list[str]:
    return ["data.buckets=[[20,21]]", f"train.steps={steps}", "train.log_every=1", "train.eval_every=10",
            "train.eval_sentences=16", "train.checkpoint_every=2", "train.keep_checkpoints=3",
            "train.ema_decay=0.9"]


def env(cache: str) -> dict:
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


EXTRA: list[str] = []  # --set / --init-from arguments of every run (main fills it)


def cmd(workdir: str, steps: int) -> list[str]:
    out = [sys.executable, "-m", "s2s_jax", "train", "--config", TINY, "--workdir", workdir, "--no-progress"]
    for s in sets(steps):
        out += ["--set", s]
    return out + EXTRA


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def logged(workdir: str, step: int) -> bool:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return False
    with open(path, "rb") as f:
        return f'"step": {step},'.encode() in f.read()


def random_trigger(rng: random.Random, steps: int, duration: float):
    kind = rng.choice(["save", "step", "time"])
    if kind == "save":
        k = rng.randrange(2, steps + 1, 2)

        def saving(w, t):  # a tmp folder made by this process (a previous kill's is older)
            since = time.time() - t - 0.01
            return any(int(os.path.basename(n).split(".")[0]) >= k and _mtime(os.path.join(w, n)) >= since
                       for n in unfinished_saves(w))
        return f"during the async save of step >= {k}", saving
    if kind == "step":
        k = rng.randrange(1, steps + 1)
        return f"right after step {k}", lambda w, t: logged(w, k)
    delay = rng.uniform(0.0, 0.9 * duration)
    return f"{delay:.2f} s after start", lambda w, t: t >= delay


def run_and_kill(workdir: str, steps: int, cache: str, trigger) -> dict:
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd(workdir, steps), cwd=REPO, env=env(cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        if trigger(workdir, time.monotonic() - t0):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    return {"killed": proc.returncode == -signal.SIGKILL, "committed": committed_steps(workdir),
            "tmp": unfinished_saves(workdir)}


def train(workdir: str, steps: int, cache: str) -> float:
    t0 = time.monotonic()
    proc = subprocess.run(cmd(workdir, steps), cwd=REPO, env=env(cache), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training failed in {workdir}:\n{proc.stderr[-3000:]}")
    return time.monotonic() - t0


def final_state(workdir: str):
    import jax

    from s2s_jax import rundir
    from s2s_jax.train_state import make_model

    config = rundir.read_config(workdir)
    sv, tv = rundir.read_vocabs(workdir)
    model = make_model(config, sv.vocab_size, tv.vocab_size)
    state, _, step = rundir.restore(workdir, config, model, None, "latest")
    return step, jax.tree.leaves(jax.device_get(state))


def loss_trace(workdir: str) -> list[dict]:
    from s2s_jax.metrics import read_metrics

    # wall-clock fields (time, tokens_per_sec, sentences_per_sec) differ run to run; the rest must not
    return [{k: v for k, v in r.items() if k != "time" and not k.endswith("_per_sec")} for r in read_metrics(workdir)]


def main() -> int:
    import numpy as np

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=None, help="folder for the runs (default: a new tmp folder, removed)")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "s2s_jax_test_xla_cache"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="extra config override of every run (repeatable)")
    p.add_argument("--init-from", default=None, metavar="RUN[@best|@STEP]", help="warm-start every run from RUN")
    args = p.parse_args()
    for o in args.overrides:
        EXTRA.extend(["--set", o])
    if args.init_from:
        EXTRA.extend(["--init-from", os.path.abspath(args.init_from)])
    root = args.root or tempfile.mkdtemp(prefix="kill_resume_")
    rng = random.Random(args.seed)

    ref_dir = os.path.join(root, "reference")
    shutil.rmtree(ref_dir, ignore_errors=True)
    train(ref_dir, args.steps, args.cache)  # compiles into the cache
    shutil.rmtree(ref_dir)
    duration = train(ref_dir, args.steps, args.cache)  # a warm run: how long a restart takes
    ref_step, ref_leaves = final_state(ref_dir)
    ref_trace = loss_trace(ref_dir)
    assert ref_step == args.steps
    print(f"reference: {args.steps} steps, {len(ref_leaves)} arrays, warm run {duration:.1f} s", flush=True)

    identical = kills = mid_save = 0
    for trial in range(args.trials):
        workdir = os.path.join(root, f"trial{trial:02d}")
        shutil.rmtree(workdir, ignore_errors=True)
        notes = []
        for _ in range(rng.randint(1, 3)):
            label, trigger = random_trigger(rng, args.steps, duration)
            k = run_and_kill(workdir, args.steps, args.cache, trigger)
            notes.append(f"{label}: " + (f"killed, committed {k['committed']}, tmp {k['tmp']}" if k["killed"]
                                         else "finished before the kill"))
            kills += k["killed"]
            mid_save += bool(k["killed"] and k["tmp"])
            if not k["killed"]:
                break  # the run is complete; later kills would hit a finished workdir
        train(workdir, args.steps, args.cache)
        step, leaves = final_state(workdir)
        same = step == ref_step and len(leaves) == len(ref_leaves) and all(
            a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(leaves, ref_leaves))
        same_trace = loss_trace(workdir) == ref_trace
        identical += same and same_trace
        print(f"trial {trial:2d}: {'bit-identical' if same else 'PARAMS DIFFER'}"
              f"{'' if same_trace else ', LOSS TRACE DIFFERS'}; " + "; ".join(notes), flush=True)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{kills} SIGKILLs landed, {mid_save} of them during an asynchronous save (an uncommitted "
          f"tmp folder left behind)")
    print(f"bit-identical: {identical}/{args.trials}")
    if not args.root:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if identical == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
