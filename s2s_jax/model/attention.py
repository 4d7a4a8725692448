"""Luong (`dot`, `general`) and Bahdanau (`mlp`, additive) attention, keys projected once.

Scores for a query q [.., H] against encoder memory m [B, S, H]:
    dot:      q · m_s
    general:  q · (W_a m_s)                 — W_a m is computed once per batch ("keys")
    mlp:      v · tanh(W_q q + W_k m_s)     — W_k m is computed once per batch
Padded source positions get exactly zero weight; each weight row sums to one.
The attentional hidden state is h~ = tanh(W_c [context; q]) (Luong et al., 2015, eq. 5).

Coverage (model.coverage): with the coverage vector c [.., S] (the sum of the earlier steps'
weights) the scores become
    dot/general:  q · k_s + w_c c_s           (w_c a learned scalar)
    mlp:          v · tanh(W_q q + W_k m_s + w_c c_s)   (w_c a learned vector [H], See et al.)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from s2s_jax.kernels import KernelSet
from s2s_jax.kernels.deferred_scan import plain_dot
from s2s_jax.kernels.fused_decoder import NEG_INF  # noqa: F401  (one definition, re-exported)

Array = jax.Array


class AttentionParams(nn.Module):
    kind: str
    hidden: int  # query and memory size
    coverage: bool = False  # model.coverage: the learned coverage weight w_c

    @nn.compact
    def __call__(self) -> dict[str, Array]:
        H = self.hidden
        init = nn.initializers.lecun_uniform()
        p = {"output_kernel": self.param("output_kernel", init, (2 * H, H))}
        if self.kind == "general":
            p["key_kernel"] = self.param("key_kernel", init, (H, H))
        elif self.kind == "mlp":
            p["key_kernel"] = self.param("key_kernel", init, (H, H))
            p["query_kernel"] = self.param("query_kernel", init, (H, H))
            p["bias"] = self.param("bias", nn.initializers.zeros, (H,))
            p["v"] = self.param("v", init, (H, 1))
        if self.coverage:
            p["coverage_weight"] = self.param("coverage_weight", nn.initializers.zeros,
                                              (H,) if self.kind == "mlp" else (1,))
        return p


def project_keys(params: dict, kind: str, memory: Array, dtype, ks: KernelSet) -> Array:
    """memory [B, S, H] -> keys [B, S, H]; done once per batch, outside any scan."""
    if kind == "dot":
        return memory.astype(jnp.float32)
    return ks.matmul(memory, params["key_kernel"], dtype)


def attend(params: dict, kind: str, query: Array, keys: Array, memory: Array, mask: Array, dtype,
           dropout_mask: Array | None = None, dot=plain_dot, coverage: Array | None = None):
    """Attention for one step (query [B, H]) or many (query [B, T, H]).

    keys, memory [B, S, H]; mask [B, S] (True at real source positions).
    dropout_mask: optional, broadcastable to the weights, already scaled by 1/(1-rate).
    dot: how products with `params`, `keys` and `memory` are taken (deferred_scan.Tape.dot inside the
    decoder's training scan, under the names att_query_kernel, att_v, keys, memory, att_output_kernel).
    coverage: the coverage vector [B, (T,) S] (model.coverage; `params` then holds coverage_weight).
    Returns (attentional hidden [B, (T,) H] float32, weights [B, (T,) S] float32).
    """
    single = query.ndim == 2
    q = query[:, None, :] if single else query  # [B, T, H]
    cov = None if coverage is None else (coverage[:, None, :] if single else coverage)  # [B, T, S]
    context, weights = attention_context(params, kind, q, keys, memory, mask, dtype, dropout_mask, dot, cov)
    hidden = jnp.tanh(dot("att_output_kernel", "bti,ih->bth", jnp.concatenate([context, q.astype(jnp.float32)], -1),
                          params["output_kernel"], dtype))
    if single:
        return hidden[:, 0], weights[:, 0]
    return hidden, weights


def attention_context(params: dict, kind: str, q: Array, keys: Array, memory: Array, mask: Array, dtype,
                      dropout_mask: Array | None = None, dot=plain_dot, cov: Array | None = None):
    """The scores, weights and context of queries q [B, T, H] (arguments as `attend`'s; cov the
    coverage [B, T, S] or None) -> (context [B, T, H], weights [B, T, S]), float32; `attend` adds
    the output layer, the conditional decoder its deep output."""
    if kind == "mlp":
        qp = dot("att_query_kernel", "bth,hk->btk", q, params["query_kernel"], dtype) + params["bias"]
        pre = qp[:, :, None, :] + keys[:, None, :, :]
        if cov is not None:
            pre = pre + cov[..., None] * params["coverage_weight"]
        feat = jnp.tanh(pre)  # [B, T, S, H]
        scores = dot("att_v", "btsh,hk->btsk", feat, params["v"], dtype)[..., 0]  # [B, T, S]
    else:
        scores = dot("keys", "bth,bsh->bts", q, keys, dtype)
        if cov is not None:
            scores = scores + params["coverage_weight"][0] * cov
    scores = jnp.where(mask[:, None, :], scores, NEG_INF)
    weights = jax.nn.softmax(scores, axis=-1)  # float32
    probs = weights if dropout_mask is None else weights * dropout_mask
    return dot("memory", "bts,bsh->bth", probs, memory, dtype), weights
