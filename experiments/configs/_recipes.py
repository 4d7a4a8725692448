"""Shared recipes the experiment configs derive from (not an experiment itself: no get_config).

An experiment file loads this one by its path and changes what it does differently with
`dataclasses.replace`, saying why in a comment:

    recipes = load_module(Path(__file__).with_name("_recipes.py"))
    model = dataclasses.replace(recipes.luong_2x256(), dtype="bfloat16")

tests/test_config.py checks that each config equals its recipe but for the differences it declares.
"""

import dataclasses

from s2s_jax.config import Config, DataConfig, DecodeConfig, ModelConfig, TrainConfig


def luong_2x256() -> ModelConfig:
    """OpenNMT-py "brnn"-style Luong attention model of Multi30k size.

    Bidirectional 2-layer LSTM encoder (256 units in total, 128 per direction), 2-layer 256-unit
    LSTM decoder, 256-dim embeddings, general (bilinear) attention with input feeding, dropout 0.3,
    a dense bridge from the encoder's final states to the decoder's initial ones.
    """
    return ModelConfig(
        cell="lstm",
        source_embed_dim=256,
        target_embed_dim=256,
        hidden_dim=256,
        encoder_layers=2,
        decoder_layers=2,
        bidirectional=True,
        dropout=0.3,
        attention="general",
        input_feeding=True,
        # A learned bridge: the recipe's choice since the first Multi30k config (no measurement
        # behind it is recorded). bench_cpu keeps "last" on purpose (see there).
        bridge="dense",
    )


def adam() -> TrainConfig:
    """Adam, learning rate 1e-3, global-norm clipping at 5, seed 0 (the OpenNMT-py peer run's optimiser)."""
    return TrainConfig(seed=0, optimizer="adam", learning_rate=1e-3, clip_norm=5.0)


def text_translation(name: str, src_lang: str, tgt_lang: str, max_length: int) -> Config:
    """A line-aligned text corpus translated by `luong_2x256`, evaluated by BLEU, beam 5 decoding.

    Data: pairs of at most `max_length` pieces a side, one joint 8000-piece unigram SentencePiece
    vocabulary trained on the training split after NFKC normalisation, 3000-token batches from
    length-sorted pools. The corpus folder (data.dir, given on the command line), the buckets and
    the number of steps are the experiment's.
    """
    return Config(
        name=name,
        data=DataConfig(
            source="text",
            dir="",  # given on the command line: --set data.dir=PATH (the experiment's docstring says which)
            src_lang=src_lang,
            tgt_lang=tgt_lang,
            max_source_length=max_length,
            max_target_length=max_length,
            train_split="train",
            valid_split="valid",
            test_split="test",
            vocab_size=8000,
            joint_vocab=True,
            spm_model_type="unigram",
            spm_character_coverage=1.0,
            normalization="nfkc",
            batch_tokens=3000,  # OpenNMT-py's tokens rule: rows x max(S, T + 1)
            pool_batches=32,  # length-sorted pools of 32 batches' worth of pairs
            shuffle_seed=0,
        ),
        model=luong_2x256(),
        train=dataclasses.replace(adam(), schedule="constant", log_every=50, eval_every=500,
                                  checkpoint_every=500, best_metric="bleu"),
        decode=DecodeConfig(beam_size=5, length_penalty=0.6),
    )


def conditional_gru_256() -> ModelConfig:
    """The nmtpy / Nematus small-data recipe parts on a Multi30k-size model (UNTUNED: the values
    are the published systems' kind of setting, not measured here yet; docs/model.md).

    Bidirectional 2-layer GRU encoder (256 units in total), a 256-unit conditional GRU decoder
    with Bahdanau (mlp) attention and the deep output, 128-dim embeddings, layer normalisation
    per gate block in every cell, dropout on the embeddings and the output, variational
    recurrent dropout.
    """
    return ModelConfig(
        cell="gru",
        source_embed_dim=128,
        target_embed_dim=128,
        hidden_dim=256,
        encoder_layers=2,
        decoder_layers=1,
        bidirectional=True,
        dropout=0.0,
        attention="mlp",
        input_feeding=False,
        bridge="dense",
        decoder_type="conditional",
        layer_norm="per_gate",
        embedding_dropout=0.3,
        output_dropout=0.5,
        recurrent_dropout=0.2,
    )


def text_summarization(name: str, max_source_length: int, max_target_length: int) -> Config:
    """`text_translation` turned to summarisation (a `{split}.src` -> `{split}.tgt` folder):
    scored by ROUGE (data.task_kind="summarization", train.best_metric="rougeL"), sources cut
    to `max_source_length` pieces and targets to `max_target_length` (data.truncate_*: truncated
    and counted, not dropped), batches of 8000 tokens (rows x max(S, T + 1): ~20 rows in the
    400-piece bucket), outputs of at most `max_target_length` pieces whatever the source length
    and without a repeated trigram.

    The vocabulary stays one joint SentencePiece model: copy attention needs the source and
    target ids to be the same pieces.
    """
    base = text_translation(name, src_lang="src", tgt_lang="tgt", max_length=max_source_length)
    return dataclasses.replace(
        base,
        data=dataclasses.replace(base.data, task_kind="summarization", max_target_length=max_target_length,
                                 truncate_source=max_source_length, truncate_target=max_target_length,
                                 batch_tokens=8000, max_buckets=12),
        train=dataclasses.replace(base.train, best_metric="rougeL", early_stopping_patience=4),
        # no repeated trigram in an output, greedy (validation) and beam alike: OpenNMT-py's
        # summarisation recipe (-block_ngram_repeat 3); decode.min_length stays the experiment's
        decode=dataclasses.replace(base.decode, max_len_a=0.0, max_len_b=max_target_length + 1,
                                   block_ngram_repeat=3),
    )
