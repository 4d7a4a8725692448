"""Greedy and beam search against stub step functions whose best outputs are known.

Markov-chain stubs (next-token log-probs are a fixed table row picked by the previous token) are
small enough to enumerate every hypothesis in numpy; a small random recurrent stub with attention
and a real per-row state checks cache reordering by teacher-forced rescoring.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2s_jax import decoding
from s2s_jax import kernels
from s2s_jax.kernels import topk
from s2s_jax.decoding import SearchSettings
from s2s_jax.vocab import BOS_ID, EOS_ID, PAD_ID

KERNELS = kernels.select("auto")  # this machine's kernel set (the searches' token selections)


def settings(max_len, **kwargs):
    return SearchSettings(max_len=max_len, kernels=KERNELS, **kwargs)


# The searches as the tests call them: plain greedy, plain beam (also with K = 1) and continuous.


def greedy_search(step_fn, cache, *, batch_size, max_lengths, max_len):
    return decoding.search(step_fn, cache, settings(max_len, strategy="greedy"), batch_size=batch_size,
                           max_lengths=max_lengths)


def beam_search(step_fn, cache, *, batch_size, max_lengths, max_len, source_lengths=None, **search):
    return decoding.search(step_fn, cache, settings(max_len, strategy="beam", **search), batch_size=batch_size,
                           max_lengths=max_lengths, source_lengths=source_lengths)


def continuous_search(step_fn, state, context, *, num_sentences, slots, max_lengths, max_len, source_lengths=None,
                      refill=None, slot_context=False, output_sizes=None, **search):
    return decoding.continuous_search(step_fn, state, context, settings(max_len, **search),
                                      num_sentences=num_sentences, slots=slots, max_lengths=max_lengths,
                                      source_lengths=source_lengths, refill=refill, slot_context=slot_context,
                                      output_sizes=output_sizes)

# ----------------------------------------------------------------------------------- stubs


def chain_table(rows, vocab_size):
    """{prev: {token: prob}} -> [V, V] log-prob table; unlisted rows are uniform."""
    probs = np.full((vocab_size, vocab_size), 1.0 / vocab_size)
    for prev, row in rows.items():
        probs[prev] = 0.0
        for token, p in row.items():
            probs[prev, token] = p
        assert abs(probs[prev].sum() - 1.0) < 1e-9, prev
    with np.errstate(divide="ignore"):  # impossible tokens get -inf logits
        return np.log(probs).astype(np.float32)


def markov_step(log_table, attention_table=None):
    """Step function whose logits are the table row of the previous token; cache is a dummy."""
    log_table = jnp.asarray(log_table)

    def step(tokens, cache):
        attention = None if attention_table is None else jnp.asarray(attention_table)[tokens]
        return log_table[tokens], cache, attention

    return step


def per_row_chain_step(tokens, cache):
    """Each row follows its own chain: cache["table"] is [N, V, V]."""
    rows = jnp.arange(tokens.shape[0])
    return cache["table"][rows, tokens], cache, None


def dummy_cache(batch_size):
    return jnp.zeros((batch_size, 1), jnp.float32)


VOCAB, HIDDEN, SOURCE = 8, 16, 5


def make_rnn_step(seed=0):
    """A random recurrent decoder with dot-product attention over per-row keys."""
    k_embed, k_recur, k_out = jax.random.split(jax.random.PRNGKey(seed), 3)
    embed = jax.random.normal(k_embed, (VOCAB, HIDDEN))
    recur = jax.random.normal(k_recur, (HIDDEN, HIDDEN)) / np.sqrt(HIDDEN)
    out = 1.5 * jax.random.normal(k_out, (HIDDEN, VOCAB))

    def step(tokens, cache):
        h = jnp.tanh(embed[tokens] + cache["h"] @ recur)  # [N, H]
        logits_keys = jnp.einsum("nsh,nh->ns", cache["keys"], h)
        mask = jnp.arange(SOURCE)[None, :] < cache["source_lengths"][:, None]
        attention = jax.nn.softmax(jnp.where(mask, logits_keys, -1e9), axis=-1)  # [N, S]
        context = jnp.einsum("ns,nsh->nh", attention, cache["keys"])
        logits = (h + context) @ out
        return logits, dict(cache, h=h), attention

    return step


def rnn_cache(seed, source_lengths):
    k_h, k_keys = jax.random.split(jax.random.PRNGKey(seed))
    batch_size = len(source_lengths)
    return {
        "h": jax.random.normal(k_h, (batch_size, HIDDEN)),
        "keys": jax.random.normal(k_keys, (batch_size, SOURCE, HIDDEN)),
        "source_lengths": jnp.asarray(source_lengths, jnp.int32),
    }


def take_row(tree, b):
    return jax.tree.map(lambda leaf: leaf[b : b + 1], tree)


# ------------------------------------------------------------------------------ references


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(
        -1, keepdims=True
    )


def enumerate_hypotheses(log_table, max_len, attention_table=None):
    """Every sequence of <= max_len tokens whose only EOS is last -> [(tokens, log_prob, attn)]."""
    log_probs = log_softmax(log_table)
    vocab_size = log_table.shape[0]
    found = []

    def extend(prefix, prev, log_prob, attention):
        if attention_table is not None:
            attention = attention + [attention_table[prev]]
        found.append((prefix + (EOS_ID,), log_prob + log_probs[prev, EOS_ID], attention))
        if len(prefix) < max_len - 1:
            for token in range(vocab_size):
                if token != EOS_ID:
                    extend(prefix + (token,), token, log_prob + log_probs[prev, token], attention)

    extend((), BOS_ID, 0.0, [])
    return found


def gnmt_score(log_prob, length, attention=None, alpha=0.0, beta=0.0, source_length=None):
    score = log_prob / ((5.0 + length) / 6.0) ** alpha
    if beta:
        coverage = np.asarray(attention, np.float64).sum(0)[:source_length]
        score += beta * np.log(np.minimum(coverage, 1.0)).sum()
    return score


def unpad(tokens, length):
    return tuple(int(t) for t in np.asarray(tokens)[: int(length)])


def check_well_formed(tokens, lengths, max_lengths):
    """EOS exactly at length-1, never before, PAD after; lengths within limits."""
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    for b in range(tokens.shape[0]):
        rows = tokens[b].reshape(-1, tokens.shape[-1])
        for row, length in zip(rows, lengths[b].reshape(-1)):
            assert 1 <= length <= max_lengths[b]
            assert row[length - 1] == EOS_ID
            assert EOS_ID not in row[: length - 1]
            assert np.all(row[length:] == PAD_ID)


# ----------------------------------------------------------------------------------- tests

# PAD, BOS, EOS, then ordinary tokens a, b.
A, B_ = 3, 4
# Greedy takes `a` (0.6) and then wanders; the best sentence is `b EOS` (0.38 * 0.9).
TRAP_CHAIN = chain_table(
    {
        BOS_ID: {A: 0.6, B_: 0.38, EOS_ID: 0.01, PAD_ID: 0.005, BOS_ID: 0.005},
        A: {A: 0.4, B_: 0.3, EOS_ID: 0.28, PAD_ID: 0.01, BOS_ID: 0.01},
        B_: {EOS_ID: 0.9, A: 0.05, B_: 0.03, PAD_ID: 0.01, BOS_ID: 0.01},
    },
    vocab_size=5,
)


def test_beam_finds_best_path_that_greedy_misses():
    max_len = 5
    step = markov_step(TRAP_CHAIN)
    hypotheses = enumerate_hypotheses(TRAP_CHAIN, max_len)
    best_tokens, best_log_prob, _ = max(hypotheses, key=lambda h: h[1])
    assert best_tokens == (B_, EOS_ID)
    np.testing.assert_allclose(best_log_prob, np.log(0.38 * 0.9), rtol=1e-6)

    beam = beam_search(
        step, dummy_cache(1), batch_size=1, beam_size=2, max_lengths=jnp.array([max_len]),
        max_len=max_len,
    )
    assert unpad(beam["tokens"][0, 0], beam["lengths"][0, 0]) == best_tokens
    np.testing.assert_allclose(beam["scores"][0, 0], best_log_prob, rtol=1e-5)
    np.testing.assert_allclose(beam["log_probs"][0, 0], best_log_prob, rtol=1e-5)

    greedy = greedy_search(
        step, dummy_cache(1), batch_size=1, max_lengths=jnp.array([max_len]), max_len=max_len
    )
    # a a a a, then EOS forced by the length limit.
    assert unpad(greedy["tokens"][0], greedy["lengths"][0]) == (A, A, A, A, EOS_ID)
    np.testing.assert_allclose(greedy["scores"][0], np.log(0.6 * 0.4**3 * 0.28), rtol=1e-5)
    assert greedy["attention"] is None and beam["attention"] is None


def test_beam_size_one_equals_greedy_on_recurrent_stub():
    step = make_rnn_step(seed=1)
    source_lengths = [5, 2, 3, 4]
    cache = rnn_cache(seed=2, source_lengths=source_lengths)
    max_lengths = jnp.array([9, 3, 6, 1])
    kwargs = dict(batch_size=4, max_lengths=max_lengths, max_len=9)
    greedy = greedy_search(step, cache, **kwargs)
    beam = beam_search(step, cache, beam_size=1, source_lengths=jnp.array(source_lengths), **kwargs)
    np.testing.assert_array_equal(beam["tokens"][:, 0], greedy["tokens"])
    np.testing.assert_array_equal(beam["lengths"][:, 0], greedy["lengths"])
    np.testing.assert_allclose(beam["scores"][:, 0], greedy["scores"], rtol=1e-6)
    np.testing.assert_allclose(beam["attention"][:, 0], greedy["attention"], atol=1e-6)
    check_well_formed(greedy["tokens"][:, None], greedy["lengths"][:, None], max_lengths)
    assert int(greedy["lengths"][3]) == 1  # a limit of one token allows only EOS


def test_beam_reorders_cache_teacher_forced_rescoring_matches():
    """Each n-best hypothesis, replayed token by token from its own sentence's initial state,
    must reproduce the returned log-prob and attention: wrong cache gathering breaks this."""
    step = make_rnn_step(seed=3)
    source_lengths = [5, 3, 4]
    cache = rnn_cache(seed=4, source_lengths=source_lengths)
    max_len = 7
    out = beam_search(
        step, cache, batch_size=3, beam_size=4, nbest=4, max_lengths=jnp.array([7, 5, 6]),
        max_len=max_len, length_penalty=0.6, source_lengths=jnp.array(source_lengths),
    )
    step_jit = jax.jit(step)
    replayed_some_long = False
    for b in range(3):
        for n in range(4):
            length = int(out["lengths"][b, n])
            replayed_some_long |= length >= 3
            row_cache, token, log_prob = take_row(cache, b), jnp.array([BOS_ID]), 0.0
            for t in range(length):
                logits, row_cache, attention = step_jit(token, row_cache)
                token = out["tokens"][b, n, t][None]
                log_prob += log_softmax(logits)[0, int(token[0])]
                np.testing.assert_allclose(out["attention"][b, n, t], attention[0], atol=1e-5)
            np.testing.assert_allclose(out["log_probs"][b, n], log_prob, rtol=1e-5, atol=1e-5)
    assert replayed_some_long


def test_nbest_sorted_distinct_and_scored_by_the_formula():
    step = make_rnn_step(seed=5)
    source_lengths = np.array([5, 2, 4])
    cache = rnn_cache(seed=6, source_lengths=source_lengths)
    alpha, beta, max_lengths = 0.6, 0.3, np.array([8, 6, 7])
    out = beam_search(
        step, cache, batch_size=3, beam_size=6, nbest=6, max_lengths=jnp.asarray(max_lengths),
        max_len=8, length_penalty=alpha, coverage_penalty=beta,
        source_lengths=jnp.asarray(source_lengths),
    )
    scores = np.asarray(out["scores"])
    assert np.all(np.isfinite(scores))
    assert np.all(np.diff(scores, axis=1) <= 0)
    check_well_formed(out["tokens"], out["lengths"], max_lengths)
    for b in range(3):
        hypotheses = {unpad(out["tokens"][b, n], out["lengths"][b, n]) for n in range(6)}
        assert len(hypotheses) == 6
        for n in range(6):
            length = int(out["lengths"][b, n])
            expected = gnmt_score(
                float(out["log_probs"][b, n]), length, out["attention"][b, n, :length],
                alpha, beta, source_lengths[b],
            )
            np.testing.assert_allclose(scores[b, n], expected, rtol=1e-5)
            assert np.all(np.asarray(out["attention"][b, n, length:]) == 0)


def test_nbest_hypotheses_distinct_at_first_step():
    """Only beam 0 is live initially, so the n-best are not copies of one hypothesis."""
    out = beam_search(
        markov_step(TRAP_CHAIN), dummy_cache(1), batch_size=1, beam_size=4, nbest=4,
        max_lengths=jnp.array([3]), max_len=3,
    )
    found = [unpad(out["tokens"][0, n], out["lengths"][0, n]) for n in range(4)]
    assert len(set(found)) == 4
    exhaustive = sorted(enumerate_hypotheses(TRAP_CHAIN, 3), key=lambda h: -h[1])
    assert found[0] == exhaustive[0][0]
    for hypothesis, log_prob in zip(found, np.asarray(out["log_probs"][0])):
        expected = next(h[1] for h in exhaustive if h[0] == hypothesis)
        np.testing.assert_allclose(log_prob, expected, rtol=1e-5)


C_, D_, E_ = 4, 5, 6
# Short `a EOS` (0.3) versus long `c d e EOS` (0.35 * 0.9**3 = 0.25515).
LENGTH_CHAIN = chain_table(
    {
        BOS_ID: {A: 0.40, C_: 0.35, EOS_ID: 0.2, D_: 0.02, E_: 0.01, PAD_ID: 0.01, BOS_ID: 0.01},
        A: {EOS_ID: 0.75, A: 0.1, C_: 0.05, D_: 0.04, E_: 0.04, PAD_ID: 0.01, BOS_ID: 0.01},
        C_: {D_: 0.9, EOS_ID: 0.05, A: 0.02, C_: 0.01, E_: 0.01, PAD_ID: 0.005, BOS_ID: 0.005},
        D_: {E_: 0.9, EOS_ID: 0.05, A: 0.02, C_: 0.01, D_: 0.01, PAD_ID: 0.005, BOS_ID: 0.005},
        E_: {EOS_ID: 0.9, A: 0.04, C_: 0.02, D_: 0.02, E_: 0.01, PAD_ID: 0.005, BOS_ID: 0.005},
    },
    vocab_size=7,
)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_length_penalty_changes_choice_as_the_formula_says(alpha):
    short, long = (A, EOS_ID), (C_, D_, E_, EOS_ID)
    # By hand: log(0.3) = -1.204 vs log(0.25515) = -1.366 without penalty; with alpha = 1,
    # -1.204 / (7/6) = -1.032 vs -1.366 / (9/6) = -0.911, so the long one wins.
    short_score = np.log(0.3) / (7 / 6) ** alpha
    long_score = np.log(0.35 * 0.9**3) / (9 / 6) ** alpha
    expected = short if short_score > long_score else long
    assert expected == (short if alpha == 0 else long)
    # And nothing else beats both (exhaustive, same formula).
    hypotheses = enumerate_hypotheses(LENGTH_CHAIN, 6)
    best = max(hypotheses, key=lambda h: gnmt_score(h[1], len(h[0]), alpha=alpha))
    assert best[0] == expected

    out = beam_search(
        markov_step(LENGTH_CHAIN), dummy_cache(1), batch_size=1, beam_size=3,
        max_lengths=jnp.array([6]), max_len=6, length_penalty=alpha,
    )
    assert unpad(out["tokens"][0, 0], out["lengths"][0, 0]) == expected
    np.testing.assert_allclose(out["scores"][0, 0], max(short_score, long_score), rtol=1e-5)
    np.testing.assert_allclose(
        out["log_probs"][0, 0], np.log(0.3 if expected == short else 0.35 * 0.9**3), rtol=1e-5
    )


C5 = 5  # token c of the coverage chain (a = 3, b = 4)
# Short `a EOS` (0.4) looks only at source word 0; `b c EOS` (0.256) covers all three words.
COVERAGE_CHAIN = chain_table(
    {
        BOS_ID: {A: 0.5, B_: 0.4, C5: 0.045, EOS_ID: 0.035, PAD_ID: 0.01, BOS_ID: 0.01},
        A: {EOS_ID: 0.8, A: 0.1, B_: 0.05, C5: 0.03, PAD_ID: 0.01, BOS_ID: 0.01},
        B_: {C5: 0.8, EOS_ID: 0.1, A: 0.05, B_: 0.03, PAD_ID: 0.01, BOS_ID: 0.01},
        C5: {EOS_ID: 0.8, A: 0.1, B_: 0.05, C5: 0.03, PAD_ID: 0.01, BOS_ID: 0.01},
    },
    vocab_size=6,
)
# Attention by previous token over 4 source positions; position 3 is padding (never attended).
COVERAGE_ATTENTION = np.array(
    [
        [0.34, 0.33, 0.33, 0.0],  # PAD
        [0.9, 0.05, 0.05, 0.0],  # BOS
        [0.34, 0.33, 0.33, 0.0],  # EOS
        [0.9, 0.05, 0.05, 0.0],  # a
        [0.05, 0.9, 0.05, 0.0],  # b
        [0.05, 0.05, 0.9, 0.0],  # c
    ],
    np.float32,
)


@pytest.mark.parametrize("beta", [0.0, 0.2])
def test_coverage_penalty_changes_ranking(beta):
    short, covering = (A, EOS_ID), (B_, C5, EOS_ID)
    # By hand: a EOS attends [1.8, 0.1, 0.1] -> penalty beta * 2 log(0.1); b c EOS attends
    # [1, 1, 1] -> penalty 0. beta = 0.2: log(0.4) - 0.921 = -1.837 < log(0.256) = -1.363.
    short_score = np.log(0.4) + beta * 2 * np.log(0.1)
    covering_score = np.log(0.4 * 0.8 * 0.8)
    expected = short if short_score > covering_score else covering
    assert expected == (short if beta == 0 else covering)
    hypotheses = enumerate_hypotheses(COVERAGE_CHAIN, 5, COVERAGE_ATTENTION)
    best = max(
        hypotheses, key=lambda h: gnmt_score(h[1], len(h[0]), h[2], beta=beta, source_length=3)
    )
    assert best[0] == expected

    out = beam_search(
        markov_step(COVERAGE_CHAIN, COVERAGE_ATTENTION), dummy_cache(1), batch_size=1,
        beam_size=3, nbest=2, max_lengths=jnp.array([5]), max_len=5, coverage_penalty=beta,
        source_lengths=jnp.array([3]),
    )
    assert unpad(out["tokens"][0, 0], out["lengths"][0, 0]) == expected
    # The padded position (zero attention) must not be penalised.
    np.testing.assert_allclose(out["scores"][0, 0], max(short_score, covering_score), atol=1e-4)
    assert unpad(out["tokens"][0, 1], out["lengths"][0, 1]) in {short, covering} - {expected}


def random_chains(seed, batch_size, vocab_size=6):
    logits = np.random.default_rng(seed).normal(size=(batch_size, vocab_size, vocab_size)) * 2
    return {"table": jnp.asarray(log_softmax(logits), jnp.float32)}


@pytest.mark.parametrize("stub", ["rnn", "chains"])
def test_batched_decoding_equals_decoding_each_sentence_alone(stub):
    max_lengths = np.array([3, 8, 5, 8])
    source_lengths = np.array([5, 2, 4, 1])
    if stub == "rnn":
        step, cache = make_rnn_step(seed=7), rnn_cache(seed=8, source_lengths=source_lengths)
        penalties = dict(length_penalty=0.6, coverage_penalty=0.2)
    else:
        step, cache = per_row_chain_step, random_chains(seed=9, batch_size=4)
        penalties = dict(length_penalty=1.0)

    def search(batch_size):
        return jax.jit(
            partial(beam_search, step, batch_size=batch_size, beam_size=3, nbest=2, max_len=8,
                    **penalties)
        )

    batched = search(4)(
        cache, max_lengths=jnp.asarray(max_lengths), source_lengths=jnp.asarray(source_lengths)
    )
    check_well_formed(batched["tokens"], batched["lengths"], max_lengths)
    alone_search = search(1)
    for b in range(4):
        alone = alone_search(
            take_row(cache, b), max_lengths=jnp.asarray(max_lengths[b : b + 1]),
            source_lengths=jnp.asarray(source_lengths[b : b + 1]),
        )
        np.testing.assert_array_equal(batched["tokens"][b], alone["tokens"][0])
        np.testing.assert_array_equal(batched["lengths"][b], alone["lengths"][0])
        np.testing.assert_allclose(batched["scores"][b], alone["scores"][0], rtol=1e-5)
        if stub == "rnn":
            np.testing.assert_allclose(batched["attention"][b], alone["attention"][0], atol=1e-5)

    greedy_batched = greedy_search(step, cache, batch_size=4, max_lengths=max_lengths, max_len=8)
    for b in range(4):
        alone = greedy_search(
            step, take_row(cache, b), batch_size=1, max_lengths=max_lengths[b : b + 1], max_len=8
        )
        np.testing.assert_array_equal(greedy_batched["tokens"][b], alone["tokens"][0])
        np.testing.assert_allclose(greedy_batched["scores"][b], alone["scores"][0], rtol=1e-5)


# EOS is nearly impossible, so every sentence runs into its length limit.
NO_EOS_CHAIN = chain_table(
    {
        BOS_ID: {A: 0.7, B_: 0.2998, EOS_ID: 0.0002},
        A: {B_: 0.7, A: 0.2998, EOS_ID: 0.0002},
        B_: {A: 0.7, B_: 0.2998, EOS_ID: 0.0002},
    },
    vocab_size=5,
)


def test_finished_hypotheses_never_grow_and_max_lengths_hold():
    max_lengths = np.array([2, 4, 1, 9])  # 9 > max_len: clipped to max_len
    max_len = 6
    step, cache = markov_step(NO_EOS_CHAIN), dummy_cache(4)
    greedy = greedy_search(
        step, cache, batch_size=4, max_lengths=jnp.asarray(max_lengths), max_len=max_len
    )
    beam = beam_search(
        step, cache, batch_size=4, beam_size=2, nbest=2, max_lengths=jnp.asarray(max_lengths),
        max_len=max_len,
    )
    limits = np.minimum(max_lengths, max_len)
    np.testing.assert_array_equal(greedy["lengths"], limits)
    np.testing.assert_array_equal(beam["lengths"][:, 0], limits)
    check_well_formed(greedy["tokens"][:, None], greedy["lengths"][:, None], limits)
    # A one-token limit leaves a single hypothesis (EOS), so the second n-best slot is empty.
    assert int(beam["lengths"][2, 1]) == 0 and np.all(np.asarray(beam["tokens"][2, 1]) == PAD_ID)
    assert beam["scores"][2, 1] == -np.inf
    keep = np.array([0, 1, 3])
    check_well_formed(beam["tokens"][keep], beam["lengths"][keep], limits[keep])
    # Greedy alternates a b a b ...; the forced EOS is scored with its own log-prob.
    for b, limit in enumerate(limits):
        expected = tuple([A, B_] * 3)[: limit - 1] + (EOS_ID,)
        assert unpad(greedy["tokens"][b], greedy["lengths"][b]) == expected
        log_prob = np.log(0.7) * (limit - 1) + np.log(0.0002)
        np.testing.assert_allclose(greedy["scores"][b], log_prob, rtol=1e-5)
        np.testing.assert_allclose(beam["log_probs"][b, 0], log_prob, rtol=1e-5)

    # Sentences that end early stay ended while others run on: PAD after EOS, right lengths.
    step = markov_step(TRAP_CHAIN)
    out = beam_search(
        step, dummy_cache(2), batch_size=2, beam_size=3, nbest=3, max_lengths=jnp.array([6, 6]),
        max_len=6,
    )
    check_well_formed(out["tokens"], out["lengths"], [6, 6])
    assert int(out["lengths"][0, 0]) == 2


def test_rejects_bad_arguments():
    step, cache = markov_step(TRAP_CHAIN), dummy_cache(1)
    common = dict(batch_size=1, max_lengths=jnp.array([4]), max_len=4)
    with pytest.raises(ValueError, match="coverage_penalty"):
        beam_search(step, cache, beam_size=2, coverage_penalty=0.2, **common)
    with pytest.raises(ValueError, match="nbest"):
        beam_search(step, cache, beam_size=2, nbest=3, **common)
    with pytest.raises(ValueError, match="max_lengths"):
        greedy_search(step, cache, batch_size=2, max_lengths=jnp.array([4]), max_len=4)


def test_early_stop_bound_uses_the_longest_allowed_length():
    """With alpha = 2, `EOS` (0.5) finishes first and beats the live prefix `t3` (0.3) even if
    that prefix finished next step: -1.204 / (7/6)^2 = -0.885 < log(0.5) = -0.693. Stopping
    there would be wrong: `t3 ... t10 EOS` (0.3 * 0.99^8, 9 tokens) scores
    -1.284 / (14/6)^2 = -0.236, which only the bound at the longest length sees coming."""
    vocab_size, alpha = 11, 2.0
    chain_tokens = list(range(3, 11))  # t3 .. t10
    rows = {BOS_ID: {EOS_ID: 0.5, 3: 0.3}}
    rows[BOS_ID].update({t: 0.2 / 9 for t in [PAD_ID, BOS_ID] + chain_tokens[1:]})
    for t in chain_tokens:
        following = t + 1 if t < 10 else EOS_ID
        rows[t] = {u: 0.01 / 10 for u in range(vocab_size) if u != following}
        rows[t][following] = 0.99
    out = beam_search(
        markov_step(chain_table(rows, vocab_size)), dummy_cache(1), batch_size=1, beam_size=2,
        max_lengths=jnp.array([10]), max_len=10, length_penalty=alpha,
    )
    long = tuple(chain_tokens) + (EOS_ID,)
    long_score = (np.log(0.3) + 8 * np.log(0.99)) / ((5 + 9) / 6) ** alpha
    assert long_score > np.log(0.5)
    assert unpad(out["tokens"][0, 0], out["lengths"][0, 0]) == long
    np.testing.assert_allclose(out["scores"][0, 0], long_score, rtol=1e-4)

    # stop_rule="current_length" compares at the current length only, so it stops after the
    # first step (log 0.5 = -0.693 beats -0.885) and returns `EOS`: the search it saves is the
    # one that would have found the winner.
    short = beam_search(
        markov_step(chain_table(rows, vocab_size)), dummy_cache(1), batch_size=1, beam_size=2,
        max_lengths=jnp.array([10]), max_len=10, length_penalty=alpha, stop_rule="current_length",
    )
    assert unpad(short["tokens"][0, 0], short["lengths"][0, 0]) == (EOS_ID,)
    np.testing.assert_allclose(short["scores"][0, 0], np.log(0.5), rtol=1e-5)
    with pytest.raises(ValueError, match="stop_rule"):
        settings(10, stop_rule="early")


# ----------------------------------------------------------------- continuous batching


def split_rnn_cache(cache):
    """make_rnn_step's cache as (state that follows the beams, per-sentence context)."""
    return {"h": cache["h"]}, {"keys": cache["keys"], "source_lengths": cache["source_lengths"]}


