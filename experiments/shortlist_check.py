"""What a vocabulary shortlist changes: translations, BLEU and decode time, with and without it.

    python experiments/shortlist_check.py --workdir runs/m30k --best \
        --src ../shared/data/multi30k/test.en --ref ../shared/data/multi30k/test.de \
        --beam 5 --settings 20/2000,50/500 [--lines 100] [--batch-size 64]

Builds the run's shortlist first if it has none (`s2s-jax shortlist`). For the whole vocabulary
and each top_k/frequent setting: one JSON line with the mean candidate count per batch, how many
translations are identical to the whole vocabulary's, sacreBLEU, and the decode time of a second
(warm) pass over the lines. Time only on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import sacrebleu

from s2s_jax import rundir, runtime
from s2s_jax.inference.runs import load_run
from s2s_jax.inference.shortlist import build_for_run


def _decode(translator, lines, beam):
    translator.translate(lines, beam=beam)  # compile
    start = time.perf_counter()
    out = [hyps[0][0] for hyps in translator.translate(lines, beam=beam)]
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--best", action="store_true")
    p.add_argument("--src", required=True)
    p.add_argument("--ref", required=True)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--settings", default="20/2000,50/500", help="top_k/frequent pairs, comma-separated")
    p.add_argument("--lines", type=int, default=0, help="the first N lines (0: all)")
    p.add_argument("--batch-size", type=int, default=None)
    args = p.parse_args()
    runtime.setup()
    if not os.path.isfile(rundir.shortlist_path(args.workdir)):
        build_for_run(args.workdir)
    lines = open(args.src, encoding="utf-8").read().splitlines()
    refs = open(args.ref, encoding="utf-8").read().splitlines()
    if args.lines:
        lines, refs = lines[:args.lines], refs[:args.lines]
    run = load_run(args.workdir, best=args.best)
    base = [f"decode.batch_size={args.batch_size}"] if args.batch_size else []
    full, seconds = _decode(run.translator(base), lines, args.beam)
    rows = [("whole vocabulary", full, seconds, None)]
    for setting in args.settings.split(","):
        top_k, frequent = setting.split("/")
        translator = run.translator(base + ["decode.shortlist=true", f"decode.shortlist_top_k={top_k}",
                                            f"decode.shortlist_frequent={frequent}"])
        out, seconds = _decode(translator, lines, args.beam)
        rows.append((setting, out, seconds, translator.last_stats.get("candidates")))
    for name, out, seconds, candidates in rows:
        print(json.dumps({"shortlist": name, "candidates_per_batch": candidates, "beam": args.beam,
                          "identical_to_full": sum(a == b for a, b in zip(out, full)), "lines": len(lines),
                          "bleu": round(sacrebleu.corpus_bleu(out, [refs]).score, 2),
                          "decode_seconds": round(seconds, 3)}))


if __name__ == "__main__":
    main()
