"""Stacked LSTM/GRU decoder with Luong/Bahdanau attention and optional input feeding.

Two training paths, one set of parameters:
- input feeding on: one `lax.scan` whose body runs every layer and the attention for one step
  (the previous attentional state feeds layer 1, so attention cannot leave the scan). The
  embedding part of layer 1's input projection is still hoisted out, and each LSTM layer's
  input and recurrent matmuls are fused into one.
- input feeding off: each layer is a hoisted scan (as in the encoder), then attention runs for
  all target positions at once, outside any scan.
`step` is the single-step body used by decoding; it computes the same function.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from s2s_jax.config import ModelConfig
from s2s_jax.model.attention import AttentionParams, attend, project_keys
from s2s_jax.model.cells import (RecurrentParams, carry_hidden, cell_update, matmul, row_dropout_mask,
                                 run_layer)

Array = jax.Array


class Decoder(nn.Module):
    config: ModelConfig

    def setup(self):
        cfg = self.config
        H, E = cfg.hidden_dim, cfg.target_embed_dim
        self.layers = [
            RecurrentParams(cfg.cell, (E + H if cfg.input_feeding else E) if i == 0 else H, H, 1,
                            name=f"layer_{i}")
            for i in range(cfg.decoder_layers)
        ]
        if cfg.attention != "none":
            self.attention = AttentionParams(cfg.attention, H)

    # -- parameters prepared once per call, outside any scan ---------------------------------
    def _prepared(self):
        """Per-layer kernels in the compute dtype, LSTM input/recurrent kernels fused."""
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        E = cfg.target_embed_dim
        layers = []
        for i, layer in enumerate(self.layers):
            p = layer()
            w_ih, w_hh = p["input_kernel"][:, 0], p["recurrent_kernel"][0]
            q = {"bias": p["bias"][0]}
            if i == 0:
                q["w_emb"] = w_ih[:E].astype(dtype)
                side = w_ih[E:]  # input-feeding part (empty without input feeding)
            else:
                side = w_ih
            if cfg.cell == "lstm":  # one matmul: [side_input, h] @ [[W_side]; [W_hh]]
                q["w_fused"] = jnp.concatenate([side, w_hh], axis=0).astype(dtype)
            else:
                q["w_side"] = side.astype(dtype)
                q["w_hh"] = w_hh.astype(dtype)
                q["b_hh"] = p["recurrent_bias"][0]
            layers.append(q)
        att = self.attention() if cfg.attention != "none" else None
        return layers, att

    def _body(self, layers, att, gx0, state, memory, keys, mask, masks):
        """One step of all layers + attention.

        gx0 [N, G·H]: layer 1's projected embedding (bias included). state: {"layers": tuple of
        carries, "feed": [N, H]}. masks: per-step dropout masks or None.
        Returns (attentional hidden [N, H], new state, attention weights [N, S] or None).
        """
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        new_carries = []
        inp = None
        for i, q in enumerate(layers):
            carry = state["layers"][i]
            h = carry_hidden(cfg.cell, carry)
            side = (state["feed"] if cfg.input_feeding else None) if i == 0 else inp
            if cfg.cell == "lstm":
                both = h if side is None else jnp.concatenate([side, h], axis=-1)
                gx = (gx0 if i == 0 else q["bias"]) + matmul(both, q["w_fused"], dtype)
                gh = 0.0
            else:
                gx = gx0 if i == 0 else q["bias"]
                if side is not None:
                    gx = gx + matmul(side, q["w_side"], dtype)
                gh = matmul(h, q["w_hh"], dtype) + q["b_hh"]
            carry, out = cell_update(cfg.cell, gx, gh, carry)
            if cfg.residual and i > 0:
                out = out + inp
            if masks is not None and i + 1 < len(layers):
                out = out * masks["between"][i]
            new_carries.append(carry)
            inp = out
        weights = None
        hidden = inp
        if att is not None:
            hidden, weights = attend(att, cfg.attention, inp, keys, memory, mask, dtype,
                                     None if masks is None else masks.get("attention"))
        if masks is not None:
            hidden = hidden * masks["output"]
        return hidden, {"layers": tuple(new_carries), "feed": hidden}, weights

    def project_keys(self, memory: Array) -> Array:
        """Attention keys [B, S, H], computed once per batch (memory itself without attention)."""
        cfg = self.config
        if cfg.attention == "none":
            return memory
        return project_keys(self.attention(), cfg.attention, memory, jnp.dtype(cfg.dtype))

    def initial_state(self, carries, memory):
        return {"layers": tuple(carries), "feed": jnp.zeros_like(memory[:, 0, :], dtype=jnp.float32)}

    def __call__(self, embedded: Array, state, memory: Array, keys: Array, mask: Array,
                 row_ids: Array | None = None, deterministic: bool = True):
        """Teacher-forced decoding of embedded targets [B, T, E].

        Returns (attentional hidden [B, T, H] float32, attention weights [B, T, S] or None).
        """
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        B, T, _ = embedded.shape
        H, L, S = cfg.hidden_dim, cfg.decoder_layers, memory.shape[1]
        train = not deterministic and (cfg.dropout > 0 or cfg.attention_dropout > 0)
        masks = None
        if train:  # all dropout masks drawn up front (per row, time-major): no RNG in the scan
            rng = self.make_rng("dropout")
            k1, k2, k3 = jax.random.split(rng, 3)

            def draw(key, rate, shape):  # [B, T, ...] -> [T, B, ...]
                return jnp.swapaxes(row_dropout_mask(key, rate, row_ids, shape), 0, 1)

            masks = {"between": draw(k1, cfg.dropout, (T, max(L - 1, 1), H)).transpose(0, 2, 1, 3),
                     "output": draw(k2, cfg.dropout, (T, H))}
            if cfg.attention != "none":
                masks["attention"] = draw(k3, cfg.attention_dropout, (T, 1, S))
        layers, att = self._prepared()

        if cfg.input_feeding:
            gx0 = matmul(jnp.swapaxes(embedded, 0, 1), layers[0]["w_emb"], dtype) + layers[0]["bias"]

            def body(carry, xs):
                gx, step_masks = xs
                if step_masks is not None:
                    step_masks = dict(step_masks, between=list(step_masks["between"]))
                hidden, carry, weights = self._body(layers, att, gx, carry, memory, keys, mask, step_masks)
                return carry, (hidden, weights)

            _, (hidden, weights) = jax.lax.scan(body, state, (gx0, masks), unroll=cfg.unroll)
            hidden = jnp.swapaxes(hidden, 0, 1)
            weights = None if weights is None else jnp.swapaxes(weights, 0, 1)
            return hidden, weights

        # No input feeding: hoisted per-layer scans, then attention over all steps at once.
        lengths = jnp.full((B,), T, jnp.int32)  # right padding: later steps never affect earlier ones
        x = embedded
        for i, layer in enumerate(self.layers):
            carry = jax.tree.map(lambda a: a[None], state["layers"][i])
            y, _ = run_layer(layer(), cfg.cell, x, lengths, initial=carry, dtype=dtype, unroll=cfg.unroll)
            if cfg.residual and i > 0:
                y = y + x
            if train and i + 1 < L:
                y = y * jnp.swapaxes(masks["between"][:, i], 0, 1)
            x = y
        weights = None
        if att is not None:
            am = None if not train else jnp.swapaxes(masks["attention"][:, :, 0, :], 0, 1)  # [B, T, S]
            x, weights = attend(att, cfg.attention, x, keys, memory, mask, dtype, am)
        if train:
            x = x * jnp.swapaxes(masks["output"], 0, 1)
        return x, weights

    def step(self, embedded: Array, state, memory: Array, keys: Array, mask: Array):
        """One decoding step: embedded [N, E] -> (hidden [N, H], new state, weights [N, S] | None)."""
        dtype = jnp.dtype(self.config.dtype)
        layers, att = self._prepared()
        gx0 = matmul(embedded, layers[0]["w_emb"], dtype) + layers[0]["bias"]
        return self._body(layers, att, gx0, state, memory, keys, mask, None)
