"""Reading and normalising raw parallel text: readable files, strict UTF-8, aligned line counts,
empty lines, control characters.

Everything here works on plain Python strings; the checks raise `DataError` naming the file
(and the 1-based line) and what to do, so that bad data is reported before any training.

Control characters: every C0/C1 control character but tab inside a line (U+0000-U+0008,
U+000A-U+001F, U+007F-U+009F; `vocab.CONTROL_CHARACTERS`) becomes a space, as `normalize`
does everywhere (training, evaluation, translation); prepare counts them per split
(`count_controls`: stats.json and a warning naming the file and the first line). Those at the
ends of a line that are whitespace (the CR of Windows line endings, a form feed) are stripped
with the surrounding whitespace, as always, and are not counted.
"""

from __future__ import annotations

import os
import re
import stat

import numpy as np

from s2s_jax.data.errors import DataError
from s2s_jax.vocab import CONTROL_CHARACTERS, normalize

_CONTROL = re.compile(f"[{re.escape(CONTROL_CHARACTERS)}]")


def read_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file, split on '\\n' only (not on U+2028 or form feeds, which
    `str.splitlines` would treat as line breaks and so misalign parallel files).

    A UTF-8 byte-order mark at the start is dropped and a final newline does not make an extra
    line. Raises DataError for a missing file, an empty file or invalid UTF-8 (with line number).
    """
    check_file(path)
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise _empty_file(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad_utf8(path, raw.count(b"\n", 0, e.start) + 1, e, e.start) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    # Windows line endings: the '\r' is whitespace, removed by normalize()'s strip.
    return lines


def check_file(path: str) -> None:
    """DataError unless `path` is a readable regular file: a missing one (naming what its folder
    holds), a folder, a named pipe, socket or device, or one this process may not read."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        folder = os.path.dirname(path) or "."
        found = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        listing = f" (the folder holds: {', '.join(found[:12])}{' ...' if len(found) > 12 else ''})" if found else (
            "" if os.path.isdir(folder) else " (the folder does not exist)")
        raise DataError(f"{path}: no such file{listing}; check data.dir, the split names "
                        f"(data.train_split/valid_split/test_split) and data.src_lang/tgt_lang") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}); check the path and its permissions") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"{path}: is {_file_kind(mode)}, not a regular file; point data.dir, the split names and "
                        f"data.src_lang/tgt_lang at text files (one sentence per line)")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise DataError(f"{path}: is a file this process cannot read ({e.strerror}); fix its permissions "
                        f"(e.g. chmod a+r) or copy the corpus somewhere readable") from None


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "a special file"


def _empty_file(path: str) -> DataError:
    return DataError(f"{path}: the file is empty; put one sentence per line in it, or point "
                     f"data.dir / the split names at a non-empty corpus")


def _bad_utf8(path: str, line: int, e: UnicodeDecodeError, byte: int) -> DataError:
    return DataError(f"{path}, line {line}: invalid UTF-8 ({e.reason} at byte {byte}); "
                     f"re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8")


def empty_line_error(path: str, line: int) -> DataError:
    return DataError(f"{path}, line {line}: empty line (after normalisation); remove the pair from both "
                     f"files or set data.empty_lines='skip' to drop such pairs")


def check_aligned(src_path: str, n_src: int, tgt_path: str, n_tgt: int) -> None:
    if n_src != n_tgt:
        raise DataError(f"{src_path} has {n_src} lines but {tgt_path} has {n_tgt}; parallel "
                        f"files must be line-aligned (line N of one translates line N of the other)")


def read_parallel(src_path: str, tgt_path: str) -> tuple[list[str], list[str]]:
    """Raw source and target lines of one split; DataError if their counts differ."""
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    check_aligned(src_path, len(src), tgt_path, len(tgt))
    return src, tgt


# A whitespace-only line (which normalize() turns into ""), found by its preceding newline.
_BLANK = re.compile(r"\n[^\S\n]*\n")
SCAN_BLOCK = 1 << 22  # 4 MiB: the pass holds a few copies of a block (bytes, str, newline mask)


def scan_lines(path: str, every: int, *, find_empty: bool = False):
    """One streaming pass over a text file with the checks of read_lines, in bounded memory.

    Returns (number of lines, byte offsets of lines 0, every, 2*every, ... (< number of lines),
    1-based number of the first whitespace-only line or None (only looked for if find_empty)).
    Lines are counted as read_lines counts them; raises the same DataErrors (missing file,
    empty file, invalid UTF-8 with its line).
    """
    check_file(path)
    offsets, lines, pos, nonblank, first_empty = [0], 0, 0, False, None
    pending = b""
    with open(path, "rb") as f:
        while True:
            block = f.read(SCAN_BLOCK)
            eof = not block
            buf = pending + block
            cut = len(buf) if eof else buf.rfind(b"\n") + 1
            if not eof and cut == 0:
                pending = buf
                continue
            part, pending = buf[:cut], buf[cut:]
            if part:
                try:
                    text = part.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _bad_utf8(path, lines + part.count(b"\n", 0, e.start) + 1, e, pos + e.start) from None
                if not find_empty or first_empty is not None:
                    del text
                nonblank = nonblank or bool(part.strip())
                nl = np.flatnonzero(np.frombuffer(part, np.uint8) == 10)
                first_k = (lines // every + 1) * every  # line k starts after newline k-1 (0-based)
                offsets.extend(int(pos + nl[k - 1 - lines] + 1) for k in range(first_k, lines + len(nl) + 1, every))
                if find_empty and first_empty is None:
                    if pos == 0 and text.startswith("\ufeff"):
                        text = text[1:]  # the byte-order mark, which read_lines drops
                    m = _BLANK.search("\n" + text)  # `part` starts at a line start
                    if m:
                        first_empty = lines + text.count("\n", 0, m.start()) + 1
                    elif not text.endswith("\n") and not text[text.rfind("\n") + 1:].strip():
                        first_empty = lines + len(nl) + 1  # the last line, without a final newline
                lines += len(nl) + (0 if part.endswith(b"\n") else 1)
                pos += cut
            if eof:
                break
    if not nonblank:
        raise _empty_file(path)
    return lines, [o for k, o in zip(range(0, lines, every), offsets)], first_empty


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
                raise empty_line_error(src_name if not s else tgt_name, i + first_line)
            dropped += 1
            continue
        pairs.append((s, t))
        lines.append(i + first_line)
    return pairs, lines, dropped


def count_controls(lines, first_line: int = 1) -> tuple[int, int, int | None]:
    """(control characters, lines holding any, 1-based number of the first such line or None)
    of the control characters inside `lines` (the module's rule: not those stripped at the ends)."""
    characters = found = 0
    first = None
    for i, line in enumerate(lines):
        if _CONTROL.search(line):
            k = len(_CONTROL.findall(line.strip()))
            if k:
                characters += k
                found += 1
                first = first_line + i if first is None else first
    return characters, found, first


def as_text(x) -> str:
    """A record's text field (str, bytes or a numpy scalar of either) as str."""
    if isinstance(x, np.ndarray):
        x = x.item()
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)
