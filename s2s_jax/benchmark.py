"""Training throughput, compile time and FLOP utilisation, fast model vs a baseline, as one JSON record.

    python -m s2s_jax benchmark --config experiments/configs/bench_cpu.py [--rounds 5] [--batches 8]
    python -m s2s_jax benchmark --config experiments/configs/bench_cpu.py --data-only
    python -m s2s_jax benchmark --config experiments/configs/bench_cpu.py --devices 1,2,4,8  # simulated CPU devices
    python -m s2s_jax benchmark --config experiments/configs/bench_gpu.py                    # on a GPU / TPU
    python -m s2s_jax benchmark --config experiments/configs/bench_gpu.py --devices 1,2,4,8  # real devices

Batches: `config.data.batch_size` sentences per batch, or, when `config.data.batch_tokens` > 0,
batch_tokens // max(S, T + 1) rows (a multiple of 8) for each bucket (S, T), as the data loader
counts tokens. Lengths: the word counts of `{data.dir}/tok/train.{src,tgt}` when that corpus is
there (target + 1 for EOS), else a seeded log-normal fitted to Multi30k (the same numbers on
every machine; `lengths_source` in the record says which). The ids are uniform random in the
vocabulary. The pairs are grouped into `config.data.buckets` and padded to their bucket. A fixed
list of `--batches` batches is drawn with the buckets' frequencies (in batches: a bucket's share
of the sentences over its rows per batch); every bucket shape is compiled first (the compile time
reported per shape), then `--rounds` rounds each time the matmul ceiling, the fast step over the
whole list and the baseline step over the same list, alternating which model goes first, so all
figures share the machine's momentary load. Reported: median and min/max over rounds of target
tokens/s and step time, the speed ratio (median of per-round ratios), achieved FLOP/s as a
fraction of the ceiling, and model FLOP utilisation (MFU).

CPU (the record format of experiments/results/bench_cpu_*.json, unchanged): the ceiling is the
best of three float32 [2048, 2048] matmuls, each step is synchronised (`step_s` are single steps).

Accelerators (GPU, TPU): the ceilings are large [8192, 8192] matmuls in bfloat16, TF32 and true
float32 (`ceilings_tflop_per_s`), each the best of three bursts of ten; `ceiling_kind` names the
one matching the model's compute (bfloat16 for model.dtype=bfloat16, else model.matmul_precision)
and `ceiling_gflop_per_s` is that one. A round dispatches every step and synchronises once at
its end (`sync: "round"`; `step_s` is then the round's time / batches). `datasheet_peak_tflop_per_s`
is the vendor's dense peak for `device` and the compute kind (DATASHEET_PEAK_TFLOPS; null for an
unknown device), `peak_bytes_in_use` the device's peak memory (`memory_stats()`, null where the
backend has none) and `program_bytes` XLA's memory analysis of each model's largest program.
`--sync step|round` overrides the choice.

Per model: `fraction_of_ceiling` is executed FLOPs (padded shapes, what the hardware computes) /
time / ceiling, as before; `mfu_measured` and `mfu_datasheet` are model FLOPs (real lengths,
padding not counted) / time / the measured ceiling or the datasheet peak.

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
import functools
import importlib.util
import json
import os
import platform
import re
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
                        "number of devices, one subprocess each: the first N GPUs/TPU chips on an accelerator "
                        "host, N simulated CPU devices on a CPU-only one; reports target tokens/s per count")
    p.add_argument("--sync", choices=("auto", "step", "round"), default="auto",
                   help="synchronise after every step (CPU default) or once per round (accelerator default)")
    p.add_argument("--device-count-child", action="store_true", help=argparse.SUPPRESS)


# -- data -------------------------------------------------------------------------------------

def corpus_lengths(config, rng: np.random.Generator, n: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """(source lengths, target lengths incl. EOS) of real sentence pairs, or a fitted log-normal."""
    return _lengths(config, rng, n)[:2]


def _lengths(config, rng: np.random.Generator, n: int = 20_000):
    """(source lengths, target lengths incl. EOS, where they came from)."""
    d = config.data
    base = Path(d.dir) if d.dir else None
    for folder in ([base / "tok", base] if base else []):
        src, tgt = folder / f"train.{d.src_lang}", folder / f"train.{d.tgt_lang}"
        if src.is_file() and tgt.is_file():
            with open(src, encoding="utf-8") as f:
                s = np.array([len(line.split()) for line in f])
            with open(tgt, encoding="utf-8") as f:
                t = np.array([len(line.split()) + 1 for line in f])
            return s, t, f"corpus:{folder}"
    # Multi30k (tok) fit: mean 13.0 / 13.4, sd ≈ 4.5.
    s = np.maximum(1, np.round(rng.lognormal(np.log(12.3), 0.33, n))).astype(int)
    t = np.maximum(2, np.round(s * rng.lognormal(0.0, 0.15, n) + 0.5)).astype(int)
    return s, t, "lognormal-fit-multi30k"


ROW_MULTIPLE = 8  # token-based batches: rows per bucket rounded down to a multiple of this


def bucket_rows(config) -> list[int]:
    """Rows per batch for each bucket: data.batch_size, or, token-based, data.batch_tokens //
    max(S, T + 1) rounded down to a multiple of ROW_MULTIPLE (at least ROW_MULTIPLE): the data
    loader's rule (OpenNMT-py's `-batch_type tokens`: rows × the longer side with BOS and EOS;
    `data.pipeline.batch_token_count`, not imported here so that the benchmark needs no grain)."""
    d = config.data
    buckets = list(d.buckets) or [(d.max_source_length, d.max_target_length + 1)]
    if d.batch_tokens > 0:
        return [max(ROW_MULTIPLE, (d.batch_tokens // max(s, t + 1)) // ROW_MULTIPLE * ROW_MULTIPLE)
                for s, t in buckets]
    return [d.batch_size] * len(buckets)


def lengths_source(config) -> str:
    return _lengths(config, np.random.default_rng(0), 10)[2]


def make_batches(config, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`count` padded batches (bucket_rows rows each), drawn by bucket frequency."""
    d = config.data
    rng = np.random.default_rng(seed)
    src_len, tgt_len, _ = _lengths(config, rng)
    buckets = list(d.buckets) or [(d.max_source_length, d.max_target_length + 1)]
    rows_of = bucket_rows(config)
    bucket_of = np.full(len(src_len), -1)
    for i in reversed(range(len(buckets))):
        s, t = buckets[i]
        bucket_of[(src_len <= s) & (tgt_len <= t)] = i
    # batches per bucket ∝ its sentences / its rows per batch (= sentence frequency at a fixed size)
    freq = np.array([np.mean(bucket_of == i) / rows_of[i] for i in range(len(buckets))])
    # largest-remainder allocation, every bucket at least once (all shapes get compiled and timed)
    counts = np.maximum(1, np.floor(freq / freq.sum() * count)).astype(int)
    while counts.sum() < count:
        counts[np.argmax(freq / freq.sum() * count - counts)] += 1
    vocab = d.vocab_size
    batches = []
    for i, n in enumerate(counts):
        S, T = buckets[i]
        B = rows_of[i]
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


