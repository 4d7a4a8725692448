"""The only argument parser: `python -m s2s_jax {train,translate,eval,serve,prepare,benchmark,export,shortlist}`.

Also the `s2s-jax` console script (pyproject.toml).

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
from s2s_jax import runtime
from s2s_jax.config import UserError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiment file (experiments/configs/*.py) or a config.json")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set train.steps=200 (repeatable)")


def _resolve_config(args) -> config_lib.Config:
    return config_lib.override(config_lib.load(args.config), args.overrides)


def build_parser() -> argparse.ArgumentParser:
    prog = "s2s-jax" if os.path.basename(sys.argv[0]) == "s2s-jax" else "python -m s2s_jax"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a model in --workdir")
    _config_args(p)
    p.add_argument("--workdir", required=True)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # shorthand for --set train.init_from=...: recorded in config.json like every field
    p.add_argument("--init-from", dest="overrides", action="append", metavar="RUN[@best|@STEP]",
                   type=lambda spec: f"train.init_from={spec}",
                   help="start a new run from another run's parameters (warm start; see docs/lifecycle.md)")

    p = sub.add_parser("prepare", help="train SentencePiece and write the tokenized dataset cache")
    _config_args(p)

    for name, help_ in (("translate", "translate lines from --input (default stdin, streamed) to stdout"),
                        ("eval", "translate a test set and score it: sacreBLEU, lowercased Moses-tokenised BLEU and chrF for "
                                 "a translation run, ROUGE for a summarisation run (data.task_kind); exact match")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--workdir", required=True, action="append",
                       help="the trained run; give several (same vocabularies) to decode with their ensemble")
        p.add_argument("--weights", default=None, metavar="W1,W2,...",
                       help="ensemble weights, one per --workdir (default: equal)")
        _decode_args(p)
        if name == "translate":
            p.add_argument("--input", default="-", help="input file (default: stdin, translated as it arrives)")
            p.add_argument("--output", default="-", help="output file (default: stdout)")
            p.add_argument("--nbest", type=int, default=1,
                           help="write the n best per input line, as 'text<TAB>score' lines")
            p.add_argument("--format", choices=("text", "jsonl"), default="text",
                           help="jsonl: one JSON object per input line with source pieces and, per hypothesis, "
                                "text, score, tokens and the attention alignment (copy-attention models: also "
                                "'copied', the output tokens copied from the source and from which positions)")
            p.add_argument("--attention-plot", default=None, metavar="FILE.png",
                           help="plot attention heatmaps of the first few sentences")
        else:
            p.add_argument("--split", default=None, help="split of the run's corpus to score (default: data.test_split)")
            p.add_argument("--src", default=None, metavar="FILE", help="score this source file (with --ref) instead")
            p.add_argument("--ref", default=None, metavar="FILE", action="append",
                           help="reference of --src, line-aligned; give it several times for several references "
                                "(the first is the primary one). A text split's {split}.ref* files are found "
                                "without it")
            p.add_argument("--data-dir", default=None, help="override data.dir (text corpora)")

    p = sub.add_parser("average", help="write a run whose checkpoint averages checkpoints of another run")
    p.add_argument("--workdir", required=True, help="the trained run")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--last", type=int, default=None, metavar="K", help="the last K checkpoints")
    which.add_argument("--steps", default=None, metavar="A,B,C", help="these checkpoint steps")
    which.add_argument("--best", type=int, default=None, metavar="K", help="the K best checkpoints (best/)")
    p.add_argument("--out", required=True, help="the new run directory (must not exist, or be empty)")

    p = sub.add_parser("shortlist", help="build a run's vocabulary shortlist (decode.shortlist) from its training data")
    _shortlist_args(p)

    p = sub.add_parser("serve", help="HTTP translation server with dynamic batching (see inference/server.py)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--workdir", action="append",
                       help="a trained run; give several (same vocabularies) to serve their ensemble")
    which.add_argument("--bundle", help="an export bundle directory")
    p.add_argument("--weights", default=None, metavar="W1,W2,...",
                   help="ensemble weights, one per --workdir (default: equal)")
    _decode_args(p)
    _serve_args(p)
    p = sub.add_parser("benchmark", help="training throughput, compile time and FLOP utilisation (JSON)")
    _config_args(p)
    _benchmark_args(p)
    p = sub.add_parser("export", help="write a self-contained bundle (safetensors + jax.export programs)")
    _export_args(p)
    return parser


def _decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beam", type=int, default=None, help="beam size (default: the run's decode.beam_size)")
    p.add_argument("--max-len", type=int, default=None, help="maximum output length (sets decode.max_len_a=0, max_len_b)")
    p.add_argument("--batch-size", type=int, default=None, help="sentences decoded at once (decode.batch_size)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--best", action="store_true", help="use the best checkpoint by validation metric")
    p.add_argument("--average-last", type=int, default=None, metavar="K",
                   help="average the parameters of the last K checkpoints")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="decode.FIELD=VALUE")
    controls = p.add_argument_group("decoding controls (each sets a decode.* field; docs/lifecycle.md)")
    for flag, field, kind, text in _DECODE_CONTROLS:
        extra = {"nargs": "+"} if field == "ignore_when_blocking" else ({"nargs": 0} if kind is bool else {"type": kind})
        if kind is not bool:
            extra["metavar"] = _CONTROL_METAVARS[field]
        controls.add_argument(flag, dest="overrides", action=_DecodeField, field=field, default=[], help=text, **extra)


# Decoding controls on the command line: flag, decode field, value type, help.
_DECODE_CONTROLS = (
    ("--min-length", "min_length", int, "fewest output tokens before EOS (greedy and beam)"),
    ("--block-ngram-repeat", "block_ngram_repeat", int, "no hypothesis repeats an N-gram (0: off)"),
    ("--ignore-when-blocking", "ignore_when_blocking", str,
     "target pieces whose N-grams may repeat (with --block-ngram-repeat)"),
    ("--length-penalty", "length_penalty_type", str, "ranking of finished beam hypotheses: wu, avg or none"),
    ("--alpha", "length_penalty", float, "GNMT length penalty alpha (with --length-penalty wu)"),
    ("--coverage-penalty", "coverage_penalty_type", str, "coverage penalty: wu or summary (with --beta)"),
    ("--beta", "coverage_penalty", float, "coverage penalty weight (0: off; beam search)"),
    ("--stepwise-penalty", "stepwise_penalty", bool, "also apply the coverage penalty at every beam step"),
    ("--max-len-ratio", "max_len_a", float, "maximum output length = RATIO * source length + decode.max_len_b"),
    ("--stop-rule", "stop_rule", str, "when a beam sentence stops: exact (no live hypothesis can still win) or "
     "current_length (none wins at its current length; fewer steps)"),
)


_CONTROL_METAVARS = {"min_length": "N", "block_ngram_repeat": "N", "ignore_when_blocking": "PIECE",
                     "length_penalty_type": "{wu,avg,none}", "length_penalty": "ALPHA",
                     "coverage_penalty_type": "{wu,summary}", "coverage_penalty": "BETA", "max_len_a": "RATIO",
                     "stop_rule": "{exact,current_length}"}


class _DecodeField(argparse.Action):
    """Appends `decode.FIELD=VALUE` to the --set overrides (so every decode command takes it)."""

    def __init__(self, *args, field: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.field = field

    def __call__(self, parser, namespace, values, option_string=None):
        if self.nargs == 0:
            value = "True"
        elif isinstance(values, list):
            value = repr(tuple(values))
        else:
            value = repr(values) if isinstance(values, str) else str(values)
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), f"decode.{self.field}={value}"])


def _shortlist_args(p: argparse.ArgumentParser) -> None:
    from s2s_jax.inference.shortlist import DEFAULT_TOP_K, ITERATIONS

    p.add_argument("--workdir", required=True, help="the trained run; writes WORKDIR/shortlist.npz")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                   help="target pieces kept per source piece, best first (decode.shortlist_top_k uses at most "
                        f"this many; default {DEFAULT_TOP_K})")
    p.add_argument("--iterations", type=int, default=ITERATIONS,
                   help=f"IBM Model 1 EM rounds (default {ITERATIONS})")
    p.add_argument("--data-dir", default=None, help="override data.dir (text corpora moved since training)")


def _serve_args(p: argparse.ArgumentParser) -> None:
    from s2s_jax.inference.server import API_KEY_ENV, Limits

    d = Limits()
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (0: any free port, printed at start)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' (default: the {API_KEY_ENV} environment variable)")
    p.add_argument("--max-sentences", type=int, default=d.max_sentences, help="sentences per request")
    p.add_argument("--max-chars", type=int, default=d.max_chars, help="characters per sentence")
    p.add_argument("--max-pending", type=int, default=d.max_pending, help="sentences queued before 503")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help="sentences merged into one decode call (0: 16 x decode.batch_size)")
    p.add_argument("--max-beam", type=int, default=d.max_beam, help="largest beam a request may ask for")
    p.add_argument("--batching", choices=("auto", "stream", "merge"), default="auto",
                   help="stream: sentences join the running decoder as slots free up (the default); "
                        "merge: one decode call per group of waiting requests (what auto picks for a bundle "
                        "of format version 1, which has no step programs)")
    p.add_argument("--chunk-steps", type=int, default=4,
                   help="stream batching: decoding steps between admissions of new sentences")
    p.add_argument("--graceful-seconds", type=float, default=60.0,
                   help="on SIGTERM, how long in-flight requests may take to finish")


def _benchmark_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-only", action="store_true",
                   help="measure the data loader (s2s_jax.data.loader_throughput) instead of the model")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (each runs every batch once per model)")
    p.add_argument("--batches", type=int, default=8, help="batches in the timed list (drawn by bucket frequency)")
    p.add_argument("--no-baseline", action="store_true", help="time only s2s_jax's model")
    p.add_argument("--output", default=None, help="also write the JSON record to this file")
    p.add_argument("--devices", default=None, metavar="1,2,4,8",
                   help="rerun s2s_jax's training measurement (train.parallel, default shard_map) with each "
                        "number of devices, one subprocess each: the first N GPUs/TPU chips on an accelerator "
                        "host, N simulated CPU devices on a CPU-only one; reports target tokens/s per count")
    p.add_argument("--sync", choices=("auto", "step", "round"), default="auto",
                   help="synchronise after every step (CPU default) or once per round (accelerator default)")
    p.add_argument("--device-count-child", action="store_true", help=argparse.SUPPRESS)


def _export_args(p: argparse.ArgumentParser) -> None:
    from s2s_jax.inference.export import DTYPES, PLATFORMS

    p.add_argument("--workdir", required=True, action="append",
                   help="the trained run; several (same vocabularies): an ensemble bundle")
    p.add_argument("--weights", default=None, metavar="W1,W2,...", help="ensemble weights (default: equal)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    which.add_argument("--best", action="store_true", help="the best checkpoint by validation metric")
    which.add_argument("--average-last", type=int, default=None, metavar="K",
                       help="average the parameters of the last K checkpoints")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the stored parameters")
    p.add_argument("--beam", type=int, action="append", default=None, metavar="K",
                   help="beam size of a beam-search program (repeatable; default: the run's "
                        "decode.beam_size, or 5 when that is 1)")
    p.add_argument("--platforms", default=",".join(PLATFORMS),
                   help="comma-separated platforms the programs are lowered for (default: cpu,cuda)")
    p.add_argument("--force", action="store_true", help="replace --out if it already exists")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("absl", "jax", "orbax", "tensorflow_datasets", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_train(args) -> int:
    config = _resolve_config(args)
    from s2s_jax.training import train_and_evaluate

    result = train_and_evaluate(config, args.workdir, progress=not args.no_progress)
    keys = ("loss", "perplexity", "exact_match", "bleu", "bleu_lc_tok", "chrf", "rouge1", "rouge2", "rougeL",
            "rougeLsum")
    print(json.dumps({k: round(result[k], 4) for k in keys if k in result}))
    return 0


def _cmd_prepare(args) -> int:
    config = _resolve_config(args)
    from s2s_jax.data import prepare

    print(prepare(config))
    return 0


def _decode_line(data: bytes, name: str, line_no: int) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{name}: invalid UTF-8 at line {line_no}; convert the input to UTF-8") from None
    # Split on newlines only (str.splitlines would also split on \f, \x1c, U+2028..., and the
    # output must have exactly one line per input line).
    return text[:-1] if text.endswith("\r") else text


def _read_lines(path: str) -> list[str]:
    """All lines of a file (checked to exist by the caller), checked for UTF-8 before any work."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    raw = data.split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    return [_decode_line(line, path, i + 1) for i, line in enumerate(raw)]


