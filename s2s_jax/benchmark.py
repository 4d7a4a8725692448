"""Training throughput, compile time and FLOP utilisation, fast model vs a baseline, as one JSON record.

    python -m s2s_jax benchmark --config experiments/configs/bench_cpu.py [--rounds 5] [--batches 8]
    python -m s2s_jax benchmark --config experiments/configs/bench_cpu.py --data-only
    python -m s2s_jax benchmark --config experiments/configs/bench_cpu.py --devices 1,2,4,8  # simulated CPU devices

Batches: `config.data.batch_size` sentences with Multi30k-like lengths (the word counts of
`{data.dir}/tok/train.{src,tgt}` when that corpus is there, target + 1 for EOS; else a log-normal
fitted to them), grouped into `config.data.buckets` and padded to their bucket, random token ids.
A fixed list of `--batches` batches is drawn with the buckets' frequencies; every bucket shape is
compiled first (and the compile time reported per shape), then `--rounds` rounds each time one
large float32 matmul (the machine's ceiling), the fast step over the whole list and the baseline
step over the same list, alternating which model goes first, so all figures share the machine's
momentary load. Reported: median and min/max over rounds of target tokens/s and step time, the
speed ratio (median of per-round ratios), and achieved FLOP/s as a fraction of the ceiling.

Analytic matmul FLOPs (multiply-add = 2), for one example with source length S and target
length T, B = 1; G = 4 (LSTM) or 3 (GRU); H = hidden, K = directions, h = H / K, E_s/E_t = embeddings,
L_e/L_d = layers, V = target vocabulary:

    encoder   sum_l 2·S·K·(D_l + h)·G·h,          D_0 = E_s, D_l = H (l ≥ 1)
    keys      2·S·H·H                              (general, mlp; 0 for dot/none)
    decoder   sum_l 2·T·(D_l + H)·G·H,            D_0 = E_t (+ H with input feeding), D_l = H
    attention 4·T·S·H + 2·T·2H·H                   (scores + context, output layer; mlp adds 2·T·H·H)
    output    2·T·H·V
    training  = 3 × forward (backward ≈ 2 × forward)

The bridge (≤ 2·L_d·2·H·H per sentence) and elementwise work are not counted. `flops_executed`
uses the padded bucket shapes (what the hardware computes); `flops_per_target_token` uses the real
lengths (≈ 25.7 MFLOP per target token on bench_cpu).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BASELINE_FILE = REPO / "experiments" / "baselines" / "flax_examples.py"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-only", action="store_true",
                   help="measure the data loader (s2s_jax.data.loader_throughput) instead of the model")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (each runs every batch once per model)")
    p.add_argument("--batches", type=int, default=8, help="batches in the timed list (drawn by bucket frequency)")
    p.add_argument("--no-baseline", action="store_true", help="time only s2s_jax's model")
    p.add_argument("--output", default=None, help="also write the JSON record to this file")
    p.add_argument("--devices", default=None, metavar="1,2,4,8",
                   help="rerun s2s_jax's training measurement (train.parallel, default shard_map) with each "
                        "number of simulated CPU devices, one subprocess each; reports target tokens/s per count")
    p.add_argument("--device-count-child", action="store_true", help=argparse.SUPPRESS)


# -- data -------------------------------------------------------------------------------------

def corpus_lengths(config, rng: np.random.Generator, n: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """(source lengths, target lengths incl. EOS) of real sentence pairs, or a fitted log-normal."""
    d = config.data
    base = Path(d.dir) if d.dir else None
    for folder in ([base / "tok", base] if base else []):
        src, tgt = folder / f"train.{d.src_lang}", folder / f"train.{d.tgt_lang}"
        if src.is_file() and tgt.is_file():
            with open(src, encoding="utf-8") as f:
                s = np.array([len(line.split()) for line in f])
            with open(tgt, encoding="utf-8") as f:
                t = np.array([len(line.split()) + 1 for line in f])
            return s, t
    # Multi30k (tok) fit: mean 13.0 / 13.4, sd ≈ 4.5.
    s = np.maximum(1, np.round(rng.lognormal(np.log(12.3), 0.33, n))).astype(int)
    t = np.maximum(2, np.round(s * rng.lognormal(0.0, 0.15, n) + 0.5)).astype(int)
    return s, t


def make_batches(config, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`count` padded batches of config.data.batch_size sentences, drawn by bucket frequency."""
    d = config.data
    rng = np.random.default_rng(seed)
    src_len, tgt_len = corpus_lengths(config, rng)
    buckets = list(d.buckets) or [(d.max_source_length, d.max_target_length + 1)]
    bucket_of = np.full(len(src_len), -1)
    for i in reversed(range(len(buckets))):
        s, t = buckets[i]
        bucket_of[(src_len <= s) & (tgt_len <= t)] = i
    freq = np.array([np.mean(bucket_of == i) for i in range(len(buckets))])
    # largest-remainder allocation, every bucket at least once (all shapes get compiled and timed)
    counts = np.maximum(1, np.floor(freq / freq.sum() * count)).astype(int)
    while counts.sum() < count:
        counts[np.argmax(freq / freq.sum() * count - counts)] += 1
    vocab = d.vocab_size
    B = d.batch_size
    batches = []
    for i, n in enumerate(counts):
        S, T = buckets[i]
        members = np.flatnonzero(bucket_of == i)
        for _ in range(n):
            rows = rng.choice(members, B, replace=len(members) < B)
            sl, tl = src_len[rows].astype(np.int32), tgt_len[rows].astype(np.int32)
            src = rng.integers(4, vocab, (B, S), dtype=np.int32)
            tin = rng.integers(4, vocab, (B, T), dtype=np.int32)
            tout = np.concatenate([tin[:, 1:], rng.integers(4, vocab, (B, 1), dtype=np.int32)], 1)
            tin[:, 0] = 1  # BOS
            src[np.arange(S)[None, :] >= sl[:, None]] = 0
            tin[np.arange(T)[None, :] >= tl[:, None]] = 0
            tout[np.arange(T)[None, :] >= tl[:, None]] = 0
            batches.append({"source": src, "source_lengths": sl, "target_input": tin,
                            "target_output": tout, "target_lengths": tl})
    order = rng.permutation(len(batches))
    return [batches[j] for j in order]


