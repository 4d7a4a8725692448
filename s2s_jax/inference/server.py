"""`s2s-jax serve`: an HTTP translation server with dynamic batching.

    s2s-jax serve --workdir runs/m30k [--best] [--host 127.0.0.1] [--port 8080] [--api-key KEY]
    s2s-jax serve --bundle bundles/m30k
    s2s-jax serve --workdir runs/a --workdir runs/b [--weights 0.6,0.4]      # an ensemble

Routes (JSON in, JSON out):

    POST /translate             {"text": ["a sentence", ...], "beam": 5, "nbest": 1}
                                -> {"translations": [{"text", "score", "nbest": [{"text", "score"}...]}...]}
    POST /translator/translate  OpenNMT-py's route: [{"src": "a sentence", "id": 100}, ...]
                                -> [[{"src", "tgt", "n_best", "pred_score"}, ...]] (flat, n-best per input)
    GET  /health                {"status": "ok", "pending": sentences queued, ...} (no key needed)
    GET  /model                 config summary, vocabulary sizes, decode settings, limits, version

Why Starlette + uvicorn: Starlette is the small, well-kept ASGI toolkit underneath FastAPI; five
routes with hand-checked JSON need nothing more (FastAPI would add pydantic and its own 422
error format, where this server answers every bad request with one `{"error": "..."}` sentence).
uvicorn is the reference ASGI server: HTTP/1.1 keep-alive, and a graceful SIGTERM that stops
accepting, lets in-flight requests finish, then runs the app's shutdown.

Structure: the route handlers are module-level functions; what they share (engine, limits, API
key, worker) is one `Server` object, `app.state.server`, started and stopped by the app's
lifespan; a `RequestError` raised anywhere in a handler becomes its `{"error": ...}` response.
The engine is a `RunEngine` (a Translator: a run's, an ensemble's (`inference/ensemble.py`) or
an export bundle's, whose exported encoder and decoder step the same search drives,
`Bundle.translator`) or a `BundleEngine` (a bundle of format version 1, which has only
fixed-batch programs), both the `Engine` protocol. The command line's options are defined in
cli.py; `run(args)` is the verb.

Dynamic batching: one worker thread owns the model (the Translator is not thread-safe).
By default (`--batching stream`) the worker keeps a continuous-batching decoder running
(`inference/streaming.py`): each request's sentences join it as decoding slots free up,
whatever else is being decoded, and a request is answered when its last sentence finishes;
the decoder never idles at the end of a batch and a new request never waits for one. With
`--batching merge` (and for format-1 bundles) the worker takes, whenever it is free, every
queued request with the same (beam, nbest), up to `--max-batch` sentences, and decodes them in
one call. Either way each request gets its own sentences back, in its order, and a sentence's
translation does not depend on what it was batched with (tests/test_server.py).

Limits: at most `--max-sentences` per request and `--max-chars` per sentence (413), at most
`--max-pending` sentences queued (503 with Retry-After), a request body of at most
`--max-body-bytes` (413). Malformed JSON, invalid UTF-8, nesting past the parser's depth,
integers too long to convert, NaN/Infinity or any other wrong type at any depth, lone surrogates,
unknown fields, an empty list, bad beam/nbest: 400 naming the problem. No body gets a 500. With an API key (`--api-key` or S2S_JAX_API_KEY)
every route but /health requires `Authorization: Bearer KEY`, compared in constant time (401
otherwise). The server binds to 127.0.0.1 unless --host says otherwise; no request field can
name a file, a model or a path (unknown fields are refused).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from typing import Protocol

from s2s_jax.config import UserError

log = logging.getLogger(__name__)
API_KEY_ENV = "S2S_JAX_API_KEY"


@dataclasses.dataclass(frozen=True)
class Limits:
    max_sentences: int = 64  # per request
    max_chars: int = 2000  # per sentence (characters, before tokenization)
    max_pending: int = 2048  # sentences queued or decoding, over all requests
    max_batch: int = 0  # sentences merged into one decode call; 0: 16 * decode.batch_size
    max_beam: int = 16
    max_body_bytes: int = 1 << 20


class RequestError(Exception):
    """A request the server refuses: HTTP status and one sentence."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# -- the model side --------------------------------------------------------------------------

