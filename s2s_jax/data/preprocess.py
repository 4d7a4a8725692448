"""prepare(config): raw parallel text -> normalised, SentencePiece-tokenised TFDS array_record.

Runs once per corpus and setting; the result is cached under `data.cache_dir` in a folder keyed
by a hash of the inputs' contents (size + sha256 of every file, or the TFDS dataset's identity)
and of every setting that changes the output. Layout of a prepared folder:

    manifest.json   key, settings, inputs, split name -> role
    stats.json      per split: lines read, examples kept, dropped by reason (train: the pairs
                    SentencePiece was trained on)
    vocab/          vocab.json + SentencePiece model file(s) (copied to workdir/vocab by build_data)
    lengths.npz     per role: token counts of source and target (uint16, int32 if longer), for
                    the batch plan, so the loader never decodes every record to learn lengths
    tfds/           the TFDS dataset (array_record): splits "train" / "valid" / "test" (roles),
                    features source int32[None], target int32[None], source_text, target_text;
                    one shard per SHARD_LINES input lines, records in corpus order

Streaming, in memory bounded independently of the corpus size: (1) a cheap validation pass
reads every file once in blocks (missing/empty/misaligned files, invalid UTF-8, empty lines
with data.empty_lines=error: errors name the file and line, before any slow work); (2)
SentencePiece trains on a seeded sample of data.spm_sample_size training sentences; (3)
data.prepare_workers processes each read, normalise, tokenise and write whole shards, in
order, so the result is byte-identical for any number of workers. What grows with the corpus
is the token lengths (4 bytes a pair) and the sample.

It is built in a temporary sibling folder and renamed into place, so a crash never leaves a
half-written cache and concurrent processes (one per host) can race safely.
Nothing here imports TensorFlow (TFDS writes array_record without it) or JAX.

Beside this module: `sources` (text folder / TFDS: fingerprints, the validation pass, reading
shards), `records` (the record bytes, shard names, TFDS metadata), `cache` (the key and the
folder), `workers` (the process pool), `text` (line checks and cleaning), `tokenizer`
(SentencePiece training).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

import numpy as np

from s2s_jax import rundir
from s2s_jax.data.cache import folder_digest, is_prepared, prepared_path, vocab_from_dir
from s2s_jax.data.errors import DataError
from s2s_jax.data.records import serialize_record, shard_name, tfds_dir, write_metadata
from s2s_jax.data.sources import SplitScan, make_source, read_blocks
from s2s_jax.data.text import clean_pairs, count_controls
from s2s_jax.data.tokenizer import train_sentencepiece
from s2s_jax.data.workers import Workers, available_cores, clear_worker_cache, worker_cache
from s2s_jax.vocab import read_vocab_dir, write_vocab_json

log = logging.getLogger(__name__)

# Input lines per shard (and per worker task). Part of the output layout: changing it changes
# the shard files, so bump cache.FORMAT_VERSION with it.
SHARD_LINES = 100_000
SPM_SAMPLE_SEED = 0


def prepare(config, *, force: bool = False) -> str | None:
    """Prepares config's corpus if not cached; returns the prepared folder.

    Built-in tasks (data.source="task") need no preparation: returns None. All input problems
    raise DataError here, before any training.
    """
    d = config.data
    if d.source == "task":
        log.info("data.source='task': generated in memory, nothing to prepare")
        return None
    source = make_source(d)
    path, manifest = prepared_path(config, source)
    if is_prepared(path) and not force:
        log.info("reusing prepared data %s", path)
        return path
    # the folder appears complete or not at all; when another process prepared it first, that one is used
    with rundir.atomic_folder(path, replace=force, keep_existing=is_prepared) as tmp:
        t0 = time.time()
        _prepare_into(tmp, d, source, manifest)
        log.info("prepared %s in %.1fs", path, time.time() - t0)
    return path


def spm_sample(lines: int, pairs: int, seed: int = SPM_SAMPLE_SEED):
    """Sorted line numbers of a seeded sample of `pairs` of `lines` training pairs (O(pairs)
    memory), or None for every line (a corpus no larger than the sample, or pairs == 0)."""
    if pairs <= 0 or lines <= pairs:
        return None
    rng = np.random.default_rng(seed)
    picks = np.unique(rng.integers(0, lines, size=pairs + pairs // 8 + 16))
    while len(picks) < pairs:
        picks = np.unique(np.concatenate([picks, rng.integers(0, lines, size=pairs - len(picks) + 16)]))
    return np.sort(rng.choice(picks, pairs, replace=False))


def resolve_workers(d, lines: int) -> int:
    """Processes prepare uses: data.prepare_workers (0 = every core), but one (this process) for
    a corpus of at most one shard, where starting processes costs more than it saves."""
    n = d.prepare_workers or available_cores()
    return 1 if lines <= SHARD_LINES else max(1, n)


def _prepare_into(out: str, d, source, manifest: dict) -> None:
    roles = source.roles
    # 1. The cheap validation pass (streaming; every split, both sides): all input errors --
    #    missing, empty or misaligned files, invalid UTF-8, empty lines with empty_lines=error --
    #    surface before the slow work, naming the file and line.
    t0 = time.time()
    scans = {role: source.scan(role, SHARD_LINES, find_empty=d.empty_lines == "error") for role in roles}
    t1 = time.time()
    stats = {roles[r]: {"role": r, "lines": sc.lines, "dropped": {}} for r, sc in scans.items()}
    n_workers = resolve_workers(d, sum(sc.lines for sc in scans.values()))
    log.info("prepare: %d lines in %s, %d worker(s)", sum(sc.lines for sc in scans.values()),
             ", ".join(f"{roles[r]}={sc.lines}" for r, sc in scans.items()), n_workers)

    vocab_dir = os.path.join(out, "vocab")
    os.makedirs(vocab_dir)
    try:
        with Workers(n_workers) as workers:
            # 2. SentencePiece on (a seeded sample of) the training split only: never on valid/test.
            reused = vocab_from_dir(d)
            if reused:  # data.vocab_from: tokenise with that run's vocabulary, train nothing
                for name in folder_digest(reused):
                    shutil.copyfile(os.path.join(reused, name), os.path.join(vocab_dir, name))
                log.info("data.vocab_from: tokenising with the vocabulary of %s", d.vocab_from)
            else:
                _train_vocab(vocab_dir, d, source, scans["train"], workers, stats[roles["train"]])
            t = time.time()
            log.info("prepare: validation pass %.1fs, vocabulary %.1fs", t1 - t0, t - t1)
            # 3. Tokenise every split once into array_record shards.
            lengths = _write_tfds(out, d, source, scans, vocab_dir, workers, stats)
            log.info("prepare: tokenised and wrote %d examples in %.1fs",
                     sum(st.get("examples", 0) for st in stats.values()), time.time() - t)
    finally:
        clear_worker_cache()
    src_vocab, tgt_vocab = read_vocab_dir(vocab_dir)
    np.savez(os.path.join(out, "lengths.npz"), **lengths)

    # 4. The metadata, manifest last.
    manifest = dict(manifest, roles=roles, vocab_size={"source": src_vocab.vocab_size,
                                                      "target": tgt_vocab.vocab_size})
    with open(os.path.join(out, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2, sort_keys=True)
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)


def _train_vocab(vocab_dir: str, d, source, scan: SplitScan, workers: Workers, train_stats: dict) -> None:
    """Trains the SentencePiece model(s) on a seeded sample of data.spm_sample_size sentences
    per model (a joint model: half the pairs, both sides) and writes vocab.json."""
    t = time.time()
    per_model = d.spm_sample_size
    picks = spm_sample(scan.lines, -(-per_model // 2) if d.joint_vocab else per_model)
    tasks = []
    for shard in scan.shards(SHARD_LINES):
        mine = None
        if picks is not None:
            lo, hi = np.searchsorted(picks, [shard[0], shard[1]])
            mine = picks[lo:hi]
            if not len(mine):
                continue
        tasks.append((source.reader("train"), shard, scan.names, mine, d.normalization, d.empty_lines))
    pairs = [p for chunk in workers.map(_sample_task, tasks) for p in chunk]
    sname, tname = scan.names
    if not pairs:
        raise DataError(f"{sname}: no usable sentence pairs (every sampled pair has an empty side); "
                        f"check that {sname} and {tname} hold text")
    train_stats["spm_sample_pairs"] = len(pairs)
    log.info("SentencePiece: training on %d of %d training pairs (sampled in %.1fs)", len(pairs), scan.lines,
             time.time() - t)
    spm_args = dict(vocab_size=d.vocab_size, model_type=d.spm_model_type,
                    character_coverage=d.spm_character_coverage)
    if d.joint_vocab:
        src = [s for s, _ in pairs] + [t for _, t in pairs]
        del pairs
        src_vocab = tgt_vocab = train_sentencepiece(src, os.path.join(vocab_dir, "spm"),
                                                    what=f"{sname} + {tname}", **spm_args)
    else:
        src, tgt = [s for s, _ in pairs], [t for _, t in pairs]
        del pairs
        src_vocab = train_sentencepiece(src, os.path.join(vocab_dir, "source"), what=sname, **spm_args)
        tgt_vocab = train_sentencepiece(tgt, os.path.join(vocab_dir, "target"), what=tname, **spm_args)
    for f in os.listdir(vocab_dir):  # human-readable piece lists are not needed at run time
        if f.endswith(".vocab"):
            os.remove(os.path.join(vocab_dir, f))
    write_vocab_json(vocab_dir, src_vocab, tgt_vocab)


def load_prepared(path: str):
    """(manifest, stats, lengths dict, (source_vocab, target_vocab)) of a prepared folder."""
    with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    with open(os.path.join(path, "stats.json"), encoding="utf-8") as f:
        stats = json.load(f)
    with np.load(os.path.join(path, "lengths.npz")) as z:
        lengths = {k: z[k] for k in z.files}
    return manifest, stats, lengths, read_vocab_dir(os.path.join(path, "vocab"))


# ----------------------------------------------------------------------------------- worker tasks

def _encode_ids(vocab, texts: list) -> list:
    if getattr(vocab, "kind", None) == "sentencepiece":  # one thread: the workers are the parallelism
        return vocab.sp.encode(texts, out_type=int, num_threads=1)
    return vocab.encode_batch(texts)


def _clean(idx, src, tgt, d_form: str, empty_lines: str, names: tuple):
    """clean_pairs over lines that may not be contiguous (a sample): (pairs, dropped)."""
    if isinstance(idx, range):
        pairs, _, dropped = clean_pairs(src, tgt, d_form, empty_lines, src_name=names[0], tgt_name=names[1],
                                        first_line=idx.start + 1)
        return pairs, dropped
    pairs, dropped = [], 0
    for j, s, t in zip(idx, src, tgt):
        p, _, n = clean_pairs([s], [t], d_form, empty_lines, src_name=names[0], tgt_name=names[1], first_line=j + 1)
        pairs += p
        dropped += n
    return pairs, dropped


def _sample_task(task) -> list:
    """The normalised, non-empty pairs at the picked lines of one shard (for SentencePiece)."""
    reader, shard, names, picks, form, empty_lines = task
    out = []
    for idx, src, tgt in read_blocks(reader, shard, names, picks):
        out += _clean(idx, src, tgt, form, empty_lines, names)[0]
    return out


def _encode_task(task) -> dict:
    """Normalises, tokenises and writes one shard as array_record; returns its counts (control
    characters per side: [characters, lines, first line]) and the token lengths of the examples
    it kept."""
    from array_record.python.array_record_module import ArrayRecordWriter

    reader, shard, names, form, empty_lines, vocab_dir, path = task
    src_vocab, tgt_vocab = worker_cache(("vocab", vocab_dir), lambda: read_vocab_dir(vocab_dir))
    writer = ArrayRecordWriter(path, "group_size:1")  # TFDS's own options (random access)
    ls, lt, num_bytes, empty, empty_tok = [], [], 0, 0, 0
    controls = [[0, 0, None], [0, 0, None]]
    try:
        for idx, src, tgt in read_blocks(reader, shard, names):
            for side, lines in zip(controls, (src, tgt)):
                _add_controls(side, count_controls(lines, idx[0] + 1) if len(idx) else (0, 0, None))
            pairs, dropped = _clean(idx, src, tgt, form, empty_lines, names)
            empty += dropped
            if not pairs:
                continue
            s_ids = _encode_ids(src_vocab, [s for s, _ in pairs])
            t_ids = _encode_ids(tgt_vocab, [t for _, t in pairs])
            for (s, t), si, ti in zip(pairs, s_ids, t_ids):
                if not si or not ti:
                    empty_tok += 1
                    continue
                rec = serialize_record(si, ti, s, t)
                writer.write(rec)
                num_bytes += len(rec)
                ls.append(len(si))
                lt.append(len(ti))
    finally:
        writer.close()
    return {"examples": len(ls), "empty": empty, "empty_after_tokenization": empty_tok, "num_bytes": num_bytes,
            "controls": controls,
            "source_lengths": np.asarray(ls, np.int32), "target_lengths": np.asarray(lt, np.int32)}


def _add_controls(total: list, part) -> None:
    """Adds count_controls' (characters, lines, first line) to a running [characters, lines, first]."""
    total[0] += part[0]
    total[1] += part[1]
    if total[2] is None:
        total[2] = part[2]


