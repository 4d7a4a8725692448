"""Loading a trained run for inference: config, vocabularies, model and parameters.

One loader for translate, eval, export, the server and the Python API. A run is a workdir
holding config.json, vocab/ and Orbax checkpoints; which parameters are used:

    load_run(W)                        latest checkpoint (the newest that restores)
    load_run(W, step=N)                checkpoint N of checkpoints/
    load_run(W, best=True)             newest of best/ (kept by train.best_metric)
    load_run(W, average_last=K)        element-wise mean of the last K checkpoints

EMA parameters are used when the run kept them (train.ema_decay > 0). Raw data is never read.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from s2s_jax.config import Config, UserError


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


def _restore_params(workdir: str, config, model, step: int | None, which: str):
    """(params, step) of one checkpoint (the newest that restores when step is None)."""
    from s2s_jax.checkpoint import CheckpointError, Checkpoints
    from s2s_jax.train_state import abstract_state

    if not os.path.isdir(os.path.join(workdir, "best" if which == "best" else "checkpoints")):
        raise CheckpointError(f"--workdir {workdir}: no {which} checkpoint; train first")
    ckpts = Checkpoints(workdir, keep=10 ** 6, keep_best=10 ** 6 if which == "best" else 0, async_save=False)
    try:
        restored = ckpts.restore(abstract_state(config, model), step, which=which)
    finally:
        ckpts.close()
    if restored is None:
        raise CheckpointError(f"--workdir {workdir}: no {which} checkpoint; train first")
    state, _, restored_step = restored
    params = state.ema_params if state.ema_params is not None else state.params
    return params, int(restored_step)


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
        if average_last < 1:
            raise UserError(f"--average-last {average_last}: must be at least 1")
        steps = checkpoint_steps(workdir, "latest")
        if len(steps) < average_last:
            raise UserError(f"--average-last {average_last}: {workdir}/checkpoints has only {len(steps)} "
                            f"checkpoint(s) (steps {steps}); lower K, or keep more with train.keep_checkpoints")
        chosen = steps[-average_last:]
        trees = [_restore_params(workdir, config, model, s, "latest")[0] for s in chosen]
        return Run(workdir, config, model, average_params(trees), source_vocab, target_vocab,
                   {"which": "average", "steps": chosen})
    if step is not None:
        steps = checkpoint_steps(workdir, which)
        if step not in steps:
            raise UserError(f"--step {step}: no such checkpoint in {workdir}/{'best' if best else 'checkpoints'} "
                            f"(steps {steps})")
    params, restored_step = _restore_params(workdir, config, model, step, which)
    info = {"which": "step" if step is not None else which, "steps": [restored_step]}
    return Run(workdir, config, model, params, source_vocab, target_vocab, info)
