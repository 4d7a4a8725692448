"""Decoding controls (min_length, block_ngram_repeat, length/coverage penalty kinds, stepwise
coverage penalty) and the `vocab_ids` hook, against Markov-chain stubs with known answers.

References: a numpy greedy that bans tokens as OpenNMT-py does (a dictionary of seen n-grams),
and exhaustive enumeration of every hypothesis for beam search's best.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2s_jax import config as config_lib
from s2s_jax import decoding, kernels
from s2s_jax.decoding import strategies
from s2s_jax.kernels import topk
from s2s_jax.vocab import BOS_ID, EOS_ID, PAD_ID
from tests.test_decoding import (COVERAGE_ATTENTION, COVERAGE_CHAIN, LENGTH_CHAIN, beam_search, chain_table,
                                 check_well_formed, continuous_search, dummy_cache, enumerate_hypotheses,
                                 greedy_search, log_softmax, make_rnn_step, markov_step, random_chains,
                                 rnn_cache, settings, unpad)

A, B_, C_, D_ = 3, 4, 5, 6
# Loves to repeat: BOS -> a, a -> b, b -> a; EOS is unlikely until late.
REPEAT_CHAIN = chain_table(
    {
        BOS_ID: {A: 0.7, B_: 0.1, C_: 0.1, EOS_ID: 0.05, D_: 0.05},
        A: {B_: 0.6, C_: 0.2, EOS_ID: 0.1, A: 0.05, D_: 0.05},
        B_: {A: 0.6, EOS_ID: 0.2, C_: 0.1, D_: 0.05, B_: 0.05},
        C_: {A: 0.4, EOS_ID: 0.3, B_: 0.1, C_: 0.1, D_: 0.1},
        D_: {EOS_ID: 0.5, A: 0.2, B_: 0.1, C_: 0.1, D_: 0.1},
    },
    vocab_size=7,
)


def repeats(sequence, n, ignore=()):
    """Whether BOS + sequence repeats an n-gram free of `ignore` tokens (what blocking forbids)."""
    seen = set()
    full = (BOS_ID,) + tuple(sequence)
    for i in range(len(full) - n + 1):
        gram = full[i:i + n]
        if set(gram) & set(ignore):
            continue
        if gram in seen:
            return True
        seen.add(gram)
    return False


def reference_greedy(table, limit, *, min_length=0, ngram=0, ignore=()):
    """Greedy over a chain with OpenNMT-py's bans (forbidden (n-1)-gram -> next tokens)."""
    log_probs = log_softmax(table)
    sequence, score = [], 0.0
    for t in range(limit):
        row = log_probs[BOS_ID if not sequence else sequence[-1]].copy()
        if t == limit - 1:
            row[np.arange(len(row)) != EOS_ID] = -np.inf
        elif t < min_length:
            row[EOS_ID] = -np.inf
        if ngram:
            full = (BOS_ID,) + tuple(sequence)
            for token in range(len(row)):
                if repeats(full[1:] + (token,), ngram, ignore) and not repeats(full[1:], ngram, ignore):
                    row[token] = -np.inf
        token = int(np.argmax(row))
        sequence.append(token)
        score += row[token]
        if token == EOS_ID:
            break
    return tuple(sequence), score


def allowed(hypothesis, limit, *, min_length=0, ngram=0, ignore=()):
    tokens = hypothesis[0]
    if len(tokens) - 1 < min_length and len(tokens) < limit:
        return False
    return not (ngram and repeats(tokens, ngram, ignore))


def run_both(table, limit, **controls):
    step = markov_step(table)
    kwargs = dict(batch_size=1, max_lengths=jnp.array([limit]))
    greedy = decoding.search(step, dummy_cache(1), settings(limit, strategy="greedy", **controls), **kwargs)
    beam1 = decoding.search(step, dummy_cache(1), settings(limit, strategy="beam", **controls), **kwargs)
    return greedy, beam1


