"""Greedy and beam search over a step function; knows nothing of the model.

Every search drives a step function (`StepFn`: tokens, cache; or `ContextStepFn`: tokens,
state, context -> logits, state, attention), so this package imports only jax, flax.struct,
numpy, the special ids of `s2s_jax.vocab` and the token-selection kernels (as t5x's decoding.py
knows nothing of the model); `inference/adapter.py` adapts a model to it.

    settings.py    SearchSettings: the search every sentence gets (beam size, n-best, lengths,
                   penalties, BOS/EOS, kernel set), however it is batched
    strategies.py  Greedy and Beam, per-slot strategies made from one SearchSettings (make_strategy)
    state.py       the typed loop state (flax.struct dataclasses, shapes in their docstrings)
    engine.py      the one slot loop: start waiting sentences in idle slots, step, retire
    searches.py    search (plain decoding: a pool run to completion), continuous_search (a queue
                   through a fixed pool of slots, refilled as sentences finish)
    pool.py        SlotPool: the server's pool, kept between calls and fed from a ring

Every sentence's result is the same however it is batched (tests/test_decoding.py).

Speed: the per-step work outside the step function is a few passes over the [rows, V] logits,
so log-probs are never stored; greedy's argmax and beam's top-k are the `best_token` and
`top_extensions` of the settings' KernelSet (the model's; kernels/topk.py: the cpu set takes
chunk maxima first, searching only the chunks that can hold the answer; the portable set the
plain top_k / argmax; the same result, ties included). The search loop is
a `while_loop` that ends when every sentence has finished, on every backend: its trip count is
data-dependent by nature.
"""

from s2s_jax.decoding.engine import ContextStepFn, StepFn
from s2s_jax.decoding.pool import SlotPool
from s2s_jax.decoding.searches import continuous_search, search
from s2s_jax.decoding.settings import SearchSettings
from s2s_jax.decoding.state import BeamState, GreedyState, PoolState
from s2s_jax.decoding.strategies import Beam, Greedy, Strategy, make_strategy

__all__ = ["Beam", "BeamState", "ContextStepFn", "Greedy", "GreedyState", "PoolState", "SearchSettings",
           "SlotPool", "StepFn", "Strategy", "continuous_search", "make_strategy", "search"]
