"""Export bundles: translations equal the in-process translator, the loader needs no training
stack, parameters round-trip, checkpoint averaging, and one clear error per bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from s2s_jax.config import UserError

ROOT = Path(__file__).resolve().parents[1]
MULTI30K = Path("/work/shared/data/multi30k")
LINES = ["abc", "hello world", "", "x", "a much longer line here", "q7", "12345", "zyx wvu"]
HEAVY = ("flax", "optax", "orbax", "grain", "tensorflow_datasets")


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "s2s_jax", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def train(workdir, *overrides, config="experiments/configs/tiny.py"):
    sets = [a for o in overrides for a in ("--set", o)]
    proc = run_cli("train", "--config", config, "--workdir", str(workdir), "--no-progress", *sets)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny reverse-task model, with checkpoints at steps 10 and 20."""
    workdir = tmp_path_factory.mktemp("export") / "run"
    train(workdir, "train.steps=20", "train.checkpoint_every=10", "train.eval_every=20", "train.eval_sentences=16",
          "train.learning_rate=0.02")
    return workdir


@pytest.fixture(scope="module")
def tiny_bundle(tiny_run):
    from s2s_jax.inference.export import export_bundle

    return Path(export_bundle(str(tiny_run), str(tiny_run.parent / "bundle"), beams=[3]))


def in_process(workdir, lines, beam):
    from s2s_jax.inference.runs import load_translator

    translator = load_translator(str(workdir))
    return [hyps[0][0] for hyps in translator.translate(lines, beam=beam)]


def test_bundle_layout_and_model_card(tiny_bundle):
    manifest = json.loads((tiny_bundle / "bundle.json").read_text())
    assert manifest["format"] == "s2s_jax-bundle" and manifest["format_version"] == 2
    assert manifest["checkpoint"] == {"which": "latest", "steps": [20]}
    assert sorted(manifest["programs"]) == ["beam_3", "encode", "greedy", "projection_table", "step", "step_table"]
    assert manifest["platforms"] == ["cpu", "cuda"]
    for name in ("config.json", "params.safetensors", "vocab/vocab.json", "MODEL.md", "programs/encode.jaxexport",
                 "programs/greedy.jaxexport", "programs/beam_3.jaxexport"):
        assert (tiny_bundle / name).is_file(), name
        assert name in manifest["files"]
    from safetensors import safe_open

    with safe_open(str(tiny_bundle / "params.safetensors"), framework="np") as f:
        names = set(f.keys())
        assert f.metadata()["format_version"] == "2"
    assert {"decoder/layer_0/input_kernel", "encoder/layer_0/recurrent_kernel", "output_kernel"} <= names
    card = (tiny_bundle / "MODEL.md").read_text()
    for needle in ("LSTM encoder", "built-in task `reverse`", "| BLEU |", "exact match",
                   "sacreBLEU signature: `nrefs:1|", "step 20", "`beam_3`", "`step_table`",
                   "`decoder/layer_0/input_kernel`"):
        assert needle in card, needle


def test_bundle_translations_equal_in_process(tiny_run, tiny_bundle):
    from s2s_jax.inference.bundle import load_bundle

    bundle = load_bundle(str(tiny_bundle))
    assert bundle.beam_sizes == [1, 3]
    greedy = bundle.translate(LINES, beam=1)
    assert greedy == in_process(tiny_run, LINES, beam=1)
    assert bundle.translate(LINES) == greedy  # the run's decode.beam_size is 1
    assert greedy[2] == "" and len(set(greedy)) > 2  # empty stays empty; not a constant output
    assert bundle.translate(LINES, beam=3) == in_process(tiny_run, LINES, beam=3)
    with pytest.raises(UserError, match="beam sizes"):
        bundle.translate(LINES, beam=4)


def _stream(translator, lines, *, beam, nbest=1):
    """`StreamingDecoder` (the server's pool) over `translator`: sentences arrive in three
    groups while it decodes -> {line index: result}."""
    from s2s_jax.inference.streaming import StreamingDecoder

    decoder = StreamingDecoder(translator, beam=beam, nbest=nbest, chunk_steps=2, slots=8)
    items = [(i, ids) for i, ids in enumerate(translator.encode_lines(lines)) if ids]
    out = {}
    for start in range(0, len(items), 3):
        decoder.add(items[start:start + 3])
        out.update(decoder.step())
    while decoder.busy:
        out.update(decoder.step())
    return out