@pytest.mark.parametrize("min_length", [0, 2, 4])
def test_min_length_greedy_and_beam_as_the_reference(min_length):
    limit = 7
    greedy, beam1 = run_both(LENGTH_CHAIN, limit, min_length=min_length)
    expected, score = reference_greedy(LENGTH_CHAIN, limit, min_length=min_length)
    assert unpad(greedy["tokens"][0], greedy["lengths"][0]) == expected
    assert len(expected) - 1 >= min_length
    np.testing.assert_allclose(greedy["scores"][0], score, rtol=1e-5)
    # By hand: greedy is `a EOS`; with 2 it is `a a EOS` (EOS masked after a, then a 0.1 best).
    assert expected == {0: (A, EOS_ID), 2: (A, A, EOS_ID)}.get(min_length, expected)
    np.testing.assert_array_equal(beam1["tokens"][0, 0], greedy["tokens"][0])  # beam 1 = greedy

    out = beam_search(markov_step(LENGTH_CHAIN), dummy_cache(1), batch_size=1, beam_size=4, nbest=2,
                      max_lengths=jnp.array([limit]), max_len=limit, min_length=min_length)
    hypotheses = [h for h in enumerate_hypotheses(LENGTH_CHAIN, limit) if allowed(h, limit, min_length=min_length)]
    best = max(hypotheses, key=lambda h: h[1])
    assert unpad(out["tokens"][0, 0], out["lengths"][0, 0]) == best[0]
    np.testing.assert_allclose(out["log_probs"][0, 0], best[1], rtol=1e-5)  # unrenormalised log-probs
    assert np.all(np.asarray(out["lengths"][0]) - 1 >= min_length)


def test_min_length_yields_to_the_length_limit():
    greedy, beam1 = run_both(LENGTH_CHAIN, 3, min_length=2)
    assert unpad(greedy["tokens"][0], greedy["lengths"][0]) == (A, A, EOS_ID)
    short = decoding.search(markov_step(LENGTH_CHAIN), dummy_cache(2), settings(5, strategy="greedy", min_length=4),
                            batch_size=2, max_lengths=jnp.array([2, 5]))
    assert unpad(short["tokens"][0], short["lengths"][0]) == (A, EOS_ID)  # its limit comes first
    assert int(short["lengths"][1]) == 5


@pytest.mark.parametrize("ngram,ignore", [(2, ()), (3, ()), (2, (B_,)), (1, ())])
def test_block_ngram_repeat_greedy_and_beam_as_the_reference(ngram, ignore):
    limit = 7
    controls = dict(block_ngram_repeat=ngram, ignore_ids=ignore)
    greedy, beam1 = run_both(REPEAT_CHAIN, limit, **controls)
    expected, score = reference_greedy(REPEAT_CHAIN, limit, ngram=ngram, ignore=ignore)
    got = unpad(greedy["tokens"][0], greedy["lengths"][0])
    assert got == expected
    np.testing.assert_allclose(greedy["scores"][0], score, rtol=1e-5)
    np.testing.assert_array_equal(beam1["tokens"][0, 0], greedy["tokens"][0])
    unblocked, _ = reference_greedy(REPEAT_CHAIN, limit)
    assert unblocked == (A, B_, A, B_, A, B_, EOS_ID)  # without blocking: a b a b a b EOS (forced)
    assert not repeats(got, ngram, ignore)
    if ngram == 2 and not ignore:  # by hand: `a b a`, then `a b` would repeat: c, a, then `a b`, `a c` would
        assert got == (A, B_, A, C_, A, EOS_ID)
    out = beam_search(markov_step(REPEAT_CHAIN), dummy_cache(1), batch_size=1, beam_size=5, nbest=3,
                      max_lengths=jnp.array([limit]), max_len=limit, **controls)
    hypotheses = [h for h in enumerate_hypotheses(REPEAT_CHAIN, limit) if allowed(h, limit, ngram=ngram, ignore=ignore)]
    best = max(hypotheses, key=lambda h: h[1])
    assert unpad(out["tokens"][0, 0], out["lengths"][0, 0]) == best[0]
    np.testing.assert_allclose(out["log_probs"][0, 0], best[1], rtol=1e-5)
    for n in range(3):
        assert not repeats(unpad(out["tokens"][0, n], out["lengths"][0, n]), ngram, ignore)


def test_length_penalty_avg_and_none():
    short, long = (A, EOS_ID), (4, 5, 6, EOS_ID)  # LENGTH_CHAIN's a, c d e
    for kind, expected in (("avg", long), ("none", short)):
        # By hand: avg -1.204 / 2 = -0.602 < -1.366 / 4 = -0.341, so the long one wins.
        score = {"avg": lambda lp, n: lp / n, "none": lambda lp, n: lp}[kind]
        best = max(enumerate_hypotheses(LENGTH_CHAIN, 6), key=lambda h: score(h[1], len(h[0])))
        assert best[0] == expected
        out = beam_search(markov_step(LENGTH_CHAIN), dummy_cache(1), batch_size=1, beam_size=3,
                          max_lengths=jnp.array([6]), max_len=6, length_penalty=1.0, length_penalty_type=kind)
        assert unpad(out["tokens"][0, 0], out["lengths"][0, 0]) == expected
        np.testing.assert_allclose(out["scores"][0, 0], score(best[1], len(expected)), rtol=1e-5)


