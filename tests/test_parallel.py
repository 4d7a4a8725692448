"""Data parallelism (s2s_jax/parallel.py): sharded steps equal one device, across processes too,
and checkpoints move between device counts.

A process's CPU device count is fixed before jax is imported, so every device count runs in its
own worker process (tests/_parallel_worker.py: the real data loader, Parallel, steps.train_step
and Checkpoints on the tiny model, dropout on). The slow tests cost about a minute each on two
cores, mostly compiling the train step once per mode and process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from s2s_jax.config import ConfigError
from s2s_jax.parallel import Parallel, distributed_settings
from tests._parallel_worker import tiny_config

WORKER = Path(__file__).with_name("_parallel_worker.py")
TOL = 1e-5  # float32; the observed differences are ~2e-6 (psum of per-device sums reorders adds)


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS",
                                                           "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _start(devices: int, out: Path, runs: list[str], *extra: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(WORKER), "--devices", str(devices), "--out", str(out), "--steps", "5"]
    cmd += [a for r in runs for a in ("--run", r)] + list(extra)
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=_env(),
                            cwd=WORKER.parent.parent)


def _wait(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 600) -> None:
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"worker failed (exit {p.returncode}):\n{log.read_text()[-4000:]}"


def _run(tmp: Path, devices: int, runs: list[str], tag: str) -> dict[str, np.ndarray]:
    out, log = tmp / f"{tag}.npz", tmp / f"{tag}.log"
    _wait([_start(devices, out, runs, log=log)], [log])
    return dict(np.load(out))


def _params(results: dict, name: str) -> dict[str, np.ndarray]:
    params = {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith(f"{name}/") and "/_" not in k}
    assert params, f"no parameters recorded for run {name!r}"
    return params


def _assert_same(results: dict, name: str, ref_results: dict, ref: str) -> None:
    a, b = _params(results, name), _params(ref_results, ref)
    assert a.keys() == b.keys()
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst <= TOL, f"{name} differs from {ref} by up to {worst:.3g} (> {TOL})"
    assert int(results[f"{name}/_step"]) == int(ref_results[f"{ref}/_step"])
    np.testing.assert_allclose(results[f"{name}/_losses"], ref_results[f"{ref}/_losses"], atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    """One 8-device process: 5 steps under none (1 device), shard_map and pmap; checkpoints of
    the 1-device and the 8-device run; the 1-device checkpoint continued on 8 devices."""
    tmp = tmp_path_factory.mktemp("eight")
    ckpt1, ckpt8 = tmp / "ckpt_1device", tmp / "ckpt_8devices"
    results = _run(tmp, 8, [f"none:save={ckpt1}:then=5", f"shard_map:save={ckpt8}", "pmap",
                            f"shard_map:restore={ckpt1}:name=restored_from_1"], "eight")
    return tmp, results, ckpt8


@pytest.mark.slow
def test_shard_map_and_pmap_on_8_devices_equal_one_device_with_dropout(eight_devices):
    _, results, _ = eight_devices
    assert tiny_config().model.dropout > 0
    _assert_same(results, "shard_map", results, "none")
    _assert_same(results, "pmap", results, "none")


@pytest.mark.slow
def test_checkpoint_from_8_devices_continues_on_1_and_back(eight_devices):
    tmp, results, ckpt8 = eight_devices
    # 1 device -> 8 devices: step 5 of the 1-device run, 5 more steps under shard_map on 8.
    _assert_same(results, "restored_from_1", results, "none+5")
    # 8 devices -> 1 device, in a process that has only one device.
    one = _run(tmp, 1, [f"shard_map:restore={ckpt8}:name=restored_from_8"], "one")
    _assert_same(one, "restored_from_8", results, "none+5")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_4_devices(tmp_path):
    """jax.distributed on loopback, gloo collectives, 2 local devices per process; each process
    feeds its own slice of every batch; the checkpoint they write continues in one process."""
    ckpt = tmp_path / "ckpt_2processes"
    coordinator = f"127.0.0.1:{_free_port()}"
    procs, logs = [], []
    for i in range(2):
        logs.append(tmp_path / f"process{i}.log")
        procs.append(_start(2, tmp_path / "multi{process}.npz", [f"shard_map:save={ckpt}"],
                            "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(i),
                            log=logs[-1]))
    _wait(procs, logs)
    four = _run(tmp_path, 4, ["shard_map:then=5", f"shard_map:restore={ckpt}:name=restored"], "four")
    for i in range(2):
        multi = dict(np.load(tmp_path / f"multi{i}.npz"))
        _assert_same(multi, "shard_map", four, "shard_map")
    assert "4 device(s) (shard_map; 2 process(es), 2 local); global batch 16 sentences, per device 4" \
        in logs[0].read_text()
    _assert_same(four, "restored", four, "shard_map+5")


# -- fast checks in this process (whatever devices it has) --------------------------------------

def _with_train(**fields):
    import dataclasses

    c = tiny_config()
    return c.replace(train=dataclasses.replace(c.train, **fields))


def test_distributed_settings_from_config_and_environment(monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    assert distributed_settings(_with_train()) is None
    assert distributed_settings(_with_train(coordinator_address="10.0.0.1:1234", num_processes=4,
                                            process_id=3)) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert distributed_settings(_with_train(coordinator_address="auto")) == {}
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:999")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert distributed_settings(_with_train()) == {"coordinator_address": "host0:999", "num_processes": 2,
                                                   "process_id": 1}
    assert distributed_settings(_with_train(process_id=0))["process_id"] == 0  # config wins
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(ConfigError, match="train.process_id"):
        distributed_settings(_with_train())


def test_parallel_reports_global_and_per_device_batch():
    p = Parallel("none")
    assert p.num_devices == 1 and p.local_devices == 1
    assert p.describe([16, 16]).endswith("global batch 16 sentences, per device 16")
    assert p.describe([32, 64], grad_accum=2).endswith(
        "global batch 32-64 sentences, per device 32-64 in 2 micro-batches of 16-32")
    with pytest.raises(ConfigError, match="train.parallel"):
        Parallel("spmd")
