"""Stacked LSTM/GRU decoder with Luong/Bahdanau attention and optional input feeding.

Two training paths, one set of parameters:
- input feeding on: one scan whose body runs every layer and the attention for one step
  (the previous attentional state feeds layer 1, so attention cannot leave the scan): the
  kernel set's `decoder_scan` (the fused decoder where model.fused_decoder allows it, else
  `_step` through the taped scan). The embedding part of layer 1's input projection is still
  hoisted out, and each LSTM layer's input and recurrent matmuls are fused into one.
- input feeding off: each layer is a hoisted scan (as in the encoder), then attention runs for
  all target positions at once, outside any scan.
`step` is the single-step body used by decoding; it computes the same function.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from s2s_jax.config import ModelConfig
from s2s_jax.kernels import KernelSet
from s2s_jax.kernels.deferred_scan import plain_dot
from s2s_jax.model.attention import AttentionParams, attend, project_keys
from s2s_jax.kernels.recurrence import layer_norm_gates
from s2s_jax.model.cells import RecurrentParams, carry_hidden, cell_update, row_dropout_mask, run_layer

Array = jax.Array


class Decoder(nn.Module):
    config: ModelConfig
    kernels: KernelSet

    def setup(self):
        cfg = self.config
        H, E = cfg.hidden_dim, cfg.target_embed_dim
        self.layers = [
            RecurrentParams(cfg.cell, (E + H if cfg.input_feeding else E) if i == 0 else H, H, 1,
                            cfg.layer_norm, name=f"layer_{i}")
            for i in range(cfg.decoder_layers)
        ]
        if cfg.attention != "none":
            self.attention = AttentionParams(cfg.attention, H, cfg.coverage)

    # -- parameters prepared once per call, outside any scan ---------------------------------
    def _prepared(self) -> dict[str, Array]:
        """The step's arrays by name (module doc of `_step`); LSTM input/recurrent kernels fused.

        Matmul kernels are cast to the compute dtype here, once per call, not in every step.
        """
        cfg = self.config
        E = cfg.target_embed_dim
        dtype = jnp.dtype(cfg.dtype)
        W = {}
        for i, layer in enumerate(self.layers):
            p = layer()
            w_ih, w_hh = p["input_kernel"][:, 0], p["recurrent_kernel"][0]
            W[f"layer{i}_bias"] = p["bias"][0]
            if i == 0:
                W["w_emb"] = w_ih[:E]
                side = w_ih[E:]  # input-feeding part (empty without input feeding)
            else:
                side = w_ih
            if cfg.cell == "lstm" and cfg.layer_norm == "off":  # one matmul: [side_input, h] @ [[W_side]; [W_hh]]
                W[f"layer{i}"] = jnp.concatenate([side, w_hh], axis=0)
            else:  # GRU, or layer norm (x·W_ih and h·W_hh are normalised apart)
                if side.shape[0]:
                    W[f"layer{i}_side"] = side
                W[f"layer{i}_hh"] = w_hh
                if cfg.cell == "gru":
                    W[f"layer{i}_b_hh"] = p["recurrent_bias"][0]
            if cfg.layer_norm != "off":
                W[f"layer{i}_in_norm"] = p["input_norm_scale"][0]  # [g, G·H/g]
                W[f"layer{i}_rec_norm"] = p["recurrent_norm_scale"][0]
        if cfg.attention != "none":
            W.update({f"att_{k}": v for k, v in self.attention().items()})
        # every array but the biases and norm gains (used in float32) is a matmul kernel
        return {k: v if k.endswith(("bias", "b_hh", "_norm")) else v.astype(dtype) for k, v in W.items()}

    def project_keys(self, memory: Array) -> Array:
        """Attention keys [B, S, H], computed once per batch (memory itself without attention)."""
        cfg = self.config
        if cfg.attention == "none":
            return memory
        return project_keys(self.attention(), cfg.attention, memory, jnp.dtype(cfg.dtype), self.kernels)

    def initial_state(self, carries, memory):
        state = {"layers": tuple(carries), "feed": jnp.zeros_like(memory[:, 0, :], dtype=jnp.float32)}
        if self.config.coverage:  # c_0 = 0 [B, S]
            state["coverage"] = jnp.zeros(memory.shape[:2], jnp.float32)
        return state

    def __call__(self, embedded: Array, state, memory: Array, keys: Array, mask: Array,
                 row_ids: Array | None = None, deterministic: bool = True):
        """Teacher-forced decoding of embedded targets, time-major [T, B, E].

        Returns (attentional hidden [B, T, H] float32, attention weights [B, T, S] or None).
        """
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        ks = self.kernels
        T, B, _ = embedded.shape
        L, S = cfg.decoder_layers, memory.shape[1]
        masks = self._training_masks(T, S, row_ids, deterministic)
        train = masks is not None
        W = self._prepared()
        layers = [layer() for layer in self.layers] if not cfg.input_feeding else None

        if cfg.input_feeding:  # the kernel set's decoder scan (fused, or this step taped)
            gx0 = project_embedding(cfg, ks, embedded, W.pop("w_emb"), W)  # [T, B, G·H]
            hidden, weights = ks.decoder_scan(cfg, W, gx0, state, memory, keys, mask, masks,
                                              step=functools.partial(_step, cfg, ks), tape_names=_tape_names(cfg))
            return jnp.swapaxes(hidden, 0, 1), None if weights is None else jnp.swapaxes(weights, 0, 1)

        # No input feeding: hoisted per-layer scans, then attention over all steps at once.
        lengths = jnp.full((B,), T, jnp.int32)  # right padding: later steps never affect earlier ones
        x = embedded  # time-major through the layers
        for i, layer in enumerate(layers):
            carry = jax.tree.map(lambda a: a[None], state["layers"][i])
            y, _ = run_layer(layer, cfg.cell, x, lengths, ks=ks, initial=carry, dtype=dtype, unroll=cfg.unroll,
                             state_mask=masks["recurrent"][0, i][None] if train and "recurrent" in masks else None)
            if cfg.residual and i > 0:
                y = y + x
            if train and i + 1 < L:
                y = y * masks["between"][:, i]
            x = y
        x = jnp.swapaxes(x, 0, 1)  # [B, T, H]
        weights = None
        if cfg.attention != "none":
            am = None if not train else jnp.swapaxes(masks["attention"][:, :, 0, :], 0, 1)  # [B, T, S]
            if cfg.coverage:
                x, weights = _attend_with_coverage(cfg, W, x, keys, memory, mask, am, state["coverage"])
            else:
                x, weights = attend(_attention_params(W), cfg.attention, x, keys, memory, mask, dtype, am)
        if train:
            x = x * jnp.swapaxes(masks["output"], 0, 1)
        return x, weights

    def _training_masks(self, T: int, S: int, row_ids: Array | None, deterministic: bool) -> dict | None:
        """The time-major dropout masks of a teacher-forced call, all drawn up front (per row, so
        batch-split invariant; no RNG in the scan): "between" [T, L', B, H], "output" [T, B, H],
        "attention" [T, B, 1, S] (with attention), and `recipe_masks`'; None when not training."""
        cfg = self.config
        H, L = cfg.hidden_dim, cfg.decoder_layers
        train = not deterministic and (cfg.dropout > 0 or cfg.attention_dropout > 0 or cfg.output_dropout > 0
                                       or cfg.recurrent_dropout > 0)
        if not train:
            return None
        rng = self.make_rng("dropout")
        k1, k2, k3 = jax.random.split(rng, 3)

        def draw(key, rate, shape):  # [B, T, ...] -> [T, B, ...]
            return jnp.swapaxes(row_dropout_mask(key, rate, row_ids, shape), 0, 1)

        masks = {"between": draw(k1, cfg.dropout, (T, max(L - 1, 1), H)).transpose(0, 2, 1, 3),
                 "output": draw(k2, cfg.dropout, (T, H))}
        if cfg.attention != "none":
            masks["attention"] = draw(k3, cfg.attention_dropout, (T, 1, S))
        return recipe_masks(cfg, masks, rng, row_ids, T)

    def _one_step(self, W: dict, dot, gx0: Array, state):
        """The decoding step's body (`_step`; the conditional decoder overrides it)."""
        return _step(self.config, self.kernels, W, dot, gx0, state, None)

    def step(self, embedded: Array | None, state, memory: Array, keys: Array, mask: Array,
             projected: Array | None = None):
        """One decoding step: embedded [N, E] -> (hidden [N, H], new state, weights [N, S] | None).

        memory, keys [M, S, H], mask [M, S]: per row (M = N), or shared by groups of G = N / M
        consecutive rows (the G beams of a sentence: row n attends over entry n // G), which
        reads each entry once per step instead of once per row; same function as tiling them.
        projected [N, G·H]: layer 1's projected input (`input_projection_table` rows of the
        tokens), used instead of embedded, which may then be None.
        """
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        W = self._prepared()
        w_emb = W.pop("w_emb")
        ks = self.kernels
        gx0 = projected if projected is not None else project_embedding(cfg, ks, embedded, w_emb, W)
        dot = plain_dot
        rows, entries = gx0.shape[0], memory.shape[0]
        if entries != rows and cfg.attention != "none":
            if rows % entries:
                raise ValueError(f"{rows} decoder rows cannot share {entries} memory entries evenly")
            group = rows // entries
            mask = jnp.repeat(mask, group, axis=0)  # [N, S]: cheap, unlike memory and keys
            if cfg.attention == "mlp":  # its features are per (row, source position) anyway
                memory, keys = (jnp.repeat(a, group, axis=0) for a in (memory, keys))
            else:
                dot = _grouped_attention_dot(group)
        W.update(memory=memory, keys=keys, mask=mask)
        return self._one_step(W, dot, gx0, state)


def _attention_params(W: dict) -> dict:
    return {k[4:]: v for k, v in W.items() if k.startswith("att_")}


def _tape_names(cfg: ModelConfig) -> set[str]:
    """The arrays the step only multiplies by (their gradients can wait until after the loop)."""
    names = {f"layer{i}" for i in range(cfg.decoder_layers)} if cfg.cell == "lstm" and cfg.layer_norm == "off" else (
        {f"layer{i}_side" for i in range(cfg.decoder_layers)} | {f"layer{i}_hh" for i in range(cfg.decoder_layers)})
    if cfg.attention != "none":
        names |= {"att_output_kernel", "memory"}
        names |= {"att_query_kernel", "att_v"} if cfg.attention == "mlp" else {"keys"}
    return names


def _step(cfg: ModelConfig, ks: KernelSet, W: dict, dot, gx0: Array, state, masks):
    """One step of all layers + attention (ks: the model's kernel set).

    W: the arrays by name — per layer i `layer{i}_bias` and, LSTM, the fused `layer{i}` =
    [[W_side]; [W_hh]] or, GRU, `layer{i}_side` (absent without a side input), `layer{i}_hh`,
    `layer{i}_b_hh`; `att_*` (attention.py's parameters); `memory`, `keys`, `mask`.
    dot: deferred_scan.Tape.dot inside the training scan, plain_dot elsewhere.
    gx0 [N, G·H]: layer 1's projected embedding (bias included). state: {"layers": tuple of
    carries, "feed": [N, H]}. masks: per-step dropout masks or None.
    Returns (attentional hidden [N, H], new state, attention weights [N, S] or None).
    """
    dtype = jnp.dtype(cfg.dtype)
    new_carries = []
    inp = None
    L = cfg.decoder_layers
    for i in range(L):
        carry = state["layers"][i]
        h = carry_hidden(cfg.cell, carry)
        side = (state["feed"] if cfg.input_feeding else None) if i == 0 else inp
        gx = gx0 if i == 0 else W[f"layer{i}_bias"]
        if masks is not None and "recurrent" in masks:  # model.recurrent_dropout: on h entering h·W_hh
            h = h * masks["recurrent"][i]
        if cfg.layer_norm != "off":
            gx, gh = normed_preactivations(cfg, W, dot, i, gx0 if i == 0 else None, side, h)
        elif cfg.cell == "lstm":  # one matmul: [side_input, h] @ [[W_side]; [W_hh]]
            both = h if side is None else jnp.concatenate([side, h], axis=-1)
            gx = gx + dot(f"layer{i}", "ni,ig->ng", both, W[f"layer{i}"], dtype)
            gh = 0.0
        else:
            if side is not None:
                gx = gx + dot(f"layer{i}_side", "ni,ig->ng", side, W[f"layer{i}_side"], dtype)
            gh = dot(f"layer{i}_hh", "nh,hg->ng", h, W[f"layer{i}_hh"], dtype) + W[f"layer{i}_b_hh"]
        carry, out = cell_update(cfg.cell, gx, gh, carry, ks)
        if cfg.residual and i > 0:
            out = out + inp
        if masks is not None and i + 1 < L:
            out = out * masks["between"][i]
        new_carries.append(carry)
        inp = out
    weights = None
    hidden = inp
    new_state = dict(state, layers=tuple(new_carries))  # other entries (copy's source_ext) ride along
    if cfg.attention != "none":
        hidden, weights = attend(_attention_params(W), cfg.attention, inp, W["keys"], W["memory"], W["mask"],
                                 dtype, None if masks is None else masks.get("attention"), dot=dot,
                                 coverage=state.get("coverage"))
        if cfg.coverage:
            new_state["coverage"] = state["coverage"] + weights
    if masks is not None:
        hidden = hidden * masks["output"]
    new_state["feed"] = hidden
    return hidden, new_state, weights


# -- coverage (model.coverage) ---------------------------------------------------------------
def _attend_with_coverage(cfg: ModelConfig, W: dict, x: Array, keys: Array, memory: Array, mask: Array,
                          dropout: Array | None, coverage: Array):
    """Attention of every target position (x [B, T, H]) without input feeding, with coverage:
    step t's scores read c_t = c_0 + Σ_{t'<t} a_t', so the steps run in a scan over time.
    dropout: [B, T, S] or None. Returns (hidden [B, T, H], weights [B, T, S])."""
    params, dtype = _attention_params(W), jnp.dtype(cfg.dtype)

    def body(cov, xs):
        q, am = xs
        hidden, weights = attend(params, cfg.attention, q, keys, memory, mask, dtype, am, coverage=cov)
        return cov + weights, (hidden, weights)

    time_major = lambda a: None if a is None else jnp.swapaxes(a, 0, 1)  # noqa: E731
    _, (hidden, weights) = jax.lax.scan(body, coverage, (time_major(x), time_major(dropout)), unroll=cfg.unroll)
    return time_major(hidden), time_major(weights)


def _grouped_attention_dot(group: int):
    """`plain_dot` for `attend` (dot / general) with keys and memory [M, S, H] shared by groups of
    `group` consecutive query rows (N = M * group): each entry is read once, by all its rows.

    attend's "keys" product "bth,bsh->bts" (queries [N, T, H]) becomes one [group*T, H] x
    [H, S] product per entry, and its "memory" product "bts,bsh->bth" one [group*T, S] x
    [S, H] product; every other product is plain_dot's.
    """
    def dot(name: str, spec: str, x: Array, w: Array, dtype=jnp.float32) -> Array:
        if name in ("keys", "memory") and spec in ("bth,bsh->bts", "bts,bsh->bth"):
            n, t, d = x.shape
            out = plain_dot(name, spec, x.reshape(n // group, group * t, d), w, dtype)
            return out.reshape(n, t, out.shape[-1])
        return plain_dot(name, spec, x, w, dtype)

    return dot


def input_projection_table(decoder: Decoder, embedding: Array) -> Array:
    """embedding [V, E] -> [V, G·H], layer 1's projected input (bias included) of every target
    token: a decoding step gathers its tokens' rows (`Decoder.step(projected=...)`) instead of
    multiplying [N, E] embeddings each step. Call it on a bound decoder (inside `apply`).
    """
    W = decoder._prepared()
    return project_embedding(decoder.config, decoder.kernels, embedding, W["w_emb"], W)


# -- recipe parts: layer normalisation, output and recurrent dropout (docs/model.md) ---------------

def project_embedding(cfg: ModelConfig, ks: KernelSet, embedded: Array, w_emb: Array, W: dict) -> Array:
    """Layer 1's input pre-activation from the embeddings [..., E] -> [..., G·H]: with its bias,
    or, with model.layer_norm or the conditional decoder, without it (the step adds it)."""
    if cfg.layer_norm != "off" or cfg.decoder_type == "conditional":
        return ks.matmul(embedded, w_emb, jnp.dtype(cfg.dtype))
    return ks.matmul(embedded, w_emb, jnp.dtype(cfg.dtype)) + W["layer0_bias"]


def normed_preactivations(cfg: ModelConfig, W: dict, dot, i: int, gx0: Array | None, side: Array | None,
                           h: Array) -> tuple[Array, Array]:
    """model.layer_norm: layer i's (LN(x·W_ih) + b, LN(h·W_hh) [+ b_hh for GRU]), x = [embedding;
    side] for layer 0 (gx0: the embedding's part, no bias) and the layer below's output above."""
    dtype = jnp.dtype(cfg.dtype)
    px = gx0
    if side is not None:
        ps = dot(f"layer{i}_side", "ni,ig->ng", side, W[f"layer{i}_side"], dtype)
        px = ps if px is None else px + ps
    gx = layer_norm_gates(px, W[f"layer{i}_in_norm"]) + W[f"layer{i}_bias"]
    gh = layer_norm_gates(dot(f"layer{i}_hh", "nh,hg->ng", h, W[f"layer{i}_hh"], dtype), W[f"layer{i}_rec_norm"])
    return gx, (gh + W[f"layer{i}_b_hh"] if cfg.cell == "gru" else gh)


def recipe_masks(cfg: ModelConfig, masks: dict, rng: Array, row_ids: Array, T: int) -> dict:
    """Adds the masks of model.output_dropout (multiplied into "output", [T, B, H]) and
    model.recurrent_dropout ("recurrent" [T, L, B, H]: one mask per sequence and layer, the same
    at every step) to the decoder's time-major dropout masks; unchanged when both are off."""
    H = cfg.hidden_dim
    L = 2 if cfg.decoder_type == "conditional" else cfg.decoder_layers  # conditional: its two transitions
    if cfg.output_dropout > 0:
        extra = row_dropout_mask(jax.random.fold_in(rng, 3), cfg.output_dropout, row_ids, (T, H))
        masks = dict(masks, output=masks["output"] * jnp.swapaxes(extra, 0, 1))
    if cfg.recurrent_dropout > 0:
        rec = jnp.swapaxes(row_dropout_mask(jax.random.fold_in(rng, 4), cfg.recurrent_dropout, row_ids, (L, H)), 0, 1)
        masks = dict(masks, recurrent=jnp.broadcast_to(rec[None], (T,) + rec.shape))
    return masks