# -- the machine ------------------------------------------------------------------------------

# Vendors' datasheet dense peaks (no sparsity), TFLOP/s per device, by compute kind. Matched
# against jax's device_kind by `datasheet_peak`; anything else is unknown (null in the record).
DATASHEET_PEAK_TFLOPS = {
    "NVIDIA H100 SXM": {"bfloat16": 989.0, "tensorfloat32": 494.7, "float32": 67.0},
    "NVIDIA H200": {"bfloat16": 989.0, "tensorfloat32": 494.7, "float32": 67.0},  # H100 SXM's
    "NVIDIA A100": {"bfloat16": 312.0, "tensorfloat32": 156.0, "float32": 19.5},
    "TPU v4": {"bfloat16": 275.0},
    "TPU v5e": {"bfloat16": 197.0},
    "TPU v5p": {"bfloat16": 459.0},
}


def datasheet_entry(device_kind: str) -> str | None:
    """The DATASHEET_PEAK_TFLOPS key for a jax `device_kind`, or None when unknown.

    Seen spellings: "NVIDIA H100 80GB HBM3" (SXM; PCIe and NVL boards have lower peaks and are
    left unknown), "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "TPU v4", "TPU v5 lite" (v5e), "TPU v5p".
    """
    k = device_kind.lower()
    if "h100" in k:
        return None if ("pcie" in k or "nvl" in k) else "NVIDIA H100 SXM"
    if "h200" in k:
        return None if "nvl" in k else "NVIDIA H200"
    if "a100" in k:
        return "NVIDIA A100"
    if k.startswith("tpu"):
        if "v4" in k and "lite" not in k:
            return "TPU v4"
        if "v5e" in k or "v5 lite" in k or "v5litepod" in k:
            return "TPU v5e"
        if "v5p" in k or k.strip() == "tpu v5":
            return "TPU v5p"
    return None


