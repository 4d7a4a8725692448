"""Metric writers (process 0 only): JSON lines, TensorBoard (tensorboardX), the progress bar,
curve plots, and corpus scores: sacreBLEU with its signature, chrF, BLEU on lowercased Moses-tokenised
text (bleu_lc_tok), ROUGE (rouge-score), exact match."""

from __future__ import annotations

import json
import math
import os
import sys
import time
import re
from typing import Iterable, Sequence

import numpy as np


def scalars_from_sums(sums: dict) -> dict[str, float]:
    """Token-summed metrics -> per-token means (divided once, after aggregation)."""
    w = max(float(sums["weight"]), 1.0)
    out = {"loss": float(sums["loss"]) / w, "nll": float(sums["nll"]) / w,
           "accuracy": float(sums["correct"]) / w, "tokens": float(sums["weight"])}
    out["perplexity"] = math.exp(min(out["nll"], 50.0))
    return out


# What the scores below are, recorded beside them (the eval JSON, metrics.jsonl).
BLEU_LC_TOK_PROTOCOL = ("lowercased, then sacremoses MosesPunctNormalizer(lang) + MosesTokenizer(lang, "
                        "escape=True, aggressive_dash_splits=False) as the official Multi30k "
                        "scripts/task1-tokenize.sh; BLEU of the tokens by sacreBLEU tokenize='none' "
                        "(= multi-bleu.perl)")
ROUGE_SETTINGS = {"types": ["rouge1", "rouge2", "rougeL", "rougeLsum"], "measure": "F1 x 100, mean over sentences",
                  "use_stemmer": True, "tokenizer": "rouge-score default (lowercase, [a-z0-9]+ tokens)",
                  "multiple_references": "per sentence and type the maximum over the references "
                                         "(rouge_scorer.RougeScorer.score_multi)",
                  "rougeLsum_sentences": "split after . ! ? followed by whitespace, joined by newlines",
                  "text": "detokenised, as users read it"}
# Languages whose Moses nonbreaking prefixes sacremoses knows are many; a target "language" that
# is not one (e.g. a summarisation corpus's "tgt" suffix) is tokenised with English rules.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def package_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def moses_lang(lang: str | None) -> str:
    """`lang` if sacremoses has nonbreaking prefixes for it, else "en"."""
    from sacremoses.corpus import NonbreakingPrefixes

    return lang if lang in set(NonbreakingPrefixes().available_langs.values()) else "en"


def lc_moses_tokenize(lines: Sequence[str], lang: str) -> list[str]:
    """Lowercased, punctuation-normalised, Moses-tokenised (escaped) lines, as the official
    Multi30k `tok/*.lc.norm.tok.*` files (scripts/task1-tokenize.sh: lowercase.perl |
    normalize-punctuation.perl -l L | tokenizer.perl -l L). Reproduces tok/test.de from test.de
    on all 1,000 lines (tests/test_metrics.py)."""
    from sacremoses import MosesPunctNormalizer, MosesTokenizer

    normalizer, tokenizer = MosesPunctNormalizer(lang=lang), MosesTokenizer(lang=lang)
    return [tokenizer.tokenize(normalizer.normalize(line.lower()), escape=True, return_str=True).strip()
            for line in lines]


def bleu_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]], lang: str) -> dict:
    """sacreBLEU (cased, detokenised, 13a) and chrF with their signatures, and "bleu_lc_tok": BLEU
    on lowercased Moses-tokenised text (the Multi30k literature's protocol, BLEU_LC_TOK_PROTOCOL).
    `references`: one or more reference streams, each aligned with `hypotheses`."""
    import sacrebleu

    bleu, chrf = sacrebleu.BLEU(), sacrebleu.CHRF()
    streams = [list(r) for r in references]
    out = {"bleu": bleu.corpus_score(list(hypotheses), streams).score,
           "chrf": chrf.corpus_score(list(hypotheses), streams).score,
           "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}
    lang = moses_lang(lang)
    tok_bleu = sacrebleu.BLEU(tokenize="none", force=True)
    out["bleu_lc_tok"] = tok_bleu.corpus_score(lc_moses_tokenize(hypotheses, lang),
                                               [lc_moses_tokenize(r, lang) for r in streams]).score
    out["bleu_lc_tok_signature"] = (f"{tok_bleu.get_signature()}|moses:{lang}|"
                                    f"sacremoses:{package_version('sacremoses')}")
    out["bleu_lc_tok_protocol"] = BLEU_LC_TOK_PROTOCOL
    return out


def _sentences(text: str) -> str:
    """One sentence a line: what rouge-score's rougeLsum expects."""
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


def rouge_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """ROUGE-1/2/L/Lsum F1 (x 100, mean over sentences) by Google's rouge-score with Porter
    stemming; with several reference streams each sentence takes, per ROUGE type, the best
    reference (RougeScorer.score_multi). The settings and the package version go with them."""
    from rouge_score import rouge_scorer

    types = ROUGE_SETTINGS["types"]
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=True)
    totals = dict.fromkeys(types, 0.0)
    for i, hyp in enumerate(hypotheses):
        scores = scorer.score_multi([_sentences(r[i]) for r in references], _sentences(hyp))
        for t in types:
            totals[t] += scores[t].fmeasure
    n = max(len(hypotheses), 1)
    out = {t: 100.0 * v / n for t, v in totals.items()}
    version = package_version("rouge-score")
    out["rouge_signature"] = f"nrefs:{len(references)}|multi:max|stem:porter|lsum:split|rouge-score:{version}"
    out["rouge_settings"] = dict(ROUGE_SETTINGS, package=f"rouge-score {version}", references=len(references))
    return out


