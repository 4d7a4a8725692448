"""Deterministic synthetic parallel corpus for scale measurements (never commit its output).

    python experiments/make_corpus.py --pairs 5000000 --out /tmp/corpus5m [--seed 0]

writes OUT/{train,valid,test}.{en,de} (line-aligned UTF-8, one sentence per line) that
`data.source="text"` reads (`--set data.dir=OUT`). Each synthetic pair joins 1-4 aligned pairs
(probabilities 0.4/0.3/0.2/0.1) drawn with replacement from the real sentences in ../shared/data:
Multi30k en-de and Tatoeba en-fr (train splits for train, valid/test splits for valid/test), so
the source side is English and the target side German or French text, with a length
distribution (mean ~2 real sentences) closer to WMT's than either corpus alone. The same
--pairs/--seed give the same bytes; the output is written in blocks (bounded memory).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir, "shared", "data")
# (folder, source suffix, target suffix) of the real corpora the sentences come from.
CORPORA = (("multi30k", "en", "de"), ("tatoeba_fra_eng", "en", "fr"))
JOIN_WEIGHTS = (0.4, 0.3, 0.2, 0.1)  # P(1), P(2), P(3), P(4) real pairs per synthetic pair
BLOCK = 100_000


def load_pool(split: str, shared: str = SHARED) -> tuple[list[str], list[str]]:
    """Aligned (source, target) sentences of `split` from every corpus; pairs with an empty side
    are left out, so every synthetic line is non-empty."""
    src, tgt = [], []
    for folder, s, t in CORPORA:
        with open(os.path.join(shared, folder, f"{split}.{s}"), encoding="utf-8") as fs, \
                open(os.path.join(shared, folder, f"{split}.{t}"), encoding="utf-8") as ft:
            a, b = fs.read().split("\n"), ft.read().split("\n")
        if a and a[-1] == "" and b and b[-1] == "":
            a, b = a[:-1], b[:-1]
        if len(a) != len(b):
            raise SystemExit(f"{folder}/{split}: {len(a)} vs {len(b)} lines; the shared corpus is not aligned")
        for x, y in zip(a, b):
            x, y = x.strip(), y.strip()
            if x and y:
                src.append(x)
                tgt.append(y)
    return src, tgt


def generate(pool: tuple[list[str], list[str]], n: int, rng: np.random.Generator):
    """Yields blocks of (source lines, target lines): n synthetic pairs in all."""
    src, tgt = pool
    weights = np.asarray(JOIN_WEIGHTS) / sum(JOIN_WEIGHTS)
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        k = rng.choice(len(weights), size=m, p=weights) + 1
        idx = rng.integers(0, len(src), size=int(k.sum()))
        ends = np.cumsum(k)
        out_s, out_t = [], []
        for a, b in zip(ends - k, ends):
            pick = idx[a:b]
            out_s.append(" ".join(src[i] for i in pick))
            out_t.append(" ".join(tgt[i] for i in pick))
        yield out_s, out_t


def write_split(folder: str, split: str, pool, n: int, rng, langs=("en", "de")) -> None:
    paths = [os.path.join(folder, f"{split}.{lang}") for lang in langs]
    tmp = [p + ".tmp" for p in paths]
    with open(tmp[0], "w", encoding="utf-8", newline="\n") as fs, open(tmp[1], "w", encoding="utf-8", newline="\n") as ft:
        for s, t in generate(pool, n, rng):
            fs.write("\n".join(s) + "\n")
            ft.write("\n".join(t) + "\n")
    for a, b in zip(tmp, paths):
        os.replace(a, b)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, required=True, help="training pairs to write")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-pairs", type=int, default=None, help="pairs in valid and in test "
                   "(default: 1 %% of --pairs, between 100 and 3000)")
    p.add_argument("--src-lang", default="en")
    p.add_argument("--tgt-lang", default="de", help="suffix of the target files (the text is German or French)")
    p.add_argument("--shared", default=SHARED, help="folder of the real corpora")
    args = p.parse_args(argv)
    if args.pairs < 1:
        print("--pairs must be >= 1", file=sys.stderr)
        return 2
    n_eval = args.eval_pairs if args.eval_pairs is not None else min(3000, max(100, args.pairs // 100))
    os.makedirs(args.out, exist_ok=True)
    for i, (split, n) in enumerate((("train", args.pairs), ("valid", n_eval), ("test", n_eval))):
        rng = np.random.default_rng([args.seed, i])  # one stream per split
        write_split(args.out, split, load_pool(split, args.shared), n, rng, (args.src_lang, args.tgt_lang))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
