"""A plain reference for s2s_jax.model.Seq2Seq, written to be obviously right, not fast.

It reads the same Flax parameter tree and computes, step by step (Python loops over time,
directions and layers; no scan, no hoisting, no fused tricks beyond the stored parameter layout),
the textbook equations for a batch of right-padded sequences:

    LSTM (gate order i, f, g, o):  [i f g o] = x W_ih + b + h W_hh
                                   c' = σ(f) c + σ(i) tanh(g);  h' = σ(o) tanh(c')
    GRU  (gate order r, z, n):     r = σ(x W_r + b_r + h U_r + b'_r);  z = σ(x W_z + b_z + h U_z + b'_z)
                                   n = tanh(x W_n + b_n + r (h U_n + b'_n));  h' = (1 - z) n + z h
    attention scores   dot: q·m_s   general: q·(W_a m_s)   mlp: v·tanh(W_q q + b + W_k m_s)
    weights = exp(score) / Σ exp(score), both over the real source positions only
    context = Σ_s w_s m_s;  attentional hidden = tanh([context; q] W_c);  logits = hidden W_out + b_out

Padding is handled the plain way: a row's state is updated only at its real steps (t < length),
so the forward direction stops at the last real token and the backward direction, run from
t = S-1 down to 0, starts at each row's own last token. Deterministic (no dropout).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGH = jax.lax.Precision.HIGHEST


def dot(a, b):
    return jnp.dot(a, b, precision=HIGH)


def lstm_step(x, h, c, w_ih, b, w_hh):
    gates = dot(x, w_ih) + b + dot(h, w_hh)
    H = h.shape[-1]
    i, f, g, o = gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:3 * H], gates[:, 3 * H:]
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return h, c


def gru_step(x, h, w_ih, b, w_hh, b_hh):
    H = h.shape[-1]
    gx = dot(x, w_ih) + b
    gh = dot(h, w_hh) + b_hh
    r = jax.nn.sigmoid(gx[:, :H] + gh[:, :H])
    z = jax.nn.sigmoid(gx[:, H:2 * H] + gh[:, H:2 * H])
    n = jnp.tanh(gx[:, 2 * H:] + r * gh[:, 2 * H:])
    return (1 - z) * n + z * h


def cell_step(cell, p, k, x, state):
    """Direction k's weights of layer p applied to x [B, D] with state (h, c) or h."""
    w_ih, b, w_hh = p["input_kernel"][:, k, :], p["bias"][k], p["recurrent_kernel"][k]
    if "input_norm_scale" in p:  # model.layer_norm (section below)
        return normed_cell_step(cell, p, k, x, state)
    if cell == "lstm":
        return lstm_step(x, state[0], state[1], w_ih, b, w_hh)
    return gru_step(x, state, w_ih, b, w_hh, p["recurrent_bias"][k])


# -- layer normalisation inside the cells (model.layer_norm) --------------------------------------
#   LN(z) per block: z viewed as g blocks of n = G·H/g units (g = G "per_gate", 1 "whole"),
#   (z - mean) / sqrt(var + 1e-5) * gain, gain [g, n];  no shift (the cell's biases follow):
#   LSTM  gates = LN_x(x W_ih) + b + LN_h(h W_hh)
#   GRU   gx = LN_x(x W_ih) + b;  gh = LN_h(h W_hh) + b_hh;  then the GRU equations above

def layer_norm(z, gain):
    g, n = gain.shape
    blocks = z.reshape(z.shape[0], g, n)
    mean = blocks.mean(-1, keepdims=True)
    var = ((blocks - mean) ** 2).mean(-1, keepdims=True)
    return ((blocks - mean) / jnp.sqrt(var + 1e-5) * gain).reshape(z.shape)


def normed_cell_step(cell, p, k, x, state):
    w_ih, b, w_hh = p["input_kernel"][:, k, :], p["bias"][k], p["recurrent_kernel"][k]
    gx = layer_norm(dot(x, w_ih), p["input_norm_scale"][k]) + b
    h = state[0] if cell == "lstm" else state
    gh = layer_norm(dot(h, w_hh), p["recurrent_norm_scale"][k])
    H = h.shape[-1]
    if cell == "lstm":
        gates = gx + gh
        i, f, g, o = gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:3 * H], gates[:, 3 * H:]
        c = jax.nn.sigmoid(f) * state[1] + jax.nn.sigmoid(i) * jnp.tanh(g)
        return jax.nn.sigmoid(o) * jnp.tanh(c), c
    gh = gh + p["recurrent_bias"][k]
    r = jax.nn.sigmoid(gx[:, :H] + gh[:, :H])
    z = jax.nn.sigmoid(gx[:, H:2 * H] + gh[:, H:2 * H])
    n = jnp.tanh(gx[:, 2 * H:] + r * gh[:, 2 * H:])
    return (1 - z) * n + z * h


