"""experiments/device_check.py --smoke: every part of the accelerator check runs on the CPU.

The script is written for a GPU host that has jax, flax, optax and orbax but no
tensorflow-datasets, grain or array_record (and maybe no flatbuffers); the run here makes those
unimportable (stub packages first on PYTHONPATH, inherited by the benchmark subprocesses) to
prove it needs none of them.
About 1-2 minutes on two cores, most of it compiling the toy models.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "device_check.py"
# not on the GPU machine; flatbuffers (jax.export's serialization) probably not either: the export
# check then runs the programs unserialized (the serialized path is tests/test_export.py's)
BLOCKED = ("grain", "tensorflow_datasets", "array_record", "tensorflow", "flatbuffers")
PARTS = ("environment", "ceilings", "correctness", "plumbing", "throughput")
RUN_VARIANTS = ("bench_gpu_bf16", "bench_gpu_bf16_cmdbuf_while")

pytestmark = [pytest.mark.slow, pytest.mark.extended]  # run by make test-all and on a lent GPU, not CI


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from tests._helpers import run_env

    tmp = tmp_path_factory.mktemp("device_check")
    stubs = tmp / "stubs"
    for name in BLOCKED:
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    env = run_env()
    env["PYTHONPATH"] = os.pathsep.join([str(stubs), str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("XLA_FLAGS", None)
    out = tmp / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    return records, proc.stdout, out


def _small(x, tol):
    return isinstance(x, float) and math.isfinite(x) and 0.0 <= x <= tol


def test_every_part_is_recorded_and_ok(smoke):
    records, stdout, out = smoke
    for part in PARTS:
        assert part in records, f"{part}.json missing"
        assert records[part]["ok"] is True, records[part].get("error") or records[part]
        assert records[part]["elapsed_s"] >= 0
    for v in RUN_VARIANTS:
        assert records[f"throughput_{v}"]["ok"] is True
    assert (out / "summary.txt").is_file()
    for part in PARTS[1:]:
        assert part in stdout  # the table
    assert records["environment"]["smoke"] is True and records["environment"]["backend"] == "cpu"


def test_ceilings_are_measured(smoke):
    c = smoke[0]["ceilings"]
    assert set(c["tflop_per_s"]) == {"bfloat16", "tensorfloat32", "float32"}
    assert all(v > 0 for v in c["tflop_per_s"].values())
    assert c["datasheet_entry"] is None and all(v is None for v in c["datasheet_peak_tflop_per_s"].values())


def test_correctness_differences_are_small_real_numbers(smoke):
    cor = smoke[0]["correctness"]
    assert set(cor["precisions"]) == {"highest", "tensorfloat32", "bfloat16"}
    assert cor["kernels"] == {"cpu": "cpu", "accelerator": "portable"}
    for name, r in cor["precisions"].items():
        tol = 1e-4 if name != "bfloat16" else 2e-2  # bf16: Adam turns rounding into ~lr-sized steps
        assert _small(r["loss_max_abs_diff"], tol), (name, r)
        assert _small(r["param_max_abs_diff"], tol), (name, r)
        assert len(r["cpu_losses"]) == len(r["accelerator_losses"]) == cor["steps"] == 5
        assert all(math.isfinite(x) for x in r["accelerator_losses"])
        # the CPU is deterministic: the repeated run is bitwise the same
        assert r["repeat_bitwise_equal"] is True and r["repeat_param_max_abs_diff"] == 0.0
    # two different kernel sets: the float32 difference is real, not an identical computation
    assert cor["precisions"]["highest"]["param_max_abs_diff"] > 0


def test_plumbing_equalities_hold(smoke):
    pl = smoke[0]["plumbing"]
    for mode in ("shard_map", "pmap"):
        r = pl["parallel"][mode]
        assert r["equal_to_none"] is True and r["devices"] == 1
        assert _small(r["param_max_abs_diff_vs_none"], 1e-5)
    assert pl["checkpoint"]["bitwise_equal"] is True and pl["checkpoint"]["restored_step"] == 7
    assert pl["checkpoint"]["on_accelerator"] is True
    ex = pl["export"]
    assert "cuda" in ex["platforms"] and "cpu" in ex["platforms"]
    assert ex["serialized"] is False and "flatbuffers" in ex["note"]
    assert set(ex["programs"]) == {"encode", "greedy", "beam_2"}
    assert all("cuda" in p["platforms"] for p in ex["programs"].values())
    assert set(ex["step_programs"]) == {"projection_table", "step", "step_table"}  # bundle format 2
    assert all({"cuda", "cpu"} <= set(p["platforms"]) for p in ex["step_programs"].values())
    assert ex["programs"]["greedy"]["tokens_equal"] is True and ex["programs"]["beam_2"]["tokens_equal"] is True


def test_throughput_runs_the_model_pair_and_records_the_rest(smoke):
    records = smoke[0]
    th = records["throughput"]
    pair = th["variants"]["bench_gpu_bf16"]
    assert pair["s2s_jax_tokens_per_s"] > 0 and pair["baseline_tokens_per_s"] > 0 and pair["speedup"] > 0
    rec = records["throughput_bench_gpu_bf16"]["record"]
    assert rec["dtype"] == "bfloat16" and set(rec["models"]) == {"s2s_jax", "flax_examples"}
    assert rec["batch_tokens"] > 0 and rec["lengths_source"] == "lognormal-fit-multi30k"
    flags = records["throughput_bench_gpu_bf16_cmdbuf_while"]
    assert "+WHILE,+CONDITIONAL" in flags["record"]["xla_flags"]
    assert set(flags["record"]["models"]) == {"s2s_jax"}
    # everything else is named, with the reason it did not run here
    assert len(th["skipped"]) >= 8 and all("smoke" in why for why in th["skipped"].values())


def test_the_budget_skips_throughput_variants_and_the_records_say_so(tmp_path):
    from tests._helpers import run_env

    env = run_env()
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), "--parts", "throughput",
                           "--budget-s", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    th = json.loads((tmp_path / "throughput.json").read_text())
    assert th["variants"] == {} and th["ok"] is False
    assert th["skipped"]["bench_gpu_bf16"].startswith("time budget")
    assert not (tmp_path / "correctness.json").exists()  # --parts
    assert json.loads((tmp_path / "environment.json").read_text())["ok"] is True
    assert "skipped: time budget" in proc.stdout
