"""Import the Lots-of-LoRAs collection (hub org "Lots-of-LoRAs") as a lorablend bank.

The collection has 900+ rank-16 LoRAs for mistralai/Mistral-7B-Instruct-v0.2, one per
Natural Instructions task, and one dataset repo per task. Download the repos you want
(e.g. with `huggingface-cli download`), then point `lorablend bank import-lots-of-loras`
at the folder that holds them.

Supported layouts of SRC (all may be mixed):

* flat: `SRC/<repo>/...`, one folder per repo, named as on the hub;
* an org folder: `SRC/Lots-of-LoRAs/<repo>/...`;
* a Hugging Face cache (`SRC` = `~/.cache/huggingface/hub`, or its parent):
  `SRC/models--Lots-of-LoRAs--<repo>/snapshots/<rev>/...` and
  `SRC/datasets--Lots-of-LoRAs--<repo>/snapshots/<rev>/...`; the revision named by
  `refs/main` is used, else the only (or newest) snapshot. Cache symlinks are followed,
  so the bank gets real copies.

Repos:

* adapter repos are folders whose name ends in `-taskNNN`
  (`Mistral-7B-Instruct-v0.2-4b-r16-task190`) holding `adapter_config.json` and
  `adapter_model.safetensors`;
* dataset repos are folders named `taskNNN_name` (`task190_snli_classification`)
  holding train / valid / test splits as JSON Lines, JSON or Parquet, optionally
  gzipped: `train.jsonl`, `valid.jsonl` or `validation.jsonl`, `test.jsonl`, or shards
  such as `data/train-00000-of-00001.parquet`. Records have `input` (str), `output`
  (list of str) and `id` (ignored).

An adapter and a dataset pair up by task number; the bank entry is named after the
dataset folder. Entries already in the bank are skipped (so an interrupted import
resumes); each entry is written atomically and the manifest saved after each one.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lorablend.adapter import CONFIG, AdapterReader, read_spec
from lorablend.atomic import atomic_dir
from lorablend.bank.manifest import Bank, BankEntry, check_bank_out
from lorablend.dataset import SPLIT_ALIASES, SPLITS, Dataset, load_dataset, save_dataset
from lorablend.errors import InputError

SOURCE = "Lots-of-LoRAs"
ADAPTER_RE = re.compile(r"^.+-task(\d+)$")
DATASET_RE = re.compile(r"^task(\d+)_[A-Za-z0-9][A-Za-z0-9_.\-]*$")
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")
_FORMAT_RANK = {".jsonl": 0, ".ndjson": 0, ".json": 1, ".parquet": 2}
_SHOW = 5  # names shown in a warning


@dataclass(frozen=True)
class Repo:
    """One downloaded repo: its hub name, the folder holding its files, its task number."""

    name: str
    path: Path
    task: int


@dataclass
class Scan:
    pairs: list[tuple[Repo, Repo]]  # (adapter, dataset), by task number
    unpaired_adapters: list[Repo]
    unpaired_datasets: list[Repo]
    ambiguous: dict[int, list[Repo]]  # task -> the repos that claim it (skipped)


@dataclass
class ImportReport:
    bank: Bank
    scan: Scan
    imported: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)  # already in the bank: skipped
    failed: dict[str, str] = field(default_factory=dict)  # entry name -> one-line reason


def _names(repos, n: int = _SHOW) -> str:
    names = [r.name if isinstance(r, Repo) else str(r) for r in repos]
    return ", ".join(names[:n]) + (f", … ({len(names) - n} more)" if len(names) > n else "")


# --------------------------------------------------------------------------- #
# Finding repos
# --------------------------------------------------------------------------- #


def _snapshot(cache_dir: Path) -> Path | None:
    """The snapshot folder of a hub cache repo: `refs/main`, else the only / newest one."""
    snaps = cache_dir / "snapshots"
    if not snaps.is_dir():
        return None
    ref = cache_dir / "refs" / "main"
    if ref.is_file():
        rev = ref.read_text(encoding="utf-8").strip()
        if rev and (snaps / rev).is_dir():
            return snaps / rev
    found = [p for p in snaps.iterdir() if p.is_dir()]
    return max(found, key=lambda p: (p.stat().st_mtime, p.name)) if found else None


def _candidates(folder: Path, depth: int = 0):
    """(repo name, folder) for every repo-looking folder under `folder` (see the module doc)."""
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise InputError(f"{folder}: cannot list the folder ({exc.strerror}); check the path and permissions") from None
    for child in children:
        if child.name.startswith(("models--", "datasets--")):
            snap = _snapshot(child)
            if snap is not None:
                yield child.name.split("--")[-1], snap
        elif ADAPTER_RE.match(child.name) or DATASET_RE.match(child.name):
            yield child.name, child
        elif depth < 2:  # an org folder (SRC/Lots-of-LoRAs/...) or a cache root (SRC/hub/...)
            yield from _candidates(child, depth + 1)


def scan_source(src: str | Path) -> Scan:
    """Find the adapter and dataset repos under `src` and pair them by task number."""
    src = Path(src)
    if not src.is_dir():
        raise InputError(f"{src}: not a folder; give the folder holding the downloaded Lots-of-LoRAs repos")
    adapters: dict[int, list[Repo]] = {}
    datasets: dict[int, list[Repo]] = {}
    for name, path in _candidates(src):
        if (m := DATASET_RE.match(name)) is not None:
            datasets.setdefault(int(m.group(1)), []).append(Repo(name, path, int(m.group(1))))
        elif (m := ADAPTER_RE.match(name)) is not None:  # without a config it pairs, then fails, visibly
            adapters.setdefault(int(m.group(1)), []).append(Repo(name, path, int(m.group(1))))
    ambiguous = {t: rs for group in (adapters, datasets) for t, rs in group.items() if len(rs) > 1}
    pairs, lone_a, lone_d = [], [], []
    for task in sorted(set(adapters) | set(datasets)):
        if task in ambiguous:
            continue
        a, d = adapters.get(task), datasets.get(task)
        if a and d:
            pairs.append((a[0], d[0]))
        elif a:
            lone_a.append(a[0])
        else:
            lone_d.append(d[0])
    return Scan(pairs, lone_a, lone_d, ambiguous)


# --------------------------------------------------------------------------- #
# Reading one task's dataset
# --------------------------------------------------------------------------- #


def _split_of(path: Path, repo: Path) -> str | None:
    """`train.jsonl`, `validation.parquet`, `data/train-00000-of-00001.parquet`, `train/0000.parquet`."""
    token = path.name.split(".")[0].split("-")[0].lower()
    if token in SPLIT_ALIASES:
        return SPLIT_ALIASES[token]
    parent = path.parent.name.lower()
    return SPLIT_ALIASES.get(parent) if path.parent != repo else None


def _data_kind(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    return suffixes[-1] if suffixes and suffixes[-1] in DATA_SUFFIXES else None


def split_files(repo: Path) -> dict[str, list[Path]]:
    """Split name -> the files holding it. If a split comes in several folders or formats
    (say `train.jsonl` and `data/train-*.parquet`), only the shallowest / JSONL one is used."""
    groups: dict[str, dict[tuple, list[Path]]] = {}
    for path in sorted(repo.rglob("*")):
        rel = path.relative_to(repo)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        kind = _data_kind(path)
        split = _split_of(path, repo) if kind else None
        if split is None:
            continue
        key = (len(rel.parts), _FORMAT_RANK[kind], str(rel.parent))
        groups.setdefault(split, {}).setdefault(key, []).append(path)
    return {split: by_key[min(by_key)] for split, by_key in groups.items()}


def read_task_dataset(repo: Repo, name: str | None = None) -> Dataset:
    """One dataset repo as a lorablend `Dataset`, each file's records in the file's split."""
    files = split_files(repo.path)
    if "train" not in files:
        found = ", ".join(sorted(files)) or "no split files"
        raise InputError(
            f"{repo.path}: no train split (found: {found}); the repo needs train.jsonl, train.parquet "
            "or data/train-*.parquet"
        )
    splits: dict[str, list] = {s: [] for s in SPLITS}
    digest = hashlib.sha256()
    for split in SPLITS:
        for path in files.get(split, []):
            if path.stat().st_size == 0:
                continue
            # no seeded re-split: every record of this file belongs to `split`
            ds = load_dataset(path, valid_fraction=0.0, test_fraction=0.0, name=name or repo.name)
            splits[split] += [ex for s in SPLITS for ex in ds.splits.get(s, [])]
            digest.update(f"{split}:{path.relative_to(repo.path)}:{ds.sha256}\n".encode())
    if not splits["train"]:
        raise InputError(f"{repo.path}: the train split has no records; re-download the dataset repo")
    return Dataset(name=name or repo.name, splits=splits, sha256=digest.hexdigest(), source=str(repo.path))


# --------------------------------------------------------------------------- #
# Importing
# --------------------------------------------------------------------------- #


def read_families(path: str | Path) -> dict[str, str | None]:
    """A JSON object mapping entry name -> family (a string, or null for none)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; --families takes a JSON file {{\"entry name\": \"family\"}}") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read as JSON ({exc}); --families takes {{\"entry name\": \"family\"}}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a JSON object {{\"entry name\": \"family\"}}, got {type(raw).__name__}")
    for key, value in raw.items():
        if value is not None and not isinstance(value, str):
            raise InputError(f"{path}: family of '{key}' must be a string or null, got {type(value).__name__}")
    return raw


def _adapter_files(path: Path) -> list[Path]:
    """The files of an adapter repo to copy: top-level, not hidden (README, configs, weights)."""
    return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))


