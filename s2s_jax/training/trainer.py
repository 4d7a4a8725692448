"""train_and_evaluate(config, workdir): the training loop, and the one place that jits steps.

`prepare_run` builds a `RunContext` for one run start: restore-or-init the state and the data
iterator from the workdir's latest good checkpoint (a fresh state may start from another run,
train.init_from: warm_start.py, and take pretrained embedding rows: embeddings.py), the jitted
step functions, the metric writer and the progress bar. `train_loop` then runs steps (metrics
stay on the device and are fetched every `log_every`: `log_train`) and hands the periodic work
to small named parts, as t5x's trainer and Flax's train_and_evaluate do:
- `check_nonfinite`: steps with a non-finite loss, gradient or update are skipped inside the
  step; `max_nonfinite` of them in a row stop the run (exit code 2) without saving, so the last
  good checkpoint stays the latest;
- `run_eval` every `eval_every` (loss, perplexity, greedy decoding scored by exact match and
  the scores of data.task_kind: sacreBLEU, lowercased Moses-tokenised BLEU and chrF, or ROUGE), where `EvalTracker.update` decides a new best, a plateau step down of the
  learning rate and early stopping on `best_metric`, and `apply_verdict` applies them;
- `save_periodic` (asynchronous) every `checkpoint_every`;
- `StopSignal`: on SIGTERM/SIGINT the loop finishes the step, saves (`save_on_signal`) and returns.

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
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from s2s_jax import rundir, runtime
from s2s_jax import config as config_lib
from s2s_jax import metrics as metrics_lib
from s2s_jax.checkpoint import Checkpoints
from s2s_jax.config import Config, UserError
from s2s_jax.data import Data, build_data, model_inputs, truncate_sources
from s2s_jax.inference.adapter import SingleModel
from s2s_jax.inference.translator import Translator
from s2s_jax.model import Seq2Seq
from s2s_jax.parallel import Parallel, maybe_initialize_distributed
from s2s_jax.train_state import (TrainState, abstract_state, create_state, make_model, params_for_eval,
                                 scale_learning_rate)
from s2s_jax.training import embeddings, steps, warm_start

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


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, checkpoints and returns.

    A second signal while the first is being handled raises KeyboardInterrupt (the CLI exits
    130): a user pressing Ctrl-C twice wants out now. An interrupted save is harmless: Orbax
    commits a step by renaming its tmp folder, so the previous checkpoint stays the latest.
    """

    def __init__(self):
        self.received = None

    def handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.received = signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self):
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, self.handle)
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
        out = parallel.unreplicate_metrics(eval_fn(params, parallel.put_batch(model_inputs(batch))))
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    result = metrics_lib.scalars_from_sums(jax.device_get(sums)) if sums is not None else {}
    examples = data.eval_examples(split, limit=limit)
    if examples:
        sources = truncate_sources(config.data, [data.source_vocab.encode(s) for s, _ in examples])
        if config.model.copy_attention:  # extended ids in; copied unknown words come back as source words
            sources, words = translator.extended_lines([s for s, _ in examples], sources)
            hyps = translator.translate_ids(sources, beam=1)
            texts = [translator.hypotheses(h, (src, w))[0]["text"] for h, src, w in zip(hyps, sources, words)]
        else:
            hyps = translator.translate_ids(sources, beam=1)
            texts = [data.target_vocab.decode(h["tokens"][0]) for h in hyps]
        refs = [t for _, t in examples]
        scores = metrics_lib.corpus_scores(texts, refs, kind=config.data.task_kind, lang=config.data.tgt_lang)
        result.update({k: v for k, v in scores.items() if k not in metrics_lib.VERBOSE_KEYS})
        result["samples"] = [{"source": s, "reference": r, "hypothesis": h}
                             for (s, r), h in list(zip(examples, texts))[:3]]
    return result


def train_and_evaluate(config: Config, workdir: str, *, progress: bool = True) -> dict:
    """Trains (or resumes) the run in `workdir`. Returns the last evaluation's metrics.

    Resumes from the newest readable checkpoint in workdir without being asked. Returns
    normally (after writing a checkpoint) on SIGTERM/SIGINT; raises TrainingStopped (a
    UserError: exit code 2) after train.max_nonfinite non-finite steps in a row.
    """
    config, resume = checked_config(config, workdir)
    stop = StopSignal()
    with stop.installed():
        return train_loop(prepare_run(config, workdir, resume=resume, stop=stop, progress=progress))


