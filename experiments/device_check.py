"""One run that answers what issue 15 asks of an accelerator: ceilings, correctness, plumbing, throughput.

    python experiments/device_check.py --out experiments/results/device_check_h100     # on the GPU host
    python experiments/device_check.py --out /tmp/dc --smoke                           # CPU, tiny, ~1-2 min (CI)

At most 8 minutes on one GPU: `--budget-s` (default 420 s of wall time) decides which throughput
variants start; one already running may finish up to GRACE_S = 60 s past it, then it is killed.
Each part writes its JSON record into `--out` as soon as it finishes (one file per part, flushed
and fsynced, so a run cut short keeps what finished) and catches its own exceptions (a failing
part records `"ok": false` and the error, and the next part runs). A table of every record is
printed at the end (`summary.txt` in `--out` too).

Parts (files):
  environment.json   jax / jaxlib versions, devices, XLA_FLAGS in effect (train.deterministic's)
  ceilings.json      [8192²] matmul TFLOP/s on the accelerator: bfloat16, TF32, true float32,
                     with the datasheet dense peak for the device (null when unknown)
  correctness.json   5 train steps (bench_cpu's 2×256 model, one 64×30×32 batch shape) on the CPU
                     (model.kernels cpu, what auto picks there) and on the accelerator (portable)
                     from the same initial state and batches, for each precision: highest
                     (float32), tensorfloat32, bfloat16 compute. Per precision: the per-step mean losses, their max abs/rel
                     difference, the parameters' max abs difference (and relative to the largest
                     parameter), and the accelerator run repeated from the same state: bitwise
                     equal under train.deterministic (the XLA flags in environment.json)?
  plumbing.json      (a) parallel: 3 steps under train.parallel shard_map and pmap over the
                     accelerator's devices equal "none" (max abs diff, bitwise); (b) an Orbax save
                     and restore (s2s_jax.checkpoint.Checkpoints) of the accelerator state, bitwise;
                     (c) export: the bundle programs (encode, greedy, beam 2) lowered for cpu and
                     the accelerator platform, run on both, outputs compared (without flatbuffers,
                     which jax's serialization needs and jax does not install, the programs are
                     checked unserialized and the record says so)
  throughput_<name>.json  one `python -m s2s_jax benchmark` subprocess per variant (XLA flags are
                     read when a backend starts, so a flag set needs its own process): bench_gpu
                     and bench_gpu_2x256, s2s_jax vs the Flax-examples baseline, bfloat16 and
                     float32; then s2s_jax alone on bench_gpu bfloat16 with model.unroll 2 / 4,
                     model.loss_chunk 8, CUDA-graph command buffers extended to WHILE and
                     CONDITIONAL (and with loop unrolling in the graph), model.input_feeding off,
                     model.fused_decoder false, model.kernels cpu, train.deterministic false (the
                     cost of --xla_gpu_deterministic_ops). Variants run in that order
                     while the budget lasts; the rest are recorded as skipped.
  throughput.json    the variants' headline figures in one table

--smoke: every part on the CPU with tiny shapes (the "accelerator" is then the CPU itself, so the
correctness differences are those between the cpu and portable kernel sets); two throughput
variants (the model pair, one XLA-flag subprocess), the rest recorded as skipped. It is what
tests/test_device_check.py runs in CI, so the script is known to work before a device runs it.
Needs jax, flax, optax, orbax and numpy only (no tensorflow-datasets, grain, array_record): the
batches are synthetic, made in memory.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

STEPS = 5  # correctness: train steps per run
# correctness: the CPU reference runs what model.kernels=auto gives there (the tuned cpu set), the
# accelerator the portable set (auto's choice off CPU; also under --smoke, where the accelerator
# is the CPU, so the smoke differences are real: two kernel sets, same math)
CPU_KERNELS, ACCEL_KERNELS = "cpu", "portable"
PARALLEL_STEPS = 3
# float32 (highest) on two backends: the same math in a different order; measured tolerances of
# the CPU-only suite are ~1e-6. tf32 / bf16 differences are recorded, not judged.
TOLERANCE = {"highest": 1e-4}
PARALLEL_TOL = 1e-5
MIN_VARIANT_S = {True: 0.0, False: 60.0}  # smoke / accelerator: skip a variant with less time left
GRACE_S = 60.0  # a throughput variant started inside the budget may finish this much after it


# -- records ----------------------------------------------------------------------------------

class Records:
    """One JSON file per part in `out`, written (flushed, fsynced) the moment the part ends."""

    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.parts: dict[str, dict] = {}

    def write(self, name: str, record: dict) -> None:
        self.parts[name] = record
        path = self.out / f"{name}.json"
        tmp = path.with_suffix(".json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        print(f"[device_check] wrote {path.name} (ok={record.get('ok')}, {record.get('elapsed_s')}s)",
              file=sys.stderr, flush=True)


def _json_default(x):
    import numpy as np

    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def run_part(records: Records, name: str, fn, *args) -> dict:
    """fn(*args) -> dict, recorded with ok / elapsed_s, or the exception recorded as the part."""
    t0 = time.perf_counter()
    try:
        record = dict(fn(*args))
        record.setdefault("ok", True)
    except Exception as e:  # noqa: BLE001 - a failing part must not lose the others
        record = {"ok": False, "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()[-4000:]}
    record = {"part": name, **record, "elapsed_s": round(time.perf_counter() - t0, 2)}
    records.write(name, record)
    return record


# -- shared setup -----------------------------------------------------------------------------

def small_config(smoke: bool, **model):
    """The correctness / plumbing model: bench_cpu's 2×256 (smoke: 1×32), 64 (8) sentences of one
    bucket shape (30, 32), portable kernels, float32 at the highest precision unless overridden."""
    import dataclasses

    from s2s_jax import config as config_lib

    base = config_lib.load(str(REPO / "experiments" / "configs" / "bench_cpu.py"))
    data = dataclasses.replace(base.data, source="task", dir="", buckets=((30, 32),),
                               batch_size=8 if smoke else 64, batch_tokens=0)
    m = dict(kernels=ACCEL_KERNELS, matmul_precision="highest", dtype="float32")
    if smoke:
        m.update(hidden_dim=32, source_embed_dim=16, target_embed_dim=16, encoder_layers=1,
                 decoder_layers=1)
        data = dataclasses.replace(data, vocab_size=64)
    m.update(model)
    cfg = dataclasses.replace(base, name="device_check", data=data,
                              model=dataclasses.replace(base.model, **m))
    return config_lib.validate(cfg)


def host_tree(tree):
    import jax
    import numpy as np

    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def tree_max_abs_diff(a, b) -> float:
    import jax
    import numpy as np

    diffs = jax.tree.leaves(jax.tree.map(
        lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) if np.size(x) else 0.0,
        a, b))
    return max(diffs) if diffs else 0.0


def tree_fraction_over(a, b, tol: float) -> float:
    """Fraction of all elements where |a - b| > tol."""
    import jax
    import numpy as np

    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    over = sum(int(np.sum(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)) > tol)) for x, y in pairs)
    return over / max(1, sum(int(np.size(x)) for x, _ in pairs))


def tree_max_abs(a) -> float:
    import jax
    import numpy as np

    return max(float(np.max(np.abs(np.asarray(x, np.float64)))) for x in jax.tree.leaves(a) if np.size(x))


def tree_bitwise_equal(a, b) -> bool:
    import jax
    import numpy as np

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def accelerator_platform(device) -> str:
    """The jax.export platform name of a device: cpu | cuda | rocm | tpu."""
    p = device.platform
    if p == "gpu":
        version = str(getattr(getattr(device, "client", None), "platform_version", "")).lower()
        return "rocm" if "rocm" in version else "cuda"
    return p


def preflight(xla_flags: str) -> str | None:
    """None if a fresh process starts its backend with these XLA_FLAGS, else its stderr's tail."""
    env = dict(os.environ, XLA_FLAGS=xla_flags)
    try:
        p = subprocess.run([sys.executable, "-c", "import jax; jax.devices(); jax.numpy.ones(2).block_until_ready()"],
                           env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return "timed out starting the backend"
    return None if p.returncode == 0 else (p.stderr or f"exit {p.returncode}")[-2000:]


# -- parts ------------------------------------------------------------------------------------

def part_environment(ctx) -> dict:
    import jax
    import jaxlib

    accel, cpu = ctx["accel"], ctx["cpu"]
    out = {"smoke": ctx["smoke"], "python": sys.version.split()[0], "jax": jax.__version__,
           "jaxlib": getattr(jaxlib, "__version__", None), "backend": jax.default_backend(),
           "devices": [str(d) for d in jax.devices()], "device_kind": str(accel.device_kind),
           "platform_version": str(getattr(getattr(accel, "client", None), "platform_version", "")),
           "cpu_device": str(cpu),
           "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "deterministic_flags": ctx["deterministic_flags"],
           "deterministic_flags_rejected": ctx["deterministic_rejected"],
           "preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
           "budget_s": ctx["budget_s"]}
    for name in ("flax", "optax", "orbax.checkpoint", "numpy"):
        try:
            module = __import__(name, fromlist=["_"])
            out[name] = getattr(module, "__version__", None)
        except ImportError:
            out[name] = None
    try:
        from s2s_jax.benchmark import peak_bytes_in_use
        out["memory_stats_available"] = peak_bytes_in_use(accel) is not None
    except Exception as e:  # noqa: BLE001
        out["memory_stats_available"] = f"error: {e}"
    return out


def part_ceilings(ctx) -> dict:
    import jax

    from s2s_jax import benchmark

    n, reps, burst = (256, 2, 2) if ctx["smoke"] else (8192, 3, 10)
    kind = str(ctx["accel"].device_kind)
    out = {"n": n, "device_kind": kind, "datasheet_entry": benchmark.datasheet_entry(kind),
           "tflop_per_s": {}, "datasheet_peak_tflop_per_s": {}, "fraction_of_datasheet": {}}
    with jax.default_device(ctx["accel"]):
        for k in ("bfloat16", "tensorfloat32", "float32"):
            flops = benchmark.matmul_ceiling(n, reps, k, burst=burst)
            peak = benchmark.datasheet_peak(kind, k)
            out["tflop_per_s"][k] = round(flops / 1e12, 4)
            out["datasheet_peak_tflop_per_s"][k] = None if peak is None else round(peak / 1e12, 1)
            out["fraction_of_datasheet"][k] = None if peak is None else round(flops / peak, 3)
    return out


class StepRunner:
    """Compiled train steps per (device, config); runs STEPS steps from a given host state."""

    def __init__(self):
        self._jitted = {}

    def run(self, cfg, model, host_state, batches, device, steps: int = STEPS):
        import jax

        from s2s_jax.training import steps as steps_lib

        key = (cfg.model, cfg.train)
        if key not in self._jitted:
            self._jitted[key] = jax.jit(functools.partial(steps_lib.train_step, model=model, config=cfg))
        fn = self._jitted[key]
        state = jax.device_put(host_state, device)
        dev_batches = [jax.device_put(b, device) for b in batches]
        losses = []
        for i in range(steps):
            state, metrics = fn(state, dev_batches[i % len(dev_batches)])
            losses.append(float(metrics["loss"]) / max(float(metrics["weight"]), 1.0))
        return host_tree(state.params), losses


def part_correctness(ctx) -> dict:
    import dataclasses

    import jax
    import numpy as np

    from s2s_jax import benchmark
    from s2s_jax.train_state import create_state, make_model

    accel, cpu, smoke = ctx["accel"], ctx["cpu"], ctx["smoke"]
    base = small_config(smoke)
    batches = benchmark.make_batches(base, STEPS, seed=1)
    V = base.data.vocab_size
    runner = StepRunner()
    with jax.default_device(cpu):
        host_state = host_tree(create_state(base, make_model(base, V, V)))
    variants = {"highest": dict(matmul_precision="highest"),
                "tensorfloat32": dict(matmul_precision="tensorfloat32"),
                "bfloat16": dict(dtype="bfloat16", matmul_precision="auto")}
    out = {"model": {"hidden_dim": base.model.hidden_dim, "layers": base.model.encoder_layers,
                     "vocab": V, "batch": list(batches[0]["source"].shape)},
           "kernels": {"cpu": CPU_KERNELS, "accelerator": ACCEL_KERNELS},
           "steps": STEPS, "cpu_device": str(cpu), "accelerator_device": str(accel), "precisions": {}}
    cpu_ref = {}
    for name, over in variants.items():
        rec = {}
        try:
            cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, **over))
            model = make_model(cfg, V, V)
            # the CPU computes float32 dots exactly whatever the precision: tf32's reference is highest's
            ref_key = "bfloat16" if name == "bfloat16" else "highest"
            if ref_key not in cpu_ref:
                ref_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kernels=CPU_KERNELS))
                cpu_ref[ref_key] = runner.run(ref_cfg, make_model(ref_cfg, V, V), host_state, batches, cpu)
            cpu_params, cpu_losses = cpu_ref[ref_key]
            acc_params, acc_losses = runner.run(cfg, model, host_state, batches, accel)
            again_params, again_losses = runner.run(cfg, model, host_state, batches, accel)
            scale = tree_max_abs(cpu_params)
            la, lc = np.array(acc_losses), np.array(cpu_losses)
            rec = {
                "cpu_reference": ref_key,
                "cpu_losses": [round(x, 6) for x in cpu_losses],
                "accelerator_losses": [round(x, 6) for x in acc_losses],
                "loss_max_abs_diff": float(np.max(np.abs(la - lc))),
                "loss_max_rel_diff": float(np.max(np.abs(la - lc) / np.maximum(np.abs(lc), 1e-30))),
                "param_max_abs_diff": tree_max_abs_diff(acc_params, cpu_params),
                # Adam turns a sign difference of a near-zero gradient into a learning-rate-sized
                # step: a few such elements show here as a tiny fraction, a wrong kernel as a large one
                "param_fraction_over_1e-4": tree_fraction_over(acc_params, cpu_params, 1e-4),
                "param_max_abs": scale,
                "param_max_rel_diff": tree_max_abs_diff(acc_params, cpu_params) / max(scale, 1e-30),
                "param_max_abs_diff_vs_float32_cpu": tree_max_abs_diff(acc_params, cpu_ref["highest"][0])
                if "highest" in cpu_ref else None,
                "repeat_bitwise_equal": tree_bitwise_equal(acc_params, again_params) and acc_losses == again_losses,
                "repeat_param_max_abs_diff": tree_max_abs_diff(acc_params, again_params),
                "finite": bool(np.all(np.isfinite(la))),
            }
            tol = TOLERANCE.get(name)
            rec["tolerance"] = tol
            rec["ok"] = bool(rec["finite"] and rec["repeat_bitwise_equal"] and
                             (tol is None or (rec["param_max_abs_diff"] <= tol and rec["loss_max_abs_diff"] <= tol)))
        except Exception as e:  # noqa: BLE001 - one precision failing keeps the others
            rec = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        out["precisions"][name] = rec
    out["deterministic_flags"] = ctx["deterministic_flags"]
    out["ok"] = all(r.get("ok") for r in out["precisions"].values())
    return out


