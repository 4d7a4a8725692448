"""Orbax checkpoints: asynchronous saves, keep-latest-K, best-M by a validation metric, and a
restore that falls back past a truncated or corrupt latest checkpoint.

Layout of a workdir:
    checkpoints/<step>/state   train state (params, opt_state, step, rng, ema, lr_scale, ...)
    checkpoints/<step>/meta    JSON: data-iterator state, metrics, config, vocab references
    best/<step>/...            the same, kept for the best M evaluations by `train.best_metric`
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from s2s_jax.config import UserError

log = logging.getLogger(__name__)


class CheckpointError(UserError):
    pass


def _manager(directory: str, keep: int, *, best_metric: str | None = None, mode: str = "max",
             async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
        best_fn=(lambda m: float(m[best_metric])) if best_metric else None,
        best_mode=mode,
        keep_checkpoints_without_metrics=False if best_metric else True,
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_names=("state", "meta"))


class Checkpoints:
    """Latest-K (every train.checkpoint_every steps) and best-M (at evaluations) checkpoints."""

    def __init__(self, workdir: str, *, keep: int = 3, keep_best: int = 1, best_metric: str = "loss",
                 best_mode: str = "min", async_save: bool = True):
        self.workdir = workdir
        self.latest = _manager(os.path.join(workdir, "checkpoints"), keep, async_save=async_save)
        self.best = None
        if keep_best > 0:
            self.best_metric = best_metric
            self.best = _manager(os.path.join(workdir, "best"), keep_best, best_metric=best_metric,
                                 mode=best_mode, async_save=async_save)

    @staticmethod
    def _args(state, meta: dict):
        return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        """Asynchronous save of (state, meta) at `step`; returns whether a save started."""
        if step in self.latest.all_steps():
            return False
        return self.latest.save(step, args=self._args(state, meta), force=force)

    def save_best(self, step: int, state, meta: dict, metrics: dict) -> None:
        if self.best is not None and step not in self.best.all_steps():
            self.best.save(step, args=self._args(state, meta), metrics=metrics)

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

    def restore(self, abstract_state, step: int | None = None, *, which: str = "latest"):
        """Restores (state, meta) onto the shardings of `abstract_state`.

        With step=None the newest checkpoint that restores cleanly is used: a truncated or
        corrupt newer one is skipped with a warning (it stays on disk for inspection).
        Returns (state, meta, step) or None when there is no checkpoint.
        """
        manager = self.latest if which == "latest" else self.best
        steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        for s in steps:
            try:
                out = manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
                return out["state"], dict(out["meta"]), s
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped
                if step is not None:
                    raise CheckpointError(f"{manager.directory}/{s}: cannot restore ({type(e).__name__}: "
                                          f"{str(e)[:200]}); pick another step") from None
                log.warning("checkpoint %s/%s is unreadable (%s: %s); falling back to an older one",
                            manager.directory, s, type(e).__name__, str(e)[:200])
        return None

    def all_steps(self) -> list[int]:
        return sorted(self.latest.all_steps())
