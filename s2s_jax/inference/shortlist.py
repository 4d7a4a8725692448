"""The vocabulary shortlist (Marian's lexical shortlist): decode over a batch's likely target
pieces only, not the whole target vocabulary.

    s2s-jax shortlist --workdir RUN                       # build once, from the run's training data
    s2s-jax translate --workdir RUN --set decode.shortlist=true ...

Built once per run (`build_for_run`) from the training pairs (the piece ids the data layer
produces) and stored as `<workdir>/shortlist.npz` (`rundir.SHORTLIST_FILE`; export bundles carry
it too). It holds, for every source piece, its target pieces ranked by a lexical translation
probability t(target | source), and all target pieces ranked by frequency. Decoding a batch
(`Shortlist.candidates`) takes the union of the `decode.shortlist_top_k` best translations of
every source piece in the batch, the `decode.shortlist_frequent` most frequent target pieces and
the special ids (PAD, BOS, EOS, UNK), sorted ascending, so each special id is at its own column;
`padded_ids` pads it to one of a few static sizes (-1 = padding, scored -inf) so few programs
are compiled. The output projection, log-softmax and top-k then run over those columns only
(`Seq2Seq.candidate_output_weights`, `decoding`'s `vocab_ids`).

The score: IBM Model 1 (Brown et al. 1993) lexical probabilities, EM from a uniform start for
`ITERATIONS` rounds over every (source token, target token) pair of each sentence pair, all in
numpy arrays. Model 1 explains each target token by the source tokens of its sentence, so a piece
that co-occurs with everything (a full stop, an article) does not crowd every list; on Multi30k
(en-de, 8k joint pieces) it covers as much of test2016's reference tokens as Dice co-occurrence or
count-weighted PMI lists with 35-40 % fewer candidates per batch (docs/speed.md). Deterministic:
no sampling, ties broken by piece id, so a rebuild gives the same arrays.

Imports numpy only (bundles read the file without jax).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import numpy as np

from s2s_jax.config import UserError
from s2s_jax.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPECIAL_IDS = np.asarray(sorted((PAD_ID, BOS_ID, EOS_ID, UNK_ID)), np.int32)  # always candidates
ITERATIONS = 5  # Model 1 EM rounds
DEFAULT_TOP_K = 100  # translations kept per source piece by the build (decode uses the first top_k)
SIZE_QUANTUM = 256  # static candidate counts are multiples of this (or the whole vocabulary)
BUILD_COMMAND = "s2s-jax shortlist --workdir {workdir}"


class ShortlistError(UserError):
    """A shortlist that is missing, unreadable, or does not fit the run or the settings."""


@dataclasses.dataclass(frozen=True, eq=False)
class Shortlist:
    """translations [Vs, K] int32: per source piece its target pieces, most probable first (-1:
    none); frequent [Vt] int32: every target id, most frequent in the training targets first;
    meta: how it was built ({"format_version", "method", "iterations", "top_k", "pairs",
    "source_vocab_size", "target_vocab_size", "seconds"})."""

    translations: np.ndarray
    frequent: np.ndarray
    meta: dict

    @property
    def top_k(self) -> int:
        return int(self.translations.shape[1])

    @property
    def source_vocab_size(self) -> int:
        return int(self.translations.shape[0])

    @property
    def target_vocab_size(self) -> int:
        return int(self.frequent.shape[0])

    def check(self, *, top_k: int, source_vocab_size: int, target_vocab_size: int, where: str = "") -> None:
        """A ShortlistError unless it fits the model's vocabularies and decode.shortlist_top_k
        (decode.shortlist_frequent past the vocabulary takes all of it)."""
        if (self.source_vocab_size, self.target_vocab_size) != (source_vocab_size, target_vocab_size):
            raise ShortlistError(f"{where or 'the shortlist'}: built for vocabularies of {self.source_vocab_size} / "
                                 f"{self.target_vocab_size} pieces, the model has {source_vocab_size} / "
                                 f"{target_vocab_size}; rebuild it with `{BUILD_COMMAND.format(workdir='RUN')}`")
        if top_k > self.top_k:
            raise ShortlistError(f"decode.shortlist_top_k={top_k}: {where or 'the shortlist'} keeps {self.top_k} "
                                 f"translations per source piece; lower it, or rebuild with "
                                 f"`{BUILD_COMMAND.format(workdir='RUN')} --top-k {top_k}`")

    def candidates(self, sources, *, top_k: int, frequent: int) -> np.ndarray:
        """The target ids a batch of sources (id sequences) may produce, ascending int32 [C]:
        the special ids, the `frequent` most frequent pieces and the `top_k` best translations
        of every source piece in the batch."""
        ids = np.concatenate([np.asarray(s, np.int64).reshape(-1) for s in sources] or [np.zeros(0, np.int64)])
        picked = self.translations[np.clip(ids, 0, self.source_vocab_size - 1), :top_k].reshape(-1)
        union = np.concatenate([SPECIAL_IDS, self.frequent[:frequent], picked[picked >= 0]])
        return np.unique(union).astype(np.int32)

    def save(self, path: str) -> str:
        """Writes the arrays and meta to `path` (.npz) atomically."""
        tmp = f"{path}.tmp{os.getpid()}.npz"
        np.savez(tmp, translations=self.translations, frequent=self.frequent, meta=np.asarray(json.dumps(self.meta)))
        os.replace(tmp, path)
        return path


def load(path: str) -> Shortlist:
    """The shortlist written by `Shortlist.save`; a ShortlistError when it is unreadable."""
    try:
        with np.load(path, allow_pickle=False) as f:
            shortlist = Shortlist(f["translations"].astype(np.int32), f["frequent"].astype(np.int32),
                                  json.loads(str(f["meta"])))
    except (OSError, ValueError, KeyError) as e:
        raise ShortlistError(f"{path}: unreadable shortlist ({type(e).__name__}); rebuild it with "
                             f"`{BUILD_COMMAND.format(workdir='RUN')}`") from None
    if shortlist.meta.get("format_version", 0) > FORMAT_VERSION:
        raise ShortlistError(f"{path}: written by a newer s2s_jax (format {shortlist.meta['format_version']}); "
                             f"upgrade, or rebuild it with `{BUILD_COMMAND.format(workdir='RUN')}`")
    return shortlist


def static_size(count: int, vocab_size: int) -> int:
    """The padded candidate count for `count` candidates: the next of 256, 512, ..., with four
    steps per doubling above 1024 (so at most 25 % padding), or the whole vocabulary when that
    is no larger; each size is one decode program."""
    step = max(SIZE_QUANTUM, 1 << max(int(count).bit_length() - 3, 0))
    size = -(-max(int(count), 1) // step) * step
    return min(size, vocab_size)


def padded_ids(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """Ascending candidate ids [C] -> [static_size(C)] int32, padded with -1 (scored -inf)."""
    out = np.full((static_size(len(ids), vocab_size),), -1, np.int32)
    out[:len(ids)] = ids
    return out


# -- building ---------------------------------------------------------------------------------

def _pair_tokens(sources, targets):
    """Every (source token, target token) pair within each sentence pair, as flat arrays:
    (source ids [E], target occurrence [E] (index into the concatenated targets), target ids
    [E]); E = sum over pairs of |source| * |target|."""
    s_len = np.asarray([len(s) for s in sources], np.int64)
    t_len = np.asarray([len(t) for t in targets], np.int64)
    s_all = np.concatenate([np.asarray(s, np.int64) for s in sources])
    t_all = np.concatenate([np.asarray(t, np.int64) for t in targets])
    s_start = np.cumsum(s_len) - s_len
    pair_of_t = np.repeat(np.arange(len(t_len)), t_len)  # [Nt] sentence pair of each target token
    per_target = s_len[pair_of_t]  # source tokens each target token pairs with
    occurrence = np.repeat(np.arange(len(t_all)), per_target)  # [E]
    offset = np.arange(len(occurrence)) - np.repeat(np.cumsum(per_target) - per_target, per_target)
    source_ids = s_all[np.repeat(s_start[pair_of_t], per_target) + offset]
    return source_ids, occurrence, t_all[occurrence], t_all


def model1(sources, targets, target_vocab_size: int, iterations: int = ITERATIONS):
    """IBM Model 1 t(target | source) by EM from a uniform start -> (source ids [P], target ids
    [P], probability [P]) of every pair of pieces seen together in a sentence pair."""
    source_ids, occurrence, target_ids, _ = _pair_tokens(sources, targets)
    code, inverse = np.unique(source_ids * target_vocab_size + target_ids, return_inverse=True)
    pair_source = code // target_vocab_size
    prob = np.ones(len(code))
    for _ in range(iterations):
        p = prob[inverse]  # E-step: each target token's alignment posterior over its sentence's source tokens
        posterior = p / np.bincount(occurrence, weights=p)[occurrence]
        counts = np.bincount(inverse, weights=posterior, minlength=len(code))  # M-step
        prob = counts / np.bincount(pair_source, weights=counts)[pair_source]
    return pair_source, code % target_vocab_size, prob


def ranked_table(pair_source, pair_target, score, source_vocab_size: int, top_k: int) -> np.ndarray:
    """[Vs, top_k] int32: per source id its targets by score, highest first (ties: lower id
    first), -1 where it has fewer."""
    order = np.lexsort((pair_target, -score, pair_source))
    by_source = pair_source[order]
    rank = np.arange(len(order)) - np.searchsorted(by_source, by_source)
    keep = rank < top_k
    table = np.full((source_vocab_size, top_k), -1, np.int32)
    table[by_source[keep], rank[keep]] = pair_target[order][keep]
    return table


def build(sources, targets, source_vocab_size: int, target_vocab_size: int, *, top_k: int = DEFAULT_TOP_K,
          iterations: int = ITERATIONS) -> Shortlist:
    """The shortlist of parallel id sequences (sources[i] translates to targets[i]; no BOS/EOS)."""
    if top_k < 1 or iterations < 1:
        raise UserError(f"--top-k {top_k} / iterations {iterations}: both must be at least 1")
    pairs = [(s, t) for s, t in zip(sources, targets) if len(s) and len(t)]
    if not pairs:
        raise UserError("the shortlist needs training pairs with a non-empty source and target; found none")
    start = time.perf_counter()
    sources, targets = [s for s, _ in pairs], [t for _, t in pairs]
    pair_source, pair_target, prob = model1(sources, targets, target_vocab_size, iterations)
    table = ranked_table(pair_source, pair_target, prob, source_vocab_size, top_k)
    counts = np.bincount(np.concatenate([np.asarray(t, np.int64) for t in targets]), minlength=target_vocab_size)
    frequent = np.argsort(-counts, kind="stable").astype(np.int32)  # ties: lower id first
    meta = {"format_version": FORMAT_VERSION, "method": "ibm_model1", "iterations": iterations, "top_k": top_k,
            "pairs": len(pairs), "source_vocab_size": source_vocab_size, "target_vocab_size": target_vocab_size,
            "seconds": round(time.perf_counter() - start, 2)}
    return Shortlist(table, frequent, meta)


def build_for_run(workdir: str, *, top_k: int = DEFAULT_TOP_K, iterations: int = ITERATIONS,
                  data_dir: str | None = None) -> dict:
    """Builds the shortlist of a run from its training split (prepared as the run's data
    config says, the corpus read from `data_dir` if given; the cached preparation is reused)
    and writes `<workdir>/shortlist.npz`. Returns its meta with "path"."""
    from s2s_jax import config as config_lib
    from s2s_jax import rundir
    from s2s_jax.data import build_data

    rundir.require_run(workdir)
    if top_k < 1 or iterations < 1:
        raise UserError(f"--top-k {top_k} / --iterations {iterations}: both must be at least 1")
    config = rundir.read_config(workdir)
    if data_dir is not None:
        config = config_lib.override(config, [f"data.dir={data_dir}"])
    source_vocab, target_vocab = rundir.read_vocabs(workdir)
    # With the workdir, the data layer refuses a corpus whose vocabulary is not the run's.
    sources, targets = build_data(config, workdir).training_ids()
    shortlist = build(sources, targets, source_vocab.vocab_size, target_vocab.vocab_size, top_k=top_k,
                      iterations=iterations)
    path = shortlist.save(rundir.shortlist_path(workdir))
    log.info("shortlist: %d pairs, top %d per source piece, in %.1fs -> %s", shortlist.meta["pairs"], top_k,
             shortlist.meta["seconds"], path)
    return dict(shortlist.meta, path=path)


def for_decoding(directory: str, config, source_vocab_size: int, target_vocab_size: int, *,
                 workdir_flag: str = "--workdir") -> Shortlist | None:
    """The shortlist a Translator decodes with: None when decode.shortlist is off; else the one
    in `directory` (a run or a bundle), checked against the settings and vocabularies
    (a ShortlistError naming the build command when it is missing or does not fit)."""
    from s2s_jax import rundir

    dc = config.decode
    if not dc.shortlist:
        return None
    if config.model.copy_attention:
        raise ShortlistError("decode.shortlist=true: a model.copy_attention model scores the whole vocabulary and "
                             "the source's words at every step; leave decode.shortlist=false")
    path = rundir.shortlist_path(directory)
    if not os.path.isfile(path):
        raise ShortlistError(f"decode.shortlist=true: {workdir_flag} {directory} has no {rundir.SHORTLIST_FILE}; "
                             f"build it with `{BUILD_COMMAND.format(workdir=directory)}` (or leave "
                             f"decode.shortlist=false)")
    shortlist = load(path)
    shortlist.check(top_k=dc.shortlist_top_k, source_vocab_size=source_vocab_size,
                    target_vocab_size=target_vocab_size, where=path)
    return shortlist
