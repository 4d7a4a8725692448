"""Loading a trained run for inference: config, vocabularies, model and parameters.

One loader for translate, eval, export, the server and the Python API. A run is a workdir
holding config.json, vocab/ and Orbax checkpoints; which parameters are used:

    load_run(W)                        latest checkpoint (the newest that restores)
    load_run(W, step=N)                checkpoint N of checkpoints/
    load_run(W, best=True)             newest of best/ (kept by train.best_metric)
    load_run(W, average_last=K)        element-wise mean of the last K checkpoints

`average_run` writes such a mean as a run directory of its own (the `average` verb).

EMA parameters are used when the run kept them (train.ema_decay > 0). Raw data is never read.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from s2s_jax.config import Config, UserError

AVERAGE_JSON = "average.json"  # in a run written by `average`: where its parameters came from


@dataclasses.dataclass
class Run:
    """A loaded run: what inference needs, and where its parameters came from."""

    workdir: str
    config: Config
    model: Any  # s2s_jax.model.Seq2Seq
    params: Any  # nested dict of arrays
    source_vocab: Any
    target_vocab: Any
    checkpoint: dict  # {"which": "latest" | "best" | "step" | "average", "steps": [...]}


def average_params(trees):
    """Element-wise mean of parameter trees (same structure), accumulated in float64.

    Accumulating in float64 makes the mean of K identical float32 trees exactly that tree.
    Returns numpy arrays in each leaf's original dtype.
    """
    import jax
    import numpy as np

    trees = list(trees)
    if not trees:
        raise ValueError("average_params needs at least one tree")
    total = jax.tree.map(lambda x: np.asarray(x, np.float64), trees[0])
    for tree in trees[1:]:
        total = jax.tree.map(lambda a, x: a + np.asarray(x, np.float64), total, tree)
    return jax.tree.map(lambda a, x: (a / len(trees)).astype(np.asarray(x).dtype), total, trees[0])


def _require_run(workdir: str) -> None:
    if not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir}: no such folder; train a model there first")
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        raise UserError(f"--workdir {workdir}: no config.json; train a model there first")


def checkpoint_steps(workdir: str, which: str = "latest") -> list[int]:
    """Committed checkpoint steps of a run (which: latest = checkpoints/, best = best/), sorted."""
    from s2s_jax.checkpoint import CheckpointError, Checkpoints

    _require_run(workdir)
    folder = "best" if which == "best" else "checkpoints"
    if not os.path.isdir(os.path.join(workdir, folder)):
        raise CheckpointError(f"--workdir {workdir}: no {which} checkpoint ({folder}/ is missing); train first")
    ckpts = Checkpoints(workdir, keep=10 ** 6, keep_best=10 ** 6 if which == "best" else 0, async_save=False)
    try:
        steps = sorted(ckpts.all_steps(which))
    finally:
        ckpts.close()
    if not steps:
        raise CheckpointError(f"--workdir {workdir}: no {which} checkpoint in {folder}/; train first")
    return steps


def _config_and_model(workdir: str):
    from s2s_jax import config as config_lib
    from s2s_jax.train_state import make_model
    from s2s_jax.vocab import read_vocab_dir

    _require_run(workdir)
    config = config_lib.load(os.path.join(workdir, "config.json"))
    source_vocab, target_vocab = read_vocab_dir(os.path.join(workdir, "vocab"))
    model = make_model(config, source_vocab.vocab_size, target_vocab.vocab_size)
    return config, model, source_vocab, target_vocab


def _restore(workdir: str, config, model, step: int | None, which: str):
    """(state, meta, step) of one checkpoint (the newest that restores when step is None)."""
    from s2s_jax.checkpoint import CheckpointError, Checkpoints
    from s2s_jax.train_state import abstract_state

    ckpts = Checkpoints(workdir, keep=10 ** 6, keep_best=10 ** 6 if which == "best" else 0, async_save=False)
    try:
        restored = ckpts.restore(abstract_state(config, model), step, which=which)
    finally:
        ckpts.close()
    if restored is None:
        raise CheckpointError(f"--workdir {workdir}: no {which} checkpoint; train first")
    state, meta, restored_step = restored
    return state, meta, int(restored_step)


def _inference_params(state):
    """The parameters inference uses: the EMA where the run kept one."""
    return state.ema_params if state.ema_params is not None else state.params


def load_run(workdir: str, *, step: int | None = None, best: bool = False,
             average_last: int | None = None) -> Run:
    """The run in `workdir` with the parameters chosen as in the module docstring.

    Every choice a user can get wrong (both step and best, a step that does not exist, more
    checkpoints to average than the run kept) is a UserError before anything is restored.
    """
    workdir = os.fspath(workdir)
    if (step is not None) + bool(best) + (average_last is not None) > 1:
        raise UserError("--step, --best and --average-last exclude each other; pick one")
    _require_run(workdir)
    from s2s_jax.checkpoint import CheckpointError

    which = "best" if best else "latest"
    if not os.path.isdir(os.path.join(workdir, "best" if best else "checkpoints")):
        raise CheckpointError(f"--workdir {workdir}: no {which} checkpoint; train first")
    config, model, source_vocab, target_vocab = _config_and_model(workdir)
    if average_last is not None:
        _, chosen = _choose_average_steps(workdir, config, last=average_last, last_flag="--average-last")
        trees = [_inference_params(_restore(workdir, config, model, s, "latest")[0]) for s in chosen]
        return Run(workdir, config, model, average_params(trees), source_vocab, target_vocab,
                   {"which": "average", "steps": chosen})
    if step is not None:
        steps = checkpoint_steps(workdir, which)
        if step not in steps:
            raise UserError(f"--step {step}: no such checkpoint in {workdir}/{'best' if best else 'checkpoints'} "
                            f"(steps {steps})")
    state, _, restored_step = _restore(workdir, config, model, step, which)
    params = _inference_params(state)
    info = {"which": "step" if step is not None else which, "steps": [restored_step]}
    averaged = os.path.join(workdir, AVERAGE_JSON)
    if not best and os.path.isfile(averaged):  # written by `average`: say what the parameters are
        import json

        with open(averaged, encoding="utf-8") as f:
            record = json.load(f)
        info = {"which": "average", "steps": record["steps"], "source": record["source"]}
    return Run(workdir, config, model, params, source_vocab, target_vocab, info)


def _choose_average_steps(workdir: str, config, *, last: int | None = None, steps=None, best: int | None = None,
                          last_flag: str = "--last") -> tuple[str, list[int]]:
    """(folder "latest" | "best", steps) to average; every mistake a UserError (last_flag: how
    the caller's option for `last` is spelled in messages)."""
    from s2s_jax import config as config_lib
    from s2s_jax.metrics import read_metrics

    if (last is not None) + (steps is not None) + (best is not None) != 1:
        raise UserError("average: give exactly one of --last K, --steps A,B,C and --best K")
    if best is not None:
        if best < 1:
            raise UserError(f"--best {best}: must be at least 1")
        kept = checkpoint_steps(workdir, "best")
        metric, mode = config_lib.best_metric_and_mode(config)
        value = {r["step"]: r[metric] for r in read_metrics(workdir) if r.get("kind") == "eval" and metric in r}
        ranked = sorted(kept, key=lambda s: (-value.get(s, float("-inf")) if mode == "max" else value.get(s, float("inf")), -s))
        if len(kept) < best:
            raise UserError(f"--best {best}: {workdir}/best keeps only {len(kept)} checkpoint(s) (steps {kept}); "
                            f"lower K, or keep more with train.keep_best")
        return "best", sorted(ranked[:best])
    if last is not None:
        if last < 1:
            raise UserError(f"{last_flag} {last}: must be at least 1")
        kept = checkpoint_steps(workdir, "latest")
        if len(kept) < last:
            raise UserError(f"{last_flag} {last}: {workdir}/checkpoints has only {len(kept)} checkpoint(s) (steps {kept}); "
                            f"lower K, or keep more with train.keep_checkpoints")
        return "latest", kept[-last:]
    kept = checkpoint_steps(workdir, "latest")
    missing = [s for s in steps if s not in kept]
    if missing or not steps or len(set(steps)) != len(steps):
        raise UserError(f"--steps {','.join(map(str, steps))}: {workdir}/checkpoints has steps {kept}; "
                        f"name each of them at most once")
    return "latest", sorted(steps)


def average_run(workdir: str, out: str, *, last: int | None = None, steps=None, best: int | None = None) -> dict:
    """`average`: writes a run directory `out` whose one checkpoint holds the element-wise mean
    of the chosen checkpoints' parameters (EMA parameters where the run kept them), with the
    run's config.json and vocab/, so translate, eval, export and serve take it like any run.

    The checkpoint is the newest chosen one with its parameters replaced (its optimizer state and
    data-iterator position stay, so `train` on `out` would continue from the average).
    `out/average.json` records the source run and steps. Written to a temporary folder beside
    `out` and renamed into place: nothing is left half-written. Returns the average.json record.
    """
    import json
    import shutil
    import tempfile

    import jax

    from s2s_jax.checkpoint import Checkpoints

    workdir, out = os.fspath(workdir), os.path.abspath(os.fspath(out))
    _require_run(workdir)
    if os.path.abspath(workdir) == out:
        raise UserError(f"--out {out}: is the source run; write the average to a new folder")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"--out {out}: exists and is not an empty folder; pick a new path")
    config, model, _, _ = _config_and_model(workdir)
    which, chosen = _choose_average_steps(workdir, config, last=last, steps=steps, best=best)
    trees = []
    for s in chosen:  # only the parameters of each; the newest's whole state is kept
        state, meta, step = _restore(workdir, config, model, s, which)
        trees.append(_inference_params(state))
    mean = average_params(trees)
    mean = jax.tree.map(lambda m, p: jax.device_put(m, p.sharding), mean, state.params)
    state = state.replace(params=mean, ema_params=mean if state.ema_params is not None else None)
    record = {"source": os.path.abspath(workdir), "which": which, "steps": chosen, "checkpoint_step": int(step)}

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".average-", dir=parent)
    try:
        shutil.copyfile(os.path.join(workdir, "config.json"), os.path.join(tmp, "config.json"))
        shutil.copytree(os.path.join(workdir, "vocab"), os.path.join(tmp, "vocab"))
        writer = Checkpoints(tmp, keep=1, keep_best=0, async_save=False)
        try:
            writer.save(int(step), state, dict(meta, averaged=record))
            writer.wait()
        finally:
            writer.close()
        with open(os.path.join(tmp, AVERAGE_JSON), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        os.chmod(tmp, 0o755)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dict(record, out=out)