# -- FLOPs ------------------------------------------------------------------------------------

def forward_flops(model_cfg, target_vocab: int, source_lengths, target_lengths) -> float:
    """Forward matmul FLOPs summed over examples (see the module docstring for the formula)."""
    m = model_cfg
    S = np.asarray(source_lengths, np.float64)
    T = np.asarray(target_lengths, np.float64)
    G = 4 if m.cell == "lstm" else 3
    H = m.hidden_dim
    K = 2 if m.bidirectional else 1
    h = H // K
    enc = sum(2 * K * ((m.source_embed_dim if l == 0 else H) + h) * G * h for l in range(m.encoder_layers))
    keys = 2 * H * H if m.attention in ("general", "mlp") else 0
    dec = 0
    for l in range(m.decoder_layers):
        d = (m.target_embed_dim + (H if m.input_feeding else 0)) if l == 0 else H
        dec += 2 * (d + H) * G * H
    att_t = 2 * 2 * H * H + (2 * H * H if m.attention == "mlp" else 0) if m.attention != "none" else 0
    att_ts = 4 * H if m.attention != "none" else 0
    out = 2 * H * target_vocab
    total = S * (enc + keys) + T * (dec + att_t + out) + S * T * att_ts
    return float(total.sum())


# -- measurement ------------------------------------------------------------------------------

