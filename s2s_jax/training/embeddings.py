"""Pretrained embeddings: word2vec / GloVe text files aligned to the run's vocabulary.

    model.source_embeddings / model.target_embeddings   paths of vector files
    model.freeze_embeddings                            hold the rows they fill fixed in training

File format (text): one `word v1 ... vd` per line, separated by single spaces (GloVe); word2vec's
text format adds a first line `count dim`, recognised and checked. A word may contain spaces
(GloVe 840B has a few): the last d fields are the vector. Blank lines are skipped; the first
occurrence of a word wins.

Alignment: row i of a table gets the vector of vocabulary entry i — the piece itself, or for a
SentencePiece piece that starts a word ("▁the") the word without the marker ("the"). The padding
row and entries not found keep the normal initialisation; the counts are logged. With
model.share_embeddings the one table is filled from either file.

Every problem with a file (missing, not UTF-8, a line with too few or non-numeric values, a
dimension other than the model's) is a UserError naming the file and the line. Reading needs
numpy only; applying the rows to a train state (`apply`) needs jax.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from s2s_jax.config import Config, UserError
from s2s_jax.data import PAD_ID

log = logging.getLogger(__name__)

WORD_START = "\u2581"  # SentencePiece's word-start marker


class EmbeddingsError(UserError):
    """A pretrained-embeddings file that cannot be used; names the file and line."""


@dataclasses.dataclass
class Pretrained:
    """One embedding table's pretrained rows."""

    param: str  # parameter name: "source_embedding" | "target_embedding"
    field: str  # config field the file came from, e.g. "model.source_embeddings"
    path: str
    vectors: np.ndarray  # float32 [V, d]; zero rows where not found
    found: np.ndarray  # bool [V]: rows taken from the file

    @property
    def missing(self) -> int:
        """Vocabulary entries (padding excluded) the file has no vector for."""
        return int(len(self.found) - 1 - self.found.sum())


def read_vectors(path: str, dim: int, field: str, wanted: set[str]) -> dict[str, np.ndarray]:
    """{word: float32 [dim]} for the words of `wanted` that the file holds.

    Every line's field count is checked; values are parsed for the wanted words only (a
    400k-word GloVe file is read in seconds).
    """
    if not os.path.isfile(path):
        raise EmbeddingsError(f"{field}={path!r}: no such file; give the path of a word2vec/GloVe text file")
    out: dict[str, np.ndarray] = {}
    seen_vector = False
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise EmbeddingsError(f"{path} line {line_no}: not UTF-8 text ({field}); word2vec binary "
                                      "files must be converted to the text format first") from None
            parts = line.rstrip(" ").split(" ")
            if not line.strip():
                continue
            if line_no == 1 and len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                if int(parts[1]) != dim:
                    raise EmbeddingsError(f"{path} line 1: the header says {parts[1]}-dimensional vectors, but "
                                          f"the model's embeddings are {dim}-dimensional ({_dim_field(field)}); "
                                          f"set {_dim_field(field)}={parts[1]} or use {dim}-dimensional vectors")
                continue
            if not seen_vector and len(parts) - 1 != dim:
                raise EmbeddingsError(f"{path} line {line_no}: {len(parts) - 1} values after the word, but the "
                                      f"model's embeddings are {dim}-dimensional ({_dim_field(field)}); set "
                                      f"{_dim_field(field)}={len(parts) - 1} or use {dim}-dimensional vectors")
            seen_vector = True
            if len(parts) < dim + 1:
                raise EmbeddingsError(f"{path} line {line_no}: {len(parts) - 1} values after the word, expected "
                                      f"{dim}; the file is truncated or garbled ({field})")
            word = " ".join(parts[:-dim])
            if word in wanted and word not in out:
                try:
                    vector = np.asarray(parts[-dim:], dtype=np.float32)
                except ValueError:
                    raise EmbeddingsError(f"{path} line {line_no}: a value of {word!r} is not a number; the "
                                          f"file is garbled ({field})") from None
                if not np.all(np.isfinite(vector)):
                    raise EmbeddingsError(f"{path} line {line_no}: the vector of {word!r} is not finite ({field})")
                out[word] = vector
    if not seen_vector:
        raise EmbeddingsError(f"{path}: holds no vectors ({field}); give a word2vec/GloVe text file")
    return out