def hidden_of(cell, state):
    return state[0] if cell == "lstm" else state


def keep(real, new, old):
    """new where real [B] is True, else old (padded steps leave the state as it was)."""
    if isinstance(new, tuple):
        return tuple(keep(real, a, b) for a, b in zip(new, old))
    return jnp.where(real[:, None], new, old)


def zero_state(cell, B, size):
    z = jnp.zeros((B, size), jnp.float32)
    return (z, z) if cell == "lstm" else z


def run_direction(cell, p, k, xs, lengths, backward):
    """xs: list over time of [B, D]. Returns (outputs list [B, h], zero at padding; final state)."""
    B, S = xs[0].shape[0], len(xs)
    h = p["recurrent_kernel"].shape[1]
    state = zero_state(cell, B, h)
    outs = [None] * S
    for t in (reversed(range(S)) if backward else range(S)):
        real = t < lengths
        state = keep(real, cell_step(cell, p, k, xs[t], state), state)
        outs[t] = jnp.where(real[:, None], hidden_of(cell, state), 0.0)
    return outs, state


def concat_state(a, b):
    if isinstance(a, tuple):
        return tuple(jnp.concatenate([x, y], -1) for x, y in zip(a, b))
    return jnp.concatenate([a, b], -1)


def encode(cfg, params, source, lengths):
    """source [B, S] -> (memory [B, S, H], zero at padding; per-layer final states)."""
    table = params["target_embedding"] if cfg.share_embeddings else params["source_embedding"]
    xs = [table[source[:, t]] for t in range(source.shape[1])]
    finals = []
    for i in range(cfg.encoder_layers):
        p = params["encoder"][f"layer_{i}"]
        ys, final = run_direction(cfg.cell, p, 0, xs, lengths, backward=False)
        if cfg.bidirectional:
            bwd, bwd_final = run_direction(cfg.cell, p, 1, xs, lengths, backward=True)
            ys = [jnp.concatenate([a, b], -1) for a, b in zip(ys, bwd)]
            final = concat_state(final, bwd_final)
        if cfg.residual and i > 0:
            ys = [y + x for y, x in zip(ys, xs)]
        xs = ys
        finals.append(final)
    return jnp.stack(xs, axis=1), finals


def bridge(cfg, params, finals, B):
    L, H = cfg.decoder_layers, cfg.hidden_dim
    if cfg.bridge == "zero":
        return [zero_state(cfg.cell, B, H) for _ in range(L)]
    src = finals if len(finals) == L else [finals[-1]] * L
    if cfg.bridge == "last":
        return list(src)
    W, b = params["bridge_kernel"], params["bridge_bias"]
    out = []
    for i, s in enumerate(src):
        if cfg.cell == "lstm":
            h, c = s
            out.append((jnp.tanh(dot(h, W[2 * i]) + b[2 * i]), dot(c, W[2 * i + 1]) + b[2 * i + 1]))
        else:
            out.append(jnp.tanh(dot(s, W[i]) + b[i]))
    return out


