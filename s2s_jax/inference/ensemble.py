"""Ensembles: several trained runs decoding as one model (OpenNMT-py `-model a b`, Marian `--models`).

    translator = load_ensemble_translator(["runs/a", "runs/b"], weights=[0.5, 0.5])
    translator.translate(["a sentence"], beam=5)

Per decoding step each member gives log-probabilities over the shared target vocabulary, and
the ensemble's step returns their weighted sum, sum_i w_i * log_softmax(logits_i) (weights
normalised to sum 1), as OpenNMT-py and Marian combine them. The search (`decoding`) is
unchanged: it sees one step function (`Ensemble.step_fn`), knows nothing of the members, and
takes log_softmax of what it is given, as for a single model; so the ensemble's distribution is
the normalised weighted geometric mean of the members' (p ∝ prod_i p_i^w_i), and `score`
(teacher forcing) uses the same renormalised distribution. Attention weights (plots, coverage penalty) are the
weighted mean of the members'.

The members must share the source and the target vocabularies (the same vocabulary files) and
the input normalisation; their architectures may differ. Each member encodes the source
itself; the padding mask is the same for all. Decode settings are the first run's.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import jax.numpy as jnp

from s2s_jax.config import UserError


@dataclasses.dataclass(frozen=True, eq=False)
class Ensemble:
    """Several models as one `adapter.DecodingModel`: the members (each a DecodingModel, e.g. an
    `adapter.SingleModel`) and their weights; params are a list, one tree per member."""

    members: tuple
    weights: tuple

    @property
    def config(self):  # the members' model configs
        return tuple(m.config for m in self.members)

    @property
    def kernels(self):  # decoding's token selections: the first member's kernel set
        return self.members[0].kernels

    @property
    def source_vocab_size(self) -> int:
        return self.members[0].source_vocab_size

    @property
    def target_vocab_size(self) -> int:
        return self.members[0].target_vocab_size

    @property
    def cache_key(self) -> tuple:
        return (self.config, self.weights, self.source_vocab_size, self.target_vocab_size)

    def with_dtype(self, dtype: str) -> Ensemble:
        return Ensemble(tuple(m.with_dtype(dtype) for m in self.members), self.weights)

    def encode(self, params, source, source_lengths) -> dict:
        """-> {"memory": [per member], "keys": [...], "mask" [B, S] (shared), "state": [...]}."""
        caches = [m.encode(p, source, source_lengths) for m, p in zip(self.members, params)]
        return {"memory": [c["memory"] for c in caches], "keys": [c["keys"] for c in caches],
                "mask": caches[0]["mask"], "state": [c["state"] for c in caches]}

    def projection_table(self, params) -> list:
        return [m.projection_table(p) for m, p in zip(self.members, params)]

    def step_fn(self, params, *, table=None, attention: bool = True, vocab_ids=None):
        """The ensemble as one context step function (see `combine_steps`); vocab_ids: a
        shortlist every member scores (`adapter.DecodingModel.step_fn`)."""
        tables = table if table is not None else [None] * len(self.members)
        steps = [m.step_fn(p, table=t, attention=attention, vocab_ids=vocab_ids)
                 for m, p, t in zip(self.members, params, tables)]
        return combine_steps(steps, self.weights)

    def score_log_probs(self, params, source, source_lengths, target_input):
        """Teacher forcing: [B, T, V] log-probabilities of the ensemble's distribution (the
        combined step renormalised, exactly as the search renormalises it)."""
        total = 0.0
        for m, p, w in zip(self.members, params, self.weights):
            total = total + w * m.score_log_probs(p, source, source_lengths, target_input)
        return jax.nn.log_softmax(total, axis=-1)

    def bundle_params(self, params) -> dict:
        """An ensemble bundle stores member_<i>/... ."""
        return {f"member_{i}": p for i, p in enumerate(params)}

    def from_bundle_params(self, tree: dict) -> list:
        return [tree[f"member_{i}"] for i in range(len(self.members))]


def combine_steps(steps, weights):
    """Context step functions of the members -> the ensemble's: (tokens, state [per member],
    context {"memory": [per member], "keys": [per member], "mask"}) -> (sum_i w_i *
    log_softmax(logits_i) [N, V] float32, [new state per member], sum_i w_i * attention_i or None)."""

    def step(tokens, state, context):
        combined, attention, new_states = 0.0, None, []
        for i, (member_step, w) in enumerate(zip(steps, weights)):
            member_context = {"memory": context["memory"][i], "keys": context["keys"][i], "mask": context["mask"]}
            logits, new_state, weights_i = member_step(tokens, state[i], member_context)
            combined = combined + w * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            new_states.append(new_state)
            if weights_i is not None:
                attention = w * weights_i if attention is None else attention + w * weights_i
        return combined, new_states, attention

    return step


def _vocab_signature(vocab) -> tuple:
    desc = vocab.to_json()
    return (desc["kind"], vocab.vocab_size, getattr(vocab, "model_proto", None))


def parse_weights(text: str | None, n: int) -> list[float]:
    """--weights "0.7,0.3" -> [0.7, 0.3] normalised to sum 1 (None: equal weights)."""
    if text is None:
        return [1.0 / n] * n
    try:
        weights = [float(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--weights {text}: give one number per --workdir, e.g. --weights 0.5,0.5") from None
    if len(weights) != n:
        raise UserError(f"--weights {text}: {len(weights)} weight(s) for {n} --workdir runs; give one per run")
    if any(not w > 0 or w == float("inf") for w in weights):
        raise UserError(f"--weights {text}: weights must be positive and finite")
    total = sum(weights)
    return [w / total for w in weights]


def load_ensemble_translator(workdirs: Sequence[str], *, weights: Sequence[float] | None = None, step=None,
                             best: bool = False, average_last=None, overrides=(), max_len=None, batch_size=None):
    """A Translator decoding with the ensemble of the runs (each loaded as `runs.load_run`)."""
    from s2s_jax.inference.adapter import SingleModel
    from s2s_jax.inference.runs import load_run
    from s2s_jax.inference.shortlist import for_decoding
    from s2s_jax.inference.translator import Translator, decode_overrides
    from s2s_jax.vocab import input_normalization

    if len(workdirs) < 2:
        raise UserError("an ensemble needs at least two --workdir runs")
    weights = list(weights) if weights is not None else [1.0 / len(workdirs)] * len(workdirs)
    runs = [load_run(w, step=step, best=best, average_last=average_last) for w in workdirs]
    first = runs[0]
    for run in runs[1:]:
        for side in ("source", "target"):
            if _vocab_signature(getattr(run, f"{side}_vocab")) != _vocab_signature(getattr(first, f"{side}_vocab")):
                raise UserError(f"--workdir {run.workdir}: its {side} vocabulary differs from that of "
                                f"{first.workdir}; an ensemble needs runs trained with the same vocabularies "
                                f"(train them with --set data.vocab_from=RUN)")
        if input_normalization(run.config.data) != input_normalization(first.config.data):
            raise UserError(f"--workdir {run.workdir}: data.normalization differs from {first.workdir}'s; "
                            f"the members must read text the same way")
        if run.config.model.copy_attention or first.config.model.copy_attention:
            raise UserError(f"--workdir {run.workdir}: ensembles of copy-attention models (model.copy_attention=True) "
                            "are not supported yet; translate with one run")
        if run.config.model.dtype != first.config.model.dtype:
            raise UserError(f"--workdir {run.workdir}: model.dtype {run.config.model.dtype} differs from "
                            f"{first.config.model.dtype}; decode the ensemble in one dtype")
    config = decode_overrides(first.config, overrides, max_len=max_len, batch_size=batch_size)
    if config.decode.dtype not in ("model", first.config.model.dtype):
        raise UserError("decode.dtype: an ensemble decodes in its members' model.dtype; leave decode.dtype=model")
    ensemble = Ensemble(tuple(SingleModel(r.model) for r in runs), tuple(float(w) for w in weights))
    # The members share the vocabularies, so the first run's shortlist serves them all.
    shortlist = for_decoding(first.workdir, config, first.source_vocab.vocab_size, first.target_vocab.vocab_size)
    translator = Translator(config, ensemble, [r.params for r in runs], first.source_vocab, first.target_vocab,
                            shortlist=shortlist)
    translator.checkpoint = {"which": "ensemble", "members": [dict(r.checkpoint, workdir=os.path.abspath(r.workdir))
                                                              for r in runs], "weights": list(ensemble.weights)}
    return translator
