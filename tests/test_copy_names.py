"""End to end (slow): the copy_names task, whose test names never occur in training, trained with
a word vocabulary. With copy attention it reaches >= 95 % exact match on the test split (greedy),
and `translate --format jsonl` says which output words were copied and from where; without copy
attention the names come out as <unk> and it fails. experiments/configs/copy_names.py, 300 steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from _helpers import REPO

CONFIG = os.path.join(REPO, "experiments", "configs", "copy_names.py")


def _train_and_eval(workdir, *overrides):
    sets = [a for o in overrides for a in ("--set", o)]
    base = [sys.executable, "-m", "s2s_jax"]
    subprocess.run(base + ["train", "--config", CONFIG, "--workdir", str(workdir), "--no-progress"] + sets,
                   check=True, cwd=REPO, capture_output=True)
    subprocess.run(base + ["eval", "--workdir", str(workdir)], check=True, cwd=REPO, capture_output=True)
    with open(os.path.join(workdir, "eval_test_beam1.json")) as f:
        return json.load(f)["exact_match"]


@pytest.mark.slow
@pytest.mark.extended
def test_copy_names_needs_copy_attention(tmp_path):
    assert _train_and_eval(tmp_path / "copy") >= 0.95
    lines = tmp_path / "in.txt"
    lines.write_text("yesterday Quillamonk told Zebrostan about the new plan .\n")
    out = subprocess.run([sys.executable, "-m", "s2s_jax", "translate", "--workdir", str(tmp_path / "copy"),
                          "--input", str(lines), "--format", "jsonl"], check=True, cwd=REPO, capture_output=True,
                         text=True).stdout
    hyp = json.loads(out.splitlines()[0])["hypotheses"][0]
    assert hyp["text"] == "Quillamonk informed Zebrostan"
    assert [(c["index"], c["word"], c["source_positions"]) for c in hyp["copied"]] == [
        (0, "Quillamonk", [1]), (2, "Zebrostan", [3])]
    assert _train_and_eval(tmp_path / "nocopy", "model.copy_attention=false") <= 0.05


@pytest.mark.slow
@pytest.mark.extended
def test_served_copy_model_writes_the_copied_names(tmp_path):
    """The server (streaming decoder, greedy and beam) answers a copy-attention run as translate does."""
    from test_server import serve

    run = tmp_path / "copy"
    subprocess.run([sys.executable, "-m", "s2s_jax", "train", "--config", CONFIG, "--workdir", str(run),
                    "--no-progress", "--set", "train.steps=150"], check=True, cwd=REPO, capture_output=True)
    from s2s_jax.inference.runs import load_translator

    lines = ["yesterday Quillamonk told Zebrostan about the new plan .", "the award went to Ann , said Bob ."]
    translator = load_translator(str(run))
    with serve("--workdir", run) as client:
        for beam in (1, 3):
            expected = [hyps[0][0] for hyps in translator.translate(lines, beam=beam)]
            assert any("Zebrostan" in e or "Bob" in e for e in expected)
            r = client.post("/translate", json={"text": lines, "beam": beam})
            assert r.status_code == 200, r.text
            assert [g["text"] for g in r.json()["translations"]] == expected
