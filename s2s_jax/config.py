"""Experiment configuration: frozen dataclasses with validation. Imports no jax.

A config is four sections (data, model, train, decode) plus a name. Experiment files in
`experiments/configs/*.py` expose `get_config() -> Config`; the CLI overrides any field with
`--set section.field=value` (values parsed as Python literals, falling back to strings).
Every problem a user can cause is raised as `ConfigError` naming the field and the fix; the CLI
turns it into one line on stderr and exit code 2. A field's choices (a `Literal` type) and range
(`positive`, `non_negative`, `probability`, `checked`) are declared at the field; rules between
fields are the `_check_*` functions.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from s2s_jax import kernels as kernel_sets


class UserError(Exception):
    """A problem the user caused and can fix (bad path, bad value, misaligned files...).

    The message is one sentence naming the file or field and what to do; the CLI prints it
    alone (no traceback) and exits with code 2, before any work starts.
    """


class ConfigError(UserError, ValueError):
    """A user-caused configuration problem; the message names the field and the fix."""


# model.kernels: "auto" or a kernel set's name (s2s_jax/kernels/: a new set adds its name to SETS)
KernelSetName = Literal[("auto",) + kernel_sets.SETS]


# What an evaluation computes (training.trainer.evaluate: metrics.scalars_from_sums and
# metrics.corpus_scores) and which direction is better: the choices of train.best_metric.
EVAL_METRICS = {"loss": "min", "nll": "min", "perplexity": "min", "accuracy": "max",
                "exact_match": "max", "bleu": "max", "chrf": "max", "bleu_lc_tok": "max",
                "rouge1": "max", "rouge2": "max", "rougeL": "max", "rougeLsum": "max"}
# The corpus scores each data.task_kind adds to those every evaluation has (loss, nll,
# perplexity, accuracy, exact_match), and the one auto picks as train.best_metric (first).
KIND_METRICS = {"translation": ("bleu", "bleu_lc_tok", "chrf"),
                "summarization": ("rougeL", "rouge1", "rouge2", "rougeLsum")}


# A field's own rules are declared where the field is: its choices as a `Literal[...]` type (or,
# for a field whose choices are another table's keys, `choice(...)` metadata that may word its own
# error), its range as `positive`, `non_negative`, `probability` or `checked` metadata ("rules":
# what must hold, and the words "must be ..." of the error). `_check_fields` reads them for every
# field; rules between fields are the named `_check_*` functions below.
class _Rule(typing.NamedTuple):
    holds: typing.Callable[[Any], bool]
    says: str  # the error after "section.field=value: "


def _says(text: str, why: str) -> str:
    return f"{text} ({why})" if why else text


def checked(default: Any, *rules: _Rule) -> Any:
    """A field whose value must satisfy `rules`, checked in order."""
    return field(default=default, metadata={"rules": rules})


def choice(*options: str, default: str, refuse: typing.Callable[[str, Any], str] | None = None) -> Any:
    """A str field that takes one of `options` (where a `Literal` cannot name them: another table's
    keys); `refuse(where, value)` words the error if given."""
    return field(default=default, metadata={"choices": options, "refuse": refuse})


def positive(default: Any, why: str = "") -> Any:
    """A number > 0; `why` (a hint or the fix) follows the error in parentheses."""
    return checked(default, _Rule(lambda v: v > 0, _says("must be > 0", why)))


def non_negative(default: Any, why: str = "") -> Any:
    """A number >= 0; `why` as for `positive`."""
    return checked(default, _Rule(lambda v: v >= 0, _says("must be >= 0", why)))


def probability(default: float) -> Any:
    """A number in [0, 1)."""
    return checked(default, _Rule(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"))


def _not_computed(where: str, value: Any) -> str:
    """train.best_metric's own error: the closest metric evaluation computes."""
    close = difflib.get_close_matches(value, list(EVAL_METRICS), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"{where}={value!r} is not computed by evaluation: {hint}choose one of auto, {', '.join(EVAL_METRICS)}"


@dataclass(frozen=True)
class DataConfig:
    # Where examples come from: "task" (built-in generated task), "text" (a folder of
    # line-aligned `{split}.{lang}` files) or "tfds" (a TFDS catalogue dataset name).
    source: Literal["task", "text", "tfds"] = "task"
    # Built-in task name (source="task").
    # copy_names: sentences with rare names -> a template holding them (test names unseen in
    # training); with data.spm_model_type="word" a task gets a word vocabulary (vocab.WordVocab).
    task: Literal["copy", "reverse", "sort", "addition", "dates", "copy_names"] = "dates"
    task_train_size: int = positive(50_000)  # examples generated for training (seeded, no download)
    task_eval_size: int = positive(1_000)  # held-out examples (disjoint seed stream)
    task_seed: int = non_negative(1234)
    # What the corpus is, which decides what evaluation scores (docs/data.md "Scoring"):
    # "translation": sacreBLEU (cased, detokenised) with its signature, BLEU on lowercased
    # Moses-tokenised text (bleu_lc_tok, the Multi30k papers' protocol) and chrF;
    # "summarization": ROUGE-1/2/L/Lsum F1 (rouge-score, Porter stemming; the best of several
    # references per sentence), and `eval` also scores a text split's `{split}.ref*` files.
    task_kind: Literal["translation", "summarization"] = "translation"
    # Text folder (source="text"): dir/{split}.{src_lang}, dir/{split}.{tgt_lang}.
    dir: str = ""
    # TFDS dataset (source="tfds"), e.g. "wmt14_translate/de-en".
    tfds_name: str = ""
    tfds_data_dir: str = ""
    src_lang: str = "en"
    tgt_lang: str = "de"
    train_split: str = "train"
    valid_split: str = "valid"
    test_split: str = "test"
    # Tokenization (text/tfds): SentencePiece trained on the training split.
    vocab_size: int = positive(8000)
    joint_vocab: bool = True  # one SentencePiece model for both sides
    spm_model_type: Literal["unigram", "bpe", "char", "word"] = "unigram"
    # Subword regularisation (Kudo 2018): each training pair is re-segmented every epoch by
    # SentencePiece sampling (nbest_size=-1, this smoothing alpha, e.g. 0.1; unigram models),
    # seeded by (data.shuffle_seed, epoch, example index) so resumes and any process count see
    # the same samples; a sample longer than the example's bucket keeps the usual pieces.
    # 0 = off (the prepared segmentation). Text/TFDS corpora only.
    spm_sampling_alpha: float = checked(0.0, _Rule(lambda v: 0.0 <= v <= 1.0, "must be in [0, 1] (0 = off, e.g. 0.1)"))
    spm_character_coverage: float = checked(1.0, _Rule(
        lambda v: 0.0 < v <= 1.0, "must be in (0, 1], e.g. 0.9995 for languages with large alphabets"))
    # Applied before SentencePiece.
    normalization: Literal["nfkc", "nfc", "none"] = "nfkc"
    # skip (drop pairs with an empty side, counted) | error
    empty_lines: Literal["skip", "error"] = "skip"
    cache_dir: str = ""  # prepared-data cache; "" = ~/.cache/s2s_jax
    # Processes that tokenise and write the prepared dataset (0 = all cores this process may
    # use). The output is byte-identical for any count, so it is not part of the cache key.
    prepare_workers: int = non_negative(
        0, "processes that tokenise the corpus in prepare; 0 = all cores, 1 = in this process")
    # Sentences SentencePiece trains on (per model; a joint model takes half from each side):
    # a seeded sample of the training pairs when the corpus is larger, every pair otherwise.
    # 0 = every pair, however many. Training time and memory grow with it (~1 GB RSS for
    # 500k sentences, ~2 GB for 1M) and it is the part of prepare that workers do not speed up.
    spm_sample_size: int = non_negative(
        500_000, "sentences SentencePiece trains on, e.g. 1000000; 0 = every training sentence")
    # A trained run's workdir whose vocabulary (vocab/: SentencePiece model(s)) tokenises this
    # corpus instead of training a new one, e.g. to fine-tune it on new data (train.init_from).
    vocab_from: str = ""
    # Length filter (in tokens, without BOS/EOS): longer pairs are dropped and counted.
    max_source_length: int = positive(64)
    max_target_length: int = positive(64)
    # Truncation (in pieces, without BOS/EOS; 0 = off), before the length filter, as
    # OpenNMT-py's src_seq_length_trunc / tgt_seq_length_trunc: a longer source (target) keeps
    # its first truncate_source (truncate_target) pieces, in training, validation and `eval`
    # (the target keeps its EOS); how many pairs were cut is counted per split
    # (Data.stats["truncated"], the training start line). Each must be <= its max_*_length.
    truncate_source: int = non_negative(0)
    truncate_target: int = non_negative(0)
    # Largest fraction of the training pairs the length filter may drop; more stops the run
    # before training (the message says how many). Raise it (1.0 = any) to accept the loss.
    max_dropped_fraction: float = checked(0.01, _Rule(
        lambda v: 0.0 <= v <= 1.0, "must be in [0, 1] (a fraction of the training pairs; 1.0 accepts any)"))
    # Bucketing: padded (source, target) shapes (target counting EOS); each example goes to
    # the cheapest bucket that holds it (cost S + 2T). Empty = auto: at most max_buckets
    # shapes chosen from the training lengths, the largest (max_source_length,
    # max_target_length + 1) (docs/data.md "Batching"); the chosen ones are in the start line
    # and kept by a resumed run.
    buckets: tuple = ()
    max_buckets: int = checked(  # auto buckets: most shapes (= compiled train/eval programs)
        8, _Rule(lambda v: v > 0, "must be > 0"),
        _Rule(lambda v: v <= 64, "at most 64 (every bucket shape is compiled for training and evaluation); "
                                 "8-12 are enough for sentence-length corpora"))
    # Tokens per batch if > 0, else data.batch_size sentences. Counted as OpenNMT-py's
    # `-batch_type tokens` counts them: rows x max(source length, target length with BOS and
    # EOS), at the bucket's padded lengths (S, T + 1); each bucket gets the most rows that fit.
    batch_tokens: int = non_negative(0)
    batch_size: int = positive(64)
    shuffle_seed: int = non_negative(0)
    # Length-sorted pools (OpenNMT-py's pooled batching): each shuffled window of pool_batches
    # batches' worth of examples is sorted by length within each bucket, cut into batches, and
    # the batches shuffled, so a batch holds sentences of similar length. 0 = no pools.
    pool_batches: int = non_negative(32)
    prefetch: int = non_negative(2)  # batches prepared ahead by the loader
    worker_count: int = non_negative(0)  # Grain worker processes (0 = in-process)


@dataclass(frozen=True)
class ModelConfig:
    cell: Literal["lstm", "gru"] = "lstm"
    source_embed_dim: int = positive(64)
    target_embed_dim: int = positive(64)
    hidden_dim: int = positive(128)  # decoder size; encoder output size (split across directions)
    encoder_layers: int = positive(1)
    decoder_layers: int = positive(1)
    bidirectional: bool = True  # each direction has hidden_dim // 2 units (OpenNMT "brnn")
    residual: bool = False  # residual connections from layer 2 on (encoder and decoder)
    dropout: float = probability(0.0)  # on embeddings and between layers
    share_embeddings: bool = False  # one embedding for source and target (joint vocab)
    tie_output: bool = False  # output projection = target embedding (transposed)
    bridge: Literal["zero", "last", "dense"] = "last"
    attention: Literal["dot", "general", "mlp", "none"] = "general"
    input_feeding: bool = True
    attention_dropout: float = probability(0.0)
    # Compute dtype (params stay float32).
    dtype: Literal["float32", "bfloat16"] = "float32"
    unroll: int = positive(1)  # lax.scan unroll factor
    loss_chunk: int = non_negative(0)  # time steps per output-projection chunk in the loss (0 = whole)
    # Which implementation of the hand-written VJPs and backend workarounds (s2s_jax/kernels/):
    # "cpu" (tuned for XLA:CPU: device-counted loss blocks over the real rows only, a `cond`
    # non-finite guard, optimisation barriers steering the dot emitter), "portable" (static
    # control flow only: no data-dependent loop, no `cond`, no barrier; for GPUs and TPUs), or
    # "auto" (cpu on the CPU backend, portable elsewhere). Both compute the same function.
    kernels: KernelSetName = "auto"
    # The hand-derived backward pass of the input-feeding LSTM decoder (dot/general attention);
    # false = the generic decoder scan differentiated by JAX (same function, more kernels).
    fused_decoder: bool = True
    # float32 matmul precision on every backend: "auto" (highest when dtype is float32, the
    # backend default for bfloat16 inputs), "highest" (true float32), "tensorfloat32" (GPU
    # TF32), "bfloat16_3x" (three bf16 passes), "default" (the backend's choice: TF32 on recent
    # NVIDIA GPUs, one bf16 pass on TPUs).
    matmul_precision: Literal["auto", "highest", "tensorfloat32", "bfloat16_3x", "default"] = "auto"
    # Pretrained vectors (word2vec or GloVe text files, one `word v1 ... vd` per line; word2vec's
    # `count dim` header line is recognised) copied into the embedding rows of the vocabulary
    # entries they contain; other rows keep the normal initialisation. With share_embeddings
    # either file fills the one table. Read whenever a run starts (s2s_jax/training/embeddings.py).
    source_embeddings: str = ""
    target_embeddings: str = ""
    # Keep the rows loaded from those files bitwise fixed during training (rows not found in the
    # files still train). With tie_output the frozen target rows are output-projection rows too.
    freeze_embeddings: bool = False
    # -- recipe parts of the strongest small-data RNN systems (docs/model.md; all off by default) --
    # Layer normalisation inside every recurrent cell, encoder and decoder (Ba et al. 2016;
    # Marian --layer-normalization, nmtpy, Nematus): the input pre-activations x·W_ih and the
    # recurrent ones h·W_hh are each normalised (gain only, eps 1e-5; the cell's biases added
    # after). "per_gate": each gate's H units on their own (Nematus's block-wise layer norm);
    # "whole": the G·H pre-activations at once (one statistic per vector). "off": none.
    layer_norm: Literal["off", "per_gate", "whole"] = "off"
    # The decoder: "stacked" (Luong/Bahdanau: model.decoder_layers layers, then attention, with or
    # without input feeding) or "conditional" (Nematus/nmtpy's conditional GRU, cGRU, with
    # model.cell=gru; a conditional LSTM with lstm): a transition on the previous target
    # embedding, attention with its state as the query, a second transition on the context, and
    # the deep output tanh(W_c [context; state] + W_y embedding + b). Needs one decoder layer,
    # model.input_feeding=false and an attention type (mlp as Nematus/nmtpy).
    decoder_type: Literal["stacked", "conditional"] = "stacked"
    # Dropout on the source and target embeddings, per element (nmtpy's dropout_emb), on top of
    # model.dropout; training only, drawn per row like every mask (batch-split invariant).
    embedding_dropout: float = probability(0.0)
    # Dropout on the attentional output (the decoder's hidden state before the output
    # projection; nmtpy's dropout_out), on top of model.dropout.
    output_dropout: float = probability(0.0)
    # Variational recurrent dropout (Gal & Ghahramani 2016; Marian --dropout-rnn on the state):
    # one mask per sequence and layer, the same at every time step, on h_{t-1} where it enters
    # h·W_hh (encoder and decoder). The carry itself is not dropped.
    recurrent_dropout: float = probability(0.0)
    # Word dropout (Marian --dropout-src / --dropout-trg, Nematus dropout_source/target): each
    # source token's (decoder input token's) whole embedding is zeroed with this probability and
    # the kept ones scaled by 1/(1-p), one draw per token.
    source_word_dropout: float = probability(0.0)
    target_word_dropout: float = probability(0.0)
    # Coverage (See et al., 2017): the decoder carries c_t = sum of the earlier steps' attention
    # weights, and each attention score gets a learned w_c * c_i term (mlp: a vector inside the
    # tanh; dot/general: a scalar added to the score). Needs an attention type; the fused decoder
    # hands over to the generic scan. train.coverage_loss_weight adds the coverage loss.
    coverage: bool = False
    # Copy attention (pointer-generator, See et al., 2017): p(w) = (1 - g) p_vocab(w) + g * sum of
    # the attention weights on source positions holding w, g = sigmoid(W_g [attentional state;
    # context; decoder input] + b_g), with the last decoder layer's attention (copy_attention_separate:
    # a separate attention of the same kind over the encoder memory instead). Needs a shared
    # source/target vocabulary (data.joint_vocab=True, or a built-in task); source words outside the
    # vocabulary get per-sentence ids V + k (docs/copy.md).
    copy_attention: bool = False
    copy_attention_separate: bool = False
    # An unknown target word found in the source is always scored by its copy probability alone;
    # force_copy also scores known target words found in the source by their copy probability
    # alone (OpenNMT-py's -copy_attn_force).
    force_copy: bool = False


@dataclass(frozen=True)
class TrainConfig:
    seed: int = non_negative(0)
    steps: int = positive(2000)
    # Warm start: RUN, RUN@best or RUN@STEP (another run's workdir and which checkpoint). The
    # new run starts from its parameters (its EMA when it kept one); step, optimizer state and
    # schedule start fresh unless init_optimizer. Model shapes and vocabularies must match
    # (data.vocab_from=RUN reuses its vocabulary). A workdir's own checkpoints win on resume.
    init_from: str = ""
    # With init_from: also carry over the optimizer state, the step (so the schedule continues
    # where that run stopped) and the plateau learning-rate scale; the raw, non-EMA parameters.
    init_optimizer: bool = False
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    learning_rate: float = positive(1e-3, "e.g. --set train.learning_rate=1e-3")
    schedule: Literal["constant", "rsqrt", "cosine", "plateau"] = "constant"
    warmup_steps: int = non_negative(0)
    weight_decay: float = non_negative(0.0)  # adamw only
    momentum: float = non_negative(0.0)  # sgd only
    clip_norm: float = non_negative(5.0)  # global-norm clipping; 0 = off
    label_smoothing: float = probability(0.0)
    # Coverage loss weight lambda (model.coverage=True): adds lambda * sum_t sum_i min(a_t,i, c_t,i)
    # over real target and source positions to the training loss sum (See et al., 2017).
    coverage_loss_weight: float = non_negative(0.0)
    grad_accum: int = positive(1)  # micro-batches per update
    ema_decay: float = probability(0.0)  # parameter EMA used for evaluation; 0 = off
    plateau_patience: int = non_negative(2)  # schedule=plateau: evaluations without improvement before halving
    plateau_factor: float = 0.5
    log_every: int = positive(50)
    eval_every: int = positive(500)
    eval_sentences: int = positive(1000)  # validation sentences decoded for exact match / BLEU
    checkpoint_every: int = positive(500)
    keep_checkpoints: int = positive(3)  # latest K
    keep_best: int = non_negative(1)  # best M by best_metric
    # auto (exact_match for built-in tasks, else bleu for data.task_kind=translation, rougeL for
    # summarization) | one of EVAL_METRICS that the task kind computes (KIND_METRICS)
    best_metric: str = choice("auto", *EVAL_METRICS, default="auto", refuse=_not_computed)
    early_stopping_patience: int = non_negative(0)  # evaluations without improvement; 0 = off
    max_nonfinite: int = positive(5)  # consecutive non-finite steps before the run stops
    parallel: Literal["shard_map", "pmap", "none"] = "shard_map"
    # Repeatable accelerator arithmetic: sets the XLA flags that make GPU reductions and
    # scatters run-to-run deterministic (--xla_gpu_deterministic_ops=true) before the backend
    # starts (runtime.configure_backend). XLA:CPU and TPUs are deterministic anyway.
    deterministic: bool = True
    tensorboard: bool = False
    plot: bool = True  # PNG of curves at the end of a run
    # Multi-host (jax.distributed); also read from the environment when left empty.
    coordinator_address: str = ""
    num_processes: int = non_negative(0)
    process_id: int = -1


@dataclass(frozen=True)
class DecodeConfig:
    beam_size: int = positive(1, "1 is greedy search")
    length_penalty: float = non_negative(0.6)  # GNMT alpha; 0 = none
    coverage_penalty: float = non_negative(0.0)  # beta; 0 = none (beam search; decoding.SearchSettings)
    # Ranking of finished hypotheses (beam): "wu" log-prob / ((5 + |Y|) / 6) ** alpha (GNMT),
    # "avg" log-prob / |Y| (alpha unused), "none" the log-prob (as OpenNMT-py's -length_penalty).
    length_penalty_type: Literal["wu", "avg", "none"] = "wu"
    # "wu": + beta * sum log(min(coverage, 1)) (GNMT: punishes source words left unattended);
    # "summary": - beta * sum (max(coverage, 1) - 1) (punishes attending a word twice; summaries).
    coverage_penalty_type: Literal["wu", "summary"] = "wu"
    # Also rank each step's extensions with the coverage penalty of the coverage so far
    # (OpenNMT-py's -stepwise_penalty); needs coverage_penalty > 0.
    stepwise_penalty: bool = False
    # When a beam-search sentence with a full n-best stops: "exact" once no live hypothesis can
    # beat it at any length it may still reach (the search's answer is final), "current_length"
    # once none beats it at its current length (fewer steps; may miss a longer winner;
    # decoding.SearchSettings, docs/speed.md).
    stop_rule: Literal["exact", "current_length"] = "exact"
    # Fewest output tokens before EOS (EOS is masked until then; greedy and beam). A sentence
    # whose length limit (max_len_a * source_length + max_len_b) comes first ends there.
    min_length: int = non_negative(0)
    # N > 0: no hypothesis repeats an N-gram (greedy and beam; OpenNMT-py's -block_ngram_repeat),
    # except N-grams holding one of the target pieces of ignore_when_blocking, e.g. (".", ",").
    block_ngram_repeat: int = non_negative(0)
    ignore_when_blocking: tuple = ()
    # Maximum output length = a * source_length + b (a is the ratio to the source length).
    max_len_a: float = non_negative(1.5)
    max_len_b: int = non_negative(10)
    batch_size: int = positive(128)  # sentences decoded at once (continuous-batching slots); also the encode batch
    nbest: int = positive(1, "1 writes the best hypothesis only")
    # Compute dtype of translation's matmuls: "model" = the run's model.dtype; "bfloat16" is
    # ~1.5x faster on CPUs with AVX512-BF16 but may change some outputs (docs/results.md).
    dtype: Literal["model", "float32", "bfloat16"] = "model"
    # Vocabulary shortlist (docs/speed.md): score only the target pieces that a batch's source
    # pieces plausibly translate to, not all V. Needs the run's shortlist.npz, built once with
    # `s2s-jax shortlist --workdir RUN`. Per batch of decode.batch_size sentences the candidates
    # are the special ids, the shortlist_frequent most frequent target pieces and the
    # shortlist_top_k best translations (IBM Model 1) of every source piece in the batch. The
    # defaults (20, 2000) kept 96 of 100 greedy Multi30k translations identical with ~2,500
    # candidates per 64 sentences, where (50, 500) kept 85 with ~2,200 (docs/speed.md).
    shortlist: bool = False
    shortlist_top_k: int = positive(20, "at most the --top-k the shortlist was built with, 100 by default")
    shortlist_frequent: int = non_negative(2000)


@dataclass(frozen=True)
class Config:
    name: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def replace(self, **sections) -> "Config":
        return dataclasses.replace(self, **sections)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "decode": DecodeConfig}


