"""OpenNMT-py 3.5.1's copy-attention summarisation recipe on a line-aligned corpus, side by side.

The peer of an s2s_jax summarisation run (issue 26): same corpus, same SentencePiece pieces (the
s2s_jax run's own joint model, so both tools see identical inputs), same machine and sitting,
same training wall time. Uses ../shared/peers/onmt/summary_train.yaml.in (its recipe: brnn 1x512,
embeddings 128, mlp attention, copy attention reusing the attention, bridge, adagrad) and the
decoding its docs give (beam 5, -block_ngram_repeat 3, -min_length, -stepwise_penalty
-coverage_penalty summary -beta 5 -length_penalty wu -alpha 0.9). Scores with the same ROUGE as
`s2s-jax eval` (rouge-score, Porter stemming, maximum over the references per sentence).

    export ONMT_VENV=../peers-work/venv-onmt          # made by ../shared/peers/setup_onmt.sh
    python experiments/peer_summary.py prepare --data ../shared/data/dialogsum \
        --spm runs/dialogsum/vocab/spm.model --out ../peers-work/dialogsum
    python experiments/peer_summary.py train --out ../peers-work/dialogsum --minutes 60
    python experiments/peer_summary.py translate --out ../peers-work/dialogsum --min-length 10 \
        --data ../shared/data/dialogsum            # writes test.txt and rouge.json

Training stops at the wall-time budget (a timeout on onmt_train; checkpoints every 200 steps, the
last one is decoded). `python experiments/peer_window.py OUT/train.log --first 50 --last 250`
gives its sentences/s over a steady window.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.path.join(HERE, "..", "..", "shared", "peers", "onmt")
SPLITS = ("train", "valid", "test")

sys.path.insert(0, HERE)
from onmt_peer import onmt_bin, onmt_env, pieces_to_text  # noqa: E402


def prepare(a) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=a.spm)
    os.makedirs(os.path.join(a.out, "sp"), exist_ok=True)
    for split in SPLITS:
        for side in ("src", "tgt"):
            path = os.path.join(a.data, f"{split}.{side}")
            with open(path, encoding="utf-8") as f:
                lines = [line.rstrip("\n") for line in f]
            with open(os.path.join(a.out, "sp", f"{split}.{side}"), "w", encoding="utf-8") as f:
                for line in lines:
                    pieces = sp.encode(line, out_type=str)
                    if a.truncate_source and side == "src":
                        pieces = pieces[: a.truncate_source]
                    f.write(" ".join(pieces) + "\n")
    vocab_yaml = os.path.join(a.out, "vocab.yaml")
    with open(vocab_yaml, "w") as f:
        f.write(f"save_data: {a.out}/run\nsrc_vocab: {a.out}/vocab.shared\nshare_vocab: true\noverwrite: true\n"
                f"data:\n  corpus_1:\n    path_src: {a.out}/sp/train.src\n    path_tgt: {a.out}/sp/train.tgt\n")
    subprocess.run([onmt_bin("onmt_build_vocab"), "-config", vocab_yaml, "-n_sample", "-1", "-num_threads", "1"],
                   check=True)


def train(a) -> None:
    with open(os.path.join(PEERS, "summary_train.yaml.in"), encoding="utf-8") as f:
        template = f.read()
    config = (template.replace("@DATA@", os.path.join(a.out, "sp")).replace("@VOCAB@", f"{a.out}/vocab.shared")
              .replace("@OUT@", a.out).replace("@STEPS@", str(a.steps)))
    yaml = os.path.join(a.out, "train.yaml")
    with open(yaml, "w", encoding="utf-8") as f:
        f.write(config)
    env = onmt_env()
    start = time.time()
    with open(os.path.join(a.out, "train.log"), "w", encoding="utf-8") as log:
        try:
            subprocess.run([onmt_bin("onmt_train"), "-config", yaml], stdout=log, stderr=subprocess.STDOUT, env=env,
                           timeout=a.minutes * 60)
        except subprocess.TimeoutExpired:
            pass
    with open(os.path.join(a.out, "wall.json"), "w") as f:
        json.dump({"wall_s": round(time.time() - start, 1), "budget_minutes": a.minutes}, f)


def _last_checkpoint(out: str) -> str:
    found = sorted(glob.glob(os.path.join(out, "model_step_*.pt")),
                   key=lambda p: int(re.search(r"_(\d+)\.pt$", p)[1]))
    if not found:
        raise SystemExit(f"error: no checkpoint in {out}; train first")
    return found[-1]


def translate(a) -> None:
    ckpt = _last_checkpoint(a.out)
    pred = os.path.join(a.out, "test.sp")
    env = onmt_env()
    start = time.time()
    subprocess.run([onmt_bin("onmt_translate"), "-model", ckpt, "-src", os.path.join(a.out, "sp", "test.src"),
                    "-output", pred, "-beam_size", str(a.beam), "-batch_size", "16", "-max_length", str(a.max_length),
                    "-block_ngram_repeat", "3", "-min_length", str(a.min_length), "-stepwise_penalty",
                    "-coverage_penalty", "summary", "-beta", "5", "-length_penalty", "wu", "-alpha", "0.9",
                    "-report_time"], check=True, env=env)
    seconds = time.time() - start
    with open(pred, encoding="utf-8") as f:
        text = [pieces_to_text(line) for line in f]
    with open(os.path.join(a.out, "test.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(text) + "\n")
    refs = [os.path.join(a.data, "test.tgt")] + sorted(glob.glob(os.path.join(a.data, "test.ref*")))
    references = []
    for path in refs:
        with open(path, encoding="utf-8") as f:
            references.append([line.rstrip("\n") for line in f])
    sys.path.insert(0, os.path.join(HERE, ".."))
    from s2s_jax import metrics

    scores = metrics.rouge_scores(text, references)
    result = {k: round(v, 2) for k, v in scores.items() if isinstance(v, float)}
    result["rouge_signature"] = scores["rouge_signature"]
    result.update(checkpoint=os.path.basename(ckpt), references=[os.path.basename(p) for p in refs],
                  decode_seconds_with_load=round(seconds, 1), sentences=len(text))
    with open(os.path.join(a.out, "rouge.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--data", required=True)
    pp.add_argument("--spm", required=True, help="the s2s_jax run's joint SentencePiece model (RUN/vocab/spm.model)")
    pp.add_argument("--out", required=True)
    pp.add_argument("--truncate-source", type=int, default=400)
    pt = sub.add_parser("train")
    pt.add_argument("--out", required=True)
    pt.add_argument("--minutes", type=float, default=60)
    pt.add_argument("--steps", type=int, default=1000000)
    pr = sub.add_parser("translate")
    pr.add_argument("--out", required=True)
    pr.add_argument("--data", required=True)
    pr.add_argument("--beam", type=int, default=5)
    pr.add_argument("--min-length", type=int, default=10)
    pr.add_argument("--max-length", type=int, default=100)
    a = p.parse_args(argv)
    {"prepare": prepare, "train": train, "translate": translate}[a.verb](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
