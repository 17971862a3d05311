"""Small tasks of kinds the default bank does not hold, for the frontier outside the bank (`frontier --tasks`).

    python -m benchmarks.outside_tasks                 # benchmarks/outside/outside_*.jsonl.gz

Eight tasks with short answers: two transductions (number words, Roman numerals), two formats (ISO dates, camelCase
to snake_case), two lookups (Unicode names, a time zone's local time), an extraction (a log line's path) and a
classification (a file's media type). The data is what Python ships: the standard library (unicodedata, calendar,
mimetypes' built-in table, sys.stdlib_module_names, the names stdlib modules define) and zoneinfo read from the
tzdata package alone (already in .venv, a dependency of python-dateutil), so the system's time zone files do not
change it; number words and Roman numerals are computed here. Each task draws distinct inputs from its own seeded
generator and splits them in draw order (128 train, 32 valid, 24 test); `save_dataset` writes the same bytes for the
same data and the same Python and tzdata (the committed files: Python 3.11, tzdata 2026.6). The benchmark reads the
written files, so it needs none of this.
"""

from __future__ import annotations

import argparse
import calendar
import datetime as dt
import functools
import importlib
import mimetypes
import random
import re
import sys
import unicodedata
import zoneinfo
from pathlib import Path

from lorablend.dataset import Dataset, Example, save_dataset

