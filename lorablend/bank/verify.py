"""Check a bank on disk: files against their hashes, adapters readable and consistent, datasets loadable.

`verify_bank(bank)` (full) hashes every file listed in the manifest, reads every LoRA
tensor (NaN / Inf) and loads every dataset. `verify_bank(bank, full_hash=False)` is the
cheap mode `generate` can afford on every run: files exist and are non-empty,
adapter configs parse, safetensors headers parse, and tensor shapes / dtypes / module
sets agree (all read from the headers, no tensor data).
"""

from __future__ import annotations

import gzip
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from lorablend.adapter import CONFIG, PREFIX, WEIGHTS, AdapterReader, read_spec
from lorablend.atomic import sha256_file
from lorablend.bank.manifest import MANIFEST, Bank, BankEntry
from lorablend.dataset import load_dataset
from lorablend.errors import InputError

FLOAT_DTYPES = ("F32", "BF16", "F16")
REIMPORT = "restore it, or rebuild / re-import the entry"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one bank entry: `message` says what and how to fix it."""

    entry: str
    path: Path
    message: str

    def __str__(self) -> str:
        return f"entry {self.entry}: {self.path}: {self.message}"

    def to_dict(self) -> dict:
        return {"entry": self.entry, "path": str(self.path), "message": self.message}


def _reason(exc: BaseException, *paths: Path) -> str:
    """An error's message without the leading `path: ` (the Problem names the path)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    for path in paths:
        if text.startswith(f"{path}: "):
            return text[len(f"{path}: "):]
    return text


def verify_bank(bank: Bank, full_hash: bool = True) -> list[Problem]:
    """Every problem found in `bank` (empty when it is intact), in entry order."""
    problems: list[Problem] = []
    shapes: dict[str, dict[str, tuple[int, int]]] = {}  # entry -> module -> (in features k, out features d)
    for entry in bank.entries:
        problems += _check_files(bank, entry, full_hash)
        found, adapter_problems = _check_adapter(bank, entry, full_hash)
        problems += adapter_problems
        if found is not None:
            shapes[entry.name] = found
        problems += _check_dataset(bank, entry, full_hash)
    problems += _check_consistency(bank, shapes)
    order = {name: i for i, name in enumerate(bank.names)}
    return sorted(problems, key=lambda p: order.get(p.entry, len(order)))


# --------------------------------------------------------------------------- #
# Files listed in the manifest
# --------------------------------------------------------------------------- #


def _check_files(bank: Bank, entry: BankEntry, full_hash: bool) -> list[Problem]:
    problems = []
    adir = bank.adapter_path(entry)
    if not adir.is_dir():
        problems.append(Problem(entry.name, adir, f"adapter directory is missing; {REIMPORT}"))
    if not entry.files:
        problems.append(Problem(entry.name, bank.root / MANIFEST,
                                "no file hashes recorded for the entry; rebuild / re-import it"))
    for rel, digest in entry.files.items():
        path = bank.root / rel
        if not adir.is_dir() and adir in path.parents:
            continue  # reported once, as the missing directory
        if not path.is_file():
            problems.append(Problem(entry.name, path, f"file is missing; {REIMPORT}"))
        elif path.stat().st_size == 0:
            problems.append(Problem(entry.name, path, f"file is empty; {REIMPORT}"))
        elif full_hash:
            actual = sha256_file(path)
            if actual != digest:
                problems.append(Problem(
                    entry.name, path,
                    f"sha256 mismatch (manifest {digest[:12]}…, file {actual[:12]}…): the file changed after it "
                    f"was added; {REIMPORT}",
                ))
    return problems


# --------------------------------------------------------------------------- #
# One adapter
# --------------------------------------------------------------------------- #


def _expected_rank(spec, module: str) -> int:
    """PEFT's rank for a module: the first `rank_pattern` key matching its name (as a regex), else r."""
    for key, value in spec.rank_pattern.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return int(value)
        except re.error:
            if module == key or module.endswith("." + key):
                return int(value)
    return spec.r


