"""Ensembles: the combined step follows its formula, a model with itself is that model, the
search and the scorer agree on an ensemble of two different runs, and mismatched runs are refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import run_cli

LINES = ["hello world", "abc", "", "quick brown fox", "x", "jax and flax", "seq2seq"]


def test_combined_step_is_the_weighted_sum_of_log_probs():
    from s2s_jax.inference.ensemble import combine_steps

    rng = np.random.default_rng(0)
    logits = [jnp.asarray(rng.normal(size=(3, 6)) * 3, jnp.float32) for _ in range(2)]
    attention = [jnp.asarray(rng.dirichlet(np.ones(4), size=3), jnp.float32) for _ in range(2)]
    seen = []

    def member(i):
        def step(tokens, state, context):
            seen.append((i, context["memory"], context["keys"], state))
            return logits[i] + 0 * tokens[:, None], state + 1, attention[i]
        return step

    step = combine_steps([member(0), member(1)], (0.25, 0.75))
    tokens = jnp.asarray([1, 2, 3])
    combined, states, att = step(tokens, [jnp.zeros(3), jnp.ones(3)],
                                 {"memory": ["m0", "m1"], "keys": ["k0", "k1"], "mask": None})
    expected = 0.25 * jax.nn.log_softmax(logits[0]) + 0.75 * jax.nn.log_softmax(logits[1])
    np.testing.assert_allclose(np.asarray(combined), np.asarray(expected), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(att), 0.25 * np.asarray(attention[0]) + 0.75 * np.asarray(attention[1]),
                               rtol=1e-6)
    assert [s[:3] for s in seen] == [(0, "m0", "k0"), (1, "m1", "k1")]  # each member its own context
    np.testing.assert_array_equal(np.asarray(states[0]), 1.0)
    np.testing.assert_array_equal(np.asarray(states[1]), 2.0)


def test_ensemble_of_a_model_with_itself_is_that_model(tiny_task_run):
    from s2s_jax.inference.ensemble import load_ensemble_translator
    from s2s_jax.inference.runs import load_translator

    single = load_translator(str(tiny_task_run))
    double = load_ensemble_translator([str(tiny_task_run)] * 2)
    for beam, nbest in ((1, 1), (3, 2)):
        a = single.translate_full(LINES, beam=beam, nbest=nbest)
        b = double.translate_full(LINES, beam=beam, nbest=nbest)
        assert [[h["tokens"] for h in hyps] for hyps in a] == [[h["tokens"] for h in hyps] for hyps in b]
        # The ensemble's step returns log-probabilities, which the search renormalises: equal to float rounding.
        np.testing.assert_allclose([[h["score"] for h in hyps] for hyps in b],
                                   [[h["score"] for h in hyps] for hyps in a], rtol=0, atol=2e-5)


def test_ensemble_search_and_scorer_agree_and_differ_from_members(tiny_task_run, other_seed_run, tmp_path):
    from s2s_jax.inference.ensemble import load_ensemble_translator
    from s2s_jax.inference.runs import load_translator

    ensemble = load_ensemble_translator([str(tiny_task_run), str(other_seed_run)], weights=[0.3, 0.7])
    greedy = [hyps[0] for hyps in ensemble.translate_full(LINES, beam=1)]
    scored = ensemble.score([(line, h["text"]) for line, h in zip(LINES, greedy)])
    for line, h, s in zip(LINES, greedy, scored):
        if line and len(h["tokens"]) + 1 < ensemble.max_len_for(len(line)):  # ended with EOS
            assert s["score"] == pytest.approx(h["score"], abs=1e-4)
    members = [[hyps[0]["score"] for hyps in load_translator(str(w)).translate_full(LINES, beam=1)]
               for w in (tiny_task_run, other_seed_run)]
    assert [h["score"] for h in greedy] != members[0] and [h["score"] for h in greedy] != members[1]

    # The CLI: translate with two runs and weights; eval writes its own record.
    src = tmp_path / "in.txt"
    src.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    proc = run_cli("translate", "--workdir", str(tiny_task_run), "--workdir", str(other_seed_run),
                   "--weights", "3,7", "--input", str(src))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:-1] == [h["text"] for h in greedy]
    proc = run_cli("eval", "--workdir", str(tiny_task_run), "--workdir", str(other_seed_run), "--beam", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tiny_task_run / "eval_test_beam1_ensemble2.json").is_file()


def test_ensemble_mistakes_exit_2(tiny_task_run, fr_en_run):
    for args, expect in (
        (["--workdir", str(tiny_task_run), "--workdir", str(fr_en_run)], "source vocabulary differs"),
        (["--workdir", str(tiny_task_run), "--workdir", str(tiny_task_run), "--weights", "1"], "1 weight(s) for 2"),
        (["--workdir", str(tiny_task_run), "--workdir", str(tiny_task_run), "--weights", "1,-1"], "positive"),
        (["--workdir", str(tiny_task_run), "--weights", "1"], "give several --workdir"),
    ):
        proc = run_cli("translate", *args, input="abc\n")
        assert proc.returncode == 2 and expect in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_ensemble_bundle_translates_as_the_ensemble(tiny_task_run, other_seed_run, tmp_path):
    from s2s_jax.inference.bundle import load_bundle
    from s2s_jax.inference.ensemble import load_ensemble_translator

    out = tmp_path / "ens_bundle"
    proc = run_cli("export", "--workdir", str(tiny_task_run), "--workdir", str(other_seed_run), "--weights", "3,7",
                   "--out", str(out), "--platforms", "cpu", "--beam", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    bundle = load_bundle(str(out))
    assert bundle.manifest["ensemble"]["weights"] == pytest.approx([0.3, 0.7])
    assert {name.split("/")[0] for name in bundle.flat_params} == {"member_0", "member_1"}
    assert "ensemble of 2 runs" in (out / "MODEL.md").read_text()
    ensemble = load_ensemble_translator([str(tiny_task_run), str(other_seed_run)], weights=[0.3, 0.7])
    for beam in (1, 3):
        assert bundle.translate(LINES, beam=beam) == [h[0][0] for h in ensemble.translate(LINES, beam=beam)]
