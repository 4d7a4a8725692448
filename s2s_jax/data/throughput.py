"""Loader throughput: target tokens per second of a config's training iterator (`benchmark --data-only`)."""

from __future__ import annotations

import time

import numpy as np

from s2s_jax.data.corpus import build_data


def loader_throughput(config, seconds: float = 10.0, *, windows: int = 5, warmup_batches: int = 3) -> dict:
    """Target tokens per second of the train iterator on `config` (median of `windows` timed
    windows of seconds/windows each), after preparing (timed separately) and a short warm-up.

    Counts real target tokens (sum of target_lengths, i.e. len(y)+1), not padding. Also
    reports the plan's padding efficiency (real / padded positions over an epoch, source and
    target: Data.stats["padding_efficiency"]) and the measured target padding fraction.
    """
    t0 = time.perf_counter()
    data = build_data(config)
    setup_s = time.perf_counter() - t0
    it = data.train_batches()
    for _ in range(warmup_batches):
        next(it)
    per_window = seconds / windows
    rates, batch_rates, pad_fracs = [], [], []
    for _ in range(windows):
        tokens = batches = padded = 0
        start = time.perf_counter()
        while True:
            b = next(it)
            tokens += int(b["target_lengths"].sum())
            padded += b["target_output"].size
            batches += 1
            elapsed = time.perf_counter() - start
            if elapsed >= per_window:
                break
        rates.append(tokens / elapsed)
        batch_rates.append(batches / elapsed)
        pad_fracs.append(1.0 - tokens / max(1, padded))
    return {
        "target_tokens_per_second": float(np.median(rates)),
        "batches_per_second": float(np.median(batch_rates)),
        "window_tokens_per_second": [float(r) for r in rates],
        "target_padding_fraction": float(np.median(pad_fracs)),
        "setup_seconds": setup_s,
        "train_examples": data.stats["examples"][config.data.train_split],
        "batches_per_epoch": data.stats["train_batches_per_epoch"],
        "buckets": data.stats["buckets"],
        "bucket_rows": data.stats["bucket_rows"],
        "padding_efficiency": data.stats["padding_efficiency"],
        "pool_batches": config.data.pool_batches,
        "prefetch": config.data.prefetch,
        "worker_count": config.data.worker_count,
    }
