"""AESLC (e-mail body -> subject line; 14,436 / 1,960 / 1,906): summarisation with the Multi30k
recipe's model, scored by ROUGE.

Model and vocabulary as dialogsum.py (the recipe's 2x256 LSTM, general attention, joint
8000-piece SentencePiece). E-mail bodies are long-tailed (whitespace words: mean 118, p95 341,
p99 799, max 3,136): sources are cut to 400 pieces, subjects to 32 (data.truncate_*).

Commands (from the repository root; the corpus is not part of the repo):

    python -m s2s_jax train --config experiments/configs/aeslc.py \
        --set data.dir=../shared/data/aeslc --workdir runs/aeslc
    python -m s2s_jax eval --workdir runs/aeslc --best

`eval` scores against test.tgt (the original subject: the PEGASUS protocol, single reference;
reported as "first_reference") and, as the main figure, the best per e-mail of test.tgt and
the three human subjects test.ref1..3 (found beside it). rouge-score, Porter stemming.

Hardware and result: not yet measured. Sized for <= 60 minutes of training on the 2-core CPU;
measure the steps/s of the first minutes and set train.steps to fit. Published anchor (SOURCE.md):
PEGASUS-large 37.69 / 21.85 / 36.84 against the original subject.
"""

import dataclasses
from pathlib import Path

from s2s_jax.config import Config, load_module

recipes = load_module(Path(__file__).with_name("_recipes.py"))


def get_config() -> Config:
    base = recipes.text_summarization("aeslc", max_source_length=400, max_target_length=32)
    return dataclasses.replace(
        base,
        # bfloat16 matmuls as multi30k_en_de. Copy attention and coverage switch on here once they land:
        #   model=dataclasses.replace(base.model, dtype="bfloat16", copy_attention=True, coverage=True)
        model=dataclasses.replace(base.model, dtype="bfloat16"),
        # validation: the first 500 of 1,960 e-mails, against the original subject (valid.tgt)
        train=dataclasses.replace(base.train, steps=4000, eval_sentences=500),
        decode=base.decode,
    )