class Engine(Protocol):
    """What the worker decodes with: a run (`RunEngine`) or an export bundle (`BundleEngine`)."""

    description: dict  # GET /model
    default_beam: int  # a request without "beam" (serve --beam, else the model's own)
    batch_size: int  # decode.batch_size
    streams: bool  # can decode with continuous batching (StreamingWorker: needs a translator)

    def check(self, beam: int, nbest: int, limits: Limits) -> None:
        """RequestError(400) for a search this engine cannot run."""

    def translate(self, lines: list[str], beam: int, nbest: int) -> list[list[dict]]:
        """Per line, its n-best hypotheses {"text", "score", ...}, best first."""


def _number(n: int) -> str:
    """n for a message: in full up to 20 digits, else its first digits and its length."""
    text = str(n)
    return text if len(text) <= 20 else f"{text[:12]}... ({len(text.lstrip('-'))} digits)"


def _check_search(beam: int, nbest: int, limits: Limits) -> None:
    if not 1 <= beam <= limits.max_beam:
        raise RequestError(400, f"beam {_number(beam)}: must be between 1 and {limits.max_beam}")
    if not 1 <= nbest <= beam:
        raise RequestError(400, f"nbest {_number(nbest)}: must be between 1 and beam ({beam})")


class RunEngine:
    """A Translator: a trained run, an ensemble of runs, or an export bundle's step programs
    (`Bundle.translator`); any beam and n-best; streams."""

    streams = True

    def __init__(self, translator, description: dict):
        self.translator, self.description = translator, description
        self.default_beam = translator.config.decode.beam_size
        self.batch_size = translator.config.decode.batch_size

    def check(self, beam: int, nbest: int, limits: Limits) -> None:
        _check_search(beam, nbest, limits)

    def translate(self, lines: list[str], beam: int, nbest: int) -> list[list[dict]]:
        return self.translator.translate_full(lines, beam=beam, nbest=nbest)


class BundleEngine:
    """A bundle of format version 1 (no step programs): its fixed-batch programs, the beam
    sizes it was exported with, the best hypothesis only; served with `--batching merge`."""

    streams = False

    def __init__(self, bundle, description: dict):
        self.bundle, self.description = bundle, description
        self.default_beam = bundle.decode["default_beam"]
        self.batch_size = bundle.decode["batch_size"]

    def check(self, beam: int, nbest: int, limits: Limits) -> None:
        _check_search(beam, nbest, limits)
        if beam not in self.bundle.beam_sizes:
            raise RequestError(400, f"beam {beam}: this bundle decodes with beam sizes {self.bundle.beam_sizes}")
        if nbest != 1:
            raise RequestError(400, f"nbest {nbest}: an export bundle decodes the best hypothesis only")

    def translate(self, lines: list[str], beam: int, nbest: int) -> list[list[dict]]:
        return self.bundle.translate_full(lines, beam=beam, nbest=nbest)


def _model_summary(m) -> dict:
    """The /model "model" entry of a model config (a ModelConfig or its dict)."""
    keys = ("cell", "encoder_layers", "decoder_layers", "bidirectional", "hidden_dim", "attention",
            "input_feeding", "dtype")
    return {k: m.get(k) if isinstance(m, dict) else getattr(m, k) for k in keys}


def _vocab_summary(source_vocab, target_vocab) -> dict:
    return {"source": {"kind": source_vocab.kind, "size": source_vocab.vocab_size},
            "target": {"kind": target_vocab.kind, "size": target_vocab.vocab_size}}


def _run_description(translator, kind: str = "run") -> dict:
    """GET /model of a Translator over a run or an ensemble (its config is the first run's)."""
    import s2s_jax

    config = translator.config
    d, dc = config.data, config.decode
    models = translator.model.config if kind == "ensemble" else config.model
    return {"name": config.name, "version": s2s_jax.__version__, "kind": kind,
            "checkpoint": translator.checkpoint,
            "model": [_model_summary(m) for m in models] if kind == "ensemble" else _model_summary(models),
            "languages": {"source": d.src_lang, "target": d.tgt_lang},
            "vocab": _vocab_summary(translator.source_vocab, translator.target_vocab),
            "normalization": d.normalization if d.source != "task" else None,
            "decode": {"beam_size": dc.beam_size, "batch_size": dc.batch_size, "length_penalty": dc.length_penalty,
                       "max_len_a": dc.max_len_a, "max_len_b": dc.max_len_b}}