def _field_types(cls) -> dict[str, Any]:
    """Each field's value type (str for a `Literal` of strings)."""
    hints = typing.get_type_hints(cls)
    return {f.name: str if typing.get_origin(hints[f.name]) is Literal else hints[f.name]
            for f in dataclasses.fields(cls)}


def _field_choices(cls) -> dict[str, tuple]:
    """The fields of `cls` that take one of a few values, and those values, as declared at the field."""
    hints = typing.get_type_hints(cls)
    found = {f.name: typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal
             else f.metadata.get("choices") for f in dataclasses.fields(cls)}
    return {name: values for name, values in found.items() if values}


def choices(cls, name: str) -> tuple[str, ...]:
    """The values field `name` of section class `cls` may take, as declared at the field."""
    return _field_choices(cls)[name]


def best_metric_and_mode(config: "Config") -> tuple[str, str]:
    """(train.best_metric resolved, "min" | "max"): auto is exact_match for tasks, else the first
    of KIND_METRICS[data.task_kind] (bleu, rougeL)."""
    metric = config.train.best_metric
    if metric == "auto":
        metric = "exact_match" if config.data.source == "task" else KIND_METRICS[config.data.task_kind][0]
    return metric, EVAL_METRICS[metric]


def _type_error(typ: Any, value: Any) -> str | None:
    """What is wrong with `value` as a `typ` field (None: nothing)."""
    if typ is bool and not isinstance(value, bool):
        return "expected true/false (True or False)"
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        return "expected an integer"
    if typ is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return "expected a number"
    if typ is float and not math.isfinite(value):
        return "must be a finite number"
    if typ is str and not isinstance(value, str):
        return "expected a string"
    return None


