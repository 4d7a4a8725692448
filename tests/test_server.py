"""The translation server over loopback with a real HTTP client (httpx): routes, every bad
request's status and message, merging of concurrent requests, SIGTERM with requests in
flight, the API key, and bundles and ensembles served (the bundle server answers as the run
server, the ensemble server as `translate --workdir A --workdir B`)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.conftest import ROOT

LINES = ["hello world", "abc", "", "quick brown fox", "x", "jax and flax", "seq2seq", "zyx"]


@contextlib.contextmanager
def serve(kind, path, *extra, api_key=None):
    """Starts `s2s_jax serve` on a free loopback port; yields an httpx client; stops it with SIGTERM."""
    from tests._helpers import run_env

    cmd = [sys.executable, "-m", "s2s_jax", "serve", kind, str(path), "--port", "0", *extra]
    if api_key:
        cmd += ["--api-key", api_key]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=run_env())
    try:
        line = ""
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stderr.readline()
            m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            if m:
                break
            if not line and proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}")
        else:
            raise AssertionError(f"server did not start: {line}")
        with httpx.Client(base_url=m.group(1), timeout=120) as client:
            deadline = time.time() + 60
            while client.get("/health").json()["status"] != "ok" and time.time() < deadline:
                time.sleep(0.05)
            client.proc = proc
            yield client
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def expected(tiny_task_run):
    from s2s_jax.inference.runs import load_translator

    translator = load_translator(str(tiny_task_run))
    return {beam: translator.translate(LINES, beam=beam, nbest=min(beam, 2)) for beam in (1, 3)}


@pytest.fixture(scope="module")
def server(tiny_task_run):
    with serve("--workdir", tiny_task_run, "--max-sentences", "16", "--max-chars", "40", "--max-pending", "256") as c:
        yield c


def test_translate_route_equals_offline(server, expected):
    r = server.post("/translate", json={"text": LINES, "beam": 3, "nbest": 2})
    assert r.status_code == 200, r.text
    got = r.json()["translations"]
    assert [g["text"] for g in got] == [hyps[0][0] for hyps in expected[3]]
    for g, hyps in zip(got, expected[3]):
        assert [n["text"] for n in g["nbest"]] == [t for t, _ in hyps]
        assert [n["score"] for n in g["nbest"]] == pytest.approx([s for _, s in hyps], abs=1e-5)
    r = server.post("/translate", json={"text": LINES})  # the run's beam (1), n-best 1
    assert [g["text"] for g in r.json()["translations"]] == [hyps[0][0] for hyps in expected[1]]


def test_opennmt_route_and_format(server, expected):
    r = server.post("/translator/translate", json=[{"src": s, "id": 100} for s in LINES[:3]])
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body, list) and len(body) == 1 and len(body[0]) == 3
    for item, src, hyps in zip(body[0], LINES, expected[1]):
        assert item["src"] == src and item["tgt"] == hyps[0][0] and item["n_best"] == 1
        assert item["pred_score"] == pytest.approx(hyps[0][1], abs=1e-5)


def test_health_and_model(server):
    health = server.get("/health").json()
    assert health["status"] == "ok" and health["pending"] == 0
    model = server.get("/model").json()
    assert model["name"] == "tiny" and model["kind"] == "run" and model["vocab"]["source"] == {"kind": "char", "size": 99}
    assert model["model"]["cell"] == "lstm" and model["limits"]["max_sentences"] == 16 and model["version"]


@pytest.mark.parametrize("route,body,status,message", [
    ("/translate", b'{"text": [', 400, "not valid JSON"),
    ("/translate", b'{"text": ["\xff\xfe"]}', 400, "not valid UTF-8"),
    ("/translate", b'["a"]', 400, "must be a JSON object"),
    ("/translate", b'{"text": "one string"}', 400, "text must be a list of strings"),
    ("/translate", b'{"text": ["ok", 3]}', 400, "text[1] must be a string"),
    ("/translate", b'{"text": []}', 400, "empty list"),
    ("/translate", b'{}', 400, 'missing field "text"'),
    ("/translate", b'{"text": ["a"], "model": "/etc/passwd"}', 400, "unknown field 'model'"),
    ("/translate", b'{"text": ["a"], "beam": "5"}', 400, "beam must be an integer"),
    ("/translate", b'{"text": ["a"], "beam": 0}', 400, "beam 0: must be between 1 and 16"),
    ("/translate", b'{"text": ["a"], "beam": 2, "nbest": 3}', 400, "nbest 3: must be between 1 and beam (2)"),
    ("/translate", b'{"text": ' + str(["a"] * 17).replace("'", '"').encode() + b'}', 413, "at most 16 per request"),
    ("/translate", b'{"text": ["' + b"a" * 41 + b'"]}', 413, "at most 40 per sentence"),
    ("/translator/translate", b'{"src": "a"}', 400, "must be a JSON list"),
    ("/translator/translate", b'[{"source": "a"}]', 400, 'item 0 must be an object with a "src" string'),
    ("/translator/translate", b'[{"src": "a", "id": "x"}]', 400, '"id" must be an integer'),
    ("/translator/translate", b'[{"src": 5}]', 400, "src[0] must be a string"),
])
def test_bad_requests_get_their_status_and_message(server, route, body, status, message):
    r = server.post(route, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert server.get("/health").json()["status"] == "ok"  # the worker is still serving
    assert server.post("/translate", json={"text": ["abc"]}).status_code == 200


def test_full_queue_is_503_with_retry_after(tiny_task_run):
    """--max-pending 4: a request that would queue a 5th sentence is refused (the worker's
    accounting under concurrency is in test_batching_worker_merges_waiting_requests...)."""
    with serve("--workdir", tiny_task_run, "--max-pending", "4") as c:
        r = c.post("/translate", json={"text": ["a", "b", "c", "d", "e"]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["error"]
        assert c.post("/translate", json={"text": ["a", "b", "c", "d"]}).status_code == 200


def test_concurrent_requests_are_answered_correctly_and_in_order(server, expected):
    """24 clients at once, each with its own slice and order of the lines: every request gets its
    own sentences back, in its order, exactly as decoded offline."""
    table = dict(zip(LINES, (h[0] for h in expected[3])))

    def one(i):
        lines = [LINES[(i + k) % len(LINES)] for k in range(1 + i % 7)][::(-1) ** i]
        r = httpx.post(str(server.base_url.join("/translate")), json={"text": lines, "beam": 3}, timeout=120)
        assert r.status_code == 200, r.text
        return lines, r.json()["translations"]

    before = server.get("/health").json()
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(24)))
    for lines, got in results:
        assert [g["text"] for g in got] == [table[line][0] for line in lines]
        assert [g["score"] for g in got] == pytest.approx([table[line][1] for line in lines], abs=1e-5)
    after = server.get("/health").json()
    assert after["requests"] - before["requests"] == 24 and after["pending"] == 0


def test_batching_worker_merges_waiting_requests_of_the_same_search():
    """While the engine decodes one request, the waiting ones with the same (beam, nbest) are
    merged into the next call; another beam waits for its own call; results split back in order."""
    from s2s_jax.inference.server import BatchingWorker, RequestError

    calls, release = [], threading.Event()

    class Engine:
        def translate(self, lines, beam, nbest):
            calls.append((list(lines), beam, nbest))
            if len(calls) == 1:
                release.wait(10)
            return [[{"text": line.upper(), "score": float(-len(line))}] for line in lines]

    worker = BatchingWorker(Engine(), max_batch=5, max_pending=100)
    first = worker.submit(["a"], 1, 1)
    while not calls:
        time.sleep(0.001)
    futures = [worker.submit(["b", "c"], 1, 1), worker.submit(["d"], 5, 1), worker.submit(["e", "f"], 1, 1),
               worker.submit(["g", "h"], 1, 1)]  # the last one no longer fits in max_batch=5 with b, c, e, f
    assert worker.pending == 8
    with pytest.raises(RequestError) as busy:
        BatchingWorker(Engine(), max_batch=5, max_pending=2).submit(["x", "y", "z"], 1, 1)
    assert busy.value.status == 503
    release.set()
    assert [h[0]["text"] for h in first.result(10)] == ["A"]
    assert [[h[0]["text"] for h in f.result(10)] for f in futures] == [["B", "C"], ["D"], ["E", "F"], ["G", "H"]]
    assert calls == [(["a"], 1, 1), (["b", "c", "e", "f"], 1, 1), (["d"], 5, 1), (["g", "h"], 1, 1)]
    worker.close(10)
    assert worker.pending == 0 and worker.stats["decode_calls"] == 4


def test_sigterm_answers_requests_in_flight_then_exits_0(tiny_task_run):
    long_lines = ["abcdefghij" * 30] * 48  # 300 characters each: seconds of beam search
    with serve("--workdir", tiny_task_run, "--max-chars", "400") as client:
        url = str(client.base_url.join("/translate"))
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(httpx.post, url, json={"text": long_lines[:16 * (i + 1)], "beam": 4}, timeout=300)
                       for i in range(3)]
            def arrived():  # sentences of requests the server holds: queued, decoding or answered
                health = client.get("/health").json()
                return health["pending"] + health["sentences"], health["pending"]

            deadline = time.time() + 60
            while arrived()[0] < 96 and time.time() < deadline:
                time.sleep(0.01)
            assert arrived()[1] > 0  # all three requests arrived, and some are still being decoded
            client.proc.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert [len(r.json()["translations"]) for r in responses] == [16, 32, 48]
        assert client.proc.wait(timeout=120) == 0
        assert "stopped (signal)" in client.proc.stderr.read()


def test_api_key(tiny_task_run):
    with serve("--workdir", tiny_task_run, api_key="s3cret") as client:
        assert client.post("/translate", json={"text": ["abc"]}).status_code == 401
        r = client.post("/translate", json={"text": ["abc"]}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "API key" in r.json()["error"] and r.headers["www-authenticate"] == "Bearer"
        assert client.get("/model").status_code == 401
        assert client.get("/health").status_code == 200  # liveness probes need no key
        ok = client.post("/translate", json={"text": ["abc"]}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and len(ok.json()["translations"]) == 1
        r = client.post("/translator/translate", json=[{"src": "abc"}], headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200


@pytest.fixture(scope="module")
def tiny_bundle(tiny_task_run, tmp_path_factory):
    from s2s_jax.inference.export import export_bundle

    return export_bundle(str(tiny_task_run), str(tmp_path_factory.mktemp("serve_bundle") / "bundle"),
                         beams=[3], platforms=("cpu",))


def test_bundle_server_equals_run_server(server, tiny_bundle):
    """`serve --bundle` streams through the same slot pool as `serve --workdir` (the bundle's
    step programs): the same answers, any beam and n-best, concurrent requests included."""
    with serve("--bundle", tiny_bundle, "--max-sentences", "16") as bundle_server:
        model = bundle_server.get("/model").json()
        assert model["kind"] == "bundle" and model["batching"] == "stream" and model["bundle_format_version"] == 2
        for body in ({"text": LINES, "beam": 3, "nbest": 2}, {"text": LINES}, {"text": LINES[::-1], "beam": 4}):
            got = bundle_server.post("/translate", json=body)
            want = server.post("/translate", json=body)
            assert got.status_code == want.status_code == 200, got.text
            got, want = got.json()["translations"], want.json()["translations"]
            assert [[n["text"] for n in g["nbest"]] for g in got] == [[n["text"] for n in w["nbest"]] for w in want]
            assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=1e-5)
        url = str(bundle_server.base_url.join("/translate"))
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            bodies = [{"text": [LINES[(i + k) % len(LINES)] for k in range(1 + i % 5)], "beam": 3} for i in range(8)]
            answers = list(pool.map(lambda b: httpx.post(url, json=b, timeout=120).json(), bodies))
        for body, answer in zip(bodies, answers):
            want = server.post("/translate", json=body).json()
            assert [g["text"] for g in answer["translations"]] == [w["text"] for w in want["translations"]]


def test_ensemble_server_equals_translate_cli(tiny_task_run, other_seed_run):
    """`serve --workdir A --workdir B --weights` answers as `translate --workdir A --workdir B
    --weights` writes, greedy and beam."""
    from tests.conftest import run_cli

    runs = ["--workdir", str(tiny_task_run), "--workdir", str(other_seed_run), "--weights", "3,7"]
    expected = {}
    for beam in (1, 3):
        proc = run_cli("translate", *runs, "--beam", str(beam), input="\n".join(LINES) + "\n", timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        expected[beam] = proc.stdout.split("\n")[:len(LINES)]
    assert len(set(expected[1])) > 1  # not a constant output
    with serve(*runs[:2], *runs[2:]) as client:
        model = client.get("/model").json()
        assert model["kind"] == "ensemble" and model["checkpoint"]["weights"] == pytest.approx([0.3, 0.7])
        assert len(model["model"]) == 2
        for beam in (1, 3):
            r = client.post("/translate", json={"text": LINES, "beam": beam})
            assert r.status_code == 200, r.text
            assert [t["text"] for t in r.json()["translations"]] == expected[beam]


def test_serve_bad_arguments_exit_2(tiny_task_run, tmp_path):
    from tests.conftest import run_cli

    two = ["--workdir", str(tiny_task_run), "--workdir", str(tiny_task_run)]
    for args, expect in ((["--workdir", str(tmp_path / "none")], "no such folder"),
                         (["--bundle", str(tmp_path)], "bundle"),
                         (["--workdir", str(tiny_task_run), "--max-sentences", "0"], "--max-sentences 0"),
                         (["--workdir", str(tiny_task_run), "--beam", "0"], "beam 0"),
                         ([*two, "--weights", "1"], "1 weight(s) for 2"),
                         ([*two, "--weights", "1,-1"], "positive"),
                         ([*two, "--weights", "a,b"], "one number per --workdir"),
                         (["--workdir", str(tiny_task_run), "--weights", "1"], "give several --workdir"),
                         (["--bundle", str(tmp_path), "--weights", "1,1"], "apply to --workdir runs")):
        proc = run_cli("serve", *args, "--port", "0", timeout=120)
        assert proc.returncode == 2 and expect in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_ensemble_bundle_server_equals_ensemble_server(tiny_task_run, other_seed_run, tmp_path):
    """An ensemble's export bundle streams too (its step programs combine the members): the same
    answers as the ensemble of the runs, through the real app (ASGI client)."""
    from starlette.testclient import TestClient

    from s2s_jax.inference.export import export_bundle
    from s2s_jax.inference.server import create_app, load_engine

    runs = [str(tiny_task_run), str(other_seed_run)]
    bundle = export_bundle(runs, str(tmp_path / "ens"), weights=[0.3, 0.7], beams=[3], platforms=("cpu",))
    answers = []
    for engine in (load_engine(bundle=bundle), load_engine(workdir=runs, weights="3,7")):
        with TestClient(create_app(engine)) as client:
            assert client.get("/model").json()["batching"] == "stream"
            answers.append([client.post("/translate", json={"text": LINES, "beam": beam, "nbest": nbest}).json()
                            for beam, nbest in ((1, 1), (3, 2))])
    for got, want in zip(*answers):
        assert [[n["text"] for n in g["nbest"]] for g in got["translations"]] == \
            [[n["text"] for n in w["nbest"]] for w in want["translations"]]
        assert [g["score"] for g in got["translations"]] == pytest.approx([w["score"] for w in want["translations"]],
                                                                          abs=1e-5)


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_copy_attention_run_is_served_as_translated(tmp_path):
    """A copy-attention run (scores over V + S extended ids, unknown source words as ids >= V)
    streams through the pool and answers as `Translator.translate_full` does."""
    from starlette.testclient import TestClient

    from s2s_jax.inference.runs import load_translator
    from s2s_jax.inference.server import create_app, load_engine
    from tests.conftest import run_cli

    workdir = tmp_path / "copy"
    proc = run_cli("train", "--config", "experiments/configs/tiny.py", "--workdir", str(workdir), "--no-progress",
                   "--set", "model.copy_attention=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = LINES + ["zyx \u00fc\u20ac \u4e2d", "abcdefghijklmnop"]
    expected = load_translator(str(workdir)).translate_full(lines, beam=3, nbest=2)
    with TestClient(create_app(load_engine(workdir=str(workdir)))) as client:
        r = client.post("/translate", json={"text": lines, "beam": 3, "nbest": 2})
        assert r.status_code == 200, r.text
    got = r.json()["translations"]
    assert [[n["text"] for n in g["nbest"]] for g in got] == [[h["text"] for h in hyps] for hyps in expected]
    assert [g["score"] for g in got] == pytest.approx([hyps[0]["score"] for hyps in expected], abs=1e-5)


@pytest.mark.slow
@pytest.mark.extended
def test_serve_ensemble_of_different_vocabularies_exit_2(tiny_task_run, fr_en_run):
    from tests.conftest import run_cli

    proc = run_cli("serve", "--workdir", str(tiny_task_run), "--workdir", str(fr_en_run), "--port", "0", timeout=300)
    assert proc.returncode == 2 and "source vocabulary differs" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _unusable_bodies():
    """(route, body) pairs the server cannot use: every one must be a 4xx with a JSON error."""
    deep = 100_000  # far beyond any parser's recursion limit, well within --max-body-bytes
    big_int = b"1" + b"0" * 5000  # longer than Python converts from a string
    bodies = {
        "/translate": [
            b"", b"   ", b"null", b"true", b"1", b'"a string"', b"[]", b'["a"]', b"NaN", b"Infinity", b"-Infinity",
            b"[" * deep + b"]" * deep, b'{"a": ' * deep + b"1" + b"}" * deep,
            b'{"text": ' + b"[" * deep + b"]" * deep + b"}",
            b'{"text": ["a"], "beam": ' + b"[" * 900 + b"]" * 900 + b"}",
            b'{"text": ["a"], "beam": ' + big_int + b"}", b'{"text": ["a"], "nbest": -' + big_int + b"}",
            b'{"text": ["a"], "beam": ' + b"9" * 4000 + b"}", b'{"text": ["a"], "beam": 1e999}',
            b'{"text": ["a"], "beam": 1.0}', b'{"text": ["a"], "beam": NaN}', b'{"text": ["a"], "nbest": Infinity}',
            b'{"text": [NaN]}', b'{"text": [1e999]}', b'{"text": [' + big_int + b"]}",
            b'{"text": [["a"]]}', b'{"text": [{"a": 1}]}', b'{"text": ["a", null]}', b'{"text": {"0": "a"}}',
            b'{"text": 5}', b'{"text": null}', b'{"text": "a"}', b'{"text": ["a"], "beam": {"x": [1]}}',
            b'{"text": ["a"], "beam": null}', b'{"text": ["a"], "beam": true}', b'{"text": ["a"], "nbest": 0}',
            b'{"text": ["a"], "\\ud800": 1}', b'{"text": ["\\ud800"]}', b'{"text": ["ok", "a\\udfffb"]}',
            b'{"text": ["a"]} trailing', b'{"text": ["a"],}', b"{'text': ['a']}", b'{"text": ["a"]',
            b"\xff\xfe", b'{"text": ["\xc3\x28"]}', b'\xef\xbb\xbf{"text": ["a"]}',
            '{"text": ["a"]}'.encode("utf-16"), b'{"text": ["a"]}\x00',
            b'"' + b"a" * 10_000_000 + b'"', b'{"text": ["' + b"a" * 2_000_000 + b'"]}',
            b'{"text": ["' + b"a" * 2001 + b'"]}', b'{"text": ' + json.dumps(["a"] * 65).encode() + b"}",
        ],
        "/translator/translate": [
            b"", b"{}", b'{"src": "a"}', b"[]", b"[1]", b"[null]", b'[[{"src": "a"}]]', b'[{"src": null}]',
            b'[{"src": ["a"]}]', b'[{"src": {"x": 1}}]', b'[{"src": "a", "id": 1.5}]', b'[{"src": "a", "id": [1]}]',
            b'[{"src": "a", "id": NaN}]', b'[{"src": "a", "id": true}]', b'[{"src": "a", "extra": 1}]',
            b'[{"src": "\\udfff"}]', b"[" * 100_000, b'[{"src": "a", "id": ' + big_int + b"}]",
            b"\xc0\xaf", json.dumps([{"src": "a"}] * 65).encode(), b"[" + b'{"src": "a"},' * 200_000 + b"1]",
        ],
    }
    return [(route, body) for route, items in bodies.items() for body in items]


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")  # starlette 1.x prefers httpx2
def test_every_unusable_body_is_a_4xx_with_a_json_error(tiny_task_run):
    """A battery of bodies the server cannot use (malformed, non-UTF-8, nested past any recursion
    limit, huge numbers, NaN/Infinity, wrong types at any depth, lone surrogates, empty, 10 MB,
    chunked without a length) thrown at the real app: each one a 4xx and {"error": sentence}, never
    a 500; the app still translates afterwards."""
    from starlette.testclient import TestClient

    from s2s_jax.inference.server import create_app, load_engine

    app = create_app(load_engine(workdir=str(tiny_task_run)))
    with TestClient(app, raise_server_exceptions=True) as client:
        headers = {"content-type": "application/json"}
        cases = [(route, body, {"content": body}) for route, body in _unusable_bodies()]
        chunks = (b"[" + b" " * (1 << 16) for _ in range(40))  # 2.6 MB, no content-length
        cases.append(("/translate", b"<chunked>", {"content": chunks}))
        for route, body, kwargs in cases:
            r = client.post(route, headers=headers, **kwargs)
            shown = f"{route} {body[:60]!r}... ({len(body)} bytes)"
            assert 400 <= r.status_code < 500, f"{shown}: {r.status_code} {r.text[:200]}"
            assert r.headers["content-type"] == "application/json", shown
            error = r.json()["error"]
            assert isinstance(error, str) and 0 < len(error) < 300, f"{shown}: {error[:300]!r}"
        usable = ["", "a\x00b", "line\nbreak", "\u2028", "e\u0301", "\U0001f600 emoji", "\u05e9\u05dc\u05d5\u05dd"]
        r = client.post("/translate", json={"text": usable, "beam": 2, "nbest": 2})
        assert r.status_code == 200 and len(r.json()["translations"]) == len(usable), r.text
        assert client.post("/translator/translate", json=[{"src": s} for s in usable]).status_code == 200