def _parallel_check(ctx, cfg, model, host_state, batches) -> dict:
    import jax

    from s2s_jax.training import steps as steps_lib
    from s2s_jax.parallel import Parallel

    results = {}
    for mode in ("none", "shard_map", "pmap"):
        try:
            p = Parallel(mode)
            step = p.wrap_train(functools.partial(steps_lib.train_step, model=model, config=cfg))
            state = p.put_state(jax.tree.map(lambda x: x.copy(), host_state))
            losses = []
            for i in range(PARALLEL_STEPS):
                state, metrics = step(state, p.put_batch(batches[i % len(batches)]))
                m = p.unreplicate_metrics(metrics)
                losses.append(float(m["loss"]))
            results[mode] = (host_tree(p.get_state(state).params), losses, p.num_devices)
        except Exception as e:  # noqa: BLE001
            results[mode] = e
    out = {}
    ref = results["none"]
    for mode in ("shard_map", "pmap"):
        r = results[mode]
        if isinstance(r, Exception) or isinstance(ref, Exception):
            err = r if isinstance(r, Exception) else ref
            out[mode] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
            continue
        diff = tree_max_abs_diff(r[0], ref[0])
        out[mode] = {"devices": r[2], "param_max_abs_diff_vs_none": diff,
                     "loss_max_abs_diff_vs_none": max(abs(a - b) for a, b in zip(r[1], ref[1])),
                     "bitwise_equal_to_none": tree_bitwise_equal(r[0], ref[0]),
                     "equal_to_none": diff <= PARALLEL_TOL, "tolerance": PARALLEL_TOL}
        out[mode]["ok"] = out[mode]["equal_to_none"]
    out["ok"] = all(v.get("ok") for v in out.values())
    return out


