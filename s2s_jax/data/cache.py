"""The prepare cache: where a prepared corpus lives and the key that names it.

A prepared folder is keyed by a hash of the inputs' contents (size + sha256 of every file, or
the TFDS dataset's identity) and of every setting that changes the output; settings applied by
the loader (lengths, buckets, batching, seeds) are not part of it.
"""

from __future__ import annotations

import hashlib
import json
import os

from s2s_jax import rundir
from s2s_jax.data.errors import DataError
from s2s_jax.data.sources import make_source, split_roles
from s2s_jax.vocab import VOCAB_JSON

# Bump when the prepared layout or the tokenisation changes: old caches are then rebuilt.
FORMAT_VERSION = 3


def cache_root(config) -> str:
    return os.path.expanduser(config.data.cache_dir or "~/.cache/s2s_jax")


def vocab_from_dir(d) -> str | None:
    """The vocab/ folder of the run named by data.vocab_from (checked), or None."""
    if not d.vocab_from:
        return None
    vdir = rundir.vocab_dir(os.path.expanduser(d.vocab_from))
    if not os.path.isfile(os.path.join(vdir, VOCAB_JSON)):
        raise DataError(f"data.vocab_from={d.vocab_from!r}: holds no vocabulary ({vdir}/{VOCAB_JSON} is missing); "
                        "give the workdir of a trained run")
    return vdir


def folder_digest(folder: str) -> dict:
    """{file name: sha256} of a folder's files (hidden ones left out)."""
    return {n: rundir.file_digest(os.path.join(folder, n)) for n in sorted(os.listdir(folder))
            if not n.startswith(".") and os.path.isfile(os.path.join(folder, n))}


def settings_key(d) -> dict:
    """Every setting that changes the prepared output (lengths/buckets/batching do not: they are
    applied by the loader, so changing them reuses the cache). data.vocab_from counts by the
    contents of that run's vocabulary, not by its path."""
    vdir = vocab_from_dir(d)
    return {**({"vocab_from": folder_digest(vdir)} if vdir else {}),
        "format": FORMAT_VERSION, "source": d.source, "src_lang": d.src_lang, "tgt_lang": d.tgt_lang,
        "splits": split_roles(d), "vocab_size": d.vocab_size, "joint_vocab": d.joint_vocab,
        "spm_model_type": d.spm_model_type, "spm_character_coverage": d.spm_character_coverage,
        "spm_sample_size": d.spm_sample_size,  # (data.prepare_workers is not here: same output)
        "normalization": d.normalization, "empty_lines": d.empty_lines,
        "tfds_name": d.tfds_name if d.source == "tfds" else "",
    }


def prepared_path(config, source=None) -> tuple[str, dict]:
    """(prepared folder, manifest) for this config; the folder may not exist yet."""
    d = config.data
    source = source or make_source(d)
    manifest = {"settings": settings_key(d), "inputs": source.fingerprint()}
    key = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    manifest["key"] = key
    folder = f"{source.name()}_{d.src_lang}-{d.tgt_lang}_{key[:16]}"
    return os.path.join(cache_root(config), "prepared", folder), manifest


def is_prepared(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "manifest.json"))
