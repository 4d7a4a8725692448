"""Batched translation of token ids or text with a trained model (greedy or beam search).

Speed on CPU comes from doing little work and compiling few programs:

* Continuous batching: sentences are sorted by length (longest first) and decoded through a
  fixed pool of `decode.batch_size` slots (`decoding.continuous_search`); when a sentence
  finishes, its slot takes the next sentence of the queue at the same step, so no step computes
  rows of finished sentences and nothing waits for the longest sentence of a batch. A queue
  holds up to `QUEUE_BATCHES` batches' worth of sentences (its size rounded up to a power of
  two times the batch size, and the source length up to a multiple of `LENGTH_MULTIPLE`), so a
  file needs one decode program per (beam, nbest) and queue size, reused by every queue and
  every Translator of the same model (module-level cache).
* The encoder runs once per batch of `decode.batch_size` sentences, before decoding. Encoder
  memory, attention keys and mask travel as per-sentence context that beam search never
  reorders (only the small decoder state follows the beams), and attention weights are produced
  only when asked for (plots) or needed (coverage penalty).
* Each sentence stops at `decode.max_len_a * source_length + decode.max_len_b` tokens.
* With a vocabulary shortlist (`decode.shortlist`, `inference/shortlist.py`), a queue's decode
  program scores only the union of its sentences' candidate target pieces (padded to a few
  static sizes, one program each) instead of the whole vocabulary.
* All queues are dispatched before any result is fetched, so host work overlaps device work.

Text in = text as trained: `translate` normalises every line exactly as prepare normalised the
training data (`s2s_jax.vocab.input_normalization`), so NFD accents or U+202F spaces encode as
they did in training.

The model is a `DecodingModel` (`inference/adapter.py`: a single run or an ensemble): the
Translator, the export programs (`decode_fixed_batch`) and so the server ask it for the encoder
cache and the step function that `decoding` searches with, never which kind of model it is.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from s2s_jax import decoding, runtime
from s2s_jax.config import Config, UserError
from s2s_jax.inference.adapter import CONTEXT_KEYS, DecodingModel, SingleModel
from s2s_jax.inference.lengths import LENGTH_MULTIPLE, max_output_length, output_ids, round_up
from s2s_jax.vocab import BOS_ID, EOS_ID, decode_extended, extended_ids, input_normalization, normalize

QUEUE_BATCHES = 16  # most sentences decoded by one continuous-batching call, in batches
_DECODERS: dict = {}  # compiled decoders shared by all Translators: key -> jitted function


def pad_cache(cache: dict, length: int) -> dict:
    """Pads memory/keys/mask of an encoder cache to `length` source positions (mask False there)."""
    pad = length - cache["mask"].shape[1]
    if pad == 0:
        return cache
    def pad_one(a):
        widths = [(0, 0)] * a.ndim
        widths[1] = (0, pad)
        return jnp.pad(a, widths)

    out = dict(cache)
    for k in CONTEXT_KEYS:  # (per member for an ensemble)
        out[k] = jax.tree.map(pad_one, cache[k])
    state = cache.get("state")
    if isinstance(state, dict):  # per-position state: model.coverage's [B, S], copy attention's source_ext [B, S]
        out["state"] = dict(state, **{k: pad_one(state[k]) for k in ("coverage", "source_ext") if k in state})
    return out


def encode_into(params, source, source_lengths, queue, start, *, model: DecodingModel,
                queue_shape: tuple[int, int] | None = None) -> dict:
    """Encodes one batch (source [B, S]) into rows start..start+B of a queue's cache (leading dim
    Q, S_all >= S source positions). queue None: a new zero cache of queue_shape (Q, S_all).
    Jit it with the queue donated, so it is updated in place."""
    cache = model.encode(params, source, source_lengths)
    if queue is None:
        Q, S_all = queue_shape
        queue = jax.tree.map(lambda a: jnp.zeros((Q, *a.shape[1:]), a.dtype), pad_cache(cache, S_all))
    cache = pad_cache(cache, queue["mask"].shape[1])
    return jax.tree.map(lambda q, c: jax.lax.dynamic_update_slice_in_dim(q, c, start, axis=0), queue, cache)


def search_settings(config: Config, model: DecodingModel, *, beam_size: int, nbest: int,
                    max_len, ignore_ids: tuple = ()) -> decoding.SearchSettings:
    """The run's decode settings as decoding's SearchSettings (greedy when beam_size is 1), with
    the model's kernel set. ignore_ids: the target ids of decode.ignore_when_blocking
    (`ignore_ids`). decode.min_length is capped at max_len - 1: a sentence's length limit wins."""
    dc = config.decode
    min_length = dc.min_length
    if isinstance(max_len, (int, np.integer)):
        min_length = min(min_length, int(max_len) - 1)
    return decoding.SearchSettings(
        max_len=max_len, kernels=model.kernels, beam_size=beam_size, nbest=nbest,
        length_penalty=dc.length_penalty, coverage_penalty=dc.coverage_penalty, bos_id=BOS_ID, eos_id=EOS_ID,
        length_penalty_type=dc.length_penalty_type, coverage_penalty_type=dc.coverage_penalty_type,
        stepwise_penalty=dc.stepwise_penalty and beam_size > 1, min_length=min_length,
        block_ngram_repeat=dc.block_ngram_repeat, ignore_ids=tuple(ignore_ids), stop_rule=dc.stop_rule)