def _checkpoint_check(ctx, host_state) -> dict:
    import jax

    from s2s_jax.checkpoint import Checkpoints

    accel = ctx["accel"]
    state = jax.device_put(host_state, accel)
    with tempfile.TemporaryDirectory(prefix="device_check_ckpt_") as d:
        ck = Checkpoints(d, keep=1, keep_best=0)
        saved = ck.save(7, state, {"note": "device_check"})
        ck.wait()
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = ck.restore(abstract)
        ck.close()
    if restored is None:
        return {"ok": False, "error": "nothing restored"}
    rstate, meta, step = restored
    devices = sorted({str(dev) for x in jax.tree.leaves(rstate) for dev in x.sharding.device_set})
    equal = tree_bitwise_equal(host_tree(rstate), host_tree(state))
    return {"saved": bool(saved), "restored_step": step, "meta": meta, "bitwise_equal": equal,
            "restored_on": devices, "on_accelerator": devices == [str(accel)], "ok": bool(equal and step == 7)}


def _export_check(ctx, cfg, model, params) -> dict:
    import jax
    import numpy as np
    from jax import export as jax_export

    from s2s_jax import benchmark, kernels
    from s2s_jax.inference import export as export_lib
    from s2s_jax.inference.adapter import SingleModel
    from s2s_jax.train_state import make_model

    accel, cpu = ctx["accel"], ctx["cpu"]
    platform = accelerator_platform(accel)
    platforms = tuple(dict.fromkeys(("cpu", platform, "cuda")))  # the bundle's cpu + cuda at least
    with kernels.target(platforms):  # as export_bundle: the kernel set for the bundle's platforms
        model = SingleModel(make_model(cfg, model.source_vocab_size, model.target_vocab_size))
    avals = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    serialized = True
    try:
        programs = export_lib._export_programs(cfg, model, avals, [2], platforms)
        load = jax_export.deserialize
    except ImportError as e:  # jax's serialization needs flatbuffers, which jax does not install
        if "flatbuffers" not in str(e):
            raise
        # the same programs without the trip through bytes: Exported.serialize passes the object on
        serialized = False
        original = jax_export.Exported.serialize
        jax_export.Exported.serialize = lambda self, *a, **k: self
        try:
            programs = export_lib._export_programs(cfg, model, avals, [2], platforms)
        finally:
            jax_export.Exported.serialize = original
        load = lambda exp: exp  # noqa: E731
    b = benchmark.make_batches(cfg, 1, seed=3)[0]
    n = min(4, b["source"].shape[0])
    src, lens = b["source"][:n], b["source_lengths"][:n]
    carrier = np.zeros((12,), np.int32)
    out = {"platforms": list(platforms), "accelerator_platform": platform, "programs": {},
           "serialized": serialized}
    if not serialized:
        out["note"] = ("flatbuffers is not installed: the programs were checked without serialize / "
                       "deserialize (export bundles need it: pip install flatbuffers)")
    run = ("encode", "greedy", "beam_2")  # the continuous-batching step programs are lowered, not run here
    out["step_programs"] = {name: {"platforms": list(load(blob).platforms)}
                            for name, blob in programs.items() if name not in run}
    for name in run:
        exp = load(programs[name])
        args = (params, src, lens) if name == "encode" else (params, src, lens, carrier)
        res = {}
        for dev_name, dev in (("cpu", cpu), ("accelerator", accel)):
            placed = jax.device_put(args, dev)
            res[dev_name] = host_tree(jax.jit(exp.call)(*placed))
        leaves_c, leaves_a = jax.tree.leaves(res["cpu"]), jax.tree.leaves(res["accelerator"])
        rec = {"platforms": list(exp.platforms)}
        if name == "encode":
            rec["max_abs_diff"] = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                                      for x, y in zip(leaves_c, leaves_a) if np.size(x))
            rec["ok"] = rec["max_abs_diff"] <= 1e-4
        else:
            rec["tokens_equal"] = bool(np.array_equal(res["cpu"]["tokens"], res["accelerator"]["tokens"]))
            rec["lengths_equal"] = bool(np.array_equal(res["cpu"]["lengths"], res["accelerator"]["lengths"]))
            rec["score_max_abs_diff"] = float(np.max(np.abs(np.asarray(res["cpu"]["scores"], np.float64)
                                                            - np.asarray(res["accelerator"]["scores"], np.float64))))
            rec["ok"] = rec["tokens_equal"] and rec["lengths_equal"] and rec["score_max_abs_diff"] <= 1e-3
        out["programs"][name] = rec
    out["ok"] = bool(out["programs"]) and all(r["ok"] for r in out["programs"].values())
    return out


