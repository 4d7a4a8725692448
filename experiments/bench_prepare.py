"""Prepare benchmark: wall time, peak memory and lines/s of `prepare` on a synthetic corpus.

    flock -x /tmp/s2s_cpu.lock .venv/bin/python experiments/bench_prepare.py --pairs 1000000 \
        --workers 1 2 --repeats 3 --output experiments/results/prepare_1m.json

Builds the corpus with experiments/make_corpus.py (not timed; reused from --corpus-dir if
there), then for each worker count and repeat runs one `prepare` of the --config's data
settings (default multi30k_en_de: joint unigram SentencePiece 8k, NFKC) in a fresh child
process under `/usr/bin/time -v`, into a fresh cache folder (deleted afterwards). Per run:
wall_s (the prepare() call), elapsed_s (the whole child, interpreter start included),
max_rss_kb (`time -v`: the largest single process, workers included), main_rss_kb /
workers_rss_kb (ru_maxrss of the main process / the largest worker), peak_sum_rss_kb and
peak_sum_pss_kb (sum over the process tree, sampled every 0.2 s from /proc: RSS counts pages
shared between processes once per process, PSS splits them), lines_per_s (all split lines /
wall_s) and the phase times prepare logs. The record (JSON) holds the runs, the medians per
worker count and the speedup of the most workers over one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, logging, resource, sys, time
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
from s2s_jax.config import load, override
from s2s_jax.data.preprocess import prepare
if __name__ == "__main__":
    config_path, corpus, cache, workers = sys.argv[1:5]
    config = override(load(config_path), [f"data.dir={corpus}", f"data.cache_dir={cache}",
                                                 f"data.prepare_workers={workers}"] + sys.argv[5:])
    t = time.perf_counter()
    path = prepare(config, force=True)
    wall = time.perf_counter() - t
    print(json.dumps({"path": path, "wall_s": wall,
                      "main_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "workers_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""

PHASES = {"validation_s": r"validation pass ([\d.]+)s", "vocabulary_s": r"vocabulary ([\d.]+)s",
          "tokenise_write_s": r"tokenised and wrote \d+ examples in ([\d.]+)s",
          "spm_sample_s": r"sampled in ([\d.]+)s"}


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _mem_kb(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


class Sampler(threading.Thread):
    """Largest sum of RSS / PSS over a process tree, sampled every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = 0
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            mems = [_mem_kb(p) for p in _tree(self.pid)]
            self.peak_rss = max(self.peak_rss, sum(r for r, _ in mems))
            self.peak_pss = max(self.peak_pss, sum(p for _, p in mems))
            self.done.wait(self.interval)


def run_once(config: str, corpus: str, workers: int, extra: list[str]) -> dict:
    cache = tempfile.mkdtemp(prefix="s2s_bench_prepare_")
    try:
        cmd = ["/usr/bin/time", "-v", sys.executable, "-c", CHILD, config, corpus, cache, str(workers)] + extra
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")))
        sampler = Sampler(proc.pid)
        sampler.start()
        out, err = proc.communicate()
        elapsed = time.perf_counter() - t
        sampler.done.set()
        sampler.join()
        if proc.returncode != 0:
            raise SystemExit(f"prepare failed (exit {proc.returncode}):\n{err[-3000:]}")
        rec = json.loads(out.strip().splitlines()[-1])
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
        rec.update(workers=workers, elapsed_s=elapsed, max_rss_kb=int(m.group(1)) if m else None,
                   peak_sum_rss_kb=sampler.peak_rss, peak_sum_pss_kb=sampler.peak_pss)
        for key, pat in PHASES.items():
            m = re.search(pat, err)
            rec[key] = float(m.group(1)) if m else None
        m = re.search(r"prepare: (\d+) lines in .*?, (\d+) worker", err)
        rec["lines"], rec["workers_used"] = int(m.group(1)), int(m.group(2))
        rec["lines_per_s"] = rec["lines"] / rec["wall_s"]
        with open(os.path.join(rec.pop("path"), "stats.json")) as f:
            stats = json.load(f)
        rec["examples"] = sum(s["examples"] for s in stats.values())
        rec["spm_sample_pairs"] = stats.get("train", {}).get("spm_sample_pairs")
        return rec
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, required=True, help="training pairs of the synthetic corpus")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--config", default=os.path.join(REPO, "experiments", "configs", "multi30k_en_de.py"))
    p.add_argument("--corpus-dir", default=None, help="where the corpus is (or is written); default /tmp/s2s_corpus_<pairs>")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="extra config overrides, e.g. data.spm_sample_size=200000")
    p.add_argument("--output", default=None, help="JSON record (default experiments/results/prepare_<pairs>.json)")
    args = p.parse_args(argv)

    corpus = args.corpus_dir or f"/tmp/s2s_corpus_{args.pairs}_s{args.seed}"
    if not os.path.isfile(os.path.join(corpus, "test.de")):
        subprocess.run([sys.executable, os.path.join(REPO, "experiments", "make_corpus.py"), "--pairs", str(args.pairs),
                        "--out", corpus, "--seed", str(args.seed)], check=True)
    runs = []
    for r in range(args.repeats):
        for w in args.workers:
            rec = run_once(args.config, corpus, w, args.set)
            rec["repeat"] = r
            runs.append(rec)
            print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)
    medians = {}
    for w in args.workers:
        mine = [x for x in runs if x["workers"] == w]
        medians[str(w)] = {k: statistics.median([x[k] for x in mine]) for k in
                           ("wall_s", "elapsed_s", "max_rss_kb", "main_rss_kb", "workers_rss_kb", "peak_sum_rss_kb",
                            "peak_sum_pss_kb", "lines_per_s", "vocabulary_s", "tokenise_write_s")
                           if all(x.get(k) is not None for x in mine)}
    record = {
        "kind": "prepare", "pairs": args.pairs, "corpus": corpus, "config": os.path.relpath(args.config, REPO),
        "overrides": args.set, "workers": args.workers, "repeats": args.repeats,
        "machine": {"cpu": _cpu_model(), "cores": len(os.sched_getaffinity(0)), "python": platform.python_version()},
        "commit": subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": runs, "median": medians,
    }
    if len(args.workers) > 1 and 1 in args.workers:
        record["speedup"] = medians["1"]["wall_s"] / medians[str(max(args.workers))]["wall_s"]
    out = args.output or os.path.join(REPO, "experiments", "results", f"prepare_{args.pairs}.json")
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
    print(json.dumps({"median": medians, "speedup": record.get("speedup"), "output": out}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
