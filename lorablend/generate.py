"""The pipeline: dataset → sketch → distances → coefficients → combination → adapter.

`generate` is what `lorablend generate` runs. The combination streams over the
bank one module at a time and reads only adapters with a nonzero coefficient,
so memory stays at a few modules whatever the bank's size.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from lorablend import __version__
from lorablend.bank.combination import combination, open_readers
from lorablend.bank.fit import meta_path
from lorablend.bank.manifest import Bank
from lorablend.bank.verify import verify_entries
from lorablend.coefficients import NeuralOperator, apply_operator, check_count, keep_top_k
from lorablend.combine import Factors
from lorablend.dataset import Dataset
from lorablend.errors import InputError, NoGain
from lorablend.output import Provenance, check_out, write_combination, write_output
from lorablend.runtime.scoring import FIRST_ORDER_PASSES, FirstOrderScorer, MixtureScorer
from lorablend.settings import FIT_CANDIDATES, NEAREST, UNIONS, Setting
from lorablend.sketch import check_vocab, distances_to_bank, load_sketches, query_sketch
from lorablend.validate import FEW_EXAMPLES, Verdict, total_examples

# --------------------------------------------------------------------------- #
# Distances and coefficients
# --------------------------------------------------------------------------- #


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


def coefficient_row(bank: Bank, setting: Setting, d: np.ndarray, excluded: list[str],
                    dataset: Dataset | None = None, neural: NeuralOperator | None = None,
                    make_scorer=None, first_order=None, spent: dict | None = None) -> np.ndarray:
    """Distances → coefficients, with the model-based steps (ce, grad, rerank, fit) when the setting asks.

    `neural` replaces the operator stored in the index, `make_scorer(names)` the MixtureScorer over
    those candidates and `first_order(names)` their first-order scores: `lorablend bench` fits one
    operator per held-out entry (never scored on an entry it was trained on) and slices ce and grad
    values it computed once per entry. `spent["passes"]` counts the forward-pass equivalents run here."""
    spent = {} if spent is None else spent
    spent.setdefault("passes", 0.0)
    d = np.where(np.isin(bank.names, excluded), np.inf, np.asarray(d, dtype=np.float64))
    if not setting.uses_model:
        if setting.operator == "neural" and neural is None:
            neural = NeuralOperator.load(meta_path(bank, setting.sketch, setting.metric))
        return apply_operator(d, setting.operator, setting.temperature, setting.top_k, neural)
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
        spent["passes"] += FIRST_ORDER_PASSES
    if setting.metric == "grad" and not setting.rerank:
        return apply_operator(g, setting.operator, setting.temperature, setting.top_k)
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
            return apply_operator(d, setting.operator, setting.temperature, setting.top_k)
        start = apply_operator(d, "normalized", setting.temperature, setting.top_k)
        c = np.zeros_like(d)
        c[candidates] = scorer.fit(start[candidates], budget=setting.fit_budget)
        return c
    finally:
        spent["passes"] += scorer.passes
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


def calibrated(bank: Bank, setting: Setting, excluded: list[str], exclude_family: bool = False):
    """The `auto` setting with the (T, top-k) that best rebuild each bank adapter from the others
    (`calibrate`), the excluded entries (and with `exclude_family` each entry's family) left out as the bench does."""
    from lorablend.bank.calibrate import calibrate
    from lorablend.bank.matrices import bank_matrices

    D, G = bank_matrices(bank, setting.sketch, setting.distance, setting.space)
    out = set(excluded)
    usable = [i for i, n in enumerate(bank.names) if n not in out]
    families = [e.family for e in bank.entries] if exclude_family else None
    cal = calibrate(D, G, usable, setting.operator, families)
    return replace(setting, temperature=cal.temperature, top_k=cal.top_k, auto=False), cal


def mixture_scorer(bank: Bank, names: list[str], dataset: Dataset, k: int, *, model=None,
                   readers: dict | None = None) -> MixtureScorer:
    """A scorer of these candidates on the first k train examples (never another split). `model` and
    `readers` let a caller that scores many datasets (the bench) load the base model and bank once."""
    from lorablend.runtime.models import load_model, load_tokenizer

    examples = dataset.split("train")[:k]
    readers = open_readers(bank, names) if readers is None else readers
    model = load_model(bank.manifest.base_model) if model is None else model
    return MixtureScorer(model, load_tokenizer(bank.manifest.base_model), [readers[n] for n in names], examples)


def first_order_scorer(bank: Bank, modules: list[str], dataset: Dataset, k: int, model) -> FirstOrderScorer:
    """The backward pass on the first k train examples (never another split), on a loaded base model."""
    from lorablend.runtime.models import load_tokenizer

    return FirstOrderScorer(model, load_tokenizer(bank.manifest.base_model), modules, dataset.split("train")[:k])


def first_order_row(bank: Bank, names: list[str], dataset: Dataset, k: int, *, model=None,
                    readers: dict | None = None) -> np.ndarray:
    """First-order Δce of these adapters on the first k train examples: one backward pass, then the bank
    streamed a module at a time."""
    from lorablend.runtime.models import load_model

    readers = open_readers(bank, names) if readers is None else readers
    model = load_model(bank.manifest.base_model) if model is None else model
    scorer = first_order_scorer(bank, readers[names[0]].modules, dataset, k, model)
    return scorer.scores([readers[n] for n in names])


def _shared_model(bank: Bank):
    """The base model, loaded on first use and then shared (grad and the rerank after it need one copy)."""
    from functools import cache

    from lorablend.runtime.models import load_model

    return cache(lambda: load_model(bank.manifest.base_model))


# --------------------------------------------------------------------------- #
# The whole pipeline
# --------------------------------------------------------------------------- #


@dataclass
class Result:
    out: Path
    provenance: Provenance
    seconds: float
    verdict: "Verdict | None" = None
    scoring: dict | None = None  # where the model-based steps ran and why (`model_scoring`)
    training_base: dict | None = None  # what the budget's training steps ran over and why (`budget.training_base`)


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
    validate: bool = False,
    backend: str = "auto",
    require_gain: bool = False,
    refine_steps: int = 0,
    budget: float = 0.0,
    train_base: str = "auto",
    gguf: bool = False,
    answered: dict | None = None,
) -> Result:
    """Build an adapter for `dataset` from `bank` and write it to `out` (atomically).

    `verify`: check the full sha256 (and tensors) of every bank entry read against the manifest first.
    An `auto` setting gets its temperature and top-k calibrated on the bank first (`calibrated`).
    `validate`: keep up to 32 labelled examples apart, score the setting's pick, the nearest adapter, the
    uniform average and no adapter on them (with `backend`), and write the best adapter; the verdict is
    in `Result.verdict` and lorablend.json (`lorablend generate` validates unless told --no-validate).
    `require_gain`: raise NoGain, writing nothing, when no adapter beats the base model there.
    `refine_steps`: then train the written adapter for that many steps of the bank's recipe on the train examples
    (never the validation ones): a gradient step, off by default (`runtime/train.train_factors`).
    `budget`: forward-pass equivalents to spend (`budget.py`): the blend tier where it pays, then training steps
    from the best start at the tuned schedule; the trained adapters join the validated candidates. 0: no training.
    `train_base`: the frozen base those steps run over: full, int8, nf4, or auto (`budget.training_base`).
    `gguf`: also write adapter.gguf (llama.cpp's LoRA format) in the same atomic write.
    `answered`: validation answers to reuse and extend across calls on the same dataset (`validate.validate`).
    """
    t0 = time.perf_counter()
    setting.check()
    bank.check_nonempty()
    out = Path(out)
    check_out(out, force, [bank.root] + ([Path(dataset.source)] if dataset.source else []))
    excluded = exclusions(bank, dataset, list(exclude), exclude_family)
    _check_request(bank, setting, excluded, refine_steps, budget, validate)
    full, held, where = dataset, None, None
    if validate:
        from lorablend.validate import split_validation

        dataset, held, where = split_validation(dataset, seed)
    timings, spent = {}, {"passes": 0.0}
    p = budget_plan(budget, setting, bank.manifest.base_model, train_base, spent) if budget else None
    nearest = None
    if p is None or p.blend:
        setting, coefs, calibration = blend_tier(bank, setting, dataset, excluded, exclude_family, seed, verify, timings,
                                                 spent, backend)
    else:  # the budget buys no blend: the label-free nearest adapter stands in for it
        coefs = nearest = nearest_coefficients(bank, dataset, excluded, seed)
        calibration = None
    trained, extra = None, []
    if p is not None and p.start:
        from lorablend.budget import trained_name
        from lorablend.validate import Candidate

        t1 = time.perf_counter()
        trained = budget_training(bank, dataset, p, coefs, setting, seed, spent["training_base"]["base"])
        spent["passes"] += trained[1]["passes"]
        timings["train_s"] = time.perf_counter() - t1
        extra = [Candidate(trained_name(p), f"lr {trained[1]['lr']:g}, warm-up {trained[1]['warmup']}", None,
                           trained[0])]
    verdict, won = None, None
    if validate:
        t1 = time.perf_counter()
        verdict, won = validated(bank, setting, coefs, dataset, held, where, excluded, seed,
                                 uncertain=total_examples(full) < FEW_EXAMPLES, backend=backend,
                                 pick=p is None or p.blend, extra=extra, nearest=nearest, answered=answered)
        timings["validate_s"] = time.perf_counter() - t1
        if won.factors is None:
            coefs = won.coefficients
        elif p.start != "blend":  # a trained adapter is written; the coefficients stay only when the blend started it
            coefs = {}
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
        rank=0,  # filled in when written
        excluded=excluded,
        coefficients=coefs,
        seed=seed,
        rerank=setting.rerank,
        ce_examples=setting.ce_examples if setting.uses_model else None,
        fit_budget=setting.fit_budget if setting.operator == "fit" else None,
        timings=timings,
        calibration=calibration,
        validation=verdict.to_dict() if verdict else None,
        budget=None if p is None else {"plan": p.to_dict(), "spent": spent["passes"],
                                       "training": trained[1] if trained else None},
        scoring=spent["scoring"]["backend"] if "scoring" in spent else None,
    )
    t1 = time.perf_counter()
    modules = won.factors if won is not None else None
    if refine_steps:
        modules, prov.refinement = refined(bank, combination(bank, coefs, setting.combine, setting.rank), dataset,
                                           refine_steps, seed)
        timings["refine_s"] = time.perf_counter() - t1
    if modules is not None:
        prov.rank = max(f.rank for f in modules.values())
        write_output(out, modules, bank.manifest.base_model, prov, force=force, dtype=dtype, gguf=gguf)
    else:
        write_combination(bank, coefs, out, setting.combine, setting.rank, provenance=prov, force=force, dtype=dtype,
                          gguf=gguf)
    timings["write_s"] = time.perf_counter() - t1
    return Result(out=out, provenance=prov, seconds=time.perf_counter() - t0, verdict=verdict,
                  scoring=spent.get("scoring"), training_base=spent["training_base"] if trained else None)


