"""Decoding side by side with OpenNMT-py (issue #25): test2016, beam 5 and greedy, one sitting.

    export ONMT_VENV=../peers-work/venv-onmt DATA=../peers-work/data   # ../shared/peers/README.md
    python experiments/peer_decode.py --workdir runs/m30k --onmt-model $WORK/m30k/model_step_4000.pt \
        [--rounds 3] [--beams 5,1] [--variant NAME=decode.FIELD=VALUE,... ...] [--json OUT.json]

Each round runs, alternating the tools so drift hits both alike:
- OpenNMT-py: `onmt_translate -beam_size B -batch_size 64 -batch_type sents -max_length 100
  -report_time` on its SentencePiece-encoded test.en (as `../shared/peers/onmt/run_onmt.sh
  translate`). Its decode time is the one it reports: output pieces / its "Tokens per second"
  (= its "Total translation time", printed to 0.1 s only); model loading excluded.
- s2s_jax: `python -m s2s_jax translate --workdir RUN --best --beam B` on the raw test.en. Its
  decode time is the one it reports without compilation ("without the X s of compilation");
  the time with compilation is recorded too.
- Both: the whole process's wall time (start, load, compile, decode, write), BLEU (sacreBLEU,
  cased, detokenised, against the raw test.de) and the output's word count (the tools' outputs
  differ in length, so output words/s are compared as well as sentences/s).

`--variant fast=decode.shortlist=true,decode.stop_rule=current_length` adds an s2s_jax setting
(each variant runs in every round; without --variant: "default", the run's own settings). The
figures are medians over the rounds; the ratios are s2s_jax / OpenNMT-py. Run it on a quiet
machine; the OpenNMT-py model should be within 3 BLEU of the s2s_jax run (issue #25).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "experiments")]
from onmt_peer import onmt_bin, onmt_env, pieces_to_text  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="the s2s_jax run (translate --best)")
    p.add_argument("--onmt-model", required=True, help="an OpenNMT-py checkpoint (.pt)")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "multi30k"),
                   help="raw test.en / test.de (default ../shared/data/multi30k)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--beams", default="5,1", help="comma-separated beam sizes (1 = greedy)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=decode.FIELD=VALUE,...",
                   help="an s2s_jax setting to time (repeatable); NAME= alone: the run's own settings")
    p.add_argument("--json", default=None, help="write the record here")
    return p.parse_args(argv)


def _bleu(hyp_file: str, ref_file: str) -> float:
    """sacreBLEU (cased, detokenised) as `s2s-jax eval` reports it (`s2s_jax.metrics`)."""
    from s2s_jax import metrics

    hyps = Path(hyp_file).read_text(encoding="utf-8").splitlines()
    refs = Path(ref_file).read_text(encoding="utf-8").splitlines()
    return round(metrics.bleu_scores(hyps, [refs], lang="de")["bleu"], 2)


def _words(path: str) -> int:
    return sum(len(line.split()) for line in Path(path).read_text(encoding="utf-8").splitlines())


def run_onmt(model: str, beam: int, tmp: str, ref: str) -> dict:
    data = os.environ.get("DATA")
    if not data:
        raise SystemExit("error: set DATA (prep_multi30k.py's output) as ../shared/peers/README.md does")
    src = os.path.join(data, "sp", "test.en")
    out_sp = os.path.join(tmp, f"onmt.beam{beam}.sp")
    start = time.perf_counter()
    proc = subprocess.run([onmt_bin("onmt_translate"), "-model", model, "-src", src,
                           "-output", out_sp, "-beam_size", str(beam), "-batch_size", "64", "-batch_type", "sents",
                           "-max_length", "100", "-report_time"], capture_output=True, text=True, env=onmt_env())
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"onmt_translate failed:\n{proc.stderr[-2000:]}")
    tps = float(re.search(r"Tokens per second: ([\d.]+)", proc.stderr + proc.stdout).group(1))
    lines = Path(out_sp).read_text(encoding="utf-8").splitlines()
    decode_s = sum(len(line.split()) for line in lines) / tps  # its output pieces / its tokens per second
    out = os.path.join(tmp, f"onmt.beam{beam}.txt")
    Path(out).write_text("".join(pieces_to_text(line) + "\n" for line in lines), encoding="utf-8")
    return {"sentences": len(lines), "decode_seconds": decode_s, "process_seconds": wall,
            "words": _words(out), "bleu": _bleu(out, ref)}


def run_s2s(workdir: str, beam: int, src: str, tmp: str, ref: str, overrides: list) -> dict:
    out = os.path.join(tmp, f"s2s.beam{beam}.txt")
    cmd = [sys.executable, "-m", "s2s_jax", "translate", "--workdir", workdir, "--best", "--input", src,
           "--output", out, "--beam", str(beam)]
    for o in overrides:
        cmd += ["--set", o]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"s2s_jax translate failed:\n{proc.stderr[-2000:]}")
    m = re.search(r"translated (\d+) sentences in ([\d.]+)s.*without the ([\d.]+)s of compilation", proc.stderr)
    n, total, compile_s = int(m.group(1)), float(m.group(2)), float(m.group(3))
    return {"sentences": n, "decode_seconds": total - compile_s, "decode_with_compile_seconds": total,
            "compile_seconds": compile_s, "process_seconds": wall, "words": _words(out), "bleu": _bleu(out, ref)}


def summarise(runs: list[dict]) -> dict:
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}
    n = runs[0]["sentences"]
    med["sentences_per_second"] = n / med["decode_seconds"]
    med["words_per_second"] = med["words"] / med["decode_seconds"]
    if "decode_with_compile_seconds" in med:
        med["sentences_per_second_with_compile"] = n / med["decode_with_compile_seconds"]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in med.items()}


def main(argv=None) -> int:
    a = parse_args(argv)
    src, ref = os.path.join(a.data_dir, "test.en"), os.path.join(a.data_dir, "test.de")
    onmt_src = os.path.join(os.environ.get("DATA", ""), "sp", "test.en")
    if os.path.isfile(onmt_src) and sum(1 for _ in open(onmt_src, encoding="utf-8")) != sum(
            1 for _ in open(src, encoding="utf-8")):
        raise SystemExit(f"error: {onmt_src} (what OpenNMT-py decodes) and {src} differ in line count: "
                         "give --data-dir the test set prep_multi30k.py encoded")
    beams = [int(b) for b in a.beams.split(",")]
    variants = {}
    for v in a.variant or ["default="]:
        name, _, sets = v.partition("=")
        variants[name] = [x for x in sets.split(",") if x]
    tools = ["onmt"] + list(variants)
    raw: dict = {b: {t: [] for t in tools} for b in beams}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for b in beams:
                for tool in (tools if r % 2 == 0 else tools[::-1]):
                    res = (run_onmt(a.onmt_model, b, tmp, ref) if tool == "onmt"
                           else run_s2s(a.workdir, b, src, tmp, ref, variants[tool]))
                    raw[b][tool].append(res)
                    print(f"round {r + 1} beam {b} {tool}: {json.dumps(res)}", flush=True)
    record = {"what": "test2016 decoding side by side (experiments/peer_decode.py)",
              "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs", "workdir": os.path.abspath(a.workdir), "onmt_model": a.onmt_model,
              "variants": variants, "rounds": a.rounds, "results": {}}
    for b in beams:
        o = summarise(raw[b]["onmt"])
        entry = record["results"][f"beam{b}"] = {"onmt": o, "runs": raw[b]}
        for name in variants:
            s = summarise(raw[b][name])
            entry[name] = dict(s, ratios={
                "sentences_per_second": round(s["sentences_per_second"] / o["sentences_per_second"], 2),
                "words_per_second": round(s["words_per_second"] / o["words_per_second"], 2),
                "sentences_per_second_with_compile": round(s["sentences_per_second_with_compile"]
                                                           / o["sentences_per_second"], 2),
                "process": round(o["process_seconds"] / s["process_seconds"], 2)})
            r = entry[name]["ratios"]
            print(f"beam {b} {name}: s2s_jax {s['sentences_per_second']:.0f} sent/s ({s['words_per_second']:.0f} "
                  f"words/s, BLEU {s['bleu']}), OpenNMT-py {o['sentences_per_second']:.0f} sent/s "
                  f"({o['words_per_second']:.0f} words/s, BLEU {o['bleu']}): {r['sentences_per_second']}x "
                  f"sentences/s, {r['words_per_second']}x words/s; whole process {s['process_seconds']:.2f} s vs "
                  f"{o['process_seconds']:.2f} s ({r['process']}x)")
    if a.json:
        Path(a.json).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