def matmul_ceiling(n: int = 2048, reps: int = 3) -> float:
    """FLOP/s of the best of `reps` float32 [n, n] × [n, n] matmuls on the default device."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


class Runner:
    """A jitted step compiled for every batch shape, with the state it threads through."""

    def __init__(self, name: str, step_fn: Callable, state, batches: list[dict]):
        import jax

        self.name = name
        self.state = state
        self.compiled = {}
        self.compile_s = {}
        jitted = jax.jit(step_fn, donate_argnums=0)
        for b in batches:
            shape = (b["source"].shape, b["target_input"].shape)
            if shape in self.compiled:
                continue
            t0 = time.perf_counter()
            self.compiled[shape] = jitted.lower(state, b).compile()
            key = "x".join(map(str, (*shape[0], shape[1][1])))  # BxSxT
            self.compile_s[key] = round(time.perf_counter() - t0, 3)
            print(f"[benchmark] {name}: compiled {key} in {self.compile_s[key]:.1f}s", file=sys.stderr)
        self.batches = [jax.device_put(b) for b in batches]
        self.step_times: list[float] = []
        self.round_times: list[float] = []
        self.losses: list[float] = []
        # one untimed pass: first-run allocations, donation warm-up
        self.run_round(record=False)

    def run_round(self, record: bool = True) -> float:
        import jax

        total = 0.0
        for b in self.batches:
            fn = self.compiled[(b["source"].shape, b["target_input"].shape)]
            t0 = time.perf_counter()
            self.state, metrics = fn(self.state, b)
            loss = jax.block_until_ready(metrics["loss"])
            dt = time.perf_counter() - t0
            total += dt
            if record:
                self.step_times.append(dt)
                self.losses.append(float(loss))
        if record:
            self.round_times.append(total)
        return total


def _spread(xs: list[float], digits: int = 4) -> dict:
    return {"median": round(statistics.median(xs), digits), "min": round(min(xs), digits),
            "max": round(max(xs), digits)}


def measure(runners: list[Runner], batches: list[dict], model_cfg, target_vocab: int, rounds: int) -> dict:
    """Interleaved timed rounds of every runner (and the matmul ceiling); one summary per runner.

    Reusable per device count: build the runners for a device count, call measure, keep the record.
    """
    tokens = int(sum(b["target_lengths"].sum() for b in batches))
    flops_real = 3 * sum(forward_flops(model_cfg, target_vocab, b["source_lengths"], b["target_lengths"])
                         for b in batches)
    flops_exec = 3 * sum(forward_flops(model_cfg, target_vocab,
                                       np.full(len(b["source_lengths"]), b["source"].shape[1]),
                                       np.full(len(b["target_lengths"]), b["target_input"].shape[1]))
                         for b in batches)
    ceilings, per_round = [], {r.name: [] for r in runners}
    for i in range(rounds):
        ceilings.append(matmul_ceiling())
        order = runners if i % 2 == 0 else runners[::-1]
        for r in order:
            per_round[r.name].append(r.run_round())
    ceiling = statistics.median(ceilings)
    out = {}
    for r in runners:
        rt = per_round[r.name]
        tps = [tokens / t for t in rt]
        fps = [flops_exec / t for t in rt]
        out[r.name] = {
            "compile_s": r.compile_s,
            "step_s": _spread(r.step_times),
            "target_tokens_per_s": _spread(tps, 1),
            "gflop_per_s": _spread([f / 1e9 for f in fps], 2),
            "fraction_of_ceiling": round(statistics.median(
                [f / c for f, c in zip(fps, ceilings)]), 3),
            "first_loss": round(r.losses[0], 4) if r.losses else None,
            "last_loss": round(r.losses[-1], 4) if r.losses else None,
        }
    summary = {
        "ceiling_gflop_per_s": _spread([c / 1e9 for c in ceilings], 1),
        "ceiling_gflop_per_s_median": round(ceiling / 1e9, 1),
        "target_tokens_per_round": tokens,
        "mflop_per_target_token": round(flops_real / tokens / 1e6, 2),
        "padded_flop_overhead": round(flops_exec / flops_real, 3),
        "models": out,
    }
    if len(runners) >= 2:
        a, b = runners[0].name, runners[1].name
        ratios = [tb / ta for ta, tb in zip(per_round[a], per_round[b])]
        summary["speedup"] = _spread(ratios, 3)
    return summary


def load_baseline():
    spec = importlib.util.spec_from_file_location("s2s_jax_baseline_flax_examples", BASELINE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # flax modules (dataclasses) look their module up
    spec.loader.exec_module(module)
    return module


def build_runners(config, batches, baseline: bool = True) -> list[Runner]:
    from functools import partial

    from s2s_jax import steps
    from s2s_jax.train_state import create_state, make_model

    V = config.data.vocab_size
    model = make_model(config, V, V)
    runners = [Runner("s2s_jax", partial(steps.train_step, model=model, config=config),
                      create_state(config, model), batches)]
    if baseline:
        base = load_baseline()
        bmodel = base.FlaxExamplesSeq2Seq(config.model, V, V)
        runners.append(Runner("flax_examples", partial(base.train_step, model=bmodel, config=config),
                              base.create_state(config, bmodel), batches))
    return runners


# -- device counts (--devices) -----------------------------------------------------------------

def build_parallel_runner(config, batches) -> Runner:
    """s2s_jax's step under train.parallel over every device of this process, global batches."""
    from functools import partial

    from s2s_jax import steps
    from s2s_jax.parallel import Parallel
    from s2s_jax.train_state import create_state, make_model

    parallel = Parallel(config.train.parallel)
    V = config.data.vocab_size
    model = make_model(config, V, V)
    step = parallel.wrap_train(partial(steps.train_step, model=model, config=config))
    return Runner("s2s_jax", step, parallel.put_state(create_state(config, model)),
                  [parallel.put_batch(b) for b in batches])


