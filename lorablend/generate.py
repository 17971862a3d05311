"""The pipeline: dataset → sketch → distances → coefficients → combination → adapter.

`generate` is what `lorablend generate` runs. The combination streams over the
bank one module at a time and reads only adapters with a nonzero coefficient,
so memory stays at a few modules whatever the bank's size.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import __version__
from .adapter import AdapterReader, check_shapes, write_adapter
from .atomic import atomic_dir, write_json
from .bank import Bank, check_output
from .coefficients import OPERATORS, NeuralOperator, check_count, coefficients, keep_top_k
from .combine import METHODS, Factors, combine
from .dataset import Dataset
from .distances import METRICS, measure
from .errors import InputError, LorablendError, NoGain, suggest
from .ce import CE_EXAMPLES, FirstOrderScorer, MixtureScorer
from .sketch import SKETCHES, BankSketches, Sketcher, index_dir, load_sketches
from .validate import FEW_EXAMPLES, Verdict, total_examples

PROVENANCE = "lorablend.json"
UNIONS = tuple(f"grad+{m}" for m in METRICS)  # retrievers: first-order top m/2 ∪ the distance's top m/2
ALL_METRICS = METRICS + ("ce", "grad") + UNIONS
ALL_OPERATORS = OPERATORS + ("fit",)
FIT_CANDIDATES = 16


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
    rerank: int | None = None  # keep this many by (sketch, metric), then rank them by `ce`
    ce_examples: int = CE_EXAMPLES
    fit_budget: int = 40

    def check(self) -> None:
        for value, choices, what in ((self.sketch, SKETCHES, "sketch"), (self.metric, ALL_METRICS, "metric"),
                                     (self.operator, ALL_OPERATORS, "operator"), (self.combine, METHODS, "combine")):
            if value not in choices:
                raise suggest(value, choices, what)
        if not self.temperature > 0:
            raise InputError(f"--temperature must be > 0, got {self.temperature}")
        for name in ("top_k", "rank", "rerank", "ce_examples", "fit_budget"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.rerank and self.metric == "ce":
            raise InputError("--rerank needs a retriever --metric (wd, kl, js, mmd, grad or grad+js ...) to retrieve "
                             "candidates with")
        if self.metric in UNIONS and not self.rerank:
            raise InputError(f"--metric {self.metric} retrieves candidates for --rerank; give --rerank M (e.g. 8)")
        if self.operator == "neural" and (self.distance != self.metric or self.rerank):
            raise InputError("the neural operator is fitted on a distributional metric; drop --rerank / --metric "
                             f"{self.metric}")

    def capped(self, candidates: int) -> "Setting":
        """The setting with --rerank at most `candidates` (a fixed default meeting a smaller bank; an explicit
        --rerank above the bank is refused instead, by `generate`)."""
        return replace(self, rerank=max(1, min(self.rerank, candidates))) if self.rerank else self

    @property
    def distance(self) -> str | None:
        """The distributional metric the setting measures (js for grad+js), None for ce and grad."""
        return self.metric.removeprefix("grad+") if self.metric not in ("ce", "grad") else None

    @property
    def first_order(self) -> bool:
        """Whether the setting ranks the bank by the first-order change of the examples' loss (grad, grad+…)."""
        return self.metric == "grad" or self.metric in UNIONS

    @property
    def uses_model(self) -> bool:
        """Whether the base model must score candidates on labelled examples (ce, grad, rerank, fit)."""
        return self.metric == "ce" or self.first_order or bool(self.rerank) or self.operator == "fit"

    @property
    def label(self) -> str:
        parts = [self.sketch, self.metric, self.operator, self.combine, f"T{self.temperature:g}"]
        extra = [f"top{self.top_k}"] if self.top_k else []
        extra += [f"rerank{self.rerank}"] if self.rerank else []
        return "/".join(parts + extra)


PAPER_SETTING = Setting()  # the paper's input-token JS softmin, with lorablend's exact combination
# The bench's best at its cost on labelled examples (docs/RESULTS-labelled.md, README "Which setting"): the 4 bank
# adapters with the lowest first-order loss change (one backward pass) and the 4 nearest by answer-token JS, then the
# one of those with the lowest ce.
DEFAULT_SETTING = Setting(sketch="target-tokens", metric="grad+js", top_k=1, rerank=8)


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
    rerank: int | None = None
    ce_examples: int | None = None  # labelled train examples scored (ce, rerank, fit)
    fit_budget: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    calibration: dict | None = None  # --auto: the (T, top-k) chosen on the bank and their reconstruction loss
    validation: dict | None = None  # the candidates' scores on held-out examples and the one written (validate.py)
    refinement: dict | None = None  # --refine-steps: the training steps run from the blend and their losses