def _bundle_description(bundle) -> dict:
    import s2s_jax

    c, man = bundle.config, bundle.manifest
    d = c.get("data", {})
    return {"name": c.get("name"), "version": s2s_jax.__version__, "kind": "bundle",
            "checkpoint": man.get("checkpoint"), "bundle_format_version": man.get("format_version"),
            "model": _model_summary(c.get("model", {})),
            "languages": {"source": d.get("src_lang"), "target": d.get("tgt_lang")},
            "vocab": _vocab_summary(bundle.source_vocab, bundle.target_vocab),
            "normalization": d.get("normalization") if d.get("source") != "task" else None,
            "decode": dict(bundle.decode, beam_sizes=None if bundle.streams else bundle.beam_sizes)}


def _bundle_engine(path: str, run_options: bool) -> Engine:
    from s2s_jax.inference.bundle import load_bundle

    if run_options:
        raise UserError("--step/--best/--average-last/--weights/--set/--max-len/--batch-size apply to --workdir "
                        "runs; a bundle's decode settings were fixed at export")
    bundle = load_bundle(path)
    if not bundle.streams:  # format version 1: fixed-batch programs only
        return BundleEngine(bundle, _bundle_description(bundle))
    return RunEngine(bundle.translator(), _bundle_description(bundle))


def load_engine(*, workdir=None, bundle: str | None = None, weights: str | None = None, step=None, best=False,
                average_last=None, overrides=(), max_len=None, batch_size=None) -> Engine:
    """The engine of `serve`: workdir a run (a path) or an ensemble (several paths, `weights`
    "w1,w2,..." as `translate --weights` takes them), or bundle an export bundle."""
    workdirs = [workdir] if isinstance(workdir, (str, os.PathLike)) else list(workdir or [])
    if bool(workdirs) == (bundle is not None):
        raise UserError("serve needs --workdir RUN (several for an ensemble) or --bundle DIR, not both")
    if bundle is not None:
        return _bundle_engine(bundle, step is not None or best or average_last is not None or bool(overrides)
                              or bool(max_len) or bool(batch_size) or weights is not None)
    choice = dict(step=step, best=best, average_last=average_last, overrides=overrides, max_len=max_len,
                  batch_size=batch_size)
    if len(workdirs) > 1:
        from s2s_jax.inference.ensemble import load_ensemble_translator, parse_weights

        translator = load_ensemble_translator([os.fspath(w) for w in workdirs],
                                              weights=parse_weights(weights, len(workdirs)), **choice)
        return RunEngine(translator, _run_description(translator, "ensemble"))
    if weights is not None:
        raise UserError("--weights: give several --workdir runs to serve their ensemble")
    from s2s_jax.inference.runs import load_translator

    translator = load_translator(os.fspath(workdirs[0]), **choice)
    return RunEngine(translator, _run_description(translator))


# -- dynamic batching -----------------------------------------------------------------------

@dataclasses.dataclass
class _Job:
    lines: list[str]
    beam: int
    nbest: int
    future: concurrent.futures.Future
    results: list | None = None  # StreamingWorker: per sentence, filled as they finish
    remaining: int = 0
    copy: list | None = None  # StreamingWorker, copy attention: per sentence (extended ids, unknown words)


class _Worker:
    """One thread owns the engine. `submit` returns a concurrent.futures.Future of a request's
    results (in its order), or raises RequestError(503) when more than `max_pending` sentences
    would be waiting; `close` answers everything submitted, then stops the thread."""

    def __init__(self, engine: Engine, *, max_pending: int):
        self.engine, self.max_pending = engine, max_pending
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.pending = 0  # sentences submitted and not yet answered
        self.stats = {"requests": 0, "sentences": 0, "decode_calls": 0, "decode_seconds": 0.0}
        self._thread = threading.Thread(target=self._loop, name="s2s-jax-decoder", daemon=True)
        self._thread.start()

    def submit(self, lines: list[str], beam: int, nbest: int) -> concurrent.futures.Future:
        with self._lock:
            if self.pending + len(lines) > self.max_pending:
                raise RequestError(503, f"the server is busy ({self.pending} sentences queued, at most "
                                        f"{self.max_pending}); retry shortly", {"Retry-After": "1"})
            self.pending += len(lines)
        job = _Job(list(lines), beam, nbest, concurrent.futures.Future())
        self._jobs.put(job)
        return job.future

    def close(self, timeout: float | None = None) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)

    def _done(self, job: _Job, results=None, error: Exception | None = None) -> None:
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(results)
        with self._lock:
            self.pending -= len(job.lines)
        self.stats["requests"] += 1
        self.stats["sentences"] += len(job.lines)

    def _loop(self) -> None:
        raise NotImplementedError