# Long descriptions of a protocol, for the eval JSON; a validation record keeps the signatures only.
VERBOSE_KEYS = ("rouge_settings", "bleu_lc_tok_protocol")


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str],
                  extra_references: Sequence[Sequence[str]] = (), *, kind: str = "translation",
                  lang: str | None = None) -> dict:
    """The scores of data.task_kind `kind` and exact match (against any reference).

    translation: sacreBLEU and chrF (cased, detokenised, with their signatures) and
    bleu_lc_tok (lowercased Moses-tokenised BLEU, the Multi30k papers' protocol; `lang` = the
    target language for Moses' rules); summarization: ROUGE-1/2/L/Lsum (rouge_scores).
    `extra_references`: more reference streams aligned with `hypotheses` (e.g. test.ref1).
    """
    streams = [list(references)] + [list(r) for r in extra_references]
    for k, r in enumerate(streams[1:], 1):
        if len(r) != len(hypotheses):
            raise ValueError(f"reference stream {k} has {len(r)} lines for {len(hypotheses)} hypotheses")
    exact = (float(np.mean([any(h == r[i] for r in streams) for i, h in enumerate(hypotheses)]))
             if hypotheses else 0.0)
    out = {"exact_match": exact, "references": len(streams)}
    if kind == "summarization":
        out.update(rouge_scores(hypotheses, streams))
    else:
        out.update(bleu_scores(hypotheses, streams, lang or "en"))
    return out


class MetricWriter:
    """Writes metrics.jsonl (always) and TensorBoard events (if asked) — on process 0 only.

    `resume_step`: the step a resumed run restarts from. Records past it were written by the
    interrupted run after its last checkpoint and will be written again; they are dropped so
    that metrics.jsonl reads like one uninterrupted run (and purged from TensorBoard's view).
    """

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = False,
                 resume_step: int | None = None):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = None
        self._tb = None
        if not enabled:
            return
        if resume_step is not None and os.path.exists(self.path):
            _truncate_after(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter
            # purge_step: TensorBoard hides the interrupted run's events past the resume step.
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                     purge_step=None if resume_step is None else resume_step + 1)

    def write(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": int(step), "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", float(v), step)
                elif isinstance(v, str) and k.endswith("signature"):
                    self._tb.add_text(f"{kind}/{k}", v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _truncate_after(path: str, step: int) -> None:
    """Rewrites a metrics.jsonl without records past `step` (and without a torn last line)."""
    keep, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                dropped += 1
                continue
            if int(record.get("step", 0)) > step:
                dropped += 1
            else:
                keep.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, path)


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Training progress: step, loss, target tokens/s and the ETA.

    On a terminal, a tqdm bar (its ETA comes from the smoothed step rate); otherwise (a log
    file, a cloud job) one plain line per update, with the ETA from the rate since start.
    enabled=False (processes other than 0) prints nothing; steps=False (--no-progress) prints
    messages (evaluations, warnings) but no step updates.
    """

    def __init__(self, total: int, initial: int, enabled: bool = True, steps: bool = True):
        self.total, self.initial = total, initial
        self.enabled = enabled
        self.steps = enabled and steps
        self.bar = None
        self._t0 = time.perf_counter()
        self._first = None
        if self.steps and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0)

    def update(self, step: int, **postfix) -> None:
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(step - self.bar.n)
        elif self.steps:
            # Rate measured from the first update on, so the first step's compilation does not
            # inflate the ETA for the rest of the run.
            now = time.perf_counter()
            if self._first is None:
                self._first = (now, step)
                t_ref, s_ref = self._t0, self.initial
            else:
                t_ref, s_ref = self._first
            eta = (now - t_ref) / (step - s_ref) * (self.total - step) if step > s_ref else float("nan")
            fields = " ".join(f"{k} {v}" for k, v in shown.items())
            print(f"step {step}/{self.total} ({100.0 * step / max(self.total, 1):.0f}%) {fields} "
                  f"eta {_hms(eta) if math.isfinite(eta) else '?'}", file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif self.enabled:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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

    score_keys = [k for k in ("bleu", "bleu_lc_tok", "chrf", "rouge1", "rouge2", "rougeL", "exact_match")
                  if any(k in r for r in evals)]
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
