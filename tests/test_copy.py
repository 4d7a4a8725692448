"""Copy attention (model.copy_attention): the pointer-generator loss against hand-computed values
and the plain reference (tests/reference_model.py) for both kernel sets on every attention kind,
copy attention shared or separate, coverage on and off (values and gradients, float32, 1e-5),
padding invariance, the decoding step's extended distribution, the batch's extended ids and the
config errors."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_model as ref
from s2s_jax import kernels
from s2s_jax.config import Config, ConfigError, DataConfig, ModelConfig, validate
from s2s_jax.model import Seq2Seq
from s2s_jax.training import losses, steps
from test_model import VOCAB, assert_close, assert_trees_close, init, make_batch, model_config, pad_batch

SETS = kernels.SETS
V = VOCAB


def copy_batch(seed=0):
    """make_batch with unknown words: row 0's source positions 1 and 4 hold unknown word k=0
    (id V), position 3 unknown word k=1 (id V+1); its targets are: t0 the unknown word k=1
    (copy only), t1 a known word that is also in the source, t2 an unknown word absent from
    the source (UNK)."""
    b = make_batch(seed=seed)
    src_ext = b["source"].copy()
    src_ext[0, [1, 4]] = V
    src_ext[0, 3] = V + 1
    tgt_ext = b["target_output"].copy()
    tgt_ext[0, 0] = V + 1
    tgt_ext[0, 1] = src_ext[0, 0]
    tgt_ext[0, 2] = ref.UNK
    b["source_ext"] = src_ext
    b["source"] = np.where(src_ext >= V, ref.UNK, src_ext).astype(np.int32)
    b["target_ext"] = tgt_ext
    b["target_output"] = np.where(tgt_ext >= V, ref.UNK, tgt_ext).astype(np.int32)
    return b


def fast_copy_loss(model, cfg, params, batch, force_copy=False):
    hidden, weights, copy_weights, gate = model.apply({"params": params}, batch["source_ext"], batch["source_lengths"],
                                                      batch["target_input"], method=Seq2Seq.copy_forward)
    kernel, bias = model.apply({"params": params}, method=Seq2Seq.output_weights)
    sums = losses.copy_sequence_loss(hidden, kernel, bias, gate, copy_weights, batch["source_ext"],
                                     batch["target_output"], batch["target_ext"], steps.target_weights(batch),
                                     kernels=model.kernels, force_copy=force_copy)
    return sums["loss"] / sums["weight"], (copy_weights, gate)


def test_copy_loss_equals_hand_computed_values():
    """V = 5, uniform p_vocab = 0.2; source (4, <unk word 0>, <unk word 1>) = ids (4, 5, 6):
    t0 target: the unknown word 0, in the source      p = g a_1 = 0.5 * 0.3            = 0.15
    t1 target: an unknown word not in the source      p = (1 - g) p_vocab(UNK) = 0.75 * 0.2 = 0.15
    t2 target: word 4, known and in the source        p = (1 - g) 0.2 + g a_0 = 0.2 * 0.2 + 0.8 * 0.6 = 0.52
                                    (force_copy:      p = g a_0 = 0.48)"""
    logits = jnp.zeros((1, 3, 5))
    gate = jnp.array([[0.5, 0.25, 0.8]])
    a = jnp.array([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.6, 0.2, 0.2]]])
    src = jnp.array([[4, 5, 6]])
    tgt, tgt_ext = jnp.array([[3, 3, 4]]), jnp.array([[5, 3, 4]])
    loss, nll, correct = losses.copy_token_losses(logits, gate, a, src, tgt, tgt_ext)
    np.testing.assert_allclose(nll[0], [-math.log(0.15), -math.log(0.15), -math.log(0.52)], rtol=1e-6)
    np.testing.assert_allclose(loss, nll)
    # largest extended probabilities: t0 word 4 (0.5*0.2 + 0.5*0.5 = 0.35 > 0.15), t1 word 4
    # (0.175 > 0.15), t2 word 4 itself (0.52)
    np.testing.assert_array_equal(correct[0], [0, 0, 1])
    _, nll_forced, _ = losses.copy_token_losses(logits, gate, a, src, tgt, tgt_ext, force_copy=True)
    np.testing.assert_allclose(nll_forced[0], [-math.log(0.15), -math.log(0.15), -math.log(0.48)], rtol=1e-6)
    eps = 0.1  # label smoothing on the vocabulary part: + eps * mean_v(-log 0.2)
    smoothed, _, _ = losses.copy_token_losses(logits, gate, a, src, tgt, tgt_ext, label_smoothing=eps)
    np.testing.assert_allclose(smoothed, (1 - eps) * nll + eps * math.log(5), rtol=1e-6)


CASES = [(att, sep, cov) for att in ("dot", "general", "mlp") for sep in (False, True) for cov in (False, True)]
# the case index picks the cell (LSTM for i // 2 even) and input feeding (i % 3 != 1): dot-F-F runs
# the fused LSTM decoder (copy reads its weights), general-F-T the generic scan with coverage
QUICK = {("dot", False, False), ("mlp", True, True), ("general", False, True)}


@pytest.mark.parametrize("ks", SETS)
@pytest.mark.parametrize("att,sep,cov", [pytest.param(*c, marks=() if c in QUICK else (pytest.mark.slow, pytest.mark.extended))
                                         for c in CASES])
def test_copy_matches_reference(ks, att, sep, cov):
    i = CASES.index((att, sep, cov))
    cfg = model_config("gru" if i // 2 % 2 else "lstm", att, i % 3 != 1, True, i, kernels=ks, copy_attention=True,
                       copy_attention_separate=sep, coverage=cov, matmul_precision="highest")
    batch = copy_batch(seed=i)
    model, params = init(cfg, seed=i, batch={k: batch[k] for k in ("source", "source_lengths", "target_input")})
    assert params["copy_gate_kernel"].shape == (2 * cfg.hidden_dim + cfg.target_embed_dim, 1)
    assert ("copy_attention" in params) == sep

    def fast(params):
        with kernels.precision_scope(cfg):
            return fast_copy_loss(model, cfg, params, batch)

    def plain(params):
        logits, cw, gate, _ = ref.copy_forward(cfg, params, batch["source_ext"], batch["source_lengths"],
                                               batch["target_input"], V)
        return ref.copy_loss(logits, cw, gate, batch, V), (cw, gate)

    (l_fast, (cw, gate)), g_fast = jax.jit(jax.value_and_grad(fast, has_aux=True))(params)
    (l_ref, (cw_ref, gate_ref)), g_ref = jax.value_and_grad(plain, has_aux=True)(params)
    assert_close(l_fast, l_ref, what="loss")
    for b in range(3):
        T = int(batch["target_lengths"][b])
        assert_close(cw[b, :T], cw_ref[b, :T], what=f"copy weights row {b}")
        assert_close(gate[b, :T], gate_ref[b, :T], what=f"gate row {b}")
    assert_trees_close(g_fast, g_ref)


@pytest.mark.parametrize("ks", SETS)
def test_copy_padding_invariance(ks):
    cfg = model_config("lstm", "general", True, True, 1, kernels=ks, copy_attention=True, coverage=True)
    batch = copy_batch()
    model, params = init(cfg, batch={k: batch[k] for k in ("source", "source_lengths", "target_input")})
    f = jax.jit(functools.partial(fast_copy_loss, model, cfg))
    l0, _ = f(params, batch)
    for extra_s, extra_t in ((3, 0), (0, 4), (2, 3)):
        padded = pad_batch(batch, extra_s, extra_t)
        padded["source_ext"] = np.pad(batch["source_ext"], [(0, 0), (0, extra_s)])
        padded["target_ext"] = np.pad(batch["target_ext"], [(0, 0), (0, extra_t)])
        assert_close(f(params, padded)[0], l0, tol=1e-6)


@pytest.mark.parametrize("sep", [False, True])
def test_decoding_step_gives_the_extended_distribution(sep):
    """decode_step returns log p over [V + S] extended ids; at each step's target it is the
    teacher-forced p_ext(y) (the loss without force_copy, where unknown words in the source have
    no vocabulary part anyway); copied unknown words fed back are embedded as UNK."""
    cfg = model_config("lstm", "mlp", True, True, 1, copy_attention=True, copy_attention_separate=sep)
    batch = copy_batch()
    batch["target_input"][0, 1] = ref.UNK  # row 0 feeds its copied unknown word (V + 1) back: as UNK
    model, params = init(cfg, batch={k: batch[k] for k in ("source", "source_lengths", "target_input")})
    v = {"params": params}
    logits, cw, gate, _ = ref.copy_forward(cfg, params, batch["source_ext"], batch["source_lengths"],
                                           batch["target_input"], V)
    cache = model.apply(v, batch["source_ext"], batch["source_lengths"], method=Seq2Seq.encode)
    S = batch["source"].shape[1]
    tokens_in = batch["target_input"].copy()
    tokens_in[0, 1] = batch["target_ext"][0, 0]  # the extended id itself: embedded as UNK
    for t in range(3):
        logp, cache, _ = model.apply(v, jnp.asarray(tokens_in[:, t]), cache, method=Seq2Seq.decode_step)
        assert logp.shape == (3, V + S)
        assert_close(jnp.exp(logp).sum(-1), np.ones(3), tol=1e-5)
        for b in range(3):
            if t >= int(batch["target_lengths"][b]):
                continue
            one = {k: batch[k][b:b + 1] for k in batch}
            one["target_lengths"] = np.array([t + 1], np.int32)
            expected = ref.copy_loss(logits[b:b + 1, :t + 1], cw[b:b + 1, :t + 1], gate[b:b + 1, :t + 1], one, V)
            previous = 0.0 if t == 0 else ref.copy_loss(logits[b:b + 1, :t], cw[b:b + 1, :t], gate[b:b + 1, :t],
                                                        dict(one, target_lengths=np.array([t], np.int32)), V)
            nll_t = (t + 1) * expected - t * previous
            assert_close(-logp[b, int(batch["target_ext"][b, t])], nll_t, tol=1e-4, what=f"row {b} step {t}")


def test_copy_config_errors():
    with pytest.raises(ConfigError, match="data.joint_vocab=True"):
        validate(Config(data=DataConfig(source="text", dir="x", joint_vocab=False),
                        model=ModelConfig(copy_attention=True)))
    with pytest.raises(ConfigError, match="model.copy_attention=True copies with attention"):
        validate(Config(model=ModelConfig(copy_attention=True, attention="none", input_feeding=False)))
    with pytest.raises(ConfigError, match="model.force_copy=True has no effect"):
        validate(Config(model=ModelConfig(force_copy=True)))
    validate(Config(model=ModelConfig(copy_attention=True, copy_attention_separate=True, force_copy=True)))


@pytest.mark.parametrize("beam", [1, 3])
def test_translator_writes_copied_words_with_coverage(beam):
    """Text in and out through the Translator (greedy and beam search, coverage in the decoder
    state padded to the queue's source length): with the gate forced open every output word is
    copied, unknown ones (Zed, Quo) are written as in the source, and "copied" says from where."""
    from s2s_jax.config import DecodeConfig
    from s2s_jax.inference.adapter import SingleModel
    from s2s_jax.inference.translator import Translator
    from s2s_jax.vocab import WordVocab

    vocab = WordVocab(["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, V)])
    mcfg = model_config("lstm", "general", True, True, 1, copy_attention=True, coverage=True)
    batch = copy_batch()
    model, params = init(mcfg, batch={k: batch[k] for k in ("source", "source_lengths", "target_input")})
    params = dict(params, copy_gate_bias=jnp.array([30.0]))  # g = 1: p(w) is the copy distribution
    config = Config(model=mcfg, decode=DecodeConfig(max_len_a=1.0, max_len_b=2))
    translator = Translator(config, SingleModel(model), params, vocab, vocab)
    line = "w4 Zed w5 Zed Quo"
    (hyp,) = translator.translate_full([line], beam=beam)[0]
    words = line.split()
    assert hyp["tokens"] and all(w in words for w in hyp["tokens"]) and hyp["copied"]
    for c in hyp["copied"]:
        assert hyp["tokens"][c["index"]] == c["word"] and c["word"] in ("Zed", "Quo")
        assert c["source_positions"] == [i for i, w in enumerate(words) if w == c["word"]]
    assert hyp["text"] == " ".join(hyp["tokens"])
