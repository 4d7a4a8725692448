"""train_and_evaluate(config, workdir): the training loop, and the one place that jits steps.

The loop: restore-or-init the state and the data iterator from the workdir's latest good
checkpoint (a fresh state may start from another run, train.init_from: warm_start.py, and take
pretrained embedding rows: embeddings.py); run jitted steps (metrics stay on the device and are
fetched every `log_every`); evaluate every `eval_every` (loss, perplexity, greedy decoding
scored by exact match, sacreBLEU and chrF), where `EvalTracker.update` decides a new best, a
plateau step down of the learning rate and early stopping on `best_metric`, and the loop applies
them; save asynchronously every `checkpoint_every`; on SIGTERM/SIGINT finish the step, save and
return. Steps with a non-finite loss, gradient or update are skipped inside the step;
`max_nonfinite` of them in a row stop the run (exit code 2) without saving, so the last good
checkpoint stays the latest.

Same config + seed + machine => bit-identical loss trace and parameters, whether or not the
run was interrupted (SIGKILL included: tests/test_resume.py, experiments/kill_resume.py).
A resumed run drops the metrics.jsonl records the interrupted one wrote after its checkpoint,
so the log reads like one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

from s2s_jax import rundir, runtime
from s2s_jax import config as config_lib
from s2s_jax import metrics as metrics_lib
from s2s_jax.training import steps
from s2s_jax.checkpoint import Checkpoints
from s2s_jax.config import Config, UserError
from s2s_jax.parallel import Parallel, maybe_initialize_distributed
from s2s_jax.train_state import abstract_state, create_state, make_model, params_for_eval, scale_learning_rate
from s2s_jax.inference.translator import Translator

log = logging.getLogger(__name__)


class TrainingStopped(UserError):
    """The run stopped itself (e.g. too many non-finite steps); the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What one evaluation decided (EvalTracker.update)."""

    improved: bool  # a new best value of the metric: save a best checkpoint
    lower_learning_rate: bool  # schedule=plateau: multiply the learning-rate scale by plateau_factor
    stop: bool  # early stopping: train.early_stopping_patience evaluations without improvement


@dataclasses.dataclass
class EvalTracker:
    """The evaluation bookkeeping: best value of the metric, evaluations without improvement
    (bad_evals), and what they decide — a new best, a plateau step down, an early stop.

    A non-finite or missing value counts as no improvement. Checkpoints carry `meta()`, so a
    resumed run continues the same count.
    """

    metric: str
    mode: str  # "min" | "max": which direction is better
    early_stopping_patience: int = 0  # 0 = never stop early
    plateau_patience: int = 0  # lower the rate after every this many bad evaluations; 0 = never
    best: float | None = None
    bad_evals: int = 0

    @classmethod
    def from_config(cls, config: Config, meta: dict | None = None) -> "EvalTracker":
        tc = config.train
        metric, mode = config_lib.best_metric_and_mode(config)
        meta = meta or {}
        return cls(metric, mode, early_stopping_patience=tc.early_stopping_patience,
                   plateau_patience=max(tc.plateau_patience, 1) if tc.schedule == "plateau" else 0,
                   best=meta.get("best_value"), bad_evals=int(meta.get("bad_evals", 0)))

    def update(self, value: float | None) -> Verdict:
        if value is not None and not math.isfinite(value):
            value = None
        improved = value is not None and (self.best is None or
                                          (value > self.best if self.mode == "max" else value < self.best))
        if improved:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        lower = (not improved and self.plateau_patience > 0 and self.bad_evals % self.plateau_patience == 0)
        return Verdict(improved=improved, lower_learning_rate=lower, stop=self.stopped)

    @property
    def stopped(self) -> bool:
        """Early-stopping patience used up (a restarted run that stopped early stays stopped)."""
        return bool(self.early_stopping_patience) and self.bad_evals >= self.early_stopping_patience

    def meta(self) -> dict:
        return {"best_metric": self.metric, "best_value": self.best, "bad_evals": self.bad_evals}


class _StopSignal:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, checkpoints and returns.

    A second signal while the first is being handled raises KeyboardInterrupt (the CLI exits
    130): a user pressing Ctrl-C twice wants out now. An interrupted save is harmless: Orbax
    commits a step by renaming its tmp folder, so the previous checkpoint stays the latest.
    """

    def __init__(self):
        self.received = None

    @contextlib.contextmanager
    def installed(self):
        def handler(signum, frame):
            if self.received is not None:
                raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
            self.received = signal.Signals(signum).name
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        try:
            yield self
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)


