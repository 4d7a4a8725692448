"""Loads an export bundle and translates with it, using only jax, numpy, safetensors and
sentencepiece (never flax, optax, orbax, grain or tensorflow-datasets). jax.export's
deserializer also needs the small `flatbuffers` package.

    from s2s_jax.inference.bundle import load_bundle    # (or s2s_jax.load_bundle)
    bundle = load_bundle("bundles/tiny")
    bundle.translate(["hello", "world"])          # the run's decode.beam_size
    bundle.translate(["hello"], beam=5)           # any beam size the bundle was exported with
    bundle.params["decoder"]["layer_0"]["input_kernel"]   # numpy arrays, nested dicts

Bundle layout (format version 2; `s2s_jax export` writes it, see inference/export.py):

    bundle.json            manifest: format, format_version, checkpoint used, decode settings,
                           programs, and the byte size + sha256 of every other file
    config.json            the run's resolved config (s2s_jax.config format)
    params.safetensors     parameters, flat names = the Flax parameter path joined by "/"
                           (e.g. "decoder/layer_0/input_kernel"), float32 or bfloat16
    vocab/vocab.json       {"source": desc, "target": desc}; desc is {"kind": "char", "itos": [...]}
                           or {"kind": "sentencepiece", "model": FILE, "vocab_size": V}
    vocab/*.model          SentencePiece model(s), when the run used them
    shortlist.npz          the run's vocabulary shortlist, when it had one (`Bundle.shortlist`;
                           inference/shortlist.py; the exported programs score the whole vocabulary)
    programs/*.jaxexport   serialized `jax.export` programs (see `Bundle.program`):
                           encode, greedy and beam_<K> (one per exported beam size K); since
                           version 2 also projection_table, step and step_table (one decoder step)
    MODEL.md               model card: architecture, data, scores, tensor names, programs

`translate` uses the exported fixed-batch greedy/beam programs (sorted by length, the run's
batch size, row/length padding and maximum output length) and needs no more than the packages
above. `s2s_jax.inference.Translator` decodes the same sentences through a refilled slot pool
instead (continuous batching), which gives each sentence the same search, so a float32 bundle
gives the same translations as the run it came from (tests/test_export.py checks it); it is
only slower. `Bundle.translator()` (format version 2) is that Translator over the bundle's
exported encoder and decoder step (`ExportedModel`): s2s_jax's decoding stack around the
programs (it imports flax; no model is built and no training code runs); `serve --bundle` uses it.

Version 1 bundles (no step programs) still load and translate; `translator()` asks for a
re-export.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np

from s2s_jax.config import UserError
from s2s_jax.rundir import CONFIG_FILE, VOCAB_DIR, file_digest  # a bundle names its config and vocabulary as a run does
from s2s_jax.inference.lengths import LENGTH_MULTIPLE, max_output_length, output_ids, round_up
from s2s_jax.vocab import VOCAB_JSON, VocabError, input_normalization, normalize, vocab_from_json

FORMAT = "s2s_jax-bundle"
FORMAT_VERSION = 2  # the newest bundle format this module reads (and export.py writes); 2 added the step programs
STEP_PROGRAMS = ("projection_table", "step", "step_table")  # format 2: what `Bundle.translator` decodes with
MANIFEST = "bundle.json"
PARAMS_FILE = "params.safetensors"
PROGRAM_DIR = "programs"

class BundleError(UserError):
    """A bundle that cannot be read: missing, truncated, corrupt or from a newer s2s_jax."""


# -- parameters -----------------------------------------------------------------------------

def flatten_params(params, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dict of arrays -> {"a/b/c": numpy array}, keys sorted."""
    flat = {}
    for key in sorted(params):
        value = params[key]
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, name + "/"))
        else:
            flat[name] = np.asarray(value)
    return flat


def unflatten_params(flat: dict[str, np.ndarray]) -> dict:
    """{"a/b/c": array} -> nested dicts {"a": {"b": {"c": array}}}."""
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


# -- vocabularies: s2s_jax.vocab, the classes training used -------------------------------

def _vocab(desc: dict, directory: str):
    try:
        return vocab_from_json(desc, directory)
    except VocabError as e:
        raise BundleError(f"{e}; re-export the bundle with this s2s_jax version") from None


def _shortlist(path: str):
    """The bundle's vocabulary shortlist (shortlist.npz), or None when it has none."""
    from s2s_jax.inference.shortlist import ShortlistError, load
    from s2s_jax.rundir import shortlist_path

    if not os.path.isfile(shortlist_path(path)):
        return None
    try:
        return load(shortlist_path(path))
    except ShortlistError as e:
        raise BundleError(f"{e}; or re-export the bundle") from None


