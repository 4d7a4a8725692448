"""Multi30k English->German (29k training pairs, test2016): the classic small RNN-NMT benchmark.

Model: OpenNMT-py "brnn" style Luong attention — bidirectional 2-layer LSTM encoder (256 units
in total, 128 per direction), 2-layer 256-unit LSTM decoder, 256-dim embeddings, general
(bilinear) attention with input feeding, dropout 0.3; one joint 8000-piece unigram
SentencePiece vocabulary trained on the training split.

Command (from the repository root; the corpus is not part of the repo):

    python -m s2s_jax train --config experiments/configs/multi30k_en_de.py \
        --set data.dir=../shared/data/multi30k --workdir runs/multi30k_en_de

Hardware and result (measured, 2026-12-03): 18 min 31 s of training on a 2-core Intel Xeon VM
with AVX512-BF16 / AMX (bfloat16 compute: see the model section); test2016 beam 5, best
checkpoint: sacreBLEU 33.95, chrF 58.61 (nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0);
1.90x OpenNMT-py 3.5.1's sentences/s side by side (median of 3 pairs) (docs/data.md, "Batching"). In float32
the same batches gave 34.51 in about twice the time; curves in docs/results.md.
Preparing the data (normalisation + SentencePiece + TFDS array_record) takes ~11 s once.
Data facts (measured): train 29,000 pairs, mean 14.7 / 15.2 pieces (en / de), 99.9th
percentile 40 / 43, max 52 / 55; so max length 50 drops ~0.01% of pairs.
"""

import dataclasses
from pathlib import Path

from s2s_jax.config import Config, load_module

recipes = load_module(Path(__file__).with_name("_recipes.py"))


def get_config() -> Config:
    base = recipes.text_translation("multi30k_en_de", src_lang="en", tgt_lang="de", max_length=50)
    return dataclasses.replace(
        base,
        data=dataclasses.replace(
            base.data,
            # Auto buckets: 12 shapes chosen from the training lengths (padding efficiency source
            # 0.85, target 0.92 instead of 0.82 / 0.79 with the 5 hand-picked shapes of before).
            buckets=(),
            max_buckets=12,
        ),
        # bfloat16 matmuls, float32 parameters, optimizer state, softmax and loss: ~1.9x the
        # float32 step on a CPU with AMX / AVX512-BF16 (docs/speed.md, "bfloat16 on CPU");
        # set model.dtype=float32 on a CPU without native bfloat16 (e.g. AVX2-only)
        model=dataclasses.replace(base.model, dtype="bfloat16"),
        train=dataclasses.replace(base.train, steps=3000, eval_sentences=1014),  # 1014: the whole validation set
    )
