"""`lorablend bench`: the paper's leave-one-out study on a CPU, with honest controls.

For every bank entry i, adapters are built from the other entries (holdout `entry`)
or from the entries outside i's family (holdout `family`) and scored on a fixed,
seeded sample of i's test split, next to controls on the same examples: the base
model, i's own adapter, the uniform average of the others, k random others (for
settings with a top-k), the single nearest other by the setting's distance and, when a
setting uses the model, the single other with the lowest ce (`best-ce`).

Setting labels (stable: they name the records on disk and the rows of the report):
`sketch/metric/operator/combine[/T<t>][/top<k>][/rerank<m>][/r<rank>]`, with `auto` in
place of T and top to calibrate them on the bank. sketch: tokens | embeddings |
target-tokens | target-embeddings; metric: wd | kl | js | mmd, or ce (the base model's
target cross-entropy with each candidate alone minus without, on the entry's first
CE_EXAMPLES train examples; the sketch is then unused); operator: attentional | normalized
| neural, or fit (Nelder–Mead on the weights of the top-m candidates, m = rerank or top-k
or 16, started from their softmin, 40 forward passes, seed 0; with both rerank and top-k, the
k of the m lowest in ce are searched); `rerank<m>`: keep the m nearest by the sketch
distance, then rank them by ce (with `auto`, T and top-k are calibrated on the sketch
distance and applied to the reranked ce). Every label runs as it is in `lorablend generate
--setting LABEL`.

Model-based settings (ce, rerank, fit) cost forward passes of the base model over k = 16
train examples, never the test split. A candidate's ce does not depend on the others, so
each entry gets one ce row over every other entry, computed once, cached in RESULTS/ce/
(keyed by bank and k) and sliced for ce, rerank, best-ce and both holdouts; only fit runs
passes of its own (one fit per entry and holdout). Every record carries `cost_s`, what
`generate` would spend on that adapter after loading the model and sketching the query:
candidates × the entry's measured seconds per ce pass, plus the fit's time, plus the
combination. On SmolLM2 a ce candidate costs one bf16 pass over the k examples, their
shared prompt prefix run once: 1.5–8.8 CPU-s on the ten tasks of the labelled run in
docs/RESULTS-labelled.md, 5.1 on average (two jobs on two cores). Per entry of the 61-entry
bank the ce row (60 passes) took ~5 CPU-min and the 4-weight fit (2 holdouts × 40 passes)
~6 CPU-min there, so the labelled preset costs ~11 CPU-hours for 61 entries (~6 h on 2 cores
with --jobs 2): it is its own preset, outside the ≤ 2 h default run; `--entries` runs a subset.

What keeps ~4000 distributional records within two hours on two cores:
- Distance rows and Gram matrices are computed once per (sketch, metric) and per
  space, then sliced; the neural operator and calibrated (T, k) are refitted per
  (entry, holdout) from those, without the entry (and without its family).
- Identical adapters are evaluated once per entry: a record points at an
  evaluation key, the hash of (coefficients, combine, rank), and a one-hot vector
  is the bank adapter itself. Coefficients below `PRUNE` are zeroed first.
- Each worker loads the base model once. Adapters are combined in memory from
  cached bank factors. With `--backend torch` they are copied into a few LoRA slots
  of the model and decoded together in PEFT mixed-adapter batches; with llama.cpp
  (the default when installed) each is written as a GGUF LoRA to a temporary dir
  and loaded into the worker's one llama.cpp model, about 2× faster per evaluation.
- Every record is one JSON file written atomically under RESULTS/records/ENTRY/,
  so a killed run resumes where it stopped. RESULTS/config.json pins what the
  records were computed with; a run with other options refuses to mix with them.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import random
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import metafit
from .atomic import write_json
from .bank import Bank
from .errors import InputError
from .ce import CE_EXAMPLES, FIRST_ORDER_PASSES
from .generate import (DEFAULT_SETTING, NEAREST, Setting, check_auto, coefficient_row, exclusions, mixture_scorer,
                       open_readers, retrieve)

HOLDOUTS = ("entry", "family")
_PAPER_METRICS = ("wd", "kl", "js", "mmd")
PRESETS = {
    # the paper's 12: its sketch, metrics, operators and inexact combination, no temperature
    "paper": tuple(f"tokens/{m}/{op}/paper/T1" for m in _PAPER_METRICS for op in ("attentional", "normalized", "neural")),
    # lorablend's candidates: embedding clouds, exact truncated combination, (T, k) calibrated on the bank;
    # an output-side sketch; the single bank adapter nearest by it (no forward pass)
    "best": tuple(f"embeddings/{m}/normalized/svd/auto" for m in _PAPER_METRICS) + (
        "target-tokens/js/normalized/svd/auto",
        "target-tokens/js/normalized/svd/T1/top1",
    ),
    # the model-based steps on 16 labelled train examples. ce/T1/top8 and the embeddings rerank were fixed before
    # any result; retrieval by output-side JS, top-1 after the rerank and the 4-weight fit were added after the
    # default run found the nearest adapter by output-side JS ahead of every mixture (docs/RESULTS.md).
    # Not a default preset: on SmolLM2 the ce row and the fit (both holdouts) cost ~11 CPU-min per entry (docs/RESULTS-labelled.md),
    # ~11 CPU-hours for 61 entries; run them with `--preset labelled` (resumable, `--jobs`, Ray, `--entries`).
    "labelled": (
        "embeddings/js/normalized/svd/auto/rerank16",
        "target-tokens/js/normalized/svd/auto/rerank16",
        "target-tokens/js/normalized/svd/T1/top1/rerank16",
        "target-tokens/js/normalized/svd/T1/top1/rerank8",
        "tokens/ce/normalized/svd/T1/top8",
        "target-tokens/js/fit/svd/T1/top4/rerank16",
        # first-order scoring (one backward pass ranks the whole bank), added after the 28-entry run above:
        # alone, as the retriever of a rerank, and in union with output-side JS
        "tokens/grad/normalized/svd/T1/top1",
        "tokens/grad/normalized/svd/T1/top1/rerank8",
        "target-tokens/grad+js/normalized/svd/T1/top1/rerank8",
        "target-tokens/grad+js/normalized/svd/T1/top1/rerank16",
    ),
    # the paper's best setting next to lorablend's, for a look in minutes (5.6 min with --jobs 2 on 2 cores, 61-entry bank)
    "quick": ("tokens/js/normalized/paper/T1", "embeddings/js/normalized/svd/auto"),
}
DEFAULT_PRESETS = ("paper", "best")
DEFAULT_N = 4  # both default presets, both holdouts, 61 entries: 57.6 min on 2 cores (llama.cpp, --jobs 2; docs/RESULTS.md)
DEFAULT_MAX_NEW_TOKENS = 32
QUICK_N = 15  # the quick preset: one entry per family (10 on the default bank), holdout entry
PRUNE = 1e-6
CONTROLS = ("base", "own", "uniform", "random-k", "nearest", "best-ce", "train", "refine", "validated")
TRAIN_STEP_PASSES = 1.5  # forward-pass equivalents of one training step: forward + backward of a batch of 8 of the 16


# --------------------------------------------------------------------------- #
# Settings
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Spec:
    """A setting of the study: a `generate.Setting`, or one whose (T, top-k) are calibrated on the bank."""

    setting: Setting
    auto: bool = False

    @property
    def label(self) -> str:
        s = self.setting
        head = "/".join([s.sketch, s.metric, s.operator, s.combine, "auto"]) if self.auto else s.label
        return head + (f"/rerank{s.rerank}" if self.auto and s.rerank else "") + (f"/r{s.rank}" if s.rank else "")

    @property
    def space(self) -> str:
        return metafit.space_for(self.setting.combine)

    @property
    def has_top_k(self) -> bool:
        return self.auto or self.setting.top_k is not None


def parse_setting(text: str) -> Spec:
    """`sketch/metric/operator/combine[/T<t>][/top<k>][/rerank<m>][/r<rank>]`, `auto` in place of T and top
    to calibrate them; the module docstring lists what each part means."""
    parts = [p for p in text.strip().split("/") if p]
    if len(parts) < 4:
        raise InputError(f"setting '{text}': expected sketch/metric/operator/combine[/T1][/top8][/rerank16][/r8] or "
                         ".../auto, e.g. tokens/js/normalized/svd/T1/top8")
    sketch, metric, operator, combine, *rest = parts
    kw, auto = {}, False
    for p in rest:
        try:
            if p == "auto":
                auto = True
            elif p.startswith("top"):
                kw["top_k"] = int(p[3:])
            elif p.startswith("rerank"):
                kw["rerank"] = int(p[6:])
            elif p.startswith("T"):
                kw["temperature"] = float(p[1:])
            elif p.startswith("r") and p[1:].isdigit():
                kw["rank"] = int(p[1:])
            else:
                raise ValueError(p)
        except ValueError:
            raise InputError(f"setting '{text}': cannot read '{p}' (use T<temperature>, top<k>, rerank<m>, r<rank> "
                             "or auto)") from None
    if auto and {"temperature", "top_k"} & set(kw):
        raise InputError(f"setting '{text}': auto chooses T and top-k; drop T/top or auto")
    spec = Spec(Setting(sketch, metric, operator, combine, **kw), auto)
    spec.setting.check()
    if auto:
        try:
            check_auto(spec.setting)
        except InputError as e:
            raise InputError(f"setting '{text}': {e}") from None
    return spec


def preset_specs(presets: list[str], settings: list[str]) -> list[Spec]:
    """The settings of the named presets plus explicit ones, without duplicates, in order."""
    texts: list[str] = []
    for p in presets:
        if p not in PRESETS:
            from .errors import suggest

            raise suggest(p, tuple(PRESETS), "preset")
        texts += PRESETS[p]
    specs = [parse_setting(t) for t in texts + list(settings)]
    return list({s.label: s for s in specs}.values())


# --------------------------------------------------------------------------- #
# What one entry needs: slots (records) and their coefficients
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Slot:
    """One record to compute for an entry: a setting or a control under one holdout ('-': none applies)."""

    holdout: str
    label: str
    control: str = ""  # "" for a setting, else one of CONTROLS
    spec: Spec | None = None  # the setting, or the setting a random-k control is paired with
    combine: str | None = None
    rank: int | None = None
    sketch_metric: tuple[str, str] | None = None  # nearest: whose distance; best-ce: ("", "ce")
    steps: int | None = None  # train / refine: training steps on the entry's first CE_EXAMPLES train examples


def uniform_label(combine: str, rank: int | None) -> str:
    return f"uniform/{combine}" + (f"/r{rank}" if rank else "")


def distributional(specs: list[Spec]) -> list[tuple[str, str]]:
    """The (sketch, metric) pairs with a distance matrix: every distance but ce and grad (whose nearest is
    best-ce and the grad setting's top-1); js for grad+js."""
    return list(dict.fromkeys((s.setting.sketch, s.setting.distance) for s in specs if s.setting.distance))


def slots_for(specs: list[Spec], holdouts: tuple[str, ...], train_steps: tuple[int, ...] = ()) -> list[Slot]:
    """Every record of one entry, known before any coefficient is computed (so resumption can count).
    `train_steps`: the training curve, a LoRA trained from zero (`train/K`, no bank) and one refined from the
    default setting's blend (`refine/K`, per holdout) for K steps on the examples the model-aware settings see."""
    slots = [Slot("-", "base", "base"), Slot("-", "own", "own")]
    slots += [Slot("-", f"train/{k}", "train", steps=k) for k in train_steps]
    combos = list(dict.fromkeys((s.setting.combine, s.setting.rank) for s in specs))
    dists = distributional(specs)
    model_based = any(s.setting.uses_model for s in specs)
    for h in holdouts:
        slots += [Slot(h, s.label, "", s, s.setting.combine, s.setting.rank) for s in specs]
        slots += [Slot(h, uniform_label(c, r), "uniform", None, c, r) for c, r in combos]
        slots += [Slot(h, f"random-k/{s.label}", "random-k", s, s.setting.combine, s.setting.rank)
                  for s in specs if s.has_top_k]
        slots += [Slot(h, f"nearest/{sk}/{m}", "nearest", sketch_metric=(sk, m)) for sk, m in dists]
        slots += [Slot(h, "best-ce", "best-ce", sketch_metric=("", "ce"))] if model_based else []
        slots += [Slot(h, f"refine/{k}", "refine", steps=k) for k in train_steps]
        slots += [Slot(h, "validated", "validated", combine=DEFAULT_SETTING.combine)] if validating(specs) else []
    return slots


def validating(specs: list[Spec]) -> bool:
    """Whether the run holds `generate`'s validated selection: its candidates are the default setting's pick,
    the nearest adapter, the uniform average and no adapter, so it comes with the default setting."""
    return Spec(DEFAULT_SETTING).label in {s.label for s in specs}


def candidate_specs(specs: list[Spec], train_steps: tuple[int, ...] = ()) -> list[Spec]:
    """The settings whose coefficients the run computes: its own, plus the default for refine/K's blend and
    the nearest adapter for validation."""
    extra = ([Spec(DEFAULT_SETTING)] if train_steps else []) + ([Spec(NEAREST)] if validating(specs) else [])
    return specs + extra


@dataclass
class Matrices:
    """Distances between bank datasets per (sketch, metric) and Gram matrices per space, computed once."""

    D: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    G: dict[str, np.ndarray] = field(default_factory=dict)


def needed(specs: list[Spec]) -> tuple[list[tuple[str, str]], list[str]]:
    """The (sketch, metric) pairs whose distances the settings and nearest controls use, and the Gram
    spaces the neural fits and calibrations need."""
    spaces = list(dict.fromkeys(s.space for s in specs if s.auto or s.setting.operator == "neural"))
    return distributional(specs), spaces


def compute_matrices(bank: Bank, specs: list[Spec], cache: Path, seed: int, status=None) -> Matrices:
    """D and G for the settings, cached in RESULTS/matrices/ (config.json pins the bank they belong to)."""
    dists, spaces = needed(specs)
    out = Matrices()
    for sk, m in dists:
        out.D[(sk, m)] = metafit.cached_array(cache / f"D-{sk}-{m}.npy",
                                              lambda: metafit.distance_matrix(bank, sk, m, seed), status)
    for sp in spaces:
        out.G[sp] = metafit.cached_array(cache / f"G-{sp}.npy", lambda: metafit.gram(bank, sp), status)
    return out


def prune(c: np.ndarray, floor: float = PRUNE) -> np.ndarray:
    """Zero the coefficients below `floor` and renormalise: a softmin that is one-hot up to 1e-9 *is*
    the nearest adapter (and is then evaluated once), and negligible entries need not be read."""
    c = np.where(np.asarray(c, dtype=np.float64) < floor, 0.0, c)
    return c / c.sum()


def one_hot(n: int, j: int) -> np.ndarray:
    c = np.zeros(n)
    c[j] = 1.0
    return c


def eval_key(c: np.ndarray | dict | None, combine: str | None, rank: int | None, names: list[str],
             slot: Slot | None = None) -> str:
    """What determines the answers: the base model, one bank adapter, a hashed mixture, or a trained LoRA."""
    if c is None:
        return "base"
    if isinstance(c, dict):
        return f"{slot.control}:{slot.holdout}:{slot.steps}"
    nz = np.flatnonzero(c)
    if len(nz) == 1:
        return f"bank:{names[nz[0]]}"
    payload = json.dumps([combine, rank, [[names[j], round(float(c[j]), 9)] for j in nz]])
    return "mix:" + hashlib.sha256(payload.encode()).hexdigest()[:16]


class EntryPlan:
    """Coefficients of every slot of one entry; fits (neural, calibration) are cached per holdout, the
    entry's ce row in `ce_dir` (RESULTS/ce/)."""

    def __init__(self, bank: Bank, name: str, dataset, matrices: Matrices, ce_dir: Path, seed: int = 0,
                 neural_hidden: int = 64, neural_epochs: int = 40):
        self.bank, self.name, self.dataset, self.m, self.seed = bank, name, dataset, matrices, seed
        self.i = bank.names.index(name)
        self.ce_dir = Path(ce_dir)
        self.neural_hidden, self.neural_epochs = neural_hidden, neural_epochs
        self._fits: dict = {}

    def excluded(self, holdout: str) -> list[str]:
        return exclusions(self.bank, self.dataset, [self.name], holdout == "family")

    def usable(self, holdout: str) -> list[int]:
        out = set(self.excluded(holdout))
        return [j for j, n in enumerate(self.bank.names) if n not in out]

    def _cached(self, key, make):
        if key not in self._fits:
            self._fits[key] = make()
        return self._fits[key]

    def neural(self, holdout: str, spec: Spec):
        """The paper's MLP fitted on the bank without this entry (and its family): (operator, names trained on)."""
        from .coefficients import NeuralConfig

        s = spec.setting

        def fit():
            cfg = NeuralConfig(hidden=self.neural_hidden, epochs=self.neural_epochs, seed=self.seed,
                               sketch=s.sketch, metric=s.distance, space=spec.space)
            op, train, _ = metafit.fit_meta(self.bank, cfg, holdout=0.0, exclude=self.excluded(holdout),
                                            D=self.m.D[(s.sketch, s.distance)], G=self.m.G[spec.space], save=False)
            return op, [self.bank.names[j] for j in train]

        return self._cached(("neural", holdout, s.sketch, s.distance, spec.space), fit)

    def calibration(self, holdout: str, spec: Spec):
        """(T, top-k) for an `auto` setting, chosen on the bank without this entry (and its family)."""
        from .calibrate import calibrate

        s = spec.setting
        families = [e.family for e in self.bank.entries] if holdout == "family" else None
        return self._cached(("cal", holdout, s.sketch, s.distance, s.operator, spec.space),
                            lambda: calibrate(self.m.D[(s.sketch, s.distance)], self.m.G[spec.space],
                                              self.usable(holdout), s.operator, families))

    def concrete(self, holdout: str, spec: Spec) -> Setting:
        """The setting as run for this entry: calibrated (T, k) for `auto`, k capped at the candidates left
        (a family holdout can leave fewer than k; a rerank keeps m)."""
        s = spec.setting
        if spec.auto:
            cal = self.calibration(holdout, spec)
            s = replace(s, temperature=cal.temperature, top_k=cal.top_k)
        left = min(len(self.usable(holdout)), s.rerank or len(self.bank.names))
        return replace(s, top_k=left) if s.top_k is not None and s.top_k > left else s

    def ce(self) -> tuple[dict[str, float], float]:
        """ce of every adapter usable under holdout entry (name -> value) and the wall seconds it took per
        candidate. A candidate's ce does not depend on the others, so the row is computed once per entry,
        cached in RESULTS/ce/ (keyed by bank and k) and sliced by every setting, control and holdout."""
        got = self._row("", lambda names, _: with_scorer(self.bank, names, self.dataset, lambda sc: sc.ce_row()))
        return dict(zip(got["names"], got["ce"])), got["seconds_per_candidate"]

    def first_order(self) -> tuple[dict[str, float], float, float]:
        """grad of every adapter usable under holdout entry, the wall seconds of the backward pass and
        those of scoring one adapter after it; cached beside the ce row and sliced the same way."""
        got = self._row(".grad", lambda names, timing: with_first_order(self.bank, names, self.dataset, timing))
        return dict(zip(got["names"], got["ce"])), got["backward_seconds"], got["seconds_per_candidate"]

    def _row(self, kind: str, compute) -> dict:
        key = "row" + kind
        if key not in self._fits:
            path = self.ce_dir / f"{self.name}{kind}.k{CE_EXAMPLES}.{self.bank.sha256[:16]}.json"
            if not path.exists():
                import torch

                names = [self.bank.names[j] for j in self.usable("entry")]
                t0, cpu0 = time.perf_counter(), time.process_time()
                timing: dict = {}
                row = compute(names, timing)
                wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                per = (wall - timing.get("backward_s", 0.0)) / len(names)
                write_json(path, {"entry": self.name, "k": CE_EXAMPLES, "bank_manifest_sha256": self.bank.sha256,
                                  "names": names, "ce": row.tolist(), "seconds_per_candidate": per,
                                  "cpu_seconds_per_candidate": (cpu - timing.get("backward_cpu_s", 0.0)) / len(names),
                                  **({"backward_seconds": timing["backward_s"],
                                      "backward_cpu_seconds": timing["backward_cpu_s"]} if timing else {}),
                                  "threads": torch.get_num_threads()})
            self._fits[key] = json.loads(path.read_text(encoding="utf-8"))
        return self._fits[key]

    def coefficients(self, slot: Slot) -> tuple[np.ndarray | dict | None, dict]:
        """The slot's coefficient vector (None: base model; trained factors for train / refine) and what to record
        about how it was made."""
        n, h = len(self.bank.names), slot.holdout
        if slot.control == "base":
            return None, {}
        if slot.control in ("train", "refine"):
            return self.trained(slot)
        if slot.control == "own":
            return one_hot(n, self.i), {}
        usable = self.usable(h)
        info = {"excluded": self.excluded(h)}
        if slot.control == "uniform":
            c = np.zeros(n)
            c[usable] = 1.0 / len(usable)
            return c, info
        if slot.control == "nearest":
            d = self.m.D[slot.sketch_metric]
            return one_hot(n, min(usable, key=lambda j: (d[self.i, j], j))), info
        if slot.control == "best-ce":
            ce, per_candidate = self.ce()
            info["model_s"], info["passes"] = per_candidate * len(usable), len(usable)
            return one_hot(n, min(usable, key=lambda j: (ce[self.bank.names[j]], j))), info
        setting = self.concrete(h, slot.spec)
        info.update(temperature=setting.temperature, top_k=setting.top_k)
        if slot.control == "random-k":
            return self.random_k(usable, setting.top_k), info
        neural = None
        if setting.operator == "neural":
            neural, info["neural_trained_on"] = self.neural(h, slot.spec)
        d = self.m.D[(setting.sketch, setting.distance)][self.i] if setting.distance else np.zeros(n)
        scorers: list[SlicedScorer] = []
        info["model_s"], info["passes"] = 0.0, 0

        def make_scorer(names: list[str]) -> SlicedScorer:
            scorers.append(SlicedScorer(self, names))
            return scorers[-1]

        def first_order(names: list[str]) -> np.ndarray:
            grad, backward, per_candidate = self.first_order()
            info["model_s"] += backward + per_candidate * len(names)
            info["passes"] += FIRST_ORDER_PASSES
            return np.array([grad[n] for n in names])

        c = coefficient_row(self.bank, setting, d, info["excluded"], neural=neural, make_scorer=make_scorer,
                            first_order=first_order)
        info["model_s"] += sum(sc.seconds for sc in scorers)
        info["passes"] = (info["passes"] + sum(sc.passes for sc in scorers)) if setting.uses_model else 0
        return prune(c), info

    def trained(self, slot: Slot) -> tuple[dict, dict]:
        """A LoRA trained for `slot.steps` steps of the bank's recipe on the first CE_EXAMPLES train examples: from
        zero, or from the default setting's blend under the slot's holdout (whose passes it adds to its own)."""
        from .models import load_tokenizer
        from .train import train_factors

        init, info = None, {"passes": TRAIN_STEP_PASSES * slot.steps, "model_s": 0.0}
        if slot.control == "refine":
            init, c, blend = self.blend(slot.holdout)
            info.update(excluded=blend["excluded"], model_s=blend["model_s"], passes=info["passes"] + blend["passes"],
                        blend={n: float(w) for n, w in zip(self.bank.names, c) if w > 0})
        with training_model(self.bank.manifest.base_model) as model:
            factors, record = train_factors(model, load_tokenizer(self.bank.manifest.base_model),
                                            self.dataset.split("train")[:CE_EXAMPLES], slot.steps, self.seed, init)
        info["model_s"] += record["seconds"]
        info["training"] = record
        return factors, info

    def blend(self, holdout: str):
        """The default setting's adapter under this holdout: (its factors, its coefficients, its record info)."""
        from .generate import combination

        def make():
            spec = Spec(DEFAULT_SETTING)
            c, info = self.coefficients(Slot(holdout, spec.label, "", spec, DEFAULT_SETTING.combine))
            return combination(self.bank, {n: float(w) for n, w in zip(self.bank.names, c)}, DEFAULT_SETTING.combine,
                               readers=_readers(self.bank)), c, info

        return self._cached(("blend", holdout), make)

    def recall(self, holdout: str, retriever: tuple[str, str], ms: tuple[int, ...]) -> list[dict]:
        """Whether the exact-ce best usable adapter is among the m candidates of a retriever ((sketch, metric)
        as a rerank setting names it), for each m: what a rerank can at best find."""
        n, usable = len(self.bank.names), self.usable(holdout)
        ce, _ = self.ce()
        best = min(usable, key=lambda j: (ce[self.bank.names[j]], j))
        sketch, metric = retriever
        masked = np.full(n, np.inf)
        d = g = None
        distance = Setting(sketch, metric).distance
        if distance:
            d = masked.copy()
            d[usable] = self.m.D[(sketch, distance)][self.i, usable]
        if metric.startswith("grad"):
            grad, _, _ = self.first_order()
            g = masked.copy()
            g[usable] = [grad[self.bank.names[j]] for j in usable]
        name = metric if metric == "grad" else f"{sketch}/{metric}"
        return [{"entry": self.name, "family": self.bank.entry(self.name).family, "holdout": holdout,
                 "retriever": name, "m": m, "found": int(best in retrieve(metric, d, g, m).tolist())} for m in ms]

    def random_k(self, usable: list[int], k: int | None) -> np.ndarray:
        """k random usable entries, uniform weights, seeded by (seed, entry, k); all of them when k is None."""
        pick = usable if k is None or k >= len(usable) else random.Random(f"{self.seed}:{self.name}:{k}").sample(usable, k)
        c = np.zeros(len(self.bank.names))
        c[pick] = 1.0 / len(pick)
        return c


class SlicedScorer:
    """What `coefficient_row` asks of a MixtureScorer, for the bench: ce values sliced from the entry's
    cached row, fits run for real on the worker's model. `seconds` is what `generate` would spend: the
    measured seconds per ce candidate times the candidates, plus the fit's measured time."""

    def __init__(self, plan: EntryPlan, names: list[str]):
        self.plan, self.names, self.seconds, self.passes = plan, names, 0.0, 0

    def losses(self) -> np.ndarray:
        """The cached ce values: the candidates' losses shifted by the base model's, which no operator sees."""
        ce, per_candidate = self.plan.ce()
        self.seconds += per_candidate * len(self.names)
        self.passes += len(self.names)
        return np.array([ce[n] for n in self.names])

    def fit(self, init: np.ndarray, **kw) -> np.ndarray:
        t0 = time.perf_counter()

        def search(scorer):
            w = scorer.fit(init, **kw)
            self.passes += scorer.evaluations
            return w

        w = with_scorer(self.plan.bank, self.names, self.plan.dataset, search)
        self.seconds += time.perf_counter() - t0
        return w

    def close(self) -> None:
        """Nothing to release: `with_scorer` removes its hooks."""


def with_first_order(bank: Bank, names: list[str], dataset, timing: dict) -> np.ndarray:
    """First-order scores of these adapters on the first CE_EXAMPLES train examples, on the worker's base model
    with cached bank factors; `timing` gets the backward pass's wall and CPU seconds."""
    from .generate import first_order_scorer

    readers = _readers(bank)
    with scoring_model(bank.manifest.base_model) as model:
        scorer = first_order_scorer(bank, readers[names[0]].modules, dataset, CE_EXAMPLES, model)
        timing.update(backward_s=scorer.seconds, backward_cpu_s=scorer.cpu_seconds)
        return scorer.scores([readers[n] for n in names])


def with_scorer(bank: Bank, names: list[str], dataset, use):
    """`use(MixtureScorer)` over these candidates and the first CE_EXAMPLES train examples, on the worker's
    base model with cached bank factors; the scorer's hooks are removed afterwards."""
    with scoring_model(bank.manifest.base_model) as model:
        scorer = mixture_scorer(bank, names, dataset, CE_EXAMPLES, model=model, readers=_readers(bank))
        try:
            return use(scorer)
        finally:
            scorer.close()


# --------------------------------------------------------------------------- #
# Records on disk
# --------------------------------------------------------------------------- #


class RecordStore:
    """One JSON file per (entry, holdout, label), written atomically: a killed run loses at most the
    record being computed. Readable while workers write (progress is a count of files)."""

    def __init__(self, results: Path):
        self.root = Path(results) / "records"

    def path(self, entry: str, holdout: str, label: str) -> Path:
        return self.root / entry / f"{holdout}__{label.replace('/', '~')}.json"

    def write(self, rec: dict) -> None:
        write_json(self.path(rec["entry"], rec["holdout"], rec["label"]), rec)

    def load(self, entry: str) -> dict[tuple[str, str], dict]:
        out = {}
        for p in sorted((self.root / entry).glob("*.json")):
            try:
                rec = json.loads(p.read_text(encoding="utf-8"))
            except ValueError:
                continue  # not ours (atomic writes never leave half a record)
            out[(rec["holdout"], rec["label"])] = rec
        return out

    def entries(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.exists() else []

    def all(self) -> list[dict]:
        return [rec for e in self.entries() for rec in self.load(e).values()]

    def missing(self, entries: list[str], slots: list) -> dict[str, int]:
        """Per entry, how many of these slots have no record yet."""
        return {e: sum(not self.path(e, s.holdout, s.label).exists() for s in slots) for e in entries}

    def count(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.json")) if self.root.exists() else 0

    def restore(self, csv_path: Path) -> int:
        """Records from a committed scores.csv, when the records themselves are gone (they are scratch; the CSV
        is what is committed): a study grows over sessions. Restored records carry no answers and no
        coefficients (`restored`: true); a new record of the same adapter reuses their scores."""
        import csv

        ints, floats = ("rank", "top_k", "n", "max_new_tokens", "passes"), (
            "temperature", "rouge_l", "rouge_lsum", "exact_match", "seconds_generate", "seconds_adapter", "cost_s")

        def number(k: str, v: str):  # passes are whole but for training (1.5 a step) and validation
            return None if v == "" else int(v) if k in ints and v.lstrip("-").isdigit() else float(v)

        with open(csv_path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        for row in rows:
            rec = {k: (v if k not in ints + floats else number(k, v)) for k, v in row.items()}
            rec.update(reused=row.get("reused") == "True", coefficients={}, answers=None, restored=True)
            self.write(rec)
        return len(rows)


# --------------------------------------------------------------------------- #
# One entry, in whatever process runs it
# --------------------------------------------------------------------------- #


@dataclass
class EntryJob:
    """Everything a worker needs for one entry (picklable, for process pools and Ray)."""

    bank: str
    entry: str
    settings: list[str]
    holdouts: tuple[str, ...]
    results: str
    matrices: Matrices
    n: int = DEFAULT_N
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int = 0
    batch_size: int = 16
    neural_hidden: int = 64
    neural_epochs: int = 40
    backend: str = "torch"  # resolved: torch | llamacpp
    threads: int = 1
    train_steps: tuple[int, ...] = ()


def validation_pool(dataset):
    """The dataset validation may draw on: as it is when it has a valid split (`split_validation` takes that),
    else without the first CE_EXAMPLES train examples, which the model-aware settings select on."""
    if dataset.splits.get("valid"):
        return dataset
    return replace(dataset, splits={**dataset.splits, "train": dataset.split("train")[CE_EXAMPLES:]})


def test_sample(dataset, n: int, seed: int) -> list:
    """A fixed, seeded sample of n test examples (in split order), the same for every setting and control."""
    test = dataset.split("test")
    idx = sorted(random.Random(f"{seed}:{dataset.name}").sample(range(len(test)), min(n, len(test))))
    return [test[i] for i in idx]


_WORKER: dict = {}  # per process: the slot model (base model loaded once) and cached bank factors


class _CachedReader:
    """An AdapterReader whose factors stay in memory: the bench combines the same bank thousands of times."""

    def __init__(self, reader):
        self.spec, self.modules, self.path, self._reader, self._factors = reader.spec, reader.modules, reader.path, reader, {}

    def factors(self, module: str):
        if module not in self._factors:
            self._factors[module] = self._reader.factors(module)
        return self._factors[module]

    def release(self, module: str) -> None:
        """Nothing to release: the factors stay cached for the next combination."""


def _readers(bank: Bank) -> dict:
    key = ("readers", str(bank.root), bank.sha256)
    if key not in _WORKER:
        _WORKER[key] = {n: _CachedReader(r) for n, r in open_readers(bank, bank.names).items()}
    return _WORKER[key]


class SlotModel:
    """The base model with a few LoRA slots whose weights are overwritten for each evaluation.

    Loading dozens of adapters per entry through PEFT's loader costs ~0.5 s each on SmolLM2 (every
    load walks all modules, and more of them with each adapter loaded); copying factors into
    existing slots costs milliseconds, and nothing is written to disk. Slots have lora_alpha = r
    (scaling 1): a factor's own scale is folded into A, and ranks below the slot's are zero-padded,
    which leaves B·A unchanged. Slots decode together in PEFT mixed-adapter batches.
    """

    def __init__(self, model_id: str, modules: list[str], slots: int, rank: int):
        from peft import LoraConfig, get_peft_model

        from .models import load_model

        self.model_id, self.modules, self.rank = model_id, list(modules), rank
        base = _WORKER.pop("base_model", None) if _WORKER.get("base_model_id") == model_id else None
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=self.modules, lora_dropout=0.0, bias="none")
        self.names = [f"slot{k}" for k in range(slots)]
        with warnings.catch_warnings():  # transformers' deprecation notices from inside PEFT
            warnings.simplefilter("ignore", FutureWarning)
            self.model = get_peft_model(base if base is not None else load_model(model_id), config,
                                        adapter_name=self.names[0])
            for name in self.names[1:]:
                self.model.add_adapter(name, config)
        self.model.eval()
        self._layers = {m: self.model.base_model.model.get_submodule(m) for m in self.modules}

    def fits(self, model_id: str, modules: list[str], slots: int, rank: int) -> bool:
        return model_id == self.model_id and list(modules) == self.modules and slots <= len(self.names) and rank <= self.rank

    def release(self) -> None:
        """Give the base model back (without slots) for a SlotModel of another shape."""
        _WORKER.update(base_model=self.model.unload(), base_model_id=self.model_id)

    def fill(self, slot: int, modules: dict) -> None:
        """Slot `slot` := these factors (module -> Factors), exactly: s·B·A = B_slot·A_slot."""
        import torch

        name = self.names[slot]
        with torch.no_grad():
            for m, layer in self._layers.items():
                f = modules[m]
                A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
                A.zero_()
                B.zero_()
                A[: f.rank] = torch.from_numpy(np.asarray(f.A * np.float32(f.scale), dtype=np.float32))
                B[:, : f.rank] = torch.from_numpy(np.asarray(f.B, dtype=np.float32))


@contextmanager
def scoring_model(model_id: str):
    """The worker's base model without LoRA updates, for MixtureScorer hooks: the slot model's own under
    `disable_adapter` (no second copy in memory, same weights), else the plain model a SlotModel will wrap."""
    current = _WORKER.get("slots")
    if current is not None and current.model_id == model_id:
        with current.model.disable_adapter():
            yield current.model.base_model.model
        return
    if _WORKER.get("base_model_id") != model_id:
        from .models import load_model

        _WORKER.update(base_model=load_model(model_id), base_model_id=model_id)
    yield _WORKER["base_model"]


@contextmanager
def training_model(model_id: str):
    """A plain base model of the worker's own for training curves (never the slot model: no nested LoRA)."""
    if _WORKER.get("train_model_id") != model_id:
        from .models import load_model

        _WORKER.update(train_model=load_model(model_id), train_model_id=model_id)
    yield _WORKER["train_model"]


def slot_model(model_id: str, modules: list[str], slots: int, rank: int) -> SlotModel:
    """The worker's SlotModel, rebuilt (base model kept) only when more slots or a higher rank are needed."""
    current = _WORKER.get("slots")
    if current is None or not current.fits(model_id, modules, slots, rank):
        if current is not None:
            current.release()
            rank, slots = max(rank, current.rank), max(slots, len(current.names))
        _WORKER["slots"] = SlotModel(model_id, modules, slots, rank)
    return _WORKER["slots"]


def llamacpp_model(model_id: str, threads: int):
    """The worker's llama.cpp model (loaded once; its adapters change per evaluation)."""
    from .llamacpp import LlamaCppModel

    current = _WORKER.get("llamacpp")
    if current is None or current.model_id != model_id:
        if current is not None:
            current.close()
        _WORKER["llamacpp"] = current = LlamaCppModel(model_id, n_threads=threads)
        atexit.register(current.close)  # before interpreter teardown unloads llama_cpp under __del__
    return current


def run_entry(job: EntryJob, on_record=None) -> int:
    """Compute the missing records of one entry; returns how many were written."""
    from .dataset import load_dataset

    bank = Bank.open(job.bank)
    store = RecordStore(Path(job.results))
    done = store.load(job.entry)
    specs = [parse_setting(s) for s in job.settings]
    slots = [s for s in slots_for(specs, job.holdouts, job.train_steps) if (s.holdout, s.label) not in done]
    if not slots:
        return 0
    entry = bank.entry(job.entry)
    dataset = load_dataset(bank.dataset_path(entry), name=entry.name)
    plan = EntryPlan(bank, entry.name, dataset, job.matrices, Path(job.results) / "ce", job.seed, job.neural_hidden,
                     job.neural_epochs)
    # per evaluation, the record that was charged its cost (the largest seconds_adapter): cost_s reads it
    charged = sorted(done.values(), key=lambda r: r["seconds_adapter"])
    evaluator = EntryEvaluator(bank, entry, dataset, job, {r["eval_key"]: r for r in charged})
    items = []
    for slot in slots:
        c, info = evaluator.validated(plan, slot.holdout) if slot.control == "validated" else plan.coefficients(slot)
        items.append((slot, c, info, eval_key(c, slot.combine, slot.rank, bank.names, slot)))
    return evaluator.run(items, store, on_record)


class EntryEvaluator:
    """Builds an entry's distinct adapters, answers its test sample under all of them, writes records."""

    def __init__(self, bank: Bank, entry, dataset, job: EntryJob, known: dict[str, dict]):
        from .evaluate import max_new_tokens_for
        from .models import load_tokenizer

        self.bank, self.entry, self.job, self.known = bank, entry, job, dict(known)
        self.examples = test_sample(dataset, job.n, job.seed)
        self.tokenizer = load_tokenizer(bank.manifest.base_model)
        refs = [e.target for e in (dataset.splits.get("train") or self.examples)]
        self.budget = max_new_tokens_for(self.tokenizer, refs, cap=job.max_new_tokens)
        self._charged = set(known)  # evaluations whose cost an earlier record already carries
        self.per_chunk = max(1, job.batch_size // max(1, len(self.examples)))  # adapters decoded together

    def run(self, items, store: RecordStore, on_record) -> int:
        written = 0

        def flush(ready: set[str]) -> None:
            nonlocal written
            for slot, c, info, key in items:
                if key in ready and not store.path(self.entry.name, slot.holdout, slot.label).exists():
                    store.write(self.record(slot, c, info, key))
                    written += 1
                    if on_record:
                        on_record()

        flush(set(self.known))
        pending = list(dict.fromkeys(key for _, _, _, key in items if key not in self.known))
        recipes = {key: (c, slot.combine, slot.rank) for slot, c, _, key in items}
        for start in range(0, len(pending), self.per_chunk):
            chunk = pending[start : start + self.per_chunk]
            self.evaluate(chunk, recipes)
            flush(set(chunk))
        return written

    def factors(self, key: str, recipe) -> dict:
        """The adapter of an evaluation key, module by module (a one-hot key is the bank adapter itself)."""
        from .generate import combination

        c, combine, rank = recipe
        if isinstance(c, dict):  # trained factors
            return c
        coefs = {n: float(w) for n, w in zip(self.bank.names, c)}
        return combination(self.bank, coefs, "cat" if key.startswith("bank:") else combine, rank,
                           readers=_readers(self.bank))

    def evaluate(self, keys: list[str], recipes: dict) -> None:
        """One pass over the test sample for these keys (mixed-adapter batches); scores go into `known`."""
        from .evaluate import Scores

        t0 = time.perf_counter()
        adapters = {k: self.factors(k, recipes[k]) for k in keys if k != "base"}
        combining = time.perf_counter() - t0
        answers, build, generating = self.answer(adapters, keys, self.examples, self.budget)
        build = (combining + build) / max(1, len(adapters))
        for j, key in enumerate(keys):
            mine = answers[j * len(self.examples) : (j + 1) * len(self.examples)]
            self.known[key] = {**asdict(Scores.of(mine, self.examples)), "answers": mine,
                               "seconds_generate": round(generating / len(keys), 3),
                               "seconds_adapter": round(build if key != "base" else 0.0, 3)}

    def answer(self, adapters: dict, keys: list[str], examples: list, budget: int) -> tuple[list[str], float, float]:
        """Every key's answers to the examples, key after key: (answers, seconds building, seconds generating)."""
        generate = self._llamacpp if self.job.backend == "llamacpp" else self._torch
        return generate(adapters, [(k, e) for k in keys for e in examples], budget)

    def validated(self, plan: EntryPlan, holdout: str) -> tuple[np.ndarray | None, dict]:
        """`generate`'s validated selection under this holdout: the default setting's pick, the nearest adapter,
        the uniform average and no adapter answer the entry's validation examples (`split_validation`, as
        `generate` takes them, never the test sample nor the train examples the settings saw); the best by
        Rouge-L is the record's adapter (None: the
        base model, what a user told "no gain" keeps). Its passes add the validation's tokens, prompts and
        answers, in units of the 16 train examples' tokens."""
        from .evaluate import max_new_tokens_for
        from .prompts import prompt_ids, training_pair
        from .validate import NO_ADAPTER, Candidate, choose, split_validation

        names = self.bank.names
        _, held, where = split_validation(validation_pool(plan.dataset), self.job.seed)
        picks = [("setting's pick", Slot(holdout, Spec(DEFAULT_SETTING).label, "", Spec(DEFAULT_SETTING), "svd")),
                 ("nearest", Slot(holdout, Spec(NEAREST).label, "", Spec(NEAREST), "svd")),
                 ("uniform", Slot(holdout, uniform_label("svd", None), "uniform", None, "svd"))]
        made = {}
        for name, slot in picks:
            c, info = plan.coefficients(slot)
            made.setdefault(eval_key(c, "svd", None, names), (name, slot.label, c, info))
        made["base"] = (NO_ADAPTER, "", None, {})
        t0 = time.perf_counter()
        keys = list(made)
        adapters = {k: self.factors(k, (made[k][2], "svd", None)) for k in keys if k != "base"}
        answers, _, _ = self.answer(adapters, keys, held, max_new_tokens_for(self.tokenizer, [e.target for e in held]))
        per_key = {k: answers[j * len(held) : (j + 1) * len(held)] for j, k in enumerate(keys)}
        by_name = {made[k][0]: k for k in keys}
        verdict = choose([Candidate(n, label, None if c is None else {}) for n, label, c, _ in made.values()],
                         lambda cand: per_key[by_name[cand.name]], held, where, uncertain=False,
                         backend=self.job.backend, seed=self.job.seed)
        seconds = time.perf_counter() - t0
        prompts = sum(len(prompt_ids(self.tokenizer, e)) for e in held) * len(keys)
        answered = sum(len(self.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
        unit = sum(len(p) + len(t) for p, t in (training_pair(self.tokenizer, e)
                                                 for e in plan.dataset.split("train")[:CE_EXAMPLES]))
        _, _, c, info = made[by_name[verdict.chosen]]
        pick = made[by_name["setting's pick"]][3]
        return c, {"excluded": pick.get("excluded", []), "model_s": pick.get("model_s", 0.0) + seconds,
                   "passes": pick.get("passes", 0) + round((prompts + answered) / unit, 2),
                   "validation": {"chosen": verdict.chosen, "scores": verdict.scores, "examples": where, "n": verdict.n}}

    def _torch(self, adapters: dict, rows: list, budget: int) -> tuple[list[str], float, float]:
        """Answers from the slot model: (answers, seconds filling slots, seconds generating)."""
        from .evaluate import generate_answers

        readers = _readers(self.bank)
        modules = next(iter(readers.values())).modules
        rank = max([f.rank for a in adapters.values() for f in a.values()] or [1])
        sm = slot_model(self.bank.manifest.base_model, modules, max(self.per_chunk, len(adapters)), rank)
        slot_of = {}
        t0 = time.perf_counter()  # the slot model's first build (a model load) is no adapter's cost
        for j, (k, a) in enumerate(adapters.items()):
            sm.fill(j, a)
            slot_of[k] = sm.names[j]
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        answers = generate_answers(sm.model, self.tokenizer, [e for _, e in rows], max_new_tokens=budget,
                                   batch_size=self.job.batch_size, adapter_names=[slot_of.get(k, "__base__") for k, _ in rows])
        return answers, build, time.perf_counter() - t0

    def _llamacpp(self, adapters: dict, rows: list, budget: int) -> tuple[list[str], float, float]:
        """Answers from llama.cpp, each adapter written as a GGUF LoRA to a temporary dir and loaded
        (a few milliseconds for SmolLM2's q/v factors): (answers, seconds exporting, seconds generating)."""
        import tempfile

        from .gguf_export import write_gguf
        from .llamacpp import BASE

        lm = llamacpp_model(self.bank.manifest.base_model, self.job.threads)
        with tempfile.TemporaryDirectory(prefix="lorablend-bench-") as tmp:
            t0 = time.perf_counter()
            files = {k: write_gguf(a, self.bank.manifest.base_model, Path(tmp) / f"{j}.gguf")
                     for j, (k, a) in enumerate(adapters.items())}
            lm.load_gguf_adapters(files)
            build = time.perf_counter() - t0
        t0 = time.perf_counter()
        answers = lm.generate_answers(self.tokenizer, [e for _, e in rows], max_new_tokens=budget,
                                      adapter_names=[k if k in adapters else BASE for k, _ in rows])
        return answers, build, time.perf_counter() - t0

    def record(self, slot: Slot, c, info: dict, key: str) -> dict:
        """The record of one slot. An evaluation's cost is charged to the first record that uses it; cost_s,
        what `generate` would spend on this adapter (forward passes for ce/rerank/fit, then the combination),
        is in every record but the base model's."""
        ev = self.known[key]
        fresh = key not in self._charged
        self._charged.add(key)
        cost = ({"seconds_generate": ev["seconds_generate"], "seconds_adapter": ev["seconds_adapter"], "reused": False}
                if fresh else {"seconds_generate": 0.0, "seconds_adapter": 0.0, "reused": True})
        s = slot.spec.setting if slot.spec else None
        chosen = slot.control == "validated"  # the base model chosen by validation still cost the selection
        sketch, metric = slot.sketch_metric or ((s.sketch, s.metric) if s else ("", ""))
        return {
            "entry": self.entry.name, "family": self.entry.family, "holdout": slot.holdout, "label": slot.label,
            "control": slot.control, "setting": slot.spec.label if slot.spec else "", "sketch": sketch,
            "metric": metric, "combine": slot.combine or "", "rank": slot.rank,
            "temperature": info.get("temperature"), "top_k": info.get("top_k"), "eval_key": key,
            "max_new_tokens": self.budget, **{k: ev[k] for k in ("rouge_l", "rouge_lsum", "exact_match", "n", "answers")},
            **cost, "cost_s": None if c is None and not chosen else round(info.get("model_s", 0.0) + ev["seconds_adapter"], 3),
            "passes": None if c is None and not chosen else info.get("passes", 0),
            "coefficients": {} if c is None or isinstance(c, dict) else {n: float(w) for n, w in zip(self.bank.names, c)
                                                                         if w > 0},
            "training": info.get("training"), "blend": info.get("blend"), "validation": info.get("validation"),
            "excluded": info.get("excluded", []), "neural_trained_on": info.get("neural_trained_on"),
        }


# --------------------------------------------------------------------------- #
# The run: plan, execute (in process, process pool or Ray), export
# --------------------------------------------------------------------------- #


@dataclass
class BenchConfig:
    """A bench run. None for entries / holdouts / n means the presets' defaults (see `resolve`)."""

    bank: str
    results: Path = Path("bench-results")
    presets: tuple[str, ...] = DEFAULT_PRESETS
    settings: tuple[str, ...] = ()
    entries: tuple[str, ...] | None = None
    holdouts: tuple[str, ...] | None = None
    n: int | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int = 0
    batch_size: int = 16
    jobs: int = 1
    threads: int | None = None  # torch threads per job (default: cores // jobs)
    executor: str = "local"  # local | ray
    ray_address: str | None = None
    backend: str = "auto"  # torch | llamacpp | auto (llama.cpp when installed and the model has a GGUF)
    neural_hidden: int = 64
    neural_epochs: int = 40
    train_steps: tuple[int, ...] = ()  # the training curve: train/K and refine/K records (slots_for)
    command: str = ""


class Reporter:
    """What the CLI shows; the default shows nothing."""

    def start(self, total: int) -> None: ...

    def advance(self, k: int = 1) -> None: ...

    def status(self, message: str) -> None: ...


@dataclass
class BenchRun:
    results: Path
    csv: Path
    written: int
    total: int
    seconds: float


def resolve(cfg: BenchConfig, bank: Bank) -> tuple[list[Spec], list[str], tuple[str, ...], int, str]:
    """Settings, entries, holdouts, N and backend: the quick preset defaults to one entry per family,
    holdout entry and QUICK_N examples; otherwise every entry, both holdouts and DEFAULT_N."""
    specs = preset_specs(list(cfg.presets), list(cfg.settings))
    if not specs:
        raise InputError("no settings to run: give --preset or --settings")
    quick = "quick" in cfg.presets
    entries = list(cfg.entries) if cfg.entries else (bank.first_of_each_family() if quick else bank.names)
    unknown = [e for e in entries if e not in bank.names]
    if unknown:
        raise InputError(f"--entries: no bank entry named {unknown[0]}; see `lorablend bank info {bank.root}`")
    holdouts = tuple(cfg.holdouts) if cfg.holdouts else (("entry",) if quick else HOLDOUTS)
    bad = [h for h in holdouts if h not in HOLDOUTS]
    if bad:
        from .errors import suggest

        raise suggest(bad[0], HOLDOUTS, "holdout")
    n = cfg.n or (QUICK_N if quick else DEFAULT_N)
    if cfg.executor not in ("local", "ray"):
        raise InputError(f"unknown --executor '{cfg.executor}'; choose local or ray")
    if n < 1 or cfg.max_new_tokens < 1 or cfg.batch_size < 1 or cfg.jobs < 1:
        raise InputError("--n, --max-new-tokens, --batch-size and --jobs must be >= 1")
    if len(bank.entries) < 4:
        raise InputError(f"{bank.root}: the bench needs a bank of at least 4 entries")
    from .llamacpp import resolve_backend

    return specs, entries, holdouts, n, resolve_backend(cfg.backend, bank.manifest.base_model)


def pin_config(results: Path, bank: Bank, cfg: BenchConfig, n: int, backend: str) -> None:
    """RESULTS/config.json: what the records depend on. A different run refuses to mix with them."""
    from . import __version__

    want = {"bank": str(bank.root.resolve()), "bank_manifest_sha256": bank.sha256, "n": n,
            "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "neural_hidden": cfg.neural_hidden,
            "neural_epochs": cfg.neural_epochs, "prune": PRUNE, "backend": backend}
    path = results / "config.json"
    if path.exists():
        have = json.loads(path.read_text(encoding="utf-8"))
        diff = [k for k in want if have.get(k) != want[k]]
        if diff:
            raise InputError(f"{results}: holds records made with another {diff[0]} ({have.get(diff[0])!r}, now "
                             f"{want[diff[0]]!r}); use another --results or remove that directory")
        return
    write_json(path, {**want, "lorablend_version": __version__})


def run_bench(cfg: BenchConfig, reporter: Reporter | None = None) -> BenchRun:
    """Compute every missing record, then export scores.csv and coefficients.json into the results dir."""
    reporter = reporter or Reporter()
    t0, started = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    bank = Bank.open(cfg.bank)
    specs, entries, holdouts, n, backend = resolve(cfg, bank)
    results = Path(cfg.results)
    pin_config(results, bank, cfg, n, backend)
    store = RecordStore(results)
    if not store.count() and (results / "scores.csv").exists():
        reporter.status(f"restored {store.restore(results / 'scores.csv')} records from {results / 'scores.csv'}")
    slots = slots_for(specs, holdouts, cfg.train_steps)
    missing = store.missing(entries, slots)
    todo = [e for e in entries if missing[e]]
    reporter.start(sum(missing.values()))
    before, finished = store.count(), False
    try:
        matrices = compute_matrices(bank, candidate_specs(specs, cfg.train_steps), results / "matrices", cfg.seed,
                                    reporter.status)
        if todo:
            jobs = [EntryJob(str(bank.root), e, [s.label for s in specs], holdouts, str(results), matrices, n,
                             cfg.max_new_tokens, cfg.seed, cfg.batch_size, cfg.neural_hidden, cfg.neural_epochs,
                             backend, cfg.threads or threads_per_job(cfg.jobs), cfg.train_steps)
                    for e in todo]
            reporter.status(f"records ({len(todo)} entries to run)")
            execute(jobs, cfg, store, reporter.advance)
        write_recall(bank, specs, holdouts, matrices, results)
        finished = True
    finally:  # an interrupted run is logged too: its wall time counts in the report
        seconds = time.perf_counter() - t0
        total = len(entries) * len(slots)
        log_run(results, cfg, n, backend, started, seconds, store.count() - before, finished,
                (total - sum(store.missing(entries, slots).values()), total))
    return BenchRun(results, export(store, results), store.count() - before, len(entries) * len(slots), seconds)


def threads_per_job(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // jobs)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def execute(jobs: list[EntryJob], cfg: BenchConfig, store: RecordStore, advance) -> None:
    """Run the entries in this process, a local process pool (`--jobs`) or as Ray tasks."""
    threads = cfg.threads or threads_per_job(cfg.jobs)
    if cfg.executor == "ray":
        _execute_ray(jobs, cfg, threads, store, advance)
    elif cfg.jobs > 1:
        _execute_pool(jobs, cfg.jobs, threads, store, advance)
    else:
        _init_worker(threads)
        for job in jobs:
            run_entry(job, on_record=lambda: advance(1))


def _watch(wait_some, store: RecordStore, advance, interval: float = 1.0) -> None:
    """Advance the progress bar by the records workers have written until `wait_some(interval)` says all are done."""
    seen, finished = store.count(), False
    while not finished:
        finished = wait_some(interval)
        now = store.count()
        advance(now - seen)
        seen = now


def _execute_pool(jobs: list[EntryJob], workers: int, threads: int, store: RecordStore, advance) -> None:
    """Entries over local processes (spawned: forking a process that has used torch threads can hang)."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = [pool.submit(run_entry, job) for job in jobs]

        def wait_some(timeout: float) -> bool:
            done, pending = wait(futures, timeout=timeout, return_when=FIRST_EXCEPTION)
            for f in done:
                f.result()  # re-raise a worker's error here
            return not pending

        try:
            _watch(wait_some, store, advance)
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _ray_entry(job: EntryJob, threads: int) -> int:
    """A Ray task: one entry in a Ray worker (which keeps its model between tasks, like a pool worker)."""
    _init_worker(threads)
    return run_entry(job)


def _execute_ray(jobs: list[EntryJob], cfg: BenchConfig, threads: int, store: RecordStore, advance) -> None:
    """Entries as Ray tasks on `--ray-address` (default: a local instance, shut down afterwards).

    Workers read the bank and write records by path: on a cluster, the bank and the results dir
    must be on a filesystem every node sees at the same path.
    """
    try:
        import ray
    except ImportError:
        raise InputError("--executor ray needs Ray: pip install 'lorablend[ray]'") from None
    started = not ray.is_initialized()
    if started and cfg.ray_address:
        ray.init(address=cfg.ray_address, log_to_driver=False, logging_level="ERROR")
    elif started:  # a local instance (its workers inherit this process's environment: cache, offline mode)
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        task = ray.remote(num_cpus=threads)(_ray_entry)
        pending = [task.remote(job, threads) for job in jobs]

        def wait_some(timeout: float) -> bool:
            nonlocal pending
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=timeout)
            ray.get(ready)  # re-raise a task's error here
            return not pending

        _watch(wait_some, store, advance)
    finally:
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------- #
# Export: scores.csv, coefficients.json, run.json
# --------------------------------------------------------------------------- #

CSV_COLUMNS = ("entry", "family", "holdout", "label", "setting", "control", "sketch", "metric", "combine", "rank",
               "temperature", "top_k", "rouge_l", "rouge_lsum", "exact_match", "n", "max_new_tokens",
               "seconds_generate", "seconds_adapter", "reused", "cost_s", "passes", "eval_key")


def export(store: RecordStore, results: Path) -> Path:
    """Every record as a row of scores.csv, and the coefficient vectors as coefficients.json
    ({holdout: {label: {entry: {bank entry: weight}}}}), both written atomically."""
    import csv
    import io

    from .atomic import atomic_file

    records = sorted(store.all(), key=lambda r: (r["entry"], r["holdout"], r["label"]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS} for r in records)
    path = results / "scores.csv"
    with atomic_file(path, "w") as fh:
        fh.write(buf.getvalue())
    coefs: dict = {}
    for r in records:
        coefs.setdefault(r["holdout"], {}).setdefault(r["label"], {})[r["entry"]] = r["coefficients"]
    write_json(results / "coefficients.json", coefs)
    return path


RECALL_M = (1, 2, 4, 6, 8, 10, 12, 16)


def write_recall(bank: Bank, specs: list[Spec], holdouts: tuple[str, ...], matrices: Matrices, results: Path) -> Path | None:
    """RESULTS/recall.csv: for every entry with cached ce (and grad) rows, every rerank retriever of the
    settings and holdout, whether its top m holds the exact-ce best adapter (m in RECALL_M)."""
    import csv
    import io

    from .atomic import atomic_file
    from .dataset import load_dataset

    retrievers = list(dict.fromkeys((s.setting.sketch, s.setting.metric) for s in specs if s.setting.rerank))

    def cached(kind: str) -> set[str]:  # ENTRY.k16.SHA.json (ce), ENTRY.grad.k16.SHA.json
        files = (results / "ce").glob(f"*.k{CE_EXAMPLES}.{bank.sha256[:16]}.json")
        return {p.name.split(".")[0] for p in files if p.name.split(".")[1] == kind}

    done = cached(f"k{CE_EXAMPLES}")
    if any(m.startswith("grad") for _, m in retrievers):
        done &= cached("grad")
    entries = [e for e in bank.names if e in done]
    if not retrievers or not entries:
        return None
    rows = []
    for e in entries:
        plan = EntryPlan(bank, e, load_dataset(bank.dataset_path(bank.entry(e)), name=e), matrices, results / "ce")
        rows += [r for h in holdouts for ret in retrievers for r in plan.recall(h, ret, RECALL_M)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = results / "recall.csv"
    with atomic_file(path, "w") as fh:
        fh.write(buf.getvalue())
    return path


def machine() -> dict:
    """nproc, RAM and CPU model, for the report."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram = float("nan")
    import torch

    return {"nproc": os.cpu_count(), "ram_gib": round(ram, 1), "cpu": cpu, "python": platform.python_version(),
            "torch": torch.__version__}


def log_run(results: Path, cfg: BenchConfig, n: int, backend: str, started: str, seconds: float, written: int,
            finished: bool, records: tuple[int, int]) -> None:
    """Append this invocation to RESULTS/run.json (the report sums wall time over resumed runs).

    `records`: how many of this invocation's records exist after it, of how many it asked for.
    """
    path = results / "run.json"
    runs = json.loads(path.read_text(encoding="utf-8"))["runs"] if path.exists() else []
    runs.append({"command": cfg.command or " ".join(sys.argv), "started_utc": started, "wall_seconds": round(seconds, 1),
                 "records_written": written, "records_present": records[0], "records_total": records[1], "finished": finished, "n": n, "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size,
                 "jobs": cfg.jobs, "threads": cfg.threads or threads_per_job(cfg.jobs), "executor": cfg.executor, "backend": backend,
                 "machine": machine()})
    write_json(path, {"runs": runs})
