"""The encoder-decoder: embeddings, encoder, bridge, decoder, output projection.

    model = Seq2Seq(config.model, source_vocab_size, target_vocab_size, kernels.select(config.model.kernels))
    params = model.init(rngs, source, source_lengths, target_input)["params"]
    hidden, weights = model.apply({"params": params}, source, source_lengths, target_input,
                                  deterministic=False, rngs={"dropout": key})
    kernel, bias = model.apply({"params": params}, method=Seq2Seq.output_weights)

The kernel set (s2s_jax/kernels/) is chosen once, where the model is built
(train_state.make_model); every submodule and the train step use `model.kernels`.

The forward pass stops at the attentional hidden states [B, T, H]: the output projection and
the loss run outside the decoder scan, chunked over time (`training/losses.py`), so [B, T, V] logits never
need to exist at once. Decoding: `encode` once per batch, then `decode_step` per token.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from s2s_jax.config import ModelConfig
from s2s_jax.kernels import KernelSet
from s2s_jax.kernels.deferred_scan import plain_dot
from s2s_jax.model.attention import AttentionParams, attend, project_keys
from s2s_jax.model.cells import initial_carry, row_dropout_mask
from s2s_jax.model.conditional import ConditionalDecoder
from s2s_jax.model.decoder import Decoder
from s2s_jax.model.encoder import Encoder
from s2s_jax.vocab import UNK_ID

Array = jax.Array


class Seq2Seq(nn.Module):
    config: ModelConfig
    source_vocab_size: int
    target_vocab_size: int
    kernels: KernelSet

    def setup(self):
        cfg = self.config
        emb_init = nn.initializers.normal(stddev=cfg.target_embed_dim ** -0.5)
        self.target_embedding = self.param("target_embedding", emb_init,
                                           (self.target_vocab_size, cfg.target_embed_dim))
        if not cfg.share_embeddings:
            self.source_embedding = self.param("source_embedding", emb_init,
                                               (self.source_vocab_size, cfg.source_embed_dim))
        self.encoder = Encoder(cfg, self.kernels)
        self.decoder = (ConditionalDecoder if cfg.decoder_type == "conditional" else Decoder)(cfg, self.kernels)
        H = cfg.hidden_dim
        if cfg.bridge == "dense":
            init = nn.initializers.lecun_uniform()
            n = cfg.decoder_layers * (2 if cfg.cell == "lstm" else 1)
            self.bridge_kernel = self.param("bridge_kernel", init, (n, H, H))
            self.bridge_bias = self.param("bridge_bias", nn.initializers.zeros, (n, H))
        if not cfg.tie_output:
            self.output_kernel = self.param("output_kernel", nn.initializers.lecun_uniform(),
                                            (H, self.target_vocab_size))
        self.output_bias = self.param("output_bias", nn.initializers.zeros, (self.target_vocab_size,))
        if cfg.copy_attention:  # the gate g = σ([h~; context; decoder input] W_g + b_g)
            self.copy_gate_kernel = self.param("copy_gate_kernel", nn.initializers.lecun_uniform(),
                                               (2 * H + cfg.target_embed_dim, 1))
            self.copy_gate_bias = self.param("copy_gate_bias", nn.initializers.zeros, (1,))
            if cfg.copy_attention_separate:
                self.copy_attention = AttentionParams(cfg.attention, H)

    def _source_table(self):
        return self.target_embedding if self.config.share_embeddings else self.source_embedding

    def output_weights(self) -> tuple[Array, Array]:
        """(kernel [H, V], bias [V]) of the output projection (tied: the target embedding)."""
        kernel = self.target_embedding.T if self.config.tie_output else self.output_kernel
        return kernel, self.output_bias

    def _bridge(self, finals, memory):
        """Encoder final carries (per layer, [B, H]) -> decoder initial carries (per layer)."""
        cfg = self.config
        L = cfg.decoder_layers
        if cfg.bridge == "zero":
            return [initial_carry(cfg.cell, memory[:, 0, :]) for _ in range(L)]
        # Layer i of the decoder starts from layer i of the encoder when the depths match,
        # otherwise every decoder layer starts from the top encoder layer.
        src = finals if len(finals) == L else [finals[-1]] * L
        if cfg.bridge == "last":
            return list(src)
        dtype = jnp.dtype(cfg.dtype)
        ks = self.kernels
        out = []
        for i, carry in enumerate(src):
            if cfg.cell == "lstm":
                h, c = carry
                j = 2 * i
                h = jnp.tanh(ks.matmul(h, self.bridge_kernel[j], dtype) + self.bridge_bias[j])
                c = ks.matmul(c, self.bridge_kernel[j + 1], dtype) + self.bridge_bias[j + 1]
                out.append((h, c))
            else:
                out.append(jnp.tanh(ks.matmul(carry, self.bridge_kernel[i], dtype) + self.bridge_bias[i]))
        return out

    def encode(self, source: Array, source_lengths: Array, deterministic: bool = True,
               row_ids: Array | None = None) -> dict:
        """source [B, S] int32 -> decoding cache: memory/keys [B, S, H], mask [B, S], state.

        model.copy_attention: `source` may hold extended ids (>= V: the sentence's unknown words,
        embedded as UNK); the state keeps them as "source_ext" (the same for every beam of a
        sentence, so it follows the beams as it is)."""
        ext = None
        if self.config.copy_attention:
            ext, source = source, in_vocabulary(source, self.source_vocab_size)
        emb = jnp.take(self._source_table(), source.T, axis=0)  # time-major [S, B, E]
        emb = self._embedding_noise(emb, row_ids, self.config.source_word_dropout, deterministic)
        memory, finals = self.encoder(emb, source_lengths, row_ids, deterministic=deterministic)
        mask = jnp.arange(source.shape[1])[None, :] < source_lengths[:, None]
        keys = self.decoder.project_keys(memory)
        state = self.decoder.initial_state(self._bridge(finals, memory), memory)
        if ext is not None:
            state["source_ext"] = ext
        return {"memory": memory, "keys": keys, "mask": mask, "state": state}

    def __call__(self, source: Array, source_lengths: Array, target_input: Array,
                 deterministic: bool = True, row_ids: Array | None = None):
        """Teacher forcing. Returns (attentional hidden [B, T, H] float32, weights [B, T, S] | None).

        row_ids [B]: each example's index in the global batch (default arange(B)); dropout masks
        are drawn per row from it, so sharding the batch never changes them.
        """
        hidden, weights, _, _ = self._teacher_forced(source, source_lengths, target_input, deterministic, row_ids)
        if self.config.copy_attention_separate and self.is_initializing():
            self.copy_attention()  # its parameters exist from `init` on
        return hidden, weights

    def _teacher_forced(self, source, source_lengths, target_input, deterministic, row_ids):
        """(hidden [B, T, H], weights [B, T, S] | None, encoder cache, embedded targets [T, B, E])."""
        if row_ids is None:
            row_ids = jnp.arange(source.shape[0])
        cache = self.encode(source, source_lengths, deterministic, row_ids)
        emb = jnp.take(self.target_embedding, target_input.T, axis=0)  # time-major [T, B, E]
        if not deterministic and self.config.dropout > 0:
            key = self.make_rng("dropout")
            T, _, E = emb.shape
            emb = emb * jnp.swapaxes(row_dropout_mask(key, self.config.dropout, row_ids, (T, E)), 0, 1)
        emb = self._embedding_noise(emb, row_ids, self.config.target_word_dropout, deterministic)
        state = {k: v for k, v in cache["state"].items() if k != "source_ext"}
        hidden, weights = self.decoder(emb, state, cache["memory"], cache["keys"], cache["mask"],
                                       row_ids, deterministic=deterministic)
        return hidden, weights, cache, emb

    # -- copy attention (model.copy_attention) ---------------------------------------------
    def copy_forward(self, source: Array, source_lengths: Array, target_input: Array,
                     deterministic: bool = True, row_ids: Array | None = None):
        """Teacher forcing with copy attention; source may hold extended ids (`encode`).

        Returns (hidden [B, T, H], attention weights [B, T, S], copy weights [B, T, S], gate [B, T]).
        """
        hidden, weights, cache, emb = self._teacher_forced(source, source_lengths, target_input, deterministic,
                                                           row_ids)
        copy_weights, gate = self._copy_terms(hidden, weights, jnp.swapaxes(emb, 0, 1), cache["memory"],
                                              cache["mask"])
        return hidden, weights, copy_weights, gate

    def _copy_terms(self, hidden: Array, weights: Array, emb: Array, memory: Array, mask: Array):
        """hidden [B, (T,) H], weights [B, (T,) S], emb (decoder input) [B, (T,) E], memory [B, S, H]
        -> (copy weights [B, (T,) S], gate g [B, (T,)]). The copy weights are the decoder's
        attention weights, or (copy_attention_separate) those of the copy attention queried by h~."""
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        if cfg.copy_attention_separate:
            p = self.copy_attention()
            keys = project_keys(p, cfg.attention, memory, dtype, self.kernels)
            _, weights = attend(p, cfg.attention, hidden, keys, memory, mask, dtype)
        single = weights.ndim == 2
        spec = "bs,bsh->bh" if single else "bts,bsh->bth"
        context = plain_dot("", spec, weights, memory, dtype)
        x = jnp.concatenate([hidden.astype(jnp.float32), context, emb.astype(jnp.float32)], -1)
        gate = jax.nn.sigmoid(self.kernels.matmul(x, self.copy_gate_kernel, dtype)[..., 0] + self.copy_gate_bias[0])
        return weights, gate

    def copy_log_probs(self, hidden: Array, weights: Array, tokens: Array, source_ext: Array, memory: Array,
                       mask: Array) -> Array:
        """One decoding step's extended distribution: log p(w) over [N, V + S] ids,
        p(w) = (1 - g) p_vocab(w) + g Σ_{i: source_ext_i = w} a_i (ids >= V: the sentence's
        unknown source words). tokens [N]: the step's input tokens (in the vocabulary);
        memory, mask, source_ext: per row [N, ...]."""
        V = self.target_vocab_size
        emb = jnp.take(self.target_embedding, tokens, axis=0)
        copy_weights, gate = self._copy_terms(hidden, weights, emb, memory, mask)
        p_vocab = jax.nn.softmax(self.logits(hidden).astype(jnp.float32), axis=-1) * (1.0 - gate)[:, None]
        N, S = source_ext.shape
        dist = jnp.concatenate([p_vocab, jnp.zeros((N, S), jnp.float32)], axis=-1)
        dist = dist.at[jnp.arange(N)[:, None], source_ext].add(gate[:, None] * copy_weights)
        return jnp.log(jnp.maximum(dist, jnp.finfo(jnp.float32).tiny))

    def _embedding_noise(self, emb: Array, row_ids: Array | None, word_rate: float, deterministic: bool) -> Array:
        """model.embedding_dropout (per element) and word dropout at `word_rate` (a token's whole
        embedding zeroed, the rest scaled by 1/(1-rate)) on time-major embeddings [T, B, E];
        masks per row (batch-split invariant). Unchanged (no rng drawn) when both are off."""
        rate = self.config.embedding_dropout
        if deterministic or (rate == 0 and word_rate == 0):
            return emb
        key = self.make_rng("dropout")
        T, _, E = emb.shape
        if rate > 0:
            emb = emb * jnp.swapaxes(row_dropout_mask(jax.random.fold_in(key, 0), rate, row_ids, (T, E)), 0, 1)
        if word_rate > 0:
            emb = emb * jnp.swapaxes(row_dropout_mask(jax.random.fold_in(key, 1), word_rate, row_ids, (T, 1)), 0, 1)
        return emb

    def candidate_output_weights(self, vocab_ids: Array) -> tuple[Array, Array]:
        """The output projection restricted to a shortlist: vocab_ids [C] int32 (-1: padding)
        -> (kernel [H, C], bias [C]), the columns of `output_weights` (rows of the embedding
        when tied) for those ids; padding gets bias -inf, so its logit is -inf."""
        valid = vocab_ids >= 0
        ids = jnp.where(valid, vocab_ids, 0)
        if self.config.tie_output:
            kernel = jnp.take(self.target_embedding, ids, axis=0).T
        else:
            kernel = jnp.take(self.output_kernel, ids, axis=1)
        return kernel, jnp.where(valid, jnp.take(self.output_bias, ids), -jnp.inf)

    def project(self, hidden: Array, kernel: Array, bias: Array) -> Array:
        """hidden [..., H] -> logits [..., C] = hidden @ kernel [H, C] + bias [C] (compute dtype, float32 out)."""
        return self.kernels.matmul(hidden, kernel, jnp.dtype(self.config.dtype)) + bias

    def logits(self, hidden: Array) -> Array:
        return self.project(hidden, *self.output_weights())

    def decode_step(self, tokens: Array, cache: dict):
        """tokens [N] (previous output) -> (logits [N, V] float32, new cache, weights [N, S] | None).
        model.copy_attention: log-probabilities [N, V + S] over the extended ids (`copy_log_probs`;
        copied unknown words, ids >= V, are fed back as UNK)."""
        if self.config.copy_attention:
            tokens = in_vocabulary(tokens, self.target_vocab_size)
        emb = jnp.take(self.target_embedding, tokens, axis=0)
        hidden, state, weights = self.decoder.step(emb, cache["state"], cache["memory"], cache["keys"],
                                                   cache["mask"])
        return self.step_output(hidden, weights, tokens, state, cache), dict(cache, state=state), weights

    def step_output(self, hidden: Array, weights: Array | None, tokens: Array, state: dict, context: dict) -> Array:
        """A decoding step's scores: logits [N, V], or with copy attention the extended
        log-probabilities [N, V + S] (context: memory, mask per row or per group of rows)."""
        if not self.config.copy_attention:
            return self.logits(hidden)
        memory, mask, ext = context["memory"], context["mask"], state["source_ext"]
        if memory.shape[0] != ext.shape[0]:  # shared by groups of beam rows: one entry per row here
            group = ext.shape[0] // memory.shape[0]
            memory, mask = jnp.repeat(memory, group, axis=0), jnp.repeat(mask, group, axis=0)
        return self.copy_log_probs(hidden, weights, tokens, ext, memory, mask)


def in_vocabulary(ids: Array, vocab_size: int) -> Array:
    """Extended ids (copy attention: >= vocab_size for a sentence's unknown words) as vocabulary
    ids: those past the vocabulary become UNK."""
    return jnp.where(ids >= vocab_size, UNK_ID, ids)
