"""The FLOP model: analytic matmul FLOPs of a training step, and the element types of a compiled
program's products.

Analytic matmul FLOPs (multiply-add = 2), for one example with source length S and target
length T, B = 1; G = 4 (LSTM) or 3 (GRU); H = hidden, K = directions, h = H / K, E_s/E_t = embeddings,
L_e/L_d = layers, V = target vocabulary:

    encoder   sum_l 2·S·K·(D_l + h)·G·h,          D_0 = E_s, D_l = H (l ≥ 1)
    keys      2·S·H·H                              (general, mlp; 0 for dot/none)
    decoder   sum_l 2·T·(D_l + H)·G·H,            D_0 = E_t (+ H with input feeding), D_l = H
    attention 4·T·S·H + 2·T·2H·H                   (scores + context, output layer; mlp adds 2·T·H·H)
    output    2·T·H·V
    training  = 3 × forward (backward ≈ 2 × forward)

The bridge (≤ 2·L_d·2·H·H per sentence) and elementwise work are not counted. `flops_executed`
uses the padded bucket shapes (what the hardware computes); `flops_per_target_token` uses the real
lengths (≈ 25.7 MFLOP per target token on bench_cpu).
"""

from __future__ import annotations

import re

import numpy as np


def forward_flops(model_cfg, target_vocab: int, source_lengths, target_lengths) -> float:
    """Forward matmul FLOPs summed over examples (see the module docstring for the formula)."""
    m = model_cfg
    S = np.asarray(source_lengths, np.float64)
    T = np.asarray(target_lengths, np.float64)
    G = 4 if m.cell == "lstm" else 3
    H = m.hidden_dim
    K = 2 if m.bidirectional else 1
    h = H // K
    enc = sum(2 * K * ((m.source_embed_dim if l == 0 else H) + h) * G * h for l in range(m.encoder_layers))
    keys = 2 * H * H if m.attention in ("general", "mlp") else 0
    dec = 0
    for l in range(m.decoder_layers):
        d = (m.target_embed_dim + (H if m.input_feeding else 0)) if l == 0 else H
        dec += 2 * (d + H) * G * H
    att_t = 2 * 2 * H * H + (2 * H * H if m.attention == "mlp" else 0) if m.attention != "none" else 0
    att_ts = 4 * H if m.attention != "none" else 0
    out = 2 * H * target_vocab
    total = S * (enc + keys) + T * (dec + att_t + out) + S * T * att_ts
    return float(total.sum())


def dot_operand_types(hlo: str) -> dict[str, tuple[str, str]]:
    """Every matrix product (no batch dimensions) of an optimised HLO module's text
    (`compiled.as_text()`): instruction name -> (lhs, rhs) element types, inside fusions too.

    XLA:CPU silently rewrites a bfloat16 product it cannot run on its library path into a
    float32 one; this is how a test or a trace tells (docs/speed.md, "bfloat16 on CPU")."""
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))  # instruction -> element type
    types.update(re.findall(r"([\w.\-]+): (\w+)\[", hlo))    # fused computations' parameters
    return {name: (types.get(lhs, "?"), types.get(rhs, "?"))
            for name, lhs, rhs, rest in re.findall(
                r"%([\w.\-]+) = \w+\[[^\]]*\][^=]*? dot\(%([\w.\-]+), %([\w.\-]+)\)(.*)", hlo)
            if "lhs_batch_dims" not in rest}
