"""Where a beam step's time goes when a trained run translates a file (issue #25's profile).

    python experiments/profile_beam.py --workdir RUN --data ../shared/data/multi30k/test.en \
        [--beam 5] [--best] [--sentences 1000] [--rounds 3] [--set decode.FIELD=VALUE ...] [--json OUT]

1. The whole `Translator.translate_ids` of the file (text already encoded), warm: median of
   --rounds; then one round with every encode/decode call blocked and timed (so host time =
   whole - encode - decode calls), and one counting the slot loop's passes (a debug callback in
   the step function; not timed).
2. One decoding pass taken apart, each part jitted alone on the shapes of that run (P slots of
   K beams = the Translator's rows, S = its padded source length, V the target vocabulary),
   with inputs from real sentences of the file: the step function (decoder cell + attention +
   output projection), the cell + attention alone, attention alone, the output projection, a
   log-softmax over [P*K, V] (for scale: the search never stores one), the token selection
   (`top_extensions`), the beam's whole `advance` (selection + length penalty + finished/alive
   bookkeeping), and a whole engine pass (step + advance + reorder + start/retire).

Parts are timed alone (medians of --iters calls), so they do not add up exactly to the pass
time inside the loop; "in the loop" = decode time / passes. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a trained run")
    p.add_argument("--data", required=True, help="source text file, one sentence per line")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--best", action="store_true", help="the best checkpoint (default: latest)")
    p.add_argument("--sentences", type=int, default=None, help="first N lines only")
    p.add_argument("--batch-size", type=int, default=None, help="decode.batch_size (slots)")
    p.add_argument("--rounds", type=int, default=3, help="timed whole-file rounds (median)")
    p.add_argument("--iters", type=int, default=20, help="calls per part timing (median)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="decode.FIELD=VALUE")
    p.add_argument("--json", default=None, help="also write the numbers here")
    return p.parse_args(argv)


def median_time(fn, *args, iters: int) -> float:
    """Median seconds of fn(*args) (jitted; compiled by a first call), blocking on the result."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def whole_file(translator, sources, beam: int, rounds: int) -> dict:
    """Warm whole-file decode time, then the blocked per-call times and the loop passes."""
    from s2s_jax.inference import translator as translator_lib

    translator.translate_ids(sources, beam=beam)  # compile
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        translator.translate_ids(sources, beam=beam)
        times.append(time.perf_counter() - start)
    stats = dict(translator.last_stats)
    calls = _blocked_calls(translator, sources, beam)
    translator_lib._DECODERS.clear()
    passes = _count_passes(translator, sources, beam)
    translator_lib._DECODERS.clear()
    total = statistics.median(times)
    return {"seconds": total, "sentences": len(sources), "tokens": stats["tokens"], "passes": passes,
            "encode_seconds": calls["encode"], "decode_seconds": calls["decode"],
            "host_seconds": max(total - calls["encode"] - calls["decode"], 0.0)}


def _blocked_calls(translator, sources, beam: int) -> dict:
    import jax

    spent = {"encode": 0.0, "decode": 0.0}
    jitted = translator._jitted

    def timed(*key):
        fn = jitted(*key)
        kind = "encode" if key[0] == "encode" else "decode"

        def call(*args):
            start = time.perf_counter()
            out = jax.block_until_ready(fn(*args))
            spent[kind] += time.perf_counter() - start
            return out
        return call

    translator._jitted = timed
    try:
        translator.translate_ids(sources, beam=beam)
    finally:
        del translator._jitted
    return spent


class _Counting:
    """The translator's model with a step function that counts the loop's passes."""

    def __init__(self, model, counter: list):
        self._model, self._counter = model, counter

    def __getattr__(self, name):
        return getattr(self._model, name)

    def step_fn(self, params, **kwargs):
        import jax

        inner = self._model.step_fn(params, **kwargs)
        counter = self._counter

        def step(tokens, state, context):
            out = inner(tokens, state, context)
            jax.debug.callback(lambda: counter.append(1))
            return out
        return step


def _count_passes(translator, sources, beam: int) -> int:
    counter: list = []
    model = translator.model
    translator.model = _Counting(model, counter)
    try:
        translator.translate_ids(sources, beam=beam)
    finally:
        translator.model = model
    return len(counter)


