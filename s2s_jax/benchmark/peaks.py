"""Device peaks: vendors' datasheet figures, the compute kind a model runs in, and the matmul
ceilings measured in the same run (CPU: the best of three float32 [2048, 2048] matmuls;
accelerators: [8192, 8192] bursts of ten in bfloat16, TF32 and true float32); device memory.
"""

from __future__ import annotations

import functools
import time


# Vendors' datasheet dense peaks (no sparsity), TFLOP/s per device, by compute kind. Matched
# against jax's device_kind by `datasheet_peak`; anything else is unknown (null in the record).
DATASHEET_PEAK_TFLOPS = {
    "NVIDIA H100 SXM": {"bfloat16": 989.0, "tensorfloat32": 494.7, "float32": 67.0},
    "NVIDIA H200": {"bfloat16": 989.0, "tensorfloat32": 494.7, "float32": 67.0},  # H100 SXM's
    "NVIDIA A100": {"bfloat16": 312.0, "tensorfloat32": 156.0, "float32": 19.5},
    "TPU v4": {"bfloat16": 275.0},
    "TPU v5e": {"bfloat16": 197.0},
    "TPU v5p": {"bfloat16": 459.0},
}


def datasheet_entry(device_kind: str) -> str | None:
    """The DATASHEET_PEAK_TFLOPS key for a jax `device_kind`, or None when unknown.

    Seen spellings: "NVIDIA H100 80GB HBM3" (SXM; PCIe and NVL boards have lower peaks and are
    left unknown), "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "TPU v4", "TPU v5 lite" (v5e), "TPU v5p".
    """
    k = device_kind.lower()
    if "h100" in k:
        return None if ("pcie" in k or "nvl" in k) else "NVIDIA H100 SXM"
    if "h200" in k:
        return None if "nvl" in k else "NVIDIA H200"
    if "a100" in k:
        return "NVIDIA A100"
    if k.startswith("tpu"):
        if "v4" in k and "lite" not in k:
            return "TPU v4"
        if "v5e" in k or "v5 lite" in k or "v5litepod" in k:
            return "TPU v5e"
        if "v5p" in k or k.strip() == "tpu v5":
            return "TPU v5p"
    return None


def datasheet_peak(device_kind: str, kind: str) -> float | None:
    """Datasheet dense peak FLOP/s of one device for a compute kind, or None."""
    entry = datasheet_entry(device_kind)
    tflops = DATASHEET_PEAK_TFLOPS.get(entry, {}).get(kind) if entry else None
    return None if tflops is None else tflops * 1e12


def compute_kind(model_cfg, backend: str) -> str:
    """What the model's matmuls run as: bfloat16 | tensorfloat32 | float32 (the ceiling to compare with)."""
    if model_cfg.dtype == "bfloat16":
        return "bfloat16"
    p = getattr(model_cfg, "matmul_precision", "auto")
    if backend == "cpu" or p in ("auto", "highest", "bfloat16_3x"):
        return "float32"
    if p == "tensorfloat32":
        return "tensorfloat32"
    return "bfloat16" if backend == "tpu" else "tensorfloat32"  # "default": the backend's choice


# kind -> (input dtype, jax.default_matmul_precision)
_CEILING_KINDS = {"bfloat16": ("bfloat16", "default"), "tensorfloat32": ("float32", "tensorfloat32"),
                  "float32": ("float32", "highest")}


@functools.lru_cache(maxsize=None)
def _matmul_program(n: int, kind: str, backend: str):
    """(compiled matmul, a, b) of one kind, compiled once per process (not once per round)."""
    import jax
    import jax.numpy as jnp

    dtype, precision = _CEILING_KINDS[kind]
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    with jax.default_matmul_precision(precision):
        f = jax.jit(jnp.matmul).lower(a, b).compile()
    return f, a, b


def matmul_ceiling(n: int = 2048, reps: int = 3, kind: str = "float32", burst: int = 1) -> float:
    """FLOP/s of the best of `reps` [n, n] × [n, n] matmuls of `kind` on the default device.

    burst > 1: each timing dispatches `burst` matmuls and synchronises once (accelerators, where
    one matmul is ~1 ms and a host round trip would be a visible share of it)."""
    import jax
    import jax.numpy as jnp

    f, a, b = _matmul_program(n, kind, jax.default_backend())
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        if burst == 1:
            f(a, b).block_until_ready()
        else:
            outs = [f(a, b) for _ in range(burst)]
            jax.block_until_ready(outs)
        best = min(best, (time.perf_counter() - t0) / burst)
    return 2 * n ** 3 / best


def ceilings(backend: str) -> dict[str, float]:
    """{kind: FLOP/s}: float32 [2048²] on CPU (as ever); bf16, TF32 and f32 [8192²] bursts elsewhere."""
    if backend == "cpu":
        return {"float32": matmul_ceiling()}
    return {k: matmul_ceiling(8192, 3, k, burst=10) for k in _CEILING_KINDS}


def platform_version(device) -> str:
    """The backend's version string (e.g. the CUDA / libtpu version), "" where jax hides it."""
    return str(getattr(getattr(device, "client", None), "platform_version", ""))


def peak_bytes_in_use(device=None) -> int | None:
    """The device's peak allocated bytes so far (process lifetime), or None where not reported."""
    import jax

    try:
        stats = (device or jax.local_devices()[0]).memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory statistics
        return None
    if not stats:
        return None
    value = stats.get("peak_bytes_in_use")
    return int(value) if value is not None else None
