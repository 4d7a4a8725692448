"""Pretrained embeddings (model.source_embeddings / target_embeddings / freeze_embeddings):
vectors land on the rows of their vocabulary entries, missing entries are counted and keep the
normal initialisation, frozen rows stay bitwise unchanged through training steps (AdamW weight
decay, clipping and EMA on; shared and tied tables too), and a bad file is one error naming the
file and line.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2s_jax import cli
from s2s_jax.training import embeddings, steps
from s2s_jax import config as config_lib
from s2s_jax.data import CharVocab
from s2s_jax.rundir import read_vocabs
from s2s_jax.training.embeddings import EmbeddingsError
from s2s_jax.train_state import create_state, make_model

from _helpers import TINY  # noqa: E402
from test_resume import load_state  # noqa: E402

DIM = 8
VOCAB = CharVocab()
V = VOCAB.vocab_size  # 99: the 4 specials and 95 printable characters


def vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=DIM).astype(np.float32)


def write(path, words: dict, header: bool = False) -> str:
    lines = [f"{len(words)} {DIM}"] if header else []
    lines += [" ".join([w] + [repr(float(x)) for x in v]) for w, v in words.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


SOURCE = {"a": vec(1), "b": vec(2), "hello": vec(3), "q": vec(4), "</s>": vec(5)}  # "hello" is no character
TARGET = {"z": vec(6), "7": vec(7)}


def small_config(tmp_path, *, freeze=True, **model) -> config_lib.Config:
    cfg = config_lib.load(TINY)
    src = write(tmp_path / "glove.txt", SOURCE)
    tgt = write(tmp_path / "w2v.txt", TARGET, header=True)  # word2vec text: `count dim` first
    m = dict(source_embed_dim=DIM, target_embed_dim=DIM, hidden_dim=DIM, dropout=0.3, source_embeddings=src,
             target_embeddings=tgt, freeze_embeddings=freeze)
    m.update(model)
    train = dataclasses.replace(cfg.train, optimizer="adamw", weight_decay=0.1, clip_norm=1.0, ema_decay=0.5,
                                learning_rate=0.05)
    return config_lib.validate(cfg.replace(model=dataclasses.replace(cfg.model, **m), train=train))


def test_vectors_land_on_their_rows_and_missing_ones_are_counted(tmp_path):
    config = small_config(tmp_path)
    source, target = embeddings.load_pretrained(config, VOCAB, VOCAB)
    assert (source.param, target.param) == ("source_embedding", "target_embedding")
    for word, v in SOURCE.items():
        if word in VOCAB.stoi:
            assert np.array_equal(source.vectors[VOCAB.stoi[word]], v), word
    assert np.flatnonzero(source.found).tolist() == sorted(VOCAB.stoi[w] for w in ("a", "b", "q", "</s>"))
    assert source.missing == V - 1 - 4  # the padding row is never filled nor counted
    assert np.flatnonzero(target.found).tolist() == sorted([VOCAB.stoi["z"], VOCAB.stoi["7"]])
    assert target.missing == V - 1 - 2
    # on a fresh state: the found rows are the file's, the others the normal initialisation
    model = make_model(config, V, V)
    fresh = create_state(config, model)
    state = embeddings.apply(fresh, [source, target])
    table = np.asarray(state.params["source_embedding"])
    assert np.array_equal(table[VOCAB.stoi["b"]], SOURCE["b"])
    other = ~source.found
    assert np.array_equal(table[other], np.asarray(fresh.params["source_embedding"])[other])
    assert np.array_equal(np.asarray(state.ema_params["source_embedding"]), table)


def test_sentencepiece_pieces_match_words_without_the_word_start_marker():
    pieces = ["<pad>", "<s>", "</s>", "<unk>", "\u2581the", "ing", "\u2581cat", "\u2581"]
    vectors = {"the": vec(1), "ing": vec(2), "\u2581cat": vec(3), "cat": vec(4), "<pad>": vec(5)}
    table, found = embeddings.align(vectors, pieces, DIM)
    assert found.tolist() == [False, False, False, False, True, True, True, False]
    assert np.array_equal(table[4], vectors["the"]) and np.array_equal(table[5], vectors["ing"])
    assert np.array_equal(table[6], vectors["\u2581cat"])  # the exact piece wins over the bare word


def _train_steps(config, pretrained, n=3):
    model = make_model(config, V, V)
    state = embeddings.apply(create_state(config, model), pretrained)
    step = jax.jit(functools.partial(steps.train_step, model=model, config=config,
                                     frozen_rows=embeddings.frozen_rows(config, pretrained)))
    rng = np.random.default_rng(0)
    start = state
    for _ in range(n):
        B, S, T = 8, 6, 7
        tgt_len = rng.integers(2, T + 1, B)
        batch = {"source": rng.integers(4, V, (B, S)), "source_lengths": rng.integers(1, S + 1, B),
                 "target_input": rng.integers(4, V, (B, T)), "target_output": rng.integers(4, V, (B, T)),
                 "target_lengths": tgt_len}
        batch["target_input"][:, 0] = 1
        state, m = step(state, {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()})
        assert float(m["skipped"]) == 0.0
    return jax.device_get(start), jax.device_get(state)


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_rows_stay_bitwise_unchanged_after_training_steps(tmp_path, freeze):
    config = small_config(tmp_path, freeze=freeze)
    pretrained = embeddings.load_pretrained(config, VOCAB, VOCAB)
    start, end = _train_steps(config, pretrained)
    for p in pretrained:
        for tree in ("params", "ema_params"):
            before, after = getattr(start, tree)[p.param], getattr(end, tree)[p.param]
            same = np.all(before[p.found] == after[p.found])
            assert same == freeze, (p.param, tree)  # AdamW decay, clipping, EMA: nothing moves them
            # rows not found in a file train as usual (the characters of the batches)
            assert not np.array_equal(before[~p.found], after[~p.found])
    assert not np.array_equal(start.params["output_kernel"], end.params["output_kernel"])


def test_shared_and_tied_table_keeps_its_frozen_rows(tmp_path):
    config = small_config(tmp_path, share_embeddings=True, tie_output=True, target_embeddings="")
    (shared,) = embeddings.load_pretrained(config, VOCAB, VOCAB)
    assert shared.param == "target_embedding" and shared.field == "model.source_embeddings"
    start, end = _train_steps(config, [shared])
    assert "source_embedding" not in end.params and "output_kernel" not in end.params
    table0, table1 = start.params["target_embedding"], end.params["target_embedding"]
    assert np.array_equal(table1[shared.found], table0[shared.found])
    assert np.array_equal(table1[VOCAB.stoi["a"]], SOURCE["a"])
    assert not np.array_equal(table1[~shared.found], table0[~shared.found])


@pytest.mark.parametrize("content, where, fragment", [
    (None, "", "no such file"),
    ("a 0.1 0.2 0.3\n", "line 1", "3 values after the word, but the model's embeddings are 8-dimensional"),
    ("2 300\na " + "0 " * 300 + "\n", "line 1", "the header says 300-dimensional vectors"),
    ("a" + " 0.5" * DIM + "\nb 0.5 0.5\n", "line 2", "2 values after the word, expected 8"),
    ("a" + " 0.5" * DIM + "\nb" + " x" * DIM + "\n", "line 2", "not a number"),
    ("a" + " nan" * DIM + "\n", "line 1", "not finite"),
    (b"a" + b" 0.5" * DIM + b"\n\xff\xfe" + b" 0.5" * DIM + b"\n", "line 2", "not UTF-8"),
    ("\n\n", "", "holds no vectors"),
])
def test_bad_file_is_one_error_naming_file_and_line(tmp_path, content, where, fragment):
    path = tmp_path / "vectors.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    config = small_config(tmp_path)
    config = config.replace(model=dataclasses.replace(config.model, source_embeddings=str(path), target_embeddings=""))
    with pytest.raises(EmbeddingsError) as e:
        embeddings.load_pretrained(config, VOCAB, VOCAB)
    assert str(path) in str(e.value) and where in str(e.value) and fragment in str(e.value), str(e.value)


def test_cli_trains_with_frozen_pretrained_rows_and_refuses_a_bad_file(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    src = write(tmp_path / "glove.txt", {w: np.resize(v, 16) for w, v in SOURCE.items()})
    base = ["train", "--config", TINY, "--no-progress", "--set", "data.buckets=[[20,21]]", "--set", "train.steps=3",
            "--set", "train.eval_every=3", "--set", "train.eval_sentences=8", "--set", "train.checkpoint_every=3",
            "--set", f"model.source_embeddings={src}", "--set", "model.freeze_embeddings=True"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a 1 2\n")
    rc = cli.main([*base, "--workdir", str(tmp_path / "bad"), "--set", f"model.target_embeddings={bad}"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and f"{bad} line 1" in errors[0] and "model.target_embed_dim" in errors[0]
    assert not os.path.exists(tmp_path / "bad" / "checkpoints")

    workdir = tmp_path / "run"
    assert cli.main([*base, "--workdir", str(workdir)]) == 0
    assert "4 of 98 vocabulary entries found, 94 missing" in caplog.text
    state, _, step = load_state(workdir)
    assert step == 3
    sv, _ = read_vocabs(str(workdir))
    for word in ("a", "b", "q", "</s>"):
        assert np.array_equal(state.params["source_embedding"][sv.stoi[word]], np.resize(SOURCE[word], 16))