def _check_fields(config: Config) -> None:
    """Per field, in field order: its type, then the choices and rules declared at the field."""
    for section, cls in _SECTIONS.items():
        obj = getattr(config, section)
        if not isinstance(obj, cls):
            raise ConfigError(f"config.{section} must be a {cls.__name__}")
        types, options = _field_types(cls), _field_choices(cls)
        for f in dataclasses.fields(cls):
            value = getattr(obj, f.name)
            where = f"{section}.{f.name}"
            wrong = _type_error(types[f.name], value)
            if wrong:
                raise ConfigError(f"{where}={value!r}: {wrong}")
            choices = options.get(f.name)
            if choices and value not in choices:
                refuse = f.metadata.get("refuse")
                raise ConfigError(refuse(where, value) if refuse
                                  else f"{where}={value!r}: choose one of {', '.join(choices)}")
            for rule in f.metadata.get("rules", ()):
                if not rule.holds(value):
                    raise ConfigError(f"{where}={value!r}: {rule.says}")


def _check_data(d: DataConfig) -> None:
    if d.source == "text" and not d.dir:
        raise ConfigError("data.dir is empty: set --set data.dir=PATH/TO/CORPUS for data.source='text'")
    if d.source == "tfds" and not d.tfds_name:
        raise ConfigError("data.tfds_name is empty: set e.g. --set data.tfds_name=wmt14_translate/de-en")
    if d.source != "task":
        for name in ("src_lang", "tgt_lang"):
            if not getattr(d, name):
                raise ConfigError(f"data.{name} is empty: set the language suffix of the corpus files, "
                                  f"e.g. --set data.{name}=en")
        if d.src_lang == d.tgt_lang:
            raise ConfigError(f"data.src_lang = data.tgt_lang = {d.src_lang!r}: source and target would be the "
                              "same files; set them to the two languages' suffixes")
    for name in ("train_split", "valid_split"):
        if not getattr(d, name):
            what = "trains on" if name == "train_split" else "evaluates on (every train.eval_every steps and at the end)"
            raise ConfigError(f"data.{name} is empty: the trainer {what} it; set it to the split's name")
    if d.spm_sampling_alpha > 0 and d.source == "task":
        raise ConfigError(f"data.spm_sampling_alpha={d.spm_sampling_alpha}: built-in tasks use a character "
                          "vocabulary, nothing to sample; set it to 0")
    if d.vocab_from and d.source == "task":
        raise ConfigError(f"data.vocab_from={d.vocab_from!r}: built-in tasks always use the character "
                          "vocabulary; leave data.vocab_from empty for data.source='task'")
    if not isinstance(d.buckets, (tuple, list)) or not all(
        isinstance(b, (tuple, list)) and len(b) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                             and x > 0 for x in b)
        for b in d.buckets
    ):
        raise ConfigError(f"data.buckets={d.buckets!r}: expected a list of (source_length, target_length) pairs of positive integers")
    for side in ("source", "target"):
        cut, limit = getattr(d, f"truncate_{side}"), getattr(d, f"max_{side}_length")
        if cut > limit:
            raise ConfigError(f"data.truncate_{side}={cut} is above data.max_{side}_length={limit}: the length "
                              f"filter would still drop the truncated pairs; raise data.max_{side}_length to "
                              f"{cut} (or lower data.truncate_{side})")
    if d.buckets:
        shown = [list(b) for b in d.buckets]
        big = (max(s for s, _ in d.buckets), max(t for _, t in d.buckets))
        if tuple(big) not in {tuple(b) for b in d.buckets}:
            raise ConfigError(f"data.buckets={shown}: no bucket is at least as large as all others in both "
                              f"lengths; add the bucket {list(big)}")
        if min(t for _, t in d.buckets) < 2:
            raise ConfigError(f"data.buckets={shown}: a target length must be >= 2 (one token + EOS)")
        need = (d.max_source_length, d.max_target_length + 1)
        if big[0] < need[0] or big[1] < need[1]:
            raise ConfigError(
                f"data.buckets={shown}: the largest bucket {list(big)} cannot hold data.max_source_length="
                f"{d.max_source_length} / data.max_target_length={d.max_target_length} (needs {list(need)}: the "
                f"target side counts EOS); add the bucket {[max(big[0], need[0]), max(big[1], need[1])]} or lower "
                "data.max_source_length / data.max_target_length")