def rnn_context_step(step):
    def context_step(tokens, state, context):
        logits, new, attention = step(tokens, {**state, **context})
        return logits, {"h": new["h"]}, attention

    return context_step


@pytest.mark.parametrize("beam_size", [1, 3])
def test_continuous_search_equals_plain_search_per_sentence(beam_size):
    """7 mixed-length sentences through 2 slots (refilled one per step) and through 3 slots
    (several refills in one step) give each sentence exactly the plain search's tokens, lengths
    and scores; the queue entry past num_sentences is left undecoded (zeros)."""
    n, queue = 7, 8
    source_lengths = np.array([5, 1, 3, 5, 2, 4, 1, 1])
    max_lengths = np.array([9, 2, 6, 9, 4, 1, 7, 3])  # one sentence may only emit EOS
    step = make_rnn_step(seed=11)
    cache = rnn_cache(seed=12, source_lengths=source_lengths)
    penalties = dict(length_penalty=0.6, coverage_penalty=0.2) if beam_size > 1 else {}
    if beam_size == 1:
        plain = greedy_search(step, cache, batch_size=queue, max_lengths=jnp.asarray(max_lengths), max_len=9)
    else:
        plain = beam_search(step, cache, batch_size=queue, beam_size=beam_size, nbest=2,
                            max_lengths=jnp.asarray(max_lengths), max_len=9,
                            source_lengths=jnp.asarray(source_lengths), **penalties)
    state, context = split_rnn_cache(cache)
    for slots, refill in [(2, 1), (3, 3)]:
        out = jax.jit(partial(
            continuous_search, rnn_context_step(step), slots=slots, beam_size=beam_size,
            nbest=1 if beam_size == 1 else 2, max_len=9, refill=refill, **penalties,
        ))(state, context, num_sentences=n, max_lengths=jnp.asarray(max_lengths),
           source_lengths=jnp.asarray(source_lengths))
        keys = ["tokens", "lengths", "scores", "attention"] + ([] if beam_size == 1 else ["log_probs"])
        for key in keys:
            np.testing.assert_allclose(np.asarray(out[key])[:n], np.asarray(plain[key])[:n], rtol=1e-6,
                                       atol=1e-6, err_msg=f"{key} slots={slots}")
        assert np.all(np.asarray(out["lengths"])[n:] == 0)  # never decoded
        lengths = np.asarray(out["lengths"])[:n]
        assert lengths.reshape(n, -1)[:, 0].tolist() == np.asarray(plain["lengths"])[:n].reshape(n, -1)[:, 0].tolist()
        assert int(lengths.reshape(n, -1)[5, 0]) == 1  # the one-token limit holds in a refilled slot


