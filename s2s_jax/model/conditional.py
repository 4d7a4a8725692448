"""The conditional GRU decoder (cGRU; Nematus, Sennrich et al. 2017; nmtpy, Caglayan et al. 2017).

Per target step j, with y_{j-1} the previous target embedding and s_{j-1} the decoder state
(model.cell=gru; with lstm the same with LSTM transitions and (h, c) states):

    s'_j = GRU_1(y_{j-1}, s_{j-1})                    transition 1, on the embedding
    c_j, a_j = attention(query s'_j, memory)          model.attention (mlp = Bahdanau, as Nematus)
    s_j  = GRU_2(c_j, s'_j)                           transition 2, on the context
    t_j  = tanh([c_j; s_j] · W_c + y_{j-1} · W_y + b_y)   deep output (Nematus/nmtpy-Theano), [H]

t_j is the decoder's hidden output (dropout, output projection and loss as for the stacked
decoder). Parameters (under `decoder`): layer_0 (transition 1, input E), layer_1 (transition 2,
input H), attention (its output_kernel [2H, H] is W_c), embedding_output_kernel W_y [E, H],
embedding_output_bias b_y [H]. model.layer_norm normalises both transitions' pre-activations;
model.recurrent_dropout masks the state entering each transition's h·W_hh.

Training runs the kernel set's decoder scan with this step (the generic, taped scan), decoding
the same step; both use the stacked decoder's machinery (model/decoder.py) for everything else.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from s2s_jax.config import ModelConfig
from s2s_jax.kernels import KernelSet
from s2s_jax.kernels.recurrence import layer_norm_gates
from s2s_jax.model.attention import AttentionParams, attention_context
from s2s_jax.model.cells import GATES, RecurrentParams, carry_hidden, cell_update
from s2s_jax.model.decoder import Decoder, _attention_params, project_embedding

Array = jax.Array


class ConditionalDecoder(Decoder):
    """model.decoder_type="conditional": the interface of `Decoder` (teacher forcing, `step`,
    keys, initial state, `input_projection_table`)."""

    def setup(self):
        cfg = self.config
        H, E = cfg.hidden_dim, cfg.target_embed_dim
        self.layers = [RecurrentParams(cfg.cell, E, H, 1, cfg.layer_norm, name="layer_0"),
                       RecurrentParams(cfg.cell, H, H, 1, cfg.layer_norm, name="layer_1")]
        self.attention = AttentionParams(cfg.attention, H)
        self.embedding_output_kernel = self.param("embedding_output_kernel", nn.initializers.lecun_uniform(), (E, H))
        self.embedding_output_bias = self.param("embedding_output_bias", nn.initializers.zeros, (H,))

    def _prepared(self) -> dict[str, Array]:
        """`w_emb` [E, G·H + H] = [W_ih of transition 1, W_y] (one hoisted product of the
        embeddings), `layer0_bias` [G·H + H] its biases (added in the step); per transition i
        `layer{i}_hh`, `layer{i}_b_hh` (GRU), `layer{i}_in_norm`/`_rec_norm` (layer norm);
        `layer1_side` (the context's W_ih), `layer1_bias`; `att_*`."""
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        p0, p1 = (layer() for layer in self.layers)
        W = {"w_emb": jnp.concatenate([p0["input_kernel"][:, 0], self.embedding_output_kernel], -1),
             "layer0_bias": jnp.concatenate([p0["bias"][0], self.embedding_output_bias]),
             "layer1_side": p1["input_kernel"][:, 0], "layer1_bias": p1["bias"][0]}
        for i, p in enumerate((p0, p1)):
            W[f"layer{i}_hh"] = p["recurrent_kernel"][0]
            if cfg.cell == "gru":
                W[f"layer{i}_b_hh"] = p["recurrent_bias"][0]
            if cfg.layer_norm != "off":
                W[f"layer{i}_in_norm"] = p["input_norm_scale"][0]
                W[f"layer{i}_rec_norm"] = p["recurrent_norm_scale"][0]
        W.update({f"att_{k}": v for k, v in self.attention().items()})
        return {k: v if k.endswith(("bias", "b_hh", "_norm")) else v.astype(dtype) for k, v in W.items()}

    def __call__(self, embedded: Array, state, memory: Array, keys: Array, mask: Array,
                 row_ids: Array | None = None, deterministic: bool = True):
        """Teacher forcing, embedded [T, B, E] -> (hidden [B, T, H], weights [B, T, S])."""
        cfg, ks = self.config, self.kernels
        T, S = embedded.shape[0], memory.shape[1]
        masks = self._training_masks(T, S, row_ids, deterministic)
        W = self._prepared()
        gx0 = project_embedding(cfg, ks, embedded, W.pop("w_emb"), W)  # [T, B, G·H + H]
        hidden, weights = ks.decoder_scan(cfg, W, gx0, state, memory, keys, mask, masks,
                                          step=lambda *a: conditional_step(cfg, ks, *a), tape_names=tape_names(cfg))
        return jnp.swapaxes(hidden, 0, 1), jnp.swapaxes(weights, 0, 1)

    def _one_step(self, W: dict, dot, gx0: Array, state):
        return conditional_step(self.config, self.kernels, W, dot, gx0, state, None)


def tape_names(cfg: ModelConfig) -> set[str]:
    """The arrays `conditional_step` only multiplies by (gradients formed after the loop)."""
    names = {"layer0_hh", "layer1_side", "layer1_hh", "att_output_kernel", "memory"}
    return names | ({"att_query_kernel", "att_v"} if cfg.attention == "mlp" else {"keys"})


def _transition(cfg: ModelConfig, ks: KernelSet, W: dict, dot, i: int, px: Array, carry, state_mask):
    """Transition i: px = x·W_ih [N, G·H] (no bias), carry -> (new carry, new hidden)."""
    dtype = jnp.dtype(cfg.dtype)
    h = carry_hidden(cfg.cell, carry)
    gh = dot(f"layer{i}_hh", "nh,hg->ng", h if state_mask is None else h * state_mask, W[f"layer{i}_hh"], dtype)
    if cfg.layer_norm != "off":
        px, gh = layer_norm_gates(px, W[f"layer{i}_in_norm"]), layer_norm_gates(gh, W[f"layer{i}_rec_norm"])
    if cfg.cell == "gru":
        gh = gh + W[f"layer{i}_b_hh"]
    G = GATES[cfg.cell] * cfg.hidden_dim
    return cell_update(cfg.cell, px + W[f"layer{i}_bias"][:G], gh, carry, ks)


def conditional_step(cfg: ModelConfig, ks: KernelSet, W: dict, dot, gx0: Array, state, masks):
    """One cGRU step (module doc). gx0 [N, G·H + H]: the embedding's products with [W_ih of
    transition 1, W_y] (no bias); state {"layers": (carry,), "feed"}; masks: this step's dropout
    masks or None. Returns (hidden [N, H], new state, attention weights [N, S])."""
    dtype = jnp.dtype(cfg.dtype)
    G = GATES[cfg.cell] * cfg.hidden_dim
    rec = None if masks is None else masks.get("recurrent")  # [2, N, H]
    carry, query = _transition(cfg, ks, W, dot, 0, gx0[:, :G], state["layers"][0], None if rec is None else rec[0])
    context, weights = attention_context(_attention_params(W), cfg.attention, query[:, None], W["keys"], W["memory"],
                                         W["mask"], dtype, None if masks is None else masks.get("attention"), dot)
    context, weights = context[:, 0], weights[:, 0]
    px = dot("layer1_side", "ni,ig->ng", context, W["layer1_side"], dtype)
    carry, out = _transition(cfg, ks, W, dot, 1, px, carry, None if rec is None else rec[1])
    deep = dot("att_output_kernel", "ni,ih->nh", jnp.concatenate([context, out], -1), W["att_output_kernel"], dtype)
    hidden = jnp.tanh(deep + gx0[:, G:] + W["layer0_bias"][G:])
    if masks is not None:
        hidden = hidden * masks["output"]
    return hidden, dict(state, layers=(carry,), feed=hidden), weights