# --------------------------------------------------------------------------- #
# Distances and coefficients
# --------------------------------------------------------------------------- #


def query_sketch(bank: Bank, sketch: str, dataset: Dataset):
    from .sketch import read_manifest

    manifest = read_manifest(bank)
    sketcher = Sketcher(bank.manifest.tokenizer, manifest.encoder if manifest else bank.manifest.base_model)
    return sketcher.sketch(sketch, dataset, manifest)


def check_vocab(bank: Bank, sketch: str, sk: BankSketches, query) -> None:
    """A token histogram must have the index's width: else the tokenizer changed since the bank was indexed."""
    if sk.counts is not None and np.shape(query)[-1] != sk.counts.shape[1]:
        raise InputError(
            f"tokenizer {bank.manifest.tokenizer} has {np.shape(query)[-1]} tokens but the '{sketch}' index has "
            f"{sk.counts.shape[1]}; re-index with `lorablend bank index {bank.root} --sketch {sketch}`"
        )


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


def coefficient_row(bank: Bank, setting: Setting, d: np.ndarray, excluded: list[str],
                    dataset: Dataset | None = None, neural: NeuralOperator | None = None,
                    make_scorer=None, first_order=None) -> np.ndarray:
    """Distances → coefficients, with the model-based steps (ce, grad, rerank, fit) when the setting asks.

    `neural` replaces the operator stored in the index, `make_scorer(names)` the MixtureScorer over
    those candidates and `first_order(names)` their first-order scores: `lorablend bench` fits one
    operator per held-out entry (never scored on an entry it was trained on) and slices ce and grad
    values it computed once per entry."""
    d = np.where(np.isin(bank.names, excluded), np.inf, np.asarray(d, dtype=np.float64))
    if not setting.uses_model:
        if setting.operator == "neural" and neural is None:
            neural = NeuralOperator.load(meta_path(bank, setting.sketch, setting.metric))
        return coefficients(d, setting.operator, setting.temperature, setting.top_k, neural)
    if make_scorer is None or first_order is None:
        if dataset is None:
            raise InputError("metrics ce and grad, --rerank and operator fit need the dataset's labelled examples")
        model = _shared_model(bank)
        # (the adapters are opened before the model loads: a damaged one is reported without that wait)
        make_scorer = make_scorer or (lambda names: mixture_scorer(bank, names, dataset, setting.ce_examples,
                                                                   readers=open_readers(bank, names), model=model()))
        first_order = first_order or (lambda names: first_order_row(bank, names, dataset, setting.ce_examples,
                                                                    readers=open_readers(bank, names), model=model()))
    usable, g = np.flatnonzero(np.isfinite(d)), None
    if setting.first_order:
        g = np.full_like(d, np.inf)
        g[usable] = first_order([bank.names[i] for i in usable])
    if setting.metric == "grad" and not setting.rerank:
        return coefficients(g, setting.operator, setting.temperature, setting.top_k)
    if setting.metric == "ce":
        candidates = usable
    else:
        candidates = retrieve(setting.metric, d, g, setting.rerank or setting.top_k or FIT_CANDIDATES)
    scorer = make_scorer([bank.names[i] for i in candidates])
    try:
        if setting.metric == "ce" or setting.rerank:
            d = np.full_like(d, np.inf)
            d[candidates] = scorer.losses()
        if setting.operator != "fit":
            return coefficients(d, setting.operator, setting.temperature, setting.top_k)
        start = coefficients(d, "normalized", setting.temperature, setting.top_k)
        c = np.zeros_like(d)
        c[candidates] = scorer.fit(start[candidates], budget=setting.fit_budget)
        return c
    finally:
        scorer.close()


def retrieve(metric: str, d: np.ndarray, g: np.ndarray | None, m: int) -> np.ndarray:
    """The indices of the (at most) m candidates a retriever keeps: the m nearest by the distance `d`, the m
    lowest first-order scores `g` (metric grad), or the union of both halves (grad+…); inf = excluded."""
    row = g if metric == "grad" else retrieve_union(g, d, m) if metric in UNIONS else d
    return np.flatnonzero(np.isfinite(keep_top_k(row, m)))


