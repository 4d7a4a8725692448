"""x·W in the compute dtype with a float32 result, and the weight-gradient product.

Math: y = x W for x [N, D], W [D, G]; dx = dy Wᵀ, dW = xᵀ dy.

cpu: `dense` has a hand-written backward pass. Autodiff of a time-major projection ([T, B, D]
@ [D, G]) leaves XLA:CPU a weight gradient contracting over two leading axes; it transposes the
[T·B, G] cotangent and runs the product on its slower generic (Eigen) path. Here the backward
multiplies a materialised xᵀ [D, N] (a small copy: D is the narrow side), kept by an
optimisation barrier because XLA would fold the transpose back into the dot, by dy [N, G]: a
plain row-major product on the YNN path (docs/speed.md, "What the code does").

bfloat16 on CPU: XLA:CPU runs a bfloat16 dot on its library (YNN) path, where x86 CPUs with
AMX or AVX512-BF16 multiply ~4x faster than float32, only when both operands are row-major and
the left one is not transposed; any other bfloat16 dot is silently rewritten to a float32 dot
(both operands converted) on the generic path. A transpose kept by a barrier is not enough:
layout assignment turns it into a column-major layout of the same buffer. `transposed` forces a
real, row-major copy by flattening the transposed array behind the barrier (a reshape of a
transposed array has to move the data), so both backward products (dx = dy·Wᵀ with a
materialised Wᵀ, dW = xᵀ·dy) stay bfloat16 products on the YNN path. Measured in docs/speed.md.

portable: the plain product, differentiated by JAX; the barrier would block fusion on GPU/TPU,
where the dot emitters take either layout at full speed.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

Array = jax.Array


def matmul_kept_transposes(x: Array, w: Array, dtype) -> Array:
    """cpu: x [..., D] @ w [D, G] with inputs in the compute dtype and a float32 result; leading
    axes are flattened into rows; the backward pass is `dense`'s (module doc)."""
    lead = x.shape[:-1]
    y = dense(x.reshape(-1, x.shape[-1]), w, jnp.dtype(dtype).name)
    return y.reshape(lead + (w.shape[-1],))


def matmul_autodiff(x: Array, w: Array, dtype) -> Array:
    """portable: the same product, plain, differentiated by JAX."""
    lead = x.shape[:-1]
    y = _plain(x.reshape(-1, x.shape[-1]), w, jnp.dtype(dtype).name)
    return y.reshape(lead + (w.shape[-1],))


def _plain(x: Array, w: Array, dtype: str) -> Array:
    dt = jnp.dtype(dtype)
    return jnp.matmul(x.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x: Array, w: Array, dtype: str) -> Array:
    """cpu: x [N, D] @ w [D, G] in `dtype` with a float32 result (backward: module doc)."""
    return _plain(x, w, dtype)


def transposed(x: Array, dtype) -> Array:
    """cpu: xᵀ [D, N] of x [N, D] in `dtype`, as a real row-major copy (module doc): the flat
    reshape behind the barrier moves the data, so XLA cannot turn the transpose into a layout."""
    n, d = x.shape
    flat = jax.lax.optimization_barrier(x.astype(jnp.dtype(dtype)).T.reshape(n * d))
    return flat.reshape(d, n)


def _dense_fwd(x, w, dtype):
    return dense(x, w, dtype), (x, w)


def rows_transposed_product_copied(x: Array, dy: Array, dtype) -> Array:
    """cpu: xᵀ [D, N] @ dy [N, G] in `dtype` with a float32 result (a weight gradient summed over
    rows), through a real transposed copy of x (`transposed`, module doc)."""
    dt = jnp.dtype(dtype)
    return jnp.matmul(transposed(x, dt), dy.astype(dt), preferred_element_type=jnp.float32)


def rows_transposed_product_einsum(x: Array, dy: Array, dtype) -> Array:
    """portable: the same product as the contraction over x's row axis, as XLA likes it."""
    dt = jnp.dtype(dtype)
    return jnp.einsum("nd,ng->dg", x.astype(dt), dy.astype(dt), preferred_element_type=jnp.float32)


def _dense_bwd(dtype, res, dy):
    x, w = res
    dt = jnp.dtype(dtype)
    dy = dy.astype(dt)
    dx = jnp.matmul(dy, transposed(w, dt), preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), rows_transposed_product_copied(x, dy, dt).astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)
