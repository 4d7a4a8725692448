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

Each `step` encodes the waiting sentences that fit in the pool's ring (2P sentences admitted
and not yet started; at most 8P between the oldest unfinished and the newest) (in batches padded to a power of two rows and a multiple of LENGTH_MULTIPLE
positions, then to the pool's source length), then decodes `chunk_steps` steps; inside those
steps a slot whose sentence finishes takes the next ring sentence at once, as in offline
translation, so slots do not idle until the host looks again. Only the first `active` slots
are computed (the smallest power of two >= 8 covering the busy slots and the waiting
sentences), so a lightly loaded server computes few rows. A sentence gets the same search,
hence the same translation, as offline translation (tests/test_server.py checks it).

A copy-attention model's pool scores its V + S extended ids (S: the pool's source length), and
the server passes unknown source words in as extended ids, as `Translator.translate_full` does.

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
from s2s_jax.inference.lengths import LENGTH_MULTIPLE, output_ids, round_up
from s2s_jax.inference.adapter import CONTEXT_KEYS
from s2s_jax.inference.translator import _use_input_table, output_size, pad_cache, search_settings, wants_attention

_PROGRAMS: dict = {}  # jitted pool functions shared by every decoder of the same model and settings
MIN_ACTIVE = 8


def _step_fn(model, attention: bool, params, table):
    return model.step_fn(params, table=table, attention=attention)


def _pool_programs(pool: decoding.SlotPool, model, source_len: int, chunk_steps: int) -> dict:
    """The jitted pool functions of one model and pool (they keep no decoder object)."""
    return {"admit": jax.jit(functools.partial(_admit, pool, model, source_len), donate_argnums=1),
            "run": {}, "run_fn": functools.partial(_run, pool, chunk_steps),
            "empty": jax.jit(functools.partial(_empty, pool, model, source_len))}


def _admit(pool, model, source_len, params, pool_state, count, source, source_lengths, limits):
    cache = pad_cache(model.encode(params, source, source_lengths), source_len)
    context = {k: cache[k] for k in CONTEXT_KEYS}
    return pool.admit(pool_state, count, cache["state"], context, limits, source_lengths)


def _run(pool, chunk_steps, params, table, pool_state, *, active):
    return pool.run(pool_state, (params, table), steps=chunk_steps, active=active)


def _empty(pool, model, source_len, params):
    src = jnp.ones((1, source_len), jnp.int32)
    cache = jax.eval_shape(lambda p: pad_cache(model.encode(p, src, jnp.ones((1,), jnp.int32)), source_len), params)
    return pool.empty(cache["state"], {k: cache[k] for k in CONTEXT_KEYS})