class BatchingWorker(_Worker):
    """Merges waiting requests into one decode call: whenever the engine is free, the oldest
    request and every waiting one with the same (beam, nbest), up to `max_batch` sentences, are
    decoded together (`Engine.translate`). Used for export bundles, whose programs decode fixed
    batches, and with `serve --batching merge`."""

    def __init__(self, engine: Engine, *, max_batch: int, max_pending: int):
        self.max_batch = max_batch
        self._held: list[_Job] = []  # taken from the queue but of another (beam, nbest): next round
        super().__init__(engine, max_pending=max_pending)

    def _next_round(self) -> list[_Job] | None:
        """The jobs of the next decode call (None: closed and nothing left)."""
        if self._held:
            first = self._held.pop(0)
        else:
            first = self._jobs.get()
            if first is None:
                return None
        jobs, n = [first], len(first.lines)
        waiting = self._held
        self._held = []
        closing = False
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                closing = True
                break
            waiting.append(job)
        for job in waiting:
            if (job.beam, job.nbest) == (first.beam, first.nbest) and n + len(job.lines) <= self.max_batch:
                jobs.append(job)
                n += len(job.lines)
            else:
                self._held.append(job)
        if closing:
            self._jobs.put(None)  # seen again once the held jobs are done
        return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._next_round()
            if jobs is None:
                return
            lines = [line for job in jobs for line in job.lines]
            t0 = time.perf_counter()
            try:
                results = self.engine.translate(lines, jobs[0].beam, jobs[0].nbest)
            except Exception as e:  # noqa: BLE001 - a failed decode fails its requests, not the worker
                log.exception("decoding failed")
                for job in jobs:
                    self._done(job, error=e)
            else:
                start = 0
                for job in jobs:
                    self._done(job, results[start:start + len(job.lines)])
                    start += len(job.lines)
            self.stats["decode_calls"] += 1
            self.stats["decode_seconds"] += time.perf_counter() - t0


class StreamingWorker(_Worker):
    """Continuous batching across requests (`inference.streaming.StreamingDecoder`): each
    request's sentences join the running decoder of its (beam, nbest) as slots free up, and a
    request is answered as soon as its last sentence finishes. Any `RunEngine`."""

    MAX_DECODERS = 4  # idle decoders beyond this many (beam, nbest) settings are dropped

    def __init__(self, engine: RunEngine, *, max_pending: int, chunk_steps: int = 4):
        self.chunk_steps = chunk_steps
        self._decoders: dict = {}
        super().__init__(engine, max_pending=max_pending)

    def _decoder(self, beam: int, nbest: int):
        from s2s_jax.inference.streaming import StreamingDecoder

        key = (beam, nbest)
        if key not in self._decoders:
            idle = [k for k, d in self._decoders.items() if not d.busy]
            while len(self._decoders) >= self.MAX_DECODERS and idle:
                del self._decoders[idle.pop(0)]
            self._decoders[key] = StreamingDecoder(self.engine.translator, beam=beam, nbest=nbest,
                                                   chunk_steps=self.chunk_steps)
        return self._decoders[key]

    def _start(self, job: _Job, open_jobs: dict) -> None:
        translator = self.engine.translator
        encoded = translator.encode_lines(job.lines)
        job.copy = [None] * len(encoded)
        if translator.config.model.copy_attention:  # unknown source words as extended ids, as translate does
            encoded, words = translator.extended_lines(job.lines, encoded)
            job.copy = list(zip(encoded, words))
        empty = [{"text": "", "score": 0.0, "tokens": []} for _ in range(job.nbest)]
        job.results = [list(empty) if not ids else None for ids in encoded]
        job.remaining = sum(1 for ids in encoded if ids)
        if not job.remaining:
            self._done(job, job.results)
            return
        open_jobs[id(job)] = job
        self._decoder(job.beam, job.nbest).add([((id(job), i), ids) for i, ids in enumerate(encoded) if ids])

    def _loop(self) -> None:
        open_jobs: dict = {}
        closing = False
        while True:
            busy = [d for d in self._decoders.values() if d.busy]
            if closing and not busy:
                return
            while not closing:  # take every waiting request; block only when there is no work
                try:
                    job = self._jobs.get(block=not busy and not open_jobs)
                except queue.Empty:
                    break
                if job is None:
                    closing = True
                    break
                try:
                    self._start(job, open_jobs)
                except Exception as e:  # noqa: BLE001
                    log.exception("encoding failed")
                    self._done(job, error=e)
                busy = [d for d in self._decoders.values() if d.busy]
            for decoder in busy:
                t0 = time.perf_counter()
                try:
                    finished = decoder.step()
                except Exception as e:  # noqa: BLE001 - fail the requests of this decoder, keep serving
                    log.exception("decoding failed")
                    for key in [k for k, j in open_jobs.items() if (j.beam, j.nbest) == (decoder.beam, decoder.nbest)]:
                        self._done(open_jobs.pop(key), error=e)
                    self._decoders = {k: d for k, d in self._decoders.items() if d is not decoder}
                    continue
                self.stats["decode_calls"] += 1
                self.stats["decode_seconds"] += time.perf_counter() - t0
                for (job_id, i), result in finished:
                    job = open_jobs[job_id]
                    job.results[i] = self.engine.translator.hypotheses(result, job.copy[i])
                    job.remaining -= 1
                    if not job.remaining:
                        self._done(open_jobs.pop(job_id), job.results)