def _check_request(bank: Bank, setting: Setting, excluded: list[str], refine_steps: int, budget: float,
                   validate: bool) -> None:
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
    if budget < 0:
        raise InputError(f"--budget must be >= 0, got {budget:g}")
    if budget and not validate:
        raise InputError("--budget chooses among the blend and trained adapters on held-out examples: "
                         "drop --no-validate, or pass --budget 0")
    if budget and refine_steps:
        raise InputError("--budget and --refine-steps both train: use --budget (it picks the start and the steps)")


def blend_tier(bank: Bank, setting: Setting, dataset: Dataset, excluded: list[str], exclude_family: bool, seed: int,
               verify: bool, timings: dict, spent: dict, backend: str = "torch"):
    """The gradient-free pipeline up to the coefficients: (the setting as run, its coefficients, the calibration).
    `spent["scoring"]` says where the model-based steps ran (`model_scoring`, from `backend`)."""
    t0, calibration, make_scorer, first_order = time.perf_counter(), None, None, None
    if setting.uses_model:
        setting, make_scorer, first_order, spent["scoring"] = model_scoring(bank, setting, dataset, backend)
    # (metrics ce and grad: every candidate is scored by the model)
    d = np.zeros(len(bank.names)) if setting.distance is None else dataset_distances(bank, setting, dataset, seed)
    timings["distances_s"] = time.perf_counter() - t0
    if setting.auto:
        setting, cal = calibrated(bank, setting, excluded, exclude_family)
        calibration = asdict(cal)
        timings["calibrate_s"] = time.perf_counter() - t0 - timings["distances_s"]
    if verify and setting.uses_model:  # the model-based steps read every candidate adapter
        verify_entries(bank, [n for n in bank.names if n not in excluded])
    t1 = time.perf_counter()
    c = coefficient_row(bank, setting, d, excluded, dataset, spent=spent, make_scorer=make_scorer,
                        first_order=first_order)
    timings["coefficients_s"] = time.perf_counter() - t1
    return setting, {n: float(w) for n, w in zip(bank.names, c)}, calibration


