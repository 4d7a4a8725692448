"""Process setup shared by the CLI and library users: compile cache, host allocator, XLA flags.

    import s2s_jax
    s2s_jax.setup()        # first thing, before anything imports jax (the CLI does this itself)

`setup()` does what `python -m s2s_jax` does before any verb: it turns on the persistent XLA
compilation cache (so a second process skips compilation) and tunes glibc malloc for XLA:CPU.
Both must happen before jax starts: the cache directory is read when jax is imported, and
malloc's arena settings must be made before jax starts its threads. Calling it later is
harmless but may not take effect (it returns what it could do).
"""

from __future__ import annotations

import os
import sys

from s2s_jax.config import UserError

HOST_ALLOCATOR = "default"  # "glibc-tuned" once tune_host_allocator has run (recorded by the benchmark)


def enable_compilation_cache() -> str | None:
    """Persistent XLA compilation cache, so a second `translate`/`train` skips compilation.

    Set through the environment before jax is imported; S2S_JAX_COMPILATION_CACHE=0 turns it off,
    JAX_COMPILATION_CACHE_DIR moves it. Cached programs are the same programs: results stay
    bit-identical. Returns the cache directory (None when off).
    """
    if os.environ.get("S2S_JAX_COMPILATION_CACHE", "1") == "0":
        return None
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                          os.path.join(os.path.expanduser("~"), ".cache", "s2s_jax", "xla"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    if "jax" in sys.modules:  # imported already: the environment is read too late, set the options
        import jax

        if not jax.config.jax_compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    return os.environ["JAX_COMPILATION_CACHE_DIR"]


def tune_host_allocator() -> str:
    """glibc malloc: one arena, no mmap for large blocks, no trimming — so XLA:CPU reuses memory.

    XLA:CPU allocates each execution's temporaries as one large block; glibc serves blocks that
    large with mmap and returns them with munmap, so every training step touched fresh pages
    (measured in docs/speed.md). Served from one heap that is never trimmed, the block's pages
    stay mapped from step to step. Must run before jax starts its threads. Linux/glibc only;
    S2S_JAX_HOST_ALLOCATOR=default leaves malloc as it is. Returns the allocator in use.
    """
    global HOST_ALLOCATOR
    mode = os.environ.get("S2S_JAX_HOST_ALLOCATOR", "tuned")
    if mode not in ("tuned", "default"):
        raise UserError(f"environment variable S2S_JAX_HOST_ALLOCATOR={mode!r}: use 'tuned' (the default) or "
                        "'default' (glibc malloc as it comes)")
    if mode == "default" or not sys.platform.startswith("linux"):
        return HOST_ALLOCATOR
    import ctypes
    import platform
    if platform.libc_ver()[0] != "glibc":
        return HOST_ALLOCATOR
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return HOST_ALLOCATOR
    M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
    if libc.mallopt(M_ARENA_MAX, 1) and libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30):
        HOST_ALLOCATOR = "glibc-tuned"
    return HOST_ALLOCATOR


def setup() -> dict:
    """Both of the above, as the CLI does: {"compilation_cache": dir | None, "host_allocator": ...}."""
    return {"compilation_cache": enable_compilation_cache(), "host_allocator": tune_host_allocator()}


# -- compilation time -----------------------------------------------------------------------

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")  # trace, lower, compile (or cache load)
_compile_seconds = 0.0
_listening = False


def _on_event_duration(event: str, duration: float, **_) -> None:
    global _compile_seconds
    if event in _COMPILE_EVENTS:  # top-level traces only: jax times nested jits inside their caller's
        _compile_seconds += duration


def compile_seconds() -> float:
    """Seconds this process has spent tracing, lowering and compiling jax programs (or loading
    them from the persistent cache) since the first call, from jax's own monitoring events.
    Differences of two calls time the compilation inside a piece of work, e.g. a translation
    (`Translator.last_stats["compile_seconds"]`), so decode speed can be quoted without it."""
    global _listening
    if not _listening:
        import jax

        jax.monitoring.register_event_duration_secs_listener(_on_event_duration)
        _listening = True
    return _compile_seconds


# XLA flags behind train.deterministic: GPU reductions and scatters (atomics) in a fixed order,
# so two runs from the same state give bitwise the same parameters. XLA:CPU and TPUs are
# deterministic without them; on CPU-only jaxlib the GPU flags are accepted and inert.
DETERMINISTIC_XLA_FLAGS = ("--xla_gpu_deterministic_ops=true",)


def _backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
        return bool(getattr(xla_bridge, "_backends", {}))
    except ImportError:  # private layout moved: assume started (the flags may then be late)
        return True


def configure_backend(deterministic: bool = True) -> list[str]:
    """Adds the train.deterministic XLA flags to XLA_FLAGS before the backend starts.

    Returns the flags in effect. If a backend already started in this process, XLA has read its
    flags: the function warns and changes nothing (call it first, as the CLI does).
    """
    if not deterministic:
        return []
    current = os.environ.get("XLA_FLAGS", "").split()
    missing = [f for f in DETERMINISTIC_XLA_FLAGS if f.split("=")[0] not in {c.split("=")[0] for c in current}]
    if missing and _backend_started():
        import jax
        if jax.default_backend() == "cpu":  # XLA:CPU is deterministic; nothing to set
            return []
        import warnings
        warnings.warn("train.deterministic: the XLA backend has already started, so "
                      f"{' '.join(missing)} cannot take effect in this process; call "
                      "s2s_jax.runtime.configure_backend() before any jax computation", stacklevel=2)
        return [f for f in DETERMINISTIC_XLA_FLAGS if f not in missing]
    if missing:
        os.environ["XLA_FLAGS"] = " ".join(current + missing)
    return list(DETERMINISTIC_XLA_FLAGS)