# -- reading requests -----------------------------------------------------------------------
# Every body the server cannot use is a RequestError (4xx, one sentence), whatever its size,
# shape or nesting: nothing a client sends reaches the worker unchecked or ends in a 500.

def _describe(value) -> str:
    """A short JSON rendering of a wrong value, for messages (never fails, whatever its depth)."""
    try:
        return json.dumps(value)[:40]
    except (RecursionError, ValueError):
        return type(value).__name__


def _check_sentences(texts, limits: Limits, field: str) -> list[str]:
    if not isinstance(texts, list):
        raise RequestError(400, f"{field} must be a list of strings, got {type(texts).__name__}")
    if not texts:
        raise RequestError(400, f"{field} is an empty list; send at least one sentence")
    if len(texts) > limits.max_sentences:
        raise RequestError(413, f"{field} has {len(texts)} sentences; at most {limits.max_sentences} per request")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise RequestError(400, f"{field}[{i}] must be a string, got {type(t).__name__}")
        if len(t) > limits.max_chars:
            raise RequestError(413, f"{field}[{i}] has {len(t)} characters; at most {limits.max_chars} per sentence")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate escape such as "\ud800"
            raise RequestError(400, f"{field}[{i}] is not valid Unicode (a lone surrogate at character "
                                    f"{e.start}); send text") from None
    return texts


def _int_field(body: dict, name: str, default: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"{name} must be an integer, got {_describe(value)}")
    return value


def _content_length(request) -> int | None:
    length = request.headers.get("content-length")
    return int(length) if length is not None and length.isascii() and length.isdigit() else None


async def _read_body(request, max_bytes: int) -> bytes:
    length = _content_length(request)
    if length is not None and length > max_bytes:
        raise RequestError(413, f"request body of {length} bytes; at most {max_bytes}")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise RequestError(413, f"request body over {max_bytes} bytes")
    return bytes(raw)


def _parse_json(raw: bytes):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(400, f"request body is not valid UTF-8 (byte {e.start}); send UTF-8 JSON") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(400, f"request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise RequestError(400, "request body is nested too deeply; send a flat JSON object") from None
    except ValueError as e:  # e.g. an integer longer than Python converts
        raise RequestError(400, f"request body is not usable JSON ({str(e).splitlines()[0][:80]})") from None


def _translate_request(body, limits: Limits, default_beam: int) -> tuple[list[str], int, int]:
    """(lines, beam, nbest) of a POST /translate body."""
    if not isinstance(body, dict):
        raise RequestError(400, 'the body must be a JSON object such as {"text": ["a sentence"]}')
    unknown = sorted(set(body) - {"text", "beam", "nbest"})
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0]!r}; the fields are text, beam and nbest")
    if "text" not in body:
        raise RequestError(400, 'missing field "text" (a list of strings)')
    lines = _check_sentences(body["text"], limits, "text")
    return lines, _int_field(body, "beam", default_beam), _int_field(body, "nbest", 1)