def attend(cfg, p, q, memory, mask, coverage=None):
    """q [B, H], memory [B, S, H], mask [B, S] -> (attentional hidden [B, H], weights [B, S]).
    coverage [B, S] (model.coverage): c_s = the earlier steps' weights summed, scored as
    + w_c c_s (dot, general) or inside the tanh as + w_c c_s (mlp, w_c a vector)."""
    if cfg.attention == "dot":
        scores = jnp.einsum("bh,bsh->bs", q, memory, precision=HIGH)
    elif cfg.attention == "general":
        keys = jnp.einsum("bsh,hk->bsk", memory, p["key_kernel"], precision=HIGH)
        scores = jnp.einsum("bh,bsh->bs", q, keys, precision=HIGH)
    else:
        keys = jnp.einsum("bsh,hk->bsk", memory, p["key_kernel"], precision=HIGH)
        pre = (dot(q, p["query_kernel"]) + p["bias"])[:, None, :] + keys
        if coverage is not None:
            pre = pre + coverage[:, :, None] * p["coverage_weight"][None, None, :]
        feat = jnp.tanh(pre)
        scores = jnp.einsum("bsh,h->bs", feat, p["v"][:, 0], precision=HIGH)
    if coverage is not None and cfg.attention != "mlp":
        scores = scores + p["coverage_weight"][0] * coverage
    biggest = jnp.max(jnp.where(mask, scores, -jnp.inf), axis=-1, keepdims=True)
    e = jnp.where(mask, jnp.exp(scores - biggest), 0.0)
    weights = e / e.sum(-1, keepdims=True)
    context = jnp.einsum("bs,bsh->bh", weights, memory, precision=HIGH)
    hidden = jnp.tanh(dot(jnp.concatenate([context, q], -1), p["output_kernel"]))
    return hidden, weights


def forward(cfg, params, source, source_lengths, target_input):
    """Teacher forcing -> (hidden [B, T, H], logits [B, T, V], weights [B, T, S] or None).
    Only positions t < target length are meaningful (later ones never affect them)."""
    if cfg.decoder_type == "conditional":
        return conditional_forward(cfg, params, source, source_lengths, target_input)
    B, S = source.shape
    memory, finals = encode(cfg, params, source, source_lengths)
    mask = jnp.arange(S)[None, :] < source_lengths[:, None]
    state = bridge(cfg, params, finals, B)
    feed = jnp.zeros((B, cfg.hidden_dim), jnp.float32)
    coverage = jnp.zeros((B, S), jnp.float32)  # model.coverage: Σ of the earlier steps' weights
    hiddens, all_weights = [], []
    for t in range(target_input.shape[1]):
        x = params["target_embedding"][target_input[:, t]]
        if cfg.input_feeding:
            x = jnp.concatenate([x, feed], -1)
        new_state = []
        for i in range(cfg.decoder_layers):
            s = cell_step(cfg.cell, params["decoder"][f"layer_{i}"], 0, x, state[i])
            y = hidden_of(cfg.cell, s)
            if cfg.residual and i > 0:
                y = y + x
            new_state.append(s)
            x = y
        state = new_state
        if cfg.attention != "none":
            x, w = attend(cfg, params["decoder"]["attention"], x, memory, mask,
                          coverage if cfg.coverage else None)
            coverage = coverage + w
            all_weights.append(w)
        feed = x
        hiddens.append(x)
    hidden = jnp.stack(hiddens, axis=1)
    kernel = params["target_embedding"].T if cfg.tie_output else params["output_kernel"]
    logits = dot(hidden, kernel) + params["output_bias"]
    weights = jnp.stack(all_weights, axis=1) if all_weights else None
    return hidden, logits, weights


# -- the conditional GRU decoder (model.decoder_type="conditional") --------------------------------
#   s' = cell(y_{t-1}, s);  a = attention weights of query s';  c = Σ_s a_s m_s
#   s  = cell(c, s');  hidden = tanh([c; s] W_c + y_{t-1} W_y + b_y)

def conditional_forward(cfg, params, source, source_lengths, target_input):
    B, S = source.shape
    memory, finals = encode(cfg, params, source, source_lengths)
    mask = jnp.arange(S)[None, :] < source_lengths[:, None]
    state = bridge(cfg, params, finals, B)[0]
    dec = params["decoder"]
    hiddens, all_weights = [], []
    for t in range(target_input.shape[1]):
        y = params["target_embedding"][target_input[:, t]]
        state = cell_step(cfg.cell, dec["layer_0"], 0, y, state)
        _, w = attend(cfg, dec["attention"], hidden_of(cfg.cell, state), memory, mask)
        context = jnp.einsum("bs,bsh->bh", w, memory, precision=HIGH)
        state = cell_step(cfg.cell, dec["layer_1"], 0, context, state)
        both = jnp.concatenate([context, hidden_of(cfg.cell, state)], -1)
        hiddens.append(jnp.tanh(dot(both, dec["attention"]["output_kernel"]) + dot(y, dec["embedding_output_kernel"])
                                + dec["embedding_output_bias"]))
        all_weights.append(w)
    hidden = jnp.stack(hiddens, axis=1)
    kernel = params["target_embedding"].T if cfg.tie_output else params["output_kernel"]
    return hidden, dot(hidden, kernel) + params["output_bias"], jnp.stack(all_weights, axis=1)


