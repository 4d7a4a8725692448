"""The only argument parser: `python -m s2s_jax {train,translate,eval,prepare,benchmark,export}`.

User-caused problems (`UserError`: bad config value, bad path, misaligned data, corrupt
checkpoint...) print one line `error: ...` on stderr and exit with code 2 before any work.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from s2s_jax import config as config_lib
from s2s_jax.config import UserError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiment file (experiments/configs/*.py) or a config.json")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set train.steps=200 (repeatable)")


def _resolve_config(args) -> config_lib.Config:
    return config_lib.override(config_lib.load(args.config), args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m s2s_jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a model in --workdir")
    _config_args(p)
    p.add_argument("--workdir", required=True)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("prepare", help="train SentencePiece and write the tokenized dataset cache")
    _config_args(p)

    for name, help_ in (("translate", "translate lines from --input (default stdin) to stdout"),
                        ("eval", "translate a test split and score it (sacreBLEU, chrF)")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--workdir", required=True)
        p.add_argument("--beam", type=int, default=None, help="beam size (default: the run's decode.beam_size)")
        p.add_argument("--max-len", type=int, default=None, help="maximum output length (sets decode.max_len_a=0, max_len_b)")
        p.add_argument("--batch-size", type=int, default=None)
        p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
        p.add_argument("--best", action="store_true", help="use the best checkpoint by validation metric")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="decode.FIELD=VALUE")
        if name == "translate":
            p.add_argument("--input", default="-", help="input file (default: stdin)")
            p.add_argument("--output", default="-", help="output file (default: stdout)")
            p.add_argument("--nbest", type=int, default=1, help="write the n best, 'score<TAB>text' per line")
            p.add_argument("--attention-plot", default=None, metavar="FILE.png",
                           help="plot attention heatmaps of the first few sentences")
        else:
            p.add_argument("--split", default=None, help="split to score (default: data.test_split)")
            p.add_argument("--data-dir", default=None, help="override data.dir (text corpora)")
    # Verbs whose options live with their module (each defines add_arguments(p) and run(args)).
    p = sub.add_parser("benchmark", help="training throughput, compile time and FLOP utilisation (JSON)")
    _config_args(p)
    _module_hook("benchmark", "add_arguments", p)
    p = sub.add_parser("export", help="write a self-contained bundle (safetensors + jax.export programs)")
    _module_hook("export", "add_arguments", p)
    return parser


def _module_hook(module: str, name: str, *args):
    import importlib

    try:
        mod = importlib.import_module(f"s2s_jax.{module}")
    except ModuleNotFoundError as e:
        if e.name != f"s2s_jax.{module}":
            raise
        return None
    return getattr(mod, name)(*args)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("absl", "jax", "orbax", "tensorflow_datasets", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_train(args) -> int:
    config = _resolve_config(args)
    from s2s_jax.trainer import train_and_evaluate

    result = train_and_evaluate(config, args.workdir, progress=not args.no_progress)
    keys = ("loss", "perplexity", "exact_match", "bleu", "chrf")
    print(json.dumps({k: round(result[k], 4) for k in keys if k in result}))
    return 0


def _cmd_prepare(args) -> int:
    config = _resolve_config(args)
    from s2s_jax.data import prepare

    print(prepare(config))
    return 0


def _read_lines(path: str) -> list[str]:
    if path == "-":
        data = sys.stdin.buffer.read()
        name = "<stdin>"
    else:
        if not os.path.isfile(path):
            raise UserError(f"--input {path}: no such file")
        with open(path, "rb") as f:
            data = f.read()
        name = path
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{name}: invalid UTF-8 at line {line}; convert the file to UTF-8") from None
    # Split on newlines only (str.splitlines would also split on \f, \x1c, U+2028..., and the
    # output must have exactly one line per input line).
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _cmd_translate(args) -> int:
    from s2s_jax.translator import load_translator

    lines = _read_lines(args.input)
    translator = load_translator(args.workdir, step=args.step, best=args.best, overrides=args.overrides,
                                 max_len=args.max_len, batch_size=args.batch_size)
    beam = args.beam or translator.config.decode.beam_size
    if args.nbest > beam:
        raise UserError(f"--nbest {args.nbest} must be <= --beam {beam}")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if args.output != "-" and not os.path.isdir(out_dir):
        raise UserError(f"--output {args.output}: folder {out_dir} does not exist")
    t0 = time.perf_counter()
    results = translator.translate(lines, beam=beam, nbest=args.nbest)  # includes compilation
    elapsed = time.perf_counter() - t0
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    try:
        for hyps in results:
            if args.nbest == 1:
                out.write(hyps[0][0] + "\n")
            else:
                for text, score in hyps[:args.nbest]:
                    out.write(f"{score:.4f}\t{text}\n")
    finally:
        if out is not sys.stdout:
            out.close()
    n_tok = translator.last_stats.get("tokens", 0)  # output tokens of the best hypotheses
    print(f"translated {len(lines)} sentences in {elapsed:.2f}s: {len(lines) / max(elapsed, 1e-9):.1f} "
          f"sentences/s, {n_tok / max(elapsed, 1e-9):.0f} tokens/s (beam {beam})", file=sys.stderr)
    if args.attention_plot:
        from s2s_jax.translator import plot_attention
        plot_attention(translator, lines, args.attention_plot, beam=beam)
    return 0


def _cmd_eval(args) -> int:
    from s2s_jax.translator import evaluate_split

    result = evaluate_split(args)
    print(json.dumps(result, indent=2))
    return 0


COMMANDS = {"train": _cmd_train, "prepare": _cmd_prepare, "translate": _cmd_translate, "eval": _cmd_eval,
            "benchmark": lambda args: _module_hook("benchmark", "run", args),
            "export": lambda args: _module_hook("export", "run", args)}


def _enable_compilation_cache() -> None:
    """Persistent XLA compilation cache, so a second `translate`/`train` skips compilation.

    Set through the environment before jax is imported; S2S_JAX_COMPILATION_CACHE=0 turns it off,
    JAX_COMPILATION_CACHE_DIR moves it. Cached programs are the same programs: results stay
    bit-identical.
    """
    if os.environ.get("S2S_JAX_COMPILATION_CACHE", "1") == "0":
        return
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                          os.path.join(os.path.expanduser("~"), ".cache", "s2s_jax", "xla"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


HOST_ALLOCATOR = "default"  # "glibc-tuned" once _tune_host_allocator has run (recorded by the benchmark)


def _tune_host_allocator() -> None:
    """glibc malloc: one arena, no mmap for large blocks, no trimming — so XLA:CPU reuses memory.

    XLA:CPU allocates each execution's temporaries as one 100–200 MB block; glibc serves blocks
    that large with mmap and returns them with munmap, so every training step touched fresh pages:
    ~29k page faults per bench_cpu step, ~65 ms of kernel time in a ~280 ms step. Served from
    one heap that is never trimmed, the block's pages stay mapped from step to step (~1.3k faults
    per step). Must run before jax starts its threads. Linux/glibc only;
    S2S_JAX_HOST_ALLOCATOR=default leaves malloc as it is.
    """
    mode = os.environ.get("S2S_JAX_HOST_ALLOCATOR", "tuned")
    if mode not in ("tuned", "default"):
        raise UserError(f"environment variable S2S_JAX_HOST_ALLOCATOR={mode!r}: use 'tuned' (the default) or "
                        "'default' (glibc malloc as it comes)")
    if mode == "default" or not sys.platform.startswith("linux"):
        return
    import ctypes
    import platform
    if platform.libc_ver()[0] != "glibc":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
    if libc.mallopt(M_ARENA_MAX, 1) and libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30):
        global HOST_ALLOCATOR
        HOST_ALLOCATOR = "glibc-tuned"


def main(argv: list[str] | None = None) -> int:
    _enable_compilation_cache()  # before anything imports jax
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        _tune_host_allocator()  # before jax starts its threads
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
