"""Trainer pieces with exact values: schedules, optimizers, clipping, label smoothing, dropout
keys, gradient accumulation, EMA, the non-finite guard; then the CLI's error paths and one short
run checking early stopping, plateau halving, TensorBoard events and the curve plot.

Unit tests jit steps.train_step on a very small model (a few compilations, seconds); the run
tests start `python -m s2s_jax train` subprocesses sharing a persistent XLA compilation cache
(see `run_env`), so only the first one compiles.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import math
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2s_jax import config as config_lib
from s2s_jax.training import losses, steps
from s2s_jax.metrics import read_metrics
from s2s_jax.train_state import build_optimizer, create_state, learning_rate_fn, make_model
from s2s_jax.training.trainer import EvalTracker, Verdict, params_for_eval

from _helpers import REPO, TINY, run_env, train_cmd  # noqa: E402

V = 13  # vocabulary of the synthetic batches


# --------------------------------------------------------------------------- schedules, optimizers

def _train_cfg(**kw) -> config_lib.TrainConfig:
    return dataclasses.replace(config_lib.TrainConfig(), **kw)


def _lr(cfg, steps_):
    fn = learning_rate_fn(cfg)
    return [float(fn(s)) for s in steps_]


def test_schedules_exact_values():
    # constant with linear warmup over 4 steps: (step + 1) / 4 of the base, then the base
    assert _lr(_train_cfg(learning_rate=2.0, schedule="constant", warmup_steps=4), [0, 1, 3, 10]) == \
        pytest.approx([0.5, 1.0, 2.0, 2.0], rel=1e-6)
    assert _lr(_train_cfg(learning_rate=2.0, schedule="constant"), [0, 100]) == pytest.approx([2.0, 2.0])
    # rsqrt: warmup to the base at step 3, then base * sqrt(4 / (step + 1))
    assert _lr(_train_cfg(learning_rate=1.0, schedule="rsqrt", warmup_steps=4), [0, 3, 15, 99]) == \
        pytest.approx([0.25, 1.0, 0.5, 0.2], rel=1e-6)
    # cosine: warmup 2 steps, then half a cosine from the base to 0 at train.steps=12
    cos = _lr(_train_cfg(learning_rate=1.0, schedule="cosine", warmup_steps=2, steps=12), [0, 1, 2, 7, 12, 50])
    assert cos == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0, 0.0], abs=1e-6)
    assert _lr(_train_cfg(learning_rate=1.0, schedule="cosine", steps=10), [5]) == pytest.approx([0.5], abs=1e-6)
    # plateau: the schedule itself is constant; halving lives in TrainState.lr_scale (tested below)
    assert _lr(_train_cfg(learning_rate=0.3, schedule="plateau"), [0, 1000]) == pytest.approx([0.3, 0.3])


def _apply(tx, grads_seq, params):
    state = tx.init(params)
    out = []
    for g in grads_seq:
        u, state = tx.update(g, state, params)
        out.append(u)
    return out


def test_optimizers_and_clipping_exact_values():
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    g1, g2 = {"w": jnp.array([0.3, -0.4, 0.0])}, {"w": jnp.array([1.0, 1.0, 1.0])}
    # SGD: the update is the gradient (the learning rate is applied outside, in train_step)
    u = _apply(build_optimizer(_train_cfg(optimizer="sgd", clip_norm=0)), [g1], params)[0]
    np.testing.assert_allclose(u["w"], [0.3, -0.4, 0.0])
    # SGD + momentum 0.9: g1, then 0.9 g1 + g2
    u = _apply(build_optimizer(_train_cfg(optimizer="sgd", momentum=0.9, clip_norm=0)), [g1, g2], params)
    np.testing.assert_allclose(u[1]["w"], [1.27, 0.64, 1.0], rtol=1e-6)
    # global-norm clipping: |g1| = 0.5 -> clip at 0.25 halves it; below the threshold untouched
    u = _apply(build_optimizer(_train_cfg(optimizer="sgd", clip_norm=0.25)), [g1], params)[0]
    np.testing.assert_allclose(u["w"], [0.15, -0.2, 0.0], rtol=1e-6)
    u = _apply(build_optimizer(_train_cfg(optimizer="sgd", clip_norm=5.0)), [g1], params)[0]
    np.testing.assert_allclose(u["w"], [0.3, -0.4, 0.0], rtol=1e-6)
    # Adam, first step: bias-corrected m/sqrt(v) = g/|g| (eps 1e-8)
    u = _apply(build_optimizer(_train_cfg(optimizer="adam", clip_norm=0)), [g1], params)[0]
    np.testing.assert_allclose(u["w"], [1.0, -1.0, 0.0], atol=1e-5)
    # Adam second step, by hand: m = b1 m + (1-b1) g, v = b2 v + (1-b2) g^2, bias-corrected
    u = _apply(build_optimizer(_train_cfg(optimizer="adam", clip_norm=0)), [g1, g2], params)[1]
    m = 0.9 * 0.1 * np.array([0.3, -0.4, 0.0]) + 0.1 * np.ones(3)
    v = 0.999 * 0.001 * np.array([0.09, 0.16, 0.0]) + 0.001 * np.ones(3)
    expected = (m / (1 - 0.9 ** 2)) / (np.sqrt(v / (1 - 0.999 ** 2)) + 1e-8)
    np.testing.assert_allclose(u["w"], expected, rtol=5e-5)  # float32 bias corrections
    # AdamW: Adam's direction plus decoupled weight decay * params (then * lr outside)
    u = _apply(build_optimizer(_train_cfg(optimizer="adamw", weight_decay=0.1, clip_norm=0)), [g1], params)[0]
    np.testing.assert_allclose(u["w"], [1.0 + 0.1, -1.0 - 0.2, 0.0 + 0.3], atol=1e-5)
    # Adam ignores weight_decay (it is AdamW's knob)
    u = _apply(build_optimizer(_train_cfg(optimizer="adam", weight_decay=0.1, clip_norm=0)), [g1], params)[0]
    np.testing.assert_allclose(u["w"], [1.0, -1.0, 0.0], atol=1e-5)


def test_label_smoothing_exact_values():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
    targets = jnp.array([0])
    loss, nll, correct = losses.token_losses(logits, targets, label_smoothing=0.1)
    # (1 - 0.1) * log 2 + 0.1 * mean(log 2, log 4, log 4)
    expected = 0.9 * math.log(2) + 0.1 * (math.log(2) + 2 * math.log(4)) / 3
    assert float(loss[0]) == pytest.approx(expected, rel=1e-6)
    assert float(nll[0]) == pytest.approx(math.log(2), rel=1e-6)
    assert float(correct[0]) == 1.0
    loss0, nll0, _ = losses.token_losses(logits, targets, label_smoothing=0.0)
    assert float(loss0[0]) == float(nll0[0])


# --------------------------------------------------------------------------- train_step on a model

def small_config(**train) -> config_lib.Config:
    """tiny.py with an even smaller model; SGD, no clipping, dropout on, label smoothing and EMA."""
    cfg = config_lib.load(TINY)
    model = dataclasses.replace(cfg.model, source_embed_dim=8, target_embed_dim=8, hidden_dim=8, dropout=0.3)
    base = dict(optimizer="sgd", clip_norm=0.0, learning_rate=0.1, label_smoothing=0.1, ema_decay=0.5)
    base.update(train)
    return config_lib.validate(cfg.replace(model=model, train=dataclasses.replace(cfg.train, **base)))


def make_batch(B=8, S=6, T=7, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    src_len = rng.integers(1, S + 1, B).astype(np.int32)
    tgt_len = rng.integers(2, T + 1, B).astype(np.int32)  # includes EOS
    source = np.zeros((B, S), np.int32)
    tin = np.zeros((B, T), np.int32)
    tout = np.zeros((B, T), np.int32)
    for b in range(B):
        source[b, :src_len[b]] = rng.integers(4, V, src_len[b])
        y = rng.integers(4, V, tgt_len[b] - 1)
        tin[b, :tgt_len[b]] = np.concatenate([[1], y])
        tout[b, :tgt_len[b]] = np.concatenate([y, [2]])
    return {"source": jnp.asarray(source), "source_lengths": jnp.asarray(src_len),
            "target_input": jnp.asarray(tin), "target_output": jnp.asarray(tout),
            "target_lengths": jnp.asarray(tgt_len)}


class Setup:
    def __init__(self, **train):
        self.config = small_config(**train)
        self.model = make_model(self.config, V, V)
        self.state = create_state(self.config, self.model)
        self.step = jax.jit(functools.partial(steps.train_step, model=self.model, config=self.config))


@pytest.fixture(scope="module")
def main():
    return Setup()


def _equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_sgd_step_is_params_minus_lr_times_smoothed_gradient_with_fold_in_dropout(main):
    batch = make_batch()
    state = main.state.replace(step=jnp.asarray(3, jnp.int32))
    new, m = main.step(state, batch)
    # By hand: dropout key fold_in(rng, step), gradient of the label-smoothed loss sum / tokens.
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 3)

    def mean_loss(p):
        s = steps.loss_sums(p, batch, model=main.model, config=main.config, rng=key,
                            row_ids=jnp.arange(batch["source"].shape[0]))
        return s["loss"] / s["weight"], s

    grads, sums = jax.jit(jax.grad(mean_loss, has_aux=True))(state.params)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads)
    for got, want in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert float(m["loss"]) == pytest.approx(float(sums["loss"]), rel=1e-6)
    assert float(m["loss"]) != float(m["nll"])  # label smoothing is on in training
    assert float(m["weight"]) == float(batch["target_lengths"].sum())
    assert int(new.step) == 4 and int(new.nonfinite) == 0 and float(m["skipped"]) == 0
    assert float(m["learning_rate"]) == pytest.approx(0.1)
    # another step index draws other dropout masks, the same one the same masks
    _, m_other = main.step(main.state.replace(step=jnp.asarray(4, jnp.int32)), batch)
    _, m_same = main.step(main.state.replace(step=jnp.asarray(3, jnp.int32)), batch)
    assert float(m_other["loss"]) != float(m["loss"])
    assert float(m_same["loss"]) == float(m["loss"])
    # evaluation: deterministic and unsmoothed (loss == nll)
    ev = jax.jit(functools.partial(steps.eval_step, model=main.model, config=main.config))(state.params, batch)
    assert float(ev["loss"]) == float(ev["nll"])


@pytest.mark.parametrize("clip", [1e-3, 1e3])  # clipping active / inactive
def test_adam_step_with_clipping_equals_the_optax_chain(clip):
    """train_step clips by one scalar fused into the update; it must equal optax's
    clip_by_global_norm + Adam (build_optimizer(clip=True)) applied to the mean gradient."""
    s = Setup(optimizer="adam", learning_rate=0.01, clip_norm=clip)
    batch = make_batch()
    new, m = s.step(s.state, batch)
    key = jax.random.fold_in(jax.random.wrap_key_data(s.state.rng), 0)

    def mean_loss(p):
        out = steps.loss_sums(p, batch, model=s.model, config=s.config, rng=key,
                              row_ids=jnp.arange(batch["source"].shape[0]))
        return out["loss"] / out["weight"]

    grads = jax.jit(jax.grad(mean_loss))(s.state.params)
    norm = float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads))))
    assert float(m["grad_norm"]) == pytest.approx(norm, rel=1e-5)
    assert (norm > clip) == (clip < 1)  # the case is the one intended
    tx = build_optimizer(s.config.train)  # optax's own clipping
    updates, opt_state = tx.update(grads, tx.init(s.state.params), s.state.params)
    expected = jax.tree.map(lambda p, u: p - 0.01 * u, s.state.params, updates)
    for got, want in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(jax.tree.leaves(new.opt_state), jax.tree.leaves(opt_state)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-9)


def test_ema_is_used_for_eval_and_follows_its_formula(main):
    new, _ = main.step(main.state, make_batch())
    d = main.config.train.ema_decay
    for e, p0, p1 in zip(jax.tree.leaves(new.ema_params), jax.tree.leaves(main.state.params),
                         jax.tree.leaves(new.params)):
        np.testing.assert_allclose(e, d * np.asarray(p0) + (1 - d) * np.asarray(p1), rtol=1e-6, atol=1e-7)
    assert params_for_eval(new) is new.ema_params
    assert params_for_eval(new.replace(ema_params=None)) is new.params


def test_plateau_scale_multiplies_learning_rate(main):
    _, m = main.step(main.state.replace(lr_scale=jnp.asarray(0.25, jnp.float32)), make_batch())
    assert float(m["learning_rate"]) == pytest.approx(0.025)


def test_grad_accum_2_equals_accum_1_with_dropout(main):
    accum = Setup(grad_accum=2)
    batch = make_batch(B=8, seed=1)
    a, ma = main.step(main.state, batch)
    b, mb = accum.step(accum.state, batch)
    assert _equal(main.state.params, accum.state.params)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    for k in ("loss", "nll", "correct", "weight"):
        assert float(ma[k]) == pytest.approx(float(mb[k]), rel=1e-6)
    # sanity: without the row-id design, halves with different dropout would not agree this well
    assert float(ma["loss"]) != pytest.approx(float(main.step(main.state, make_batch(B=8, seed=2))[1]["loss"]))


def test_nonfinite_step_leaves_state_untouched_and_counts(main):
    batch = make_batch()
    state = main.state
    # Poison one parameter that every logit uses (the output bias): the loss becomes NaN.
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]
    leaves, treedef = jax.tree.flatten(state.params)
    idx = next(i for i, p in enumerate(paths) if "output" in p and "bias" in p)
    leaves[idx] = leaves[idx].at[0].set(jnp.nan)
    poisoned = state.replace(params=jax.tree.unflatten(treedef, leaves))
    new, m = main.step(poisoned, batch)
    assert not math.isfinite(float(m["loss"]))
    assert _equal(new.params, poisoned.params)
    assert _equal(new.opt_state, poisoned.opt_state)
    assert _equal(new.ema_params, poisoned.ema_params)
    assert int(new.step) == 1 and int(new.nonfinite) == 1
    assert float(m["skipped"]) == 1.0 and int(m["nonfinite_run"]) == 1
    new2, m2 = main.step(new, batch)
    assert int(new2.nonfinite) == 2 and int(m2["nonfinite_run"]) == 2
    # a good step resets the streak
    healthy = new2.replace(params=state.params, ema_params=state.ema_params)
    new3, m3 = main.step(healthy, batch)
    assert int(new3.nonfinite) == 0 and float(m3["skipped"]) == 0.0
    assert not _equal(new3.params, state.params)


def test_nonfinite_update_from_absurd_learning_rate_is_skipped(main):
    # The config audit refuses train.learning_rate=inf; an infinite rate (scale) reaching the
    # step anyway: loss and gradient finite, the update is not.
    state = main.state.replace(lr_scale=jnp.asarray(jnp.inf, jnp.float32))
    new, m = main.step(state, make_batch())
    assert math.isfinite(float(m["loss"])) and math.isfinite(float(m["grad_norm"]))
    assert float(m["skipped"]) == 1.0 and int(new.nonfinite) == 1
    assert _equal(new.params, state.params) and _equal(new.opt_state, state.opt_state)


# --------------------------------------------------------------------------- evaluation bookkeeping

def test_eval_tracker_best_patience_plateau_and_early_stop():
    t = EvalTracker("bleu", "max", early_stopping_patience=4, plateau_patience=2)
    got = [t.update(v) for v in (10.0, 12.5, 12.5, 11.0, float("nan"), None, 13.0, 1.0)]
    assert [v.improved for v in got] == [True, True, False, False, False, False, True, False]
    # a tie, a drop, NaN and a missing value are all "no improvement"
    assert [v.lower_learning_rate for v in got] == [False, False, False, True, False, True, False, False]
    assert [v.stop for v in got] == [False, False, False, False, False, True, False, False]
    assert t.best == 13.0 and t.bad_evals == 1 and not t.stopped
    assert t.meta() == {"best_metric": "bleu", "best_value": 13.0, "bad_evals": 1}


def test_eval_tracker_min_mode_and_no_patience():
    t = EvalTracker("loss", "min")  # no early stopping, no plateau
    got = [t.update(v) for v in (2.0, 1.5, 1.7, 1.5, 1.2)]
    assert got == [Verdict(True, False, False), Verdict(True, False, False), Verdict(False, False, False),
                   Verdict(False, False, False), Verdict(True, False, False)]
    assert t.best == 1.2 and t.bad_evals == 0


def test_eval_tracker_from_config_and_checkpoint_meta():
    cfg = config_lib.load(TINY)
    plateau = cfg.replace(train=dataclasses.replace(cfg.train, schedule="plateau", plateau_patience=3,
                                                    early_stopping_patience=5, best_metric="perplexity"))
    t = EvalTracker.from_config(plateau, {"best_value": 4.5, "bad_evals": 2})
    assert (t.metric, t.mode, t.plateau_patience, t.early_stopping_patience) == ("perplexity", "min", 3, 5)
    assert (t.best, t.bad_evals) == (4.5, 2)
    assert t.update(4.6) == Verdict(improved=False, lower_learning_rate=True, stop=False)  # 3rd bad one
    t = EvalTracker.from_config(cfg)  # constant schedule: never lowers the rate; tasks: exact match
    assert (t.metric, t.mode, t.plateau_patience, t.best, t.bad_evals) == ("exact_match", "max", 0, None, 0)
    assert not any(t.update(0.0).lower_learning_rate for _ in range(6))


def test_scale_learning_rate_multiplies_the_state_scale(main):
    from s2s_jax.train_state import scale_learning_rate

    state = scale_learning_rate(scale_learning_rate(main.state, 0.5), 0.5)
    assert float(state.lr_scale) == 0.25 and float(main.state.lr_scale) == 1.0
    assert state.params is main.state.params


# --------------------------------------------------------------------------- metrics writers

def test_progress_line_shows_step_loss_tokens_per_second_and_eta(capsys):
    from s2s_jax.metrics import Progress

    bar = Progress(total=100, initial=0, enabled=True, steps=True)  # stderr is not a terminal here
    bar.update(10, loss=1.23456, tok_s="4321")
    bar.update(20, loss=1.0, tok_s="5000")
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("step 10/100 (10%) loss 1.235 tok_s 4321 eta ")
    assert lines[1].startswith("step 20/100 (20%) loss 1 tok_s 5000 eta 0:")
    quiet = Progress(total=100, initial=0, enabled=True, steps=False)  # --no-progress: messages only
    quiet.update(10, loss=1.0)
    quiet.write("[eval step 10] loss 1")
    assert capsys.readouterr().err == "[eval step 10] loss 1\n"


def test_metric_writer_drops_records_past_the_resume_step(tmp_path):
    from s2s_jax.metrics import MetricWriter

    w = MetricWriter(str(tmp_path))
    for step in (1, 2, 3, 4):
        w.write("train", step, {"loss": float(step)})
    w.write("eval", 4, {"bleu": 1.0})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 5, "lo')  # a line torn by SIGKILL
    w = MetricWriter(str(tmp_path), resume_step=2)
    w.write("train", 3, {"loss": 30.0})
    w.close()
    assert [(r["kind"], r["step"], r["loss"]) for r in read_metrics(tmp_path)] == \
        [("train", 1, 1.0), ("train", 2, 2.0), ("train", 3, 30.0)]


# --------------------------------------------------------------------------- CLI errors (subprocess)

def _unwritable_dir(tmp_path) -> str:
    if os.geteuid() != 0:
        d = tmp_path / "readonly"
        d.mkdir()
        d.chmod(0o500)
        return str(d / "run")
    return "/sys/s2s_jax_test_run"  # root ignores permissions; sysfs refuses new folders


def test_config_and_workdir_errors_are_one_line_exit_2(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone else's files\n")
    cases = {
        "unknown field": (train_cmd(tmp_path / "a", "train.stepz=3"), "train.stepz"),
        "bad value": (train_cmd(tmp_path / "b", "train.steps=-5"), "train.steps"),
        "unknown task": (train_cmd(tmp_path / "c", "data.task=nosuchtask"), "data.task"),
        "foreign workdir": (train_cmd(foreign), str(foreign)),
        "unwritable workdir": (train_cmd(_unwritable_dir(tmp_path)), "not writable"),
    }
    procs = {name: subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, (cmd, _) in cases.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert cases[name][1] in lines[0], (name, lines[0])
    assert os.listdir(foreign) == ["notes.txt"]


# --------------------------------------------------------------------------- one short run

def test_early_stopping_plateau_tensorboard_and_plot(tmp_path):
    """exact_match stays 0 on this tiny run: the first evaluation sets the best, the next ones do
    not improve. Plateau patience 1 halves the rate after each of those; early-stopping patience
    3 stops at the fourth evaluation (step 8 of 40) with a checkpoint there."""
    workdir = tmp_path / "run"
    sets = ["data.buckets=[[20,21]]", "train.steps=40", "train.log_every=1", "train.eval_every=2",
            "train.eval_sentences=16", "train.checkpoint_every=100", "train.best_metric=exact_match",
            "train.schedule=plateau", "train.plateau_patience=1", "train.plateau_factor=0.5",
            "train.early_stopping_patience=3", "train.tensorboard=True", "train.plot=True",
            "train.learning_rate=0.001"]
    proc = subprocess.run(train_cmd(workdir, *sets), cwd=REPO, env=run_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "early stopping at step 8" in proc.stderr
    records = read_metrics(workdir)
    evals = [r for r in records if r["kind"] == "eval"]
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    assert [r["step"] for r in evals] == [2, 4, 6, 8]
    assert [r["exact_match"] for r in evals] == [0.0, 0.0, 0.0, 0.0]
    assert [r["bad_evals"] for r in evals] == [0, 1, 2, 3]
    assert max(train) == 8
    lrs = [train[s]["learning_rate"] for s in range(1, 9)]
    assert lrs == pytest.approx([1e-3] * 4 + [5e-4] * 2 + [2.5e-4] * 2, rel=1e-6)
    for r in evals:  # validation: loss, perplexity, sacreBLEU with its signature, chrF, exact match
        assert r["perplexity"] == pytest.approx(math.exp(r["nll"]), rel=1e-9)
        assert r["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
        assert "chrf" in r and "chrf_signature" in r
    # the stop wrote a checkpoint at step 8; the best checkpoint is the first evaluation's
    assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == [8]
    assert sorted(int(d) for d in os.listdir(workdir / "best") if d.isdigit()) == [2]
    # TensorBoard event files with scalars (read back with tensorboardX's own protobufs)
    events = glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
    assert events
    tags = _event_scalar_tags(events[0])
    assert {"train/loss", "train/tokens_per_sec", "eval/loss", "eval/bleu", "eval/exact_match"} <= tags
    # the plot
    png = workdir / "curves.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a stopped run stays stopped when started again
    again = subprocess.run(train_cmd(workdir, *sets), cwd=REPO, env=run_env(), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stopped early at step 8" in again.stderr
    assert read_metrics(workdir) == records


def _event_scalar_tags(path) -> set[str]:
    """Tags of scalar summaries in a TFRecord event file, parsed without TensorFlow."""
    import struct

    from tensorboardX.proto import event_pb2

    tags = set()
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        record = data[pos + 12:pos + 12 + length]
        pos += 12 + length + 4
        event = event_pb2.Event()
        event.ParseFromString(record)
        for value in event.summary.value:
            if value.HasField("simple_value"):
                tags.add(value.tag)
    return tags