def loss(logits, batch):
    """Mean token cross-entropy of logits [B, T, V] over the real target positions."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["target_output"][..., None], axis=-1)[..., 0]
    real = jnp.arange(logits.shape[1])[None, :] < batch["target_lengths"][:, None]
    return jnp.where(real, nll, 0.0).sum() / real.sum()


def shortlist_logits(cfg, params, hidden, vocab_ids):
    """The output projection over a shortlist, plainly: each candidate column c is the full
    projection's column vocab_ids[c] (a loop over candidates); padding (-1) is -inf.
    hidden [N, H], vocab_ids [C] -> [N, C]."""
    kernel = params["target_embedding"].T if cfg.tie_output else params["output_kernel"]
    columns = []
    for v in [int(i) for i in vocab_ids]:
        if v < 0:
            columns.append(jnp.full((hidden.shape[0],), -jnp.inf))
        else:
            columns.append(dot(hidden, kernel[:, v]) + params["output_bias"][v])
    return jnp.stack(columns, axis=1)


# -- coverage loss (model.coverage) -------------------------------------------------------------
def coverage_loss(weights, batch):
    """Σ over real target steps t and source positions i of min(a_t,i, c_t,i), c_t = Σ_{t'<t} a_t'
    (a Python loop over t)."""
    B, T, S = weights.shape
    real = jnp.arange(T)[None, :] < batch["target_lengths"][:, None]
    c = jnp.zeros((B, S), jnp.float32)
    total = 0.0
    for t in range(T):
        total = total + jnp.where(real[:, t], jnp.minimum(weights[:, t], c).sum(-1), 0.0).sum()
        c = c + weights[:, t]
    return total


# -- copy attention (model.copy_attention) --------------------------------------------------------
UNK = 3


def copy_forward(cfg, params, source_ext, source_lengths, target_input, V):
    """Teacher forcing with copy attention: source_ext holds extended ids (>= V: unknown words,
    embedded as UNK). Returns (logits [B, T, V], copy weights [B, T, S], gate [B, T], weights)."""
    source = jnp.where(source_ext >= V, UNK, source_ext)
    hidden, logits, weights = forward(cfg, params, source, source_lengths, target_input)
    memory, _ = encode(cfg, params, source, source_lengths)
    mask = jnp.arange(source.shape[1])[None, :] < source_lengths[:, None]
    copy_ws, gates = [], []
    for t in range(target_input.shape[1]):
        h = hidden[:, t]
        a = weights[:, t]
        if cfg.copy_attention_separate:
            _, a = attend(cfg, params["copy_attention"], h, memory, mask)
        context = jnp.einsum("bs,bsh->bh", a, memory, precision=HIGH)
        emb = params["target_embedding"][target_input[:, t]]
        x = jnp.concatenate([h, context, emb], -1)
        gates.append(jax.nn.sigmoid(dot(x, params["copy_gate_kernel"])[:, 0] + params["copy_gate_bias"][0]))
        copy_ws.append(a)
    return logits, jnp.stack(copy_ws, 1), jnp.stack(gates, 1), weights


def copy_loss(logits, copy_weights, gate, batch, V, force_copy=False):
    """Mean over real target positions of -log p(y), p(y) = (1 - g) p_vocab(y) [unless y is an
    unknown word found in the source, or force_copy and y is in the source] + g Σ_{i: x_i = y} a_i,
    written with Python loops over rows, steps and source positions."""
    B, T, _ = logits.shape
    probs = jax.nn.softmax(logits, axis=-1)
    total, count = 0.0, 0
    for b in range(B):
        for t in range(int(batch["target_lengths"][b])):
            y, y_ext = int(batch["target_output"][b, t]), int(batch["target_ext"][b, t])
            copy = 0.0
            found = False
            for i in range(int(batch["source_lengths"][b])):
                if int(batch["source_ext"][b, i]) == y_ext:
                    copy = copy + copy_weights[b, t, i]
                    found = True
            g = gate[b, t]
            vocab_part = 0.0 if (y_ext >= V or (force_copy and found)) else (1 - g) * probs[b, t, y]
            total = total - jnp.log(vocab_part + g * copy)
            count += 1
    return total / count