def test_bundle_streaming_equals_run_streaming(tiny_run, tiny_bundle):
    """The bundle's step programs through the server's slot pool (`Bundle.translator`) give the
    run's tokens, token for token, greedy and beam (n-best too; beam 4 was not exported as a
    fixed program: the search runs in the loader)."""
    from s2s_jax.inference.bundle import load_bundle
    from s2s_jax.inference.runs import load_translator

    lines = LINES * 3 + ["abcdefghijklmnopq"]
    run, bundle = load_translator(str(tiny_run)), load_bundle(str(tiny_bundle)).translator()
    for beam, nbest in ((1, 1), (3, 2), (4, 1)):
        got, want = _stream(bundle, lines, beam=beam, nbest=nbest), _stream(run, lines, beam=beam, nbest=nbest)
        assert sorted(got) == sorted(want) == [i for i, line in enumerate(lines) if line]
        for i in want:
            assert got[i]["tokens"] == want[i]["tokens"], (beam, lines[i])
            np.testing.assert_allclose(got[i]["scores"], want[i]["scores"], rtol=1e-5, atol=1e-5)
        if beam == 1:
            assert len({tuple(r["tokens"][0]) for r in want.values()}) > 2  # not a constant output
    offline, expected = bundle.translate(lines, beam=3, nbest=2), run.translate(lines, beam=3, nbest=2)
    assert [[t for t, _ in hyps] for hyps in offline] == [[t for t, _ in hyps] for hyps in expected]
    np.testing.assert_allclose([[x for _, x in h] for h in offline], [[x for _, x in h] for h in expected], atol=1e-5)


def test_format_1_bundle_loads_and_asks_for_a_re_export(tiny_bundle, tmp_path):
    """A bundle written before the step programs (format version 1) still translates with its
    fixed-batch programs and is served with merged calls; continuous batching asks for a re-export."""
    from s2s_jax.inference.bundle import STEP_PROGRAMS, load_bundle
    from s2s_jax.inference.server import BundleEngine, create_app, load_engine

    old = tmp_path / "v1"
    shutil.copytree(tiny_bundle, old)
    manifest = json.loads((old / "bundle.json").read_text())
    manifest["format_version"] = 1
    for name in STEP_PROGRAMS:
        os.remove(old / manifest["programs"].pop(name)["file"])
        del manifest["files"][f"programs/{name}.jaxexport"]
    (old / "bundle.json").write_text(json.dumps(manifest))
    bundle = load_bundle(str(old))
    assert not bundle.streams and bundle.beam_sizes == [1, 3]
    assert bundle.translate(LINES, beam=3) == load_bundle(str(tiny_bundle)).translate(LINES, beam=3)
    with pytest.raises(UserError, match="format version 1 has no step programs; re-export"):
        bundle.translator()
    engine = load_engine(bundle=str(old))
    assert isinstance(engine, BundleEngine)
    assert create_app(engine).state.server.streaming is False  # auto: merged calls
    with pytest.raises(UserError, match="re-export it"):
        create_app(engine, batching="stream")


