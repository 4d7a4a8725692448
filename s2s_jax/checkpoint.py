"""Orbax checkpoints: asynchronous saves, keep-latest-K, best-M by a validation metric, and a
restore that falls back past a truncated or corrupt latest checkpoint.

Layout of a workdir:
    checkpoints/<step>/state   train state (params, opt_state, step, rng, ema, lr_scale, ...)
    checkpoints/<step>/meta    JSON: data-iterator state, early-stopping counters, config, vocab
    best/<step>/...            the same, kept for the best M evaluations by `train.best_metric`
    corrupt/<which>-<step>-<time>/   unreadable checkpoints moved aside by the trainer

Why an interrupted save can never be picked up: Orbax writes a step into
`<step>.orbax-checkpoint-tmp/` and renames it to `<step>/` only after every file is written
(the rename is the commit), and `all_steps()` lists committed steps only. A SIGKILL during an
asynchronous save therefore leaves a tmp folder that restore ignores (and that the trainer's
manager deletes on start, `cleanup_tmp`); the previous committed step is used.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

import jax
import orbax.checkpoint as ocp

from s2s_jax import rundir
from s2s_jax.config import UserError

log = logging.getLogger(__name__)


class CheckpointError(UserError):
    pass


TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a save that has not been committed yet


def unfinished_saves(workdir: str) -> list[str]:
    """Interrupted (never committed) saves: `<which>/<step>.orbax-checkpoint-tmp` folders,
    relative to the workdir, in the latest and best checkpoint folders."""
    out = []
    for which, sub in rundir.CHECKPOINT_DIRS.items():
        d = rundir.checkpoint_dir(workdir, which)
        if os.path.isdir(d):
            out += [os.path.join(sub, n) for n in sorted(os.listdir(d)) if TMP_SUFFIX in n]
    return out


def _manager(directory: str, keep: int, *, best_metric: str | None = None, mode: str = "max",
             async_save: bool = True, cleanup_tmp: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
        # Only the trainer (the one writer) may delete half-written steps: a reader (translate,
        # eval) running beside a training job must not remove the job's in-flight save.
        cleanup_tmp_directories=cleanup_tmp,
        best_fn=(lambda m: float(m[best_metric])) if best_metric else None,
        best_mode=mode,
        keep_checkpoints_without_metrics=False if best_metric else True,
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_names=("state", "meta"))


def restore_target(abstract_state):
    """ShapeDtypeStructs with a sharding on every leaf.

    Orbax restores onto the target's shardings; a leaf without one would be restored onto the
    sharding recorded at save time, which names devices that may not exist now (a checkpoint
    written on 8 devices, restored on 1). Leaves without a sharding go to the first local device.
    """
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def one(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding if sharding is not None else default)
    return jax.tree.map(one, abstract_state)


class Checkpoints:
    """Latest-K (every train.checkpoint_every steps) and best-M (at evaluations) checkpoints.

    `cleanup_tmp=True` (the trainer only): delete unfinished `*.orbax-checkpoint-tmp` folders
    left by a killed run, and move checkpoints that fail to restore to workdir/corrupt/ so that
    the run can save that step again.
    """

    def __init__(self, workdir: str, *, keep: int = 3, keep_best: int = 1, best_metric: str = "loss",
                 best_mode: str = "min", async_save: bool = True, cleanup_tmp: bool = False):
        self.workdir = workdir
        self.cleanup_tmp = cleanup_tmp
        self.latest = _manager(rundir.checkpoint_dir(workdir, "latest"), keep, async_save=async_save,
                               cleanup_tmp=cleanup_tmp)
        self.best = None
        self.best_metric = best_metric
        if keep_best > 0:
            self.best = _manager(rundir.checkpoint_dir(workdir, "best"), keep_best, best_metric=best_metric,
                                 mode=best_mode, async_save=async_save, cleanup_tmp=cleanup_tmp)

    @staticmethod
    def _args(state, meta: dict):
        return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))

    def save(self, step: int, state, meta: dict) -> bool:
        """Asynchronous save of (state, meta) at `step`; returns whether a save started.

        Returns once the arrays are copied to host memory (so the caller may donate `state` to
        the next step); the files are written in the background.
        """
        if step in self.latest.all_steps():
            return False
        return self.latest.save(step, args=self._args(state, meta), force=True)

    def save_best(self, step: int, state, meta: dict, metrics: dict) -> bool:
        if self.best is None or step in self.best.all_steps():
            return False
        return self.best.save(step, args=self._args(state, meta), metrics=metrics, force=True)

    def wait(self) -> None:
        self.latest.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        if self.best is not None:
            self.best.close()

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def all_steps(self, which: str = "latest") -> list[int]:
        manager = self.latest if which == "latest" else self.best
        return sorted(manager.all_steps()) if manager is not None else []

    def restore(self, abstract_state, step: int | None = None, *, which: str = "latest"):
        """Restores (state, meta) onto the shardings of `abstract_state` (leaves without one go
        to the first local device).

        With step=None the newest checkpoint that restores cleanly is used: a truncated or
        corrupt newer one is skipped with a warning (and, with cleanup_tmp, moved to
        workdir/corrupt/ for inspection). Returns (state, meta, step), or None when there is no
        readable checkpoint.
        """
        manager = self.latest if which == "latest" else self.best
        if manager is None:
            return None
        steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
        target = restore_target(abstract_state)
        for s in steps:
            try:
                out = manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
                meta = out["meta"]
                if not isinstance(meta, dict):
                    raise ValueError(f"meta is {type(meta).__name__}, expected a JSON object")
                return out["state"], dict(meta), s
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                if step is not None:
                    raise CheckpointError(f"{manager.directory}/{s}: cannot restore ({reason}); "
                                          "pick another step") from None
                log.warning("checkpoint %s/%s is unreadable (%s); falling back to an older one",
                            manager.directory, s, reason)
                if self.cleanup_tmp:
                    self._quarantine(manager, s, which)
        return None

    def _quarantine(self, manager: ocp.CheckpointManager, step: int, which: str) -> None:
        """Moves an unreadable step out of the manager's folder (so the step can be saved
        again and is never tried again) into workdir/corrupt/, kept for inspection."""
        if jax.process_index() == 0:
            src = os.path.join(str(manager.directory), str(step))
            dst_dir = os.path.join(self.workdir, rundir.CORRUPT_DIR)
            os.makedirs(dst_dir, exist_ok=True)
            dst = os.path.join(dst_dir, f"{which}-{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            try:
                shutil.move(src, dst)
                log.warning("moved unreadable checkpoint %s to %s", src, dst)
            except OSError as e:
                log.warning("could not move unreadable checkpoint %s aside (%s)", src, e)
        manager.reload()
