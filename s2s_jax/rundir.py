"""The run directory: its layout, and every choice made on it (the one home of these facts).

    <workdir>/
      config.json            the run's whole config, written once by the first start
      vocab/                 vocab.json (+ SentencePiece models): written before config.json
      checkpoints/<step>/    latest-K checkpoints (Orbax: state + meta; checkpoint.py)
      best/<step>/           best-M checkpoints by train.best_metric
      corrupt/               unreadable checkpoints moved aside by the trainer
      average.json           in a run written by `average`: where its parameters came from
      shortlist.npz          the decoding shortlist (`s2s-jax shortlist`; inference/shortlist.py);
                             also the name of the shortlist in an export bundle
      metrics.jsonl, ...     logs (metrics.py), eval_*.json (inference/evaluate.py)

What lives here: the layout names; `check_new_or_resumable` (the trainer's check of --workdir);
config read/write; committed checkpoint steps; the vocabulary install and read; the checkpoint
choice (`CheckpointChoice`: latest / step / best / average, with the one exclusivity check) and
the parameters it selects (`chosen_params`), used by run loading, export, warm start and the API;
and `atomic_folder`, the write-beside-then-rename used by export, average and prepare.

Importing this module imports no jax (the data layer and the bundle loader use it); the
checkpoint readers import Orbax and the model only when called.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile

from s2s_jax import config as config_lib
from s2s_jax.config import Config, UserError
from s2s_jax.vocab import VOCAB_JSON, read_vocab_dir

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"  # also the name of the config in an export bundle
VOCAB_DIR = "vocab"  # also the vocabulary folder of an export bundle and of a prepared corpus
CHECKPOINT_DIRS = {"latest": "checkpoints", "best": "best"}  # which -> folder of Orbax steps
CORRUPT_DIR = "corrupt"
AVERAGE_JSON = "average.json"
SHORTLIST_FILE = "shortlist.npz"  # a run's (and a bundle's) decoding shortlist


def config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG_FILE)


def vocab_dir(workdir: str) -> str:
    return os.path.join(workdir, VOCAB_DIR)


def shortlist_path(workdir: str) -> str:
    """The decoding shortlist of a run or an export bundle."""
    return os.path.join(workdir, SHORTLIST_FILE)


def checkpoint_dir(workdir: str, which: str = "latest") -> str:
    """The folder of the `which` ("latest" | "best") checkpoints."""
    return os.path.join(workdir, CHECKPOINT_DIRS[which])


# -- the run and its config -----------------------------------------------------------------

def is_run(workdir: str) -> bool:
    return os.path.isfile(config_path(workdir))


def require_run(workdir: str) -> None:
    """A UserError unless `workdir` holds a trained run (its config.json)."""
    if not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir}: no such folder; train a model there first")
    if not is_run(workdir):
        raise UserError(f"--workdir {workdir}: no {CONFIG_FILE}; train a model there first")


def read_config(workdir: str) -> Config:
    return config_lib.load(config_path(workdir))


def write_config(workdir: str, config: Config) -> None:
    """Writes workdir/config.json atomically (a temporary file renamed into place)."""
    path = config_path(workdir)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(config_lib.to_json(config))
    os.replace(tmp, path)


def check_new_or_resumable(config: Config, workdir: str) -> bool:
    """Validates --workdir before training starts. Returns True when it holds a run to resume
    (whose model and data config must then be `config`'s)."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir}: is a file, not a directory; pick another path")
    path = config_path(workdir)
    resume = os.path.isfile(path)
    # vocab/ is written just before config.json: a run killed in between left only that.
    if os.path.isdir(workdir) and set(os.listdir(workdir)) - {VOCAB_DIR} and not resume:
        raise UserError(f"--workdir {workdir}: not empty and holds no s2s_jax run ({CONFIG_FILE} missing); "
                        "use a new or empty directory")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--workdir {workdir}: not writable ({e.strerror}); pick a writable directory") from None
    if resume:
        try:
            saved = config_lib.load(path)
        except UserError as e:
            raise UserError(f"{path}: unreadable ({e}); use a new --workdir") from None
        for section in ("model", "data"):
            if getattr(saved, section) != getattr(config, section):
                diff = [k for k, v in config_lib.to_dict(config)[section].items()
                        if config_lib.to_dict(saved)[section][k] != v]
                raise UserError(f"--workdir {workdir}: holds a run with a different {section} config "
                                f"({', '.join(f'{section}.{k}' for k in diff)}); use a new --workdir "
                                "or the saved settings")
    return resume


# -- vocabularies ---------------------------------------------------------------------------

class VocabularyMismatch(UserError):
    """workdir/vocab/ holds another vocabulary than the one being installed."""


def install_vocabs(workdir: str, source_vocab, target_vocab) -> str:
    """Writes workdir/vocab/ (vocab.json + SentencePiece models). If the folder already exists
    (a resumed run) it must hold the same vocabulary, or the checkpoint would be decoded with
    the wrong pieces: that is a VocabularyMismatch."""
    vdir = vocab_dir(workdir)
    files = {}
    for v in (source_vocab, target_vocab):
        if getattr(v, "kind", None) == "sentencepiece":
            files[os.path.basename(v.model_file)] = v.model_proto
    files[VOCAB_JSON] = json.dumps({"source": source_vocab.to_json(), "target": target_vocab.to_json()},
                                   indent=2, sort_keys=True).encode()
    if os.path.isdir(vdir) and os.path.isfile(os.path.join(vdir, VOCAB_JSON)):
        for name, content in files.items():
            p = os.path.join(vdir, name)
            old = open(p, "rb").read() if os.path.isfile(p) else None
            if old != content:
                raise VocabularyMismatch(f"{p}: this workdir was trained with a different vocabulary than the data "
                                         f"configured now; use a new workdir (or restore the original data settings)")
        return vdir
    os.makedirs(vdir, exist_ok=True)
    for name, content in files.items():
        tmp = os.path.join(vdir, f".{name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(content)
        os.replace(tmp, os.path.join(vdir, name))  # atomic: other hosts may write the same file
    return vdir


def read_vocabs(workdir: str):
    """(source_vocab, target_vocab) installed in workdir/vocab/ (CharVocab for tasks)."""
    return read_vocab_dir(vocab_dir(workdir))


def vocab_reference(workdir: str) -> dict:
    """{"dir": "vocab", "files": {name: sha256}}: which vocabulary a checkpoint's ids refer to."""
    vdir = vocab_dir(workdir)
    files = {}
    if os.path.isdir(vdir):
        for name in sorted(os.listdir(vdir)):
            path = os.path.join(vdir, name)
            if os.path.isfile(path) and not name.startswith("."):
                files[name] = file_digest(path)
    return {"dir": VOCAB_DIR, "files": files}


def file_digest(path: str) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (vocabularies, bundle files, corpus files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- checkpoints ----------------------------------------------------------------------------

def committed_steps(workdir: str, which: str = "latest") -> list[int]:
    """Committed checkpoint steps of `which` ("latest" | "best"), sorted. Orbax commits a step
    by renaming its tmp folder to the bare number, so the listing needs no manager (a manager
    would create folders in a run that is only read here)."""
    d = checkpoint_dir(workdir, which)
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def checkpoint_steps(workdir: str, which: str = "latest") -> list[int]:
    """Committed checkpoint steps of a run, sorted; a CheckpointError when there are none."""
    from s2s_jax.checkpoint import CheckpointError

    require_run(workdir)
    folder = CHECKPOINT_DIRS[which]
    if not os.path.isdir(checkpoint_dir(workdir, which)):
        raise CheckpointError(f"--workdir {workdir}: no {which} checkpoint ({folder}/ is missing); train first")
    steps = committed_steps(workdir, which)
    if not steps:
        raise CheckpointError(f"--workdir {workdir}: no {which} checkpoint in {folder}/; train first")
    return steps


@dataclasses.dataclass(frozen=True)
class CheckpointChoice:
    """Which parameters of a run: the latest checkpoint (the newest that restores), checkpoint
    `step`, the newest `best` one, or the element-wise mean of the last `average_last`.
    At most one of them; constructing a choice with several is the UserError."""

    step: int | None = None
    best: bool = False
    average_last: int | None = None

    def __post_init__(self):
        if (self.step is not None) + bool(self.best) + (self.average_last is not None) > 1:
            raise UserError("--step, --best and --average-last exclude each other; pick one")

    @property
    def folder(self) -> str:
        """The checkpoints it reads: "best" or "latest"."""
        return "best" if self.best else "latest"

    @classmethod
    def of_record(cls, record: dict) -> "CheckpointChoice":
        """The choice that gives the parameters of a loaded run's checkpoint record
        ({"which": latest | best | step | average, "steps": [...]})."""
        which = record["which"]
        if which == "average":
            return cls(average_last=len(record["steps"]))
        if which == "best":
            return cls(best=True)
        if which == "step":
            return cls(step=record["steps"][0])
        return cls()

    def kwargs(self) -> dict:
        return {"step": self.step, "best": self.best, "average_last": self.average_last}


def restore(workdir: str, config, model, step: int | None, which: str):
    """(state, meta, step) of one checkpoint (the newest that restores when step is None)."""
    from s2s_jax.checkpoint import CheckpointError, Checkpoints
    from s2s_jax.train_state import abstract_state

    ckpts = Checkpoints(workdir, keep=10 ** 6, keep_best=10 ** 6 if which == "best" else 0, async_save=False)
    try:
        restored = ckpts.restore(abstract_state(config, model), step, which=which)
    finally:
        ckpts.close()
    if restored is None:
        raise CheckpointError(f"--workdir {workdir}: no {which} checkpoint; train first")
    state, meta, restored_step = restored
    return state, meta, int(restored_step)


def require_checkpoints(workdir: str, which: str) -> None:
    """A CheckpointError when the run has no folder of `which` checkpoints."""
    from s2s_jax.checkpoint import CheckpointError

    if not os.path.isdir(checkpoint_dir(workdir, which)):
        raise CheckpointError(f"--workdir {workdir}: no {which} checkpoint; train first")


def chosen_params(workdir: str, config, model, choice: CheckpointChoice):
    """(params, record) of the run's checkpoint(s) chosen by `choice`: the parameters inference
    uses (the EMA where the run kept one; the mean for average_last) and the record
    {"which": latest | best | step | average, "steps": [...]}. Every choice a user can get wrong
    (a step that does not exist, more checkpoints to average than the run kept) is a UserError
    before anything is restored."""
    from s2s_jax.train_state import params_for_eval

    which = choice.folder
    require_checkpoints(workdir, which)
    if choice.average_last is not None:
        _, steps = average_steps(workdir, config, last=choice.average_last, last_flag="--average-last")
        trees = [params_for_eval(restore(workdir, config, model, s, "latest")[0]) for s in steps]
        return average_params(trees), {"which": "average", "steps": steps}
    if choice.step is not None:
        steps = checkpoint_steps(workdir, which)
        if choice.step not in steps:
            raise UserError(f"--step {choice.step}: no such checkpoint in {workdir}/{CHECKPOINT_DIRS[which]} "
                            f"(steps {steps})")
    state, _, restored_step = restore(workdir, config, model, choice.step, which)
    record = {"which": "step" if choice.step is not None else which, "steps": [restored_step]}
    averaged = os.path.join(workdir, AVERAGE_JSON)
    if not choice.best and os.path.isfile(averaged):  # written by `average`: say what the parameters are
        with open(averaged, encoding="utf-8") as f:
            written = json.load(f)
        record = {"which": "average", "steps": written["steps"], "source": written["source"]}
    return params_for_eval(state), record


def average_params(trees):
    """Element-wise mean of parameter trees (same structure), accumulated in float64.

    Accumulating in float64 makes the mean of K identical float32 trees exactly that tree.
    Returns numpy arrays in each leaf's original dtype.
    """
    import jax
    import numpy as np

    trees = list(trees)
    if not trees:
        raise ValueError("average_params needs at least one tree")
    total = jax.tree.map(lambda x: np.asarray(x, np.float64), trees[0])
    for tree in trees[1:]:
        total = jax.tree.map(lambda a, x: a + np.asarray(x, np.float64), total, tree)
    return jax.tree.map(lambda a, x: (a / len(trees)).astype(np.asarray(x).dtype), total, trees[0])


def average_steps(workdir: str, config, *, last: int | None = None, steps=None, best: int | None = None,
                  last_flag: str = "--last") -> tuple[str, list[int]]:
    """(folder "latest" | "best", steps) to average: the last K, the named steps, or the K best
    by the run's validation metric; every mistake a UserError (last_flag: how the caller's
    option for `last` is spelled in messages)."""
    from s2s_jax.metrics import read_metrics

    if (last is not None) + (steps is not None) + (best is not None) != 1:
        raise UserError("average: give exactly one of --last K, --steps A,B,C and --best K")
    if best is not None:
        if best < 1:
            raise UserError(f"--best {best}: must be at least 1")
        kept = checkpoint_steps(workdir, "best")
        metric, mode = config_lib.best_metric_and_mode(config)
        value = {r["step"]: r[metric] for r in read_metrics(workdir) if r.get("kind") == "eval" and metric in r}
        ranked = sorted(kept, key=lambda s: (-value.get(s, float("-inf")) if mode == "max" else value.get(s, float("inf")), -s))
        if len(kept) < best:
            raise UserError(f"--best {best}: {workdir}/best keeps only {len(kept)} checkpoint(s) (steps {kept}); "
                            f"lower K, or keep more with train.keep_best")
        return "best", sorted(ranked[:best])
    if last is not None:
        if last < 1:
            raise UserError(f"{last_flag} {last}: must be at least 1")
        kept = checkpoint_steps(workdir, "latest")
        if len(kept) < last:
            raise UserError(f"{last_flag} {last}: {workdir}/checkpoints has only {len(kept)} checkpoint(s) (steps {kept}); "
                            f"lower K, or keep more with train.keep_checkpoints")
        return "latest", kept[-last:]
    kept = checkpoint_steps(workdir, "latest")
    missing = [s for s in steps if s not in kept]
    if missing or not steps or len(set(steps)) != len(steps):
        raise UserError(f"--steps {','.join(map(str, steps))}: {workdir}/checkpoints has steps {kept}; "
                        f"name each of them at most once")
    return "latest", sorted(steps)


# -- writing a folder whole -----------------------------------------------------------------

@contextlib.contextmanager
def atomic_folder(out: str, *, replace: bool = False, keep_existing=None):
    """Yields a new temporary folder beside `out` to fill; when the block ends normally the
    folder (given the modes the umask gives new files) is renamed to `out`, so `out` appears
    complete or not at all; when it raises, the temporary folder is removed.

    replace: remove an existing `out` first (the caller has checked that it may: --force, an
    empty folder). keep_existing(out) -> bool: when the rename fails because another process
    wrote `out` meanwhile and it passes this check, the new folder is dropped and that one kept.
    """
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        yield tmp
        _umask_modes(tmp)  # mkdtemp (and safetensors) create owner-only modes
        if replace and os.path.exists(out):
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:
            if keep_existing is None or not keep_existing(out):
                raise
            log.info("another process wrote %s first; using it", out)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask_modes(folder: str) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for root, _, names in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for n in names:
            os.chmod(os.path.join(root, n), 0o666 & ~umask)