# -- the bundle -----------------------------------------------------------------------------

def _read_manifest(path: str) -> dict:
    if not os.path.isdir(path):
        raise BundleError(f"{path}: no such bundle directory; write one with `python -m s2s_jax export`")
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise BundleError(f"{manifest_path}: missing; {path} is not an s2s_jax bundle (or is incomplete), "
                          f"re-export it with `python -m s2s_jax export`")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BundleError(f"{manifest_path}: not valid JSON (truncated or corrupt); re-export the bundle") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path}: not an s2s_jax bundle manifest; re-export the bundle")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise BundleError(f"{manifest_path}: bad format_version {version!r}; re-export the bundle")
    if version > FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format version {version} is newer than this s2s_jax reads "
                          f"(up to {FORMAT_VERSION}); upgrade s2s_jax, or re-export the bundle with this version")
    return manifest


def verify_files(path: str, manifest: dict) -> None:
    """Every file the manifest lists exists with its recorded size and sha256."""
    for name, info in sorted(manifest.get("files", {}).items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise BundleError(f"{file}: missing from the bundle; re-export it with `python -m s2s_jax export`")
        size = os.path.getsize(file)
        if size != info["bytes"]:
            raise BundleError(f"{file}: {size} bytes where the bundle recorded {info['bytes']} (truncated or "
                              f"modified); re-export the bundle")
        if file_digest(file) != info["sha256"]:
            raise BundleError(f"{file}: sha256 does not match the bundle manifest (corrupt); re-export the bundle")


class Bundle:
    """A loaded bundle. `translate` / `translate_ids` decode; `params` holds numpy arrays."""

    def __init__(self, path: str, *, verify: bool = True):
        self.path = path
        self.manifest = manifest = _read_manifest(path)
        if verify:
            verify_files(path, manifest)
        try:
            with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
                self.config = json.load(f)  # plain dict; s2s_jax.config.from_dict makes a Config
            with open(os.path.join(path, VOCAB_DIR, VOCAB_JSON), encoding="utf-8") as f:
                vocab_desc = json.load(f)
            vocab_dir = os.path.join(path, VOCAB_DIR)
            self.source_vocab = _vocab(vocab_desc["source"], vocab_dir)
            self.target_vocab = _vocab(vocab_desc["target"], vocab_dir)
            from safetensors.numpy import load_file

            flat = load_file(os.path.join(path, manifest["params"]["file"]))
        except BundleError:
            raise
        except Exception as e:  # noqa: BLE001 - any unreadable part means the bundle is damaged
            raise BundleError(f"{path}: cannot read the bundle ({type(e).__name__}: {str(e)[:200]}); "
                              f"re-export it with `python -m s2s_jax export`") from None
        self.shortlist = _shortlist(path)  # inference/shortlist.Shortlist or None
        self.flat_params = dict(sorted(flat.items()))
        self.params = unflatten_params(self.flat_params)
        self.decode = manifest["decode"]
        self._programs: dict = {}
        self._device_params = None

    # -- programs -------------------------------------------------------------------------

    @property
    def streams(self) -> bool:
        """Whether the bundle has the step programs (format version 2) that `translator` needs."""
        return all(name in self.manifest["programs"] for name in STEP_PROGRAMS)

    def translator(self):
        """A `s2s_jax.inference.Translator` decoding with this bundle's step programs: continuous
        batching as `translate --workdir` does (the server's slot pool too), any beam size and
        n-best. Imports s2s_jax's decoding stack (and flax), unlike `translate`."""
        if not self.streams:
            raise BundleError(f"{self.path}: bundle format version {self.manifest['format_version']} has no step "
                              f"programs; re-export it with `python -m s2s_jax export` to decode it with "
                              f"continuous batching")
        return _bundle_translator(self)

    @property
    def beam_sizes(self) -> list[int]:
        """Beam sizes the fixed-batch programs (`translate`) decode with (1 = greedy)."""
        return sorted(p["beam_size"] for p in self.manifest["programs"].values() if "beam_size" in p)

    def program(self, name: str):
        """The deserialized `jax.export.Exported` program `name` (encode | greedy | beam_<K>).

        Inputs (B, S, T symbolic): params (nested dict as in `self.params`, the bundle's dtype),
        source [B, S] int32 (PAD=0 after each row's length), source_lengths [B] int32, and for
        the decoders max_len_carrier [T] int32 whose *length* T bounds the output length (its
        values are ignored). Decoders return {"tokens" [B, T], "lengths" [B], "scores" [B]}.
        """
        if name not in self._programs:
            info = self.manifest["programs"].get(name)
            if info is None:
                raise BundleError(f"{self.path}: no program {name!r}; it has {sorted(self.manifest['programs'])}")
            import jax
            from jax import export

            file = os.path.join(self.path, info["file"])
            try:
                with open(file, "rb") as f:
                    exported = export.deserialize(bytearray(f.read()))
            except ImportError as e:  # jax.export's (de)serialization needs the flatbuffers package
                raise BundleError(f"{file}: cannot deserialize without {e.name or 'flatbuffers'}; "
                                  f"pip install flatbuffers") from None
            except Exception as e:  # noqa: BLE001
                raise BundleError(f"{file}: cannot deserialize ({type(e).__name__}: {str(e)[:200]}); "
                                  f"re-export the bundle") from None
            platform = jax.default_backend()
            platform = {"gpu": "cuda"}.get(platform, platform)
            if platform not in exported.platforms:
                raise BundleError(f"{file}: exported for {list(exported.platforms)}, not for this {platform} "
                                  f"backend; re-export with --platforms including {platform}")
            self._programs[name] = jax.jit(exported.call)
        return self._programs[name]

    def _params_on_device(self):
        if self._device_params is None:
            import jax

            self._device_params = jax.device_put(self.params)
        return self._device_params

    def encode(self, source: np.ndarray, source_lengths: np.ndarray) -> dict:
        """source [B, S] int32, source_lengths [B] -> the decoder cache (memory, keys, mask, state)."""
        return self.program("encode")(self._params_on_device(), np.asarray(source, np.int32),
                                      np.asarray(source_lengths, np.int32))

    def max_len_for(self, source_len: int) -> int:
        return max_output_length(self.decode["max_len_a"], self.decode["max_len_b"], source_len)

    def _decoder_name(self, beam: int) -> str:
        if beam == 1:
            return "greedy"
        name = f"beam_{beam}"
        if name not in self.manifest["programs"]:
            raise BundleError(f"beam={beam}: this bundle has programs for beam sizes {self.beam_sizes}; "
                              f"re-export with --beam {beam}")
        return name

    # -- translation ----------------------------------------------------------------------

    def translate_ids(self, sources: Sequence[Sequence[int]], *, beam: int | None = None,
                      batch_size: int | None = None) -> list[dict]:
        """Token ids in (no BOS/EOS), per sentence {"tokens": ids without EOS, "score": float}."""
        beam = self.decode["default_beam"] if beam is None else int(beam)
        fn = self.program(self._decoder_name(beam))
        params = self._params_on_device()
        batch_size = batch_size or self.decode["batch_size"]
        order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
        results: list[dict | None] = [None] * len(sources)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            rows = 1 << (len(idx) - 1).bit_length()  # pad rows to a power of two
            S = round_up(max(len(sources[i]) for i in idx), self.decode.get("length_multiple", LENGTH_MULTIPLE))
            src = np.zeros((rows, S), np.int32)
            lengths = np.zeros((rows,), np.int32)
            for r, i in enumerate(idx):
                src[r, :len(sources[i])] = sources[i]
                lengths[r] = len(sources[i])
            carrier = np.zeros((self.max_len_for(S),), np.int32)
            out = {k: np.asarray(v) for k, v in fn(params, src, lengths, carrier).items()}
            for r, i in enumerate(idx):
                results[i] = {"tokens": output_ids(out["tokens"][r], out["lengths"][r]), "score": float(out["scores"][r])}
        return results

    def normalize(self, line: str) -> str:
        """A line as prepare normalised the training data (blank lines become "")."""
        form = input_normalization(self.config.get("data", {}))
        return normalize(line, form) if form else (line if line.strip() else "")

    def translate_full(self, lines: Sequence[str], *, beam: int | None = None, nbest: int = 1,
                       batch_size: int | None = None) -> list[list[dict]]:
        """Text in; per line [{"text", "score", "tokens" (pieces)}] (the bundle decodes n-best = 1)."""
        if isinstance(lines, str):
            raise TypeError("translate() takes a list of strings, not one string")
        if nbest != 1:
            raise BundleError(f"nbest={nbest}: export bundles decode the best hypothesis only (nbest 1)")
        encoded = self.source_vocab.encode_batch([self.normalize(line) for line in lines])
        nonempty = [i for i, e in enumerate(encoded) if e]
        decoded = self.translate_ids([encoded[i] for i in nonempty], beam=beam, batch_size=batch_size)
        out = [[{"text": "", "score": 0.0, "tokens": []}] for _ in lines]
        for i, res in zip(nonempty, decoded):
            out[i] = [{"text": self.target_vocab.decode(res["tokens"]), "score": res["score"],
                       "tokens": self.target_vocab.pieces(res["tokens"])}]
        return out

    def translate(self, lines: Sequence[str], *, beam: int | None = None,
                  batch_size: int | None = None) -> list[str]:
        """Text in (normalised as in training), one translation per line out (empty lines stay empty).

        beam: 1 = greedy; None = the run's decode.beam_size; otherwise one of `beam_sizes`.
        """
        return [hyps[0]["text"] for hyps in self.translate_full(lines, beam=beam, batch_size=batch_size)]


# -- the step programs as a DecodingModel ----------------------------------------------------

class ExportedModel:
    """A bundle's `encode` and step programs as an `inference.adapter.DecodingModel` (params:
    the bundle's tree in float32), so that the Translator and the server's slot pool decode with
    them exactly as with a run; the search (`decoding`) runs here, around the programs."""

    def __init__(self, bundle: Bundle, kernels):
        self.bundle, self.kernels = bundle, kernels
        self.source_vocab_size = bundle.source_vocab.vocab_size
        self.target_vocab_size = bundle.target_vocab.vocab_size
        params_file = bundle.manifest["params"]["file"]
        self.cache_key = ("bundle", os.path.abspath(bundle.path), bundle.manifest.get("files", {}).get(
            params_file, {}).get("sha256"), self.source_vocab_size, self.target_vocab_size)

    def with_dtype(self, dtype: str):
        return self  # the programs compute in the dtype they were exported with

    def encode(self, params, source, source_lengths) -> dict:
        import jax

        dtypes = jax.tree.map(lambda a: a.dtype, self.bundle.params)  # the encode program takes the stored dtype
        params = jax.tree.map(lambda p, d: p.astype(d), params, dtypes)
        return self.bundle.program("encode")(params, source, source_lengths)

    def projection_table(self, params):
        return self.bundle.program("projection_table")(params)

    def step_fn(self, params, *, table=None, attention: bool = True, vocab_ids=None):
        import functools

        if vocab_ids is not None:
            raise BundleError("a bundle's step programs score the whole target vocabulary (no shortlist)")

        if table is None:
            return functools.partial(_exported_step, self.bundle.program("step"), params, attention)
        return functools.partial(_exported_step_table, self.bundle.program("step_table"), params, table, attention)

    def score_log_probs(self, params, source, source_lengths, target_input):
        raise BundleError("an export bundle cannot score (teacher forcing); use the run it came from")

    def bundle_params(self, params) -> dict:
        return params

    def from_bundle_params(self, tree: dict):
        return tree


def _beams(tokens, context):
    """The `beams` argument of the step programs: [K], K = rows per slot."""
    import jax
    import jax.numpy as jnp

    return jnp.zeros((tokens.shape[0] // jax.tree.leaves(context)[0].shape[0],), jnp.int32)


def _exported_step(program, params, attention, tokens, state, context):
    logits, state, weights = program(params, None, _beams(tokens, context), tokens, state, context)
    return logits, state, weights if attention else None


def _exported_step_table(program, params, table, attention, tokens, state, context):
    logits, state, weights = program(params, table, _beams(tokens, context), tokens, state, context)
    return logits, state, weights if attention else None


def _bundle_translator(bundle: Bundle):
    import dataclasses

    import jax
    import jax.numpy as jnp

    from s2s_jax import config as config_lib
    from s2s_jax import kernels as kernels_lib
    from s2s_jax.inference.translator import Translator

    try:
        config = config_lib.from_dict(bundle.config)
    except UserError as e:
        raise BundleError(f"{bundle.path}/{CONFIG_FILE}: {e}; re-export the bundle with this s2s_jax") from None
    config = dataclasses.replace(config, decode=dataclasses.replace(config.decode, dtype="model"))
    model = ExportedModel(bundle, kernels_lib.select(config.model.kernels))
    params = jax.device_put(jax.tree.map(lambda a: np.asarray(a, np.float32), bundle.params))
    translator = Translator(config, model, jax.tree.map(jnp.asarray, params), bundle.source_vocab,
                            bundle.target_vocab)
    translator.checkpoint = bundle.manifest.get("checkpoint")
    return translator


def load_bundle(path: str, *, verify: bool = True) -> Bundle:
    """Opens a bundle written by `python -m s2s_jax export`; BundleError if it is unreadable.

    verify=True checks every file's size and sha256 against the manifest first.
    """
    return Bundle(os.fspath(path), verify=verify)
