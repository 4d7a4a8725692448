"""Training throughput, compile time and FLOP utilisation, fast model vs a baseline, as one JSON record.

    python -m s2s_jax benchmark --config experiments/configs/bench_cpu.py [--rounds 5] [--batches 8]
    python -m s2s_jax benchmark --config experiments/configs/bench_cpu.py --data-only
    python -m s2s_jax benchmark --config experiments/configs/bench_cpu.py --devices 1,2,4,8  # simulated CPU devices
    python -m s2s_jax benchmark --config experiments/configs/bench_gpu.py                    # on a GPU / TPU
    python -m s2s_jax benchmark --config experiments/configs/bench_gpu.py --devices 1,2,4,8  # real devices

Batches (`batches.py`): synthetic ids on real or fitted sentence lengths, bucketed, counted
and padded by the data layer's own functions, so they have the shapes training would have
(rows per bucket: data.batch_size, or data.batch_tokens // max(S, T + 1) rounded down to a
multiple of the devices x train.grad_accum; the buckets: data.buckets or the automatic ones).
A fixed list of `--batches` batches is drawn with the buckets' frequencies; every bucket shape
is compiled first (the compile time reported per shape), then `--rounds` rounds each time the
matmul ceiling, the fast step over the whole list and the baseline step over the same list,
alternating which model goes first, so all figures share the machine's momentary load. Reported: median and min/max over rounds of target
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

Modules: `batches` (the synthetic batches), `flops` (the FLOP model), `peaks` (datasheet peaks,
compute kinds, measured ceilings), `timing` (Runner, measure), `runner` (one subprocess per
device count), `verb` (the CLI verb's record; its options are in cli.py), `baseline` (the Flax-examples model).
"""

from __future__ import annotations

from s2s_jax.benchmark.batches import bucket_rows, bucket_shapes, corpus_lengths, lengths_source, make_batches
from s2s_jax.benchmark.flops import dot_operand_types, forward_flops
from s2s_jax.benchmark.peaks import (DATASHEET_PEAK_TFLOPS, ceilings, compute_kind, datasheet_entry, datasheet_peak,
                                     matmul_ceiling, peak_bytes_in_use, platform_version)
from s2s_jax.benchmark.runner import device_count_env, probe_devices, run_device_counts
from s2s_jax.benchmark.timing import Runner, build_parallel_runner, build_runners, measure
from s2s_jax.benchmark.verb import run

__all__ = ["bucket_rows", "bucket_shapes", "corpus_lengths", "lengths_source", "make_batches", "dot_operand_types",
           "forward_flops", "DATASHEET_PEAK_TFLOPS", "ceilings", "compute_kind", "datasheet_entry", "datasheet_peak",
           "matmul_ceiling", "peak_bytes_in_use", "platform_version", "device_count_env", "probe_devices",
           "run_device_counts", "Runner", "build_parallel_runner", "build_runners", "measure", "run"]
