"""Metric writers (process 0 only): JSON lines, TensorBoard (tensorboardX), the progress bar,
curve plots, and corpus scores (sacreBLEU with its signature, chrF, exact match)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Iterable

import numpy as np


def scalars_from_sums(sums: dict) -> dict[str, float]:
    """Token-summed metrics -> per-token means (divided once, after aggregation)."""
    w = max(float(sums["weight"]), 1.0)
    out = {"loss": float(sums["loss"]) / w, "nll": float(sums["nll"]) / w,
           "accuracy": float(sums["correct"]) / w, "tokens": float(sums["weight"])}
    out["perplexity"] = math.exp(min(out["nll"], 50.0))
    return out


def corpus_scores(hypotheses: list[str], references: list[str]) -> dict:
    """sacreBLEU (default 13a tokenizer, cased) and chrF, with their signatures; exact match."""
    import sacrebleu

    bleu = sacrebleu.BLEU()
    chrf = sacrebleu.CHRF()
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    exact = float(np.mean([h == r for h, r in zip(hypotheses, references)])) if references else 0.0
    return {"bleu": b.score, "chrf": c.score, "exact_match": exact,
            "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}


class MetricWriter:
    """Writes metrics.jsonl (always) and TensorBoard events (if asked) — on process 0 only."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = False):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None
        self._tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": int(step), "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """A tqdm bar over training steps showing loss, target tokens/s and the ETA."""

    def __init__(self, total: int, initial: int, enabled: bool = True):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0, disable=None)

    def update(self, step: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                 refresh=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_curves(workdir: str, records: Iterable[dict] | None = None) -> str | None:
    """training and validation curves -> workdir/curves.png (None when there is nothing to plot)."""
    records = list(records if records is not None else read_metrics(workdir))
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    if not train and not evals:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    score_keys = [k for k in ("bleu", "chrf", "exact_match") if any(k in r for r in evals)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="valid loss")
    ax.set_xlabel("step"); ax.set_ylabel("loss per target token"); ax.legend(); ax.grid(alpha=0.3)
    ax = axes[1]
    for k in score_keys:
        pts = [(r["step"], r[k] * (100 if k == "exact_match" else 1)) for r in evals if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=k + (" (%)" if k == "exact_match" else ""))
    ax.set_xlabel("step"); ax.set_ylabel("validation score"); ax.grid(alpha=0.3)
    if score_keys:
        ax.legend()
    fig.tight_layout()
    path = os.path.join(workdir, "curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
