"""Training-throughput benchmark on one accelerator: the 2×256 bench_cpu model, 1,024 sentences a batch.

Model: exactly bench_cpu's (bidirectional 2-layer LSTM encoder of 2 × 128 units, 2-layer 256-unit
LSTM decoder, 256-dim embeddings, `general` attention with input feeding, 8,000-entry
vocabularies, no dropout), in bfloat16 (float32 parameters); `--set model.dtype=float32` for
bench_cpu's precision. Batches: 1,024 sentences (16× bench_cpu's 64, enough rows to fill a GPU's
matmuls), bench_cpu's three buckets, synthetic ids with the seeded Multi30k-fitted lengths
(`data.dir` empty, source "task": nothing is read, the same batches on every machine).

Command (from the repository root, on the GPU/TPU host):

    python -m s2s_jax benchmark --config experiments/configs/bench_gpu_2x256.py
    python -m s2s_jax benchmark --config experiments/configs/bench_gpu_2x256.py --set model.dtype=float32

Hardware: one NVIDIA H100/H200 (or a TPU chip). Expected result: not yet measured (nothing has
run on an accelerator yet). A model this small is latency-bound on a GPU (each of the ~60
sequential time steps of a batch is a few [1024, 256] × [256, 1024] matmuls), so its MFU will be
far below bench_gpu's; the figure of interest is `speedup` over the Flax-examples baseline.
"""

import dataclasses
from pathlib import Path

from s2s_jax.config import Config, load


def get_config() -> Config:
    base = load(Path(__file__).with_name("bench_cpu.py"))
    return dataclasses.replace(
        base, name="bench_gpu_2x256",
        data=dataclasses.replace(base.data, source="task", dir="", batch_size=1024, batch_tokens=0),
        model=dataclasses.replace(base.model, dtype="bfloat16"))