def _opennmt_request(body, limits: Limits) -> list[str]:
    """The sentences of a POST /translator/translate body ([{"src": ..., "id": ...}, ...])."""
    if not isinstance(body, list):
        raise RequestError(400, 'the body must be a JSON list such as [{"src": "a sentence", "id": 100}]')
    if not body:
        raise RequestError(400, "the list is empty; send at least one {\"src\": ...} object")
    lines = []
    for i, item in enumerate(body):
        if not isinstance(item, dict) or "src" not in item:
            raise RequestError(400, f'item {i} must be an object with a "src" string')
        unknown = sorted(set(item) - {"src", "id"})
        if unknown:
            raise RequestError(400, f"item {i}: unknown field {unknown[0]!r}; the fields are src and id")
        if "id" in item and (isinstance(item["id"], bool) or not isinstance(item["id"], int)):
            raise RequestError(400, f'item {i}: "id" must be an integer')
        lines.append(item["src"])
    return _check_sentences(lines, limits, "src")


# -- the HTTP app ---------------------------------------------------------------------------

class Server:
    """What the handlers share: the engine, the limits, the API key and the worker (started and
    stopped by the app's lifespan). The app holds it as `app.state.server`."""

    def __init__(self, engine: Engine, *, limits: Limits, api_key: str | None, streaming: bool, chunk_steps: int):
        self.engine, self.limits, self.streaming, self.chunk_steps = engine, limits, streaming, chunk_steps
        self.key = api_key.encode("utf-8") if api_key else None
        self.max_batch = limits.max_batch or 16 * engine.batch_size
        self.worker: _Worker | None = None

    def start(self) -> None:
        if self.streaming:
            self.worker = StreamingWorker(self.engine, max_pending=self.limits.max_pending,
                                          chunk_steps=self.chunk_steps)
        else:
            self.worker = BatchingWorker(self.engine, max_batch=self.max_batch, max_pending=self.limits.max_pending)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.close()

    def authorize(self, request) -> None:
        if self.key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("utf-8"), self.key):
            raise RequestError(401, "missing or wrong API key; send the header 'Authorization: Bearer KEY'",
                               {"WWW-Authenticate": "Bearer"})

    async def read_json(self, request):
        """The request's JSON body (after the API key check)."""
        self.authorize(request)
        return _parse_json(await _read_body(request, self.limits.max_body_bytes))

    async def decode(self, lines: list[str], beam: int, nbest: int) -> list[list[dict]]:
        self.engine.check(beam, nbest, self.limits)
        if self.worker is None:
            raise RequestError(503, "the server is starting; retry shortly", {"Retry-After": "1"})
        future = self.worker.submit(lines, beam, nbest)
        try:
            return await asyncio.wrap_future(future)
        except Exception as e:  # noqa: BLE001
            raise RequestError(500, f"decoding failed ({type(e).__name__}); see the server log") from None


async def translate(request):
    server: Server = request.app.state.server
    lines, beam, nbest = _translate_request(await server.read_json(request), server.limits,
                                            server.engine.default_beam)
    results = await server.decode(lines, beam, nbest)
    return _json({"translations": [
        {"text": hyps[0]["text"], "score": hyps[0]["score"],
         "nbest": [{"text": h["text"], "score": h["score"]} for h in hyps]} for hyps in results]})


async def translator_translate(request):
    """OpenNMT-py's onmt/bin/server.py route and format."""
    server: Server = request.app.state.server
    lines = _opennmt_request(await server.read_json(request), server.limits)
    results = await server.decode(lines, server.engine.default_beam, 1)
    return _json([[{"src": src, "tgt": hyps[0]["text"], "n_best": 1, "pred_score": hyps[0]["score"]}
                   for src, hyps in zip(lines, results)]])


async def health(request):
    """Liveness: no API key needed."""
    worker = request.app.state.server.worker
    return _json({"status": "ok" if worker is not None else "starting",
                  "pending": worker.pending if worker else 0, **(worker.stats if worker else {})})


