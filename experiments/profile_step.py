"""Time, trace or A/B one bucket shape's train step (the method behind docs/speed.md).

    # median step time of a (18, 18) bucket of the Multi30k model (rows from data.batch_tokens)
    python experiments/profile_step.py --config experiments/configs/multi30k_en_de.py --bucket 18 18 \
        --set data.dir=../shared/data/multi30k
    # + a trace: the costliest kernels with their op names, and every product's operand types
    python experiments/profile_step.py ... --trace /tmp/trace
    # in-process A/B of a module-level switch, compiled once per value, rounds alternating order
    python experiments/profile_step.py ... --ab s2s_jax.kernels.loss.BIG_ROWS --values "[256, 512]"

Batches are synthetic ids with lengths drawn from the corpus (`benchmark.make_batches`), so
`data.dir` only supplies lengths. XLA:CPU's per-kernel trace events need
`--xla_cpu_enable_xprof_traceme=true`, which --trace sets before jax starts.
"""

from __future__ import annotations

import argparse
import ast
import collections
import gzip
import importlib
import json
import os
import re
import statistics
import sys
import time
from functools import partial
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--bucket", nargs=2, type=int, required=True, metavar=("S", "T"),
                   help="source and target positions (T counts EOS)")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--trace", help="write a perfetto trace of two steps here and summarise it")
    p.add_argument("--top", type=int, default=30, help="kernels listed from the trace")
    p.add_argument("--ab", metavar="MODULE.ATTR", help="module-level switch read at trace time")
    p.add_argument("--values", help="Python list of the switch's values, e.g. '[False, True]'")
    a = p.parse_args(argv)
    if bool(a.ab) != bool(a.values):
        p.error("--ab and --values go together")
    return a


def summarise_trace(folder: str, hlo: str, steps: int, top: int) -> None:
    op_name = {}  # instruction -> JAX op name
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*?op_name=\"([^\"]+)\"", line)
        if m:
            op_name[m[1]] = m[2]
    calls = {}  # fusion -> the computation it calls
    for m in re.finditer(r"%([\w.\-]+) = [^\n]*? fusion\([^\n]*?calls=%([\w.\-]+)", hlo):
        calls[m[1]] = m[2]
    dots_in = collections.defaultdict(list)  # computation -> its dots' operand types
    current = None
    for line in hlo.splitlines():
        m = re.match(r"^%([\w.\-]+) \(", line)
        if m:
            current = m[1]
        d = re.search(r"%([\w.\-]+) = \w+\[[^\]]*\][^=]*? dot\(", line)
        if d and current:
            dots_in[current].append(d[1])
    from s2s_jax.benchmark import dot_operand_types

    products = dot_operand_types(hlo)
    path = sorted(Path(folder).rglob("*perfetto_trace.json.gz"))[-1]
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and e["name"] in op_name:
            total[e["name"]] += e["dur"]
            count[e["name"]] += 1
    print(f"kernel time per step (ms), {steps} steps traced; total {sum(total.values()) / steps / 1e3:.1f} ms "
          "(more than the step: two cores, concurrent kernels)")
    for name, us in total.most_common(top):
        types = [products[d] for d in dots_in.get(calls.get(name, ""), []) if d in products]
        types += [products[name]] if name in products else []
        shown = " ".join("x".join(t) for t in types)
        print(f"{us / steps / 1e3:8.2f} x{count[name] // steps:4d}  {name[:34]:34s} {shown:10s} {op_name[name][-80:]}")


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.trace:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import s2s_jax

    s2s_jax.setup()
    import jax

    from s2s_jax import benchmark
    from s2s_jax.training import steps
    from s2s_jax.train_state import create_state, make_model

    S, T = a.bucket
    config = s2s_jax.load_config(a.config, [f"data.buckets=[[{S},{T}]]", f"data.max_source_length={S}",
                                            f"data.max_target_length={T - 1}"] + a.set)
    batches = [jax.device_put(b) for b in benchmark.make_batches(config, a.batches)]
    rows = int(batches[0]["source"].shape[0])
    V = config.data.vocab_size
    model = make_model(config, V, V)
    values = ast.literal_eval(a.values) if a.ab else [None]
    if a.ab:
        module_name, attr = a.ab.rsplit(".", 1)
        module = importlib.import_module(module_name)
    compiled, states = [], []
    for v in values:
        if a.ab:
            setattr(module, attr, v)
            jax.clear_caches()
        fn = jax.jit(partial(steps.train_step, model=model, config=config), donate_argnums=0)
        state = create_state(config, model)
        t0 = time.perf_counter()
        compiled.append(fn.lower(state, batches[0]).compile())
        print(f"compiled {S}x{T} ({rows} rows){'' if v is None else f' {attr}={v!r}'} in {time.perf_counter() - t0:.1f} s")
        for b in batches:  # warm-up: first-run allocations
            state, _ = compiled[-1](state, b)
        states.append(jax.block_until_ready(state))
    times = [[] for _ in values]
    for r in range(a.rounds):
        for i in (range(len(values)) if r % 2 == 0 else reversed(range(len(values)))):
            t0 = time.perf_counter()
            for b in batches:
                states[i], metrics = compiled[i](states[i], b)
            jax.block_until_ready((states[i], metrics))
            times[i].append((time.perf_counter() - t0) / len(batches))
    for v, t in zip(values, times):
        label = "" if v is None else f"{attr}={v!r}: "
        print(f"{label}step {1e3 * statistics.median(t):.1f} ms median, {1e3 * min(t):.1f} min over {a.rounds} "
              f"rounds of {len(batches)} batches; {rows / statistics.median(t):.0f} rows/s")
    if a.ab:
        print("median ratio to the first value:", [round(statistics.median(times[0]) / statistics.median(t), 3)
                                                  for t in times])
    if a.trace:
        jax.profiler.start_trace(a.trace, create_perfetto_trace=True)
        state = states[-1]
        for b in batches[:2]:
            state, metrics = compiled[-1](state, b)
        jax.block_until_ready((state, metrics))
        jax.profiler.stop_trace()
        summarise_trace(a.trace, compiled[-1].as_text(), 2, a.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