def _stdin_chunks(max_lines: int, wait: float = 0.05):
    """Lists of stdin lines as they arrive: each chunk is every line available (up to max_lines)
    once no new line came for `wait` seconds, so a pipe gives big chunks and a terminal gets its
    line translated right after Enter. The reader is a daemon thread: nothing waits for stdin
    to close once the consumer stops (e.g. `| head`)."""
    import queue
    import threading

    lines: queue.Queue = queue.Queue(maxsize=4 * max_lines)
    END = None

    def reader():
        try:
            for raw in iter(sys.stdin.buffer.readline, b""):
                lines.put(raw[:-1] if raw.endswith(b"\n") else raw)
        finally:
            lines.put(END)

    threading.Thread(target=reader, name="stdin-reader", daemon=True).start()
    line_no, done = 0, False
    while not done:
        first = lines.get()
        if first is END:
            return
        chunk = [first]
        while len(chunk) < max_lines:
            try:
                item = lines.get(timeout=wait)
            except queue.Empty:
                break
            if item is END:
                done = True
                break
            chunk.append(item)
        texts = []
        for raw in chunk:
            line_no += 1
            texts.append(_decode_line(raw, "<stdin>", line_no))
        yield texts


def _write_results(out, lines, results, *, nbest: int, fmt: str, translator) -> None:
    if fmt == "jsonl":
        for line, hyps in zip(lines, results):
            record = {"source": line, "source_tokens": translator.source_vocab.pieces(
                translator.encode_lines([line])[0]), "hypotheses": []}
            for h in hyps[:nbest]:
                record["hypotheses"].append({"text": h["text"], "score": round(float(h["score"]), 6),
                                             "tokens": h["tokens"],
                                             "attention": [[round(float(w), 5) for w in row] for row in h["attention"]]})
                if "copied" in h:  # copy attention: the output tokens copied from the source, and from where
                    record["hypotheses"][-1]["copied"] = h["copied"]
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    elif nbest == 1:
        out.writelines(hyps[0]["text"] + "\n" for hyps in results)
    else:  # OpenNMT-py's -with_score order: text, then the score
        out.writelines(f"{h['text']}\t{h['score']:.4f}\n" for hyps in results for h in hyps[:nbest])
    out.flush()


