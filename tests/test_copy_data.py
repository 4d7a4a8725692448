"""Copy attention's data side: the per-sentence extended ids (vocab.extended_ids), the batch's
COPY_FIELDS, the word vocabulary of built-in tasks, the copy_names task's unseen test names,
and writing copied words back as text (vocab.decode_extended)."""

from __future__ import annotations

import numpy as np

from s2s_jax.data import tasks
from s2s_jax.data.batch import COPY_FIELDS, model_inputs, pad_rows
from s2s_jax.vocab import EOS_ID, UNK_ID, CharVocab, WordVocab, decode_extended, extended_ids, vocab_from_json


def test_extended_ids_number_distinct_unknown_words_and_map_targets():
    v = WordVocab(["<pad>", "<s>", "</s>", "<unk>", "met", "and", "hi"])  # V = 7
    src_text, tgt_text = "Ann met Bob and Ann", "hi Bob Ann Cy"
    src, tgt, words = extended_ids(v, v.encode(src_text), v.surfaces(src_text), v.encode(tgt_text),
                                   v.surfaces(tgt_text))
    assert src == [7, 4, 8, 5, 7]  # Ann = V + 0 (twice), Bob = V + 1
    assert tgt == [6, 8, 7, UNK_ID]  # Cy is not in the source: UNK
    assert words == ["Ann", "Bob"]
    text, pieces = decode_extended(v, [6, 8, 7, UNK_ID, EOS_ID, 5], words)
    assert text == "hi Bob Ann <unk>" and pieces == ["hi", "Bob", "Ann", "<unk>"]


def test_pad_rows_adds_the_copy_fields_padded_like_source_and_target_output():
    rows = [([5, 3], [3, 6]), ([4], [4])]
    ext = [([5, 20], [20, 6]), ([4], [4])]
    b = pad_rows(rows, np.array([0, 1, -1]), (3, 4), ext)
    np.testing.assert_array_equal(b["source_ext"], [[5, 20, 0], [4, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(b["target_ext"], [[20, 6, EOS_ID, 0], [4, EOS_ID, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(b["source"], [[5, 3, 0], [4, 0, 0], [0, 0, 0]])
    assert set(COPY_FIELDS) <= set(model_inputs(b))
    assert not set(COPY_FIELDS) & set(model_inputs(pad_rows(rows, np.array([0, 1]), (3, 4))))


def test_word_vocab_keeps_words_of_two_examples_and_round_trips_json():
    v = WordVocab.build(["a b Zed", "a c Zed", "a b Quo"], 100)
    assert v.itos[4:] == ["a", "b", "Zed"]  # c and Quo occur in one example only
    assert WordVocab.build(["a b Zed", "a c Zed", "a b Quo"], 6).itos[4:] == ["a", "b"]
    assert vocab_from_json(v.to_json(), ".").itos == v.itos
    assert v.encode("a Quo") == [4, UNK_ID] and v.surfaces("a  Quo") == ["a", "Quo"]
    assert CharVocab().surfaces("ab") == ["a", "b"]


def test_copy_names_test_names_never_occur_in_training():
    splits = tasks.generate_splits("copy_names", 3000, 200, 5)
    common = {w for s, t in tasks.NAME_TEMPLATES for w in (s + " " + t).split()}
    train_words = {w for s, _ in splits["train"] for w in s.split()}
    for role in ("valid", "test"):
        assert len(splits[role]) == 200
        for s, t in splits[role]:
            names = [w for w in s.split() if w not in common]
            assert len(names) == 2 and not train_words.intersection(names)
            assert all(n in t.split() for n in names)


def test_sentencepiece_surfaces_cover_the_text_of_each_encoded_piece(tmp_path):
    # Copy attention on a SentencePiece corpus reads each piece's surface (vocab.surfaces); the
    # sentencepiece wheel we pin refuses out_type="immutable_proto", which broke DialogSum + copy.
    from s2s_jax.data.tokenizer import train_sentencepiece

    lines = ["the cat sat on the mat", "a dog ran to the park", "the bird sang a song"] * 30
    v = train_sentencepiece(lines, str(tmp_path / "spm"), vocab_size=28, model_type="unigram",
                            character_coverage=1.0, what="test lines")
    text = "the cat sang to Zed"
    surfaces = v.surfaces(text)
    assert len(surfaces) == len(v.encode(text))
    assert "".join(surfaces).replace(" ", "") == text.replace(" ", "")
