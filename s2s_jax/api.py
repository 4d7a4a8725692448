"""The documented Python API: train, load a run or a bundle, translate, score, export.

    import s2s_jax

    s2s_jax.setup()                                   # compile cache + host allocator, as the CLI does
    config = s2s_jax.load_config("experiments/configs/tiny.py", ["train.steps=40"])
    s2s_jax.train(config, "runs/tiny")                # resumes if runs/tiny has checkpoints
    model = s2s_jax.load("runs/tiny")                 # or best=True, step=N, average_last=K
    model.translate(["hello world"], beam=3, nbest=2)   # [[Hypothesis(text, score, tokens), ...]]
    model.score([("hello world", "dlrow olleh")])       # [-1.23]: log p(target | source)
    model.export("bundles/tiny")                      # a self-contained bundle directory
    bundle = s2s_jax.load_bundle("bundles/tiny")      # jax + numpy + safetensors + sentencepiece only
    bundle.translate(["hello world"])

Everything here is a thin layer over the modules the CLI uses (`inference.runs`,
`inference.translator`, `inference.export`, `trainer`), so the API and the CLI give the same results.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from s2s_jax.config import Config, UserError
from s2s_jax.runtime import setup

__all__ = ["Hypothesis", "Model", "load", "load_bundle", "load_config", "setup", "train"]


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    text: str
    score: float  # beam search's ranking score (length-penalised log-prob); greedy: the log-prob
    tokens: tuple[str, ...]  # output pieces, EOS excluded


def load_config(path_or_config, overrides: Sequence[str] = ()) -> Config:
    """A Config from an experiment file (`get_config()`), a config.json or a Config, with
    `section.field=value` overrides as on the command line."""
    from s2s_jax import config as config_lib

    config = path_or_config if isinstance(path_or_config, Config) else config_lib.load(os.fspath(path_or_config))
    return config_lib.override(config, list(overrides))


def train(config, workdir: str, *, progress: bool = False) -> dict:
    """Trains (or resumes) `config` in `workdir`; returns the final evaluation metrics."""
    from s2s_jax.training import train_and_evaluate

    return train_and_evaluate(load_config(config), os.fspath(workdir), progress=progress)


class Model:
    """A trained run loaded for inference (see `load`)."""

    def __init__(self, run, translator):
        self.run, self.translator = run, translator

    @property
    def config(self) -> Config:
        return self.translator.config

    @property
    def checkpoint(self) -> dict:
        """{"which": latest | best | step | average, "steps": [...]}."""
        return self.run.checkpoint

    @property
    def params(self):
        return self.run.params

    def translate(self, lines: Sequence[str], *, beam: int | None = None, nbest: int = 1) -> list[list[Hypothesis]]:
        """Per line, its `nbest` hypotheses, best first (blank lines: empty hypotheses)."""
        if isinstance(lines, str):
            raise TypeError("translate() takes a list of strings, not one string")
        beam = beam or self.config.decode.beam_size
        if nbest > beam:
            raise UserError(f"nbest {nbest} must be <= beam {beam}")
        return [[Hypothesis(h["text"], h["score"], tuple(h["tokens"])) for h in hyps]
                for hyps in self.translator.translate_full(list(lines), beam=beam, nbest=nbest)]

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float | None]:
        """log p(target | source) of each (source, target) pair, EOS included (None for a blank source)."""
        return [r["score"] for r in self.translator.score(list(pairs))]

    def evaluate(self, *, split: str | None = None, src: str | None = None, ref: str | None = None,
                 beam: int | None = None) -> dict:
        """sacreBLEU / chrF / exact match of a split of the run's corpus or of a file pair."""
        from s2s_jax.inference.evaluate import evaluate

        return evaluate(self.translator, self.run.workdir, split=split, src_file=src, ref_file=ref, beam=beam,
                        checkpoint=str(self.checkpoint["which"]), write=False)

    def export(self, out: str, **kwargs) -> str:
        """Writes an export bundle of the same checkpoint choice (kwargs: dtype, beams, platforms, force)."""
        from s2s_jax.inference.export import export_bundle
        from s2s_jax.rundir import CheckpointChoice

        choice = CheckpointChoice.of_record(self.checkpoint)
        return export_bundle(self.run.workdir, os.fspath(out), **choice.kwargs(), **kwargs)


def load(workdir: str, *, step: int | None = None, best: bool = False, average_last: int | None = None,
         decode: Sequence[str] = ()) -> Model:
    """A trained run (latest checkpoint; or `step`, the `best`, or the average of the last K).
    decode: `decode.field=value` changes such as "decode.length_penalty=1.0"."""
    from s2s_jax.inference.runs import load_run

    run = load_run(os.fspath(workdir), step=step, best=best, average_last=average_last)
    return Model(run, run.translator(decode))


def load_bundle(path: str, *, verify: bool = True):
    """An export bundle (`s2s_jax.inference.bundle.Bundle`): translate / translate_full / params."""
    from s2s_jax.inference.bundle import load_bundle as _load

    return _load(os.fspath(path), verify=verify)