async def model(request):
    server: Server = request.app.state.server
    server.authorize(request)
    return _json(dict(server.engine.description, batching="stream" if server.streaming else "merge",
                      limits=dict(dataclasses.asdict(server.limits), max_batch=server.max_batch)))


def _json(content, status: int = 200, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(content, status_code=status, headers=headers)


async def _request_error(request, exc: RequestError):
    return _json({"error": exc.message}, exc.status, exc.headers)


@contextlib.asynccontextmanager
async def _lifespan(app):
    server: Server = app.state.server
    server.start()
    try:
        yield
    finally:  # uvicorn has let in-flight requests finish; answer anything left, then stop
        await asyncio.get_running_loop().run_in_executor(None, server.stop)


def create_app(engine: Engine, *, limits: Limits = Limits(), api_key: str | None = None, batching: str = "auto",
               chunk_steps: int = 4):
    """The Starlette app (its lifespan starts and stops the worker). batching: "stream"
    (continuous batching across requests), "merge" (one decode call per group of waiting
    requests) or "auto" (stream, except for a format-1 bundle, which has no step programs)."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    if batching not in ("auto", "stream", "merge"):
        raise UserError(f"--batching {batching}: choose auto, stream or merge")
    if batching == "stream" and not engine.streams:
        raise UserError("--batching stream: this bundle (format version 1) has no step programs; re-export it "
                        "with `python -m s2s_jax export`, or serve it with --batching merge")
    if batching == "auto" and not engine.streams:
        log.warning("this bundle (format version 1) has no step programs: serving it with one decode call per "
                    "group of requests (--batching merge, slower); re-export it for continuous batching")
    streaming = batching == "stream" or (batching == "auto" and engine.streams)
    routes = [Route("/translate", translate, methods=["POST"]),
              Route("/translator/translate", translator_translate, methods=["POST"]),
              Route("/health", health, methods=["GET"]),
              Route("/model", model, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=_lifespan, exception_handlers={RequestError: _request_error})
    app.state.server = Server(engine, limits=limits, api_key=api_key, streaming=streaming, chunk_steps=chunk_steps)
    return app


# -- command line ---------------------------------------------------------------------------

def run(args) -> int:
    import uvicorn

    limits = Limits(max_sentences=args.max_sentences, max_chars=args.max_chars, max_pending=args.max_pending,
                    max_batch=args.max_batch, max_beam=args.max_beam)
    for name, value in dataclasses.asdict(limits).items():
        if value < (0 if name == "max_batch" else 1):
            raise UserError(f"--{name.replace('_', '-')} {value}: must be at least {0 if name == 'max_batch' else 1}")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port {args.port}: must be between 0 and 65535")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
        sock.listen(2048)  # connections wait in the backlog until uvicorn accepts (no refusal while loading)
    except OSError as e:
        raise UserError(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror}); "
                        f"pick another port") from None
    engine = load_engine(workdir=args.workdir, bundle=args.bundle, weights=args.weights, step=args.step, best=args.best,
                         average_last=args.average_last, overrides=args.overrides, max_len=args.max_len,
                         batch_size=args.batch_size)
    if args.beam is not None:
        try:
            engine.check(args.beam, 1, limits)
        except RequestError as e:
            raise UserError(f"--{e.message}") from None
        engine.default_beam = args.beam
    if args.chunk_steps < 1:
        raise UserError(f"--chunk-steps {args.chunk_steps}: must be at least 1")
    app = create_app(engine, limits=limits, api_key=api_key, batching=args.batching, chunk_steps=args.chunk_steps)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=args.graceful_seconds))
    host, port = sock.getsockname()[:2]
    print(f"s2s_jax serve: {engine.description['name']} ({engine.description['kind']}) on http://{host}:{port}"
          f"{' (API key required)' if api_key else ''}", file=sys.stderr, flush=True)
    # uvicorn re-raises a SIGTERM/SIGINT it handled once it has shut down gracefully; with these
    # handlers in place that ends here, and a graceful stop exits 0.
    stopped = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopped.append(signum))
    server.run(sockets=[sock])
    print(f"s2s_jax serve: stopped ({'signal' if stopped else 'shutdown'})", file=sys.stderr, flush=True)
    return 0