def _check_model(config: Config) -> None:
    d, m = config.data, config.model
    if m.bidirectional and m.hidden_dim % 2:
        raise ConfigError(f"model.hidden_dim={m.hidden_dim}: must be even when model.bidirectional=True (split across directions)")
    if m.tie_output and m.target_embed_dim != m.hidden_dim:
        raise ConfigError("model.tie_output=True needs model.target_embed_dim == model.hidden_dim")
    if m.share_embeddings and m.source_embed_dim != m.target_embed_dim:
        raise ConfigError("model.share_embeddings=True needs model.source_embed_dim == model.target_embed_dim")
    if m.share_embeddings and d.source != "task" and not d.joint_vocab and not d.vocab_from:
        raise ConfigError("model.share_embeddings=True needs data.joint_vocab=True (one vocabulary)")
    if m.input_feeding and m.attention == "none":
        raise ConfigError("model.input_feeding=True needs an attention type (model.attention != 'none')")
    if m.decoder_type == "conditional":
        _check_conditional_decoder(m)
    if m.copy_attention and d.spm_sampling_alpha > 0:
        raise ConfigError("data.spm_sampling_alpha > 0 re-segments the sources, but model.copy_attention's extended "
                          "ids follow the prepared pieces: set data.spm_sampling_alpha=0")
    _check_copy_and_coverage(config)
    if m.attention == "none" and m.attention_dropout > 0:
        raise ConfigError(f"model.attention_dropout={m.attention_dropout}: has no effect with model.attention='none'; "
                          "set it to 0 or choose an attention type")
    if m.share_embeddings and m.source_embeddings and m.target_embeddings and m.source_embeddings != m.target_embeddings:
        raise ConfigError("model.source_embeddings and model.target_embeddings name different files, but "
                          "model.share_embeddings=True makes one table: give one file (either field)")
    if m.freeze_embeddings and not (m.source_embeddings or m.target_embeddings):
        raise ConfigError("model.freeze_embeddings=True freezes the rows loaded from pretrained vectors, but "
                          "neither model.source_embeddings nor model.target_embeddings is set: name a file or "
                          "set model.freeze_embeddings=False")
    if (m.source_embeddings or m.target_embeddings) and config.train.init_from:
        field_ = "model.source_embeddings" if m.source_embeddings else "model.target_embeddings"
        raise ConfigError(f"{field_} and train.init_from both set the embeddings; drop one "
                          "(the embeddings of the run in train.init_from are already trained)")


