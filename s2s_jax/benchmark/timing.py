"""Timing: a jitted step compiled for every batch shape (`Runner`), interleaved timed rounds of
the models and the ceilings (`measure`), and the runners for s2s_jax's step and the baseline's.
"""

from __future__ import annotations

import statistics
import sys
import time
from functools import partial
from typing import Callable

import numpy as np

from s2s_jax.benchmark.flops import forward_flops
from s2s_jax.benchmark.peaks import ceilings, compute_kind, datasheet_entry, datasheet_peak, peak_bytes_in_use


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


def build_runners(config, batches, baseline: bool = True, sync: str = "step") -> list[Runner]:
    """s2s_jax's step and (baseline) the Flax-examples model's (benchmark/baseline.py), one device."""
    from s2s_jax.training import steps
    from s2s_jax.train_state import create_state, make_model

    V = config.data.vocab_size
    model = make_model(config, V, V)
    runners = [Runner("s2s_jax", partial(steps.train_step, model=model, config=config),
                      create_state(config, model), batches, sync=sync)]
    if baseline:
        from s2s_jax.benchmark import baseline as base

        bmodel = base.FlaxExamplesSeq2Seq(config.model, V, V)
        runners.append(Runner("flax_examples", partial(base.train_step, model=bmodel, config=config),
                              base.create_state(config, bmodel), batches, sync=sync))
    return runners


def build_parallel_runner(config, batches, sync: str = "step") -> Runner:
    """s2s_jax's step under train.parallel over every device of this process, global batches."""
    from s2s_jax.training import steps
    from s2s_jax.parallel import Parallel
    from s2s_jax.train_state import create_state, make_model

    parallel = Parallel(config.train.parallel)
    V = config.data.vocab_size
    model = make_model(config, V, V)
    step = parallel.wrap_train(partial(steps.train_step, model=model, config=config))
    return Runner("s2s_jax", step, parallel.put_state(create_state(config, model)),
                  [parallel.put_batch(b) for b in batches], sync=sync)
