"""Training-throughput benchmark on one accelerator: the bench_cpu model family at GPU size.

Model: bidirectional 4-layer LSTM encoder (512 units per direction, 1024 in total), 4-layer
1024-unit LSTM decoder, 1024-dim embeddings, Luong `general` attention with input feeding,
source and target vocabularies of 32,000, bfloat16 compute (float32 parameters, optimizer state,
softmax and loss), no dropout (the benchmark times the model, not the RNG). About 590 MFLOP of
matmuls per target token for a training step (3 × forward; `mflop_per_target_token` in the record).
Batches: token-based, data.batch_tokens = 16,384 per batch, by the data loader's own rule
(rows × max(S, T + 1), OpenNMT-py's token rule, rounded down to a multiple of the devices):
963 / 712 / 496 sentences in the three buckets below on one device (960 / 712 / 496 on 8),
~15.4-15.9k padded target positions per batch.
Synthetic ids, uniform over the vocabulary, with real sentence lengths: `data.dir` is empty, so
the benchmark draws the seeded log-normal fitted to Multi30k's tokenised lengths (source ~13,
target ~13.4 with EOS), the same numbers on every machine (`lengths_source` in the record).

Command (from the repository root, on the GPU/TPU host):

    python -m s2s_jax benchmark --config experiments/configs/bench_gpu.py
    python -m s2s_jax benchmark --config experiments/configs/bench_gpu.py --set model.dtype=float32
    python -m s2s_jax benchmark --config experiments/configs/bench_gpu.py --devices 1,2,4,8   # real devices
    python experiments/device_check.py --out experiments/results/device_check_<gpu>   # everything at once

The 2×256 bench_cpu model at 1,024 sentences per batch is experiments/configs/bench_gpu_2x256.py.

Hardware: one NVIDIA H100/H200 (or a TPU chip). Expected result: not yet measured — no line of
this project has run on an accelerator yet. The issue's aim (#15) is >= 35 % bfloat16 MFU
against the measured bfloat16 matmul ceiling (`models.s2s_jax.mfu_measured`) and >= 2x the
Flax-examples baseline's target tokens/s (`speedup`) on the same GPU.
"""

import dataclasses
from pathlib import Path

from s2s_jax.config import Config, load


def get_config() -> Config:
    # bench_cpu's data, model family and optimiser; the sizes, batches and dtype below are this file's
    bench_cpu = load(Path(__file__).with_name("bench_cpu.py"))
    return dataclasses.replace(
        bench_cpu,
        name="bench_gpu",
        data=dataclasses.replace(
            bench_cpu.data,
            # no corpus: the benchmark makes synthetic batches with its seeded Multi30k-fitted
            # lengths (data.dir empty), identical on every machine; nothing is prepared or read
            source="task",
            dir="",
            vocab_size=32000,
            batch_tokens=16384,
            batch_size=1024,  # unused while batch_tokens > 0
        ),
        model=dataclasses.replace(
            bench_cpu.model,
            source_embed_dim=1024,
            target_embed_dim=1024,
            hidden_dim=1024,
            encoder_layers=4,
            decoder_layers=4,
            dtype="bfloat16",
        ),
    )
