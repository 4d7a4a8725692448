"""The README's Python example runs as written; the package installs with pip and its
`s2s-jax` console script trains and translates outside the source tree; a wheel holds the
s2s_jax package only."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from tests._helpers import run_env
from tests.conftest import ROOT


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- api-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert m, "README has no api-example block"
    return m.group(1)


def test_readme_python_example_runs_as_written(tmp_path):
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    (tmp_path / "example.py").write_text(readme_example(), encoding="utf-8")
    env = dict(run_env(), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    float(lines[0])  # the final loss
    assert lines[1].startswith("[(") and lines[2].startswith("[(")  # two n-best lists of (text, score)
    assert (tmp_path / "bundles" / "api_tiny" / "bundle.json").is_file()


def test_api_score_equals_the_greedy_search_score(tiny_task_run):
    """Teacher-forced scoring of the model's own greedy output gives the search's log-prob."""
    import s2s_jax

    model = s2s_jax.load(str(tiny_task_run))
    lines = ["hello world", "abc", "quick brown fox", "x"]
    greedy = [hyps[0] for hyps in model.translate(lines, beam=1)]
    scores = model.score([(line, h.text) for line, h in zip(lines, greedy)])
    limit = model.translator.max_len_for(len(lines[0]))
    for line, h, s in zip(lines, greedy, scores):
        if len(h.tokens) + 1 < model.translator.max_len_for(len(line)):  # ended with EOS, not the limit
            assert s == pytest.approx(h.score, abs=1e-4), (line, h)
    assert limit > 0
    assert model.score([("", "abc")]) == [None]
    other = model.score([(lines[0], greedy[0].text + "zz")])[0]
    assert other < scores[0]  # an edited target is less likely than the greedy output


@pytest.mark.slow
def test_pip_install_console_script_and_wheel(tmp_path):
    """A fresh venv gets the package with pip (its dependencies come from this test environment
    through a .pth file; pip fetches only setuptools for the isolated build); `s2s-jax` then
    trains and translates from another folder."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "outer_env.pth"), "w") as f:  # jax, flax, ... of the test environment
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in run_env().items() if k != "PYTHONPATH"}
    pip = [str(py), "-m", "pip", "install", "--no-deps", "--quiet"]  # builds with setuptools in isolation
    proc = subprocess.run(pip + [str(ROOT)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(py), "-c", "import s2s_jax; print(s2s_jax.__file__)"], cwd=work,
                           capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert where.startswith(str(venv)), where  # the installed copy, not the source tree
    cli = venv / "bin" / "s2s-jax"
    proc = subprocess.run([str(cli), "train", "--config", str(ROOT / "experiments/configs/tiny.py"), "--workdir", "W",
                           "--no-progress", "--set", "train.steps=20", "--set", "train.eval_every=20",
                           "--set", "train.checkpoint_every=20"], cwd=work, capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([str(cli), "translate", "--workdir", "W"], cwd=work, input="hello\nabc\n",
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and len(proc.stdout.split("\n")) == 3, proc.stderr[-3000:]
    assert "usage: s2s-jax" in subprocess.run([str(cli), "--help"], capture_output=True, text=True, env=env).stdout

    # Editable install and the wheel.
    proc = subprocess.run(pip + ["-e", str(ROOT)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist = tmp_path / "dist"
    proc = subprocess.run([str(py), "-m", "pip", "wheel", "--no-deps", "-w", str(dist),
                           str(ROOT)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = dist.glob("s2s_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"s2s_jax", "s2s_jax-0.1.0.dist-info"}, tops
    assert "s2s_jax/inference/server.py" in names and "s2s_jax/vocab.py" in names
    meta = zipfile.ZipFile(wheel).read("s2s_jax-0.1.0.dist-info/METADATA").decode()
    assert "Requires-Python: >=3.11" in meta and "Requires-Dist: jax[cpu]" in meta and "Requires-Dist: uvicorn" in meta
    entry = zipfile.ZipFile(wheel).read("s2s_jax-0.1.0.dist-info/entry_points.txt").decode()
    assert "s2s-jax = s2s_jax.cli:main" in entry
