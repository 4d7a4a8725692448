"""Stacked (bi)directional LSTM/GRU encoder."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from s2s_jax.config import ModelConfig
from s2s_jax.kernels import KernelSet
from s2s_jax.model.cells import RecurrentParams, row_dropout_mask, run_layer

Array = jax.Array


def merge_directions(cell: str, carry):
    """Final carry with directions stacked [K, B, h] -> [B, K·h] (direction 0 first)."""
    def merge(x):
        return jnp.concatenate(list(x), axis=-1)
    return jax.tree.map(merge, carry) if cell == "lstm" else merge(carry)


class Encoder(nn.Module):
    """embedded source [S, B, E] (time-major) -> memory [B, S, H], per-layer final carries ([B, H] each).

    Bidirectional layers have H/2 units per direction (OpenNMT's `brnn`), so the memory and the
    final states have the decoder's size H whatever the direction count. Dropout on the
    embeddings and between layers; residual connections from layer 2 on.
    """

    config: ModelConfig
    kernels: KernelSet

    def setup(self):
        cfg = self.config
        K = 2 if cfg.bidirectional else 1
        self.layers = [
            RecurrentParams(cfg.cell, cfg.source_embed_dim if i == 0 else cfg.hidden_dim,
                            cfg.hidden_dim // K, K, cfg.layer_norm, name=f"layer_{i}")
            for i in range(cfg.encoder_layers)
        ]

    def __call__(self, embedded: Array, lengths: Array, row_ids: Array | None = None,
                 deterministic: bool = True):
        """embedded: time-major [S, B, E]. row_ids [B]: global row index of each example, for
        batch-split-invariant dropout. Returns memory [B, S, H] (zero at padding) and the finals."""
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        train = not deterministic and cfg.dropout > 0
        key = self.make_rng("dropout") if train else None
        state_masks = self._recurrent_masks(row_ids, deterministic)
        x = embedded
        finals = []
        for i, layer in enumerate(self.layers):
            if train:  # on the embeddings (i = 0) and between layers; drawn per row, [B, S, D]
                keep = row_dropout_mask(jax.random.fold_in(key, i), cfg.dropout, row_ids,
                                        (x.shape[0], x.shape[2]))
                x = x * jnp.swapaxes(keep, 0, 1)
            y, final = run_layer(layer(), cfg.cell, x, lengths, ks=self.kernels, dtype=dtype, unroll=cfg.unroll,
                                 state_mask=None if state_masks is None else state_masks[i])
            x = y + x if (cfg.residual and i > 0) else y
            finals.append(merge_directions(cfg.cell, final))
        x = jnp.swapaxes(x, 0, 1)  # [B, S, H]
        mask = jnp.arange(x.shape[1])[None, :] < lengths[:, None]
        return jnp.where(mask[..., None], x, 0.0), finals

    def _recurrent_masks(self, row_ids: Array | None, deterministic: bool) -> list[Array] | None:
        """model.recurrent_dropout: per layer, one mask [K, B, H/K] per sequence (the same at every
        step) on the state entering h·W_hh; None when off or not training."""
        cfg = self.config
        if deterministic or cfg.recurrent_dropout == 0:
            return None
        key = self.make_rng("dropout")
        K = 2 if cfg.bidirectional else 1
        return [jnp.swapaxes(row_dropout_mask(jax.random.fold_in(key, i), cfg.recurrent_dropout, row_ids,
                                              (K, cfg.hidden_dim // K)), 0, 1)
                for i in range(cfg.encoder_layers)]