@pytest.mark.parametrize("beam_size", [1, 3])
def test_continuous_search_slot_context_equals_per_row_context(beam_size):
    """slot_context=True hands the step function one context entry per slot (leading dim P, not
    P*K); a step that tiles it to its K rows itself gives exactly the per-row search."""
    n, queue, slots = 7, 8, 3
    source_lengths = np.array([5, 1, 3, 5, 2, 4, 1, 1])
    max_lengths = jnp.asarray(np.array([9, 2, 6, 9, 4, 1, 7, 3]))
    step = rnn_context_step(make_rnn_step(seed=21))
    state, context = split_rnn_cache(rnn_cache(seed=22, source_lengths=source_lengths))
    seen = []

    def slot_step(tokens, state, context):
        group = tokens.shape[0] // context["keys"].shape[0]
        seen.append((tokens.shape[0], context["keys"].shape[0], context["source_lengths"].shape[0]))
        return step(tokens, state, jax.tree.map(lambda a: jnp.repeat(a, group, axis=0), context))

    penalties = dict(length_penalty=0.6, coverage_penalty=0.2) if beam_size > 1 else {}
    common = dict(slots=slots, beam_size=beam_size, nbest=1 if beam_size == 1 else 2, max_len=9, refill=2,
                  **penalties)
    args = (state, context)
    kwargs = dict(num_sentences=n, max_lengths=max_lengths, source_lengths=jnp.asarray(source_lengths))
    per_row = jax.jit(partial(continuous_search, step, **common))(*args, **kwargs)
    per_slot = jax.jit(partial(continuous_search, slot_step, slot_context=True, **common))(*args, **kwargs)
    assert seen and all(s == (slots * beam_size, slots, slots) for s in seen)
    for key in per_row:
        if per_row[key] is not None:
            np.testing.assert_array_equal(np.asarray(per_slot[key]), np.asarray(per_row[key]), err_msg=key)
    assert int(np.asarray(per_row["lengths"]).reshape(queue, -1)[:n, 0].min()) >= 1
    with pytest.raises(ValueError, match="slot_context"):
        decoding.engine.Engine(decoding.Greedy(settings(4), None), num_results=2, refill=0, slot_context=True)


