"""`python -m s2s_jax export`: a trained run leaves as a self-contained bundle directory.

    python -m s2s_jax export --workdir runs/tiny --out bundles/tiny            # latest checkpoint
    python -m s2s_jax export --workdir RUN --out B --best                       # best by validation
    python -m s2s_jax export --workdir RUN --out B --average-last 5 --dtype bfloat16
    python -m s2s_jax export --workdir A --workdir B [--weights 0.5,0.5] --out E     # an ensemble

The bundle (layout and loader: `bundle.py`, beside this writer) holds the parameters as safetensors under
flat names (the Flax parameter path joined by "/", e.g. "decoder/layer_0/input_kernel"), the
run's config.json, its vocabulary files (and its decoding shortlist, shortlist.npz, when it has one), a MODEL.md card, and serialized `jax.export` programs
(encode, greedy decode, beam decode) lowered for the CPU and CUDA platforms. The programs are
polymorphic in the batch size B, the source length S and the output-length bound T, and take
the parameters as an input (they embed no weights), so one bundle serves any input shape.
Since format version 2 the bundle also holds one decoder step (`step`, `step_table`,
`projection_table`; polymorphic in slots, beams and source length), so the loader can run the
continuous-batching search itself (`Bundle.translator`, `serve --bundle`) with any beam size.

What is fixed at export time, because it shapes the program: each beam program's beam size K
(every --beam given; by default the run's decode.beam_size, or 5 when that is 1), n-best = 1, and the decode settings
(length/coverage penalty, max_len_a/b: each sentence stops after floor(a * its length + b)
tokens, and the loader passes T = floor(a * padded S + b) exactly as the in-process
Translator does).

Loading (`inference.bundle.load_bundle`) needs only jax, numpy, safetensors and sentencepiece:
this module imports nothing heavy at import time; flax/orbax are imported inside the writer functions.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import shutil

from s2s_jax import rundir
from s2s_jax.config import UserError
from s2s_jax.vocab import VOCAB_JSON

PLATFORMS = ("cpu", "cuda")
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DTYPES = ("float32", "bfloat16")


# -- command line ---------------------------------------------------------------------------

def run(args) -> int:
    platforms = tuple(x.strip() for x in args.platforms.split(",") if x.strip())
    workdirs = args.workdir if len(args.workdir) > 1 else args.workdir[0]
    weights = None
    if args.weights is not None:
        if len(args.workdir) < 2:
            raise UserError("--weights: give several --workdir runs to export an ensemble")
        from s2s_jax.inference.ensemble import parse_weights
        weights = parse_weights(args.weights, len(args.workdir))
    path = export_bundle(workdirs, args.out, weights=weights, step=args.step, best=args.best,
                         average_last=args.average_last,
                         dtype=args.dtype, beams=args.beam, platforms=platforms, force=args.force)
    with open(os.path.join(path, "bundle.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    print(json.dumps({"bundle": path, "checkpoint": manifest["checkpoint"], "params": manifest["params"],
                      "programs": sorted(manifest["programs"])}))
    return 0


# -- programs -------------------------------------------------------------------------------

def _export_programs(config, model, params_avals, beams, platforms) -> dict[str, bytes]:
    """Serialized programs {name: bytes}: encode, greedy, beam_<K> for each K in beams, and the
    step programs (`_step_programs`)."""
    import jax
    import jax.numpy as jnp
    from jax import export

    from s2s_jax.inference.translator import decode_fixed_batch

    B, S, T = export.symbolic_shape("batch, source_len, max_len")
    source = jax.ShapeDtypeStruct((B, S), jnp.int32)
    lengths = jax.ShapeDtypeStruct((B,), jnp.int32)
    carrier = jax.ShapeDtypeStruct((T,), jnp.int32)

    def f32(params):  # bfloat16 bundles store bfloat16; the model computes from float32 params
        return model.from_bundle_params(jax.tree.map(lambda x: x.astype(jnp.float32), params))

    def encode(params, source, source_lengths):
        return model.encode(f32(params), source, source_lengths)

    def decode(params, source, source_lengths, max_len_carrier, *, beam):
        out = decode_fixed_batch(f32(params), source, source_lengths, model=model, config=config,
                                 beam_size=beam, nbest=1, max_len=max_len_carrier.shape[0])
        keys = ("tokens", "lengths", "scores")
        if beam == 1:
            return {k: out[k] for k in keys}
        return {k: out[k][:, 0] for k in keys}  # drop the n-best axis (n-best = 1)

    programs = {}
    exported = export.export(jax.jit(encode), platforms=platforms)(params_avals, source, lengths)
    programs["encode"] = exported.serialize()
    for beam in [1, *beams]:
        name = "greedy" if beam == 1 else f"beam_{beam}"
        fn = jax.jit(functools.partial(decode, beam=beam))
        exported = export.export(fn, platforms=platforms)(params_avals, source, lengths, carrier)
        programs[name] = exported.serialize()
    programs.update(_step_programs(model, params_avals, platforms))
    return programs


def _step_programs(model, params_avals, platforms) -> dict[str, bytes]:
    """The programs a continuous-batching decoder needs beside `encode` (format version 2; the
    search itself, `decoding.SlotPool`, runs in the loader): {projection_table, step, step_table}.

    They take float32 params (the loader converts a bfloat16 bundle's once). step: (params,
    beams [K] (its length, not its values, is the beam size), tokens [K·P], state (rows [K·P,
    ...], as `encode` gives it per sentence), context {memory, keys [P, S, H], mask [P, S]} per
    slot) -> (logits [K·P, V], new state, attention [K·P, S] or None): `DecodingModel.step_fn`
    with attention. step_table also takes projection_table's output (gathered instead of
    multiplying the embeddings)."""
    import jax
    import jax.numpy as jnp
    from jax import export

    from s2s_jax.inference.adapter import CONTEXT_KEYS

    P, K, S = export.symbolic_shape("slots, beams, source_len")
    f32_avals = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params_avals)
    cache = jax.eval_shape(lambda p: model.encode(model.from_bundle_params(p), jnp.ones((1, 16), jnp.int32),
                                                  jnp.ones((1,), jnp.int32)), f32_avals)
    rows = jax.tree.map(lambda a: jax.ShapeDtypeStruct((K * P, *a.shape[1:]), a.dtype), cache["state"])
    context = jax.tree.map(lambda a: jax.ShapeDtypeStruct((P, S, *a.shape[2:]), a.dtype),
                           {k: cache[k] for k in CONTEXT_KEYS})
    step_args = (jax.ShapeDtypeStruct((K,), jnp.int32), jax.ShapeDtypeStruct((K * P,), jnp.int32), rows, context)
    table = jax.eval_shape(lambda p: model.projection_table(model.from_bundle_params(p)), f32_avals)
    lowered = {
        "projection_table": (_projection_table, (f32_avals,)),
        "step": (_step, (f32_avals, None, *step_args)),
        "step_table": (_step, (f32_avals, table, *step_args)),
    }
    return {name: export.export(jax.jit(functools.partial(fn, model)), platforms=platforms)(*args).serialize()
            for name, (fn, args) in lowered.items()}


def _projection_table(model, params):
    return model.projection_table(model.from_bundle_params(params))


def _step(model, params, table, beams, tokens, state, context):
    step_fn = model.step_fn(model.from_bundle_params(params), table=table, attention=True)
    return step_fn(tokens, state, context)


# -- the model card -------------------------------------------------------------------------

def _eval_record(workdir: str, step: int) -> dict | None:
    """The eval record of `step` in metrics.jsonl, else the last one before it."""
    from s2s_jax.metrics import read_metrics

    evals = [r for r in read_metrics(workdir) if r.get("kind") == "eval" and r.get("step", 0) <= step]
    exact = [r for r in evals if r["step"] == step]
    return (exact or evals or [None])[-1]


def _data_description(config) -> str:
    d = config.data
    if d.source == "task":
        return (f"built-in task `{d.task}`: {d.task_train_size:,} generated training examples "
                f"(seed {d.task_seed}), character vocabulary")
    corpus = f"text folder `{d.dir}`" if d.source == "text" else f"TFDS dataset `{d.tfds_name}`"
    vocab = (f"{'joint ' if d.joint_vocab else ''}SentencePiece {d.spm_model_type} vocabulary of "
             f"{d.vocab_size:,} pieces trained on the training split")
    return (f"{corpus}, {d.src_lang} → {d.tgt_lang}, training split `{d.train_split}`, validation "
            f"`{d.valid_split}`, test `{d.test_split}`; {vocab}; normalisation {d.normalization}; "
            f"sentences up to {d.max_source_length}/{d.max_target_length} tokens")


def _architecture(config, source_vocab_size: int, target_vocab_size: int, n_params: int) -> str:
    m = config.model
    enc = (f"{m.encoder_layers}-layer {'bidirectional ' if m.bidirectional else ''}{m.cell.upper()} encoder "
           f"({m.hidden_dim} units{', split across directions' if m.bidirectional else ''})")
    att = "no attention" if m.attention == "none" else f"`{m.attention}` attention"
    return (f"{enc}, {m.decoder_layers}-layer {m.cell.upper()} decoder ({m.hidden_dim} units), {att}"
            f"{' with input feeding' if m.input_feeding else ''}, bridge `{m.bridge}`, embeddings "
            f"{m.source_embed_dim}/{m.target_embed_dim}{', shared' if m.share_embeddings else ''}"
            f"{', tied output' if m.tie_output else ''}; vocabularies {source_vocab_size:,} (source) / "
            f"{target_vocab_size:,} (target); {n_params:,} parameters; compute dtype {m.dtype}")


def _model_card(config, manifest: dict, flat: dict, eval_record: dict | None, n_params: int,
                source_vocab_size: int, target_vocab_size: int) -> str:
    ck = manifest["checkpoint"]
    if ck["which"] == "ensemble":
        ck_text = (f"ensemble of {len(ck['members'])} runs (weights {', '.join(f'{w:.3g}' for w in ck['weights'])}: "
                   + "; ".join(f"{m['workdir']} {m['which']} step(s) {m['steps']}" for m in ck["members"]) + ")")
    elif ck["which"] == "average":
        ck_text = f"average of the last {len(ck['steps'])} checkpoints (steps {', '.join(map(str, ck['steps']))})"
    else:
        ck_text = f"{ck['which']} checkpoint, step {ck['steps'][0]}"
    lines = [f"# {config.name} (s2s_jax bundle)", "",
             f"Exported {manifest['created']} from `{manifest['workdir']}`: {ck_text}. "
             f"Bundle format version {manifest['format_version']}.", "",
             "## Architecture", "", _architecture(config, source_vocab_size, target_vocab_size, n_params) + ".", "",
             "## Training data", "", _data_description(config) + f". Trained for up to {config.train.steps:,} "
             f"steps ({config.train.optimizer}, learning rate {config.train.learning_rate}).", "",
             "## Scores", ""]
    if eval_record is None:
        lines.append("No evaluation was recorded in the run's metrics.jsonl up to this checkpoint.")
    else:
        scores = []
        for key, label in (("bleu", "BLEU"), ("chrf", "chrF"), ("exact_match", "exact match"),
                           ("loss", "loss"), ("perplexity", "perplexity")):
            if key in eval_record:
                scores.append(f"| {label} | {eval_record[key]:.4g} |")
        lines += [f"Validation (`{config.data.valid_split}`, up to {config.train.eval_sentences} sentences) at step "
                  f"{eval_record['step']}, from the run's metrics.jsonl"
                  + (" (scores of that single checkpoint, not of the average)." if ck["which"] == "average" else "."),
                  "", "| metric | value |", "| --- | --- |", *scores, ""]
        if "bleu_signature" in eval_record:
            lines.append(f"sacreBLEU signature: `{eval_record['bleu_signature']}`")
        if "chrf_signature" in eval_record:
            lines.append(f"chrF signature: `{eval_record['chrf_signature']}`")
    d = manifest["decode"]
    beams = [p["beam_size"] for p in manifest["programs"].values() if "beam_size" in p and p["beam_size"] > 1]
    lines += ["", "## Using it", "", "```python",
              "from s2s_jax.inference.bundle import load_bundle   # needs jax, numpy, safetensors, sentencepiece, flatbuffers",
              f"bundle = load_bundle({manifest['name']!r})",
              f"bundle.translate([\"...\"])            # beam {d['default_beam']} (the run's decode.beam_size)",
              "bundle.translate([\"...\"], beam=1)     # greedy",
              "bundle.params                          # nested dict of numpy arrays",
              "bundle.translator().translate([\"...\"], beam=4, nbest=2)   # continuous batching over the "
              "step programs (any beam; imports s2s_jax's decoding stack)",
              "# s2s-jax serve --bundle DIR             # the HTTP server, continuous batching", "```", "",
              "## Programs (`programs/*.jaxexport`, `jax.export.deserialize(bytearray(data)).call(...)`)", "",
              f"Lowered for platforms {', '.join(manifest['platforms'])}; symbolic sizes: batch B, source "
              "length S, output bound T. Inputs: `params` (nested dict as in params.safetensors, "
              f"{manifest['params']['dtype']}), `source` [B, S] int32 (PAD=0 after each row's length), "
              "`source_lengths` [B] int32; decoders also take `max_len_carrier` [T] int32, whose length "
              "(not its values) is the static output bound.", "",
              "- `encode`: → decoder cache {memory [B, S, H], keys [B, S, H], mask [B, S], state}.",
              "- `greedy`: → {tokens [B, T] (EOS included, PAD after), lengths [B], scores [B] (sum of log-probs)}.",
              *[f"- `beam_{k}`: beam search with beam size {k} fixed at export; same outputs, best hypothesis, "
                f"GNMT score" for k in beams],
              "- `projection_table`, `step`, `step_table`: one decoder step for continuous batching "
              "(`bundle.translator()`, `s2s-jax serve --bundle`): float32 params, `beams` [K] (its length is "
              "the beam size), tokens [K·P], the decoder state rows [K·P, ...] and the per-slot context "
              "{memory, keys [P, S, H], mask [P, S]} → (logits [K·P, V], new state, attention [K·P, S]); "
              "the search runs in the loader, so any beam size and n-best.", "",
              "Fixed at export: beam sizes, n-best = 1, length penalty "
              f"{d['length_penalty']}, coverage penalty {d['coverage_penalty']}, and the length rule: sentence b "
              f"stops after min(T, floor({d['max_len_a']} · length_b + {d['max_len_b']})) tokens. The loader "
              f"pads source lengths to a multiple of {d['length_multiple']} and uses T = floor({d['max_len_a']} · "
              f"S + {d['max_len_b']}), as the in-process translator does. Special ids: PAD 0, BOS 1, EOS 2, UNK 3.",
              "", "## Parameters (`params.safetensors`)", "",
              "Names are the Flax parameter paths joined by `/`. Recurrent layers store fused gates "
              "(LSTM order i, f, g, o; GRU r, z, n) with a direction axis D (2 for the bidirectional "
              "encoder, 1 otherwise): `input_kernel` [in, D, G], `recurrent_kernel` [D, h, G], `bias` [D, G] "
              "(GRU also `recurrent_bias` [D, G], inside r * (h W + b)).", "",
              "| name | shape | dtype |", "| --- | --- | --- |"]
    lines += [f"| `{name}` | {list(x.shape)} | {x.dtype} |" for name, x in flat.items()]
    return "\n".join(lines) + "\n"


# -- the writer -----------------------------------------------------------------------------

def _vocab_files(workdir: str, out_vocab: str, source_vocab, target_vocab) -> dict:
    """Copies the vocabularies into out_vocab/; returns the vocab.json description."""
    os.makedirs(out_vocab, exist_ok=True)
    desc = {}
    for side, vocab in (("source", source_vocab), ("target", target_vocab)):
        d = dict(vocab.to_json())
        if d["kind"] == "char":
            d["itos"] = list(vocab.itos)
        elif d["kind"] == "sentencepiece":
            src = os.path.join(rundir.vocab_dir(workdir), d["model"])
            if not os.path.isfile(os.path.join(out_vocab, d["model"])):
                shutil.copyfile(src, os.path.join(out_vocab, d["model"]))
        else:
            raise UserError(f"{workdir}/vocab: vocabulary kind {d['kind']!r} cannot be exported")
        desc[side] = d
    with open(os.path.join(out_vocab, VOCAB_JSON), "w", encoding="utf-8") as f:
        json.dump(desc, f, indent=2, sort_keys=True)
    return desc


def _check_out(out: str, force: bool) -> None:
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UserError(f"--out {out}: exists and is not a directory; pick another path")
        if os.listdir(out) and not force:
            raise UserError(f"--out {out}: exists and is not empty; pass --force to replace it or pick another path")
        if os.listdir(out) and not os.path.isfile(os.path.join(out, "bundle.json")):
            raise UserError(f"--out {out}: is not an export bundle, so --force will not replace it; "
                            f"pick another path")


def export_bundle(workdir, out: str, *, step: int | None = None, best: bool = False,
                  average_last: int | None = None, dtype: str = "float32", beams=None,
                  platforms=PLATFORMS, force: bool = False, weights=None) -> str:
    """Writes the bundle of a run's checkpoint to `out` (see the module docstring). Returns `out`.

    workdir: a run, or a list of runs: an ensemble bundle (`inference.ensemble`; parameters
    stored as member_<i>/..., programs that combine the members, manifest["ensemble"])."""
    from s2s_jax.inference.bundle import (FORMAT, FORMAT_VERSION, MANIFEST, PARAMS_FILE, PROGRAM_DIR,
                                          flatten_params, unflatten_params)
    from s2s_jax.inference.lengths import LENGTH_MULTIPLE

    # Everything a user can get wrong is checked before any work.
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: must be one of {', '.join(DTYPES)}")
    bad = [p for p in platforms if p not in KNOWN_PLATFORMS]
    if bad or not platforms:
        raise UserError(f"--platforms {','.join(platforms)}: choose from {', '.join(KNOWN_PLATFORMS)}")
    if beams is not None and any(b < 2 for b in beams):
        raise UserError(f"--beam {min(beams)}: beam sizes must be at least 2 (greedy is always exported)")
    choice = rundir.CheckpointChoice(step=step, best=best, average_last=average_last)
    out = os.path.abspath(out)
    _check_out(out, force)
    try:
        import flatbuffers  # noqa: F401 - jax.export's serializer imports it lazily, after all the work
    except ImportError:
        raise UserError("writing jax.export programs needs the flatbuffers package; "
                        "pip install flatbuffers") from None

    import jax
    import numpy as np
    import ml_dtypes
    from safetensors.numpy import save_file

    from s2s_jax import config as config_lib
    from s2s_jax import kernels as kernels_lib
    from s2s_jax.inference.adapter import SingleModel

    # The model is built for the target platforms, not this machine: with model.kernels=auto a
    # bundle lowered on a CPU for cuda gets the portable kernels (cpu only when every platform is cpu)
    for_platforms = kernels_lib.target(tuple(platforms))
    ensemble = None
    if isinstance(workdir, (list, tuple)):
        from s2s_jax.inference.ensemble import load_ensemble_translator

        with for_platforms:
            translator = load_ensemble_translator(list(workdir), weights=weights, **choice.kwargs())
        config, model, source_vocab, target_vocab = (translator.config, translator.model, translator.source_vocab,
                                                     translator.target_vocab)
        params = model.bundle_params(translator.params)
        ck = translator.checkpoint
        ensemble = {"workdirs": [os.path.abspath(w) for w in workdir], "weights": list(model.weights)}
        workdir = workdir[0]  # vocabularies, config and decode settings: the first run's
    else:
        from s2s_jax.inference.runs import load_run

        with for_platforms:
            run = load_run(workdir, **choice.kwargs())
        config, model, params, source_vocab, target_vocab, ck = (run.config, run.model, run.params, run.source_vocab,
                                                                 run.target_vocab, run.checkpoint)
        model = SingleModel(model)
    if config.model.copy_attention:
        raise UserError(f"{workdir}: export bundles do not hold copy-attention models yet (model.copy_attention="
                        "True); translate and eval the run itself (s2s_jax translate / eval --workdir)")
    if beams is None:
        beams = [config.decode.beam_size if config.decode.beam_size > 1 else 5]
    beams = sorted(set(int(b) for b in beams))

    flat = flatten_params(jax.device_get(params))
    np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    flat = {k: np.ascontiguousarray(v.astype(np_dtype) if np.issubdtype(v.dtype, np.floating) else v)
            for k, v in flat.items()}
    n_params = int(sum(v.size for v in flat.values()))
    params_avals = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), unflatten_params(flat))

    with rundir.atomic_folder(out, replace=True) as tmp:  # replace: `out` is missing, empty or a bundle (checked)
        save_file(flat, os.path.join(tmp, PARAMS_FILE),
                  metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION), "dtype": dtype})
        with open(rundir.config_path(tmp), "w", encoding="utf-8") as f:
            f.write(config_lib.to_json(config))
        vocab_desc = _vocab_files(workdir, rundir.vocab_dir(tmp), source_vocab, target_vocab)
        if os.path.isfile(rundir.shortlist_path(workdir)):  # the decoding shortlist travels with the vocabulary
            shutil.copyfile(rundir.shortlist_path(workdir), rundir.shortlist_path(tmp))

        os.makedirs(os.path.join(tmp, PROGRAM_DIR))
        programs = {}
        for name, data in _export_programs(config, model, params_avals, beams, tuple(platforms)).items():
            file = f"{PROGRAM_DIR}/{name}.jaxexport"
            with open(os.path.join(tmp, file), "wb") as f:
                f.write(data)
            info = {"file": file}
            if name == "greedy" or name.startswith("beam_"):
                info["beam_size"] = 1 if name == "greedy" else int(name.split("_")[1])
            programs[name] = info

        dc = config.decode
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": os.path.basename(out),
            "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "workdir": os.path.abspath(workdir),
            "jax_version": jax.__version__,
            "checkpoint": ck,
            "params": {"file": PARAMS_FILE, "dtype": dtype, "count": n_params, "tensors": len(flat)},
            "vocab": vocab_desc_summary(vocab_desc, source_vocab, target_vocab),
            "platforms": list(platforms),
            "programs": programs,
            "decode": {"default_beam": dc.beam_size, "batch_size": dc.batch_size, "max_len_a": dc.max_len_a,
                       "max_len_b": dc.max_len_b, "length_penalty": dc.length_penalty,
                       "coverage_penalty": dc.coverage_penalty, "nbest": 1, "length_multiple": LENGTH_MULTIPLE},
        }
        if dc.beam_size > 1 and dc.beam_size not in beams:
            manifest["decode"]["default_beam"] = beams[0]
        if ensemble is not None:
            manifest["ensemble"] = ensemble
        record = _eval_record(workdir, max(ck["steps"])) if ensemble is None else None
        with open(os.path.join(tmp, "MODEL.md"), "w", encoding="utf-8") as f:
            f.write(_model_card(config, manifest, flat, record, n_params, source_vocab.vocab_size,
                                target_vocab.vocab_size))
        files = {}
        for root, _, names in os.walk(tmp):
            for n in names:
                full = os.path.join(root, n)
                rel = os.path.relpath(full, tmp).replace(os.sep, "/")
                files[rel] = {"bytes": os.path.getsize(full), "sha256": rundir.file_digest(full)}
        manifest["files"] = dict(sorted(files.items()))
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
    return out


def vocab_desc_summary(desc: dict, source_vocab, target_vocab) -> dict:
    return {side: {"kind": d["kind"], "vocab_size": v.vocab_size, **({"model": d["model"]} if "model" in d else {})}
            for (side, d), v in zip(desc.items(), (source_vocab, target_vocab))}