def retrieve_union(g: np.ndarray, d: np.ndarray, m: int) -> np.ndarray:
    """The first-order top ⌈m/2⌉ ∪ the distance's top ⌊m/2⌋ (at most m candidates: fewer when they
    agree), as a row whose finite entries are the candidates: the two retrievers miss different ones."""
    out = np.full_like(d, np.inf)
    for row, k in ((g, (m + 1) // 2), (d, m // 2)):
        if k:
            out[np.isfinite(keep_top_k(row, k))] = 0.0
    return out


def check_auto(setting: Setting) -> None:
    """`--auto` picks T and top-k for a softmin over the bank's own distances: other operators and ce have none."""
    if setting.operator not in ("attentional", "normalized"):
        raise InputError(f"--auto calibrates temperature and top-k for the attentional or normalized operator, not "
                         f"'{setting.operator}'; drop --auto or choose one of those")
    if setting.distance is None:
        raise InputError(f"--auto calibrates on the distances between the bank's datasets, which metric {setting.metric} "
                         "does not have; give --temperature and --top-k instead, or use --rerank with a distributional metric")


def calibrated(bank: Bank, setting: Setting, excluded: list[str], exclude_family: bool = False):
    """The setting (passed by `check_auto`) with the (T, top-k) that best rebuild each bank adapter from the others
    (`calibrate`), the excluded entries (and with `exclude_family` each entry's family) left out as the bench does."""
    from .calibrate import calibrate
    from .metafit import bank_matrices, space_for

    D, G = bank_matrices(bank, setting.sketch, setting.distance, space_for(setting.combine))
    out = set(excluded)
    usable = [i for i, n in enumerate(bank.names) if n not in out]
    families = [e.family for e in bank.entries] if exclude_family else None
    cal = calibrate(D, G, usable, setting.operator, families)
    return replace(setting, temperature=cal.temperature, top_k=cal.top_k), cal


def mixture_scorer(bank: Bank, names: list[str], dataset: Dataset, k: int, *, model=None,
                   readers: dict | None = None) -> MixtureScorer:
    """A scorer of these candidates on the first k train examples (never another split). `model` and
    `readers` let a caller that scores many datasets (the bench) load the base model and bank once."""
    from .models import load_model, load_tokenizer

    examples = dataset.split("train")[:k]
    readers = open_readers(bank, names) if readers is None else readers
    model = load_model(bank.manifest.base_model) if model is None else model
    return MixtureScorer(model, load_tokenizer(bank.manifest.base_model), [readers[n] for n in names], examples)


def first_order_scorer(bank: Bank, modules: list[str], dataset: Dataset, k: int, model) -> FirstOrderScorer:
    """The backward pass on the first k train examples (never another split), on a loaded base model."""
    from .models import load_tokenizer

    return FirstOrderScorer(model, load_tokenizer(bank.manifest.base_model), modules, dataset.split("train")[:k])


def first_order_row(bank: Bank, names: list[str], dataset: Dataset, k: int, *, model=None,
                    readers: dict | None = None) -> np.ndarray:
    """First-order Δce of these adapters on the first k train examples: one backward pass, then the bank
    streamed a module at a time."""
    from .models import load_model

    readers = open_readers(bank, names) if readers is None else readers
    model = load_model(bank.manifest.base_model) if model is None else model
    scorer = first_order_scorer(bank, readers[names[0]].modules, dataset, k, model)
    return scorer.scores([readers[n] for n in names])


def _shared_model(bank: Bank):
    """The base model, loaded on first use and then shared (grad and the rerank after it need one copy)."""
    from functools import cache

    from .models import load_model

    return cache(lambda: load_model(bank.manifest.base_model))


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


def combine_modules(readers: dict[str, AdapterReader], coefs: dict[str, float], method: str, rank: int | None,
                    threads: int | None = None):
    """Yield (module, combined Factors) for every module, in order.

    Each module is read from every adapter with a nonzero coefficient, combined, and its
    pages released, so memory holds a few modules of the bank, never the bank. `threads`
    modules (default: the usable cores) are combined at once, each with single-threaded BLAS:
    numpy and LAPACK release the GIL, and multi-threaded BLAS spins at barriers, which made
    an svd combination 6x slower beside one other busy process (docs/PERFORMANCE.md).
    """
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    names = [n for n, c in coefs.items() if c > 0]
    weights = [coefs[n] for n in names]
    modules = readers[names[0]].modules

    def one(module: str) -> Factors:
        factors = [readers[n].factors(module) for n in names]
        check_shapes(module, [f"entry {n}" for n in names], factors)
        try:
            return combine(method, factors, weights, rank)
        except ValueError as exc:
            raise InputError(f"module {module}: {exc}") from None

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, threads or cores)
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        ahead = [pool.submit(one, m) for m in modules[:workers]]
        for i, module in enumerate(modules):
            out = ahead.pop(0).result()
            if i + workers < len(modules):
                ahead.append(pool.submit(one, modules[i + workers]))
            for n in names:  # in module order, so no page a running worker still reads is dropped
                readers[n].release(module)
            yield module, out


def bank_rank(readers: dict[str, AdapterReader]) -> int:
    return max(r.spec.r for r in readers.values())


def combination(bank: Bank, coefs: dict[str, float], combine: str, rank: int | None = None, *,
                readers: dict | None = None) -> dict[str, Factors]:
    """Every module's combined factors; only entries with a nonzero coefficient are read."""
    used = [n for n, w in coefs.items() if w > 0]
    readers = open_readers(bank, used) if readers is None else {n: readers[n] for n in used}
    return dict(combine_modules(readers, coefs, combine, rank or bank_rank(readers)))


def write_combination(bank: Bank, coefs: dict[str, float], out: Path, combine: str, rank: int | None = None, *,
                      readers: dict | None = None, provenance: Provenance | None = None, force: bool = False,
                      dtype: str = "float32") -> int:
    """Combine the bank with `coefs`, write the PEFT adapter to `out` and return its rank.

    The step after the coefficients, used by `generate` (`lorablend bench` calls `combination`
    directly, with readers that keep the factors in memory, and never writes its adapters).
    `provenance`, when given, is written as lorablend.json with the output rank filled in.
    """
    modules = combination(bank, coefs, combine, rank, readers=readers)
    out_rank = max(f.rank for f in modules.values())
    if provenance is not None:
        provenance.rank = out_rank
    write_output(out, modules, bank.manifest.base_model, provenance, force=force, dtype=dtype)
    return out_rank


# --------------------------------------------------------------------------- #
# The whole pipeline
# --------------------------------------------------------------------------- #


@dataclass
class Result:
    out: Path
    provenance: Provenance
    seconds: float
    verdict: "Verdict | None" = None


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
    verify: bool = False,
    auto: bool = False,
    validate: bool = False,
    backend: str = "auto",
    require_gain: bool = False,
    refine_steps: int = 0,
) -> Result:
    """Build an adapter for `dataset` from `bank` and write it to `out` (atomically).

    `verify`: check the full sha256 (and tensors) of every bank entry read against the manifest first.
    `auto`: replace the setting's temperature and top-k by those calibrated on the bank (`calibrated`).
    `validate`: keep up to 32 labelled examples apart, score the setting's pick, the nearest adapter, the
    uniform average and no adapter on them (with `backend`), and write the best adapter; the verdict is
    in `Result.verdict` and lorablend.json (`lorablend generate` validates unless told --no-validate).
    `require_gain`: raise NoGain, writing nothing, when no adapter beats the base model there.
    `refine_steps`: then train the written adapter for that many steps of the bank's recipe on the train examples
    (never the validation ones): a gradient step, off by default (`train.train_factors`).
    """
    t0 = time.perf_counter()
    setting.check()
    if auto:
        check_auto(setting)
    bank.check_nonempty()
    out = Path(out)
    check_out(out, force, [bank.root] + ([Path(dataset.source)] if dataset.source else []))
    excluded = exclusions(bank, dataset, list(exclude), exclude_family)
    full, held, where = dataset, None, None
    if validate:
        from .validate import split_validation

        dataset, held, where = split_validation(dataset, seed)
    if set(bank.names) <= set(excluded):
        shown = ", ".join(excluded[:6]) + ("…" if len(excluded) > 6 else "")
        raise InputError(
            f"{bank.root}: no bank entry is left to combine: all {len(bank.names)} are excluded (excluded: {shown}; "
            "the entry trained on this very dataset, --exclude and --exclude-family leave entries out); "
            "use a bank with more entries"
        )
    if setting.rerank:
        check_count("--rerank", setting.rerank, len(bank.names) - len(excluded))
    if refine_steps < 0:
        raise InputError(f"--refine-steps must be >= 0, got {refine_steps}")
    timings, calibration = {}, None
    # (metrics ce and grad: every candidate is scored by the model)
    d = np.zeros(len(bank.names)) if setting.distance is None else _distances(bank, setting, dataset, seed)
    timings["distances_s"] = time.perf_counter() - t0
    if auto:
        setting, cal = calibrated(bank, setting, excluded, exclude_family)
        calibration = asdict(cal)
        timings["calibrate_s"] = time.perf_counter() - t0 - sum(timings.values())
    if verify and setting.uses_model:  # the model-based steps read every candidate adapter
        verify_entries(bank, [n for n in bank.names if n not in excluded])
    c = coefficient_row(bank, setting, d, excluded, dataset)
    timings["coefficients_s"] = time.perf_counter() - t0 - sum(timings.values())
    coefs = {n: float(w) for n, w in zip(bank.names, c)}
    verdict = None
    if validate:
        verdict, coefs = validated(bank, setting, coefs, dataset, held, where, excluded, seed,
                                   uncertain=total_examples(full) < FEW_EXAMPLES, backend=backend)
        timings["validate_s"] = time.perf_counter() - t0 - sum(timings.values())
        if require_gain and not verdict.helps:
            raise NoGain(f"{out}: not written: on {verdict.n} held-out examples no adapter beat the base model "
                         f"(best {verdict.written} {verdict.scores[verdict.written]:.3f}, base {verdict.base:.3f}); "
                         "use the base model, or drop --require-gain to write the best adapter anyway")
    if verify and not setting.uses_model:
        verify_entries(bank, [n for n, w in coefs.items() if w > 0])
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
        rank=0,  # filled in by write_combination
        excluded=excluded,
        coefficients=coefs,
        seed=seed,
        rerank=setting.rerank,
        ce_examples=setting.ce_examples if setting.uses_model else None,
        fit_budget=setting.fit_budget if setting.operator == "fit" else None,
        timings=timings,
        calibration=calibration,
        validation=verdict.to_dict() if verdict else None,
    )
    t1 = time.perf_counter()
    if refine_steps:
        modules = combination(bank, coefs, setting.combine, setting.rank)
        timings["combine_s"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        modules, prov.refinement = refined(bank, modules, dataset, refine_steps, seed)
        prov.rank = max(f.rank for f in modules.values())
        write_output(out, modules, bank.manifest.base_model, prov, force=force, dtype=dtype)
        timings["refine_s"] = time.perf_counter() - t1
    else:
        write_combination(bank, coefs, out, setting.combine, setting.rank, provenance=prov, force=force, dtype=dtype)
        timings["combine_s"] = time.perf_counter() - t1
    seconds = time.perf_counter() - t0
    return Result(out=out, provenance=prov, seconds=seconds, verdict=verdict)


def refined(bank: Bank, modules: dict[str, Factors], dataset: Dataset, steps: int, seed: int):
    """The blend trained for `steps` steps of the bank's recipe on the dataset's train split, and the record."""
    from .models import load_model, load_tokenizer
    from .train import train_factors

    model_id = bank.manifest.base_model
    trained, record = train_factors(load_model(model_id), load_tokenizer(model_id), dataset.split("train"), steps, seed,
                                    modules)
    record.pop("seconds")  # in the timings: lorablend.json stays byte-identical across reruns
    return trained, record


NEAREST = Setting(sketch="target-tokens", metric="js", top_k=1)  # the best setting without a forward pass


def validated(bank: Bank, setting: Setting, coefs: dict[str, float], dataset: Dataset, held, where: dict,
              excluded: list[str], seed: int, *, uncertain: bool, backend: str):
    """(the verdict, the coefficients to write): the setting's pick against the nearest adapter, the uniform
    average and no adapter, on the held-out examples (`validate.validate`). Candidates equal to an earlier
    one are scored once."""
    from .validate import NO_ADAPTER, Candidate, validate

    usable = [n for n in bank.names if n not in excluded]
    nearest = dict(zip(bank.names, coefficient_row(bank, NEAREST, _distances(bank, NEAREST, dataset, seed), excluded)))
    tried = [Candidate("setting's pick", setting.label, coefs), Candidate("nearest", NEAREST.label, nearest),
             Candidate("uniform", "uniform", {n: (1 / len(usable) if n in usable else 0.0) for n in bank.names}),
             Candidate(NO_ADAPTER, "", None)]
    unique = [c for j, c in enumerate(tried) if c.coefficients is None or all(
        _kept(c.coefficients) != _kept(o.coefficients) for o in tried[:j] if o.coefficients is not None)]
    verdict = validate(bank, unique, held, where | {"seed": seed}, combine=setting.combine, rank=setting.rank,
                       uncertain=uncertain, backend=backend, seed=seed)
    return verdict, next(c.coefficients for c in unique if c.name == verdict.written)


def _kept(coefs: dict[str, float]) -> dict[str, float]:
    return {n: round(w, 9) for n, w in coefs.items() if w > 1e-9}


def _distances(bank: Bank, setting: Setting, dataset: Dataset, seed: int) -> np.ndarray:
    """The dataset's distance to every bank entry under the setting's sketch and metric (`distances_to_bank`)."""
    _, sk = load_sketches(bank, setting.sketch)  # first: a missing or stale index is reported here
    query = query_sketch(bank, setting.sketch, dataset)
    check_vocab(bank, setting.sketch, sk, query)
    return distances_to_bank(sk, setting.distance, query, seed)


def verify_entries(bank: Bank, names: list[str]) -> None:
    """`generate --verify`: the full check of `lorablend bank verify`, on the entries `generate` reads."""
    from .verify import verify_bank

    problems = verify_bank(Bank(bank.root, replace(bank.manifest, entries=[bank.entry(n) for n in names])),
                           full_hash=True)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s): see `lorablend bank verify {bank.root}`)" if len(problems) > 1 else ""
        raise InputError(f"{problems[0]}{more}")