def _base_model(adapters: list[Repo], failed: dict[str, str], names: dict[str, str]) -> str | None:
    """The base model all adapters share; adapters with an unreadable config go to `failed`."""
    seen: dict[str, str] = {}  # base model -> first adapter repo naming it
    for repo in adapters:
        try:
            base = read_spec(repo.path).base_model
        except InputError as exc:
            failed[names[repo.name]] = str(exc)
            continue
        if not base:
            failed[names[repo.name]] = (
                f"{repo.path / CONFIG}: no base_model_name_or_path; set it to the model the adapter was trained for"
            )
            continue
        seen.setdefault(base, repo.name)
        if len(seen) > 1:
            (b1, r1), (b2, r2) = list(seen.items())[:2]
            raise InputError(
                f"adapters disagree on the base model: {r1} is for {b1} but {r2} is for {b2}; "
                "a bank has one base model, so import them into separate banks"
            )
    return next(iter(seen), None)


def import_lots_of_loras(
    src: str | Path,
    out: str | Path,
    *,
    families: dict[str, str | None] | None = None,
    limit: int | None = None,
    force: bool = False,
    warn: Callable[[str], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> ImportReport:
    """Import every (adapter, dataset) pair under `src` into the bank at `out`.

    `families` maps entry names to families (default: no family). `limit` keeps the first
    N pairs by task number. Entries already in the bank are skipped unless `force`.
    `warn(message)` receives the unpaired / ambiguous repos; `progress(name, done, total)`
    is called as entries are handled. Entries that fail are listed in the report's
    `failed` and left out; everything else is imported.
    """
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    warn = warn or (lambda message: None)
    out = Path(out)
    scan = scan_source(src)
    if scan.unpaired_adapters:
        warn(f"{len(scan.unpaired_adapters)} adapter repo(s) without a dataset repo skipped: "
             f"{_names(scan.unpaired_adapters)}")
    if scan.unpaired_datasets:
        warn(f"{len(scan.unpaired_datasets)} dataset repo(s) without an adapter repo skipped: "
             f"{_names(scan.unpaired_datasets)}")
    for task, repos in sorted(scan.ambiguous.items()):
        warn(f"task{task}: several repos claim it ({_names(repos)}); skipped, keep only one of them in SRC")
    if not scan.pairs:
        raise InputError(
            f"{src}: no adapter repo (a folder named …-taskNNN with {CONFIG}) pairs with a dataset repo "
            f"(a folder named taskNNN_name) by task number; found {len(scan.unpaired_adapters)} unpaired adapter "
            f"repo(s) and {len(scan.unpaired_datasets)} unpaired dataset repo(s)"
        )
    pairs = scan.pairs[:limit]
    names = {a.name: d.name for a, d in pairs}
    failed: dict[str, str] = {}
    base = _base_model([a for a, _ in pairs], failed, names)
    if base is None:
        first = next(iter(failed.values()), "")
        raise InputError(f"{src}: no adapter has a usable {CONFIG} (first problem: {first})")
    check_bank_out(out)
    bank = Bank.create(out, base_model=base, tokenizer=base)
    if bank.manifest.base_model != base:
        raise InputError(f"{out}: bank is for {bank.manifest.base_model}, not {base}; use another --out")
    bank.manifest.info.setdefault("source", SOURCE)
    report = ImportReport(bank=bank, scan=scan, failed=failed)
    changed = False  # family updates of present entries, saved at the end
    for done, (adapter, dataset) in enumerate(pairs):
        name = dataset.name
        if progress:
            progress(name, done, len(pairs))
        old = bank.entry(name) if name in bank.names else None
        if old is not None and not force and bank.adapter_path(old).is_dir() and bank.dataset_path(old).is_file():
            failed.pop(name, None)  # a bad config in SRC does not matter for an entry already imported
            report.present.append(name)
            if families is not None and name in families and old.family != families[name]:
                old.family = families[name]
                changed = True
            continue
        if name in failed:
            continue
        family = families[name] if families is not None and name in families else (old.family if old else None)
        try:
            _import_entry(bank, adapter, dataset, family)
        except InputError as exc:
            failed[name] = str(exc)
            continue
        bank.save()  # after every entry: a killed import resumes from here
        report.imported.append(name)
    if changed:
        bank.save()
    if progress:
        progress("", len(pairs), len(pairs))
    return report


def _import_entry(bank: Bank, adapter: Repo, dataset: Repo, family: str | None) -> BankEntry:
    name = dataset.name
    AdapterReader(adapter.path)  # refuse what generate could not read (no weights, DoRA, bad header, …)
    ds = read_task_dataset(dataset, name)
    entry = BankEntry(
        name=name,
        adapter_dir=f"adapters/{name}",
        dataset=f"datasets/{name}.jsonl.gz",
        family=family,
        info={
            "source": SOURCE,
            "task": adapter.task,
            "adapter_repo": adapter.name,
            "dataset_repo": dataset.name,
            "examples": {s: len(ds.splits[s]) for s in SPLITS},
        },
    )
    with atomic_dir(bank.adapter_path(entry), force=True) as tmp:
        for path in _adapter_files(adapter.path):
            shutil.copyfile(path, tmp / path.name)  # follows hub-cache symlinks: a real copy
            if (tmp / path.name).stat().st_size != path.stat().st_size:
                raise InputError(f"{path}: changed while being copied; re-run the import")
    save_dataset(ds, bank.dataset_path(entry))
    bank.add(entry)
    return entry