def part_plumbing(ctx) -> dict:
    import jax

    from s2s_jax import benchmark
    from s2s_jax.train_state import create_state, make_model

    cfg = small_config(ctx["smoke"])
    V = cfg.data.vocab_size
    model = make_model(cfg, V, V)
    with jax.default_device(ctx["cpu"]):
        host_state = host_tree(create_state(cfg, model))
    batches = benchmark.make_batches(cfg, PARALLEL_STEPS, seed=2)
    out = {"devices": [str(d) for d in jax.devices()]}
    for name, fn, args in (("parallel", _parallel_check, (ctx, cfg, model, host_state, batches)),
                           ("checkpoint", _checkpoint_check, (ctx, host_state)),
                           ("export", _export_check, (ctx, cfg, model, host_state.params))):
        t0 = time.perf_counter()
        try:
            out[name] = fn(*args)
        except Exception as e:  # noqa: BLE001 - each check on its own
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        out[name]["elapsed_s"] = round(time.perf_counter() - t0, 2)
    out["ok"] = all(out[k].get("ok") for k in ("parallel", "checkpoint", "export"))
    return out


# -- throughput (subprocesses) ----------------------------------------------------------------

GPU = "experiments/configs/bench_gpu.py"
GPU_SMALL = "experiments/configs/bench_gpu_2x256.py"
# every flag set that the command-buffer variants add to XLA_FLAGS (read when the backend starts)
CMDBUF_WHILE = "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"
CMDBUF_UNROLL = CMDBUF_WHILE + " --xla_gpu_command_buffer_unroll_loops=true"


