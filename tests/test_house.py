"""The house rules of issue 23, checked on the source tree (no jax, milliseconds).

Each rule gives every fact one home: the kernel set is an object chosen once (no set names
compared outside kernels/), the run directory's names live in rundir, the training wing, the
decoding engine and the server are made of small top-level functions.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "s2s_jax"

# Functions nested inside another function are allowed only as small pure helpers handed to a jax
# transform (scan/while/cond bodies, vmap'd closures, custom VJP rules): at most this many lines.
NESTED_MAX_LINES = 20
FUNCTION_MAX_LINES = 60


def _py_files(*parts: str):
    for part in parts:
        path = PKG / part
        yield from ([path] if path.suffix == ".py" else sorted(path.rglob("*.py")))


def _grep(pattern: str, files) -> list[str]:
    rx = re.compile(pattern)
    return [f"{f.relative_to(ROOT)}:{i}: {line.strip()}" for f in files
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if rx.search(line)]


def _outside(folder: str):
    return [f for f in PKG.rglob("*.py") if folder not in f.relative_to(PKG).parts[:1]]


def test_kernel_set_names_are_compared_only_inside_kernels():
    hits = _grep(r"kernels == |kernels != |kernels: str = ", _outside("kernels"))
    assert not hits, "kernel-set names compared or defaulted outside kernels/:\n" + "\n".join(hits)


def test_model_never_resolves_a_kernel_set():
    hits = _grep(r"resolve\(", list((PKG / "model").rglob("*.py")))
    assert not hits, "the model must receive a resolved KernelSet:\n" + "\n".join(hits)


def test_no_kernel_entry_point_has_a_default_set():
    """Every public function of kernels/ that takes the set takes it without a default."""
    bad = []
    for f in (PKG / "kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef):
                args = node.args.args + node.args.kwonlyargs
                defaults = ([None] * (len(node.args.args) - len(node.args.defaults)) + list(node.args.defaults)
                            + list(node.args.kw_defaults))
                for a, d in zip(args, defaults):
                    if a.arg in ("kernels", "kernel_set", "ks") and d is not None:
                        bad.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name}({a.arg}=...)")
    assert not bad, "\n".join(bad)


def _function_problems(files) -> list[str]:
    problems = []
    for f in files:
        tree = ast.parse(f.read_text(encoding="utf-8"))
        rel = f.relative_to(ROOT)

        def visit(node, depth):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = child.end_lineno - child.lineno + 1
                    if lines > FUNCTION_MAX_LINES:
                        problems.append(f"{rel}:{child.lineno} {child.name} is {lines} lines")
                    if depth > 0 and lines > NESTED_MAX_LINES:
                        problems.append(f"{rel}:{child.lineno} {child.name} is nested and {lines} lines")
                    visit(child, depth + 1)
                elif isinstance(child, ast.Nonlocal):
                    problems.append(f"{rel}:{child.lineno} nonlocal {', '.join(child.names)}")
                else:
                    visit(child, depth if not isinstance(child, ast.ClassDef) or depth == 0 else depth)
        visit(tree, 0)
    return problems


@pytest.mark.parametrize("part", ["training", "decoding", "inference/server.py"])
def test_small_functions(part):
    if not (PKG / part).exists():
        pytest.fail(f"s2s_jax/{part} does not exist yet")
    problems = _function_problems(_py_files(part))
    assert not problems, "\n".join(problems)


def test_run_directory_names_live_in_rundir():
    files = [f for f in PKG.rglob("*.py") if f.name != "rundir.py"]
    hits = _grep(r'"config\.json"|"checkpoints"|mkdtemp', files)
    assert not hits, "run-directory facts outside s2s_jax/rundir.py:\n" + "\n".join(hits)


def test_data_face_only_reexports():
    tree = ast.parse((PKG / "data" / "__init__.py").read_text(encoding="utf-8"))
    defs = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert not defs, f"data/__init__.py defines {defs}: move them to their own modules"


def test_no_local_imports_hiding_cycles():
    hits = _grep(r"import cycle", list(PKG.rglob("*.py")))
    assert not hits, "\n".join(hits)