def model_scoring(bank: Bank, setting: Setting, dataset: Dataset, backend: str):
    """(the setting as it can run, a scorer factory and a first-order row for `coefficient_row` (None: torch's),
    {backend, why}).

    `auto` asks `llamacpp.scoring_backend`: torch where its precision is native and its peak fits the free memory,
    else llama.cpp over the model's GGUF. llama.cpp has no backward pass, so a union retriever's first-order half
    runs on torch at full precision where that fits (a `--backend llamacpp` the memory did not force), else over an
    NF4 base (bitsandbytes, where `quantized.first_order_fits`), else the union keeps its distributional
    half (grad+js retrieves by js alone). The metric grad alone stays on torch."""
    from lorablend.machine import available_gib
    from lorablend.runtime.llamacpp import resolve_backend, scoring_backend
    from lorablend.runtime.models import load_model, parameter_count
    from lorablend.runtime.quantized import first_order_fits, load_quantized

    model_id = bank.manifest.base_model
    if backend == "auto":
        chosen, why = scoring_backend(model_id)
    else:
        chosen, why = resolve_backend(backend, model_id), f"--backend {backend}"
    if chosen == "torch" or setting.metric == "grad":
        return setting, None, None, {"backend": "torch", "why": why if chosen == "torch" else
                                     "metric grad needs torch's backward pass"}
    record, first_order = {"backend": "llamacpp"}, None
    if setting.first_order:
        if backend != "auto" and scoring_backend(model_id)[0] == "torch":
            base, how = "full", "the full-precision base fits"
        else:
            fits, how = first_order_fits(parameter_count(model_id), available_gib())
            base = "nf4" if fits else None
        if base:
            held = "an NF4" if base == "nf4" else "the full-precision"
            why += f"; the first-order half on torch over {held} base ({how})"
            record["first_order"] = base

            def first_order(names: list[str]) -> np.ndarray:  # its model is freed before llama.cpp loads its own
                model = load_quantized(model_id, "nf4") if base == "nf4" else load_model(model_id)
                return first_order_row(bank, names, dataset, setting.ce_examples, model=model)
        else:
            why += (f"; candidates retrieved by {setting.distance} alone (the first-order half needs a backward "
                    f"pass: {how})")
            setting = replace(setting, metric=setting.distance)
    examples = dataset.split("train")[: setting.ce_examples]

    def make_scorer(names: list[str]):
        from lorablend.runtime.llamacpp import LlamaCppModel, LlamaCppScorer
        from lorablend.runtime.models import load_tokenizer

        return LlamaCppScorer(LlamaCppModel(model_id), load_tokenizer(model_id),
                              [bank.adapter_path(bank.entry(n)) for n in names], examples)

    return setting, make_scorer, first_order, record | {"why": why}