def test_fresh_process_loader_needs_no_training_stack(tiny_bundle):
    code = f"""
import sys
from s2s_jax.inference.bundle import load_bundle
bundle = load_bundle({str(tiny_bundle)!r})
out = bundle.translate(["abc", "hello"], beam=1) + bundle.translate(["abc"], beam=3)
assert isinstance(bundle.params["decoder"]["layer_0"]["input_kernel"], __import__("numpy").ndarray)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
print(len(out), heavy)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "3 []", proc.stdout


def test_params_round_trip_to_flax_gives_same_logits(tiny_run, tiny_bundle):
    import jax
    import jax.numpy as jnp

    from s2s_jax.inference.bundle import load_bundle
    from s2s_jax.model import Seq2Seq
    from s2s_jax.inference.runs import load_run

    run = load_run(str(tiny_run))
    model, params, source_vocab, target_vocab = run.model, run.params, run.source_vocab, run.target_vocab
    bundle = load_bundle(str(tiny_bundle))
    assert jax.tree.structure(bundle.params) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(bundle.params), jax.tree.leaves(params)):
        assert a.dtype == np.float32 and np.array_equal(a, np.asarray(b))
    source = jnp.asarray([source_vocab.encode("hello wo"), source_vocab.encode("abc") + [0] * 5], jnp.int32)
    lengths = jnp.asarray([8, 3], jnp.int32)
    target_in = jnp.asarray([[1] + target_vocab.encode("ow oll"), [1] + target_vocab.encode("cba") + [0] * 3],
                            jnp.int32)

    def logits(p):
        hidden, _ = model.apply({"params": p}, source, lengths, target_in)
        return model.apply({"params": p}, hidden, method=Seq2Seq.logits)

    restored = jax.tree.map(jnp.asarray, bundle.params)
    np.testing.assert_array_equal(np.asarray(logits(restored)), np.asarray(logits(params)))
    # The exported encode program gives the model's own decoder cache.
    cache = bundle.encode(np.asarray(source), np.asarray(lengths))
    expected = model.apply({"params": params}, source, lengths, method=Seq2Seq.encode)
    assert jax.tree.structure(cache) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_average_params_identical_and_two():
    from s2s_jax.rundir import average_params

    rng = np.random.default_rng(0)
    a = {"enc": {"w": rng.normal(size=(5, 7)).astype(np.float32)}, "b": rng.normal(size=(3,)).astype(np.float32)}
    b = {"enc": {"w": rng.normal(size=(5, 7)).astype(np.float32)}, "b": rng.normal(size=(3,)).astype(np.float32)}
    same = average_params([a, a, a])
    np.testing.assert_array_equal(same["enc"]["w"], a["enc"]["w"])
    np.testing.assert_array_equal(same["b"], a["b"])
    mean = average_params([a, b])
    assert mean["b"].dtype == np.float32
    np.testing.assert_allclose(mean["enc"]["w"], (a["enc"]["w"] + b["enc"]["w"]) / 2, rtol=1e-7)
    np.testing.assert_allclose(mean["b"], (a["b"] + b["b"]) / 2, rtol=1e-7)


def test_cli_average_last_in_bfloat16(tiny_run, tmp_path):
    import ml_dtypes

    from s2s_jax.inference.bundle import flatten_params
    from s2s_jax.inference.bundle import load_bundle
    from s2s_jax.inference.runs import load_run

    out = tmp_path / "avg"
    proc = run_cli("export", "--workdir", str(tiny_run), "--out", str(out), "--average-last", "2",
                   "--dtype", "bfloat16", "--platforms", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    bundle = load_bundle(str(out))
    assert bundle.manifest["checkpoint"] == {"which": "average", "steps": [10, 20]}
    assert "average of the last 2 checkpoints" in (out / "MODEL.md").read_text()
    p10 = flatten_params(load_run(str(tiny_run), step=10).params)
    p20 = flatten_params(load_run(str(tiny_run), step=20).params)
    assert any(not np.array_equal(p10[k], p20[k]) for k in p10)
    for name, value in bundle.flat_params.items():
        assert value.dtype == ml_dtypes.bfloat16
        mean = ((p10[name].astype(np.float64) + p20[name]) / 2).astype(np.float32)
        np.testing.assert_array_equal(value, mean.astype(ml_dtypes.bfloat16))
    assert len(bundle.translate(LINES[:3], beam=1)) == 3  # bfloat16 programs run
    # The step programs take float32 params (converted once from the stored bfloat16 values):
    # the slot pool over them gives what the fixed-batch programs give.
    fixed, pooled = bundle.translate_full(LINES, beam=1), bundle.translator().translate_full(LINES, beam=1)
    assert [h[0]["text"] for h in pooled] == [h[0]["text"] for h in fixed]
    np.testing.assert_allclose([h[0]["score"] for h in pooled], [h[0]["score"] for h in fixed], atol=1e-4)


def test_export_errors(tiny_run, tiny_bundle, tmp_path):
    from s2s_jax.inference.bundle import load_bundle
    from s2s_jax.inference.export import export_bundle

    # A workdir with no checkpoint: one line, exit 2.
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(tiny_run / "config.json", empty / "config.json")
    proc = run_cli("export", "--workdir", str(empty), "--out", str(tmp_path / "b"))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "no latest checkpoint" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    with pytest.raises(UserError, match="nowhere: no such folder"):
        export_bundle(str(tmp_path / "nowhere"), str(tmp_path / "b"))
    with pytest.raises(UserError, match="no config.json"):
        export_bundle(str(tmp_path), str(tmp_path / "b"))
    with pytest.raises(UserError, match="only 2 checkpoint"):
        export_bundle(str(tiny_run), str(tmp_path / "b"), average_last=5)
    with pytest.raises(UserError, match="--step 7"):
        export_bundle(str(tiny_run), str(tmp_path / "b"), step=7)
    with pytest.raises(UserError, match="not empty"):
        export_bundle(str(tiny_run), str(tiny_bundle))
    with pytest.raises(UserError, match="not an export bundle"):  # --force never deletes a run
        export_bundle(str(tiny_run), str(tiny_run), force=True)

    def damaged(name):
        copy = tmp_path / name
        shutil.copytree(tiny_bundle, copy)
        return copy

    missing = damaged("missing")
    os.remove(missing / "programs" / "greedy.jaxexport")
    with pytest.raises(UserError, match="greedy.jaxexport: missing"):
        load_bundle(str(missing))
    truncated = damaged("truncated")
    data = (truncated / "params.safetensors").read_bytes()
    (truncated / "params.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        load_bundle(str(truncated))
    with pytest.raises(UserError, match="cannot read the bundle"):  # unverified: the reader fails cleanly
        load_bundle(str(truncated), verify=False)
    flipped = damaged("flipped")
    data = bytearray((flipped / "programs" / "beam_3.jaxexport").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (flipped / "programs" / "beam_3.jaxexport").write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        load_bundle(str(flipped))
    newer = damaged("newer")
    manifest = json.loads((newer / "bundle.json").read_text())
    manifest["format_version"] = 99
    (newer / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="format version 99 is newer"):
        load_bundle(str(newer))
    no_manifest = damaged("no_manifest")
    (no_manifest / "bundle.json").write_text('{"format": "s2s_jax-bund')
    with pytest.raises(UserError, match="not valid JSON"):
        load_bundle(str(no_manifest))
    with pytest.raises(UserError, match="no such bundle"):
        load_bundle(str(tmp_path / "absent"))


@pytest.mark.slow
@pytest.mark.skipif(not (MULTI30K / "train.en").is_file(), reason="Multi30k not in ../shared/data")
def test_multi30k_bundle_equals_in_process(tmp_path):
    """A short Multi30k run (small model, SentencePiece vocabulary): greedy and beam 5 agree."""
    from s2s_jax.inference.bundle import load_bundle
    from s2s_jax.inference.export import export_bundle

    workdir = tmp_path / "m30k"
    train(workdir, f"data.dir={MULTI30K}", "data.vocab_size=1000", f"data.cache_dir={tmp_path / 'cache'}",
          "data.batch_tokens=600", "model.source_embed_dim=32", "model.target_embed_dim=32",
          "model.hidden_dim=32", "model.encoder_layers=1", "model.decoder_layers=1", "train.steps=40",
          "train.eval_every=40", "train.eval_sentences=32", "train.checkpoint_every=40", "train.learning_rate=0.005",
          "data.max_dropped_fraction=0.02",  # 1000 pieces make 1.1 % of the pairs longer than 50
          config="experiments/configs/multi30k_en_de.py")
    bundle = load_bundle(export_bundle(str(workdir), str(tmp_path / "bundle"), platforms=("cpu",)))
    assert bundle.beam_sizes == [1, 5] and bundle.manifest["vocab"]["source"]["kind"] == "sentencepiece"
    assert "| BLEU |" in (tmp_path / "bundle" / "MODEL.md").read_text()
    lines = (MULTI30K / "test.en").read_text(encoding="utf-8").splitlines()[:24]
    greedy = bundle.translate(lines, beam=1)
    assert greedy == in_process(workdir, lines, beam=1)
    assert len(set(greedy)) > 1
    assert bundle.translate(lines) == in_process(workdir, lines, beam=5)