def checked_config(config: Config, workdir: str) -> tuple[Config, bool]:
    """Validates the config and the workdir before the backend starts. Returns the config to run
    (a restarted warm-started run keeps its train.init_from) and whether the workdir holds a run."""
    config = config_lib.validate(config)
    runtime.configure_backend(config.train.deterministic)  # before the backend starts
    resume = rundir.check_new_or_resumable(config, workdir)
    if resume and not config.train.init_from:
        # restarted without --init-from: the run still starts from (or began from) the saved one
        saved = rundir.read_config(workdir).train
        if saved.init_from:
            config = config.replace(train=dataclasses.replace(config.train, init_from=saved.init_from,
                                                              init_optimizer=saved.init_optimizer))
    return config, resume


class _LatestSaver:
    """Latest-K checkpoints: saves a step at most once (the loop may ask twice at the end)."""

    def __init__(self, ckpts: Checkpoints, saved_step: int | None):
        self.ckpts, self.saved_step = ckpts, saved_step

    def save(self, step: int, state, meta: dict) -> None:
        if self.saved_step != step:
            self.ckpts.save(step, state, meta)
            self.saved_step = step


# ------------------------------------------------------------------------------------- setup

@dataclasses.dataclass
class RunContext:
    """What `prepare_run` builds for one run start; the loop's parts read it. `state` is the
    live training state (on the devices; the loop replaces it after every step)."""

    config: Config
    workdir: str
    parallel: Parallel
    primary: bool  # process 0: writes the config, the logs, the plot
    data: Data
    model: Seq2Seq
    vocab_ref: dict  # the workdir's vocabulary reference, stored in every checkpoint
    init: warm_start.InitFrom | None  # where a fresh state came from (train.init_from)
    ckpts: Checkpoints
    latest: _LatestSaver
    tracker: EvalTracker  # best value, bad evaluations: restored with the checkpoint
    restored: bool  # the state came from this workdir's own checkpoint
    start: int  # the step the loop starts from
    state: TrainState
    train_iter: object  # the training batches (a checkpointable iterator)
    train_fn: Callable  # jitted: (state, batch) -> (state, metric sums); the state is donated
    eval_fn: Callable  # jitted: (params, batch) -> metric sums
    writer: metrics_lib.MetricWriter
    bar: metrics_lib.Progress
    stop: StopSignal

    def meta(self) -> dict:
        """What a checkpoint stores beside the state: data position, evaluation bookkeeping, config, vocab."""
        return {"data_state": self.train_iter.get_state(), **self.tracker.meta(),
                "config": config_lib.to_dict(self.config), "vocab": self.vocab_ref}

    def save_latest(self, step: int) -> None:
        """Saves the live state as a latest-K checkpoint of `step` (once per step)."""
        self.latest.save(step, self.parallel.get_state(self.state), self.meta())


@dataclasses.dataclass(frozen=True)
class _Begin:
    """Where the state comes from: this workdir's checkpoint (meta set) or a fresh/warm start."""

    state: TrainState
    start: int
    meta: dict | None  # the restored checkpoint's meta; None for a fresh state
    init: warm_start.InitFrom | None