def _check_adapter(bank: Bank, entry: BankEntry, full: bool):
    """(module -> (k, d) read from the header, or None if unreadable; problems)."""
    adir = bank.adapter_path(entry)
    if not adir.is_dir():
        return None, []
    weights = adir / WEIGHTS
    try:
        spec = read_spec(adir)
    except InputError as exc:
        return None, [Problem(entry.name, adir / CONFIG, _reason(exc, adir / CONFIG))]
    problems: list[Problem] = []
    if spec.base_model != bank.manifest.base_model:
        problems.append(Problem(entry.name, adir / CONFIG, base_model_problem(spec.base_model, bank.manifest.base_model)))
    try:
        reader = AdapterReader(adir)
    except InputError as exc:
        return None, problems + [Problem(entry.name, weights, _reason(exc, weights, adir / CONFIG))]
    except Exception as exc:  # anything else the safetensors reader raises
        return None, problems + [Problem(entry.name, weights, f"unreadable ({_reason(exc)}); {REIMPORT}")]

    from safetensors import safe_open

    found: dict[str, tuple[int, int]] = {}
    bad: list[str] = []  # shape / dtype problems, one line per entry
    try:
        with safe_open(str(weights), framework="np") as fh:
            keys = set(fh.keys())
            for module in reader.modules:
                a_key, b_key = f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"
                if b_key not in keys:
                    bad.append(f"module {module} has lora_A but no lora_B")
                    continue
                a, b = fh.get_slice(a_key), fh.get_slice(b_key)
                a_shape, b_shape = tuple(a.get_shape()), tuple(b.get_shape())
                dtypes = {a.get_dtype(), b.get_dtype()}
                if not dtypes <= set(FLOAT_DTYPES):
                    bad.append(f"module {module} has dtype {'/'.join(sorted(dtypes))}, not one of "
                               f"{', '.join(FLOAT_DTYPES)}")
                if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                    bad.append(f"module {module} has inconsistent shapes A{list(a_shape)} B{list(b_shape)} "
                               "(need A r×k, B d×r)")
                    continue
                rank = _expected_rank(spec, module)
                if a_shape[0] != rank:
                    bad.append(f"module {module} has rank {a_shape[0]} but {CONFIG} says {rank} "
                               "(PEFT would refuse to load it)")
                found[module] = (a_shape[1], b_shape[0])
    except Exception as exc:  # a header AdapterReader accepted but safetensors cannot slice
        return None, problems + [Problem(entry.name, weights, f"unreadable ({_reason(exc)}); {REIMPORT}")]
    if bad:
        more = f" (and {len(bad) - 1} more problem(s) like it)" if len(bad) > 1 else ""
        problems.append(Problem(entry.name, weights, f"{bad[0]}{more}; the adapter is corrupt: {REIMPORT}"))
    if full and not bad:
        corrupt: list[str] = []
        for module in reader.modules:
            try:
                reader.factors(module)
            except InputError as exc:
                corrupt.append(_reason(exc, weights))
            except Exception as exc:  # a tensor whose data cannot be read
                corrupt.append(f"module {module} cannot be read ({_reason(exc)})")
        if corrupt:
            more = f" (and {len(corrupt) - 1} more module(s))" if len(corrupt) > 1 else ""
            first = corrupt[0].split("; the adapter is corrupt")[0]
            problems.append(Problem(entry.name, weights, f"{first}{more}; the adapter is corrupt: {REIMPORT}"))
    return found, problems


def base_model_problem(recorded: str, bank_base: str) -> str:
    """Why an adapter trained for another base model (or naming none, or a path) does not belong in the bank."""
    said = f"names base model '{recorded}'" if recorded else "names no base model (base_model_name_or_path)"
    return (f"{said} but the bank's is '{bank_base}'; if it was trained on '{bank_base}', set its "
            "base_model_name_or_path to that id (a local path names a model on one machine only), else remove it")