SEED = 0
SIZES = {"train": 128, "valid": 32, "test": 24}
ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
ROMAN = ((1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"), (40, "XL"), (10, "X"),
         (9, "IX"), (5, "V"), (4, "IV"), (1, "I"))
MODULES = ("os", "os.path", "shutil", "string", "textwrap", "itertools", "functools", "json", "re", "socket", "ssl",
           "subprocess", "threading", "asyncio", "logging", "inspect", "importlib.util", "email.utils", "urllib.parse",
           "zipfile", "tarfile", "tempfile", "sysconfig", "platform", "locale", "calendar", "math", "statistics",
           "random", "hashlib", "base64", "binascii", "codecs", "unicodedata", "glob", "fnmatch", "sqlite3", "html",
           "traceback", "warnings", "contextlib", "typing", "dataclasses", "heapq", "bisect", "types", "operator",
           "gc", "signal", "mimetypes", "secrets", "ipaddress", "time", "sys", "site", "pkgutil", "tokenize", "ast")
UNICODE_BLOCKS = ((0xC0, 0x17F), (0x391, 0x3C9), (0x410, 0x44F), (0x20A0, 0x20C0), (0x2190, 0x21FF), (0x2200, 0x22FF))
MEDIA = ("image", "audio", "video", "text", "application")
STEMS = "project final draft export untitled copy shared team client upload misc old new jan q3 v2 backup 2024".split()


def words(n: int) -> str:
    """English words for 0 <= n < 10**6: lower case, hyphens from 21 to 99, no 'and'."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")
    if n < 1000:
        return ONES[n // 100] + " hundred" + (" " + words(n % 100) if n % 100 else "")
    return words(n // 1000) + " thousand" + (" " + words(n % 1000) if n % 1000 else "")


def roman(n: int) -> str:
    out = ""
    for value, letters in ROMAN:
        while n >= value:
            out, n = out + letters, n - value
    return out


def number_words(rng):
    n = rng.randrange(10 ** rng.randint(1, 6))  # as many short numbers as long ones
    return str(n), words(n)


def roman_numerals(rng):
    n = rng.randint(1, 3999)
    return str(n), roman(n)


def date_words(rng):
    d = dt.date(1900, 1, 1) + dt.timedelta(days=rng.randrange(200 * 365))
    return d.isoformat(), f"{calendar.month_name[d.month]} {d.day}, {d.year}"


@functools.cache
def snake_names() -> list[str]:
    """Public snake_case names (2 to 4 words) that the MODULES define, sorted."""
    names = set()
    for m in MODULES:
        names |= {n for n in dir(importlib.import_module(m)) if re.fullmatch(r"[a-z]{2,}(_[a-z]{2,}){1,3}", n)}
    return sorted(names)


def snake_case(rng):
    name = rng.choice(snake_names())
    first, *rest = name.split("_")
    return first + "".join(w.capitalize() for w in rest), name


@functools.cache
def characters() -> list[str]:
    """The named characters of UNICODE_BLOCKS but combining marks."""
    return [chr(c) for a, b in UNICODE_BLOCKS for c in range(a, b + 1)
            if unicodedata.name(chr(c), "") and unicodedata.category(chr(c)) != "Mn"]


def unicode_names(rng):
    c = rng.choice(characters())
    return c, unicodedata.name(c)


@functools.cache
def zones() -> list[str]:
    """The tzdata package's Area/City zones, sorted (not the system's files: the same data on every machine)."""
    zoneinfo.reset_tzpath(to=[])
    areas = ("Africa", "America", "Asia", "Atlantic", "Australia", "Europe", "Indian", "Pacific")
    return sorted(z for z in zoneinfo.available_timezones() if z.split("/")[0] in areas)


def zone_time(rng):
    z = rng.choice(zones())
    noon = dt.datetime(2024, 1, 15, 12, tzinfo=dt.timezone.utc)
    return z, noon.astimezone(zoneinfo.ZoneInfo(z)).strftime("%H:%M")


@functools.cache
def media_table() -> dict[str, str]:
    """Extension -> media type: mimetypes' built-in table, not the system's files."""
    return mimetypes.MimeTypes().types_map[True]


def log_path(rng):
    m = rng.choice(sorted(n for n in sys.stdlib_module_names if not n.startswith("_")))
    ext = rng.choice(sorted(media_table()))
    path = rng.choice((f"/library/{m}.html", f"/static/{rng.choice(STEMS)}{ext}",
                       f"/api/v{rng.randint(1, 3)}/{m}/{rng.randint(1, 9999)}", f"/docs/{m}/"))
    when = dt.datetime(2023, 1, 1) + dt.timedelta(seconds=rng.randrange(365 * 86400))
    status = rng.choice((200, 200, 200, 201, 204, 301, 302, 304, 400, 401, 403, 404, 500, 503))
    ip = ".".join(str(rng.randint(1, 254)) for _ in range(4))
    line = (f'{ip} - - [{when:%d/%b/%Y:%H:%M:%S} +0000] "{rng.choice(("GET", "GET", "POST", "HEAD"))} {path} '
            f'HTTP/1.1" {status} {rng.randint(0, 60000) if status != 204 else 0}')
    return line, path


def media_type(rng):
    kind = rng.choice(MEDIA)  # the classes equally often
    ext = rng.choice(sorted(e for e, t in media_table().items() if t.split("/")[0] == kind))
    return "_".join(rng.sample(STEMS, rng.randint(1, 3))) + ext, kind


# name -> (instruction, a draw of (input, output))
TASKS = {
    "outside_number_words": ("Write this number in English words: lower case, hyphens between tens and ones (as in "
                             "'forty-two'), no 'and'. Answer with the words only.", number_words),
    "outside_roman_numerals": ("Write this number in Roman numerals. Answer with the numeral only.", roman_numerals),
    "outside_date_words": ("Rewrite this ISO 8601 date as 'Month D, YYYY', with the month's English name. Answer with "
                           "the date only.", date_words),
    "outside_snake_case": ("Rewrite this camelCase identifier in snake_case: lower-case words joined by underscores. "
                           "Answer with the identifier only.", snake_case),
    "outside_unicode_names": ("Give the official Unicode name of this character, in capital letters. Answer with the "
                              "name only.", unicode_names),
    "outside_zone_time": ("What is the local time in this IANA time zone at 12:00 UTC on 15 January 2024? Answer as "
                          "HH:MM on a 24-hour clock, with the time only.", zone_time),
    "outside_log_path": ("Extract the requested path from this web server access log line. Answer with the path "
                         "only.", log_path),
    "outside_media_type": ("Which kind of file is this, judging by its extension: image, audio, video, text or "
                           "application? Answer with one of those words only.", media_type),
}


def make(name: str) -> Dataset:
    """The task's distinct examples in draw order, cut into train, valid and test."""
    instruction, draw = TASKS[name]
    rng, seen, examples = random.Random(f"{SEED}:{name}"), set(), []
    while len(examples) < sum(SIZES.values()):
        inp, out = draw(rng)
        if inp not in seen:
            seen.add(inp)
            examples.append(Example(inp, (out,), instruction))
    splits, i = {}, 0
    for split, size in SIZES.items():
        splits[split], i = examples[i:i + size], i + size
    return Dataset(name, splits, sha256="")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/outside"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in TASKS:
        save_dataset(make(name), args.out / f"{name}.jsonl.gz")


if __name__ == "__main__":
    sys.exit(main())
