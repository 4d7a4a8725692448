"""`eval`: translate a test set with a run's own vocabulary and score it.

What is scored follows the run's data.task_kind (metrics.corpus_scores): a translation run gets
sacreBLEU (cased, detokenised, with its signature), bleu_lc_tok (BLEU on lowercased
Moses-tokenised text, the Multi30k papers' protocol) and chrF; a summarisation run ROUGE-1/2/L/Lsum
F1 (rouge-score, Porter stemming). Both get exact match.

The test set is a split of the run's corpus (`split`, default data.test_split) or any source
file with one or more reference files (`src_file` / `ref_files`). A text split's references are
`{split}.{tgt_lang}` and any `{split}.ref*` files beside it (e.g. DialogSum's test.ref1,
test.ref2), in that order; with several references each sentence takes the best one per score
(ROUGE: rouge-score's score_multi; BLEU: sacreBLEU's multi-reference counts), and the record
also holds the scores against the first reference alone ("first_reference"). Every reference
file must have as many lines as the source: otherwise one error before anything is decoded.

Nothing is re-prepared: raw text files are read and normalised as prepare did
(`data.text.clean_pairs` with the run's data.normalization and data.empty_lines), and the run's
vocabulary encodes them, so a file pair the run was never prepared with scores the same way as
its own test split. Sources are cut to data.truncate_source pieces as in training. Built-in
tasks regenerate their split from the run's config; TFDS corpora read the prepared dataset.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import time
from collections.abc import Sequence

from s2s_jax.config import UserError


@dataclasses.dataclass(frozen=True)
class TestSet:
    """Sources and references, normalised as in training; `extra_references` are further
    reference streams aligned with `sources`; `files` the paths read ({} for a prepared split)."""

    name: str
    sources: list[str]
    references: list[str]
    extra_references: list[list[str]] = dataclasses.field(default_factory=list)
    files: dict = dataclasses.field(default_factory=dict)


def reference_files(folder: str, split: str, tgt_lang: str) -> list[str]:
    """`{split}.{tgt_lang}` and the `{split}.ref<N>` files beside it, by N."""
    found = glob.glob(os.path.join(glob.escape(folder), f"{glob.escape(split)}.ref*"))
    numbered = [p for p in found if re.fullmatch(r"ref\d+", p.rsplit(".", 1)[-1])]
    numbered.sort(key=lambda p: int(p.rsplit(".ref", 1)[-1]))
    return [os.path.join(folder, f"{split}.{tgt_lang}")] + numbered


def _as_list(ref_file) -> list[str]:
    if ref_file is None:
        return []
    return [ref_file] if isinstance(ref_file, (str, os.PathLike)) else list(ref_file)


def test_set(config, workdir: str, *, split: str | None = None, src_file: str | None = None,
             ref_file: str | Sequence[str] | None = None, data_dir: str | None = None) -> TestSet:
    """The test set (see the module doc). `ref_file`: one path or several (the first is the
    primary reference). UserError for a missing or misaligned file, before any decoding."""
    d = config.data
    refs = _as_list(ref_file)
    if (src_file is None) != (not refs):
        raise UserError("--src and --ref go together: give both files (line N of --ref translates line N of --src)")
    if src_file is not None:
        if split is not None:
            raise UserError("--split and --src/--ref exclude each other; pick one test set")
        name = os.path.splitext(os.path.basename(src_file))[0]
        return _read_files(name, src_file, refs, d.normalization if d.source != "task" else "none", d.empty_lines)
    split = split or d.test_split
    if d.source != "text":
        return TestSet(split, *_prepared_pairs(config, workdir, split, data_dir))
    folder = data_dir if data_dir is not None else d.dir
    if not os.path.isdir(folder):
        raise UserError(f"data.dir {folder!r} (from the run's config) is not a folder; point --data-dir "
                        f"at the corpus, or pass --src FILE --ref FILE")
    return _read_files(split, os.path.join(folder, f"{split}.{d.src_lang}"),
                       reference_files(folder, split, d.tgt_lang), d.normalization, d.empty_lines)


def _read_files(name: str, src_file: str, ref_files: list[str], form: str, empty_lines: str) -> TestSet:
    """Reads and normalises a source file and its reference files (all line-aligned)."""
    from s2s_jax.data.text import check_aligned, clean_pairs, normalize, read_lines

    src_lines = read_lines(src_file)
    streams = []
    for path in ref_files:
        lines = read_lines(path)
        check_aligned(src_file, len(src_lines), path, len(lines))
        streams.append(lines)
    pairs, kept, _ = clean_pairs(src_lines, streams[0], form, empty_lines, src_name=src_file, tgt_name=ref_files[0])
    if not pairs:
        raise UserError(f"test set {name!r} is empty (after normalisation and the empty-line policy)")
    extra = [[normalize(lines[i - 1], form) for i in kept] for lines in streams[1:]]
    return TestSet(name, [s for s, _ in pairs], [t for _, t in pairs], extra,
                   {"src": os.path.abspath(src_file), "ref": [os.path.abspath(p) for p in ref_files]})


def test_pairs(config, workdir: str, **kwargs) -> tuple[str, list[str], list[str]]:
    """(name, sources, first references) of the test set (`test_set`'s arguments)."""
    ts = test_set(config, workdir, **kwargs)
    return ts.name, ts.sources, ts.references


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


def decode_best(translator, sources: Sequence[str], beam: int) -> list[str]:
    """The best hypothesis of each source line, its source cut to data.truncate_source pieces
    (as in training); a line that encodes to nothing gives ""."""
    from s2s_jax.data import truncate_sources

    encoded = truncate_sources(translator.config.data, translator.encode_lines(sources))
    words = [None] * len(sources)
    if translator.config.model.copy_attention:  # extended ids; copied unknown words written as in the source
        encoded, words = translator.extended_lines(sources, encoded)
    keep = [i for i, ids in enumerate(encoded) if ids]
    hyps = [""] * len(sources)
    for i, result in zip(keep, translator.translate_ids([encoded[i] for i in keep], beam=beam)):
        hyps[i] = translator.hypotheses(result, None if words[i] is None else (encoded[i], words[i]))[0]["text"]
    return hyps


def score(config, hyps: list[str], ts: TestSet) -> dict:
    """The scores of the run's data.task_kind; with several references also those against the
    first reference alone ("first_reference", without signatures)."""
    from s2s_jax import metrics as metrics_lib

    d = config.data
    scores = metrics_lib.corpus_scores(hyps, ts.references, ts.extra_references, kind=d.task_kind, lang=d.tgt_lang)
    if ts.extra_references:
        first = metrics_lib.corpus_scores(hyps, ts.references, kind=d.task_kind, lang=d.tgt_lang)
        scores["first_reference"] = {k: v for k, v in first.items() if isinstance(v, float)}
    return scores


def evaluate(translator, workdir: str, *, split: str | None = None, src_file: str | None = None,
             ref_file: str | Sequence[str] | None = None, data_dir: str | None = None, beam: int | None = None,
             checkpoint: str = "latest", write: bool = True, tag: str = "", test: TestSet | None = None) -> dict:
    """Translates the test set (`test`, or `test_set` of the arguments) and scores it.

    With write=True the record goes to workdir/eval_<name>_beam<beam><tag>.json and the
    hypotheses to the .txt beside it (an ensemble writes into its first run with tag
    "_ensemble<N>"). Returns the record (with "output" when written).
    """
    if data_dir is not None and not os.path.isdir(data_dir):
        raise UserError(f"--data-dir {data_dir}: no such folder")
    config = translator.config
    beam = beam or config.decode.beam_size
    ts = test or test_set(config, workdir, split=split, src_file=src_file, ref_file=ref_file, data_dir=data_dir)
    t0 = time.perf_counter()
    hyps = decode_best(translator, ts.sources, beam)
    elapsed = time.perf_counter() - t0
    compile_s = getattr(translator, "last_stats", {}).get("compile_seconds", 0.0)  # decode_best's one call
    record = {"workdir": os.path.abspath(workdir), "split": ts.name, "sentences": len(ts.sources), "beam": beam,
              "task_kind": config.data.task_kind, "truncate_source": config.data.truncate_source,
              "length_penalty": config.decode.length_penalty, "coverage_penalty": config.decode.coverage_penalty,
              **score(config, hyps, ts),
              "translate_seconds": round(elapsed, 3),
              "sentences_per_second": round(len(ts.sources) / max(elapsed, 1e-9), 1),
              # the part of translate_seconds spent compiling (or loading cached programs), and
              # the speed without it: what a warm process decodes at (docs/speed.md)
              "compile_seconds": round(compile_s, 3),
              "decode_sentences_per_second": round(len(ts.sources) / max(elapsed - compile_s, 1e-9), 1),
              "checkpoint": checkpoint}
    if getattr(translator, "checkpoint", None):
        record["parameters"] = translator.checkpoint  # {"which", "steps"[, "source"]}
    record.update(ts.files)  # "src", "ref": the files read
    if write:
        stem = os.path.join(workdir, f"eval_{ts.name}_beam{beam}{tag}")
        with open(stem + ".txt", "w", encoding="utf-8") as f:
            f.writelines(h + "\n" for h in hyps)
        with open(stem + ".json", "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        record["output"] = stem + ".json"
    return record