def evaluate(config: Config, params, data, translator: Translator, eval_fn, parallel: Parallel,
             split: str) -> dict:
    """Validation loss/perplexity over `eval_sentences` of `split`, plus decoding scores."""
    limit = config.train.eval_sentences
    sums = None
    for batch in data.eval_batches(split, limit=limit):
        batch = {k: v for k, v in batch.items() if k != "index"}
        out = parallel.unreplicate_metrics(eval_fn(params, parallel.put_batch(batch)))
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    result = metrics_lib.scalars_from_sums(jax.device_get(sums)) if sums is not None else {}
    examples = data.eval_examples(split, limit=limit)
    if examples:
        sources = [data.source_vocab.encode(s) for s, _ in examples]
        hyps = translator.translate_ids(sources, beam=1)
        texts = [data.target_vocab.decode(h["tokens"][0]) for h in hyps]
        refs = [t for _, t in examples]
        result.update(metrics_lib.corpus_scores(texts, refs))
        result["samples"] = [{"source": s, "reference": r, "hypothesis": h}
                             for (s, r), h in list(zip(examples, texts))[:3]]
    return result


def train_and_evaluate(config: Config, workdir: str, *, progress: bool = True) -> dict:
    """Trains (or resumes) the run in `workdir`. Returns the last evaluation's metrics.

    Resumes from the newest readable checkpoint in workdir without being asked. Returns
    normally (after writing a checkpoint) on SIGTERM/SIGINT; raises TrainingStopped (a
    UserError: exit code 2) after train.max_nonfinite non-finite steps in a row.
    """
    config = config_lib.validate(config)
    runtime.configure_backend(config.train.deterministic)  # before the backend starts
    resume = rundir.check_new_or_resumable(config, workdir)
    if resume and not config.train.init_from:
        # restarted without --init-from: the run still starts from (or began from) the saved one
        saved = rundir.read_config(workdir).train
        if saved.init_from:
            config = config.replace(train=dataclasses.replace(config.train, init_from=saved.init_from,
                                                              init_optimizer=saved.init_optimizer))
    stop = _StopSignal()
    with stop.installed():
        return _train(config, workdir, resume, stop, progress)


class _LatestSaver:
    """Latest-K checkpoints: saves a step at most once (the loop may ask twice at the end)."""

    def __init__(self, ckpts: Checkpoints, saved_step: int | None):
        self.ckpts, self.saved_step = ckpts, saved_step

    def save(self, step: int, state, meta: dict) -> None:
        if self.saved_step != step:
            self.ckpts.save(step, state, meta)
            self.saved_step = step