def throughput_variants(smoke: bool) -> list[dict]:
    """In priority order: (name, config, --set overrides, extra XLA flags, baseline?)."""
    v = [
        dict(name="bench_gpu_bf16", config=GPU, sets=[], flags="", baseline=True),
        dict(name="bench_gpu_2x256_bf16", config=GPU_SMALL, sets=[], flags="", baseline=True),
        dict(name="bench_gpu_f32", config=GPU, sets=["model.dtype=float32"], flags="", baseline=True),
        dict(name="bench_gpu_2x256_f32", config=GPU_SMALL, sets=["model.dtype=float32"], flags="", baseline=True),
        dict(name="bench_gpu_bf16_cmdbuf_while", config=GPU, sets=[], flags=CMDBUF_WHILE, baseline=False),
        dict(name="bench_gpu_bf16_unroll2", config=GPU, sets=["model.unroll=2"], flags="", baseline=False),
        dict(name="bench_gpu_bf16_nondeterministic", config=GPU, sets=["train.deterministic=False"], flags="",
             baseline=False),
        dict(name="bench_gpu_bf16_loss_chunk8", config=GPU, sets=["model.loss_chunk=8"], flags="", baseline=False),
        dict(name="bench_gpu_bf16_no_input_feeding", config=GPU, sets=["model.input_feeding=False"], flags="",
             baseline=False),
        dict(name="bench_gpu_bf16_unroll4", config=GPU, sets=["model.unroll=4"], flags="", baseline=False),
        dict(name="bench_gpu_bf16_unfused_decoder", config=GPU, sets=["model.fused_decoder=False"], flags="",
             baseline=False),
        dict(name="bench_gpu_bf16_cmdbuf_while_unroll", config=GPU, sets=[], flags=CMDBUF_UNROLL, baseline=False),
        dict(name="bench_gpu_bf16_cpu_kernels", config=GPU, sets=["model.kernels=cpu"], flags="", baseline=False),
        dict(name="bench_gpu_tf32", config=GPU, sets=["model.dtype=float32", "model.matmul_precision=tensorfloat32"],
             flags="", baseline=True),
    ]
    for x in v:
        x["smoke_skip"] = x["name"] not in ("bench_gpu_bf16", "bench_gpu_bf16_cmdbuf_while")
    return v