def pass_parts(translator, sources, beam: int, iters: int) -> tuple[dict, dict]:
    """Each part of one decoding pass, timed alone on the run's shapes -> (seconds, shapes)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from s2s_jax import decoding
    from s2s_jax.decoding import engine as engine_lib
    from s2s_jax.decoding.state import Loop, Queue, Slots
    from s2s_jax.inference.adapter import CONTEXT_KEYS
    from s2s_jax.inference.lengths import LENGTH_MULTIPLE, round_up
    from s2s_jax.inference.translator import _use_input_table, search_settings

    model, params, config = translator.model, translator.params, translator.config
    P = min(config.decode.batch_size, len(sources))
    lengths = np.asarray([len(s) for s in sources])
    S = round_up(int(lengths.max()), LENGTH_MULTIPLE)
    max_len = int(translator.max_len_for(S))
    order = np.argsort(-lengths, kind="stable")[:P]
    src = np.zeros((P, S), np.int32)
    for r, i in enumerate(order):
        src[r, :lengths[i]] = sources[i]
    src_len = jnp.asarray(lengths[order], jnp.int32)
    encode = jax.jit(model.encode)
    cache = encode(params, src, src_len)
    seconds = {"encoder (one batch of P)": median_time(encode, params, src, src_len, iters=iters)}
    Q = len(sources)
    table = model.projection_table(params) if _use_input_table(Q, beam, max_len, model.target_vocab_size) else None
    step_fn = model.step_fn(params, table=table, attention=False)
    settings = search_settings(config, model, beam_size=beam, nbest=1, max_len=max_len,
                               ignore_ids=translator.ignore_ids)
    strategy = decoding.make_strategy(settings, vocab_size=model.target_vocab_size, source_len=None)
    K = strategy.num_beams
    context = {k: cache[k] for k in CONTEXT_KEYS}
    rows = engine_lib.tile_rows(cache["state"], K)
    tokens = jnp.full((P * K,), settings.bos_id, jnp.int32)
    step = jax.jit(step_fn)
    logits, _, _ = step(tokens, rows, context)
    seconds["step function (cell + attention + output projection)"] = median_time(step, tokens, rows, context,
                                                                                  iters=iters)
    # With decode.shortlist the step scores the union of the file's candidates (one queue of
    # the Translator's when the file fits in one), so its projection is timed over those too.
    vocab_ids = None if translator.shortlist is None else jnp.asarray(translator._vocab_ids(sources, []))
    seconds.update(_model_parts(model, params, table, tokens, rows, context, iters, vocab_ids))
    seconds["log-softmax over [P*K, V] (for scale)"] = median_time(
        jax.jit(lambda x: jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)), logits, iters=iters)
    search = strategy.fresh(P)
    limits = jnp.full((P,), max_len, jnp.int32)
    if K > 1 and not settings.greedy:
        select = jax.jit(functools.partial(settings.kernels.top_extensions, eos_id=settings.eos_id,
                                           num_candidates=strategy.num_candidates))
        force = jnp.zeros((P,), bool)
        seconds["token selection (top_extensions)"] = median_time(
            select, search.alive_log_probs, logits.reshape(P, K, -1), force, iters=iters)
    else:
        select = jax.jit(functools.partial(settings.kernels.best_token, eos_id=settings.eos_id))
        seconds["token selection (best_token)"] = median_time(select, logits, jnp.zeros((P,), bool), iters=iters)
    advance = jax.jit(lambda s, x, lim: strategy.advance(s, x, None, lim, None))
    seconds["advance (selection + penalties + bookkeeping)"] = median_time(advance, search, logits, limits,
                                                                         iters=iters)
    engine = engine_lib.Engine(strategy, num_results=P, refill=max(1, P // 8), slot_context=True)
    slots = Slots(search=search, rows=rows, context=context, limits=limits, source_lengths=src_len,
                  sentence=jnp.arange(P, dtype=jnp.int32))
    queue = Queue(state=cache["state"], context=context, limits=limits, source_lengths=src_len,
                  tail=jnp.asarray(P, jnp.int32))
    results, done = engine_lib.empty_results(engine)
    loop = Loop(slots=slots, step=jnp.zeros((), jnp.int32), head=jnp.asarray(P, jnp.int32), results=results,
                done=done)
    one_pass = jax.jit(lambda lp: engine_lib._one_pass(engine, step_fn, queue, lp))
    seconds["engine pass (start + step + advance + reorder + retire)"] = median_time(one_pass, loop, iters=iters)
    shapes = {"P": P, "K": K, "rows": P * K, "S": S, "V": int(logits.shape[-1]), "max_len": max_len,
              "input_table": table is not None, "compute_dtype": str(model.config.dtype)
              if hasattr(model, "config") else "?"}
    return seconds, shapes


def _model_parts(model, params, table, tokens, rows, context, iters: int, vocab_ids=None) -> dict:
    """Decoder cell + attention, attention alone and the output projection, each jitted alone."""
    import jax
    import jax.numpy as jnp

    from s2s_jax.model import Seq2Seq
    from s2s_jax.model.attention import attend
    from s2s_jax.model.decoder import _attention_params

    module = getattr(model, "module", None)
    if module is None:  # an ensemble: no single module to take apart
        return {}
    variables = {"params": params}

    def cell_and_attention(m, tokens, state, context):
        projected = None if table is None else jnp.take(table, tokens, axis=0)
        embedded = None if table is not None else jnp.take(m.target_embedding, tokens, axis=0)
        return m.decoder.step(embedded, state, context["memory"], context["keys"], context["mask"],
                                   projected=projected)

    decoder = jax.jit(lambda t, s, c: module.apply(variables, t, s, c, method=cell_and_attention))
    hidden, _, _ = decoder(tokens, rows, context)
    out = {"  decoder cell + attention": median_time(decoder, tokens, rows, context, iters=iters)}
    cfg = module.config
    if cfg.attention != "none":
        P, H = context["memory"].shape[0], hidden.shape[-1]
        weights = module.apply(variables, method=lambda m: _attention_params(m.decoder._prepared()))
        query = hidden.reshape(P, -1, H)
        attention = jax.jit(lambda q, c: attend(weights, cfg.attention, q, c["keys"], c["memory"], c["mask"],
                                                jnp.dtype(cfg.dtype)))
        out["    of which attention (K queries per sentence)"] = median_time(attention, query, context, iters=iters)
    project = jax.jit(lambda h: module.apply(variables, h, method=Seq2Seq.logits))
    out["  output projection [P*K, H] x [H, V]"] = median_time(project, hidden, iters=iters)
    if vocab_ids is not None:
        shortlisted = jax.jit(lambda h, ids: module.apply(
            variables, h, ids, method=lambda m, h, ids: m.project(h, *m.candidate_output_weights(ids))))
        out[f"  output projection over the shortlist [P*K, H] x [H, C={int(vocab_ids.shape[0])}] (timed with its weight "
            "gather, which decoding does once per call)"] = median_time(shortlisted, hidden, vocab_ids, iters=iters)
    return out


def report(whole: dict, seconds: dict, shapes: dict, beam: int) -> str:
    per_pass = whole["decode_seconds"] / max(whole["passes"], 1)
    lines = [f"beam {beam}: {whole['sentences']} sentences in {whole['seconds']:.3f} s warm "
             f"({whole['sentences'] / whole['seconds']:.1f} sentences/s, {whole['tokens'] / whole['seconds']:.0f} "
             f"output tokens/s)",
             f"  encode calls {whole['encode_seconds']:.3f} s, decode calls {whole['decode_seconds']:.3f} s, host "
             f"(tokenised input -> dispatch -> results) {whole['host_seconds']:.3f} s (calls blocked and timed)",
             f"  slot loop: {whole['passes']} passes, {per_pass * 1e3:.2f} ms per pass in the loop; slots busy >= "
             f"{whole['tokens'] / max(whole['passes'] * shapes['P'], 1):.0%} of slot-passes (output tokens / "
             "(passes x P))",
             f"  shapes: {json.dumps(shapes)}", "",
             "| part (jitted alone) | ms | % of a pass in the loop |", "| --- | ---: | ---: |"]
    for name, s in seconds.items():
        lines.append(f"| {name} | {s * 1e3:.3f} | {s / per_pass:.0%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from s2s_jax.inference.runs import load_run

    run = load_run(args.workdir, best=args.best)
    translator = run.translator(args.overrides, batch_size=args.batch_size)
    with open(args.data, encoding="utf-8") as f:
        lines = f.read().splitlines()[:args.sentences]
    sources = [s for s in translator.encode_lines(lines) if s]
    whole = whole_file(translator, sources, args.beam, args.rounds)
    seconds, shapes = pass_parts(translator, sources, args.beam, args.iters)
    print(report(whole, seconds, shapes, args.beam))
    if args.json:
        Path(args.json).write_text(json.dumps({"whole": whole, "parts_seconds": seconds, "shapes": shapes,
                                               "beam": args.beam, "workdir": args.workdir, "data": args.data},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