def _train(config: Config, workdir: str, resume: bool, stop: _StopSignal, progress: bool) -> dict:
    from s2s_jax.training import embeddings, warm_start
    from s2s_jax.data import build_data  # data never imports jax; import here keeps the CLI light

    maybe_initialize_distributed(config)
    tc = config.train
    parallel = Parallel(tc.parallel)
    primary = jax.process_index() == 0
    # train.init_from: the run and its checkpoint must exist and its model match, before any work;
    # unless this workdir has checkpoints of its own (they win; the other run may be gone by now)
    has_own = resume and bool(rundir.committed_steps(workdir))
    init = warm_start.resolve(config, workdir) if tc.init_from and not has_own else None
    data = build_data(config, workdir, process_index=jax.process_index(),
                      process_count=jax.process_count(), batch_multiple=parallel.local_devices * tc.grad_accum)
    if primary and not resume:
        rundir.write_config(workdir, config)
    vocab_ref = rundir.vocab_reference(workdir)
    if init is not None:
        init.check_vocabulary(vocab_ref)
    # read on every start (also a resume): the frozen rows are the rows the files fill
    pretrained = embeddings.load_pretrained(config, data.source_vocab, data.target_vocab)

    model = make_model(config, data.source_vocab.vocab_size, data.target_vocab.vocab_size)
    tracker = EvalTracker.from_config(config)
    ckpts = Checkpoints(workdir, keep=tc.keep_checkpoints, keep_best=tc.keep_best, best_metric=tracker.metric,
                        best_mode=tracker.mode, cleanup_tmp=True)
    # Restore straight onto the devices this run has, whatever the device count of the run that
    # wrote the checkpoint (abstract targets carry the shardings; nothing is allocated first).
    # The workdir's own checkpoints win over train.init_from.
    restored = ckpts.restore(parallel.state_target(abstract_state(config, model)))
    if restored is not None:
        state, meta, start = restored
        data_state = meta.get("data_state")
        tracker = EvalTracker.from_config(config, meta)
    else:
        if tc.init_from and init is None:  # this workdir's own checkpoints were all unreadable
            init = warm_start.resolve(config, workdir)
            init.check_vocabulary(vocab_ref)
        state = init.state(config, model) if init is not None else create_state(config, model)
        state = embeddings.apply(state, pretrained)
        data_state, start = None, int(jax.device_get(state.step))
    if int(np.asarray(jax.device_get(state.step))) != start:
        raise UserError(f"{workdir}/checkpoints/{start}: holds a state at step {int(np.asarray(state.step))}; "
                        "the checkpoint folder was tampered with: use a new --workdir")
    state = parallel.put_state(state)
    train_iter = data.train_batches(data_state)

    train_fn = parallel.wrap_train(functools.partial(steps.train_step, model=model, config=config,
                                                     frozen_rows=embeddings.frozen_rows(config, pretrained)))
    eval_fn = parallel.wrap_eval(functools.partial(steps.eval_step, model=model, config=config))
    writer = metrics_lib.MetricWriter(workdir, enabled=primary, tensorboard=tc.tensorboard,
                                      resume_step=start if resume else None)
    bar = metrics_lib.Progress(tc.steps, start, enabled=primary, steps=progress)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(parallel.get_state(state).params))
    if restored:
        origin = f"resuming from step {start} of {tc.steps}"
    else:
        origin = f"starting at step {start} of {tc.steps}" + (f", initialised from {init.describe()}" if init else "")
    bar.write(f"s2s_jax: {config.name}: {n_params:,} parameters; "
              f"{parallel.describe(data.stats['bucket_rows'], tc.grad_accum)}; {data.describe_plan()}; {origin}")

    def meta_now() -> dict:
        return {"data_state": train_iter.get_state(), **tracker.meta(), "config": config_lib.to_dict(config),
                "vocab": vocab_ref}

    latest = _LatestSaver(ckpts, start if restored is not None else None)

    def run_eval(step: int, state) -> tuple[dict, Verdict]:
        """Evaluates the state's parameters, updates the tracker, logs, saves a new best."""
        params = params_for_eval(parallel.get_state(state))
        translator = Translator(config, model, params, data.source_vocab, data.target_vocab)
        result = evaluate(config, parallel.put_state(params) if tc.parallel == "pmap" else params,
                          data, translator, eval_fn, parallel, config.data.valid_split)
        verdict = tracker.update(result.get(tracker.metric))
        samples = result.pop("samples", [])
        writer.write("eval", step, dict(result, best=tracker.best, bad_evals=tracker.bad_evals))
        shown = ", ".join(f"{k} {result[k]:.4g}" for k in ("loss", "perplexity", "exact_match", "bleu", "chrf")
                          if k in result)
        bar.write(f"[eval step {step}] {shown}")
        for s in samples[:2]:
            bar.write(f"  {s['source']!r} -> {s['hypothesis']!r} (ref {s['reference']!r})")
        if verdict.improved:
            ckpts.save_best(step, parallel.get_state(state), meta_now(), {tracker.metric: float(tracker.best)})
        return result, verdict

    # A run that stopped early stays stopped: restarting it only re-evaluates the same verdict.
    finished = restored is not None and tracker.stopped
    if finished:
        bar.write(f"this run stopped early at step {start} (no {tracker.metric} improvement in {tracker.bad_evals} "
                  "evaluations); nothing to do: raise train.early_stopping_patience to train on")

    sums = None
    t_last, step_last = time.perf_counter(), start
    last_eval: dict = {}
    step = start
    prev_nonfinite = None  # the previous step's consecutive non-finite count (a device scalar)
    early_stopped = False
    try:
        while step < tc.steps and not stop.received and not finished:
            batch = next(train_iter)
            state, m = train_fn(state, parallel.put_batch(batch))
            m = parallel.unreplicate_metrics(m)
            sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
            step += 1
            # Non-finite guard, one step behind: reading the previous step's counter waits only
            # for that step, so the one just dispatched keeps the device busy meanwhile.
            if prev_nonfinite is not None and int(prev_nonfinite) >= tc.max_nonfinite:
                ckpts.wait()
                good = latest.saved_step if latest.saved_step is not None else "none"
                raise TrainingStopped(
                    f"stopped at step {step - 1}: {int(prev_nonfinite)} consecutive steps had a non-finite "
                    f"loss or gradient (train.max_nonfinite={tc.max_nonfinite}) and were skipped; the last "
                    f"good checkpoint ({workdir}/checkpoints, step {good}) is intact: lower "
                    "train.learning_rate, set train.clip_norm or check the data, then run again")
            prev_nonfinite = m["nonfinite_run"]  # metrics are not donated, unlike the state
            if step % tc.log_every == 0 or step == tc.steps:
                host = jax.device_get(sums)
                now = time.perf_counter()
                values = metrics_lib.scalars_from_sums(host)
                values.update(grad_norm=float(host["grad_norm"]) / (step - step_last),
                              learning_rate=float(m["learning_rate"]),
                              skipped_steps=int(host["skipped"]),
                              tokens_per_sec=float(host["weight"]) / (now - t_last),
                              sentences=int(host["sentences"]),
                              sentences_per_sec=float(host["sentences"]) / (now - t_last))
                writer.write("train", step, values)
                if values["skipped_steps"]:
                    log.warning("steps %d-%d: %d step(s) skipped for a non-finite loss or gradient "
                                "(parameters untouched)", step_last + 1, step, values["skipped_steps"])
                bar.update(step, loss=values["loss"], tok_s=f"{values['tokens_per_sec']:.0f}")
                sums, t_last, step_last = None, now, step
            if step % tc.eval_every == 0 or step == tc.steps:
                last_eval, verdict = run_eval(step, state)
                t_last = time.perf_counter()  # evaluation time is not training throughput
                if verdict.lower_learning_rate:
                    state = scale_learning_rate(state, tc.plateau_factor)
                    bar.write(f"[eval step {step}] no {tracker.metric} improvement in {tracker.bad_evals} "
                              f"evaluations: learning rate x{tc.plateau_factor}")
                if verdict.stop:
                    bar.write(f"early stopping at step {step}: no {tracker.metric} improvement in "
                              f"{tracker.bad_evals} evaluations (best {tracker.best})")
                    early_stopped = True
                    latest.save(step, parallel.get_state(state), meta_now())
                    break
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                # Not in the middle of a non-finite streak: keep the latest-K all good ones.
                if stop.received or int(m["nonfinite_run"]) == 0:
                    latest.save(step, parallel.get_state(state), meta_now())
        if stop.received:
            latest.save(step, parallel.get_state(state), meta_now())
            ckpts.wait()
            bar.write(f"{stop.received}: checkpoint written at step {step}; exiting")
        ckpts.wait()
    finally:
        ckpts.close()  # waits for an in-flight save
        bar.close()
        writer.close()
    if primary and tc.plot and not stop.received:
        metrics_lib.plot_curves(workdir)
    if early_stopped:
        last_eval = dict(last_eval, early_stopped_at=step)
    return last_eval