def test_continuous_search_output_sizes_skip_the_probe_trace():
    """Given (V, S) up front, continuous_search traces the step function once (no probe) and
    decodes exactly as when it probes; wrong sizes are not silently accepted."""
    source_lengths = np.array([5, 1, 3, 4])
    step = rnn_context_step(make_rnn_step(seed=31))
    state, context = split_rnn_cache(rnn_cache(seed=32, source_lengths=source_lengths))
    traces = []

    def counted(tokens, state, context):
        traces.append(tokens.shape)
        return step(tokens, state, context)

    kwargs = dict(num_sentences=4, slots=2, beam_size=2, max_lengths=None, max_len=6, coverage_penalty=0.2,
                  source_lengths=jnp.asarray(source_lengths))
    probed = continuous_search(counted, state, context, **kwargs)
    assert len(traces) == 2  # the probe, then the loop body
    traces.clear()
    given = continuous_search(counted, state, context, output_sizes=(VOCAB, SOURCE), **kwargs)
    assert len(traces) == 1
    for key in probed:
        np.testing.assert_array_equal(np.asarray(given[key]), np.asarray(probed[key]), err_msg=key)
    with pytest.raises(Exception):
        continuous_search(counted, state, context, output_sizes=(VOCAB + 1, SOURCE), **kwargs)


