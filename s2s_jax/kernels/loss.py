"""The output projection and cross-entropy of the loss, fused into one custom-VJP function.

Math, per real target position n with hidden h_n, target y_n and weight w_n:
    logits = h_n W + b;  nll_n = logsumexp(logits) − logits[y_n];
    loss_n = (1 − ε) nll_n + ε (logsumexp(logits) − mean(logits))      (label smoothing ε)
    sums = Σ_n w_n (loss_n, nll_n, [argmax = y_n], 1)
    d loss / d logits = w_n (softmax − (1 − ε) onehot(y_n) − ε / V)

Why (both sets): when differentiated, the forward pass already forms the logits' gradient while
the logits are hot in cache and turns it into the gradients of h, W and b (the same three
matmuls autodiff would run), so the [N, V] logits are read a few times instead of being saved,
re-read and transposed by the backward pass (on the 2-core CPU the projection+loss went from
~1.5× to ~1.0× the cost of its three matmuls). `chunk` > 0 runs it `chunk` time steps at a time
in a scan, so [B, T, V] never exists at once (large vocabularies; both sets).

How the rows are taken, per kernel set (a `Rows`, which the set module builds):
- cpu (`compacted_rows`): only the rows with weight > 0, gathered to the front and scored a block at
  a time by two `fori_loop`s whose trip counts are counted on the device, so padding costs
  nothing (docs/speed.md).
- portable (`static_rows`): all rows, in blocks of at most PORTABLE_ROWS taken by a scan with a
  static trip count (one block, no loop, for batches up to that size). A device-counted trip
  count would make XLA:GPU copy the loop predicate to the host every iteration; with
  length-bucketed batches padding is a small share of the rows.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp

from s2s_jax.kernels.dense import transposed

Array = jax.Array

PORTABLE_ROWS = 4096  # portable: rows per block ([4096, 32k] float32 logits are 512 MB)


@dataclasses.dataclass(frozen=True)
class Rows:
    """How a kernel set takes the loss's rows (kernels/cpu.py, kernels/portable.py build one).

    blocks: `compacted_rows` or `static_rows` (all B·T rows at once, chunk = 0);
    weight_product: the kernel gradient hᵀ·g of a block (dense.rows_transposed_product_*);
    fold_bias: in float32, fold the bias into h and the kernel (`_blocks`);
    transposed_kernel: d_h multiplies a row-major kernelᵀ made once by `dense.transposed` (else
    the plain `.T`, which the dot takes as a layout)."""

    blocks: Callable
    weight_product: Callable
    fold_bias: bool
    transposed_kernel: bool


def _score(h, kernel, bias, y, w, eps: float, dtype, with_grad: bool, product, kernel_t):
    """One block of rows: h [N, H], y [N], w [N] -> sums [4] (loss, nll, correct, weight)
    and, with_grad, the gradients of sums[0] w.r.t. h [N, H], kernel [H, V] and bias [V].
    bias None: it is folded into h and kernel (`_blocks`), and its gradient is None here.
    kernel_t: the cpu set's row-major kernelᵀ [V, H] in `dtype`, made once for all blocks
    (`dense.transposed`: a bfloat16 product with a transposed operand leaves XLA:CPU's YNN path),
    else None. product: the set's `Rows.weight_product`."""
    dtype = jnp.dtype(dtype)
    logits = jnp.matmul(h.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias
    V = logits.shape[-1]
    top = jnp.max(logits, -1, keepdims=True)
    e = jnp.exp(logits - top)
    total = jnp.sum(e, -1, keepdims=True)
    lse = (top + jnp.log(total))[:, 0]
    target_logit = jnp.take_along_axis(logits, y[:, None], -1)[:, 0]
    nll = lse - target_logit
    loss = nll if eps == 0 else (1 - eps) * nll + eps * (lse - logits.mean(-1))
    # argmax(logits) == y, up to ties (a tie with the target counts as correct)
    correct = (target_logit >= top[:, 0]).astype(jnp.float32)
    sums = jnp.stack([(loss * w).sum(), (nll * w).sum(), (correct * w).sum(), w.sum()])
    if not with_grad:
        return sums
    # d loss / d logits = w · (softmax − (1 − eps)·onehot(y) − eps / V)
    hit = jnp.arange(V)[None, :] == y[:, None]
    g = e * (w[:, None] / total) - jnp.where(hit, (1 - eps) * w[:, None], 0.0)
    if eps:
        g = g - (eps / V) * w[:, None]
    gd = g.astype(dtype)
    d_h = jnp.matmul(gd, kernel.astype(dtype).T if kernel_t is None else kernel_t, preferred_element_type=jnp.float32)
    d_kernel = product(h, gd, dtype)  # cpu: on the YNN path
    return sums, d_h, d_kernel, None if bias is None else g.sum(0)


BIG_ROWS = 256   # rows per block until at most three small blocks of real rows remain
SMALL_ROWS = 64  # rows per block for the remainder


def compacted_rows(h, kernel, bias, y, w, eps, dtype, with_grad, product, kernel_t):
    """cpu: _score over only the rows with weight > 0, gathered to the front, a block at a time.

    Padding is a quarter or more of a bucketed batch's target positions, and the output
    projection and softmax are the costliest part of a step, so they run on the real rows only.
    Shapes stay static: two `fori_loop`s whose trip counts are counted on device run two
    compiled block programs: `BIG_ROWS` rows per block until at most three small blocks' worth of
    real rows remain, then `SMALL_ROWS` rows per block (a big block's product runs faster than a
    small one's, and each block also adds its [H, V] kernel gradient into the accumulator; four
    small blocks cost more than one big one). Past the first
    big block at most SMALL_ROWS - 1 filler rows are scored; rows past the real ones carry weight
    0. Block 0 (a big block, or all rows when there are fewer) runs unconditionally and starts the
    accumulators, so the [H, V] kernel gradient is never zero-filled; with no real row it adds
    zeros. A `lax.switch` over a ladder of static capacities was as fast but compiled each
    capacity; measurements in docs/speed.md.
    """
    N, H = h.shape
    RB = min(BIG_ROWS, -(-N // SMALL_ROWS) * SMALL_ROWS)
    RS = min(SMALL_ROWS, RB)
    capacity = N + RB  # the last small blocks may run past N (their rows carry weight 0)
    real = w > 0
    perm = jnp.argsort(~real, stable=True)  # real rows first, in their order
    hp, yp, wp = (jnp.concatenate([jnp.take(a, perm, axis=0), jnp.zeros((capacity - N,) + a.shape[1:], a.dtype)])
                  for a in (h, y, w))
    n_real = real.sum()
    # big blocks until at most RB - RS rows remain (more small blocks cost more than one big)
    n_big = jnp.maximum((n_real - (RB - RS) + RB - 1) // RB, 1)  # block 0 is big
    n_small = jnp.maximum(n_real - n_big * RB + RS - 1, 0) // RS

    def block(start, R):
        rows = lambda a: jax.lax.dynamic_slice_in_dim(a, start, R)  # noqa: E731
        return _score(rows(hp), kernel, bias, rows(yp), rows(wp), eps, dtype, with_grad, product, kernel_t)

    def remaining_blocks(add, acc):
        """Blocks 1 .. n_big - 1 (big), then the small ones: acc = add(acc, start, R)."""
        acc = jax.lax.fori_loop(1, n_big, lambda i, acc: add(acc, i * RB, RB), acc)
        return jax.lax.fori_loop(0, n_small, lambda j, acc: add(acc, n_big * RB + j * RS, RS), acc)

    if not with_grad:
        return remaining_blocks(lambda acc, start, R: acc + block(start, R), block(0, RB))

    def add(acc, start, R):
        sums, d_h, d_kernel, d_bias = acc
        b_sums, b_h, b_kernel, b_bias = block(start, R)
        return (sums + b_sums, jax.lax.dynamic_update_slice_in_dim(d_h, b_h, start, 0),
                d_kernel + b_kernel, None if d_bias is None else d_bias + b_bias)

    sums, h0, d_kernel, d_bias = block(0, RB)
    init = (sums, jnp.concatenate([h0, jnp.zeros((capacity - RB, H), jnp.float32)]), d_kernel, d_bias)
    sums, d_h, d_kernel, d_bias = remaining_blocks(add, init)
    return sums, jnp.take(d_h[:N], jnp.argsort(perm), axis=0), d_kernel, d_bias  # original row order


def static_rows(h, kernel, bias, y, w, eps, dtype, with_grad, product, kernel_t):
    """portable: _score over all N rows in ceil(N / PORTABLE_ROWS) equal blocks (static trip count;
    the last block padded with weight-0 rows), one block and no loop when N <= PORTABLE_ROWS."""
    N, H = h.shape
    if N <= PORTABLE_ROWS:
        return _score(h, kernel, bias, y, w, eps, dtype, with_grad, product, kernel_t)
    n = -(-N // PORTABLE_ROWS)
    R = -(-N // n)
    pad = n * R - N
    blocks = tuple(jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape((n, R) + a.shape[1:]) for a in (h, y, w))
    if not with_grad:
        return jax.lax.map(lambda a: _score(a[0], kernel, bias, a[1], a[2], eps, dtype, False, product, kernel_t),
                           blocks).sum(0)

    def body(acc, a):
        sums, d_h, d_kernel, d_bias = _score(a[0], kernel, bias, a[1], a[2], eps, dtype, True, product, kernel_t)
        return (acc[0] + sums, acc[1] + d_kernel, None if bias is None else acc[2] + d_bias), d_h

    zeros = (jnp.zeros(4, jnp.float32), jnp.zeros(kernel.shape, jnp.float32),
             None if bias is None else jnp.zeros(bias.shape, jnp.float32))
    (sums, d_kernel, d_bias), d_h = jax.lax.scan(body, zeros, blocks)
    return sums, d_h.reshape(n * R, H)[:N], d_kernel, d_bias


def _blocks(h, kernel, bias, y, w, eps, dtype, chunk, with_grad, rows: Rows):
    """h [B, T, H] etc. -> sums [4] and, with_grad, the gradients w.r.t. h, kernel and bias.

    In float32 the bias is folded into the products: h gets a column of ones and the kernel the
    bias as row H, so the logits need no separate bias add over [rows, V] and the bias gradient
    is row H of the kernel gradient instead of a column sum of each block's [rows, V] gradient
    (a pass over the logits less each way, although a contraction of 257 runs a little slower
    than 256 in the logits product; docs/speed.md). cpu set
    only (`Rows.fold_bias`): on GPUs/TPUs a contraction of H + 1 breaks the matmul units' tile alignment, and the
    bias add fuses into the logits' consumers. With a bfloat16 compute dtype the bias stays a
    float32 add (folding would round it to bfloat16).
    """
    if jnp.dtype(dtype) != jnp.float32 or not rows.fold_bias:
        return _unfolded_blocks(h, kernel, bias, y, w, eps, dtype, chunk, with_grad, rows)
    B, T, H = h.shape
    h = jnp.concatenate([h, jnp.ones((B, T, 1), h.dtype)], -1)
    kernel = jnp.concatenate([kernel, bias[None].astype(kernel.dtype)], 0)
    out = _unfolded_blocks(h, kernel, None, y, w, eps, dtype, chunk, with_grad, rows)
    if not with_grad:
        return out
    sums, d_h, d_kernel, _ = out
    return sums, d_h[..., :H], d_kernel[:H], d_kernel[H].astype(bias.dtype)


def _unfolded_blocks(h, kernel, bias, y, w, eps, dtype, chunk, with_grad, rows: Rows):
    """`chunk` time steps per block (0 = all at once, padding rows skipped); bias None when it
    is folded into h and kernel."""
    B, T, H = h.shape
    # cpu: the row-major kernelᵀ for every block's d_h, made once per step (_score)
    kernel_t = transposed(kernel, dtype) if with_grad and rows.transposed_kernel else None
    if chunk <= 0 or chunk >= T:
        flat = (h.reshape(B * T, H), kernel, bias, y.reshape(-1), w.reshape(-1), eps, dtype, with_grad)
        out = rows.blocks(*flat, rows.weight_product, kernel_t)
        if not with_grad:
            return out
        sums, d_h, d_kernel, d_bias = out
        return sums, d_h.reshape(B, T, H), d_kernel, d_bias
    n = -(-T // chunk)
    pad = n * chunk - T

    def split(x):  # [B, T, ...] -> [n, chunk·B, ...], time-major within a block
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = jnp.swapaxes(x.reshape((B, n, chunk) + x.shape[2:]), 0, 1)
        return jnp.swapaxes(x, 1, 2).reshape((n, chunk * B) + x.shape[3:])

    xs = (split(h), split(y), split(w))
    if not with_grad:
        return jax.lax.map(lambda a: _score(a[0], kernel, bias, a[1], a[2], eps, dtype, False, rows.weight_product,
                                            None), xs).sum(0)

    def body(acc, a):
        sums, d_h, d_kernel, d_bias = _score(a[0], kernel, bias, a[1], a[2], eps, dtype, True, rows.weight_product,
                                             kernel_t)
        return (acc[0] + sums, acc[1] + d_kernel, None if bias is None else acc[2] + d_bias), d_h

    zeros = (jnp.zeros(4, jnp.float32), jnp.zeros(kernel.shape, jnp.float32),
             None if bias is None else jnp.zeros(bias.shape, jnp.float32))
    (sums, d_kernel, d_bias), d_h = jax.lax.scan(body, zeros, xs)  # d_h [n, chunk·B, H]
    d_h = jnp.swapaxes(d_h.reshape(n, chunk, B, H), 1, 2).reshape(n, B, chunk, H)
    d_h = jnp.swapaxes(d_h, 0, 1).reshape(B, n * chunk, H)[:, :T]
    return sums, d_h, d_kernel, d_bias


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _fused_loss(h, kernel, bias, y, w, eps, dtype, chunk, rows):
    return _blocks(h, kernel, bias, y, w, eps, dtype, chunk, False, rows)


def _fused_fwd(h, kernel, bias, y, w, eps, dtype, chunk, rows):
    sums, d_h, d_kernel, d_bias = _blocks(h, kernel, bias, y, w, eps, dtype, chunk, True, rows)
    return sums, (d_h, d_kernel, d_bias, jnp.zeros((0,), h.dtype), jnp.zeros((0,), kernel.dtype))  # dtype tags


def _fused_bwd(eps, dtype, chunk, rows, res, ct):
    # Only sums[0] (the training loss) carries a gradient; nll/correct/weight are metrics.
    d_h, d_kernel, d_bias, h_tag, k_tag = res
    c = ct[0]
    return (c * d_h).astype(h_tag.dtype), (c * d_kernel).astype(k_tag.dtype), c * d_bias, None, None


_fused_loss.defvjp(_fused_fwd, _fused_bwd)


def sequence_sums(rows: Rows, hidden: Array, kernel: Array, bias: Array, targets: Array, weights: Array, *,
                  label_smoothing: float = 0.0, chunk: int = 0, dtype=jnp.float32) -> Array:
    """sums [4] (loss, nll, correct, weight) of hidden [B, T, H] projected by kernel [H, V] + bias
    [V] against targets [B, T] with weights [B, T] (float32); differentiable through sums[0].
    rows: the kernel set's `Rows` (KernelSet.sequence_sums binds it)."""
    return _fused_loss(hidden, kernel, bias, targets, weights.astype(jnp.float32), float(label_smoothing),
                       jnp.dtype(dtype).name, int(chunk), rows)