def datasheet_peak(device_kind: str, kind: str) -> float | None:
    """Datasheet dense peak FLOP/s of one device for a compute kind, or None."""
    entry = datasheet_entry(device_kind)
    tflops = DATASHEET_PEAK_TFLOPS.get(entry, {}).get(kind) if entry else None
    return None if tflops is None else tflops * 1e12


def compute_kind(model_cfg, backend: str) -> str:
    """What the model's matmuls run as: bfloat16 | tensorfloat32 | float32 (the ceiling to compare with)."""
    if model_cfg.dtype == "bfloat16":
        return "bfloat16"
    p = getattr(model_cfg, "matmul_precision", "auto")
    if backend == "cpu" or p in ("auto", "highest", "bfloat16_3x"):
        return "float32"
    if p == "tensorfloat32":
        return "tensorfloat32"
    return "bfloat16" if backend == "tpu" else "tensorfloat32"  # "default": the backend's choice


# kind -> (input dtype, jax.default_matmul_precision)
_CEILING_KINDS = {"bfloat16": ("bfloat16", "default"), "tensorfloat32": ("float32", "tensorfloat32"),
                  "float32": ("float32", "highest")}


@functools.lru_cache(maxsize=None)
def _matmul_program(n: int, kind: str, backend: str):
    """(compiled matmul, a, b) of one kind, compiled once per process (not once per round)."""
    import jax
    import jax.numpy as jnp

    dtype, precision = _CEILING_KINDS[kind]
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    with jax.default_matmul_precision(precision):
        f = jax.jit(jnp.matmul).lower(a, b).compile()
    return f, a, b


def matmul_ceiling(n: int = 2048, reps: int = 3, kind: str = "float32", burst: int = 1) -> float:
    """FLOP/s of the best of `reps` [n, n] × [n, n] matmuls of `kind` on the default device.

    burst > 1: each timing dispatches `burst` matmuls and synchronises once (accelerators, where
    one matmul is ~1 ms and a host round trip would be a visible share of it)."""
    import jax
    import jax.numpy as jnp

    f, a, b = _matmul_program(n, kind, jax.default_backend())
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        if burst == 1:
            f(a, b).block_until_ready()
        else:
            outs = [f(a, b) for _ in range(burst)]
            jax.block_until_ready(outs)
        best = min(best, (time.perf_counter() - t0) / burst)
    return 2 * n ** 3 / best


def ceilings(backend: str) -> dict[str, float]:
    """{kind: FLOP/s}: float32 [2048²] on CPU (as ever); bf16, TF32 and f32 [8192²] bursts elsewhere."""
    if backend == "cpu":
        return {"float32": matmul_ceiling()}
    return {k: matmul_ceiling(8192, 3, k, burst=10) for k in _CEILING_KINDS}


def platform_version(device) -> str:
    """The backend's version string (e.g. the CUDA / libtpu version), "" where jax hides it."""
    return str(getattr(getattr(device, "client", None), "platform_version", ""))


def peak_bytes_in_use(device=None) -> int | None:
    """The device's peak allocated bytes so far (process lifetime), or None where not reported."""
    import jax

    try:
        stats = (device or jax.local_devices()[0]).memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory statistics
        return None
    if not stats:
        return None
    value = stats.get("peak_bytes_in_use")
    return int(value) if value is not None else None


def dot_operand_types(hlo: str) -> dict[str, tuple[str, str]]:
    """Every matrix product (no batch dimensions) of an optimised HLO module's text
    (`compiled.as_text()`): instruction name -> (lhs, rhs) element types, inside fusions too.

    XLA:CPU silently rewrites a bfloat16 product it cannot run on its library path into a
    float32 one; this is how a test or a trace tells (docs/speed.md, "bfloat16 on CPU")."""
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))  # instruction -> element type
    types.update(re.findall(r"([\w.\-]+): (\w+)\[", hlo))    # fused computations' parameters
    return {name: (types.get(lhs, "?"), types.get(rhs, "?"))
            for name, lhs, rhs, rest in re.findall(
                r"%([\w.\-]+) = \w+\[[^\]]*\][^=]*? dot\(%([\w.\-]+), %([\w.\-]+)\)(.*)", hlo)
            if "lhs_batch_dims" not in rest}


def _program_bytes(compiled) -> dict | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "alias", "temp")}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