def _load_translator(args):
    from s2s_jax.inference.runs import load_translator

    choice = dict(step=args.step, best=args.best, average_last=args.average_last, overrides=args.overrides,
                  max_len=args.max_len, batch_size=args.batch_size)
    if len(args.workdir) > 1:
        from s2s_jax.inference.ensemble import load_ensemble_translator, parse_weights

        weights = parse_weights(args.weights, len(args.workdir))
        return load_ensemble_translator(args.workdir, weights=weights, **choice)
    if args.weights is not None:
        raise UserError("--weights: give several --workdir runs to decode with an ensemble")
    return load_translator(args.workdir[0], **choice)


def _cmd_translate(args) -> int:
    from s2s_jax.inference.translator import QUEUE_BATCHES

    if args.input != "-" and not os.path.isfile(args.input):
        raise UserError(f"--input {args.input}: no such file")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if args.output != "-" and not os.path.isdir(out_dir):
        raise UserError(f"--output {args.output}: folder {out_dir} does not exist")
    if args.nbest < 1:
        raise UserError(f"--nbest {args.nbest}: must be at least 1")
    if args.beam is not None and args.beam < 1:
        raise UserError(f"--beam {args.beam}: must be at least 1 (1 is greedy search)")
    translator = _load_translator(args)
    beam = args.beam or translator.config.decode.beam_size
    if args.nbest > beam:
        raise UserError(f"--nbest {args.nbest} must be <= --beam {beam}")
    if args.input == "-":
        chunks = _stdin_chunks(translator.config.decode.batch_size * QUEUE_BATCHES)
        plot_lines: list[str] = []
    else:
        lines = _read_lines(args.input)  # the whole file is checked before any work
        chunks = iter([lines])
        plot_lines = lines
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    n_lines = n_tok = 0
    compile_s = 0.0
    t0 = time.perf_counter()
    try:
        for chunk in chunks:
            results = translator.translate_full(chunk, beam=beam, nbest=args.nbest,
                                                attention=args.format == "jsonl")
            n_tok += translator.last_stats.get("tokens", 0)  # output tokens of the best hypotheses
            compile_s += translator.last_stats.get("compile_seconds", 0.0)
            n_lines += len(chunk)
            if args.attention_plot and len(plot_lines) < 4:
                plot_lines += chunk[:4]
            _write_results(out, chunk, results, nbest=args.nbest, fmt=args.format, translator=translator)
    finally:
        if out is not sys.stdout:
            out.close()
    elapsed = time.perf_counter() - t0  # includes compilation
    decoding = max(elapsed - compile_s, 1e-9)  # what a warm process (a server) spends
    print(f"translated {n_lines} sentences in {elapsed:.2f}s: {n_lines / max(elapsed, 1e-9):.1f} "
          f"sentences/s, {n_tok / max(elapsed, 1e-9):.0f} tokens/s (beam {beam}); without the "
          f"{compile_s:.2f}s of compilation: {n_lines / decoding:.1f} sentences/s, {n_tok / decoding:.0f} tokens/s",
          file=sys.stderr)
    if args.attention_plot:
        from s2s_jax.inference.translator import plot_attention
        plot_attention(translator, plot_lines, args.attention_plot, beam=beam)
    return 0