def prepare_run(config: Config, workdir: str, *, resume: bool | None = None, stop: StopSignal | None = None,
                progress: bool = True) -> RunContext:
    """Sets up one run start: distributed init, warm start, data, config write, embeddings,
    restore-or-init, the tamper check, the jitted step functions, the metric writer and the
    progress bar. `resume` None: the config and workdir are checked here first (`checked_config`);
    `stop` None: a StopSignal with no handler installed (train_and_evaluate installs one)."""
    if resume is None:
        config, resume = checked_config(config, workdir)
    stop = stop if stop is not None else StopSignal()
    maybe_initialize_distributed(config)
    tc = config.train
    parallel = Parallel(tc.parallel)
    primary = jax.process_index() == 0
    init = _warm_start_source(config, workdir, resume)
    data = _build_data(config, workdir, parallel)
    if primary and not resume:
        rundir.write_config(workdir, config)
    vocab_ref = rundir.vocab_reference(workdir)
    if init is not None:
        init.check_vocabulary(vocab_ref)
    # read on every start (also a resume): the frozen rows are the rows the files fill
    pretrained = embeddings.load_pretrained(config, data.source_vocab, data.target_vocab)

    model = make_model(config, data.source_vocab.vocab_size, data.target_vocab.vocab_size)
    metric, mode = config_lib.best_metric_and_mode(config)
    ckpts = Checkpoints(workdir, keep=tc.keep_checkpoints, keep_best=tc.keep_best, best_metric=metric,
                        best_mode=mode, cleanup_tmp=True)
    begin = _restore_or_init(config, workdir, parallel, model, ckpts, init, vocab_ref, pretrained)
    _check_untampered(begin, workdir)
    restored = begin.meta is not None
    state = parallel.put_state(begin.state)
    train_iter = data.train_batches(begin.meta.get("data_state") if restored else None)

    train_fn, eval_fn = _step_functions(config, model, parallel, pretrained)
    writer = metrics_lib.MetricWriter(workdir, enabled=primary, tensorboard=tc.tensorboard,
                                      resume_step=begin.start if resume else None)
    bar = metrics_lib.Progress(tc.steps, begin.start, enabled=primary, steps=progress)
    run = RunContext(config=config, workdir=workdir, parallel=parallel, primary=primary, data=data, model=model,
                     vocab_ref=vocab_ref, init=begin.init, ckpts=ckpts,
                     latest=_LatestSaver(ckpts, begin.start if restored else None),
                     tracker=EvalTracker.from_config(config, begin.meta), restored=restored, start=begin.start,
                     state=state, train_iter=train_iter, train_fn=train_fn, eval_fn=eval_fn, writer=writer,
                     bar=bar, stop=stop)
    _announce(run)
    return run


def _warm_start_source(config: Config, workdir: str, resume: bool) -> warm_start.InitFrom | None:
    """train.init_from: the run and its checkpoint must exist and its model match, before any
    work; unless this workdir has checkpoints of its own (they win; the other run may be gone)."""
    has_own = resume and bool(rundir.committed_steps(workdir))
    return warm_start.resolve(config, workdir) if config.train.init_from and not has_own else None


def _build_data(config: Config, workdir: str, parallel: Parallel) -> Data:
    """The run's data: vocabularies and splits, this process's shard of the batches. Its batch plan is
    built once, by data.train_batches with the checkpoint's data state (the saved buckets)."""
    return build_data(config, workdir, process_index=jax.process_index(), process_count=jax.process_count(),
                      batch_multiple=parallel.local_devices * config.train.grad_accum)


def _restore_or_init(config: Config, workdir: str, parallel: Parallel, model: Seq2Seq, ckpts: Checkpoints,
                     init, vocab_ref, pretrained) -> _Begin:
    """The workdir's newest readable checkpoint, else a fresh state (from train.init_from if set,
    with the pretrained embedding rows). The workdir's own checkpoints win over train.init_from."""
    # Restore straight onto the devices this run has, whatever the device count of the run that
    # wrote the checkpoint (abstract targets carry the shardings; nothing is allocated first).
    restored = ckpts.restore(parallel.state_target(abstract_state(config, model)))
    if restored is not None:
        state, meta, start = restored
        return _Begin(state, start, meta, init)
    if config.train.init_from and init is None:  # this workdir's own checkpoints were all unreadable
        init = warm_start.resolve(config, workdir)
        init.check_vocabulary(vocab_ref)
    state = init.state(config, model) if init is not None else create_state(config, model)
    state = embeddings.apply(state, pretrained)
    return _Begin(state, int(jax.device_get(state.step)), None, init)


def _check_untampered(begin: _Begin, workdir: str) -> None:
    """The state's own step counter must be the step its checkpoint folder is named after."""
    if int(np.asarray(jax.device_get(begin.state.step))) != begin.start:
        raise UserError(f"{workdir}/checkpoints/{begin.start}: holds a state at step "
                        f"{int(np.asarray(begin.state.step))}; the checkpoint folder was tampered with: "
                        "use a new --workdir")


