"""The cpu kernel set: tuned on XLA:CPU (kernels/__init__.py says what it does and why).

Device-counted loss loops over the real rows only, a `lax.cond` around the optimizer update,
optimisation barriers that keep row-major transposes, σ through one tanh, chunked top-k.
"""

from __future__ import annotations

from functools import partial

from s2s_jax.kernels import KernelSet, activations, dense, fused_decoder, loss, recurrence, topk, update

SET = KernelSet(
    name="cpu",
    matmul=dense.matmul_kept_transposes,
    rows_transposed_product=dense.rows_transposed_product_copied,
    lstm_activations=activations.lstm_activations_one_tanh,
    recurrence=partial(recurrence.recurrence, activations.lstm_activations_one_tanh),
    decoder_scan=partial(fused_decoder.decoder_scan, activations.lstm_activations_one_tanh),
    sequence_sums=partial(loss.sequence_sums, loss.Rows(
        blocks=loss.compacted_rows, weight_product=dense.rows_transposed_product_copied,
        fold_bias=True, transposed_kernel=True)),
    global_norm=update.global_norm,
    apply_if=update.apply_if_cond,
    best_token=topk.best_token_chunked,
    top_extensions=topk.top_extensions_chunked,
)