# -- measurement ------------------------------------------------------------------------------

class Runner:
    """A jitted step compiled for every batch shape, with the state it threads through.

    sync "step": every step is synchronised and timed (`step_times` are single steps); "round":
    a round dispatches every step and synchronises once at its end (`step_times` are the round's
    time / steps), so the host's dispatch overlaps the device's work as in training."""

    def __init__(self, name: str, step_fn: Callable, state, batches: list[dict], sync: str = "step"):
        import jax

        self.name = name
        self.sync = sync
        self.state = state
        self.compiled = {}
        self.compile_s = {}
        self.program_bytes = None
        jitted = jax.jit(step_fn, donate_argnums=0)
        for b in batches:
            shape = (b["source"].shape, b["target_input"].shape)
            if shape in self.compiled:
                continue
            t0 = time.perf_counter()
            self.compiled[shape] = jitted.lower(state, b).compile()
            key = "x".join(map(str, (*shape[0], shape[1][1])))  # BxSxT
            self.compile_s[key] = round(time.perf_counter() - t0, 3)
            mem = _program_bytes(self.compiled[shape])
            if mem and (self.program_bytes is None or mem["total"] > self.program_bytes["total"]):
                self.program_bytes = dict(mem, shape=key)
            print(f"[benchmark] {name}: compiled {key} in {self.compile_s[key]:.1f}s", file=sys.stderr)
        self.batches = [jax.device_put(b) for b in batches]
        self.step_times: list[float] = []
        self.round_times: list[float] = []
        self.losses: list[float] = []
        # one untimed pass: first-run allocations, donation warm-up
        self.run_round(record=False)
        self.peak_bytes_after_warmup = peak_bytes_in_use()

    def run_round(self, record: bool = True) -> float:
        import jax

        if self.sync == "round":
            t0 = time.perf_counter()
            losses = []
            for b in self.batches:
                fn = self.compiled[(b["source"].shape, b["target_input"].shape)]
                self.state, metrics = fn(self.state, b)
                losses.append(metrics["loss"])
            jax.block_until_ready((self.state, losses))
            total = time.perf_counter() - t0
            if record:
                self.step_times.extend([total / len(self.batches)] * len(self.batches))
                self.losses.extend(float(x) for x in losses)
                self.round_times.append(total)
            return total
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


def _round_or_none(x, digits):
    return None if x is None else round(x, digits)