def _step_functions(config: Config, model: Seq2Seq, parallel: Parallel, pretrained) -> tuple[Callable, Callable]:
    """The jitted train and eval steps, wrapped for train.parallel (the one place steps are jitted)."""
    train_fn = parallel.wrap_train(functools.partial(steps.train_step, model=model, config=config,
                                                     frozen_rows=embeddings.frozen_rows(config, pretrained)))
    eval_fn = parallel.wrap_eval(functools.partial(steps.eval_step, model=model, config=config))
    return train_fn, eval_fn


def _announce(run: RunContext) -> None:
    """The start line: parameters, the device layout and batch sizes, the data plan, the origin."""
    tc, init = run.config.train, run.init
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.parallel.get_state(run.state).params))
    if run.restored:
        origin = f"resuming from step {run.start} of {tc.steps}"
    else:
        origin = (f"starting at step {run.start} of {tc.steps}"
                  + (f", initialised from {init.describe()}" if init else ""))
    run.bar.write(f"s2s_jax: {run.config.name}: {n_params:,} parameters; "
                  f"{run.parallel.describe(run.data.stats['bucket_rows'], tc.grad_accum)}; "
                  f"{run.data.describe_plan()}; {origin}")


# -------------------------------------------------------------------------------------- loop

def train_loop(run: RunContext) -> dict:
    """Steps from run.start to train.steps; stops early on the evaluation's verdict, on a signal
    (after a checkpoint) or on a non-finite streak (TrainingStopped). Returns the last evaluation."""
    tc = run.config.train
    # A run that stopped early stays stopped: restarting it only re-evaluates the same verdict.
    finished = _already_stopped(run)
    window = _LogWindow(run.start)
    step, last_eval, prev_nonfinite, early_stopped = run.start, {}, None, False
    try:
        while step < tc.steps and not run.stop.received and not finished:
            batch = next(run.train_iter)
            run.state, m = run.train_fn(run.state, run.parallel.put_batch(model_inputs(batch)))
            m = run.parallel.unreplicate_metrics(m)
            window.add(m)
            step += 1
            check_nonfinite(run, step, prev_nonfinite)
            prev_nonfinite = m["nonfinite_run"]  # metrics are not donated, unlike the state
            if step % tc.log_every == 0 or step == tc.steps:
                log_train(run, window, step, m)
            if step % tc.eval_every == 0 or step == tc.steps:
                last_eval, verdict = run_eval(run, step)
                window.t_last = time.perf_counter()  # evaluation time is not training throughput
                if apply_verdict(run, step, verdict):
                    early_stopped = True
                    break
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                save_periodic(run, step, m)
        if run.stop.received:
            save_on_signal(run, step)
        run.ckpts.wait()
    finally:
        run.ckpts.close()  # waits for an in-flight save
        run.bar.close()
        run.writer.close()
    if run.primary and tc.plot and not run.stop.received:
        metrics_lib.plot_curves(run.workdir)
    return dict(last_eval, early_stopped_at=step) if early_stopped else last_eval


def _already_stopped(run: RunContext) -> bool:
    """A restarted run whose early-stopping patience was used up: nothing to train."""
    finished = run.restored and run.tracker.stopped
    if finished:
        run.bar.write(f"this run stopped early at step {run.start} (no {run.tracker.metric} improvement in "
                      f"{run.tracker.bad_evals} evaluations); nothing to do: raise "
                      "train.early_stopping_patience to train on")
    return finished


@dataclasses.dataclass
class _LogWindow:
    """The steps since the last train log line: their metric sums (on the device until a log
    line fetches them), the first step's index and the time it began."""

    step_last: int
    t_last: float = dataclasses.field(default_factory=time.perf_counter)
    sums: dict | None = None

    def add(self, m: dict) -> None:
        self.sums = m if self.sums is None else jax.tree.map(jnp.add, self.sums, m)


def check_nonfinite(run: RunContext, step: int, prev_nonfinite) -> None:
    """The non-finite guard, one step behind: reading the previous step's counter waits only for
    that step, so the one just dispatched keeps the device busy meanwhile. Raises TrainingStopped
    after train.max_nonfinite skipped steps in a row (nothing saved: the last good one stays)."""
    tc = run.config.train
    if prev_nonfinite is not None and int(prev_nonfinite) >= tc.max_nonfinite:
        run.ckpts.wait()
        good = run.latest.saved_step if run.latest.saved_step is not None else "none"
        raise TrainingStopped(
            f"stopped at step {step - 1}: {int(prev_nonfinite)} consecutive steps had a non-finite "
            f"loss or gradient (train.max_nonfinite={tc.max_nonfinite}) and were skipped; the last "
            f"good checkpoint ({run.workdir}/checkpoints, step {good}) is intact: lower "
            "train.learning_rate, set train.clip_norm or check the data, then run again")


