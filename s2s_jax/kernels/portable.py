"""The portable kernel set: static control flow only, for GPUs and TPUs (kernels/__init__.py
says what it does and why).

Every loop has a trip count known at compile time, no `cond` (a select-based guard), no
optimisation barrier; the plain product, sigmoid, argmax and top-k, which those backends fuse.
"""

from __future__ import annotations

from functools import partial

from s2s_jax.kernels import KernelSet, activations, dense, fused_decoder, loss, recurrence, topk, update

SET = KernelSet(
    name="portable",
    matmul=dense.matmul_autodiff,
    rows_transposed_product=dense.rows_transposed_product_einsum,
    lstm_activations=activations.lstm_activations_sigmoid,
    recurrence=partial(recurrence.recurrence, activations.lstm_activations_sigmoid),
    decoder_scan=partial(fused_decoder.decoder_scan, activations.lstm_activations_sigmoid),
    sequence_sums=partial(loss.sequence_sums, loss.Rows(
        blocks=loss.static_rows, weight_product=dense.rows_transposed_product_einsum,
        fold_bias=False, transposed_kernel=False)),
    global_norm=update.global_norm,
    apply_if=update.apply_if_select,
    best_token=topk.best_token_plain,
    top_extensions=topk.top_extensions_plain,
)
