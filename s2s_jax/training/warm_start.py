"""Warm start (train.init_from = RUN | RUN@best | RUN@STEP): a new run from another run's parameters.

    train --config C --workdir NEW --init-from OLD[@best|@STEP]

The new run starts from OLD's parameters (its EMA when it kept one, i.e. what translate uses);
step, optimizer state and learning-rate schedule start fresh, unless train.init_optimizer=True
carries over the optimizer state, the step (the schedule continues) and the plateau scale with
OLD's raw parameters. Everything else is the new run's own: seed, data, checkpoints, resume. On
resume NEW's own checkpoints win, so a run killed at any moment restarts bit-identically (before
its first checkpoint it simply starts from OLD again).

Checked before any work: OLD is a run with that checkpoint, and its architecture (every
model.* field that shapes the parameters or the computation) is the configured one; after the
data is opened, that both runs have the same vocabulary (data.vocab_from=OLD makes the new run
tokenise with OLD's). Each mismatch is one UserError naming the field.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from s2s_jax import config as config_lib
from s2s_jax import rundir
from s2s_jax.checkpoint import Checkpoints
from s2s_jax.config import Config, UserError

# model.* fields that do not change the parameters or what they compute: may differ in a warm start.
TRAINING_ONLY_MODEL_FIELDS = ("dropout", "attention_dropout", "dtype", "unroll", "loss_chunk",
                              "source_embeddings", "target_embeddings", "freeze_embeddings",
                              "embedding_dropout", "output_dropout", "recurrent_dropout", "source_word_dropout",
                              "target_word_dropout", "force_copy")


class WarmStartError(UserError):
    pass


def parse(spec: str) -> tuple[str, str, int | None]:
    """"RUN" | "RUN@best" | "RUN@STEP" -> (run dir, "latest" | "best" | "step", step | None)."""
    run, sep, which = spec.rpartition("@")
    if sep and which == "best":
        return run, "best", None
    if sep and which.isdigit():
        return run, "step", int(which)
    return spec, "latest", None


@dataclasses.dataclass
class InitFrom:
    """A resolved train.init_from: the other run, its config, and the checkpoint to start from."""

    spec: str
    run: str
    config: Config  # the other run's config
    which: str  # latest | best | step
    step: int | None  # None: the newest readable (latest) checkpoint

    def describe(self) -> str:
        return f"{self.run} (checkpoint {self.which if self.step is None else self.step})"

    def check_vocabulary(self, vocab_ref: dict) -> None:
        """The new run's vocabulary (rundir.vocab_reference of its workdir) must be the other's."""
        theirs = rundir.vocab_reference(self.run)["files"]
        if theirs != vocab_ref["files"]:
            raise WarmStartError(
                f"train.init_from={self.spec!r}: {self.run} was trained with a different vocabulary than this run "
                f"(files {_differing(theirs, vocab_ref['files'])} differ); set --set data.vocab_from={self.run} "
                "to tokenise this data with its vocabulary")

    def state(self, config: Config, model):
        """The new run's initial train state (fresh but for what is carried over)."""
        from s2s_jax.train_state import abstract_state, create_state, make_model, params_for_eval

        source_vocab, target_vocab = rundir.read_vocabs(self.run)
        their_model = make_model(self.config, source_vocab.vocab_size, target_vocab.vocab_size)
        theirs = self._restore(abstract_state(self.config, their_model))
        fresh = create_state(config, model)
        params = theirs.params if config.train.init_optimizer else params_for_eval(theirs)
        _check_shapes(self.spec, params, fresh.params, "data.vocab_from", self.run)
        state = fresh.replace(params=params,
                              ema_params=jax.tree.map(jnp.copy, params) if fresh.ema_params is not None else None)
        if config.train.init_optimizer:
            _check_shapes(self.spec, theirs.opt_state, fresh.opt_state, "train.optimizer (and train.clip_norm)",
                          self.run)
            step = int(theirs.step)
            if step >= config.train.steps:
                raise WarmStartError(f"train.steps={config.train.steps}: with train.init_optimizer=True the run "
                                     f"continues from step {step} of {self.run}; set train.steps > {step}")
            ema = state.ema_params
            if ema is not None and theirs.ema_params is not None:
                ema = theirs.ema_params
            state = state.replace(step=theirs.step, opt_state=theirs.opt_state, lr_scale=theirs.lr_scale,
                                  ema_params=ema)
        return state

    def _restore(self, abstract):
        best = self.which == "best"
        ckpts = Checkpoints(self.run, keep=10 ** 6, keep_best=10 ** 6 if best else 0, async_save=False)
        try:
            step = self.step
            if best and step is None:  # the best-ranked of best/ (it keeps train.keep_best of them)
                step = ckpts.best.best_step()
            out = ckpts.restore(abstract, step, which="best" if best else "latest")
        finally:
            ckpts.close()
        if out is None:
            raise WarmStartError(f"train.init_from={self.spec!r}: {self.run} has no readable checkpoint; "
                                 "train it first or pick another run")
        return out[0]