def test_coverage_penalty_summary():
    short, covering = (A, EOS_ID), (B_, 5, EOS_ID)
    beta = 1.0
    # By hand: a EOS attends [0.9 + 0.9, 0.1, 0.1] -> -beta * 0.8; b c EOS attends [1, 1, 1] -> 0:
    # log(0.4) - 0.8 = -1.716 < log(0.256) = -1.363.
    def summary(h):
        coverage = np.asarray(h[2], np.float64).sum(0)[:3]
        return h[1] - beta * (np.maximum(coverage, 1.0) - 1.0).sum()

    best = max(enumerate_hypotheses(COVERAGE_CHAIN, 5, COVERAGE_ATTENTION), key=summary)
    assert best[0] == covering
    out = beam_search(markov_step(COVERAGE_CHAIN, COVERAGE_ATTENTION), dummy_cache(1), batch_size=1, beam_size=3,
                      nbest=2, max_lengths=jnp.array([5]), max_len=5, coverage_penalty=beta,
                      coverage_penalty_type="summary", source_lengths=jnp.array([3]))
    assert unpad(out["tokens"][0, 0], out["lengths"][0, 0]) == covering
    np.testing.assert_allclose(out["scores"][0, 0], summary(best), atol=1e-4)
    assert unpad(out["tokens"][0, 1], out["lengths"][0, 1]) == short
    np.testing.assert_allclose(out["scores"][0, 1], np.log(0.4) - 0.8, atol=1e-4)


X_, W_, Z_ = 5, 6, 7
# Step 1 of a 2-beam search: `a x` (0.12) beats `b w` (0.105) on log-prob, but `a` attends
# source word 0 twice (coverage [1.5, 0.5]: wu penalty beta * log 0.5) and `b` evenly ([1, 1]).
STEPWISE_CHAIN = chain_table(
    {
        BOS_ID: {A: 0.4, B_: 0.35, X_: 0.1, W_: 0.1, Z_: 0.03, EOS_ID: 0.01, PAD_ID: 0.005, BOS_ID: 0.005},
        A: {X_: 0.3, Z_: 0.2, W_: 0.2, EOS_ID: 0.1, PAD_ID: 0.1, BOS_ID: 0.1},
        B_: {Z_: 0.6, W_: 0.3, EOS_ID: 0.02, X_: 0.02, PAD_ID: 0.03, BOS_ID: 0.03},
        X_: {EOS_ID: 0.9, A: 0.05, B_: 0.05},
        W_: {EOS_ID: 0.9, A: 0.05, B_: 0.05},
        Z_: {EOS_ID: 0.5, Z_: 0.3, A: 0.1, B_: 0.1},
    },
    vocab_size=8,
)
STEPWISE_ATTENTION = np.full((8, 2), 0.5, np.float32)
STEPWISE_ATTENTION[A] = [1.0, 0.0]


@pytest.mark.parametrize("stepwise", [False, True])
def test_stepwise_coverage_penalty_prunes_during_the_search(stepwise):
    beta = 0.5
    # By hand, step 1: log 0.12 + 0.5 log 0.5 = -2.467 < log 0.105 = -2.254, so with the
    # stepwise penalty `b w` stays alive instead of `a x`; finished ones are ranked alike.
    out = beam_search(markov_step(STEPWISE_CHAIN, STEPWISE_ATTENTION), dummy_cache(1), batch_size=1, beam_size=2,
                      nbest=2, max_lengths=jnp.array([4]), max_len=4, coverage_penalty=beta, length_penalty=0.0,
                      stepwise_penalty=stepwise, source_lengths=jnp.array([2]))
    found = {unpad(out["tokens"][0, n], out["lengths"][0, n]) for n in range(2)}
    expected = {(B_, Z_, EOS_ID), (B_, W_, EOS_ID)} if stepwise else {(B_, Z_, EOS_ID), (A, X_, EOS_ID)}
    assert found == expected
    exhaustive = {h[0]: h[1] for h in enumerate_hypotheses(STEPWISE_CHAIN, 4)}
    for n in range(2):  # raw log-probs, penalty taken back out
        np.testing.assert_allclose(out["log_probs"][0, n], exhaustive[unpad(out["tokens"][0, n], out["lengths"][0, n])],
                                   rtol=1e-5)