def blocking_ignore_ids(config: Config, target_vocab) -> tuple[int, ...]:
    """decode.ignore_when_blocking's target pieces -> their ids (a UserError names a piece the
    target vocabulary lacks)."""
    pieces = tuple(config.decode.ignore_when_blocking)
    if not pieces:
        return ()
    ids = {piece: i for i, piece in enumerate(target_vocab.pieces(range(target_vocab.vocab_size)))}
    missing = [p for p in pieces if p not in ids]
    if missing:
        raise UserError(f"decode.ignore_when_blocking: {missing[0]!r} is not a piece of the target vocabulary; "
                        "use pieces as `translate --format jsonl` prints them (e.g. '▁.' or '.')")
    return tuple(ids[p] for p in pieces)


def wants_attention(config: Config, beam_size: int) -> bool:
    """Whether the search needs attention weights from the step function (the coverage penalty)."""
    return beam_size > 1 and config.decode.coverage_penalty != 0


def decode(params, cache, source_lengths, max_lengths, num_sentences, vocab_ids=None, *, model: DecodingModel,
           config: Config, beam_size: int, nbest: int, max_len: int, slots: int, attention: bool,
           ignore_ids: tuple = ()) -> dict:
    """Greedy (beam_size=1) or beam search of a queue of encoded sentences; un-jitted (see `Translator`).

    cache: `encode`'s output for the queue (leading dim Q, in queue order); source_lengths, max_lengths [Q] (most output tokens, EOS included);
    num_sentences: how many queue entries are real; max_len: static bound on all lengths;
    slots: sentences decoded at once; vocab_ids: None, or a shortlist's candidate target ids [C]
    (ascending, -1 padding; `shortlist.padded_ids`) the only ones scored.
    Returns decoding's dict: tokens [Q, (N,) T], lengths, scores, attention [Q, (N,) T, S] or None.
    """
    # Memory, keys and mask are the same for every beam of a sentence: the search keeps them
    # out of the state it reorders each step, once per slot (the decoder's attention reads each
    # sentence's memory once for its K beam rows).
    context = {k: cache[k] for k in CONTEXT_KEYS}
    want_attention = attention or wants_attention(config, beam_size)

    # Layer 1's input projection of every target token, once per call (when it pays): each
    # step gathers its tokens' rows instead of multiplying the [rows, E] embeddings.
    table = None
    if _use_input_table(cache["mask"].shape[0], beam_size, max_len, model.target_vocab_size):
        table = model.projection_table(params)
    step_fn = model.step_fn(params, table=table, attention=want_attention, vocab_ids=vocab_ids)
    settings = search_settings(config, model, beam_size=beam_size, nbest=nbest, max_len=max_len,
                               ignore_ids=ignore_ids)
    columns = output_size(config, model, cache["mask"].shape[1]) if vocab_ids is None else vocab_ids.shape[0]
    return decoding.continuous_search(
        step_fn, cache["state"], context, settings, num_sentences=num_sentences, slots=slots,
        max_lengths=max_lengths, source_lengths=source_lengths, slot_context=True,
        output_sizes=(columns, cache["mask"].shape[1] if want_attention else None), vocab_ids=vocab_ids)


