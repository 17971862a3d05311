"""The pipeline: dataset → sketch → distances → coefficients → combination → adapter.

`generate` is what `lorablend generate` runs. The combination streams over the
bank one module at a time and reads only adapters with a nonzero coefficient,
so memory stays at a few modules whatever the bank's size.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .adapter import AdapterReader, write_adapter
from .atomic import atomic_dir, write_json
from .bank import Bank
from .coefficients import OPERATORS, NeuralOperator, coefficients
from .combine import METHODS, Factors, combine
from .dataset import Dataset, load_dataset
from .distances import METRICS, measure
from .errors import InputError, suggest
from .sketch import SKETCHES, BankSketches, Sketcher, index_dir, load_sketches

PROVENANCE = "lorablend.json"


@dataclass(frozen=True)
class Setting:
    """One way to turn a dataset into an adapter."""

    sketch: str = "tokens"
    metric: str = "js"
    operator: str = "normalized"
    combine: str = "svd"
    temperature: float = 1.0
    top_k: int | None = None
    rank: int | None = None  # None: the bank's largest rank

    def check(self) -> None:
        for value, choices, what in ((self.sketch, SKETCHES, "sketch"), (self.metric, METRICS, "metric"),
                                     (self.operator, OPERATORS, "operator"), (self.combine, METHODS, "combine")):
            if value not in choices:
                raise suggest(value, choices, what)
        if not self.temperature > 0:
            raise InputError(f"--temperature must be > 0, got {self.temperature}")
        if self.rank is not None and self.rank < 1:
            raise InputError(f"--rank must be >= 1, got {self.rank}")

    @property
    def label(self) -> str:
        parts = [self.sketch, self.metric, self.operator, self.combine, f"T{self.temperature:g}"]
        return "/".join(parts + ([f"top{self.top_k}"] if self.top_k else []))


@dataclass
class Provenance:
    """`lorablend.json` beside the PEFT files: how the adapter was made."""

    lorablend_version: str
    dataset: str
    dataset_sha256: str
    bank: str
    bank_manifest_sha256: str
    sketch: str
    metric: str
    operator: str
    temperature: float
    top_k: int | None
    combine: str
    rank: int
    excluded: list[str]
    coefficients: dict[str, float]
    seed: int = 0
    timings: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- #
# Distances and coefficients
# --------------------------------------------------------------------------- #


def query_sketch(bank: Bank, sketch: str, dataset: Dataset):
    from .sketch import read_manifest

    manifest = read_manifest(bank)
    sketcher = Sketcher(bank.manifest.tokenizer, manifest.encoder if manifest else bank.manifest.base_model)
    return sketcher.sketch(sketch, dataset, manifest)


def distances_to_bank(sk: BankSketches, metric: str, query, seed: int = 0) -> np.ndarray:
    bank_side = sk.counts if sk.counts is not None else sk.clouds
    return measure(metric, query, bank_side, codebook=sk.codebook, seed=seed)


def exclusions(bank: Bank, dataset: Dataset, exclude: list[str], exclude_family: bool) -> list[str]:
    """Entries to leave out: those named, the one trained on this very dataset, and with
    `exclude_family` every entry sharing a family with those."""
    named = set(exclude)
    unknown = named - set(bank.names)
    if unknown:
        raise InputError(f"--exclude names no bank entry: {', '.join(sorted(unknown))}")
    same = {e.name for e in bank.entries if e.files.get(e.dataset) == dataset.sha256 or e.name == dataset.name}
    out = named | same
    if exclude_family:
        families = {bank.entry(n).family for n in out} - {None}
        out |= {e.name for e in bank.entries if e.family in families}
    return sorted(out)


def meta_path(bank: Bank, sketch: str, metric: str) -> Path:
    return index_dir(bank) / f"neural-{sketch}-{metric}"


def coefficient_row(bank: Bank, setting: Setting, d: np.ndarray, excluded: list[str]) -> np.ndarray:
    d = np.where(np.isin(bank.names, excluded), np.inf, d)
    neural = NeuralOperator.load(meta_path(bank, setting.sketch, setting.metric)) if setting.operator == "neural" else None
    return coefficients(d, setting.operator, setting.temperature, setting.top_k, neural)


# --------------------------------------------------------------------------- #
# Combination, streamed module by module
# --------------------------------------------------------------------------- #


def open_readers(bank: Bank, names: list[str]) -> dict[str, AdapterReader]:
    readers = {n: AdapterReader(bank.adapter_path(bank.entry(n))) for n in names}
    check_compatible(bank, readers)
    return readers


def check_compatible(bank: Bank, readers: dict[str, AdapterReader]) -> None:
    """Refuse what cannot be combined: other base models, differing module sets or shapes."""
    base = bank.manifest.base_model
    first_name, first = next(iter(readers.items()))
    for name, r in readers.items():
        if r.spec.base_model and base and Path(r.spec.base_model).name.lower() != Path(base).name.lower():
            raise InputError(f"entry {name}: adapter is for base model {r.spec.base_model}, the bank is for {base}; remove it")
        if r.modules != first.modules:
            diff = sorted(set(first.modules) ^ set(r.modules))
            raise InputError(
                f"entry {name}: target modules differ from entry {first_name} (e.g. {diff[0]}); "
                "all bank adapters must adapt the same modules"
            )


def combine_modules(readers: dict[str, AdapterReader], coefs: dict[str, float], method: str, rank: int | None):
    """Yield (module, combined Factors) for every module, reading one module of each adapter at a time."""
    names = [n for n, c in coefs.items() if c > 0]
    first = readers[names[0]]
    for module in first.modules:
        factors = [readers[n].factors(module) for n in names]
        shapes = {(f.A.shape[1], f.B.shape[0]) for f in factors}
        if len(shapes) > 1:
            raise InputError(f"module {module}: adapters have different shapes {sorted(shapes)}; they are not for one base model")
        try:
            yield module, combine(method, factors, [coefs[n] for n in names], rank)
        except ValueError as exc:
            raise InputError(f"module {module}: {exc}") from None


def bank_rank(readers: dict[str, AdapterReader]) -> int:
    return max(r.spec.r for r in readers.values())


# --------------------------------------------------------------------------- #
# The whole pipeline
# --------------------------------------------------------------------------- #


@dataclass
class Result:
    out: Path
    provenance: Provenance
    seconds: float


def generate(
    bank: Bank,
    dataset: Dataset,
    out: str | Path,
    setting: Setting = Setting(),
    *,
    exclude: list[str] = (),
    exclude_family: bool = False,
    force: bool = False,
    seed: int = 0,
    dtype: str = "float32",
) -> Result:
    """Build an adapter for `dataset` from `bank` and write it to `out` (atomically)."""
    t0 = time.perf_counter()
    setting.check()
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out}: already exists; choose another --out or pass --force to replace it")
    excluded = exclusions(bank, dataset, list(exclude), exclude_family)
    _, sk = load_sketches(bank, setting.sketch)
    timings = {}
    query = query_sketch(bank, setting.sketch, dataset)
    timings["sketch_s"] = time.perf_counter() - t0
    d = distances_to_bank(sk, setting.metric, query, seed)
    c = coefficient_row(bank, setting, d, excluded)
    timings["distances_s"] = time.perf_counter() - t0 - timings["sketch_s"]
    coefs = {n: float(w) for n, w in zip(bank.names, c)}
    readers = open_readers(bank, [n for n, w in coefs.items() if w > 0])
    rank = setting.rank or bank_rank(readers)
    t1 = time.perf_counter()
    modules = dict(combine_modules(readers, coefs, setting.combine, rank))
    timings["combine_s"] = time.perf_counter() - t1
    prov = Provenance(
        lorablend_version=__version__,
        dataset=Path(dataset.source).name if dataset.source else dataset.name,
        dataset_sha256=dataset.sha256,
        bank=str(bank.root),
        bank_manifest_sha256=bank.sha256,
        sketch=setting.sketch,
        metric=setting.metric,
        operator=setting.operator,
        temperature=setting.temperature,
        top_k=setting.top_k,
        combine=setting.combine,
        rank=max(f.rank for f in modules.values()),
        excluded=excluded,
        coefficients=coefs,
        seed=seed,
    )
    write_output(out, modules, bank.manifest.base_model, prov, force=force, dtype=dtype)
    seconds = time.perf_counter() - t0
    return Result(out=out, provenance=prov, seconds=seconds)


def write_output(out: Path, modules: dict[str, Factors], base_model: str, prov: Provenance, *, force: bool, dtype: str) -> None:
    """The PEFT files plus lorablend.json, all-or-nothing. Timings are left out of the file so reruns are byte-identical."""
    try:
        with atomic_dir(out, force=force) as tmp:
            write_adapter(tmp, modules, base_model, dtype=dtype)
            write_json(tmp / PROVENANCE, {k: v for k, v in asdict(prov).items() if k != "timings"})
    except PermissionError as exc:
        raise InputError(f"{out}: cannot write there ({exc.strerror}); choose a writable --out") from None
    except FileExistsError:
        raise InputError(f"{out}: already exists; choose another --out or pass --force to replace it") from None
