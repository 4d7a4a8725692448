"""SentencePiece tokenizers (trained in-process) and loading of vocabularies by description.

Both vocabulary kinds share one interface and the special ids of `vocab.py` (PAD=0, BOS=1,
EOS=2, UNK=3): `encode(str) -> list[int]` (no BOS/EOS), `decode(ids) -> str` (stops at EOS,
skips PAD/BOS), `pieces(ids) -> list[str]`, `vocab_size`, `to_json() -> dict`.
"""

from __future__ import annotations

import json
import os
import re

import sentencepiece as spm

from s2s_jax.data.errors import DataError
from s2s_jax.data.vocab import BOS_ID, EOS_ID, PAD_ID, SPECIALS, UNK_ID, CharVocab

VOCAB_JSON = "vocab.json"


class SentencePieceVocab:
    """A trained SentencePiece model with the project's special ids."""

    kind = "sentencepiece"

    def __init__(self, model_file: str):
        self.model_file = model_file
        with open(model_file, "rb") as f:
            self.model_proto = f.read()
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        ids = (self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id())
        if ids != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
            raise DataError(f"{model_file}: SentencePiece model has special ids pad/bos/eos/unk={ids}, "
                            f"expected (0, 1, 2, 3); retrain it with s2s_jax prepare")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encodes many sentences in one C++ call (much faster than a Python loop)."""
        return self.sp.encode(texts, out_type=int)

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID) or not 0 <= i < self.vocab_size:
                continue
            out.append(i)
        return self.sp.decode(out)

    def pieces(self, ids) -> list[str]:
        """Per-token strings, for attention plots."""
        n = self.vocab_size
        return [self.sp.id_to_piece(int(i)) if 0 <= int(i) < n else "?" for i in ids]

    def to_json(self) -> dict:
        return {"kind": "sentencepiece", "model": os.path.basename(self.model_file),
                "vocab_size": self.vocab_size}


_TOO_HIGH = re.compile(r"Vocabulary size (?:is )?too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def train_sentencepiece(sentences, model_prefix: str, *, vocab_size: int, model_type: str,
                        character_coverage: float, what: str) -> SentencePieceVocab:
    """Trains a SentencePiece model on an iterable of normalised sentences, in-process.

    Writes `model_prefix.model` / `.vocab`. `what` names the training text in error messages.
    A vocabulary size the corpus cannot support is a DataError saying which size works.
    """
    sentences = list(sentences)
    kwargs = dict(
        sentence_iterator=iter(sentences), model_prefix=model_prefix, vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage,
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
        pad_piece=SPECIALS[0], bos_piece=SPECIALS[1], eos_piece=SPECIALS[2], unk_piece=SPECIALS[3],
        # The text is already normalised by us (normalize()); "identity" keeps SentencePiece from
        # applying its own NFKC a second time, so data.normalization=none really means none.
        normalization_rule_name="identity",
        # Bounded memory/time on big corpora: a seeded random sample of 2M sentences is plenty.
        input_sentence_size=2_000_000, shuffle_input_sentence=True, seed_sentencepiece_size=1_000_000,
        max_sentence_length=16384, num_threads=max(1, min(4, os.cpu_count() or 1)),
        train_extremely_large_corpus=False, minloglevel=2,
    )
    if model_type == "word":
        kwargs["split_by_whitespace"] = True
    try:
        spm.SentencePieceTrainer.train(**kwargs)
    except RuntimeError as e:
        msg = str(e)
        m = _TOO_HIGH.search(msg)
        if m:
            raise DataError(f"{what}: data.vocab_size={vocab_size} is more than this corpus supports "
                            f"for a {model_type} model; lower data.vocab_size to at most {m.group(2)}") from None
        m = _TOO_SMALL.search(msg)
        if m:
            raise DataError(f"{what}: data.vocab_size={vocab_size} is smaller than the {m.group(2)} distinct "
                            f"characters needed; raise data.vocab_size to more than {m.group(2)} or lower "
                            f"data.spm_character_coverage (e.g. 0.9995)") from None
        raise DataError(f"{what}: SentencePiece training failed ({msg.strip().splitlines()[-1] if msg.strip() else msg}); "
                        f"check data.vocab_size / data.spm_model_type / data.spm_character_coverage") from None
    return SentencePieceVocab(model_prefix + ".model")


def vocab_from_json(desc: dict, directory: str):
    """Rebuilds a vocabulary from its `to_json()` description; model files live in `directory`."""
    kind = desc.get("kind")
    if kind == "char":
        return CharVocab()
    if kind == "sentencepiece":
        path = os.path.join(directory, desc["model"])
        if not os.path.isfile(path):
            raise DataError(f"{path}: SentencePiece model missing; copy the run's vocab/ folder back "
                            f"or retrain in a new workdir")
        return SentencePieceVocab(path)
    raise DataError(f"{os.path.join(directory, VOCAB_JSON)}: unknown vocabulary kind {kind!r}; "
                    f"it was written by a different s2s_jax version")


def write_vocab_json(directory: str, source_vocab, target_vocab) -> None:
    with open(os.path.join(directory, VOCAB_JSON), "w", encoding="utf-8") as f:
        json.dump({"source": source_vocab.to_json(), "target": target_vocab.to_json()}, f, indent=2,
                  sort_keys=True)


def read_vocab_dir(directory: str):
    """(source_vocab, target_vocab) from a folder holding vocab.json and the model files."""
    path = os.path.join(directory, VOCAB_JSON)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no vocabulary description; pass the workdir of a run trained with "
                        f"s2s_jax (it writes workdir/vocab/), or train one first")
    with open(path, encoding="utf-8") as f:
        desc = json.load(f)
    return vocab_from_json(desc["source"], directory), vocab_from_json(desc["target"], directory)