def output_size(config: Config, model: DecodingModel, source_len: int) -> int:
    """The size of a step's scores over the whole vocabulary: the target vocabulary, + the source
    positions with copy attention (extended ids V + k, one per distinct unknown source word at most)."""
    return model.target_vocab_size + (source_len if config.model.copy_attention else 0)


def decode_fixed_batch(params, source, source_lengths, *, model: DecodingModel, config: Config,
                       beam_size: int = 1, nbest: int = 1, max_len: int, ignore_ids: tuple = ()) -> dict:
    """Greedy (beam_size=1) or beam search of one fixed batch (source [B, S]); max_len static.
    What the export programs run. Returns decoding's dict (tokens [B, (nbest,) max_len],
    lengths, scores, attention)."""
    dc = config.decode
    cache = model.encode(params, source, source_lengths)
    step_fn = functools.partial(_step_with_context_in_cache, model.step_fn(params))
    max_lengths = jnp.minimum(
        jnp.floor(dc.max_len_a * source_lengths + dc.max_len_b).astype(jnp.int32), max_len)
    max_lengths = jnp.maximum(max_lengths, 1)
    settings = search_settings(config, model, beam_size=beam_size, nbest=nbest, max_len=max_len,
                               ignore_ids=ignore_ids)
    return decoding.search(step_fn, cache, settings, batch_size=source.shape[0], max_lengths=max_lengths,
                           source_lengths=source_lengths)


def _step_with_context_in_cache(context_step: decoding.ContextStepFn, tokens, cache):
    """decoding's (tokens, cache) form of a context step: the context rides in the cache."""
    logits, state, weights = context_step(tokens, cache["state"], {k: cache[k] for k in CONTEXT_KEYS})
    return logits, dict(cache, state=state), weights


def score_batch(params, source, source_lengths, target_input, target_output, target_mask, *, model: DecodingModel):
    """Teacher-forced log-probability of each target: sum over t of log p(target_output[b, t] |
    source, target_input[b, :t+1]) where target_mask is 1 (the EOS included) -> [B] float32."""
    log_probs = model.score_log_probs(params, source, source_lengths, target_input)
    token = jnp.take_along_axis(log_probs, target_output[..., None], axis=-1)[..., 0]
    return jnp.sum(token * target_mask, axis=-1)


def _use_input_table(queue_size: int, beam_size: int, max_len: int, vocab_size: int) -> bool:
    """Whether the call likely decodes more token rows than the table has (V): a sentence is
    taken to run a quarter of max_len steps."""
    return queue_size * beam_size * max_len >= 4 * vocab_size