def log_train(run: RunContext, window: _LogWindow, step: int, m: dict) -> None:
    """Fetches the window's sums: one metrics.jsonl/TensorBoard record, a warning for skipped
    steps, the progress bar; then starts a new window."""
    host = jax.device_get(window.sums)
    now = time.perf_counter()
    values = metrics_lib.scalars_from_sums(host)
    values.update(grad_norm=float(host["grad_norm"]) / (step - window.step_last),
                  learning_rate=float(m["learning_rate"]),
                  skipped_steps=int(host["skipped"]),
                  tokens_per_sec=float(host["weight"]) / (now - window.t_last),
                  sentences=int(host["sentences"]),
                  sentences_per_sec=float(host["sentences"]) / (now - window.t_last))
    run.writer.write("train", step, values)
    if values["skipped_steps"]:
        log.warning("steps %d-%d: %d step(s) skipped for a non-finite loss or gradient "
                    "(parameters untouched)", window.step_last + 1, step, values["skipped_steps"])
    run.bar.update(step, loss=values["loss"], tok_s=f"{values['tokens_per_sec']:.0f}")
    window.sums, window.t_last, window.step_last = None, now, step


def run_eval(run: RunContext, step: int) -> tuple[dict, Verdict]:
    """Evaluates the state's parameters, updates the tracker, logs, saves a new best."""
    tc, parallel, tracker = run.config.train, run.parallel, run.tracker
    params = params_for_eval(parallel.get_state(run.state))
    translator = Translator(run.config, SingleModel(run.model), params, run.data.source_vocab, run.data.target_vocab)
    result = evaluate(run.config, parallel.put_state(params) if tc.parallel == "pmap" else params,
                      run.data, translator, run.eval_fn, parallel, run.config.data.valid_split)
    verdict = tracker.update(result.get(tracker.metric))
    samples = result.pop("samples", [])
    run.writer.write("eval", step, dict(result, best=tracker.best, bad_evals=tracker.bad_evals))
    shown = ", ".join(f"{k} {result[k]:.4g}" for k in ("loss", "perplexity", "exact_match", "bleu", "bleu_lc_tok",
                                                          "chrf", "rouge1", "rouge2", "rougeL") if k in result)
    run.bar.write(f"[eval step {step}] {shown}")
    for s in samples[:2]:
        run.bar.write(f"  {s['source']!r} -> {s['hypothesis']!r} (ref {s['reference']!r})")
    if verdict.improved:
        run.ckpts.save_best(step, parallel.get_state(run.state), run.meta(), {tracker.metric: float(tracker.best)})
    return result, verdict


def apply_verdict(run: RunContext, step: int, verdict: Verdict) -> bool:
    """Acts on an evaluation's verdict: a plateau lowers the learning rate; an early stop saves
    the latest checkpoint. Returns True when the loop must stop."""
    tc, tracker = run.config.train, run.tracker
    if verdict.lower_learning_rate:
        run.state = scale_learning_rate(run.state, tc.plateau_factor)
        run.bar.write(f"[eval step {step}] no {tracker.metric} improvement in {tracker.bad_evals} "
                      f"evaluations: learning rate x{tc.plateau_factor}")
    if verdict.stop:
        run.bar.write(f"early stopping at step {step}: no {tracker.metric} improvement in "
                      f"{tracker.bad_evals} evaluations (best {tracker.best})")
        run.save_latest(step)
    return verdict.stop


def save_periodic(run: RunContext, step: int, m: dict) -> None:
    """The checkpoint_every save. Not in the middle of a non-finite streak: keep the latest-K all
    good ones (a signal saves anyway: the run is leaving)."""
    if run.stop.received or int(m["nonfinite_run"]) == 0:
        run.save_latest(step)


def save_on_signal(run: RunContext, step: int) -> None:
    """SIGTERM/SIGINT received: the step is finished; save it (once) and say so."""
    run.save_latest(step)
    run.ckpts.wait()
    run.bar.write(f"{run.stop.received}: checkpoint written at step {step}; exiting")
