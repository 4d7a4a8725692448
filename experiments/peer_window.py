"""Sentences per second over a steady-state step window, from either trainer's own log.

Side-by-side runs with OpenNMT-py (../shared/peers) compare sentences/s over the same window
(steps 101-300 by default: the first 100 hold startup and compilation):

    python experiments/peer_window.py RUN/metrics.jsonl            # s2s_jax train's metrics
    python experiments/peer_window.py $WORK/tok3000/train.log      # OpenNMT-py onmt_train's log

s2s_jax logs every `train.log_every` steps the sentences of the interval and their rate (time of
evaluations excluded); OpenNMT-py logs `Step N/...; ... sents: K; ...; T sec` (T since its start).
The window's edges must be logged steps. Prints one line, or a JSON object with --json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys


def s2s_jax_window(path: str, first: int, last: int) -> tuple[int, float]:
    sentences, seconds = 0, 0.0
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "train" and "sentences_per_sec" in r and first < r["step"] <= last:
                sentences += r["sentences"]
                seconds += r["sentences"] / r["sentences_per_sec"]
    return sentences, seconds


ONMT_STEP = re.compile(r"Step\s+(\d+)/\s*\d+;.*?sents:\s+(\d+);.*?;\s+(\d+) sec;")


def onmt_window(path: str, first: int, last: int) -> tuple[int, float]:
    rows = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = ONMT_STEP.search(line)
            if m:
                rows[int(m[1])] = (int(m[2]), int(m[3]))
    if first not in rows or last not in rows:
        raise SystemExit(f"{path}: steps {first} and {last} must both be logged (found {sorted(rows)})")
    sentences = sum(n for step, (n, _) in rows.items() if first < step <= last)
    return sentences, float(rows[last][1] - rows[first][1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("log", help="s2s_jax metrics.jsonl or OpenNMT-py train.log")
    p.add_argument("--first", type=int, default=100, help="window starts after this step (default 100)")
    p.add_argument("--last", type=int, default=300, help="window ends at this step (default 300)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    window = s2s_jax_window if a.log.endswith(".jsonl") else onmt_window
    try:
        sentences, seconds = window(a.log, a.first, a.last)
    except OSError as e:
        print(f"error: cannot read {a.log}: {e.strerror}", file=sys.stderr)
        return 2
    if not sentences or seconds <= 0:
        print(f"error: {a.log}: no training steps logged in {a.first + 1}-{a.last}", file=sys.stderr)
        return 2
    rate = sentences / seconds
    if a.json:
        print(json.dumps({"log": a.log, "steps": [a.first + 1, a.last], "sentences": sentences,
                          "seconds": round(seconds, 2), "sentences_per_s": round(rate, 1)}))
    else:
        print(f"{a.log}: steps {a.first + 1}-{a.last}: {sentences} sentences in {seconds:.1f} s = "
              f"{rate:.1f} sentences/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