def _cmd_eval(args) -> int:
    from s2s_jax import rundir
    from s2s_jax.inference.evaluate import evaluate, test_set

    if args.beam is not None and args.beam < 1:
        raise UserError(f"--beam {args.beam}: must be at least 1 (1 is greedy search)")
    if args.src is not None and not os.path.isfile(args.src):
        raise UserError(f"--src {args.src}: no such file")
    for ref in args.ref or []:
        if not os.path.isfile(ref):
            raise UserError(f"--ref {ref}: no such file")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise UserError(f"--data-dir {args.data_dir}: no such folder")
    rundir.require_run(args.workdir[0])
    # the test set (its files read and checked for alignment) before any checkpoint is loaded
    test = test_set(rundir.read_config(args.workdir[0]), args.workdir[0], split=args.split, src_file=args.src,
                    ref_file=args.ref, data_dir=args.data_dir)
    translator = _load_translator(args)
    checkpoint = ("best" if args.best else f"average-last-{args.average_last}" if args.average_last
                  else args.step if args.step is not None else "latest")
    tag = f"_ensemble{len(args.workdir)}" if len(args.workdir) > 1 else ""
    result = evaluate(translator, args.workdir[0], beam=args.beam, checkpoint=checkpoint, tag=tag, test=test)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