def test_controls_beam_one_equals_greedy():
    step = make_rnn_step(seed=11)
    source_lengths = [5, 2, 3, 4]
    cache = rnn_cache(seed=12, source_lengths=source_lengths)
    max_lengths = jnp.array([9, 4, 6, 8])
    controls = dict(min_length=2, block_ngram_repeat=2, ignore_ids=(5,))
    kwargs = dict(batch_size=4, max_lengths=max_lengths)
    greedy = decoding.search(step, cache, settings(9, strategy="greedy", **controls), **kwargs)
    beam1 = decoding.search(step, cache, settings(9, strategy="beam", **controls), **kwargs)
    np.testing.assert_array_equal(beam1["tokens"][:, 0], greedy["tokens"])
    np.testing.assert_allclose(beam1["scores"][:, 0], greedy["scores"], rtol=1e-6)
    check_well_formed(greedy["tokens"][:, None], greedy["lengths"][:, None], np.asarray(max_lengths))
    assert np.all(np.asarray(greedy["lengths"]) >= 3)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_controls_continuous_equals_plain(beam_size):
    controls = dict(min_length=2, block_ngram_repeat=2, ignore_ids=(5,))
    chains = random_chains(13, 5)
    per_row = lambda tokens, state, context: (context["table"][jnp.arange(tokens.shape[0]), tokens], state, None)
    limits = jnp.array([6, 3, 7, 5, 7])
    plain = decoding.search(lambda t, c: per_row(t, c, c), chains,
                            settings(7, beam_size=beam_size, **controls), batch_size=5, max_lengths=limits)
    cont = continuous_search(per_row, dummy_cache(5), chains, num_sentences=5, slots=2, max_lengths=limits,
                             max_len=7, beam_size=beam_size, **controls)
    np.testing.assert_array_equal(cont["tokens"], plain["tokens"])
    np.testing.assert_allclose(cont["scores"], plain["scores"], rtol=1e-6)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_vocab_ids_search_equals_full_search_without_the_other_tokens(beam_size):
    """Logits over a shortlist (vocab_ids) decode as the full vocabulary with the other tokens'
    logits at -inf; results hold vocabulary ids, and bans work in id space."""
    ids = np.array([0, 1, 2, 3, 5, 6, -1, -1], np.int32)  # token 4 (b) is not a candidate; -1: padding
    table = REPEAT_CHAIN
    masked = np.full_like(table, -np.inf)
    masked[:, ids[ids >= 0]] = table[:, ids[ids >= 0]]
    controls = dict(min_length=2, block_ngram_repeat=2)
    full_step = markov_step(masked)
    padded = np.concatenate([table, np.full((7, 1), -np.inf, np.float32)], axis=1)  # column 7: padding's -inf
    short_step = lambda tokens, cache: (jnp.asarray(padded)[tokens][:, np.where(ids >= 0, ids, 7)], cache, None)
    kwargs = dict(batch_size=1, max_lengths=jnp.array([7]))
    full = decoding.search(full_step, dummy_cache(1), settings(7, beam_size=beam_size, **controls), **kwargs)
    short = decoding.search(short_step, dummy_cache(1), settings(7, beam_size=beam_size, **controls),
                            vocab_ids=jnp.asarray(ids), **kwargs)
    np.testing.assert_array_equal(short["tokens"], full["tokens"])
    np.testing.assert_allclose(short["scores"], full["scores"], rtol=1e-5)
    assert B_ not in np.asarray(short["tokens"]).ravel().tolist()
    identity = decoding.search(markov_step(table), dummy_cache(1), settings(7, beam_size=beam_size, **controls),
                               vocab_ids=jnp.arange(7, dtype=jnp.int32), **kwargs)
    plain = decoding.search(markov_step(table), dummy_cache(1), settings(7, beam_size=beam_size, **controls), **kwargs)
    np.testing.assert_array_equal(identity["tokens"], plain["tokens"])