def _check_conditional_decoder(m: ModelConfig) -> None:
    if m.attention == "none":
        raise ConfigError("model.decoder_type='conditional' attends between its two transitions: set "
                          "model.attention (mlp as Nematus/nmtpy, or dot/general)")
    if m.input_feeding:
        raise ConfigError("model.decoder_type='conditional' has no input feeding (its second transition reads "
                          "the context): set model.input_feeding=false")
    if m.decoder_layers != 1:
        raise ConfigError(f"model.decoder_layers={m.decoder_layers}: model.decoder_type='conditional' is one "
                          "conditional layer (two transitions); set model.decoder_layers=1")
    for name in ("coverage", "copy_attention"):
        if getattr(m, name):
            raise ConfigError(f"model.{name}=True is not built for model.decoder_type='conditional' yet: use the "
                              f"stacked decoder or set model.{name}=False")


def _check_copy_and_coverage(config: Config) -> None:
    d, m, t = config.data, config.model, config.train
    if m.coverage and m.attention == "none":
        raise ConfigError("model.coverage=True needs an attention type: set model.attention to dot, general or mlp "
                          "(or model.coverage=False)")
    if t.coverage_loss_weight > 0 and not m.coverage:
        raise ConfigError(f"train.coverage_loss_weight={t.coverage_loss_weight} has no effect without "
                          "model.coverage=True: set model.coverage=True or the weight to 0")
    if m.copy_attention and m.attention == "none":
        raise ConfigError("model.copy_attention=True copies with attention weights: set model.attention to dot, "
                          "general or mlp (or model.copy_attention=False)")
    if m.copy_attention and d.source != "task" and not d.joint_vocab:
        raise ConfigError("model.copy_attention=True copies source ids into the output, so source and target need "
                          "one vocabulary: set data.joint_vocab=True (or model.copy_attention=False)")
    if m.copy_attention and config.decode.shortlist:
        raise ConfigError("decode.shortlist=True scores a shortlist of the vocabulary, but model.copy_attention=True "
                          "decodes over the whole extended vocabulary: set decode.shortlist=False")
    if (m.copy_attention_separate or m.force_copy) and not m.copy_attention:
        name = "copy_attention_separate" if m.copy_attention_separate else "force_copy"
        raise ConfigError(f"model.{name}=True has no effect without model.copy_attention=True")


