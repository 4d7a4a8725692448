"""The model side of decoding: one protocol (`DecodingModel`) that a model meets decoding through.

Decoding (`s2s_jax.decoding`) sees only a step function (`decoding.ContextStepFn`: tokens
[N], state, context -> logits [N, V], new state, attention [N, S] or None). `DecodingModel` is
what inference asks of a model to get there; the Translator, the streaming pool, the export
programs and the scorer call only it, never asking which kind of model they hold:

* `SingleModel`: one trained `Seq2Seq` (the one adapter from the Flax module to the step
  function);
* `ensemble.Ensemble`: several of them, combined per step.

The state/context contract: `encode` returns {"state": the decoder state (it follows the beams),
"memory", "keys" [B, S, H] (one per member for an ensemble), "mask" [B, S] bool}; the step
function takes `state` as its state and {"memory", "keys", "mask"} (per row, or per slot with
`slot_context`) as its context.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from s2s_jax import kernels as kernels_lib
from s2s_jax.decoding import ContextStepFn
from s2s_jax.model import Seq2Seq
from s2s_jax.model.seq2seq import in_vocabulary
from s2s_jax.model.decoder import input_projection_table

CONTEXT_KEYS = ("memory", "keys", "mask")  # the encoder cache entries that are the step's context


class DecodingModel(Protocol):
    """What inference needs of a model (see the module docstring)."""

    source_vocab_size: int
    target_vocab_size: int

    @property
    def kernels(self) -> Any:
        """The kernel set whose token selections the search uses (`decoding.SearchSettings.kernels`)."""

    @property
    def cache_key(self) -> tuple:
        """Identifies the model's compiled programs (architecture, weights, vocabulary sizes)."""

    def with_dtype(self, dtype: str) -> DecodingModel:
        """The same model computing in `dtype` (params unchanged)."""

    def encode(self, params, source, source_lengths) -> dict:
        """source [B, S] int32, source_lengths [B] -> the cache {state, memory, keys, mask}; un-jitted."""

    def projection_table(self, params) -> Any:
        """Layer 1's input projection of every target token ([V, G·H]; one per member)."""

    def step_fn(self, params, *, table=None, attention: bool = True, vocab_ids=None) -> ContextStepFn:
        """The model as decoding's context step function. table: `projection_table`'s output,
        gathered instead of multiplying the embeddings (None: from the embeddings);
        attention=False returns None for the weights; vocab_ids [C] int32 (-1: padding): logits
        [N, C] of those target ids only (a shortlist; padding -inf), None: all V."""

    def score_log_probs(self, params, source, source_lengths, target_input) -> jax.Array:
        """Teacher forcing: [B, T, V] float32 log-probabilities of the next token."""

    def bundle_params(self, params) -> dict:
        """The params as the nested dict an export bundle stores."""

    def from_bundle_params(self, tree: dict) -> Any:
        """`bundle_params`' dict -> the params `encode` and `step_fn` take."""


@dataclasses.dataclass(frozen=True, eq=False)
class SingleModel:
    """One trained `Seq2Seq` as a `DecodingModel`."""

    module: Seq2Seq

    @property
    def config(self):
        return self.module.config

    @property
    def source_vocab_size(self) -> int:
        return self.module.source_vocab_size

    @property
    def target_vocab_size(self) -> int:
        return self.module.target_vocab_size

    @property
    def kernels(self):
        return self.module.kernels

    @property
    def cache_key(self) -> tuple:
        return (self.module.config, None, self.source_vocab_size, self.target_vocab_size)

    def with_dtype(self, dtype: str) -> SingleModel:
        if dtype == self.module.config.dtype:
            return self
        return SingleModel(self.module.clone(config=dataclasses.replace(self.module.config, dtype=dtype)))

    def encode(self, params, source, source_lengths) -> dict:
        with kernels_lib.precision_scope(self.module.config):
            return self.module.apply({"params": params}, source, source_lengths, method=Seq2Seq.encode)

    def projection_table(self, params):
        return self.module.apply({"params": params}, method=_input_projection_table)

    def step_fn(self, params, *, table=None, attention: bool = True, vocab_ids=None) -> ContextStepFn:
        output = None  # the shortlist's output weights, gathered once per call, outside the step loop
        if vocab_ids is not None:
            output = self.module.apply({"params": params}, vocab_ids, method=Seq2Seq.candidate_output_weights)
        return _Step(self.module, {"params": params}, table, attention, output)

    def score_log_probs(self, params, source, source_lengths, target_input):
        hidden, _ = self.module.apply({"params": params}, source, source_lengths, target_input)
        logits = self.module.apply({"params": params}, hidden, method=Seq2Seq.logits)
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

    def bundle_params(self, params) -> dict:
        return params

    def from_bundle_params(self, tree: dict):
        return tree


@dataclasses.dataclass(frozen=True, eq=False)
class _Step:
    """`SingleModel.step_fn`: (tokens [N], state, context) -> (logits [N, V] (or [N, C] for a
    shortlist), new state, weights [N, S] or None)."""

    module: Seq2Seq
    variables: dict
    table: Any
    attention: bool
    output: Any = None  # None, or a shortlist's (kernel [H, C], bias [C])

    def __call__(self, tokens, state, context):
        with kernels_lib.precision_scope(self.module.config):
            logits, new_state, weights = self.module.apply(self.variables, tokens, self.table, state, context,
                                                           self.output, method=_decode_step)
        return logits, new_state, weights if self.attention else None


def _input_projection_table(model: Seq2Seq):
    return input_projection_table(model.decoder, model.target_embedding)


def _decode_step(model: Seq2Seq, tokens, table, state, context, output=None):
    """`Seq2Seq.decode_step` on per-slot context, with layer 1's projected input gathered from
    `table` (None: from the embeddings) and the output projection `output` (a shortlist's
    (kernel, bias); None: the whole vocabulary) -> (logits [N, V | C], new state, weights [N, S] | None)."""
    if table is None and output is None:
        logits, cache, weights = model.decode_step(tokens, dict(context, state=state))
        return logits, cache["state"], weights
    if model.config.copy_attention:  # copied unknown words (ids >= V) go back in as UNK
        tokens = in_vocabulary(tokens, model.target_vocab_size)
    embedded = jnp.take(model.target_embedding, tokens, axis=0) if table is None else None
    projected = None if table is None else jnp.take(table, tokens, axis=0)
    hidden, state, weights = model.decoder.step(embedded, state, context["memory"], context["keys"], context["mask"],
                                                projected=projected)
    if model.config.copy_attention:  # the extended distribution [N, V + S] (over the whole vocabulary)
        return model.step_output(hidden, weights, tokens, state, context), state, weights
    return (model.logits(hidden) if output is None else model.project(hidden, *output)), state, weights
