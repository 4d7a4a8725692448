"""Batched translation of token ids or text with a trained model (greedy or beam search).

Sentences are sorted by length, cut into batches of `decode.batch_size`, padded to a few fixed
shapes (rows to a power of two, source length to a multiple of 8) so that only a handful of
programs are ever compiled, decoded under jit, and returned in input order.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from s2s_jax import steps
from s2s_jax.config import Config
from s2s_jax.model import Seq2Seq

LENGTH_MULTIPLE = 8


def _round_up(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


class Translator:
    def __init__(self, config: Config, model: Seq2Seq, params, source_vocab, target_vocab):
        self.config = config
        self.model = model
        self.params = params
        self.source_vocab = source_vocab
        self.target_vocab = target_vocab
        self._compiled = {}

    def _decoder(self, beam: int, nbest: int, max_len: int):
        key = (beam, nbest, max_len)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(functools.partial(
                steps.decode_batch, model=self.model, config=self.config, beam_size=beam, nbest=nbest,
                max_len=max_len))
        return self._compiled[key]

    def max_len_for(self, source_len: int) -> int:
        dc = self.config.decode
        return max(1, int(math.floor(dc.max_len_a * source_len + dc.max_len_b)))

    def translate_ids(self, sources: Sequence[Sequence[int]], *, beam: int = 1, nbest: int = 1,
                      attention: bool = False, batch_size: int | None = None) -> list[dict]:
        """Decodes token-id sequences. Returns, in input order, one dict per sentence:
        {"tokens": [nbest lists of ids without EOS], "scores": [nbest floats], "attention": [T, S] (best)}.
        """
        batch_size = batch_size or self.config.decode.batch_size
        order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
        results: list[dict | None] = [None] * len(sources)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            rows = 1 << (len(idx) - 1).bit_length()  # pad rows to a power of two
            S = _round_up(max(len(sources[i]) for i in idx), LENGTH_MULTIPLE)
            src = np.zeros((rows, S), np.int32)
            lengths = np.zeros((rows,), np.int32)
            for r, i in enumerate(idx):
                src[r, :len(sources[i])] = sources[i]
                lengths[r] = len(sources[i])
            out = self._decoder(beam, nbest, self.max_len_for(S))(self.params, jnp.asarray(src), jnp.asarray(lengths))
            out = jax.device_get(out)
            tokens, lens, scores = out["tokens"], out["lengths"], out["scores"]
            if beam == 1:  # greedy returns [B, L]; give it the n-best axis
                tokens, lens, scores = tokens[:, None], lens[:, None], scores[:, None]
            att = out.get("attention")
            for r, i in enumerate(idx):
                hyps = []
                for k in range(tokens.shape[1]):
                    seq = [int(t) for t in tokens[r, k, :int(lens[r, k])]]
                    if seq and seq[-1] == 2:  # drop EOS
                        seq = seq[:-1]
                    hyps.append(seq)
                res = {"tokens": hyps, "scores": [float(s) for s in scores[r]]}
                if attention and att is not None:
                    a = att[r] if beam == 1 else att[r, 0]
                    res["attention"] = np.asarray(a[:len(hyps[0]) + 1, :len(sources[i])])
                results[i] = res
        return results

    def translate(self, lines: Sequence[str], *, beam: int = 1, nbest: int = 1) -> list[list[tuple[str, float]]]:
        """Text in, per line a list of (translation, score) n-best pairs. Empty lines stay empty."""
        encoded = [self.source_vocab.encode(line) if line.strip() else [] for line in lines]
        nonempty = [i for i, e in enumerate(encoded) if e]
        decoded = self.translate_ids([encoded[i] for i in nonempty], beam=beam, nbest=nbest)
        out: list[list[tuple[str, float]]] = [[("", 0.0)] for _ in lines]
        for i, res in zip(nonempty, decoded):
            out[i] = [(self.target_vocab.decode(t), s) for t, s in zip(res["tokens"], res["scores"])]
        return out


# -- loading a run and the commands built on it ------------------------------------------------

def load_run(workdir: str, *, step: int | None = None, best: bool = False):
    """(config, model, params, source_vocab, target_vocab) of a trained run in `workdir`.

    Needs only the workdir: config.json, vocab/ and the checkpoints (never the raw data).
    """
    import os

    from s2s_jax import config as config_lib
    from s2s_jax.checkpoint import Checkpoints, CheckpointError
    from s2s_jax.config import UserError
    from s2s_jax.data import load_vocabs
    from s2s_jax.train_state import abstract_state, make_model

    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"--workdir {workdir}: no config.json; train a model there first")
    config = config_lib.load(config_path)
    source_vocab, target_vocab = load_vocabs(workdir)
    model = make_model(config, source_vocab.vocab_size, target_vocab.vocab_size)
    which = "best" if best else "latest"
    if not os.path.isdir(os.path.join(workdir, "best" if best else "checkpoints")):
        raise CheckpointError(f"--workdir {workdir}: no {which} checkpoint; train first")
    ckpts = Checkpoints(workdir, keep=10 ** 6, keep_best=10 ** 6 if best else 0, async_save=False)
    try:
        restored = ckpts.restore(abstract_state(config, model), step, which=which)
    finally:
        ckpts.close()
    if restored is None:
        raise CheckpointError(f"--workdir {workdir}: no {which} checkpoint; train first")
    state, _, _ = restored
    params = state.ema_params if state.ema_params is not None else state.params
    return config, model, params, source_vocab, target_vocab


def load_translator(workdir: str, *, step: int | None = None, best: bool = False, overrides=(),
                    max_len: int | None = None, batch_size: int | None = None) -> Translator:
    from s2s_jax import config as config_lib

    config, model, params, sv, tv = load_run(workdir, step=step, best=best)
    overrides = list(overrides)
    if max_len is not None:
        overrides += ["decode.max_len_a=0", f"decode.max_len_b={max_len}"]
    if batch_size is not None:
        overrides.append(f"decode.batch_size={batch_size}")
    bad = [o for o in overrides if not o.startswith("decode.")]
    if bad:
        raise config_lib.ConfigError(f"--set {bad[0]}: only decode.* fields can change at translation time")
    config = config_lib.override(config, overrides)
    return Translator(config, model, params, sv, tv)
