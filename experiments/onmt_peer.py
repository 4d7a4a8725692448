"""What the OpenNMT-py side-by-side scripts (peer_decode.py, peer_summary.py) share: where the
peer's commands are, the environment they run in, and its SentencePiece output as text."""

from __future__ import annotations

import os


def onmt_bin(name: str) -> str:
    """The path of OpenNMT-py's `name` command in $ONMT_VENV (../shared/peers/setup_onmt.sh)."""
    venv = os.environ.get("ONMT_VENV")
    if not venv:
        raise SystemExit("error: set ONMT_VENV to OpenNMT-py's venv (../shared/peers/setup_onmt.sh makes one)")
    return os.path.join(venv, "bin", name)


def onmt_env() -> dict:
    """The environment for OpenNMT-py 3.5.1 under torch >= 2.6: its checkpoints hold the vocab
    and an argparse Namespace, so loading them needs torch.load's old (weights_only=False) default."""
    return dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")


def pieces_to_text(line: str) -> str:
    """A line of space-separated SentencePiece pieces -> text (the meta space becomes a space)."""
    return "".join(line.split()).replace("\u2581", " ").strip()