def nearest_coefficients(bank: Bank, dataset: Dataset, excluded: list[str], seed: int) -> dict[str, float]:
    """The label-free nearest adapter (no forward pass): one-hot on the closest usable entry."""
    row = coefficient_row(bank, NEAREST, dataset_distances(bank, NEAREST, dataset, seed), excluded)
    return dict(zip(bank.names, map(float, row)))


def budget_plan(budget: float, setting: Setting, model_id: str, train_base: str, spent: dict):
    """`budget.plan` for this setting's blend tier (its first-order pass and one pass per reranked candidate), over
    the base `budget.training_base` chooses (`spent["training_base"]`: which and why)."""
    from lorablend.budget import plan, training_base

    base, why = training_base(model_id, train_base)
    spent["training_base"] = {"base": base, "why": why}
    return plan(budget, (FIRST_ORDER_PASSES if setting.first_order else 0.0) + (setting.rerank or 0), base)


def budget_training(bank: Bank, dataset: Dataset, p, coefs: dict[str, float], setting: Setting, seed: int,
                    base: str):
    """(the trained factors, their record): the plan's steps on the train split over a `base` frozen base, from the
    blend when it is the start."""
    from lorablend.budget import train

    init = combination(bank, coefs, setting.combine, setting.rank) if p.start == "blend" else None
    return train(bank.manifest.base_model, dataset.split("train"), p, seed, init, base)


