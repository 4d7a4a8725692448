"""`lax.scan` whose loop-invariant weights get their gradients after the loop, in one matmul each.

Differentiating a scan whose body multiplies by a loop-invariant weight W makes JAX's transpose
accumulate dW += x_tᵀ·dy_t inside the backward loop: one small matmul (contracting over the batch
only) and one read-modify-write of all of W per time step, on the sequential path. Here the body
records each product y_t = x_t·W through a `Tape`; the backward loop only produces the per-step
output cotangents dy_t, and after it every weight gets dW = Σ_t x_tᵀ·dy_t as one large matmul
contracting over time × batch, which runs at the machine's matmul speed. The backward loop keeps
only the matmuls that are truly sequential (dx_t = dy_t·Wᵀ). Static control flow (the scan's
trip count is T): both kernel sets use it, for the decoder configurations the fused decoder
does not cover.

How: the body adds a zero "delta" input d_t to each recorded product (y_t = x_t·W + d_t); the
cotangent of d_t is exactly dy_t, so the forward pass is differentiated (by `jax.vjp`) with
respect to the deltas, the carry, the per-step inputs and `params`, but not the weights.

    def step(tape, params, fixed, carry, x, const):
        w = tape.weights
        gates = tape.dot("w_hh", "bh,hg->bg", carry, w["w_hh"]) + x + params["bias"]
        ...
        return new_carry, y

    final, ys = scan(step, {"w_hh": w_hh}, {"bias": b}, fixed, carry, xs, consts)

`params` are loop-invariant arrays differentiated the ordinary way (biases, arrays used
elementwise); `fixed` are loop-invariant arrays without a gradient (masks); `consts` are per-step
inputs without a gradient. The step must take every array from its arguments, never from a
closure (custom_vjp cannot differentiate closed-over values). Each tape name is used once per
step, and its weight must be `tape.weights[name]`.
"""

from __future__ import annotations

import string
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array


class Tape:
    """Records the inputs of one step's products with loop-invariant weights."""

    def __init__(self, weights: dict[str, Array], deltas: dict[str, Array] | None = None):
        self.weights = weights
        self.deltas = deltas
        self.inputs: dict[str, Array] = {}
        self.outputs: dict[str, Array] = {}
        self.specs: dict[str, str] = {}

    def dot(self, name: str, spec: str, x: Array, w: Array, dtype=jnp.float32) -> Array:
        """einsum(spec, x, w) in the compute dtype with a float32 result; w is self.weights[name]."""
        if w is not self.weights.get(name):
            raise ValueError(f"tape product {name!r}: the weight must be weights[{name!r}]")
        if name in self.inputs:
            raise ValueError(f"tape product {name!r} used twice in one step")
        x = x.astype(dtype)
        y = plain_dot(name, spec, x, w, dtype)
        self.inputs[name], self.outputs[name], self.specs[name] = x, y, spec
        if self.deltas is not None:
            y = y + self.deltas[name]
        return y


def plain_dot(name: str, spec: str, x: Array, w: Array, dtype=jnp.float32) -> Array:
    """Tape.dot's signature without a tape (code shared between scanned and unscanned paths)."""
    del name
    return jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def weight_grad(spec: str, xs: Array, dys: Array, w: Array) -> Array:
    """Σ_t of einsum(spec)'s weight cotangent, xs [T, ...], dys [T, ...]."""
    ins, out = spec.split("->")
    x_spec, w_spec = ins.split(",")
    t = next(c for c in string.ascii_letters if c not in spec)
    g = jnp.einsum(f"{t}{x_spec},{t}{out}->{w_spec}", xs, dys.astype(xs.dtype),
                   preferred_element_type=jnp.float32)
    return g.astype(w.dtype)


def scan(step: Callable, weights: dict[str, Array], params: Any, fixed: Any, carry: Any, xs: Any,
         consts: Any = None, *, unroll: int = 1):
    """lax.scan of step(tape, params, fixed, carry, x_t, const_t) -> (carry, y_t); see the module doc."""
    return _scan(step, unroll, weights, params, fixed, carry, xs, consts)


def _run(step, unroll, weights, params, fixed, carry, xs, consts, deltas):
    def body(c, inp):
        x, k, d = inp
        tape = Tape(weights, d)
        c, y = step(tape, params, fixed, c, x, k)
        # the products' inputs are kept (stacked) only for the weight gradients
        return c, (y, tape.inputs if deltas is not None else None)
    carry, (ys, inputs) = jax.lax.scan(body, carry, (xs, consts, deltas), unroll=unroll)
    return carry, ys, inputs


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scan(step, unroll, weights, params, fixed, carry, xs, consts):
    carry, ys, _ = _run(step, unroll, weights, params, fixed, carry, xs, consts, None)
    return carry, ys


def _length(xs, consts) -> int:
    leaves = jax.tree.leaves((xs, consts))
    if not leaves:
        raise ValueError("scan needs per-step inputs (xs or consts) to know its length")
    return leaves[0].shape[0]


@jax.tree_util.register_static
class _Specs:
    """The tape's einsum specs, carried to the backward pass as static (hashable) data."""

    def __init__(self, specs: dict[str, str]):
        self.specs = dict(specs)

    def __hash__(self):
        return hash(tuple(sorted(self.specs.items())))

    def __eq__(self, other):
        return isinstance(other, _Specs) and other.specs == self.specs


def _scan_fwd(step, unroll, weights, params, fixed, carry, xs, consts):
    T = _length(xs, consts)
    probe = Tape(weights)  # one abstract step: the shapes and einsum specs of the tape products
    first = jax.tree.map(lambda a: a[0], (xs, consts))
    shapes = jax.eval_shape(lambda p, f, c, x, k: (step(probe, p, f, c, x, k), probe.outputs)[1],
                            params, fixed, carry, *first)
    missing = set(weights) - set(shapes)
    if missing:
        raise ValueError(f"weights never used through the tape: {sorted(missing)}")

    def f(params, carry, xs, deltas):
        carry, ys, inputs = _run(step, unroll, weights, params, fixed, carry, xs, consts, deltas)
        return (carry, ys), inputs

    deltas = {k: jnp.zeros((T,) + s.shape, jnp.float32) for k, s in shapes.items()}
    out, vjp_fn, inputs = jax.vjp(f, params, carry, xs, deltas, has_aux=True)
    return out, (vjp_fn, inputs, weights, _Specs(probe.specs))


def _scan_bwd(step, unroll, res, ct):
    vjp_fn, inputs, weights, specs = res
    d_params, d_carry, d_xs, d_deltas = vjp_fn(ct)
    d_weights = {k: weight_grad(specs.specs[k], inputs[k], d_deltas[k], w) for k, w in weights.items()}
    return d_weights, d_params, None, d_carry, d_xs, None


_scan.defvjp(_scan_fwd, _scan_bwd)