def check_out(out: Path, force: bool, keep: list[Path] = ()) -> None:
    """Refuse an --out that cannot be written, before any work: it exists (without --force), it is a
    file, replacing it would delete the bank or the dataset, its parent is not a writable directory, or
    it lies inside a bank or has too long a name (`check_output`)."""
    if os.path.lexists(out):
        if not force:
            raise InputError(f"{out}: already exists; choose another --out or pass --force to replace it")
        if not out.is_dir():
            raise InputError(f"{out}: exists and is not a directory; --force only replaces an adapter directory: "
                             "choose another --out")
        target = out.resolve()
        for path in keep:
            path = Path(path).resolve()
            if path == target or target in path.parents:
                raise InputError(f"{out}: --force would delete {path} (the bank or the dataset); choose another --out")
    parent = out.absolute().parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{out}: cannot write there ({parent} is not a directory); choose a writable --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{out}: cannot write there ({parent} is not writable); choose a writable --out")
    check_output(out)


def write_output(out: Path, modules: dict[str, Factors], base_model: str, prov: Provenance | None, *, force: bool,
                 dtype: str) -> None:
    """The PEFT files plus lorablend.json (when `prov` is given), all-or-nothing. Timings are left out
    of the file so reruns are byte-identical."""
    try:
        with atomic_dir(out, force=force) as tmp:
            write_adapter(tmp, modules, base_model, dtype=dtype)
            if prov is not None:
                write_json(tmp / PROVENANCE, {k: v for k, v in asdict(prov).items() if k != "timings"})
    except FileExistsError as exc:
        if exc.filename is None:  # atomic_dir: the target appeared while we worked
            raise InputError(f"{out}: already exists; choose another --out or pass --force to replace it") from None
        raise InputError(f"{out}: cannot write there ({exc.strerror}: {exc.filename}); choose a writable --out") from None
    except (PermissionError, NotADirectoryError, IsADirectoryError) as exc:
        raise InputError(f"{out}: cannot write there ({exc.strerror}); choose a writable --out") from None
    except OSError as exc:  # a full disk, a quota, an I/O error: atomic_dir has removed what it wrote
        if exc.errno == errno.EROFS:
            raise InputError(f"{out}: cannot write there ({exc.strerror}); choose a writable --out") from None
        raise LorablendError(f"{out}: writing the adapter failed ({exc.strerror or exc}); nothing was written: "
                             "free some space or choose another --out") from None