def _check_train(config: Config) -> None:
    d, t = config.data, config.train
    if t.schedule == "cosine" and t.warmup_steps >= t.steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be < train.steps={t.steps} for "
                          "schedule='cosine' (the decay needs steps after the warmup): lower train.warmup_steps")
    if t.warmup_steps > t.steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} is longer than the run (train.steps={t.steps}): "
                          f"the learning rate would never reach train.learning_rate; lower train.warmup_steps")
    if t.weight_decay > 0 and t.optimizer != "adamw":
        raise ConfigError(f"train.weight_decay={t.weight_decay} has no effect with train.optimizer={t.optimizer!r}: "
                          "use train.optimizer=adamw or set train.weight_decay=0")
    if t.momentum > 0 and t.optimizer != "sgd":
        raise ConfigError(f"train.momentum={t.momentum} has no effect with train.optimizer={t.optimizer!r} "
                          "(Adam keeps its own moments): use train.optimizer=sgd or set train.momentum=0")
    if t.schedule == "plateau":
        if t.plateau_patience < 1:
            raise ConfigError(f"train.plateau_patience={t.plateau_patience}: must be >= 1 for schedule='plateau' "
                              "(evaluations without improvement before the learning rate is lowered)")
        if not 0.0 < t.plateau_factor < 1.0:
            raise ConfigError(f"train.plateau_factor={t.plateau_factor}: must be in (0, 1) for schedule='plateau' "
                              "(it multiplies the learning rate), e.g. 0.5")
    if d.batch_tokens == 0 and d.batch_size % t.grad_accum:
        raise ConfigError(f"data.batch_size={d.batch_size} is not divisible by train.grad_accum={t.grad_accum} "
                          "(the micro-batches split the batch): make it a multiple")
    metric = t.best_metric
    other = [k for k, names in KIND_METRICS.items() if metric in names and k != d.task_kind]
    if other:
        raise ConfigError(f"train.best_metric={metric!r} is computed for data.task_kind={other[0]!r}, not "
                          f"{d.task_kind!r}: choose one of auto, {', '.join(KIND_METRICS[d.task_kind])}, loss, "
                          f"perplexity, accuracy, exact_match (or set data.task_kind={other[0]})")
    if t.init_optimizer and not t.init_from:
        raise ConfigError("train.init_optimizer=True has no effect without train.init_from (train --init-from RUN)")
    if t.num_processes > 0 and not -1 <= t.process_id < t.num_processes:
        raise ConfigError(f"train.process_id={t.process_id}: must be in [0, train.num_processes={t.num_processes}) "
                          "(or -1 to read it from the environment)")


