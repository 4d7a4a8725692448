"""Hand-written VJPs and backend-specific workarounds, in one place, chosen by `model.kernels`.

`model/` is the plain math (cells, attention, the decoder step); what makes it fast lives here:

    dense.py          x·W with a row-major weight gradient (cpu: kept transposes)
    activations.py    LSTM gate nonlinearities and their hand-derived derivative
    recurrence.py     the encoder / per-layer recurrence with a hand-derived backward pass
    deferred_scan.py  lax.scan whose loop-invariant weights get their gradients after the loop
    fused_decoder.py  the input-feeding LSTM decoder's scan with a hand-derived backward pass
    loss.py           output projection + cross-entropy fused, blocks of rows
    update.py         the global gradient norm and the non-finite guard of the train step
    topk.py           decoding's top-k selections over the vocabulary

Two sets compute the same function (tests/test_kernels.py pins both to the plain reference):

- ``cpu``: tuned on XLA:CPU, where every kernel launched in a loop body costs ~10–30 µs and the
  dot emitter picks a slower generic path for some layouts. It uses device-counted loops (the
  loss runs over the real rows only), a ``lax.cond`` around the optimizer update, and
  ``optimization_barrier`` copies that keep explicit, row-major transposes (in bfloat16 the
  only form XLA:CPU's fast library path multiplies; dense.transposed).
- ``portable``: static control flow only — every loop has a trip count known at compile time
  (the time scans, fixed blocks of rows), no ``cond`` (a select-based guard), no optimisation
  barrier. On XLA:GPU a device-computed trip count copies the predicate to the host and blocks
  every iteration, a ``cond`` blocks once per call, and barriers block fusion; this set avoids
  all three. The recurrences keep the same small hand-derived bodies as on CPU.

``auto`` picks ``cpu`` on the CPU backend and ``portable`` elsewhere. Timings are in
docs/speed.md. Nothing here imports flax or the model: model, losses, steps and decoding call in.
"""

from __future__ import annotations

import contextlib
import contextvars

SETS = ("cpu", "portable")

# model.matmul_precision -> the name jax.default_matmul_precision takes
_PRECISIONS = {"highest": "highest", "tensorfloat32": "tensorfloat32", "bfloat16_3x": "BF16_BF16_F32_X3",
               "default": "default"}


_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("s2s_jax_kernel_target", default=None)


def resolve(name: str, backend: str | None = None) -> str:
    """`model.kernels` -> "cpu" | "portable" ("auto": cpu on the CPU backend, portable elsewhere).

    backend: the platform the program is built for (default: the `target` in effect, else jax's
    default backend)."""
    if name in SETS:
        return name
    if name != "auto":
        raise ValueError(f"model.kernels={name!r}: use auto, cpu or portable")
    if backend is None:
        backend = _TARGET.get()
    if backend is None:
        import jax
        backend = jax.default_backend()
    return "cpu" if backend == "cpu" else "portable"


@contextlib.contextmanager
def target(platforms):
    """Programs traced inside are built for `platforms` (a name or a sequence, as jax.export
    takes them), not for this process's backend: "auto" resolves to cpu only when every platform
    is cpu. Export uses it, so a bundle lowered on a CPU machine for cuda gets the portable set."""
    platforms = (platforms,) if isinstance(platforms, str) else tuple(platforms)
    token = _TARGET.set("cpu" if platforms and all(p == "cpu" for p in platforms) else "accelerator")
    try:
        yield
    finally:
        _TARGET.reset(token)


def matmul_precision(model_cfg) -> str:
    """`model.matmul_precision` resolved: auto = highest for float32 compute, default for bfloat16."""
    p = model_cfg.matmul_precision
    if p == "auto":
        p = "highest" if model_cfg.dtype == "float32" else "default"
    return p


@contextlib.contextmanager
def precision_scope(model_cfg):
    """Traces the enclosed code with the config's float32 matmul precision (every dot, forward
    and backward, including the hand-written VJPs): true float32 on GPUs (not TF32) and TPUs (not
    one bf16 pass) unless the config asks otherwise. XLA:CPU computes float32 dots exactly either
    way."""
    import jax
    with jax.default_matmul_precision(_PRECISIONS[matmul_precision(model_cfg)]):
        yield