def refined(bank: Bank, modules: dict[str, Factors], dataset: Dataset, steps: int, seed: int):
    """The blend trained for `steps` steps of the bank's recipe on the dataset's train split, and the record."""
    from lorablend.runtime.models import load_model, load_tokenizer
    from lorablend.runtime.train import train_factors

    model_id = bank.manifest.base_model
    trained, record = train_factors(load_model(model_id), load_tokenizer(model_id), dataset.split("train"), steps, seed,
                                    modules)
    record.pop("seconds")  # in the timings: lorablend.json stays byte-identical across reruns
    return trained, record


def validated(bank: Bank, setting: Setting, coefs: dict[str, float], dataset: Dataset, held, where: dict,
              excluded: list[str], seed: int, *, uncertain: bool, backend: str, pick: bool = True, extra=(),
              nearest: dict[str, float] | None = None, answered: dict | None = None):
    """(the verdict, the candidate written): the setting's pick (when `pick`) and the `extra` candidates (e.g. a
    trained adapter) against the nearest adapter (`nearest`, when already computed), the uniform average and no
    adapter, on the held-out examples (`validate.validate`). Candidates equal to an earlier one are scored once."""
    from lorablend.validate import NEAREST_PICK, NO_ADAPTER, PICK, UNIFORM, Candidate, kept, validate

    usable = [n for n in bank.names if n not in excluded]
    nearest = nearest if nearest is not None else nearest_coefficients(bank, dataset, excluded, seed)
    tried = ([Candidate(PICK, setting.label, coefs)] if pick else []) + [
        Candidate(NEAREST_PICK, NEAREST.label, nearest),
        Candidate(UNIFORM, "uniform", {n: (1 / len(usable) if n in usable else 0.0) for n in bank.names}),
        *extra, Candidate(NO_ADAPTER, "", None)]
    unique = [c for j, c in enumerate(tried) if c.coefficients is None or all(
        kept(c.coefficients) != kept(o.coefficients) for o in tried[:j] if o.coefficients is not None)]
    verdict = validate(bank, unique, held, where | {"seed": seed}, combine=setting.combine, rank=setting.rank,
                       uncertain=uncertain, backend=backend, seed=seed, answered=answered)
    return verdict, next(c for c in unique if c.name == verdict.written)


def dataset_distances(bank: Bank, setting: Setting, dataset: Dataset, seed: int) -> np.ndarray:
    """The dataset's distance to every bank entry under the setting's sketch and metric (`distances_to_bank`)."""
    _, sk = load_sketches(bank, setting.sketch)  # first: a missing or stale index is reported here
    query = query_sketch(bank, setting.sketch, dataset)
    check_vocab(bank, setting.sketch, sk, query)
    return distances_to_bank(sk, setting.distance, query, seed)


