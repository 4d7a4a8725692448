"""Load test of `s2s-jax serve`: real HTTP clients on loopback against a running server, beside
offline translation of the same sentences by the same model, in the same sitting.

    python experiments/load_test.py --workdir runs/m30k --src ../shared/data/multi30k/test.en \
        --beam 5 --concurrency 1,8,32 --seconds 30 --out experiments/results/load_test_m30k.json
    python experiments/load_test.py --bundle bundles/m30k ...                       # an export bundle
    python experiments/load_test.py --workdir runs/a --workdir runs/b [--weights 0.5,0.5] ...   # an ensemble

1. Offline: the model's Translator in this process translates the whole --src file (`translate
   --beam K`'s code path: for a bundle `Bundle.translator()`, the same continuous batching over
   its exported step; for several runs their ensemble); after one warm-up pass (compilation),
   the median of --offline-runs timed passes gives sentences/s. The Translator is then released.
2. Server: `python -m s2s_jax serve --workdir RUN` (or `--bundle B`, or several `--workdir` with
   `--weights`: the same model as offline) starts on a free loopback port. For each
   concurrency level C, C asyncio clients (httpx) each send requests of 1-16 consecutive
   --src sentences (seeded) one after another: first for --warmup seconds (the server compiles
   the decode programs of the shapes it meets; they also land in the persistent XLA cache),
   then for --seconds measured. Reported: sentences/s and requests/s over the measured window
   (from its start to the answer of the last request started in it), latency p50/p95/p99 per
   request, errors (non-200 answers or failed connections), and the ratio to offline.

The server and this script share the machine: on a 2-core CPU the clients' own CPU use (JSON,
HTTP) is part of what is measured, as it would be for a client on the same host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing


def load_model(args):
    """The Translator of what is load-tested: the run, the ensemble of the runs, or the bundle."""
    if args.bundle:
        from s2s_jax.inference.bundle import load_bundle

        return load_bundle(args.bundle).translator()
    if len(args.workdir) > 1:
        from s2s_jax.inference.ensemble import load_ensemble_translator, parse_weights

        return load_ensemble_translator(args.workdir, weights=parse_weights(args.weights, len(args.workdir)),
                                        step=args.step, best=args.best)
    from s2s_jax.inference.runs import load_translator

    return load_translator(args.workdir[0], step=args.step, best=args.best)


def model_args(args) -> list[str]:
    """`serve`'s arguments naming the same model as `load_model`."""
    if args.bundle:
        return ["--bundle", args.bundle]
    runs = [a for w in args.workdir for a in ("--workdir", w)]
    return runs + (["--weights", args.weights] if args.weights else []) + (["--best"] if args.best else []) + (
        ["--step", str(args.step)] if args.step is not None else [])


def offline_throughput(translator, lines: list[str], beam: int, runs: int) -> dict:
    t0 = time.perf_counter()
    translator.translate(lines, beam=beam)  # compiles
    first = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        translator.translate(lines, beam=beam)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"sentences": len(lines), "first_pass_seconds": round(first, 2),
            "seconds": [round(t, 3) for t in times], "sentences_per_second": round(len(lines) / median, 1)}


def start_server(extra: list[str]):
    cmd = [sys.executable, "-m", "s2s_jax", "serve", "--port", "0", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stderr.readline()
        m = re.search(r"on (http://[^ \n]+)", line)
        if m:
            return proc, m.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"server did not start: {proc.stderr.read()[-2000:]}")


async def run_level(url: str, lines: list[str], *, clients: int, seconds: float, beam: int, seed: int,
                    api_key: str | None) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    latencies, sentences, errors = [], [0], [0]
    start = time.perf_counter()
    stop_at = start + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits, headers=headers) as client:
        async def worker(i: int):
            rng = random.Random(seed * 1000 + i)
            while time.perf_counter() < stop_at:
                k = rng.randint(1, 16)
                first = rng.randrange(len(lines))
                batch = [lines[(first + j) % len(lines)] for j in range(k)]
                t0 = time.perf_counter()
                try:
                    r = await client.post("/translate", json={"text": batch, "beam": beam})
                    ok = r.status_code == 200 and len(r.json()["translations"]) == k
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)
                    sentences[0] += k
                else:
                    errors[0] += 1

        await asyncio.gather(*(worker(i) for i in range(clients)))
    elapsed = time.perf_counter() - start

    def pct(q):
        return round(statistics.quantiles(latencies, n=100)[q - 1], 3) if len(latencies) >= 2 else None

    return {"clients": clients, "seconds": round(elapsed, 2), "requests": len(latencies), "errors": errors[0],
            "sentences": sentences[0], "sentences_per_second": round(sentences[0] / elapsed, 1),
            "requests_per_second": round(len(latencies) / elapsed, 2),
            "latency_p50": pct(50), "latency_p95": pct(95), "latency_p99": pct(99)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--workdir", action="append", help="a trained run; several: their ensemble")
    which.add_argument("--bundle", help="an export bundle (served with `serve --bundle`)")
    p.add_argument("--weights", default=None, help="ensemble weights, one per --workdir (default: equal)")
    p.add_argument("--src", default=os.path.join(ROOT, "..", "shared", "data", "multi30k", "test.en"))
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--warmup", type=float, default=20.0)
    p.add_argument("--offline-runs", type=int, default=3)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--best", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-args", default="", help="extra arguments for serve, e.g. '--max-batch 512'")
    p.add_argument("--out", default=None, help="write the JSON record here")
    args = p.parse_args(argv)

    with open(args.src, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.bundle and (args.step is not None or args.best or args.weights):
        p.error("--step/--best/--weights apply to --workdir runs")
    record = {"model": {"bundle": os.path.abspath(args.bundle)} if args.bundle else {
                  "workdirs": [os.path.abspath(w) for w in args.workdir], "weights": args.weights},
              "src": os.path.abspath(args.src), "beam": args.beam,
              "machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M"),
              "command": " ".join(sys.argv)}
    import s2s_jax

    s2s_jax.setup()
    record["offline"] = offline_throughput(load_model(args), lines, args.beam, args.offline_runs)
    print(f"offline translate --beam {args.beam}: {record['offline']['sentences_per_second']} sentences/s",
          file=sys.stderr, flush=True)
    import gc

    gc.collect()
    proc, url = start_server(model_args(args) + args.server_args.split() + ["--max-pending", "100000"])
    record["levels"] = []
    try:
        for c in levels:
            asyncio.run(run_level(url, lines, clients=c, seconds=args.warmup, beam=args.beam, seed=args.seed + 1,
                                  api_key=None))
            level = asyncio.run(run_level(url, lines, clients=c, seconds=args.seconds, beam=args.beam,
                                          seed=args.seed, api_key=None))
            level["ratio_to_offline"] = round(level["sentences_per_second"] / record["offline"]["sentences_per_second"], 3)
            record["levels"].append(level)
            print(json.dumps(level), file=sys.stderr, flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        record["server_exit_code"] = proc.wait(timeout=300)
    print("\n| clients | sentences/s | vs offline | requests/s | p50 s | p95 s | p99 s | errors |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for lv in record["levels"]:
        print(f"| {lv['clients']} | {lv['sentences_per_second']} | {lv['ratio_to_offline']:.2f} | "
              f"{lv['requests_per_second']} | {lv['latency_p50']} | {lv['latency_p95']} | {lv['latency_p99']} | "
              f"{lv['errors']} |")
    print(f"offline `translate --beam {args.beam}`: {record['offline']['sentences_per_second']} sentences/s")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
