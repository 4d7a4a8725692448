"""Reading and normalising raw parallel text: strict UTF-8, aligned line counts, empty lines.

Everything here works on plain Python strings; the checks raise `DataError` naming the file
(and the 1-based line) and what to do, so that bad data is reported before any training.
"""

from __future__ import annotations

import os

from s2s_jax.data.errors import DataError
from s2s_jax.vocab import normalize


def read_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file, split on '\\n' only (not on U+2028 or form feeds, which
    `str.splitlines` would treat as line breaks and so misalign parallel files).

    A UTF-8 byte-order mark at the start is dropped and a final newline does not make an extra
    line. Raises DataError for a missing file, an empty file or invalid UTF-8 (with line number).
    """
    if not os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        found = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        listing = f" (the folder holds: {', '.join(found[:12])}{' ...' if len(found) > 12 else ''})" if found else (
            "" if os.path.isdir(folder) else " (the folder does not exist)")
        raise DataError(f"{path}: no such file{listing}; check data.dir, the split names "
                        f"(data.train_split/valid_split/test_split) and data.src_lang/tgt_lang")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise DataError(f"{path}: the file is empty; put one sentence per line in it, or point "
                        f"data.dir / the split names at a non-empty corpus")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}, line {line}: invalid UTF-8 ({e.reason} at byte {e.start}); "
                        f"re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    # Windows line endings: the '\r' is whitespace, removed by normalize()'s strip.
    return lines


def read_parallel(src_path: str, tgt_path: str) -> tuple[list[str], list[str]]:
    """Raw source and target lines of one split; DataError if their counts differ."""
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; parallel "
                        f"files must be line-aligned (line N of one translates line N of the other)")
    return src, tgt


def clean_pairs(src_lines, tgt_lines, form: str, empty_lines: str, *, src_name: str, tgt_name: str,
                first_line: int = 1):
    """Normalises aligned lines and applies the empty-line policy.

    Returns (pairs, kept_line_numbers, dropped_empty): `pairs` are (source, target) strings,
    `kept_line_numbers` the 1-based line of each kept pair. With empty_lines="error" an empty side
    raises DataError naming the file and line; with "skip" the pair is dropped and counted.
    """
    pairs, lines, dropped = [], [], 0
    for i, (s, t) in enumerate(zip(src_lines, tgt_lines)):
        s, t = normalize(s, form), normalize(t, form)
        if not s or not t:
            if empty_lines == "error":
                name = src_name if not s else tgt_name
                raise DataError(f"{name}, line {i + first_line}: empty line (after normalisation); remove "
                                f"the pair from both files or set data.empty_lines='skip' to drop such pairs")
            dropped += 1
            continue
        pairs.append((s, t))
        lines.append(i + first_line)
    return pairs, lines, dropped
