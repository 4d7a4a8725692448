"""Loading a trained run for inference: config, vocabularies, model and parameters.

The one loader for translate, eval, export, the server and the Python API. A run is a workdir
(layout: `s2s_jax.rundir`); which parameters are used (`rundir.CheckpointChoice`):

    load_run(W)                        latest checkpoint (the newest that restores)
    load_run(W, step=N)                checkpoint N of checkpoints/
    load_run(W, best=True)             newest of best/ (kept by train.best_metric)
    load_run(W, average_last=K)        element-wise mean of the last K checkpoints
    load_run(W).translator(overrides)  a Translator of it (decode.* overrides): `load_translator`

`average_run` writes such a mean as a run directory of its own (the `average` verb).

EMA parameters are used when the run kept them (train.ema_decay > 0). Raw data is never read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

from s2s_jax import rundir
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

    def translator(self, overrides=(), *, max_len: int | None = None, batch_size: int | None = None):
        """A Translator of this run, with `decode.field=value` overrides (and --max-len /
        --batch-size); its `checkpoint` says which parameters it decodes with."""
        from s2s_jax.inference.adapter import SingleModel
        from s2s_jax.inference.shortlist import for_decoding
        from s2s_jax.inference.translator import Translator, decode_overrides

        config = decode_overrides(self.config, overrides, max_len=max_len, batch_size=batch_size)
        shortlist = for_decoding(self.workdir, config, self.source_vocab.vocab_size, self.target_vocab.vocab_size)
        translator = Translator(config, SingleModel(self.model), self.params, self.source_vocab, self.target_vocab,
                                shortlist=shortlist)
        translator.checkpoint = self.checkpoint
        return translator


def _config_and_model(workdir: str):
    from s2s_jax.train_state import make_model

    rundir.require_run(workdir)
    config = rundir.read_config(workdir)
    source_vocab, target_vocab = rundir.read_vocabs(workdir)
    model = make_model(config, source_vocab.vocab_size, target_vocab.vocab_size)
    return config, model, source_vocab, target_vocab


def load_run(workdir: str, *, step: int | None = None, best: bool = False,
             average_last: int | None = None) -> Run:
    """The run in `workdir` with the parameters chosen as in the module docstring.

    Every choice a user can get wrong (both step and best, a step that does not exist, more
    checkpoints to average than the run kept) is a UserError before anything is restored.
    """
    workdir = os.fspath(workdir)
    choice = rundir.CheckpointChoice(step=step, best=best, average_last=average_last)
    rundir.require_run(workdir)
    rundir.require_checkpoints(workdir, choice.folder)
    config, model, source_vocab, target_vocab = _config_and_model(workdir)
    params, record = rundir.chosen_params(workdir, config, model, choice)
    return Run(workdir, config, model, params, source_vocab, target_vocab, record)


def load_translator(workdir: str, *, step: int | None = None, best: bool = False, average_last: int | None = None,
                    overrides=(), max_len: int | None = None, batch_size: int | None = None):
    """A Translator for a trained run (step/best/average_last as in `load_run`)."""
    return load_run(workdir, step=step, best=best, average_last=average_last).translator(
        overrides, max_len=max_len, batch_size=batch_size)


def average_run(workdir: str, out: str, *, last: int | None = None, steps=None, best: int | None = None) -> dict:
    """`average`: writes a run directory `out` whose one checkpoint holds the element-wise mean
    of the chosen checkpoints' parameters (EMA parameters where the run kept them), with the
    run's config.json and vocab/, so translate, eval, export and serve take it like any run.

    The checkpoint is the newest chosen one with its parameters replaced (its optimizer state and
    data-iterator position stay, so `train` on `out` would continue from the average).
    `out/average.json` records the source run and steps. Written to a temporary folder beside
    `out` and renamed into place: nothing is left half-written. Returns the average.json record.
    """
    import jax

    from s2s_jax.checkpoint import Checkpoints
    from s2s_jax.train_state import params_for_eval

    workdir, out = os.fspath(workdir), os.path.abspath(os.fspath(out))
    rundir.require_run(workdir)
    if os.path.abspath(workdir) == out:
        raise UserError(f"--out {out}: is the source run; write the average to a new folder")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"--out {out}: exists and is not an empty folder; pick a new path")
    config, model, _, _ = _config_and_model(workdir)
    which, chosen = rundir.average_steps(workdir, config, last=last, steps=steps, best=best)
    trees = []
    for s in chosen:  # only the parameters of each; the newest's whole state is kept
        state, meta, step = rundir.restore(workdir, config, model, s, which)
        trees.append(params_for_eval(state))
    mean = rundir.average_params(trees)
    mean = jax.tree.map(lambda m, p: jax.device_put(m, p.sharding), mean, state.params)
    state = state.replace(params=mean, ema_params=mean if state.ema_params is not None else None)
    record = {"source": os.path.abspath(workdir), "which": which, "steps": chosen, "checkpoint_step": int(step)}

    with rundir.atomic_folder(out, replace=True) as tmp:  # replace: `out` is missing or empty (checked above)
        shutil.copyfile(rundir.config_path(workdir), rundir.config_path(tmp))
        shutil.copytree(rundir.vocab_dir(workdir), rundir.vocab_dir(tmp))
        if os.path.isfile(rundir.shortlist_path(workdir)):  # the same vocabularies: the same shortlist
            shutil.copyfile(rundir.shortlist_path(workdir), rundir.shortlist_path(tmp))
        writer = Checkpoints(tmp, keep=1, keep_best=0, async_save=False)
        try:
            writer.save(int(step), state, dict(meta, averaged=record))
            writer.wait()
        finally:
            writer.close()
        with open(os.path.join(tmp, rundir.AVERAGE_JSON), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
    return dict(record, out=out)
