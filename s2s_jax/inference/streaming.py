"""Continuous batching across requests: sentences join a running decoder as its slots free up.

The Translator decodes a known list of sentences (`decoding.continuous_search` refills slots
from a queue fixed at the call). A server learns of sentences while it decodes; decoding each
batch of arrivals as its own call leaves the decoder idle at the end of every call, while its
last sentences finish, and makes new arrivals wait for the whole call. `StreamingDecoder`
keeps one `decoding.SlotPool` alive instead:

    decoder = StreamingDecoder(translator, beam=5, nbest=1)
    decoder.add([(key, token_ids), ...])      # any time
    while decoder.busy:
        for key, result in decoder.step():    # admit into free slots, decode a few steps
            ...                               # result as Translator.translate_ids gives it

Each `step` encodes the waiting sentences that fit in free slots (batches padded to a power of
two rows and a multiple of LENGTH_MULTIPLE positions, then to the pool's source length), starts
them in the lowest free slots, and advances the busy slots by `chunk_steps` decoding steps on
the first `active` slots (the smallest power of two >= 8 covering every busy slot), so a
lightly loaded server computes few rows. A sentence gets the same search, hence the same
translation, as offline translation (tests/test_server.py checks it).

Sources longer than the pool's source length (`max(data.max_source_length, 16)` rounded up
to LENGTH_MULTIPLE) are translated by the Translator directly, as a batch of their own.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np

from s2s_jax import decoding
from s2s_jax.inference.lengths import LENGTH_MULTIPLE, round_up
from s2s_jax.inference.translator import (_input_projection_table, _use_input_table, encode, model_step_fn,
                                          pad_cache)
from s2s_jax.vocab import EOS_ID

_PROGRAMS: dict = {}  # jitted pool functions shared by every decoder of the same model and settings
MIN_ACTIVE = 8


class StreamingDecoder:
    """A pool of `decode.batch_size` slots for one (beam, nbest) that sentences join while it runs.
    Not thread-safe: one thread (the server's worker) owns it."""

    def __init__(self, translator, *, beam: int, nbest: int = 1, chunk_steps: int = 8, slots: int | None = None):
        self.translator, self.beam, self.nbest = translator, beam, nbest
        model, config = translator.model, translator.config
        dc = config.decode
        self.slots = slots or dc.batch_size
        self.source_len = round_up(max(config.data.max_source_length, LENGTH_MULTIPLE))
        self.max_len = int(translator.max_len_for(self.source_len))
        self.chunk_steps = chunk_steps
        want_attention = beam > 1 and dc.coverage_penalty != 0
        self.table = None
        if _use_input_table(self.slots, beam, self.max_len, model.target_vocab_size):
            self.table = jax.jit(lambda p: model.apply({"params": p}, method=_input_projection_table))(
                translator.params)

        def make_step_fn(params, table):
            return model_step_fn(model, params, table=table, attention=want_attention)

        key = (model.config, model.source_vocab_size, model.target_vocab_size, dc, beam, nbest, self.slots,
               self.source_len, self.table is not None)
        if key not in _PROGRAMS:
            pool = decoding.SlotPool(
                make_step_fn, slots=self.slots, beam_size=beam, nbest=nbest, vocab_size=model.target_vocab_size,
                source_len=self.source_len if want_attention else None, max_len=self.max_len,
                length_penalty=dc.length_penalty, coverage_penalty=dc.coverage_penalty, slot_context=True)

            def admit(params, pool_state, source, source_lengths, limits, slot_ids):
                cache = pad_cache(encode(params, source, source_lengths, model=model), self.source_len)
                context = {k: cache[k] for k in ("memory", "keys", "mask")}
                return pool.admit(pool_state, slot_ids, cache["state"], context, limits, source_lengths)

            def run(params, table, pool_state, *, active):
                return pool.run(pool_state, (params, table), steps=self.chunk_steps, active=active)

            def empty(params):
                src = jnp.ones((1, self.source_len), jnp.int32)
                cache = jax.eval_shape(lambda p: pad_cache(encode(p, src, jnp.ones((1,), jnp.int32), model=model),
                                                           self.source_len), params)
                return pool.empty(cache["state"], {k: cache[k] for k in ("memory", "keys", "mask")})

            _PROGRAMS[key] = {"admit": jax.jit(admit, donate_argnums=1),
                              "run": {}, "run_fn": run, "empty": jax.jit(empty)}
        self._programs = _PROGRAMS[key]
        self._pool = self._programs["empty"](translator.params)
        self._waiting: collections.deque = collections.deque()  # (key, ids)
        self._slot_key: list = [None] * self.slots  # the key of each busy slot
        self._slot_len: list[int] = [0] * self.slots
        self._long: list = []  # (key, ids) too long for the pool

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._long or any(k is not None for k in self._slot_key))

    @property
    def pending(self) -> int:
        return len(self._waiting) + len(self._long) + sum(k is not None for k in self._slot_key)

    def add(self, items) -> None:
        """Queues (key, token ids) pairs; ids non-empty, without BOS/EOS."""
        for key, ids in items:
            (self._long if len(ids) > self.source_len else self._waiting).append((key, list(ids)))

    def _run_program(self, active: int):
        runs = self._programs["run"]
        if active not in runs:
            runs[active] = jax.jit(functools.partial(self._programs["run_fn"], active=active), donate_argnums=2)
        return runs[active]

    def _admit(self) -> None:
        free = [s for s in range(self.slots) if self._slot_key[s] is None]
        take = min(len(free), len(self._waiting))
        if not take:
            return
        items = [self._waiting.popleft() for _ in range(take)]
        slot_ids = free[:take]
        rows = 1 << max(take - 1, 0).bit_length()
        S = round_up(max(len(ids) for _, ids in items))
        source = np.zeros((rows, S), np.int32)
        lengths = np.ones((rows,), np.int32)
        limits = np.ones((rows,), np.int32)
        slots = np.full((rows,), self.slots, np.int32)  # padding rows: no slot
        for r, ((key, ids), slot) in enumerate(zip(items, slot_ids)):
            source[r, :len(ids)] = ids
            lengths[r] = len(ids)
            limits[r] = min(int(self.translator.max_len_for(len(ids))), self.max_len)
            slots[r] = slot
            self._slot_key[slot] = key
            self._slot_len[slot] = len(ids)
        self._pool = self._programs["admit"](self.translator.params, self._pool, source, lengths, limits, slots)

    def step(self) -> list:
        """Admits waiting sentences, decodes up to `chunk_steps` steps; returns the finished
        (key, result) pairs, result as one entry of `Translator.translate_ids`."""
        out = []
        if self._long:  # beyond the pool's source length: one direct call of their own
            items, self._long = self._long, []
            results = self.translator.translate_ids([ids for _, ids in items], beam=self.beam, nbest=self.nbest)
            out += [(key, res) for (key, _), res in zip(items, results)]
        self._admit()
        busy = [s for s in range(self.slots) if self._slot_key[s] is not None]
        if not busy:
            return out
        active = min(self.slots, max(MIN_ACTIVE, 1 << max(busy[-1], 0).bit_length()))
        self._pool, finished, results = self._run_program(active)(self.translator.params, self.table, self._pool)
        finished, results = jax.device_get((finished, results))
        for slot in np.flatnonzero(finished):
            tokens, lens, scores = results["tokens"][slot], results["lengths"][slot], results["scores"][slot]
            if self.beam == 1:
                tokens, lens, scores = tokens[None], lens[None], scores[None]
            hyps = []
            for k in range(self.nbest):
                seq = tokens[k, :lens[k]].tolist()
                if seq and seq[-1] == EOS_ID:
                    seq.pop()
                hyps.append(seq)
            out.append((self._slot_key[slot], {"tokens": hyps, "scores": [float(x) for x in scores[:self.nbest]]}))
            self._slot_key[slot] = None
        return out

