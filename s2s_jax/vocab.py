"""Special ids, the two vocabulary kinds and the input normalisation: defined once, used everywhere.

The trainer side (data/, steps, decoding) and the inference side (Translator, export bundle
runtime, server) import these names from here; nothing else defines them. This module needs
only the standard library (and `sentencepiece` for SentencePiece vocabularies), so the bundle
runtime can use it without flax, optax, orbax, grain or TFDS.

Both vocabulary kinds share one interface: `encode(str) -> list[int]` (no BOS/EOS),
`encode_batch(list[str])`, `decode(ids) -> str` (stops at EOS, skips PAD/BOS), `pieces(ids)`,
`vocab_size`, `to_json() -> dict` (its description in vocab.json).
"""

from __future__ import annotations

import json
import os
import sys
import unicodedata

from s2s_jax.config import UserError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
VOCAB_JSON = "vocab.json"


class VocabError(UserError):
    """A vocabulary that cannot be loaded (missing model file, wrong special ids, unknown kind)."""


# -- text normalisation (what prepare applies to every sentence, and inference to every input) ---

# Every Unicode space separator (category Zs: no-break U+00A0, narrow no-break U+202F, thin,
# figure, ideographic ...) becomes a plain space. NFKC already does this for most of them, but
# NFC and "none" do not, and SentencePiece would otherwise learn pieces that differ only in an
# invisible space (French typography in Tatoeba puts U+202F before "!" and "?").
# So does every C0/C1 control character but tab (U+0000-U+0008, U+000A-U+001F, U+007F-U+009F:
# a stray ESC, CR or NUL inside a line is invisible and would become a piece of its own); tab
# stays. prepare counts those inside training lines (data/text.py, CONTROL_CHARACTERS).
CONTROL_CHARACTERS = "".join(chr(c) for c in (*range(0x00, 0x09), *range(0x0A, 0x20), *range(0x7F, 0xA0)))
_SPACE_TABLE = str.maketrans({c: " " for c in range(sys.maxunicode + 1)
                              if unicodedata.category(chr(c)) == "Zs" and c != 0x20 or chr(c) in CONTROL_CHARACTERS})

NORMALIZATION_FORMS = {"nfkc": "NFKC", "nfc": "NFC", "none": None}


def normalize(text: str, form: str = "nfkc") -> str:
    """Unicode-normalises `text` (form: nfkc | nfc | none), maps every space separator and every
    control character but tab to ' ' and strips surrounding whitespace. Idempotent."""
    if form not in NORMALIZATION_FORMS:
        raise ValueError(f"unknown normalization {form!r}; choose one of {', '.join(NORMALIZATION_FORMS)}")
    uform = NORMALIZATION_FORMS[form]
    if uform is not None:
        text = unicodedata.normalize(uform, text)
    return text.translate(_SPACE_TABLE).strip()


def input_normalization(data_config) -> str | None:
    """The normalisation prepare applied to a run's sentences (None: none at all).

    data_config: the run's `config.data` (a DataConfig or its dict from config.json). Built-in
    tasks are generated text that prepare never normalises; text and TFDS corpora get
    `data.normalization`.
    """
    get = data_config.get if isinstance(data_config, dict) else lambda k, d=None: getattr(data_config, k, d)
    if get("source", "task") == "task":
        return None
    return get("normalization", "nfkc")


# -- vocabularies --------------------------------------------------------------------------

def _content_ids(ids):
    """The ids a decoder turns into text: up to the first EOS, without PAD and BOS."""
    for i in ids:
        i = int(i)
        if i == EOS_ID:
            return
        if i not in (PAD_ID, BOS_ID):
            yield i


class CharVocab:
    """Character vocabulary of the built-in tasks: the 4 specials, then printable ASCII (or the
    `itos` a bundle stores)."""

    kind = "char"

    def __init__(self, itos=None):
        self.itos = list(itos) if itos is not None else list(SPECIALS) + [chr(c) for c in range(32, 127)]
        self.stoi = {s: i for i, s in enumerate(self.itos)}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(ch, UNK_ID) for ch in text]

    def encode_batch(self, texts) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return "".join(self.itos[i] if 0 <= i < len(self.itos) and i != UNK_ID else "?" for i in _content_ids(ids))

    def pieces(self, ids) -> list[str]:
        """Per-token strings, for attention plots and JSON output."""
        return [self.itos[int(i)] if 0 <= int(i) < len(self.itos) else "?" for i in ids]

    def surfaces(self, text: str) -> list[str]:
        """The text of each token `encode(text)` gives (copy attention's unknown words)."""
        return list(text)

    def to_json(self) -> dict:
        return {"kind": "char"}


class WordVocab:
    """Whitespace-separated words (built-in tasks with data.spm_model_type="word"): the 4
    specials, then the words of at least two training examples, most frequent first (at most
    data.vocab_size entries in all); any other word is UNK (copy attention can still copy it)."""

    kind = "word"

    def __init__(self, itos):
        self.itos = list(itos)
        self.stoi = {s: i for i, s in enumerate(self.itos)}

    @classmethod
    def build(cls, texts, vocab_size: int) -> "WordVocab":
        counts: dict[str, int] = {}
        for t in texts:  # one text per example (source and target together): a word counts once in it
            for w in dict.fromkeys(t.split()):
                counts[w] = counts.get(w, 0) + 1
        words = sorted((w for w, c in counts.items() if c >= 2), key=lambda w: -counts[w])  # stable: first seen
        return cls(list(SPECIALS) + words[:max(vocab_size - len(SPECIALS), 0)])

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(w, UNK_ID) for w in text.split()]

    def encode_batch(self, texts) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return " ".join(self.itos[i] if 0 <= i < len(self.itos) else "?" for i in _content_ids(ids))

    def pieces(self, ids) -> list[str]:
        return [self.itos[int(i)] if 0 <= int(i) < len(self.itos) else "?" for i in ids]

    def surfaces(self, text: str) -> list[str]:
        return text.split()

    def to_json(self) -> dict:
        return {"kind": "word", "itos": self.itos}