def _differing(a: dict, b: dict) -> str:
    return ", ".join(sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)))


def _check_shapes(spec: str, theirs, ours, fix_field: str, run: str) -> None:
    """Same tree structure and leaf shapes, else a WarmStartError naming what differs."""
    ta = jax.tree_util.tree_flatten_with_path(theirs)[0]
    tb = jax.tree_util.tree_flatten_with_path(ours)[0]
    sa = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in ta}
    sb = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in tb}
    if sa == sb:
        return
    diff = [f"{k}: {sa.get(k)} there, {sb.get(k)} here" for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
    raise WarmStartError(f"train.init_from={spec!r}: the parameters of {run} do not fit this run "
                         f"({'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''}): check {fix_field}")


def resolve(config: Config, workdir: str) -> InitFrom:
    """Checks train.init_from before any work: the run, the checkpoint, the architecture."""
    spec = config.train.init_from
    run, which, step = parse(spec)
    if not rundir.is_run(run):
        raise WarmStartError(f"train.init_from={spec!r}: {run} holds no s2s_jax run (config.json missing); "
                             "give the workdir of a trained run, optionally @best or @STEP")
    if os.path.abspath(run) == os.path.abspath(workdir):
        raise WarmStartError(f"train.init_from={spec!r} is this run's own workdir: a run resumes from its own "
                             "checkpoints without being told; drop --init-from or use a new --workdir")
    try:
        theirs = rundir.read_config(run)
    except UserError as e:
        raise WarmStartError(f"train.init_from={spec!r}: {run}/config.json is unreadable ({e})") from None
    ours_m, theirs_m = config_lib.to_dict(config)["model"], config_lib.to_dict(theirs)["model"]
    diff = [k for k in ours_m if k not in TRAINING_ONLY_MODEL_FIELDS and ours_m[k] != theirs_m.get(k)]
    if diff:
        shown = ", ".join(f"model.{k} ({theirs_m.get(k)!r} there, {ours_m[k]!r} here)" for k in diff)
        raise WarmStartError(f"train.init_from={spec!r}: {run} has a different architecture: {shown}; set these "
                             "fields as that run has them")
    if (config.data.source == "task") != (theirs.data.source == "task"):
        raise WarmStartError(f"train.init_from={spec!r}: the vocabularies cannot match: {run} has data.source="
                             f"{theirs.data.source!r}, this run {config.data.source!r} (built-in tasks use characters, "
                             "text and TFDS corpora SentencePiece); warm-start from a run of the same kind")
    folder = rundir.CHECKPOINT_DIRS["best" if which == "best" else "latest"]
    latest, best = rundir.committed_steps(run, "latest"), rundir.committed_steps(run, "best")
    if which == "step" and step not in latest:
        if step in best:
            which = "best"
        else:
            raise WarmStartError(f"train.init_from={spec!r}: {run} has no checkpoint {step} "
                                 f"(checkpoints/: {latest}, best/: {best})")
    elif not (best if which == "best" else latest):
        raise WarmStartError(f"train.init_from={spec!r}: {run}/{folder} holds no checkpoint; train that run first")
    return InitFrom(spec, run, theirs, which, step)