# --------------------------------------------------------------------------- #
# Across adapters
# --------------------------------------------------------------------------- #


def _check_consistency(bank: Bank, shapes: dict[str, dict[str, tuple[int, int]]]) -> list[Problem]:
    """All entries adapt the same modules, with the same in / out features (the majority's)."""
    problems: list[Problem] = []
    if len(shapes) < 2:
        return problems
    sets = Counter(frozenset(m) for m in shapes.values())
    top = max(sets.values())
    reference = next(frozenset(m) for m in shapes.values() if sets[frozenset(m)] == top)
    for name, modules in shapes.items():
        weights = bank.adapter_path(bank.entry(name)) / WEIGHTS
        extra, missing = sorted(set(modules) - reference), sorted(reference - set(modules))
        if extra or missing:
            parts = []
            if extra:
                parts.append(f"adapts {len(extra)} module(s) the other entries do not (e.g. {extra[0]})")
            if missing:
                parts.append(f"lacks {len(missing)} module(s) the other entries adapt (e.g. {missing[0]})")
            problems.append(Problem(
                name, weights,
                f"{' and '.join(parts)}; every entry must adapt the same modules: rebuild it with the bank's "
                "target modules or remove it",
            ))
    dims: dict[str, Counter] = {}
    for modules in shapes.values():
        for module, kd in modules.items():
            dims.setdefault(module, Counter())[kd] += 1
    for name, modules in shapes.items():
        off = [(m, kd, dims[m].most_common(1)[0][0]) for m, kd in sorted(modules.items())
               if kd != dims[m].most_common(1)[0][0]]
        if off:
            module, (k, d), (k0, d0) = off[0]
            more = f" (and {len(off) - 1} more module(s))" if len(off) > 1 else ""
            problems.append(Problem(
                name, bank.adapter_path(bank.entry(name)) / WEIGHTS,
                f"module {module} maps {k} -> {d} features but the other entries' map {k0} -> {d0}{more}; "
                "the adapter is for another base model: remove it from the bank",
            ))
    return problems


# --------------------------------------------------------------------------- #
# One dataset
# --------------------------------------------------------------------------- #


def _check_dataset(bank: Bank, entry: BankEntry, full: bool) -> list[Problem]:
    path = bank.dataset_path(entry)
    if not path.is_file():
        if entry.dataset in entry.files:
            return []  # already reported as a missing file
        return [Problem(entry.name, path, f"dataset file is missing; {REIMPORT}")]
    if path.stat().st_size == 0:
        return [] if entry.dataset in entry.files else [Problem(entry.name, path, f"file is empty; {REIMPORT}")]
    if not full:
        if path.suffix == ".gz":
            with open(path, "rb") as fh:
                if fh.read(2) != b"\x1f\x8b":
                    return [Problem(entry.name, path, f"not a gzip file; {REIMPORT}")]
        return []
    try:
        ds = load_dataset(path, name=entry.name)
    except InputError as exc:
        return [Problem(entry.name, path, f"{_reason(exc, path)}; {REIMPORT}")]
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        return [Problem(entry.name, path, f"unreadable ({_reason(exc)}); {REIMPORT}")]
    if not ds.splits.get("train"):
        return [Problem(entry.name, path, f"no train examples; {REIMPORT}")]
    return []


def verify_entries(bank: Bank, names: list[str]) -> None:
    """`generate --verify`: the full check of `lorablend bank verify`, on the entries `generate` reads."""

    problems = verify_bank(Bank(bank.root, replace(bank.manifest, entries=[bank.entry(n) for n in names])),
                           full_hash=True)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s): see `lorablend bank verify {bank.root}`)" if len(problems) > 1 else ""
        raise InputError(f"{problems[0]}{more}")