def run_device_counts(args, config) -> int:
    """One child process per device count (the count is fixed before jax is imported)."""
    import subprocess

    counts = [int(n) for n in args.devices.split(",")]
    records = {}
    for n in counts:
        env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                   f"--xla_force_host_platform_device_count={n}".strip(), JAX_PLATFORMS="cpu")
        cmd = [sys.executable, "-m", "s2s_jax", "benchmark", "--config", args.config, "--rounds",
               str(args.rounds), "--batches", str(args.batches), "--device-count-child"]
        cmd += [a for o in args.overrides for a in ("--set", o)]
        print(f"[benchmark] {n} simulated CPU device(s)...", file=sys.stderr)
        child = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        if child.returncode != 0:
            print(f"[benchmark] the {n}-device run failed (exit {child.returncode})", file=sys.stderr)
            return child.returncode
        records[str(n)] = json.loads(child.stdout.strip().splitlines()[-1])
    tps = {n: r["models"]["s2s_jax"]["target_tokens_per_s"] for n, r in records.items()}
    record = {"benchmark": "train_step_device_counts", "config": config.name,
              "parallel": config.train.parallel, "batch_size": config.data.batch_size,
              "cpu_count": os.cpu_count(), "target_tokens_per_s": {n: t["median"] for n, t in tps.items()},
              "target_tokens_per_s_spread": tps, "records": records}
    return _emit(record, args.output)


def _emit(record: dict, output: str | None) -> int:
    """Prints the one JSON record (and writes it to `output` when given)."""
    text = json.dumps(record)
    print(text)
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


def run(args) -> int:
    from s2s_jax import config as config_lib, runtime

    config = config_lib.override(config_lib.load(args.config), args.overrides)
    if args.devices and not args.data_only:
        return run_device_counts(args, config)
    if args.data_only:
        from s2s_jax.data import loader_throughput

        record = loader_throughput(config)
    else:
        import jax

        # compile times must be real compilations, not hits in the CLI's persistent cache
        jax.config.update("jax_enable_compilation_cache", False)
        batches = make_batches(config, args.batches)
        t0 = time.perf_counter()
        if args.device_count_child:
            runners = [build_parallel_runner(config, batches)]
        else:
            runners = build_runners(config, batches, baseline=not args.no_baseline)
        setup_s = time.perf_counter() - t0
        record = {
            "benchmark": "train_step",
            "config": config.name,
            "device": str(jax.devices()[0].device_kind),
            "devices": jax.device_count() if args.device_count_child else 1,
            "parallel": config.train.parallel if args.device_count_child else "none",
            "platform": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
            "host_allocator": runtime.HOST_ALLOCATOR,  # S2S_JAX_HOST_ALLOCATOR=default: glibc as it comes
            "dtype": config.model.dtype,
            "unroll": config.model.unroll,
            "batch_size": config.data.batch_size,
            "buckets": [list(b) for b in config.data.buckets],
            "batches_per_round": len(batches),
            "rounds": args.rounds,
            "setup_s": round(setup_s, 2),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        record.update(measure(runners, batches, config.model, config.data.vocab_size, args.rounds))
    return _emit(record, args.output)
