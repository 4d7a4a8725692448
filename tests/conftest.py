"""Runs shared by the inference, server and packaging tests (trained once per session)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = next((p for p in (ROOT.parent / "shared", Path("/work/shared")) if (p / "data").is_dir()), ROOT.parent / "shared")
TATOEBA = SHARED / "data" / "tatoeba_fra_eng"


def run_cli(*args, timeout=600, **kwargs):
    from tests._helpers import run_env

    return subprocess.run([sys.executable, "-m", "s2s_jax", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=run_env(), **kwargs)


@pytest.fixture(scope="session")
def tiny_task_run(tmp_path_factory):
    """The tiny `reverse` model (character vocabulary), 40 steps."""
    workdir = tmp_path_factory.mktemp("tiny_task") / "run"
    proc = run_cli("train", "--config", "experiments/configs/tiny.py", "--workdir", str(workdir), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.fixture(scope="session")
def other_seed_run(tmp_path_factory):
    """A second tiny run (another seed, the same vocabulary): an ensemble's other member."""
    workdir = tmp_path_factory.mktemp("ensemble") / "seed1"
    proc = run_cli("train", "--config", "experiments/configs/tiny.py", "--workdir", str(workdir), "--no-progress",
                   "--set", "train.seed=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.fixture(scope="session")
def fr_en_corpus(tmp_path_factory):
    """French -> English from Tatoeba, as the raw files come (U+202F before '!' and '?', NBSP)."""
    if not TATOEBA.is_dir():
        pytest.skip(f"{TATOEBA} not found (../shared/data)")
    out = tmp_path_factory.mktemp("fr_en_corpus")
    for split, n in (("train", 4000), ("valid", 200), ("test", 200)):
        for lang in ("fr", "en"):
            lines = (TATOEBA / f"{split}.{lang}").read_text(encoding="utf-8").split("\n")
            stride = max(1, len(lines) // n)  # spread over the corpus: short and long sentences
            (out / f"{split}.{lang}").write_text("\n".join(lines[::stride][:n]) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def fr_en_run(tmp_path_factory, fr_en_corpus):
    """A small SentencePiece model trained on `fr_en_corpus` (NFKC normalisation), 60 steps."""
    root = tmp_path_factory.mktemp("fr_en")
    workdir = root / "run"
    sets = [f"data.dir={fr_en_corpus}", "data.src_lang=fr", "data.tgt_lang=en", "data.vocab_size=600",
            f"data.cache_dir={root / 'cache'}", "data.batch_tokens=800", "data.max_source_length=60",
            "data.max_target_length=60", "data.buckets=[[16,17],[32,33],[60,61]]",
            "model.source_embed_dim=32", "model.target_embed_dim=32",
            "model.hidden_dim=32", "model.encoder_layers=1", "model.decoder_layers=1", "train.steps=60",
            "train.eval_every=60", "train.eval_sentences=32", "train.checkpoint_every=30",
            "train.learning_rate=0.005", "decode.beam_size=3"]
    proc = run_cli("train", "--config", "experiments/configs/multi30k_en_de.py", "--workdir", str(workdir),
                   "--no-progress", *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir
