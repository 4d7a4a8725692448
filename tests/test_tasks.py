"""Built-in tasks: deterministic for a seed, correct targets, held-out splits unseen in training."""

import datetime
import re

import pytest

from s2s_jax.data import tasks
from s2s_jax.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID, CharVocab


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_deterministic_for_a_seed(task):
    assert tasks.generate(task, 50, seed=3) == tasks.generate(task, 50, seed=3)
    assert tasks.generate(task, 50, seed=3) != tasks.generate(task, 50, seed=4)


def test_targets_are_correct():
    for s, t in tasks.generate("copy", 100, 0):
        assert s == t
    for s, t in tasks.generate("reverse", 100, 0):
        assert t == s[::-1]
    for s, t in tasks.generate("sort", 100, 0):
        assert t == "".join(sorted(s))
    for s, t in tasks.generate("addition", 100, 0):
        a, b = s.split("+")
        assert int(t) == int(a) + int(b)


MONTHS = {m.lower(): i + 1 for i, m in enumerate(tasks.MONTHS)}
MONTHS.update({m[:3].lower(): i + 1 for i, m in enumerate(tasks.MONTHS)})


def independent_parse(text: str) -> datetime.date:
    """A parser written separately from the generator: it must agree with every target."""
    s = text.lower().replace(",", " ")
    s = re.sub(r"\b(monday|tuesday|wednesday|thursday|friday|saturday|sunday|mon|tue|wed|thu|fri|sat|sun)\b", " ", s)
    s = re.sub(r"(\d+)(st|nd|rd|th)\b", r"\1", s).replace(" of ", " ")
    if re.fullmatch(r"\d{8}", s.strip()):
        return datetime.date(int(s[:4]), int(s[4:6]), int(s[6:8]))
    if m := re.fullmatch(r"\s*(\d{4})/(\d+)/(\d+)\s*", s):
        return datetime.date(int(m[1]), int(m[2]), int(m[3]))
    if m := re.fullmatch(r"\s*(\d+)/(\d+)/(\d{4})\s*", s):  # US month/day/year
        return datetime.date(int(m[3]), int(m[1]), int(m[2]))
    if m := re.fullmatch(r"\s*(\d+)\.(\d+)\.(\d{4})\s*", s):  # day.month.year
        return datetime.date(int(m[3]), int(m[2]), int(m[1]))
    if m := re.fullmatch(r"\s*(\d+)-([a-z]+)-(\d{4})\s*", s):
        return datetime.date(int(m[3]), MONTHS[m[2]], int(m[1]))
    words = s.split()
    month = next(MONTHS[w] for w in words if w in MONTHS)
    nums = [w for w in words if w.isdigit()]
    if words[0] in MONTHS or words.index(next(w for w in words if w in MONTHS)) < words.index(nums[0]):
        day, year = nums[0], nums[1]
    else:
        day, year = nums[0], nums[1]
    y = int(year)
    if len(year) == 2:
        y += 1900 if y >= 50 else 2000
    return datetime.date(y, month, int(day))


def test_dates_targets_parse_as_the_same_date():
    examples = tasks.generate("dates", 2000, seed=11)
    formats_seen = set()
    for source, target in examples:
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", target)
        assert independent_parse(source) == datetime.date.fromisoformat(target), source
        formats_seen.add(re.sub(r"\d", "9", re.sub(r"[A-Za-z]+", "a", source)))
    assert len(formats_seen) >= 8  # varied formats, not one template


def test_examples_from_the_issue():
    d = datetime.date(2021, 3, 3)
    rendered = {fmt(d) for fmt in tasks.DATE_FORMATS}
    assert {"3rd of March 2021", "Mar 3, 21", "2021/3/3"} <= rendered


def test_held_out_splits_are_unseen():
    splits = tasks.generate_splits("dates", 5000, 500, seed=5)
    seen = {s for s, _ in splits["train"]}
    assert len(splits["valid"]) == 500 and len(splits["test"]) == 500
    assert not any(s in seen for s, _ in splits["valid"] + splits["test"])


def test_char_vocab_specials_and_round_trip():
    v = CharVocab()
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    ids = v.encode("2021-03-03")
    assert min(ids) > UNK_ID
    assert v.decode(ids + [EOS_ID, 50, 51]) == "2021-03-03"
    assert v.encode("é") == [UNK_ID]