def test_continuous_search_per_row_chains_many_refills():
    """Markov chains per sentence (state = the table rows), 12 sentences through 2 slots."""
    tables = random_chains(seed=21, batch_size=12, vocab_size=7)

    def chain_step(tokens, state, context):
        rows = jnp.arange(tokens.shape[0])
        return context["table"][rows, tokens], state, None

    max_lengths = jnp.asarray(np.random.default_rng(3).integers(1, 8, size=12))
    state = jnp.zeros((12, 1))
    for beam_size in (1, 2):
        out = continuous_search(chain_step, state, tables, num_sentences=12, slots=2, beam_size=beam_size,
                                max_lengths=max_lengths, max_len=7, length_penalty=1.0)
        if beam_size == 1:
            plain = greedy_search(per_row_chain_step, tables, batch_size=12, max_lengths=max_lengths, max_len=7)
        else:
            plain = beam_search(per_row_chain_step, tables, batch_size=12, beam_size=2, max_lengths=max_lengths,
                                max_len=7, length_penalty=1.0)
        np.testing.assert_array_equal(out["tokens"], plain["tokens"])
        np.testing.assert_allclose(out["scores"], plain["scores"], rtol=1e-6)
        assert out["attention"] is None


def test_continuous_search_rejects_bad_arguments():
    state, context = jnp.zeros((4, 1)), None
    step = lambda tokens, s, c: (jnp.zeros((tokens.shape[0], 5)), s, None)  # noqa: E731
    with pytest.raises(ValueError, match="slots"):
        continuous_search(step, state, context, num_sentences=4, slots=0, max_lengths=None, max_len=4)
    with pytest.raises(ValueError, match="refill"):
        continuous_search(step, state, context, num_sentences=4, slots=2, refill=0, max_lengths=None, max_len=4)
    with pytest.raises(ValueError, match="nbest"):
        continuous_search(step, state, context, num_sentences=4, slots=2, beam_size=2, nbest=3,
                          max_lengths=None, max_len=4)


