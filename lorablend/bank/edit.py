"""`lorablend bank add` and `bank remove`: a bank grows by any PEFT LoRA for its base model, with a sample of the
data it was trained on, and shrinks by name.

Everything is checked before anything is written, so a refused adapter leaves the bank byte for byte as it was. The
files go in the way `bank build` writes an entry (whole, or not at all); the index then gains the new entry's
sketches only, every other row coming from its cache."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from lorablend.adapter import CONFIG, WEIGHTS, AdapterReader, read_spec
from lorablend.bank.build import Task, Trained, portable_config, write_entry
from lorablend.bank.manifest import Bank, BankEntry
from lorablend.bank.verify import base_model_problem
from lorablend.dataset import SPLITS, Dataset, load_dataset
from lorablend.errors import InputError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")


def check_name(name: str) -> str:
    """An entry name is a file name inside the bank: nothing that could lead out of it, or hide."""
    if not NAME.match(name) or ".." in name:
        raise InputError(f"entry name {name[:80]!r}: use letters, digits, '_', '-' and '.' (not '..'), starting with "
                         "a letter or digit, at most 200 characters; choose another --name")
    return name


def add_entry(bank: Bank, adapter_dir: Path, dataset_path: Path, name: str | None = None,
              family: str | None = None) -> BankEntry:
    """Check the adapter against the bank and its dataset, then copy both in and save the manifest."""
    adapter_dir, dataset_path = Path(adapter_dir), Path(dataset_path)
    name = check_name(name or adapter_dir.resolve().name)
    if name in bank.names:
        raise InputError(f"{bank.root}: already has an entry named '{name}'; choose another --name, or remove it "
                         f"first with `lorablend bank remove {bank.root} {name}`")
    if not adapter_dir.is_dir():
        raise InputError(f"{adapter_dir}: not a directory; give a PEFT adapter dir ({CONFIG} and {WEIGHTS})")
    reader = _check_adapter(bank, adapter_dir)
    ds = _check_dataset(dataset_path, name)
    weights = (adapter_dir / WEIGHTS).read_bytes()
    config = json.loads((adapter_dir / CONFIG).read_text(encoding="utf-8"))
    info = {"source": "bank add", "r": reader.spec.r, "alpha": reader.spec.alpha,
            "examples": {s: len(ds.splits.get(s, [])) for s in SPLITS}}
    entry = write_entry(bank, Task(name, dataset_path, family), ds,
                        Trained({CONFIG: portable_config(config, bank.manifest.base_model), WEIGHTS: weights}, info))
    bank.save()
    return entry


def _check_adapter(bank: Bank, adapter_dir: Path) -> AdapterReader:
    """A plain LoRA (not DoRA or another variant) for the bank's base model, adapting the modules the bank's entries
    adapt with their shapes, with float factors free of NaN; the first problem is one InputError."""
    from lorablend.runtime.models import hub_id

    spec = read_spec(adapter_dir)  # LoRA, no DoRA / QA-LoRA / bias / modules_to_save
    base = bank.manifest.base_model
    if spec.base_model != base and hub_id(spec.base_model) != base:
        raise InputError(f"{adapter_dir / CONFIG}: {base_model_problem(spec.base_model, base)}")
    reader = AdapterReader(adapter_dir)  # the weights: complete, LoRA tensors only, a lora_B for every lora_A
    for module in reader.modules:
        reader.factors(module)  # dtype, rank against the config, NaN / Inf
    if bank.entries:
        ref_entry = bank.entries[0]
        ref = AdapterReader(bank.adapter_path(ref_entry))
        want = {m: ref.features(m) for m in ref.modules}
        got = {m: reader.features(m) for m in reader.modules}
        if set(got) != set(want):
            odd = sorted(set(got) ^ set(want))[0]
            which = "adapts" if odd in got else "does not adapt"
            raise InputError(f"{adapter_dir / WEIGHTS}: {which} module {odd}, unlike the bank's entries (e.g. "
                             f"{ref_entry.name}); every entry must adapt the same modules")
        off = next((m for m in sorted(got) if got[m] != want[m]), None)
        if off is not None:
            raise InputError(f"{adapter_dir / WEIGHTS}: module {off} maps {got[off][0]} -> {got[off][1]} features but "
                             f"the bank's entries map {want[off][0]} -> {want[off][1]}; the adapter is for another "
                             "base model")
    return reader


def _check_dataset(path: Path, name: str) -> Dataset:
    if not path.is_file():
        raise InputError(f"{path}: no such dataset file; give the examples the adapter was trained on (a sample is "
                         "enough) as .jsonl, .json, .csv or .parquet")
    ds = load_dataset(path, name=name)
    if not ds.splits.get("train"):
        raise InputError(f"{path}: no train examples; the bank compares a user's data with each entry's train split")
    return ds


def remove_entry(bank: Bank, name: str) -> None:
    """The manifest first (a bank never lists files that are gone), then the entry's files, then its index rows."""
    entry = bank.entry(name)
    bank.manifest.entries = [e for e in bank.entries if e.name != name]
    bank.save()
    shutil.rmtree(bank.adapter_path(entry), ignore_errors=True)
    bank.dataset_path(entry).unlink(missing_ok=True)


def update_index(bank: Bank, progress=None) -> list[str]:
    """Bring an existing index up to the bank's entries (new rows computed, others from the cache); the sketch kinds
    indexed, none when the bank has no index or no entries."""
    from lorablend.sketch import build_index, read_manifest

    old = read_manifest(bank)
    if old is None or not old.sketches or not bank.entries:
        return []
    build_index(bank, tuple(old.sketches), progress=progress)
    return list(old.sketches)