def _check_decode(c: DecodeConfig) -> None:
    if c.nbest > c.beam_size:
        raise ConfigError(f"decode.nbest={c.nbest} must be <= decode.beam_size={c.beam_size}: raise decode.beam_size "
                          "or lower decode.nbest")
    if c.max_len_a == 0 and c.max_len_b == 0:
        raise ConfigError("decode.max_len_a=0 and decode.max_len_b=0 allow no output token: set the maximum output "
                          "length a * source_length + b, e.g. decode.max_len_a=1.5, decode.max_len_b=10")
    if c.max_len_a == 0 and c.min_length >= c.max_len_b:
        raise ConfigError(f"decode.min_length={c.min_length} must be below the maximum output length "
                          f"decode.max_len_b={c.max_len_b} (EOS included): lower decode.min_length or raise "
                          "decode.max_len_b (or use decode.max_len_a)")
    _check_decode_controls(c)


def _check_decode_controls(c: DecodeConfig) -> None:
    if c.stepwise_penalty and c.coverage_penalty == 0:
        raise ConfigError("decode.stepwise_penalty=True has no effect with decode.coverage_penalty=0: set "
                          "decode.coverage_penalty > 0 (e.g. 0.2) or leave decode.stepwise_penalty=False")
    if c.ignore_when_blocking and not c.block_ngram_repeat:
        raise ConfigError("decode.ignore_when_blocking has no effect with decode.block_ngram_repeat=0: set "
                          "decode.block_ngram_repeat (e.g. 3) or leave decode.ignore_when_blocking empty")
    if not isinstance(c.ignore_when_blocking, (tuple, list)) or not all(
            isinstance(p, str) and p for p in c.ignore_when_blocking):
        raise ConfigError(f"decode.ignore_when_blocking={c.ignore_when_blocking!r}: must be a tuple of target "
                          "pieces (strings), e.g. (\".\", \",\")")


