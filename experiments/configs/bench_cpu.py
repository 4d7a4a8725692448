"""Training-throughput benchmark on CPU: the Multi30k-sized Luong model, fast vs the Flax-examples way.

Model (issue #3): bidirectional 2-layer LSTM encoder (128 units per direction, 256 in total),
2-layer 256-unit LSTM decoder, 256-dim embeddings, `general` attention with input feeding,
source and target vocabularies of 8,000, no dropout (the benchmark times the model, not the RNG).
Batches: 64 sentences of Multi30k-like lengths (source ~13, target ~13.4 with EOS; taken from
../shared/data/multi30k/tok when present, else from a fitted log-normal), grouped into the three
bucket shapes below (68 % / 27 % / 6 % of sentences), random token ids.

Command (from the repository root):

    python -m s2s_jax benchmark --config experiments/configs/bench_cpu.py

Hardware: the 2-core development machine; one run takes ~1.5–2 minutes (compiles 3 shapes for
each of the two models, then 5 interleaved timed rounds).
Result: one JSON record with `speedup` (fast / baseline training throughput; the issue's target
is 1.6). Measured on the 2-core AVX-512 dev CPU: median 1.64 over eight runs of commit 65712fe on
2026-11-30 (1.60-1.80; 1.63-1.64 in the five on a quiet machine, experiments/results/
bench_cpu_s5_run*.json); earlier records are bench_cpu_s4_run*.json (1.58, earlier that day),
bench_cpu_s3_run*.json (1.35), bench_cpu_s3_default_malloc_run*.json (glibc malloc as it comes),
bench_cpu_s2_run*.json (1.49) and bench_cpu_run*.json.
`--data-only` instead measures the Grain loader on the real corpus (prepares SentencePiece once).
"""

import dataclasses
from pathlib import Path

from s2s_jax.config import Config, DataConfig, load_module

recipes = load_module(Path(__file__).with_name("_recipes.py"))


def get_config() -> Config:
    return Config(
        name="bench_cpu",
        data=DataConfig(
            source="text",
            dir="../shared/data/multi30k",  # lengths for the synthetic batches; corpus for --data-only
            src_lang="en",
            tgt_lang="de",
            vocab_size=8000,
            joint_vocab=True,
            max_source_length=30,
            max_target_length=31,
            buckets=((14, 16), (20, 22), (30, 32)),  # (source, target + 1)
            max_dropped_fraction=0.02,  # these lengths drop 495 of Multi30k's 29,000 pairs (1.7 %)
            batch_size=64,
        ),
        model=dataclasses.replace(
            recipes.luong_2x256(),
            # "last", unlike the translation recipe's "dense", on purpose: the Flax-examples baseline
            # this benchmark times the model against starts its decoder from the encoder's last
            # states (no bridge layer), so both sides compute the same function.
            bridge="last",
            dropout=0.0,  # the benchmark times the model, not the RNG
            dtype="float32",
        ),
        train=recipes.adam(),
    )
