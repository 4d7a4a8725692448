"""`python -m s2s_jax benchmark` (its options are defined in cli.py): the one JSON record it prints."""

from __future__ import annotations

import json
import os
import platform
import time

from s2s_jax.benchmark.batches import bucket_rows, bucket_shapes, lengths_source, make_batches
from s2s_jax.benchmark.peaks import platform_version
from s2s_jax.benchmark.runner import run_device_counts
from s2s_jax.benchmark.timing import build_parallel_runner, build_runners, measure


def _emit(record: dict, output: str | None) -> int:
    """Prints the one JSON record (and writes it to `output` when given)."""
    text = json.dumps(record)
    print(text)
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


def run(args) -> int:
    from s2s_jax import config as config_lib

    config = config_lib.override(config_lib.load(args.config), args.overrides)
    if args.devices and not args.data_only:
        rc, record = run_device_counts(args, config)
        return rc if record is None else _emit(record, args.output)
    if args.data_only:
        from s2s_jax.data import loader_throughput

        return _emit(loader_throughput(config), args.output)
    return _emit(_train_step_record(args, config), args.output)


def _train_step_record(args, config) -> dict:
    """Times s2s_jax's training step (and the baseline's) on synthetic batches: the record."""
    from s2s_jax import runtime

    # train.deterministic's XLA flags, read when the backend starts (inert on CPU)
    deterministic_flags = runtime.configure_backend(config.train.deterministic) \
        if hasattr(runtime, "configure_backend") else []
    import jax

    # compile times must be real compilations, not hits in the CLI's persistent cache
    jax.config.update("jax_enable_compilation_cache", False)
    backend = jax.default_backend()
    sync = args.sync if args.sync != "auto" else ("step" if backend == "cpu" else "round")
    devices = jax.device_count() if args.device_count_child else 1
    batches = make_batches(config, args.batches, devices=devices)
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
        "devices": devices,
        "parallel": config.train.parallel if args.device_count_child else "none",
        "platform": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "host_allocator": runtime.HOST_ALLOCATOR,  # S2S_JAX_HOST_ALLOCATOR=default: glibc as it comes
        "dtype": m.dtype,
        "unroll": m.unroll,
        "batch_size": config.data.batch_size,
        "buckets": [list(b) for b in bucket_shapes(config)],
        "batches_per_round": len(batches),
        "rounds": args.rounds,
        "setup_s": round(setup_s, 2),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        # added for accelerators (also filled on CPU)
        "backend": backend,
        "platform_version": platform_version(jax.devices()[0]),
        "batch_tokens": config.data.batch_tokens,
        "rows_per_bucket": bucket_rows(config, devices),
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
    record.update(measure(runners, batches, m, config.data.vocab_size, args.rounds, devices=devices))
    return record