def validate(config: Config) -> Config:
    """The config audit: types, choices, ranges and cross-field rules, field by field.

    Raises ConfigError naming the first bad field and the fix (the CLI prints it as one line and
    exits 2 before any work). Rules that need the data (how many training pairs the length
    filter drops: data.max_dropped_fraction) are checked by the data layer when it opens the
    corpus, and pretrained-embedding files and train.init_from when the trainer reads them;
    both before anything is compiled.
    """
    _check_fields(config)
    _check_data(config.data)
    _check_model(config)
    _check_train(config)
    _check_decode(config.decode)
    return config


def _parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _coerce(where: str, typ: Any, value: Any) -> Any:
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is str and not isinstance(value, str):
        return str(value)
    if typ is tuple and isinstance(value, list):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return value


def override(config: Config, assignments: list[str]) -> Config:
    """Applies `section.field=value` strings; unknown fields are ConfigErrors."""
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.field=value, e.g. --set train.steps=200")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key == "name":
            config = dataclasses.replace(config, name=raw)
            continue
        parts = key.split(".")
        if len(parts) != 2 or parts[0] not in _SECTIONS:
            raise ConfigError(f"--set {key}: unknown field; use one of the sections {', '.join(_SECTIONS)} as section.field")
        section, name = parts
        types = _field_types(_SECTIONS[section])
        if name not in types:
            close = [n for n in types if n.startswith(name[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"--set {key}: unknown field {section}.{name}{hint}")
        value = _coerce(key, types[name], _parse_value(raw))
        config = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **{name: value})})
    return validate(config)


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def from_dict(d: dict) -> Config:
    """Inverse of to_dict; unknown keys (e.g. from a newer version) are ConfigErrors.

    A config.json is the record of a run that trained: it is checked field by field and for
    what building its model and decoding need, not against the whole training audit (a rule
    added later must not make an old run untranslatable). Training on it audits it in full
    (`override`, `train_and_evaluate` call `validate`).
    """
    sections = {}
    for section, cls in _SECTIONS.items():
        values = dict(d.get(section, {}))
        types = _field_types(cls)
        unknown = set(values) - set(types)
        if unknown:
            raise ConfigError(f"config.json: unknown field(s) {section}.{', '.join(sorted(unknown))}")
        for k, v in values.items():
            values[k] = _coerce(k, types[k], v)
        sections[section] = cls(**values)
    config = Config(name=d.get("name", "default"), **sections)
    _check_fields(config)
    _check_model(config)
    _check_decode(config.decode)
    return config


def to_json(config: Config) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=True)


def load_module(path: str | os.PathLike):
    """Runs a Python file by its path and returns it as a module (not added to sys.modules).

    How experiment files are read, and how one reads another: a config derived from a shared
    recipe loads `experiments/configs/_recipes.py` (or another experiment) beside it this way.
    """
    path = os.fspath(path)
    name = "_s2s_experiment_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(path: str | os.PathLike) -> Config:
    """Loads `get_config()` from an experiment file, or a resolved config.json.

    An experiment file's config is validated by `override` (after the command line's --set
    values), since some files leave fields such as data.dir for the command line to fill in.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file; pick one from experiments/configs/")
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                return from_dict(json.load(f))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e}); restore it from the run's checkpoint") from None
    module = load_module(path)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config(); an experiment file must return a Config from get_config()")
    config = module.get_config()
    if not isinstance(config, Config):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, expected s2s_jax.config.Config")
    return config