# ------------------------------------------------------ candidate selection over a large V


def tied_logits(seed, rows, vocab_size):
    """Random logits with many exact ties (values on a coarse grid), so tie order is tested."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.round(rng.normal(size=(rows, vocab_size)) * 2) / 2, jnp.float32)


@pytest.mark.parametrize("ks", kernels.SETS)
def test_chunked_top_extensions_equal_flat_top_k(ks):
    """The selection (cpu: chunked, V = 1024, 32-token chunks; portable: plain) gives lax.top_k's
    values and indices over all K*V extensions exactly, ties included, also for forced-EOS and
    dead beams."""
    B, K, V, C = 6, 3, 1024, 6
    assert topk._chunk_size(V, C) == 32 and topk._chunk_size(5, 2) is None
    logits = tied_logits(0, B * K, V).reshape(B, K, V)
    alive = jnp.asarray(np.round(np.random.default_rng(1).normal(size=(B, K)), 1), jnp.float32)
    alive = alive.at[1, 1:].set(-jnp.inf)  # a sentence with one live beam
    force = jnp.asarray([False, False, True, False, True, False])
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    log_probs = jnp.where(force[:, None, None] & (jnp.arange(V) != EOS_ID), -jnp.inf, log_probs)
    want_values, want_index = jax.lax.top_k((alive[:, :, None] + log_probs).reshape(B, K * V), C)
    values, index = kernels.select(ks).top_extensions(alive, logits, force, EOS_ID, C)
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_array_equal(values, want_values)
    assert np.all(np.asarray(index)[[2, 4]][:, :K] % V == EOS_ID)  # forced: EOS of each beam first


@pytest.mark.parametrize("ks", kernels.SETS)
def test_chunked_best_token_equals_argmax_of_log_softmax(ks):
    B, V = 8, 1024
    assert topk._chunk_size(V, 1) == 64
    logits = tied_logits(2, B, V)
    logits = logits.at[3].set(0.0)  # all tied: token 0
    logits = logits.at[5, EOS_ID].set(-jnp.inf)  # forced EOS that is impossible: token 0, -inf
    force = jnp.asarray([False, True, False, False, False, True, False, True])
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    log_probs = jnp.where(force[:, None] & (jnp.arange(V) != EOS_ID), -jnp.inf, log_probs)
    token, best = kernels.select(ks).best_token(logits, force, EOS_ID)
    np.testing.assert_array_equal(token, jnp.argmax(log_probs, axis=-1))
    np.testing.assert_array_equal(best, jnp.max(log_probs, axis=-1))
    assert int(token[3]) == 0 and int(token[1]) == EOS_ID and int(token[5]) == 0


@pytest.mark.parametrize("beam_size", [1, 3])
def test_slot_pool_sentences_joining_while_it_runs_get_the_plain_search(beam_size):
    """decoding.SlotPool (continuous batching across calls): sentences admitted at different
    times, started in free slots as others finish (inside a run, 1 per step), runs of 3 steps over
    the first `active` slots only (2, then 4, as the caller picks from the reported load), give
    each sentence exactly the plain search's tokens, lengths and scores."""
    n = 7
    source_lengths = np.array([5, 1, 3, 5, 2, 4, 1, 1])
    max_lengths = np.array([9, 2, 6, 9, 4, 1, 7, 3])
    step = make_rnn_step(seed=31)
    cache = rnn_cache(seed=32, source_lengths=source_lengths)
    penalties = dict(length_penalty=0.6, coverage_penalty=0.2) if beam_size > 1 else {}
    nbest = 1 if beam_size == 1 else 2
    if beam_size == 1:
        plain = greedy_search(step, cache, batch_size=8, max_lengths=jnp.asarray(max_lengths), max_len=9)
    else:
        plain = beam_search(step, cache, batch_size=8, beam_size=beam_size, nbest=nbest,
                            max_lengths=jnp.asarray(max_lengths), max_len=9,
                            source_lengths=jnp.asarray(source_lengths), **penalties)
    state, context = split_rnn_cache(cache)
    W, R = 3, 5  # a ring of 3 sentences waiting to start; results of 5 tickets in flight
    pool_ops = decoding.SlotPool(lambda: rnn_context_step(step),
                                 settings(9, beam_size=beam_size, nbest=nbest, **penalties), slots=4, queue=W,
                                 results=R, vocab_size=VOCAB, source_len=SOURCE, refill=1, slot_context=False)
    pool = pool_ops.empty(state, context)
    admit = jax.jit(pool_ops.admit)
    runs = {a: jax.jit(partial(pool_ops.run, steps=3, active=a)) for a in (2, 4)}
    arrivals = [[0, 1, 2], [3], [], [4, 5, 6]]  # per round, the sentences that arrive
    waiting, ticket_of, got, tail, info = [], {}, {}, 0, {"last_busy": -1, "busy": 0, "waiting": 0}
    unstarted, seen_active = 0, set()
    for round_ in range(60):
        waiting += arrivals[round_] if round_ < len(arrivals) else []
        oldest = min(ticket_of, default=tail)
        room = min(W - unstarted, R - (tail - oldest))
        new, waiting = waiting[:room], waiting[room:]
        if new:
            idx = np.asarray(new + [0] * (4 - len(new)))  # padded to 4 rows; only `count` are real
            pool = admit(pool, len(new), jax.tree.map(lambda a: a[idx], state), jax.tree.map(lambda a: a[idx], context),
                         max_lengths[idx], source_lengths[idx])
            for i in new:
                ticket_of[tail] = i
                tail += 1
            unstarted += len(new)
        if not ticket_of and not waiting and round_ >= len(arrivals):
            break
        need = max(int(info["last_busy"]) + 1, min(4, len(ticket_of)))
        active = 2 if need <= 2 else 4
        seen_active.add(active)
        pool, done, results, info = runs[active](pool, ())
        unstarted = int(info["waiting"])
        for pos in np.flatnonzero(np.asarray(done)):
            ticket = next(t for t in ticket_of if t % R == pos)
            got[ticket_of.pop(ticket)] = jax.tree.map(lambda a: np.asarray(a)[pos], results)
    assert sorted(got) == list(range(n)) and seen_active == {2, 4}
    keys = ["tokens", "lengths", "scores"] + ([] if beam_size == 1 else ["log_probs"])
    for i in range(n):
        for key in keys:
            np.testing.assert_allclose(got[i][key], np.asarray(plain[key])[i], rtol=1e-6, atol=1e-6,
                                       err_msg=f"{key} sentence {i}")
