"""`python -m s2s_jax benchmark` (s2s_jax/benchmark/): the record, bfloat16 on both sides,
token-based synthetic batches, the accelerator figures (ceiling kinds, datasheet peaks, MFU).

The CLI runs use a toy model on one bucket shape (two compilations per model) so they cost
seconds; the timing itself is not judged, only that the record is complete and sane.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from s2s_jax import benchmark
from s2s_jax import config as config_lib
from s2s_jax.data import MODEL_FIELDS
from s2s_jax.vocab import BOS_ID, EOS_ID

ROOT = Path(__file__).resolve().parents[1]
TOY = ["model.hidden_dim=32", "model.source_embed_dim=16", "model.target_embed_dim=16",
       "model.encoder_layers=1", "model.decoder_layers=1", "data.vocab_size=64", "data.batch_size=8",
       "data.buckets=((30, 32),)"]
# every field of a CPU record as experiments/results/bench_cpu_s5_run*.json have them
CPU_RECORD_KEYS = {"benchmark", "config", "device", "devices", "parallel", "platform", "cpu_count", "jax",
                   "host_allocator", "dtype", "unroll", "batch_size", "buckets", "batches_per_round", "rounds",
                   "setup_s", "time", "ceiling_gflop_per_s", "ceiling_gflop_per_s_median",
                   "target_tokens_per_round", "mflop_per_target_token", "padded_flop_overhead", "models", "speedup"}
CPU_MODEL_KEYS = {"compile_s", "step_s", "target_tokens_per_s", "gflop_per_s", "fraction_of_ceiling",
                  "first_loss", "last_loss"}


def _bench(*args, timeout=600):
    from tests._helpers import run_env

    proc = subprocess.run([sys.executable, "-m", "s2s_jax", "benchmark", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=run_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _load(path, *sets):
    return config_lib.override(config_lib.load(str(ROOT / path)), list(sets))


@pytest.fixture(scope="module")
def bf16_record():
    sets = [a for s in TOY + ["model.dtype=bfloat16"] for a in ("--set", s)]
    return _bench("--config", "experiments/configs/bench_cpu.py", "--rounds", "2", "--batches", "2", *sets)


def test_bfloat16_benchmark_runs_both_models(bf16_record):
    """The Flax-examples baseline runs in bfloat16 too (it crashed in nn.scan: float32 carry in,
    bfloat16 out), and the record reports both sides."""
    r = bf16_record
    assert r["dtype"] == "bfloat16"
    assert set(r["models"]) == {"s2s_jax", "flax_examples"}
    for m in r["models"].values():
        assert m["target_tokens_per_s"]["median"] > 0
        assert np.isfinite(m["first_loss"]) and np.isfinite(m["last_loss"])
        assert 0 < m["mfu_measured"] and m["mfu_datasheet"] is None  # CPU: no datasheet peak
    assert r["speedup"]["median"] > 0


def test_cpu_record_keeps_its_format(bf16_record):
    """Fields are added, none renamed: readers of bench_cpu_*.json keep working."""
    r = bf16_record
    assert CPU_RECORD_KEYS <= set(r)
    for m in r["models"].values():
        assert CPU_MODEL_KEYS <= set(m)
    old = json.loads((ROOT / "experiments" / "results" / "bench_cpu_s5_run8.json").read_text())
    assert set(old) <= set(r) and set(old["models"]["s2s_jax"]) <= set(r["models"]["s2s_jax"])
    assert r["backend"] == "cpu" and r["sync"] == "step" and r["ceiling_kind"] == "float32"
    assert set(r["ceilings_tflop_per_s"]) == {"float32"}
    assert r["peak_bytes_in_use"] is None  # XLA:CPU reports no memory statistics
    assert r["models"]["s2s_jax"]["program_bytes"]["total"] > 0


@pytest.mark.slow
@pytest.mark.extended
def test_round_sync_and_token_batches():
    """--sync round (the accelerator default) and data.batch_tokens rows per bucket."""
    sets = [a for s in TOY + ["data.batch_tokens=512", "data.buckets=((14, 16), (30, 32))"]
            for a in ("--set", s)]
    r = _bench("--config", "experiments/configs/bench_cpu.py", "--rounds", "1", "--batches", "2", "--sync", "round",
               "--no-baseline", *sets)
    assert r["sync"] == "round" and set(r["models"]) == {"s2s_jax"}
    assert r["rows_per_bucket"] == [30, 15] and r["rows_per_batch"] == [15, 30]  # 512 // 17, 512 // 33
    m = r["models"]["s2s_jax"]
    assert m["step_s"]["median"] > 0 and np.isfinite(m["last_loss"])


def test_token_based_rows_follow_the_loader_rule():
    cfg = _load("experiments/configs/bench_gpu.py")
    assert benchmark.bucket_rows(cfg) == [963, 712, 496]  # 16384 // max(S, T + 1), one device
    assert benchmark.bucket_rows(cfg, devices=8) == [960, 712, 496]  # multiples of 8
    batches = benchmark.make_batches(cfg, 6)
    shapes = {(b["source"].shape, b["target_input"].shape[1]) for b in batches}
    assert shapes == {((963, 14), 16), ((712, 20), 22), ((496, 30), 32)}
    for b in batches:
        assert set(b) == set(MODEL_FIELDS)
        assert b["target_lengths"].max() <= b["target_input"].shape[1]
        assert (b["source"] < cfg.data.vocab_size).all() and (b["target_output"] < cfg.data.vocab_size).all()
        rows = np.arange(len(b["target_lengths"]))
        assert (b["target_input"][:, 0] == BOS_ID).all() and (b["target_output"][rows, b["target_lengths"] - 1]
                                                              == EOS_ID).all()
    # the padded target tokens of each batch are about the budget
    assert all(15_000 <= b["target_input"].size <= 16_384 for b in batches)


@pytest.mark.parametrize("name", ["bench_cpu", "bench_gpu"])
@pytest.mark.parametrize("devices", [1, 8])
def test_rows_per_bucket_are_the_loaders(name, devices):
    """The benchmark's batches have the rows and shapes the training loader gives the same data
    settings on `devices` simulated devices of one process (its batch_multiple)."""
    import s2s_jax.data as D

    cfg = _load(f"experiments/configs/{name}.py")
    # the loader on the config's batching settings (built-in task data: no corpus to prepare)
    task = dataclasses.replace(cfg.data, source="task", task="copy", task_train_size=500, task_eval_size=10)
    data = D.build_data(dataclasses.replace(cfg, data=task), batch_multiple=devices * cfg.train.grad_accum)
    assert benchmark.bucket_shapes(cfg) == data.shapes
    assert benchmark.bucket_rows(cfg, devices=devices) == data.rows
    made = {(b["source"].shape[0], b["source"].shape[1], b["target_input"].shape[1])
            for b in benchmark.make_batches(cfg, 4, devices=devices)}
    assert made <= {(r, s, t) for r, (s, t) in zip(data.rows, data.shapes)}


def test_synthetic_lengths_are_the_same_everywhere():
    """bench_gpu reads no corpus: the seeded Multi30k fit, identical on every machine."""
    cfg = _load("experiments/configs/bench_gpu.py")
    assert benchmark.lengths_source(cfg) == "lognormal-fit-multi30k"
    a, b = benchmark.make_batches(cfg, 3), benchmark.make_batches(cfg, 3)
    assert all(np.array_equal(x["source"], y["source"]) for x, y in zip(a, b))


def test_bench_gpu_configs_describe_the_issue_models():
    big = _load("experiments/configs/bench_gpu.py")
    m = big.model
    assert (m.hidden_dim, m.encoder_layers, m.decoder_layers, m.bidirectional) == (1024, 4, 4, True)
    assert (m.attention, m.input_feeding, m.dtype, big.data.vocab_size) == ("general", True, "bfloat16", 32000)
    assert big.data.batch_tokens == 16384
    small = _load("experiments/configs/bench_gpu_2x256.py")
    cpu = _load("experiments/configs/bench_cpu.py")
    assert small.data.batch_size == 1024 and small.data.batch_tokens == 0
    assert small.model == dataclasses.replace(cpu.model, dtype="bfloat16")
    # FLOPs per target token: ~590 M for bench_gpu, bench_cpu's ~26 M for the 2x256 model
    for cfg, lo, hi in ((big, 550, 620), (small, 24, 28)):
        bs = benchmark.make_batches(cfg, 4)
        tokens = sum(b["target_lengths"].sum() for b in bs)
        flops = 3 * sum(benchmark.forward_flops(cfg.model, cfg.data.vocab_size, b["source_lengths"],
                                                b["target_lengths"]) for b in bs)
        assert lo < flops / tokens / 1e6 < hi


@pytest.mark.parametrize("kind, entry", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"), ("NVIDIA H100 PCIe", None), ("NVIDIA H200", "NVIDIA H200"),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100"), ("TPU v4", "TPU v4"), ("TPU v5 lite", "TPU v5e"),
    ("TPU v5p", "TPU v5p"), ("TPU v6 lite", None), ("cpu", None)])
def test_datasheet_entries(kind, entry):
    assert benchmark.datasheet_entry(kind) == entry


def test_datasheet_peaks_and_compute_kinds():
    assert benchmark.datasheet_peak("NVIDIA H100 80GB HBM3", "bfloat16") == pytest.approx(989e12)
    assert benchmark.datasheet_peak("NVIDIA H200", "tensorfloat32") == pytest.approx(494.7e12)
    assert benchmark.datasheet_peak("TPU v5 lite", "bfloat16") == pytest.approx(197e12)
    assert benchmark.datasheet_peak("TPU v4", "tensorfloat32") is None
    assert benchmark.datasheet_peak("some new chip", "bfloat16") is None
    rep = lambda **kw: dataclasses.replace(config_lib.ModelConfig(), **kw)  # noqa: E731
    assert benchmark.compute_kind(rep(dtype="bfloat16"), "gpu") == "bfloat16"
    assert benchmark.compute_kind(rep(), "gpu") == "float32"  # auto = highest for float32
    assert benchmark.compute_kind(rep(matmul_precision="tensorfloat32"), "gpu") == "tensorfloat32"
    assert benchmark.compute_kind(rep(matmul_precision="default"), "tpu") == "bfloat16"
    assert benchmark.compute_kind(rep(matmul_precision="tensorfloat32"), "cpu") == "float32"


def test_matmul_ceiling_kinds_run_on_cpu():
    for kind in ("bfloat16", "tensorfloat32", "float32"):
        assert benchmark.matmul_ceiling(128, 1, kind, burst=2) > 0


def test_device_count_environments():
    cpu = {"backend": "cpu", "count": 1, "kind": "cpu", "version": "cpu"}
    env, simulated = benchmark.device_count_env(4, cpu)
    assert simulated and "--xla_force_host_platform_device_count=4" in env["XLA_FLAGS"]
    gpu = {"backend": "gpu", "count": 8, "kind": "NVIDIA H100 80GB HBM3", "version": "cuda 13"}
    env, simulated = benchmark.device_count_env(2, gpu)
    assert not simulated and env["CUDA_VISIBLE_DEVICES"] == "0,1"
    with pytest.raises(ValueError):
        benchmark.device_count_env(16, gpu)


@pytest.mark.slow
@pytest.mark.extended
def test_device_counts_on_a_cpu_only_host_are_simulated():
    sets = [a for s in TOY for a in ("--set", s)]
    r = _bench("--config", "experiments/configs/bench_cpu.py", "--devices", "1,2", "--rounds", "1", "--batches", "1",
               *sets)
    assert r["backend"] == "cpu" and r["simulated_devices"] is True
    assert set(r["target_tokens_per_s"]) == {"1", "2"} and all(v > 0 for v in r["target_tokens_per_s"].values())
    assert r["records"]["2"]["devices"] == 2 and r["records"]["2"]["parallel"] == "shard_map"
