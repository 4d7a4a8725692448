"""Hand-written VJPs and backend-specific workarounds, in one place, as a kernel set chosen once.

`model/` is the plain math (cells, attention, the decoder step); what makes it fast lives here:

    dense.py          x·W with a row-major weight gradient (cpu: kept transposes)
    activations.py    LSTM gate nonlinearities and their hand-derived derivative
    recurrence.py     the encoder / per-layer recurrence with a hand-derived backward pass
    deferred_scan.py  lax.scan whose loop-invariant weights get their gradients after the loop
    fused_decoder.py  the input-feeding LSTM decoder's scan with a hand-derived backward pass,
                      and the decoder scan a set gives (fused, else the model's step, taped)
    loss.py           output projection + cross-entropy fused, blocks of rows
    update.py         the global gradient norm and the non-finite guard of the train step
    topk.py           decoding's top-k selections over the vocabulary

Those modules hold the implementations; a *kernel set* picks one implementation of each
operation and binds its choices. A set is a `KernelSet` (a frozen, hashable dataclass of the
operations, with its `name`), made by its own module:

    cpu.py            the set tuned on XLA:CPU
    portable.py       the set with static control flow only (GPUs, TPUs)

`select(model.kernels, backend)` returns one, once: the model is built with it
(`Seq2Seq(config, V_src, V_tgt, kernels=select(...))`, train_state.make_model) and everything
downstream (the decoder, the loss, the train step's guard, decoding's selections) asks the model's
set. No function takes a set by name or has a default set.

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

``auto`` picks ``cpu`` on the CPU backend and ``portable`` elsewhere (or, inside `target`, for
the platforms a program is exported to). Timings are in docs/speed.md. Nothing here imports
flax or the model: model, losses, steps and decoding call in.

Adding a set (say a Pallas one for GPUs) is one new module, ``kernels/pallas.py``, defining
``SET = KernelSet(name="pallas", ...)`` from the implementation modules and its own kernels
(reuse any operation of the other sets as it is), plus its name in ``SETS`` below (the
config's model.kernels choices are read from it; `resolve` says which set ``auto`` picks).
Nothing in the model, the steps, decoding or the config changes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
from typing import Any, Callable

SETS = ("cpu", "portable")  # each is the module s2s_jax.kernels.<name>, which defines SET

# model.matmul_precision -> the name jax.default_matmul_precision takes
_PRECISIONS = {"highest": "highest", "tensorfloat32": "tensorfloat32", "bfloat16_3x": "BF16_BF16_F32_X3",
               "default": "default"}


_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("s2s_jax_kernel_target", default=None)


@dataclasses.dataclass(frozen=True)
class KernelSet:
    """One implementation of every operation the model, the train step and decoding take from
    kernels/. Frozen and hashable: a Flax module attribute and a static jit argument. Shapes and
    the math of each operation are in the implementation module named beside it.

    Calls (x: arrays; dtype: the compute dtype; results float32 unless said):
        matmul(x [..., D], w [D, G], dtype) -> [..., G]                            dense.py
        rows_transposed_product(x [N, D], dy [N, G], dtype) -> xᵀ·dy [D, G]         dense.py
        lstm_activations(z [..., 4H]) -> gates [..., 4H]                            activations.py
        recurrence(cell, dtype, unroll, xp, w_hh, b_hh, mask, initial)
            -> (outputs [T, K, B, H], final carry)                                  recurrence.py
        decoder_scan(cfg, W, gx0, state, memory, keys, mask, masks, *, step, tape_names)
            -> time-major (hidden [T, B, H], weights [T, B, S] | None); the fused
               decoder where model.fused_decoder allows it, else `step` taped        fused_decoder.py
        sequence_sums(hidden, kernel, bias, targets, weights, *, label_smoothing, chunk,
            dtype) -> [4] (loss, nll, correct, weight)                              loss.py
        global_norm(tree) -> scalar                                                 update.py
        apply_if(keep, update, old) -> update(*old) if keep else old                update.py
        best_token(logits [B, V], force [B], eos_id) -> (token [B], log-prob [B])   topk.py
        top_extensions(alive [B, K], logits [B, K, V], force [B], eos_id, C)
            -> (values [B, C], flat index [B, C])                                   topk.py
    """

    name: str
    matmul: Callable[..., Any]
    rows_transposed_product: Callable[..., Any]
    lstm_activations: Callable[..., Any]
    recurrence: Callable[..., Any]
    decoder_scan: Callable[..., Any]
    sequence_sums: Callable[..., Any]
    global_norm: Callable[..., Any]
    apply_if: Callable[..., Any]
    best_token: Callable[..., Any]
    top_extensions: Callable[..., Any]

    def __repr__(self):
        return f"KernelSet({self.name!r})"


def resolve(name: str, backend: str | None = None) -> str:
    """`model.kernels` -> the name of a set in SETS ("auto": cpu on the CPU backend, portable
    elsewhere).

    backend: the platform the program is built for (default: the `target` in effect, else jax's
    default backend)."""
    if name in SETS:
        return name
    if name != "auto":
        raise ValueError(f"model.kernels={name!r}: use auto, {', '.join(SETS)}")
    if backend is None:
        backend = _TARGET.get()
    if backend is None:
        import jax
        backend = jax.default_backend()
    return "cpu" if backend == "cpu" else "portable"


def select(name: str, backend: str | None = None) -> KernelSet:
    """`model.kernels` (auto | a name in SETS) -> its KernelSet, chosen once where the model is
    built (backend as in `resolve`)."""
    return importlib.import_module(f"{__name__}.{resolve(name, backend)}").SET


@contextlib.contextmanager
def target(platforms):
    """Models built inside are built for `platforms` (a name or a sequence, as jax.export takes
    them), not for this process's backend: "auto" selects cpu only when every platform is cpu.
    Export builds its model inside, so a bundle lowered on a CPU machine for cuda gets the
    portable set."""
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
