"""`eval`: translate a test set with a run's own vocabulary and score it (sacreBLEU, chrF, exact match).

The test set is a split of the run's corpus (`split`, default data.test_split) or any pair of
files (`src_file` / `ref_file`). Nothing is re-prepared: raw text files are read and normalised
as prepare did (`data.text.clean_pairs` with the run's data.normalization and data.empty_lines),
and the run's vocabulary encodes them, so a file pair the run was never prepared with scores
the same way as its own test split. Built-in tasks regenerate their split from the run's
config; TFDS corpora read the prepared dataset.
"""

from __future__ import annotations

import json
import os
import time

from s2s_jax.config import UserError


def test_pairs(config, workdir: str, *, split: str | None = None, src_file: str | None = None,
               ref_file: str | None = None, data_dir: str | None = None) -> tuple[str, list[str], list[str]]:
    """(name, sources, references) of the test set, normalised as in training."""
    from s2s_jax.data.text import clean_pairs, read_parallel

    d = config.data
    if (src_file is None) != (ref_file is None):
        raise UserError("--src and --ref go together: give both files (line N of --ref translates line N of --src)")
    if src_file is not None:
        if split is not None:
            raise UserError("--split and --src/--ref exclude each other; pick one test set")
        src_lines, ref_lines = read_parallel(src_file, ref_file)
        name = os.path.splitext(os.path.basename(src_file))[0]
        form = d.normalization if d.source != "task" else "none"
    else:
        split = split or d.test_split
        name = split
        if d.source == "text":
            folder = data_dir if data_dir is not None else d.dir
            if not os.path.isdir(folder):
                raise UserError(f"data.dir {folder!r} (from the run's config) is not a folder; point --data-dir "
                                f"at the corpus, or pass --src FILE --ref FILE")
            src_lines, ref_lines = read_parallel(os.path.join(folder, f"{split}.{d.src_lang}"),
                                                 os.path.join(folder, f"{split}.{d.tgt_lang}"))
            form = d.normalization
        else:
            return name, *_prepared_pairs(config, workdir, split, data_dir)
    pairs, _, _ = clean_pairs(src_lines, ref_lines, form, d.empty_lines, src_name=src_file or "source",
                              tgt_name=ref_file or "reference")
    if not pairs:
        raise UserError(f"test set {name!r} is empty (after normalisation and the empty-line policy)")
    return name, [s for s, _ in pairs], [t for _, t in pairs]


def _prepared_pairs(config, workdir, split, data_dir):
    """Built-in tasks and TFDS corpora: the split through the data layer (checks the vocabulary)."""
    from s2s_jax import config as config_lib
    from s2s_jax.data import build_data

    d = config.data
    overrides = [f"data.dir={data_dir}"] if data_dir is not None else []
    if split not in (d.train_split, d.valid_split, d.test_split, "train", "valid", "test"):
        overrides.append(f"data.test_split={split}")
    data = build_data(config_lib.override(config, overrides), workdir)
    examples = data.eval_examples(split)
    if not examples:
        raise UserError(f"split {split!r} is empty")
    return [s for s, _ in examples], [r for _, r in examples]


def evaluate(translator, workdir: str, *, split: str | None = None, src_file: str | None = None,
             ref_file: str | None = None, data_dir: str | None = None, beam: int | None = None,
             checkpoint: str = "latest", write: bool = True, tag: str = "") -> dict:
    """Translates the test set (see `test_pairs`) and scores it.

    With write=True the record goes to workdir/eval_<name>_beam<beam><tag>.json and the
    hypotheses to the .txt beside it (an ensemble writes into its first run with tag
    "_ensemble<N>"). Returns the record (with "output" when written).
    """
    from s2s_jax import metrics as metrics_lib

    if data_dir is not None and not os.path.isdir(data_dir):
        raise UserError(f"--data-dir {data_dir}: no such folder")
    config = translator.config
    beam = beam or config.decode.beam_size
    name, sources, references = test_pairs(config, workdir, split=split, src_file=src_file, ref_file=ref_file,
                                           data_dir=data_dir)
    t0 = time.perf_counter()
    hyps = [h[0][0] for h in translator.translate(sources, beam=beam)]
    elapsed = time.perf_counter() - t0
    record = {"workdir": os.path.abspath(workdir), "split": name, "sentences": len(sources), "beam": beam,
              "length_penalty": config.decode.length_penalty, "coverage_penalty": config.decode.coverage_penalty,
              **metrics_lib.corpus_scores(hyps, references),
              "translate_seconds": round(elapsed, 3),
              "sentences_per_second": round(len(sources) / max(elapsed, 1e-9), 1),
              "checkpoint": checkpoint}
    if getattr(translator, "checkpoint", None):
        record["parameters"] = translator.checkpoint  # {"which", "steps"[, "source"]}
    if src_file is not None:
        record["src"], record["ref"] = os.path.abspath(src_file), os.path.abspath(ref_file)
    if write:
        stem = os.path.join(workdir, f"eval_{name}_beam{beam}{tag}")
        with open(stem + ".txt", "w", encoding="utf-8") as f:
            f.writelines(h + "\n" for h in hyps)
        with open(stem + ".json", "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        record["output"] = stem + ".json"
    return record
