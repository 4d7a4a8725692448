"""Built-in tasks generated deterministically from a seed, with no download.

Each task is a function `rng -> (source, target)` over strings of printable ASCII. `generate`
draws training and held-out examples from independent seed streams and removes from the
held-out set any source that also occurs in training, so evaluation is on unseen inputs.
"""

from __future__ import annotations

import datetime
import string

import numpy as np

_ALPHABET = string.ascii_lowercase + string.digits

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_FIRST = datetime.date(1950, 1, 1).toordinal()
_LAST = datetime.date(2049, 12, 31).toordinal()


def _word(rng: np.random.Generator, lo: int = 1, hi: int = 20) -> str:
    n = int(rng.integers(lo, hi + 1))
    return "".join(_ALPHABET[i] for i in rng.integers(0, len(_ALPHABET), n))


def copy_task(rng):
    s = _word(rng)
    return s, s


def reverse_task(rng):
    s = _word(rng)
    return s, s[::-1]


def sort_task(rng):
    s = _word(rng)
    return s, "".join(sorted(s))


def addition_task(rng):
    a = int(rng.integers(0, 10 ** int(rng.integers(1, 6))))
    b = int(rng.integers(0, 10 ** int(rng.integers(1, 6))))
    return f"{a}+{b}", str(a + b)


def ordinal(n: int) -> str:
    if 11 <= n % 100 <= 13:
        return f"{n}th"
    return f"{n}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th') }"


# Each format renders a date unambiguously (two-digit years pivot: 50-99 -> 19xx, 00-49 -> 20xx).
DATE_FORMATS = (
    lambda d: f"{ordinal(d.day)} of {MONTHS[d.month - 1]} {d.year}",      # 3rd of March 2021
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day}, {d.year % 100:02d}",    # Mar 3, 21
    lambda d: f"{d.year}/{d.month}/{d.day}",                               # 2021/3/3
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",                  # March 3, 2021
    lambda d: f"{d.day} {MONTHS[d.month - 1][:3].upper()} {d.year}",       # 3 MAR 2021
    lambda d: f"{d.day}.{d.month}.{d.year}",                               # 3.3.2021
    lambda d: f"{d.month}/{d.day}/{d.year}",                               # 3/3/2021 (US)
    lambda d: f"{DAYS[d.weekday()]}, {MONTHS[d.month - 1]} {ordinal(d.day)} {d.year}",
    lambda d: f"{d.day:02d}-{MONTHS[d.month - 1][:3].lower()}-{d.year}",   # 03-mar-2021
    lambda d: f"{MONTHS[d.month - 1].lower()} {ordinal(d.day)}, {d.year}",  # march 3rd, 2021
    lambda d: f"{d.year}{d.month:02d}{d.day:02d}",                         # 20210303
    lambda d: f"{DAYS[d.weekday()][:3]} {d.day} {MONTHS[d.month - 1][:3]} {d.year % 100:02d}",
)


def dates_task(rng):
    d = datetime.date.fromordinal(int(rng.integers(_FIRST, _LAST + 1)))
    fmt = DATE_FORMATS[int(rng.integers(0, len(DATE_FORMATS)))]
    return fmt(d), d.isoformat()


_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kl", "l", "m", "n", "p", "r", "s", "st", "t", "v",
           "w", "z", "th", "sh", "ch"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ee"]
_CODAS = ["", "n", "r", "l", "s", "k", "m", "x"]
# (source, target) templates of copy_names: {0}, {1} are names; every other word is common.
NAME_TEMPLATES = (
    ("yesterday {0} told {1} about the new plan .", "{0} informed {1}"),
    ("{0} and {1} went to the market together .", "market trip : {0} , {1}"),
    ("a letter from {0} arrived for {1} this morning .", "letter : {0} -> {1}"),
    ("{1} was hired by {0} last week .", "{0} hired {1}"),
    ("after the meeting {0} called {1} twice .", "{0} called {1}"),
    ("the award went to {0} , said {1} .", "winner : {0} ( source : {1} )"),
    ("{0} lent a bicycle to {1} on monday .", "{1} borrowed from {0}"),
    ("please ask {1} whether {0} has left .", "question for {1} about {0}"),
)


def name(rng: np.random.Generator) -> str:
    """A capitalised pseudo-name of 2-3 syllables (about 10^8 of them: rare by construction)."""
    parts = [_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))] + _CODAS[rng.integers(len(_CODAS))]
             for _ in range(int(rng.integers(2, 4)))]
    return "".join(parts).capitalize()


def copy_names_task(rng):
    """A sentence mentioning two rare names -> a template holding them (word-level; the held-out
    splits' names never occur in training, `generate_splits`). With data.spm_model_type="word"
    the names are unknown words: only copy attention can write them."""
    src, tgt = NAME_TEMPLATES[int(rng.integers(len(NAME_TEMPLATES)))]
    a, b = name(rng), name(rng)
    while b == a:
        b = name(rng)
    return src.format(a, b), tgt.format(a, b)


TASKS = {
    "copy": copy_task,
    "reverse": reverse_task,
    "sort": sort_task,
    "addition": addition_task,
    "dates": dates_task,
    "copy_names": copy_names_task,
}
# Tasks whose held-out examples may not share any word with training beyond the template's
# common words (copy_names: test names never appear in training).
UNSEEN_WORDS = {"copy_names"}


def generate(task: str, n: int, seed: int, stream: int = 0) -> list[tuple[str, str]]:
    """n examples of `task`; `stream` 0 is training, 1 held-out, 2 test (independent streams)."""
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    rng = np.random.default_rng([seed, stream])
    fn = TASKS[task]
    return [fn(rng) for _ in range(n)]


def generate_splits(task: str, train_size: int, eval_size: int, seed: int) -> dict[str, list[tuple[str, str]]]:
    """{'train', 'valid', 'test'}: held-out splits exclude every source seen in training."""
    train = generate(task, train_size, seed, 0)
    seen = {s for s, _ in train}
    if task in UNSEEN_WORDS:  # every name of training: a held-out example may use none of them
        common = {w for src, tgt in NAME_TEMPLATES for w in (src + " " + tgt).split()}
        names = {w for s, t in train for w in s.split() if w not in common}
    splits = {"train": train}
    for stream, name in ((1, "valid"), (2, "test")):
        rng_seed_offset = 0
        out: list[tuple[str, str]] = []
        while len(out) < eval_size:
            batch = generate(task, eval_size, seed + 7919 * rng_seed_offset, stream)
            out.extend(ex for ex in batch if ex[0] not in seen
                       and not (task in UNSEEN_WORDS and names.intersection(ex[0].split())))
            rng_seed_offset += 1
            if rng_seed_offset > 50:
                raise ValueError(f"task {task!r}: cannot draw {eval_size} held-out examples unseen in training")
        splits[name] = out[:eval_size]
    return splits
