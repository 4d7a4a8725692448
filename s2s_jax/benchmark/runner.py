"""Subprocess orchestration for `--devices 1,2,4,8`: one child benchmark per device count, each
started with the devices it may see (fixed before jax is imported), and the combined record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


_PROBE = ("import json, jax; d = jax.devices(); print(json.dumps({'backend': jax.default_backend(), "
          "'count': len(d), 'kind': str(d[0].device_kind), "
          "'version': str(getattr(getattr(d[0], 'client', None), 'platform_version', ''))}))")


def probe_devices() -> dict:
    """{backend, count, kind, version} of a fresh process's jax (this process keeps jax unstarted,
    so the children get the devices to themselves)."""
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


def run_device_counts(args, config) -> tuple[int, dict | None]:
    """One child process per device count (the count is fixed before jax is imported): (exit
    code, the combined record; None when a count is impossible or a child failed)."""
    counts = [int(n) for n in args.devices.split(",")]
    probe = probe_devices()
    records = {}
    simulated = probe["backend"] == "cpu"
    for n in counts:
        try:
            env, simulated = device_count_env(n, probe)
        except ValueError as e:
            print(f"[benchmark] {e}", file=sys.stderr)
            return 2, None
        cmd = [sys.executable, "-m", "s2s_jax", "benchmark", "--config", args.config, "--rounds",
               str(args.rounds), "--batches", str(args.batches), "--sync", args.sync, "--device-count-child"]
        cmd += [a for o in args.overrides for a in ("--set", o)]
        what = "simulated CPU" if simulated else probe["backend"]
        print(f"[benchmark] {n} {what} device(s)...", file=sys.stderr)
        child = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        if child.returncode != 0:
            print(f"[benchmark] the {n}-device run failed (exit {child.returncode})", file=sys.stderr)
            return child.returncode, None
        records[str(n)] = json.loads(child.stdout.strip().splitlines()[-1])
    tps = {n: r["models"]["s2s_jax"]["target_tokens_per_s"] for n, r in records.items()}
    record = {"benchmark": "train_step_device_counts", "config": config.name,
              "parallel": config.train.parallel, "batch_size": config.data.batch_size,
              "cpu_count": os.cpu_count(), "target_tokens_per_s": {n: t["median"] for n, t in tps.items()},
              "target_tokens_per_s_spread": tps, "records": records,
              "backend": probe["backend"], "device": probe["kind"], "simulated_devices": simulated,
              "batch_tokens": config.data.batch_tokens}
    return 0, record