class StreamingDecoder:
    """A pool of `decode.batch_size` slots for one (beam, nbest) that sentences join while it runs.
    Not thread-safe: one thread (the server's worker) owns it."""

    def __init__(self, translator, *, beam: int, nbest: int = 1, chunk_steps: int = 4, slots: int | None = None,
                 source_len: int | None = None):
        self.translator, self.beam, self.nbest = translator, beam, nbest
        model, config = translator.model, translator.config
        dc = config.decode
        self.slots = slots or dc.batch_size
        self.source_len = round_up(source_len or max(config.data.max_source_length, LENGTH_MULTIPLE))
        self.max_len = int(translator.max_len_for(self.source_len))
        self.chunk_steps = chunk_steps
        want_attention = wants_attention(config, beam)
        self.table = None
        if _use_input_table(self.slots, beam, self.max_len, model.target_vocab_size):
            self.table = jax.jit(model.projection_table)(translator.params)
        key = (model.cache_key, dc, beam, nbest, self.slots, self.source_len, chunk_steps, self.table is not None)
        if key not in _PROGRAMS:
            pool = decoding.SlotPool(
                functools.partial(_step_fn, model, want_attention),
                search_settings(config, model, beam_size=beam, nbest=nbest, max_len=self.max_len),
                slots=self.slots, queue=2 * self.slots, results=8 * self.slots,
                vocab_size=output_size(config, model, self.source_len),
                source_len=self.source_len if want_attention else None, slot_context=True)
            _PROGRAMS[key] = _pool_programs(pool, model, self.source_len, chunk_steps)
        self._programs = _PROGRAMS[key]
        self.ring, self.tickets = 2 * self.slots, 8 * self.slots
        self._pool = self._programs["empty"](translator.params)
        self._waiting: collections.deque = collections.deque()  # (key, ids) not yet admitted
        self._ticket: dict = {}  # ticket -> key of each admitted, unfinished sentence (insertion = ticket order)
        self._tail = 0  # sentences admitted so far = the next ticket
        self._unstarted = 0  # admitted, not yet in a slot (as the last run left it, plus admits since)
        self._info = {"busy": 0, "last_busy": -1, "waiting": 0}  # as the last run left the pool
        self._long: list = []  # (key, ids) too long for the pool

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._long or self._ticket)

    @property
    def pending(self) -> int:
        return len(self._waiting) + len(self._long) + len(self._ticket)

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
        if self._info["busy"] >= self.slots and self._unstarted >= self.slots // 2:
            # Saturated, and enough admitted to refill every slot the next chunk can free: wait,
            # so that sentences are encoded in larger batches (an encoder call costs its scan's
            # launches whatever the batch size).
            return
        oldest = next(iter(self._ticket), self._tail)
        take = min(self.ring - self._unstarted, self.tickets - (self._tail - oldest), len(self._waiting))
        if not take:
            return
        items = [self._waiting.popleft() for _ in range(take)]
        rows = max(MIN_ACTIVE, 1 << max(take - 1, 0).bit_length())  # few encoder shapes
        S = round_up(max(len(ids) for _, ids in items))
        source = np.zeros((rows, S), np.int32)
        lengths = np.ones((rows,), np.int32)
        limits = np.ones((rows,), np.int32)
        for r, (key, ids) in enumerate(items):
            source[r, :len(ids)] = ids
            lengths[r] = len(ids)
            limits[r] = min(int(self.translator.max_len_for(len(ids))), self.max_len)
            self._ticket[self._tail] = key
            self._tail += 1
        self._unstarted += take
        self._pool = self._programs["admit"](self.translator.params, self._pool, np.int32(take), source, lengths,
                                             limits)

    def step(self) -> list:
        """Admits waiting sentences, decodes up to `chunk_steps` steps; returns the finished
        (key, result) pairs, result as one entry of `Translator.translate_ids`."""
        out = []
        if self._long:  # beyond the pool's source length: one direct call of their own
            items, self._long = self._long, []
            results = self.translator.translate_ids([ids for _, ids in items], beam=self.beam, nbest=self.nbest)
            out += [(key, res) for (key, _), res in zip(items, results)]
        self._admit()
        if not self._ticket:
            return out
        need = max(self._info["last_busy"] + 1, min(self.slots, len(self._ticket)))
        active = min(self.slots, max(MIN_ACTIVE, 1 << max(need - 1, 0).bit_length()))
        self._pool, done, results, info = self._run_program(active)(self.translator.params, self.table, self._pool)
        done, results, info = jax.device_get((done, results, info))
        self._info = {k: int(v) for k, v in info.items()}
        self._unstarted = self._info["waiting"]
        # A finished index i is ticket i (mod R) of the unfinished ones; they span fewer than R.
        base = next(iter(self._ticket))
        for pos in np.flatnonzero(done):
            ticket = base + (int(pos) - base) % self.tickets
            tokens, lens, scores = results["tokens"][pos], results["lengths"][pos], results["scores"][pos]
            if self.beam == 1:
                tokens, lens, scores = tokens[None], lens[None], scores[None]
            hyps = [output_ids(tokens[k], lens[k]) for k in range(self.nbest)]
            out.append((self._ticket.pop(ticket), {"tokens": hyps, "scores": [float(x) for x in scores[:self.nbest]]}))
        return out