def _write_tfds(out: str, d, source, scans: dict, vocab_dir: str, workers: Workers, stats: dict) -> dict:
    """Tokenises every split into array_record shards in the prepared folder `out` (its TFDS
    dataset, records.tfds_dir) and writes the metadata; returns {role_source / role_target:
    token lengths}."""
    folder = tfds_dir(out)
    os.makedirs(folder)
    lengths, shards = {}, {}
    for role, sc in scans.items():
        plan = sc.shards(SHARD_LINES)
        tasks = [(source.reader(role), shard, sc.names, d.normalization, d.empty_lines, vocab_dir,
                  os.path.join(folder, shard_name(role, i, len(plan)))) for i, shard in enumerate(plan)]
        results = list(workers.map(_encode_task, tasks))
        _count_split(stats[source.roles[role]], sc, results)
        ls = np.concatenate([r["source_lengths"] for r in results])
        lt = np.concatenate([r["target_lengths"] for r in results])
        stats[source.roles[role]].update(source_tokens=int(ls.sum()), target_tokens=int(lt.sum()))
        dtype = np.uint16 if max(ls.max(), lt.max()) <= np.iinfo(np.uint16).max else np.int32
        lengths[f"{role}_source"], lengths[f"{role}_target"] = ls.astype(dtype), lt.astype(dtype)
        # A shard whose every pair was dropped is left out (TFDS wants no empty files).
        kept = [(i, r) for i, r in enumerate(results) if r["examples"]]
        for j, (i, _) in enumerate(kept):
            old = os.path.join(folder, shard_name(role, i, len(plan)))
            if len(kept) != len(plan):
                os.rename(old, os.path.join(folder, shard_name(role, j, len(kept))))
        for i, r in enumerate(results):
            if not r["examples"]:
                os.remove(os.path.join(folder, shard_name(role, i, len(plan))))
        shards[role] = [(r["examples"], r["num_bytes"]) for _, r in kept]
    write_metadata(folder, shards)
    return lengths


def _count_split(st: dict, sc: SplitScan, results: list) -> None:
    """A split's counts in its stats (examples, drops, control characters), with the warnings."""
    empty = sum(r["empty"] for r in results)
    st["dropped"] = {"empty": empty, "empty_after_tokenization": sum(r["empty_after_tokenization"] for r in results)}
    st["examples"] = sum(r["examples"] for r in results)
    if st["examples"] == 0:
        raise DataError(f"{sc.names[0]}: no usable sentence pairs after dropping {empty} with an empty side; "
                        f"check that {sc.names[0]} and {sc.names[1]} hold text")
    if empty:
        log.warning("%s: dropped %d of %d pairs with an empty side (data.empty_lines='skip')",
                    sc.names[0], empty, sc.lines)
    st["control_characters"] = st["control_character_lines"] = 0
    for side, name in enumerate(sc.names):
        total = [0, 0, None]
        for r in results:
            _add_controls(total, r["controls"][side])
        st["control_characters"] += total[0]
        st["control_character_lines"] += total[1]
        if total[0]:
            log.warning("%s: %d control characters inside %d lines (the first on line %d) became spaces "
                        "(C0/C1 controls but tab; docs/data.md)", name, total[0], total[1], total[2])
