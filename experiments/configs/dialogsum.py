"""DialogSum (dialogue -> summary; 12,460 / 500 / 500, three references on test): summarisation
with the Multi30k recipe's model, scored by ROUGE.

Model: the recipe's bidirectional 2-layer LSTM encoder (256 in total), 2-layer 256 decoder,
general attention with input feeding, dropout 0.3; one joint 8000-piece unigram SentencePiece
vocabulary (shared ids: what copy attention needs). Sources are cut to 400 pieces and summaries
to 100 (data.truncate_*; counted in the start line), not dropped.

Commands (from the repository root; the corpus is not part of the repo):

    python -m s2s_jax train --config experiments/configs/dialogsum.py \
        --set data.dir=../shared/data/dialogsum --workdir runs/dialogsum
    python -m s2s_jax eval --workdir runs/dialogsum --best

`eval` scores test.tgt with test.ref1 and test.ref2 (found beside it): ROUGE-1/2/L/Lsum F1 by
rouge-score with Porter stemming, per dialogue the best of the three references, and the same
against test.tgt alone ("first_reference").

Hardware and result: not yet measured. Sized for <= 60 minutes of training on the 2-core CPU
(docs/results.md "Summarisation"); measure the steps/s of the first minutes and set
train.steps to fit. For scale (rouge-score, stemming, best of three references): the first 30
words of each dialogue score 32.6 / 10.4 / 25.4 (ROUGE-1/2/L, tests/test_metrics.py).
Data facts (SOURCE.md, whitespace words): train sources mean 131, p99 375, max 985; summaries
mean 23, p99 57, max 153.
"""

import dataclasses
from pathlib import Path

from s2s_jax.config import Config, load_module

recipes = load_module(Path(__file__).with_name("_recipes.py"))


def get_config() -> Config:
    base = recipes.text_summarization("dialogsum", max_source_length=400, max_target_length=100)
    return dataclasses.replace(
        base,
        # bfloat16 matmuls as multi30k_en_de (float32 on a CPU without native bfloat16).
        # Copy attention and coverage (issue 26) switch on here once they land:
        #   model=dataclasses.replace(base.model, dtype="bfloat16", copy_attention=True, coverage=True)
        model=dataclasses.replace(base.model, dtype="bfloat16"),
        # 500 validation dialogues, one reference each (valid has no ref* files)
        train=dataclasses.replace(base.train, steps=4000, eval_sentences=500),
        # beam 5, no repeated trigram (the recipe); decode.min_length is left at 0 until measured
        decode=base.decode,
    )