class SentencePieceVocab:
    """A trained SentencePiece model with the project's special ids."""

    kind = "sentencepiece"

    def __init__(self, model_file: str):
        import sentencepiece as spm

        self.model_file = model_file
        with open(model_file, "rb") as f:
            self.model_proto = f.read()
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        ids = (self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id())
        if ids != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
            raise VocabError(f"{model_file}: SentencePiece model has special ids pad/bos/eos/unk={ids}, "
                             f"expected (0, 1, 2, 3); retrain it with s2s_jax prepare")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts) -> list[list[int]]:
        """Encodes many sentences in one C++ call (much faster than a Python loop)."""
        return self.sp.encode(list(texts), out_type=int)

    def decode(self, ids) -> str:
        return self.sp.decode([i for i in _content_ids(ids) if 0 <= i < self.vocab_size])

    def pieces(self, ids) -> list[str]:
        """Per-token strings, for attention plots and JSON output."""
        n = self.vocab_size
        return [self.sp.id_to_piece(int(i)) if 0 <= int(i) < n else "?" for i in ids]

    def surfaces(self, text: str) -> list[str]:
        """The text each piece of `encode(text)` covers (copy attention's unknown words)."""
        return [p.surface for p in self.sp.encode(text, return_type="proto").pieces]

    def to_json(self) -> dict:
        return {"kind": "sentencepiece", "model": os.path.basename(self.model_file),
                "vocab_size": self.vocab_size}


def vocab_from_json(desc: dict, directory: str):
    """Rebuilds a vocabulary from its `to_json()` description; model files live in `directory`."""
    kind = desc.get("kind")
    if kind == "char":
        return CharVocab(desc.get("itos"))
    if kind == "word":
        return WordVocab(desc["itos"])
    if kind == "sentencepiece":
        path = os.path.join(directory, desc["model"])
        if not os.path.isfile(path):
            raise VocabError(f"{path}: SentencePiece model missing; copy the run's vocab/ folder back "
                             f"or retrain in a new workdir")
        return SentencePieceVocab(path)
    raise VocabError(f"{os.path.join(directory, VOCAB_JSON)}: unknown vocabulary kind {kind!r}; "
                     f"it was written by a different s2s_jax version")


def write_vocab_json(directory: str, source_vocab, target_vocab) -> None:
    with open(os.path.join(directory, VOCAB_JSON), "w", encoding="utf-8") as f:
        json.dump({"source": source_vocab.to_json(), "target": target_vocab.to_json()}, f, indent=2,
                  sort_keys=True)


def read_vocab_dir(directory: str):
    """(source_vocab, target_vocab) from a folder holding vocab.json and the model files."""
    path = os.path.join(directory, VOCAB_JSON)
    if not os.path.isfile(path):
        raise VocabError(f"{path}: no vocabulary description; pass the workdir of a run trained with "
                         f"s2s_jax (it writes workdir/vocab/), or train one first")
    try:
        with open(path, encoding="utf-8") as f:
            desc = json.load(f)
        source, target = desc["source"], desc["target"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise VocabError(f"{path}: not a valid vocabulary description (truncated or corrupt); copy the "
                         f"run's vocab/ folder back or retrain") from None
    return vocab_from_json(source, directory), vocab_from_json(target, directory)


# -- copy attention's per-sentence extended ids ------------------------------------------------

def extended_ids(vocab, source_ids, source_words, target_ids=None, target_words=None):
    """Copy attention's dynamic vocabulary of one sentence: each distinct source word that is
    UNK in `vocab` gets id V + k (k-th such word), and a target UNK whose word is one of them
    gets that id. source_words/target_words: the text of each token (`vocab.surfaces`).
    Returns (source_ext, target_ext or None, unknown words [k -> word])."""
    V = vocab.vocab_size
    unknown: dict[str, int] = {}
    src = [int(i) for i in source_ids]
    for n, i in enumerate(src):
        if i == UNK_ID and n < len(source_words):
            src[n] = V + unknown.setdefault(source_words[n], len(unknown))
    tgt = None
    if target_ids is not None:
        tgt = [int(i) for i in target_ids]
        for n, i in enumerate(tgt):
            if i == UNK_ID and n < len(target_words) and target_words[n] in unknown:
                tgt[n] = V + unknown[target_words[n]]
    return src, tgt, list(unknown)


def decode_extended(vocab, ids, words) -> tuple[str, list[str]]:
    """(text, pieces) of output ids that may hold extended ids (>= V: words[id - V], the
    source's unknown words, written as they were in the source)."""
    V = vocab.vocab_size
    ids = list(_content_ids(ids))
    if all(i < V for i in ids):
        return vocab.decode(ids), vocab.pieces(ids)
    pieces = [words[i - V] if i >= V else vocab.pieces([i])[0] for i in ids]
    if vocab.kind == "sentencepiece":  # in-vocabulary runs decode as SentencePiece does
        out, run = [], []
        for i in ids + [None]:
            if i is not None and i < V:
                run.append(i)
                continue
            if run:
                out.append(vocab.decode(run))
                run = []
            if i is not None:
                out.append(words[i - V])
        return " ".join(o for o in out if o), pieces
    sep = "" if vocab.kind == "char" else " "
    return sep.join(pieces), pieces