# smoke: bench_gpu's layout (bidirectional, general attention, input feeding, token batches) at toy size
SMOKE_SETS = ["model.hidden_dim=32", "model.source_embed_dim=16", "model.target_embed_dim=16",
              "model.encoder_layers=1", "model.decoder_layers=1", "data.vocab_size=64",
              "data.batch_tokens=256", "data.buckets=((30, 32),)"]
# accelerator: two bucket shapes instead of three (a compile per shape and model is the cost here)
GPU_SETS = ["data.buckets=((16, 18), (30, 32))"]


def run_variant(ctx, v: dict, deadline: float) -> dict:
    smoke = ctx["smoke"]
    out_dir: Path = ctx["out"]
    rounds, batches = (2, 2) if smoke else (3, 4)
    sets = list(v["sets"]) + (SMOKE_SETS if smoke else GPU_SETS)
    if ctx["deterministic_rejected"] is not None:  # the flags kill the backend: run without them
        sets.append("train.deterministic=False")
    bench_out = out_dir / f"throughput_{v['name']}.bench.json"
    cmd = [sys.executable, "-m", "s2s_jax", "benchmark", "--config", v["config"], "--rounds", str(rounds),
           "--batches", str(batches), "--output", str(bench_out)]
    if not v["baseline"]:
        cmd.append("--no-baseline")
    cmd += [a for s in sets for a in ("--set", s)]
    env = dict(os.environ)
    # from the flags this script started with: the child's benchmark adds train.deterministic's
    env["XLA_FLAGS"] = " ".join(x for x in (ctx["base_xla_flags"], v["flags"]) if x)
    # the children own the device: this process's allocations are small and not preallocated
    if not smoke:
        env.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)
    env["PYTHONUNBUFFERED"] = "1"
    timeout = max(1.0, deadline - time.monotonic() - 5)
    rec = {"variant": v["name"], "config": v["config"], "sets": sets, "extra_xla_flags": v["flags"],
           "baseline": v["baseline"], "command": " ".join(cmd), "timeout_s": round(timeout, 1)}
    log = out_dir / f"throughput_{v['name']}.log"
    with open(log, "w", encoding="utf-8") as lf:
        try:
            child = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=lf, text=True,
                                   timeout=timeout)
            rec["returncode"] = child.returncode
        except subprocess.TimeoutExpired:
            rec.update(returncode=None, timed_out=True, ok=False, error=f"timed out after {timeout:.0f}s")
            return rec
    if rec["returncode"] != 0:
        rec.update(ok=False, error=f"exit {rec['returncode']}; log tail: " + log.read_text()[-1500:])
        return rec
    record = json.loads(bench_out.read_text())
    bench_out.unlink()
    rec["record"] = record
    rec["headline"] = headline(record)
    rec["ok"] = True
    return rec