def test_strategies_take_any_logit_width():
    """Extended distributions (V + k copy ids): the search runs over whatever width it is given."""
    wide = np.concatenate([REPEAT_CHAIN, np.full((7, 3), -np.inf, np.float32)], axis=1)
    wide[A, 8] = 2.0  # after `a`, extended id 8 is likely
    table = np.concatenate([wide, np.zeros((3, 10), np.float32)], axis=0)  # rows for ids 7..9
    out = greedy_search(markov_step(table), dummy_cache(1), batch_size=1, max_lengths=jnp.array([4]), max_len=4)
    assert unpad(out["tokens"][0], out["lengths"][0])[:2] == (A, 8)


@pytest.mark.parametrize("ks", kernels.SETS)
def test_banned_selections_equal_masked_log_softmax(ks):
    rng = np.random.default_rng(3)
    B, K, V, C, M = 3, 2, 1024, 4, 40
    logits = jnp.asarray(rng.normal(size=(B, K, V)) * 3, jnp.float32)
    alive = jnp.asarray([[0.0, -1.0], [-0.5, -np.inf], [0.0, -0.2]], jnp.float32)
    force = jnp.array([False, True, False])
    banned = rng.integers(0, V + 5, size=(B, K, M)).astype(np.int32)
    order = np.argsort(-np.asarray(logits), axis=-1)
    banned[:, :, :3] = order[:, :, :3]  # the best tokens are among the banned
    banned[0, 0, 3] = EOS_ID
    expected = np.asarray(alive)[:, :, None] + log_softmax(np.asarray(logits))
    expected[np.broadcast_to(np.asarray(force)[:, None, None] & (np.arange(V) != EOS_ID), expected.shape)] = -np.inf
    for b in range(B):
        for k in range(K):
            expected[b, k, banned[b, k][banned[b, k] < V]] = -np.inf
    ksel = kernels.select(ks)
    values, index = ksel.top_extensions(alive, logits, force, EOS_ID, C, banned=jnp.asarray(banned))
    flat = expected.reshape(B, -1)
    want = np.argsort(-flat, axis=-1, kind="stable")[:, :C]
    np.testing.assert_array_equal(np.asarray(index)[[0, 2]], want[[0, 2]])
    np.testing.assert_allclose(np.asarray(values), np.take_along_axis(flat, want, 1), rtol=1e-5)
    token, best = ksel.best_token(logits[:, 0], force, EOS_ID, banned=jnp.asarray(banned[:, 0]))
    row = expected[:, 0] - np.asarray(alive)[:, :1]
    np.testing.assert_array_equal(np.asarray(token), np.argmax(row, axis=-1))
    np.testing.assert_allclose(np.asarray(best), row.max(-1), rtol=1e-5)


def test_bad_settings_and_config_are_clear_errors():
    with pytest.raises(ValueError, match="min_length"):
        settings(5, min_length=5)
    with pytest.raises(ValueError, match="length_penalty_type"):
        settings(5, length_penalty_type="gnmt")
    with pytest.raises(ValueError, match="stepwise_penalty"):
        settings(5, beam_size=2, stepwise_penalty=True)
    with pytest.raises(config_lib.ConfigError, match="decode.min_length=12"):
        config_lib.override(config_lib.Config(), ["decode.max_len_a=0", "decode.max_len_b=12", "decode.min_length=12"])
    with pytest.raises(config_lib.ConfigError, match="decode.ignore_when_blocking"):
        config_lib.override(config_lib.Config(), ["decode.ignore_when_blocking=('.',)"])
    with pytest.raises(config_lib.ConfigError, match="decode.coverage_penalty_type"):
        config_lib.override(config_lib.Config(), ["decode.coverage_penalty_type='gnmt'"])


def test_cli_flags_become_decode_fields():
    from s2s_jax import cli

    args = cli.build_parser().parse_args(
        ["translate", "--workdir", "RUN", "--min-length", "3", "--block-ngram-repeat", "3", "--ignore-when-blocking",
         ".", ",", "--length-penalty", "avg", "--beta", "0.2", "--coverage-penalty", "summary", "--stepwise-penalty",
         "--max-len-ratio", "2"])
    d = config_lib.override(config_lib.Config(), args.overrides).decode
    assert (d.min_length, d.block_ngram_repeat, d.ignore_when_blocking) == (3, 3, (".", ","))
    assert (d.length_penalty_type, d.coverage_penalty, d.coverage_penalty_type, d.stepwise_penalty,
            d.max_len_a) == ("avg", 0.2, "summary", True, 2.0)
    assert cli.build_parser().parse_args(["translate", "--workdir", "RUN"]).overrides == []