def measure(runners: list[Runner], batches: list[dict], model_cfg, target_vocab: int, rounds: int,
            devices: int = 1) -> dict:
    """Interleaved timed rounds of every runner (and the matmul ceilings); one summary per runner.

    Reusable per device count: build the runners for a device count, call measure, keep the record.
    On `devices` accelerators the ceilings and peaks are one device's times the count (the steps
    are global); simulated CPU devices share the same cores, so there the ceiling stays one matmul's.
    """
    import jax

    backend = jax.default_backend()
    device = jax.local_devices()[0]
    n_dev = 1 if backend == "cpu" else devices
    kind = compute_kind(model_cfg, backend)
    tokens = int(sum(b["target_lengths"].sum() for b in batches))
    flops_real = 3 * sum(forward_flops(model_cfg, target_vocab, b["source_lengths"], b["target_lengths"])
                         for b in batches)
    flops_exec = 3 * sum(forward_flops(model_cfg, target_vocab,
                                       np.full(len(b["source_lengths"]), b["source"].shape[1]),
                                       np.full(len(b["target_lengths"]), b["target_input"].shape[1]))
                         for b in batches)
    all_ceilings, per_round = [], {r.name: [] for r in runners}
    for i in range(rounds):
        all_ceilings.append(ceilings(backend))
        order = runners if i % 2 == 0 else runners[::-1]
        for r in order:
            per_round[r.name].append(r.run_round())
    kinds = list(all_ceilings[0])
    ceiling_kind = kind if kind in kinds else kinds[0]
    ceils = [c[ceiling_kind] * n_dev for c in all_ceilings]
    ceiling = statistics.median(ceils)
    peak = datasheet_peak(str(device.device_kind), kind)
    peak_all = None if peak is None else peak * n_dev
    out = {}
    for r in runners:
        rt = per_round[r.name]
        tps = [tokens / t for t in rt]
        fps = [flops_exec / t for t in rt]
        mps = [flops_real / t for t in rt]
        out[r.name] = {
            "compile_s": r.compile_s,
            "step_s": _spread(r.step_times),
            "target_tokens_per_s": _spread(tps, 1),
            "gflop_per_s": _spread([f / 1e9 for f in fps], 2),
            "fraction_of_ceiling": round(statistics.median(
                [f / c for f, c in zip(fps, ceils)]), 3),
            "first_loss": round(r.losses[0], 4) if r.losses else None,
            "last_loss": round(r.losses[-1], 4) if r.losses else None,
            # added for accelerators (also filled on CPU)
            "model_gflop_per_s": _spread([f / 1e9 for f in mps], 2),
            "mfu_measured": round(statistics.median([f / c for f, c in zip(mps, ceils)]), 4),
            "mfu_datasheet": None if peak_all is None else round(statistics.median(mps) / peak_all, 4),
            "peak_bytes_in_use_after_warmup": r.peak_bytes_after_warmup,
            "program_bytes": r.program_bytes,
        }
    summary = {
        "ceiling_gflop_per_s": _spread([c / 1e9 for c in ceils], 1),
        "ceiling_gflop_per_s_median": round(ceiling / 1e9, 1),
        "target_tokens_per_round": tokens,
        "mflop_per_target_token": round(flops_real / tokens / 1e6, 2),
        "padded_flop_overhead": round(flops_exec / flops_real, 3),
        "models": out,
        "ceiling_kind": ceiling_kind,
        "ceilings_tflop_per_s": {k: _spread([c[k] * n_dev / 1e12 for c in all_ceilings], 3) for k in kinds},
        "datasheet_peak_tflop_per_s": _round_or_none(None if peak_all is None else peak_all / 1e12, 1),
        "datasheet_entry": datasheet_entry(str(device.device_kind)),
        "peak_bytes_in_use": peak_bytes_in_use(),
        "sync": runners[0].sync if runners else None,
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


def build_runners(config, batches, baseline: bool = True, sync: str = "step") -> list[Runner]:
    from functools import partial

    from s2s_jax.training import steps
    from s2s_jax.train_state import create_state, make_model

    V = config.data.vocab_size
    model = make_model(config, V, V)
    runners = [Runner("s2s_jax", partial(steps.train_step, model=model, config=config),
                      create_state(config, model), batches, sync=sync)]
    if baseline:
        base = load_baseline()
        bmodel = base.FlaxExamplesSeq2Seq(config.model, V, V)
        runners.append(Runner("flax_examples", partial(base.train_step, model=bmodel, config=config),
                              base.create_state(config, bmodel), batches, sync=sync))
    return runners


# -- device counts (--devices) -----------------------------------------------------------------

def build_parallel_runner(config, batches, sync: str = "step") -> Runner:
    """s2s_jax's step under train.parallel over every device of this process, global batches."""
    from functools import partial

    from s2s_jax.training import steps
    from s2s_jax.parallel import Parallel
    from s2s_jax.train_state import create_state, make_model

    parallel = Parallel(config.train.parallel)
    V = config.data.vocab_size
    model = make_model(config, V, V)
    step = parallel.wrap_train(partial(steps.train_step, model=model, config=config))
    return Runner("s2s_jax", step, parallel.put_state(create_state(config, model)),
                  [parallel.put_batch(b) for b in batches], sync=sync)


_PROBE = ("import json, jax; d = jax.devices(); print(json.dumps({'backend': jax.default_backend(), "
          "'count': len(d), 'kind': str(d[0].device_kind), "
          "'version': str(getattr(getattr(d[0], 'client', None), 'platform_version', ''))}))")


def probe_devices() -> dict:
    """{backend, count, kind, version} of a fresh process's jax (this process keeps jax unstarted,
    so the children get the devices to themselves)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", _PROBE], stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def device_count_env(n: int, probe: dict) -> tuple[dict, bool]:
    """(environment for a child that sees n devices, simulated?).

    CPU-only host: n simulated CPU devices (--xla_force_host_platform_device_count). GPUs: the
    first n of the visible ones (CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES). TPUs: all chips
    as they are, or n of them through TPU_VISIBLE_CHIPS and the process bounds (n = 1, 2, 4;
    the layout Cloud TPU documents for several processes on one host; not yet tried here)."""
    env = dict(os.environ)
    backend = probe["backend"]
    if backend == "cpu":
        env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
        env["JAX_PLATFORMS"] = "cpu"
        return env, True
    if n > probe["count"]:
        raise ValueError(f"--devices {n}: this host has {probe['count']} {backend} device(s)")
    if backend == "gpu":
        var = "HIP_VISIBLE_DEVICES" if "rocm" in probe.get("version", "").lower() else "CUDA_VISIBLE_DEVICES"
        visible = [v for v in os.environ.get(var, "").split(",") if v.strip()] or [str(i) for i in range(probe["count"])]
        env[var] = ",".join(visible[:n])
    elif backend == "tpu" and n != probe["count"]:
        bounds = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1"}
        if n not in bounds:
            raise ValueError(f"--devices {n}: on TPU use all {probe['count']} chips or 1, 2 or 4")
        env.update(TPU_VISIBLE_CHIPS=",".join(map(str, range(n))), TPU_CHIPS_PER_PROCESS_BOUNDS=bounds[n],
                   TPU_PROCESS_BOUNDS="1,1,1")
    return env, False


def run_device_counts(args, config) -> int:
    """One child process per device count (the count is fixed before jax is imported)."""
    import subprocess

    counts = [int(n) for n in args.devices.split(",")]
    probe = probe_devices()
    records = {}
    simulated = probe["backend"] == "cpu"
    for n in counts:
        try:
            env, simulated = device_count_env(n, probe)
        except ValueError as e:
            print(f"[benchmark] {e}", file=sys.stderr)
            return 2
        cmd = [sys.executable, "-m", "s2s_jax", "benchmark", "--config", args.config, "--rounds",
               str(args.rounds), "--batches", str(args.batches), "--sync", args.sync, "--device-count-child"]
        cmd += [a for o in args.overrides for a in ("--set", o)]
        what = "simulated CPU" if simulated else probe["backend"]
        print(f"[benchmark] {n} {what} device(s)...", file=sys.stderr)
        child = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        if child.returncode != 0:
            print(f"[benchmark] the {n}-device run failed (exit {child.returncode})", file=sys.stderr)
            return child.returncode
        records[str(n)] = json.loads(child.stdout.strip().splitlines()[-1])
    tps = {n: r["models"]["s2s_jax"]["target_tokens_per_s"] for n, r in records.items()}
    record = {"benchmark": "train_step_device_counts", "config": config.name,
              "parallel": config.train.parallel, "batch_size": config.data.batch_size,
              "cpu_count": os.cpu_count(), "target_tokens_per_s": {n: t["median"] for n, t in tps.items()},
              "target_tokens_per_s_spread": tps, "records": records,
              "backend": probe["backend"], "device": probe["kind"], "simulated_devices": simulated,
              "batch_tokens": config.data.batch_tokens}
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
        # train.deterministic's XLA flags, read when the backend starts (inert on CPU)
        deterministic_flags = runtime.configure_backend(config.train.deterministic) \
            if hasattr(runtime, "configure_backend") else []
        import jax

        # compile times must be real compilations, not hits in the CLI's persistent cache
        jax.config.update("jax_enable_compilation_cache", False)
        backend = jax.default_backend()
        sync = args.sync if args.sync != "auto" else ("step" if backend == "cpu" else "round")
        batches = make_batches(config, args.batches)
        t0 = time.perf_counter()
        if args.device_count_child:
            runners = [build_parallel_runner(config, batches, sync=sync)]
        else:
            runners = build_runners(config, batches, baseline=not args.no_baseline, sync=sync)
        setup_s = time.perf_counter() - t0
        m = config.model
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
            "dtype": m.dtype,
            "unroll": m.unroll,
            "batch_size": config.data.batch_size,
            "buckets": [list(b) for b in config.data.buckets],
            "batches_per_round": len(batches),
            "rounds": args.rounds,
            "setup_s": round(setup_s, 2),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            # added for accelerators (also filled on CPU)
            "backend": backend,
            "platform_version": platform_version(jax.devices()[0]),
            "batch_tokens": config.data.batch_tokens,
            "rows_per_bucket": bucket_rows(config),
            "rows_per_batch": sorted({int(b["source"].shape[0]) for b in batches}),
            "lengths_source": lengths_source(config),
            "kernels": getattr(m, "kernels", None),
            "matmul_precision": getattr(m, "matmul_precision", None),
            "fused_decoder": getattr(m, "fused_decoder", None),
            "input_feeding": m.input_feeding,
            "loss_chunk": m.loss_chunk,
            "deterministic": getattr(config.train, "deterministic", None),
            "deterministic_flags": list(deterministic_flags),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        }
        record.update(measure(runners, batches, m, config.data.vocab_size, args.rounds,
                              devices=jax.device_count() if args.device_count_child else 1))
    return _emit(record, args.output)
