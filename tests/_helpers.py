"""Shared by the trainer tests: paths, the persistent XLA cache, and trainer subprocess commands.

Compiling the LSTM train step costs ~10 s of CPU; with a persistent compilation cache (for this
process and for the trainer subprocesses) only the first process ever pays it. The cache is keyed
by the compiled program, so stale entries are harmless.
"""

import os
import sys
import tempfile

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "configs", "tiny.py")
XLA_CACHE = os.environ.get("S2S_TEST_XLA_CACHE", os.path.join(tempfile.gettempdir(), "s2s_jax_test_xla_cache"))
if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_env() -> dict:
    """Environment for trainer subprocesses (the shared compilation cache, CPU, unbuffered)."""
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=XLA_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def train_cmd(workdir, *sets) -> list[str]:
    cmd = [sys.executable, "-m", "s2s_jax", "train", "--config", TINY, "--workdir", str(workdir), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    return cmd