def headline(r: dict) -> dict:
    models = r.get("models", {})
    s = models.get("s2s_jax", {})
    b = models.get("flax_examples", {})
    return {"dtype": r.get("dtype"), "ceiling_kind": r.get("ceiling_kind"),
            "ceiling_tflop_per_s": round(r.get("ceiling_gflop_per_s_median", 0) / 1e3, 3),
            "s2s_jax_tokens_per_s": s.get("target_tokens_per_s", {}).get("median"),
            "s2s_jax_mfu_measured": s.get("mfu_measured"), "s2s_jax_mfu_datasheet": s.get("mfu_datasheet"),
            "baseline_tokens_per_s": b.get("target_tokens_per_s", {}).get("median") if b else None,
            "baseline_mfu_measured": b.get("mfu_measured") if b else None,
            "speedup": r.get("speedup", {}).get("median"),
            "compile_s": sum(s.get("compile_s", {}).values()) if s else None,
            "peak_bytes_in_use": r.get("peak_bytes_in_use")}


def part_throughput(ctx, records: Records) -> dict:
    summary = {"variants": {}, "skipped": {}}
    smoke = ctx["smoke"]
    for v in throughput_variants(smoke):
        name = v["name"]
        if smoke and v["smoke_skip"]:
            summary["skipped"][name] = "smoke (runs on an accelerator)"
            continue
        left = ctx["deadline"] - time.monotonic()
        if left < MIN_VARIANT_S[smoke] or left <= 5:
            summary["skipped"][name] = f"time budget ({left:.0f}s left)"
            continue
        # a variant that started may run past the budget by GRACE_S (then it is killed)
        rec = run_part(records, f"throughput_{name}", run_variant, ctx, v, ctx["deadline"] + GRACE_S)
        summary["variants"][name] = {"ok": rec.get("ok"), "elapsed_s": rec.get("elapsed_s"),
                                     **(rec.get("headline") or {"error": (rec.get("error") or "")[:300]})}
        records.write("throughput", {"part": "throughput", **summary, "ok": None, "elapsed_s": None})
    summary["ok"] = bool(summary["variants"]) and all(x["ok"] for x in summary["variants"].values())
    return summary


# -- table ------------------------------------------------------------------------------------

def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def _failed(part: str, check: str, record: dict) -> list[tuple]:
    """The row of a record's error (cut to 80 characters), or none."""
    return [(part, check, record["error"][:80], False)] if "error" in record else []


def _row(part: str, check: str, record: dict, describe) -> tuple:
    """A record's row: its error (failed), or describe(record) with its ok."""
    return (_failed(part, check, record) or [(part, check, describe(record), record.get("ok"))])[0]


def _throughput(h: dict) -> str:
    base = (f", baseline {_fmt(h['baseline_tokens_per_s'])} tok/s, speedup {_fmt(h['speedup'])}"
            if h.get("baseline_tokens_per_s") is not None else "")
    return (f"{_fmt(h['s2s_jax_tokens_per_s'])} tok/s, MFU {_fmt(h['s2s_jax_mfu_measured'])}"
            f" (datasheet {_fmt(h['s2s_jax_mfu_datasheet'])}){base}")


