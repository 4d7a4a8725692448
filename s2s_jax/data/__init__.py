"""s2s_jax data layer: sources -> prepare (SentencePiece + TFDS array_record) -> Grain loader.

Public API (the trainer, CLI and export are written against these names):

    DataError                         bad input data (a UserError: one sentence, file, fix)
    build_data(config, workdir=None, *, process_index=0, process_count=1, batch_multiple=1) -> Data
    Data.source_vocab / target_vocab  encode / decode / pieces / vocab_size / to_json
    Data.stats                        counts (examples per split, dropped by reason, batches...)
    Data.train_batches(state=None)    infinite iterator with get_state() -> {"epoch", "batch"}
    Data.eval_batches(split, limit)   list of Batch dicts (fixed bucket shapes, "index")
    Data.eval_examples(split, limit)  [(source_text, target_text)] in corpus order
    Data.truncated                    {split: {"source", "target": pairs cut by data.truncate_*}}
    truncate_sources(data_config, ids) sources cut to data.truncate_source (decoding)
    Batch, MODEL_FIELDS, model_inputs the batch's fields and the ones the model gets
    normalize(text, form)             the text normalisation used everywhere
    prepare(config) -> folder | None  prepare (cached) without building a loader
    loader_throughput(config, seconds) target tokens/s of the train iterator

Modules, one concern each: `batch` (the Batch definition), `corpus` (Data and build_data; the
batch plan, built once), `pipeline` (buckets, rows, epoch plans, the Grain loader), `preprocess`
(prepare: streaming, SentencePiece, shards) with `sources`, `records`, `cache`, `workers`,
`text` and `tokenizer`; `tasks` (the built-in generated tasks); `throughput`.
This package never imports TensorFlow or JAX.
"""

from __future__ import annotations

from s2s_jax.data.batch import FIELDS, MODEL_FIELDS, Batch, model_inputs
from s2s_jax.data.corpus import Data, build_data, truncate_sources
from s2s_jax.data.errors import DataError
from s2s_jax.data.preprocess import prepare
from s2s_jax.data.throughput import loader_throughput
from s2s_jax.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID, CharVocab, normalize

__all__ = ["DataError", "build_data", "Data", "Batch", "FIELDS", "MODEL_FIELDS", "model_inputs", "normalize",
           "prepare", "loader_throughput", "truncate_sources", "PAD_ID", "BOS_ID", "EOS_ID", "UNK_ID", "CharVocab"]