def _dim_field(field: str) -> str:
    return "model.source_embed_dim" if "source" in field else "model.target_embed_dim"


def _candidates(piece: str) -> list[str]:
    """The words a vocabulary entry may be found under, best first."""
    if piece.startswith(WORD_START) and len(piece) > 1:
        return [piece, piece[1:]]
    return [piece]


def align(vectors: dict[str, np.ndarray], pieces: list[str], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [V, dim] rows, bool [V] found) for a vocabulary given as its pieces; the padding
    row is never filled."""
    table = np.zeros((len(pieces), dim), np.float32)
    found = np.zeros(len(pieces), bool)
    for i, piece in enumerate(pieces):
        if i == PAD_ID:
            continue
        for word in _candidates(piece):
            if word in vectors:
                table[i], found[i] = vectors[word], True
                break
    return table, found


def _tables(config: Config) -> list[tuple[str, str, str, str]]:
    """[(parameter name, config field, path, "source" | "target")] of the configured files."""
    m = config.model
    if m.share_embeddings:  # one table (target_embedding) holds both sides
        path = m.source_embeddings or m.target_embeddings
        field = "model.source_embeddings" if m.source_embeddings else "model.target_embeddings"
        return [("target_embedding", field, path, "target")] if path else []
    out = []
    if m.source_embeddings:
        out.append(("source_embedding", "model.source_embeddings", m.source_embeddings, "source"))
    if m.target_embeddings:
        out.append(("target_embedding", "model.target_embeddings", m.target_embeddings, "target"))
    return out


def load_pretrained(config: Config, source_vocab, target_vocab) -> list[Pretrained]:
    """The configured files read and aligned to the vocabularies (empty when none is set)."""
    out = []
    for param, field, path, side in _tables(config):
        vocab = source_vocab if side == "source" else target_vocab
        dim = config.model.source_embed_dim if side == "source" else config.model.target_embed_dim
        pieces = vocab.pieces(list(range(vocab.vocab_size)))
        wanted = {w for p in pieces for w in _candidates(p)}
        table, found = align(read_vectors(path, dim, field, wanted), pieces, dim)
        p = Pretrained(param, field, path, table, found)
        log.info("%s %s: %d of %d vocabulary entries found, %d missing (they keep the normal initialisation)%s",
                 field, path, int(found.sum()), len(found) - 1, p.missing,
                 "; found rows frozen" if config.model.freeze_embeddings else "")
        if config.model.freeze_embeddings and config.model.tie_output and param == "target_embedding":
            log.warning("%s: model.tie_output=True: the frozen target rows are output-projection rows too", field)
        out.append(p)
    return out


def apply(state, pretrained: list[Pretrained]):
    """A fresh train state with the pretrained rows copied into its parameters (and EMA)."""
    if not pretrained:
        return state
    import jax.numpy as jnp

    def fill(params):
        params = dict(params)
        for p in pretrained:
            params[p.param] = jnp.where(jnp.asarray(p.found)[:, None], jnp.asarray(p.vectors), params[p.param])
        return params

    ema = fill(state.ema_params) if state.ema_params is not None else None
    return state.replace(params=fill(state.params), ema_params=ema)


def frozen_rows(config: Config, pretrained: list[Pretrained]) -> dict | None:
    """{parameter name: bool [V]} for steps.train_step, or None when nothing is frozen."""
    if not config.model.freeze_embeddings or not pretrained:
        return None
    import jax.numpy as jnp

    return {p.param: jnp.asarray(p.found) for p in pretrained}