def _cmd_average(args) -> int:
    from s2s_jax.inference.runs import average_run

    steps = None
    if args.steps is not None:
        try:
            steps = [int(x) for x in args.steps.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--steps {args.steps}: give checkpoint steps as integers, e.g. --steps 2000,2500,3000") from None
    print(json.dumps(average_run(args.workdir, args.out, last=args.last, steps=steps, best=args.best)))
    return 0


def _cmd_shortlist(args) -> int:
    from s2s_jax.inference.shortlist import build_for_run

    print(json.dumps(build_for_run(args.workdir, top_k=args.top_k, iterations=args.iterations,
                                   data_dir=args.data_dir)))
    return 0


def _cmd_serve(args) -> int:
    from s2s_jax.inference import server

    return server.run(args)


def _cmd_export(args) -> int:
    from s2s_jax.inference import export

    return export.run(args)


def _cmd_benchmark(args) -> int:
    from s2s_jax import benchmark

    return benchmark.run(args)


COMMANDS = {"average": _cmd_average, "train": _cmd_train, "prepare": _cmd_prepare, "translate": _cmd_translate, "eval": _cmd_eval,
            "serve": _cmd_serve, "benchmark": _cmd_benchmark, "export": _cmd_export, "shortlist": _cmd_shortlist}


def main(argv: list[str] | None = None) -> int:
    runtime.enable_compilation_cache()  # before anything imports jax
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        runtime.tune_host_allocator()  # before jax starts its threads
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return 0