class Translator:
    """Translates token ids or text with fixed params. Not thread-safe.

    After each call, `last_stats` holds {"sentences", "tokens", "queues", "encoder_shapes",
    "compile_seconds"} of it (tokens: output tokens of the best hypotheses, EOS excluded;
    compile_seconds: tracing + compiling, or loading from the persistent cache, the programs it
    had not run before; with a shortlist also "candidates": the mean candidate count of a queue,
    before padding).

    shortlist: a `shortlist.Shortlist` to decode with (`decode.shortlist_top_k` / `_frequent`
    candidates, their union per queue), or None: the whole vocabulary. The loaders (`runs.Run.translator`,
    the ensemble's) pass the run's when decode.shortlist is on.
    """

    def __init__(self, config: Config, model: DecodingModel, params, source_vocab, target_vocab, shortlist=None):
        self.config = config
        if config.decode.dtype != "model":
            model = model.with_dtype(config.decode.dtype)  # compute dtype only; params stay
        self.model = model
        self.params = params
        self.source_vocab = source_vocab
        self.target_vocab = target_vocab
        self.shortlist = shortlist
        self._normalization = input_normalization(config.data)
        self._copy = config.model.copy_attention  # text in/out through extended ids (vocab.extended_ids)
        self.checkpoint: dict | None = None  # set by runs.Run.translator
        self.ignore_ids = blocking_ignore_ids(config, target_vocab)  # decode.ignore_when_blocking
        self.last_stats: dict = {}

    def _jitted(self, *key):
        """jit of encode_into (key ("encode", queue_shape): queue_shape (Q, S_all) starts a new
        queue, None adds to one) or decode (key (beam, nbest, max_len, S, attention, slots, Q, C));
        C: the shortlist's padded candidate count, or None (the whole vocabulary)."""
        m = self.model
        full_key = (m.cache_key, self.config.decode) + key
        if full_key not in _DECODERS:
            if key[0] == "encode":  # the queue (argument 3) is updated in place
                fn = jax.jit(functools.partial(encode_into, model=m, queue_shape=key[1]), donate_argnums=3)
            else:
                beam, nbest, max_len, _, attention, slots, _, _ = key
                fn = jax.jit(functools.partial(decode, model=m, config=self.config, beam_size=beam, nbest=nbest,
                                               max_len=max_len, slots=slots, attention=attention,
                                               ignore_ids=self.ignore_ids))
            _DECODERS[full_key] = fn
        return _DECODERS[full_key]

    def max_len_for(self, source_len) -> int:
        """Most output tokens (EOS included) for a source of `source_len` tokens (int or array)."""
        return max_output_length(self.config.decode.max_len_a, self.config.decode.max_len_b, source_len)

    def translate_ids(self, sources: Sequence[Sequence[int]], *, beam: int = 1, nbest: int = 1,
                      attention: bool = False, batch_size: int | None = None) -> list[dict]:
        """Decodes token-id sequences (each non-empty, without BOS/EOS). Returns, in input order,
        one dict per sentence: {"tokens": [nbest lists of ids, EOS dropped], "scores": [nbest
        floats], and with attention=True "attention": [T+1, S] of the best (the row T is the
        EOS) and "attentions": that array for each of the nbest hypotheses}.
        With beam 1, nbest must be 1 and the score is the sum of log-probs.
        """
        if nbest > max(beam, 1):
            raise ValueError(f"nbest {nbest} must be <= beam {beam}")
        compile_start = runtime.compile_seconds()
        batch_size = batch_size or self.config.decode.batch_size
        n = len(sources)
        lengths = np.asarray([len(s) for s in sources], np.int64)
        if n and lengths.min() == 0:
            raise ValueError("empty source sequence; translate() maps empty lines to empty output")
        # Longest first: a queue ends with its shortest sentences, so its last steps, when slots
        # run out of work, are few.
        order = np.argsort(-lengths, kind="stable")
        rows = batch_size if n >= batch_size else 1 << max(n - 1, 0).bit_length()
        # One source length for the whole call: every queue reuses one decode program. Padded
        # source positions cost only a little attention work.
        S_all = round_up(int(lengths.max()), LENGTH_MULTIPLE) if n else LENGTH_MULTIPLE
        max_len = int(self.max_len_for(S_all))
        pending, shapes, candidates = [], set(), []
        # With a shortlist a queue scores the union of its sentences' candidates. Whole queues
        # (not one batch each) keep the slots busy: on Multi30k test2016 one batch per queue took
        # 198 slot passes where a queue of the 1,000 sentences took 138, and that outweighed the
        # smaller union (~3,000 vs ~4,600 of 8,000 pieces; docs/speed.md).
        queue_rows = rows * QUEUE_BATCHES
        for queue_start in range(0, n, queue_rows):
            queue = order[queue_start:queue_start + queue_rows]
            batches = 1 << max(-(-len(queue) // rows) - 1, 0).bit_length()  # power of two
            Q = rows * batches
            src_len = np.ones((Q,), np.int32)  # dummy entries: never decoded
            src_len[:len(queue)] = lengths[queue]
            limits = np.ones((Q,), np.int32)
            limits[:len(queue)] = np.minimum(self.max_len_for(lengths[queue]), max_len)
            cache = None  # the first batch (the longest sentences) starts the queue's cache
            for start in range(0, Q, rows):
                idx = queue[start:start + rows]
                if not len(idx):
                    break  # the rest of the queue stays zeros (never decoded)
                S = round_up(int(lengths[idx].max()), LENGTH_MULTIPLE)
                src = np.zeros((rows, S), np.int32)
                for r, i in enumerate(idx):
                    src[r, :lengths[i]] = sources[i]
                shapes.add(S)
                encode_fn = self._jitted("encode", (Q, S_all) if cache is None else None)
                cache = encode_fn(self.params, src, src_len[start:start + rows], cache, np.int32(start))
            vocab_ids = self._vocab_ids([sources[i] for i in queue], candidates)
            decode_fn = self._jitted(beam, nbest, max_len, S_all, attention, rows, Q,
                                     None if vocab_ids is None else len(vocab_ids))
            pending.append((queue, decode_fn(self.params, cache, src_len, limits, np.int32(len(queue)), vocab_ids)))
        results: list[dict | None] = [None] * n
        n_tokens = 0
        for idx, out in pending:
            out = jax.device_get(out)
            tokens, lens, scores = out["tokens"], out["lengths"], out["scores"]
            att = out.get("attention")
            if beam == 1:  # greedy returns [B, T]; give it the n-best axis
                tokens, lens, scores = tokens[:, None], lens[:, None], scores[:, None]
                att = None if att is None else att[:, None]
            for r, i in enumerate(idx):
                hyps = [output_ids(tokens[r, k], lens[r, k]) for k in range(nbest)]
                n_tokens += len(hyps[0])
                res = {"tokens": hyps, "scores": [float(s) for s in scores[r, :nbest]]}
                if attention:
                    res["attentions"] = [np.asarray(att[r, k, :len(hyps[k]) + 1, :lengths[i]]) for k in range(nbest)]
                    res["attention"] = res["attentions"][0]
                results[i] = res
        self.last_stats = {"sentences": n, "tokens": n_tokens, "queues": len(pending),
                           "encoder_shapes": len(shapes),
                           "compile_seconds": runtime.compile_seconds() - compile_start}
        if candidates:
            self.last_stats["candidates"] = float(np.mean(candidates))
        return results

    def _vocab_ids(self, sources, counts: list):
        """The shortlist's padded candidate ids [C] for a queue's sources (None without a
        shortlist); appends the unpadded count to `counts`."""
        if self.shortlist is None:
            return None
        from s2s_jax.inference.shortlist import padded_ids

        dc = self.config.decode
        ids = self.shortlist.candidates(sources, top_k=dc.shortlist_top_k, frequent=dc.shortlist_frequent)
        counts.append(len(ids))
        return padded_ids(ids, self.model.target_vocab_size)

    def normalize(self, line: str) -> str:
        """A line as prepare normalised the training data (blank lines become "")."""
        return normalize(line, self._normalization) if self._normalization else (line if line.strip() else "")

    def encode_lines(self, lines: Sequence[str]) -> list[list[int]]:
        """Normalised, tokenized source lines (an empty list for a blank line)."""
        texts = [self.normalize(line) for line in lines]
        return self.source_vocab.encode_batch(texts)

    def translate_full(self, lines: Sequence[str], *, beam: int = 1, nbest: int = 1, attention: bool = False,
                       batch_size: int | None = None) -> list[list[dict]]:
        """Text in; per line the `nbest` hypotheses as dicts {"text", "score", "tokens" (pieces)}
        (+ "attention" [len(tokens) + 1, source pieces] with attention=True), in input order.

        Blank lines (and lines that encode to nothing) give nbest empty hypotheses of score 0.
        """
        encoded = self.encode_lines(lines)
        words = [None] * len(lines)
        if self._copy:
            encoded, words = self.extended_lines(lines, encoded)
        nonempty = [i for i, e in enumerate(encoded) if e]
        decoded = self.translate_ids([encoded[i] for i in nonempty], beam=beam, nbest=nbest,
                                     attention=attention, batch_size=batch_size)
        self.last_stats["sentences"] = len(lines)
        empty = {"text": "", "score": 0.0, "tokens": []}
        if attention:
            empty["attention"] = np.zeros((1, 0), np.float32)
        out = [[dict(empty) for _ in range(nbest)] for _ in lines]
        for i, res in zip(nonempty, decoded):
            out[i] = self.hypotheses(res, None if words[i] is None else (encoded[i], words[i]))
        return out

    def extended_lines(self, lines: Sequence[str], encoded) -> tuple[list, list]:
        """Copy attention: the lines' extended ids (unknown source words as V + k) and, per line,
        its unknown words (word k is id V + k)."""
        out_ids, out_words = [], []
        for line, ids in zip(lines, encoded):
            ext, _, words = extended_ids(self.source_vocab, ids, self.source_vocab.surfaces(self.normalize(line)))
            out_ids.append(ext)
            out_words.append(words)
        return out_ids, out_words

    def hypotheses(self, result: dict, copy: tuple | None = None) -> list[dict]:
        """One entry of `translate_ids` as text hypotheses [{"text", "score", "tokens"
        (pieces), + "attention" when the entry has it}]. copy: (the source's extended ids, its
        unknown words) of a copy-attention model: extended output ids are written as the source
        words, and each hypothesis lists them under "copied" ({"index": output position,
        "word", "source_positions"})."""
        hyps = []
        for k, (ids, score) in enumerate(zip(result["tokens"], result["scores"])):
            if copy is None:
                hyp = {"text": self.target_vocab.decode(ids), "score": score, "tokens": self.target_vocab.pieces(ids)}
            else:
                hyp = self._copied_hypothesis(ids, score, *copy)
            if "attentions" in result:
                hyp["attention"] = result["attentions"][k]
            hyps.append(hyp)
        return hyps

    def _copied_hypothesis(self, ids, score, source_ext, words) -> dict:
        V = self.target_vocab.vocab_size
        text, pieces = decode_extended(self.target_vocab, ids, words)
        copied = [{"index": j, "word": words[int(i) - V],
                   "source_positions": [n for n, x in enumerate(source_ext) if x == int(i)]}
                  for j, i in enumerate(ids) if int(i) >= V]
        return {"text": text, "score": score, "tokens": pieces, "copied": copied}

    def score(self, pairs: Sequence[tuple[str, str]], *, batch_size: int | None = None) -> list[dict]:
        """Log-probability the model gives each (source, target) text pair, both normalised as in
        training: per pair {"score": sum of token log-probs (EOS included), "tokens": target
        tokens + 1, "per_token": score / tokens}. A blank target scores its EOS alone; a blank
        source scores None (translate maps it to an empty line without decoding)."""
        if self._copy:
            raise UserError("scoring given targets is not implemented for copy-attention models yet "
                            "(model.copy_attention=True); translate and eval work")
        batch_size = batch_size or self.config.decode.batch_size
        sources = self.encode_lines([s for s, _ in pairs])
        targets = self.target_vocab.encode_batch([self.normalize(t) for _, t in pairs])
        out: list[dict] = [{"score": None, "tokens": 0, "per_token": None} for _ in pairs]
        index = [i for i in range(len(pairs)) if sources[i]]
        index.sort(key=lambda i: -len(sources[i]))
        key = ("score", self.model.cache_key)
        if key not in _DECODERS:
            _DECODERS[key] = jax.jit(functools.partial(score_batch, model=self.model))
        fn = _DECODERS[key]
        for start in range(0, len(index), batch_size):
            idx = index[start:start + batch_size]
            rows = 1 << max(len(idx) - 1, 0).bit_length()
            S = round_up(max(len(sources[i]) for i in idx))
            T = round_up(max(len(targets[i]) for i in idx) + 1)
            src = np.zeros((rows, S), np.int32)
            src_len = np.ones((rows,), np.int32)
            tin, tout, mask = (np.zeros((rows, T), np.int32) for _ in range(3))
            for r, i in enumerate(idx):
                n = len(targets[i])
                src[r, :len(sources[i])], src_len[r] = sources[i], len(sources[i])
                tin[r, :n + 1] = [BOS_ID] + targets[i]
                tout[r, :n + 1] = targets[i] + [EOS_ID]
                mask[r, :n + 1] = 1
            scores = np.asarray(fn(self.params, src, src_len, tin, tout, mask.astype(np.float32)))
            for r, i in enumerate(idx):
                n = len(targets[i]) + 1
                out[i] = {"score": float(scores[r]), "tokens": n, "per_token": float(scores[r]) / n}
        return out

    def translate(self, lines: Sequence[str], *, beam: int = 1, nbest: int = 1,
                  batch_size: int | None = None) -> list[list[tuple[str, float]]]:
        """Text in, per line a list of `nbest` (translation, score) pairs, in input order.

        Blank lines (and lines that encode to nothing) give [("", 0.0)] * nbest.
        """
        return [[(h["text"], h["score"]) for h in hyps]
                for hyps in self.translate_full(lines, beam=beam, nbest=nbest, batch_size=batch_size)]


# -- loading a run and the commands built on it ------------------------------------------------

def decode_overrides(config: Config, overrides=(), *, max_len: int | None = None,
                     batch_size: int | None = None) -> Config:
    """The run's config with translation-time changes (decode.* fields only; else a ConfigError)."""
    from s2s_jax import config as config_lib

    overrides = list(overrides)
    if max_len is not None:
        overrides += ["decode.max_len_a=0", f"decode.max_len_b={max_len}"]
    if batch_size is not None:
        overrides.append(f"decode.batch_size={batch_size}")
    bad = [o for o in overrides if not o.startswith("decode.")]
    if bad:
        raise config_lib.ConfigError(f"--set {bad[0]}: only decode.* fields can change at translation time")
    return config_lib.override(config, overrides)


def attention_figure(translator: Translator, lines: Sequence[str], *, beam: int = 1, max_sentences: int = 4):
    """A matplotlib figure of the attention of the best translation of up to `max_sentences`
    non-empty lines, one heatmap each, read top-down as JoeyNMT draws them: source pieces along
    the top, output pieces (EOS last) down the left side, the first output token in the top row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [line for line in lines if line.strip()][:max_sentences]
    sources = [s for s in translator.encode_lines(lines) if s]
    results = translator.translate_ids(sources, beam=beam, attention=True) if sources else []
    n = max(len(results), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 4.5), squeeze=False)
    for ax, src, res in zip(axes[0], sources, results):
        weights = res["attention"]  # [T+1, S]: row t = output token t
        out_pieces = translator.target_vocab.pieces(res["tokens"][0]) + ["</s>"]
        ax.imshow(weights, cmap="Greys", aspect="auto", vmin=0.0, vmax=1.0, interpolation="nearest", origin="upper")
        ax.xaxis.tick_top()
        ax.xaxis.set_label_position("top")
        ax.set_xticks(range(len(src)))
        ax.set_xticklabels(translator.source_vocab.pieces(src), rotation=90, fontsize=7)
        ax.set_yticks(range(len(out_pieces)))
        ax.set_yticklabels(out_pieces, fontsize=7)
        ax.set_xlabel("source")
        ax.set_ylabel("output")
    if not results:
        axes[0][0].text(0.5, 0.5, "no non-empty input", ha="center", va="center")
        axes[0][0].axis("off")
    fig.tight_layout()
    return fig


def plot_attention(translator: Translator, lines: Sequence[str], path: str, *, beam: int = 1,
                   max_sentences: int = 4) -> str:
    """Writes `attention_figure` of the lines as a PNG at `path`."""
    import matplotlib.pyplot as plt

    fig = attention_figure(translator, lines, beam=beam, max_sentences=max_sentences)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
