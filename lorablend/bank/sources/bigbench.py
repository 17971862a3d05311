"""Real task data offline: the 61 Natural Instructions subtasks inside the BIG-bench sdist.

The sdist (`bigbench==1.0.0`, 358 MB) was fetched with pip, never installed; the registry no longer serves it
(2026-12), so it is read from `--sdist` where a user still has it, and the default bank's own datasets
(`bank build --tasks default`) are the route for everyone else; each `task.json` becomes a compact lorablend dataset with a seeded
train/valid/test split, and `tasks.json` lists them with their family (the
source dataset the subtask was built from), which `--holdout family` needs.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import tarfile
from pathlib import Path

from lorablend.atomic import write_json
from lorablend.dataset import Dataset, load_dataset, save_dataset
from lorablend.errors import InputError, LorablendError
from lorablend.runtime.models import lorablend_home

SDIST = "bigbench-1.0.0.tar.gz"
_MEMBER = re.compile(r"bigbench/benchmark_tasks/natural_instructions/(subtask\d+_[^/]+)/task\.json$")
_FAMILY_ALIASES = {"miscellaneous": "misc", "miscellaenous": "misc", "essential": "essential_terms"}


def family_of(task_name: str) -> str:
    """`subtask002_quoref_answer_generation` → `quoref`."""
    word = task_name.split("_")[1]
    return _FAMILY_ALIASES.get(word, word)


def fetch_sdist(dest: Path | None = None) -> Path:
    dest = dest or lorablend_home() / "downloads"
    path = dest / SDIST
    if path.exists():
        return path
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "bigbench==1.0.0", "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not path.exists():
        raise LorablendError(
            f"could not download {SDIST} with pip (the registry no longer serves bigbench==1.0.0, only 0.0.1, which "
            "holds no tasks); the default bank's datasets are committed with it: rebuild its entries with `lorablend "
            "bank build --tasks default --out DIR [--entries NAMES]`, or pass --sdist FILE if you have the sdist"
        )
    return path


MIN_TRAIN = 16  # a task cut to fewer train examples than this is cut in proportion instead


def compact(ds: Dataset, seed: int, train: int, valid: int, test: int) -> Dataset:
    """A seeded test/valid/train cut of at most the given sizes.

    Test first, so evaluation sets stay full; but a task too small to keep MIN_TRAIN train
    examples after full test and valid splits (subtask053 has 58 examples) is cut in the
    proportions train:valid:test instead, so that it can still be trained on.
    """
    examples = [e for split in ("train", "valid", "test") for e in ds.splits[split]]
    random.Random(seed).shuffle(examples)
    n = len(examples)
    if n - test - valid < MIN_TRAIN:
        total = train + valid + test
        test, valid = n * test // total, n * valid // total
    return Dataset(
        name=ds.name,
        splits={
            "test": examples[:test],
            "valid": examples[test : test + valid],
            "train": examples[test + valid : test + valid + train],
        },
        sha256=ds.sha256,
        source=ds.source,
    )


def extract_natural_instructions(
    sdist: Path, out: Path, *, seed: int = 0, train: int = 200, valid: int = 50, test: int = 100
) -> list[dict]:
    if not sdist.exists():
        raise InputError(f"{sdist}: no such file; omit --sdist to download it")
    try:
        tar = tarfile.open(sdist)
    except tarfile.TarError as exc:
        raise InputError(f"{sdist}: not a readable tar.gz ({exc})") from None
    tasks = []
    with tar:
        members = [(m, _MEMBER.search(m.name)) for m in tar.getmembers()]
        for member, match in [(m, x) for m, x in members if x]:
            name = match.group(1)
            raw = out / "raw" / f"{name}.json"
            raw.parent.mkdir(parents=True, exist_ok=True)
            raw.write_bytes(tar.extractfile(member).read())
            ds = compact(load_dataset(raw, seed=seed, name=name), seed, train, valid, test)
            save_dataset(ds, out / f"{name}.jsonl.gz")
            raw.unlink()
            tasks.append({"name": name, "family": family_of(name), "path": f"{name}.jsonl.gz"})
    (out / "raw").rmdir()
    if not tasks:
        raise InputError(f"{sdist}: no natural_instructions/subtask*/task.json inside; is it bigbench-1.0.0?")
    tasks.sort(key=lambda t: t["name"])
    write_json(out / "tasks.json", tasks)
    return tasks