def table(records: Records) -> str:
    rows = []
    p = records.parts
    env = p.get("environment", {})
    rows.append(("environment", "device", f"{env.get('device_kind')} ({env.get('backend')}), jax {env.get('jax')}",
                 env.get("ok")))
    if env.get("stage") is None:
        rejected = env.get("deterministic_flags_rejected")
        rows.append(("environment", "XLA_FLAGS", (env.get("xla_flags") or "(none)") +
                     (" (deterministic flags rejected)" if rejected else ""), not rejected))
    c = p.get("ceilings", {})
    for k, v in (c.get("tflop_per_s") or {}).items():
        rows.append(("ceilings", f"{k} TFLOP/s", f"{_fmt(v)} (datasheet {c['datasheet_peak_tflop_per_s'].get(k)})",
                     c.get("ok")))
    rows += _failed("ceilings", "error", c)
    cor = p.get("correctness", {})
    for k, v in (cor.get("precisions") or {}).items():
        rows.append(_row("correctness", k, v, lambda v: (
            f"loss diff {_fmt(v['loss_max_abs_diff'])}, param diff {_fmt(v['param_max_abs_diff'])} "
            f"(rel {_fmt(v['param_max_rel_diff'])}), repeat bitwise {v['repeat_bitwise_equal']}")))
    rows += _failed("correctness", "error", cor)
    pl = p.get("plumbing", {})
    par = pl.get("parallel", {})
    for mode in ("shard_map", "pmap"):
        if mode in par:
            r = par[mode]
            rows.append(("plumbing", f"{mode} == none", r.get("error") or
                         f"diff {_fmt(r['param_max_abs_diff_vs_none'])}, bitwise {r['bitwise_equal_to_none']}, "
                         f"{r['devices']} device(s)", r.get("ok")))
    rows += _failed("plumbing", "parallel", par)
    ck = pl.get("checkpoint", {})
    if ck:
        rows.append(("plumbing", "orbax round trip", ck.get("error") or
                     f"bitwise {ck.get('bitwise_equal')}, on {ck.get('restored_on')}", ck.get("ok")))
    ex = pl.get("export", {})
    for name, r in (ex.get("programs") or {}).items():
        detail = (f"diff {_fmt(r['max_abs_diff'])}" if "max_abs_diff" in r else
                  f"tokens equal {r['tokens_equal']}, score diff {_fmt(r['score_max_abs_diff'])}")
        if not ex.get("serialized", True):
            detail += " (not serialized: no flatbuffers)"
        rows.append(("plumbing", f"export {name} ({'/'.join(ex['platforms'])})", detail, r.get("ok")))
    rows += _failed("plumbing", "export", ex) + _failed("plumbing", "error", pl)
    th = p.get("throughput", {})
    for name, h in (th.get("variants") or {}).items():
        rows.append(_row("throughput", name, h, _throughput))
    for name, why in (th.get("skipped") or {}).items():
        rows.append(("throughput", name, f"skipped: {why}", None))
    w = [max(len(str(r[i])) for r in rows) for i in range(2)]
    lines = [f"{'part':<{w[0]}}  {'check':<{w[1]}}  ok     result", "-" * (w[0] + w[1] + 60)]
    for part, check, result, ok in rows:
        lines.append(f"{part:<{w[0]}}  {check:<{w[1]}}  {str(ok):<5}  {result}")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the JSON records (created)")
    ap.add_argument("--smoke", action="store_true", help="every part on CPU with tiny shapes (CI)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-time budget; throughput variants that do not fit are skipped "
                         "(default 420 on an accelerator, 900 with --smoke); a variant already "
                         f"running may overrun it by {GRACE_S:.0f}s")
    ap.add_argument("--parts", default="ceilings,correctness,plumbing,throughput",
                    help="comma-separated subset of the parts to run")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    budget = args.budget_s if args.budget_s is not None else (900.0 if args.smoke else 420.0)

    records = Records(Path(args.out))
    base_xla_flags = os.environ.get("XLA_FLAGS", "")
    # written before jax starts, so that a backend that dies at start still leaves a record
    records.write("environment", {"part": "environment", "ok": None, "stage": "before jax started",
                                  "python": sys.version.split()[0], "xla_flags": base_xla_flags,
                                  "jax_platforms": os.environ.get("JAX_PLATFORMS"), "elapsed_s": 0.0})

    # before jax starts: train.deterministic's XLA flags (checked in a throwaway process first:
    # XLA aborts on a flag it does not know); no preallocation (the throughput children need the
    # device's memory); the CPU backend beside the accelerator; --smoke keeps everything on the CPU
    from s2s_jax import runtime

    deterministic_flags = runtime.configure_backend(True) if hasattr(runtime, "configure_backend") else []
    if args.smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
    else:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        platforms = os.environ.get("JAX_PLATFORMS", "")
        if platforms and "cpu" not in platforms.split(","):
            os.environ["JAX_PLATFORMS"] = platforms + ",cpu"
    rejected = preflight(os.environ.get("XLA_FLAGS", ""))
    if rejected is not None:
        print(f"[device_check] the backend does not start with XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}; "
              f"running without train.deterministic's flags: {rejected[-300:]}", file=sys.stderr)
        os.environ["XLA_FLAGS"] = base_xla_flags
        deterministic_flags = []
    import jax

    accel = jax.devices()[0]
    cpu = jax.devices("cpu")[0]
    if accel.platform == "cpu" and not args.smoke:
        print("[device_check] no accelerator found: the 'accelerator' is the CPU (use --smoke for tiny shapes)",
              file=sys.stderr)
    ctx = {"smoke": args.smoke, "accel": accel, "cpu": cpu, "out": Path(args.out), "budget_s": budget,
           "deadline": t_start + budget, "deterministic_flags": list(deterministic_flags),
           "deterministic_rejected": rejected, "base_xla_flags": base_xla_flags}
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    run_part(records, "environment", part_environment, ctx)
    for name, fn in (("ceilings", part_ceilings), ("correctness", part_correctness), ("plumbing", part_plumbing)):
        if name in parts:
            run_part(records, name, fn, ctx)
    if "throughput" in parts:
        run_part(records, "throughput", part_throughput, ctx, records)
    text = table(records)
    text += f"\n\ntotal {time.monotonic() - t_start:.0f}s of a {budget:.0f}s budget; records in {args.out}"
    (Path(args.out) / "summary.txt").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
