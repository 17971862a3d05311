"""What a bench run computes: presets, the slots (records) of an entry, the bank matrices they share, and the
evaluation key that lets identical adapters be evaluated once."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorablend.bank import matrices
from lorablend.bank.manifest import Bank
from lorablend.settings import DEFAULT_SETTING, NEAREST, Setting, parse_setting

HOLDOUTS = ("entry", "family")
_PAPER_METRICS = ("wd", "kl", "js", "mmd")
PRESETS = {  # what each is for, and what it costs: docs/BENCH.md
    "paper": tuple(f"tokens/{m}/{op}/paper/T1" for m in _PAPER_METRICS for op in ("attentional", "normalized", "neural")),
    "best": tuple(f"embeddings/{m}/normalized/svd/auto" for m in _PAPER_METRICS) + (
        "target-tokens/js/normalized/svd/auto",
        "target-tokens/js/normalized/svd/T1/top1",
    ),
    "labelled": (
        "embeddings/js/normalized/svd/auto/rerank16",
        "target-tokens/js/normalized/svd/auto/rerank16",
        "target-tokens/js/normalized/svd/T1/top1/rerank16",
        "target-tokens/js/normalized/svd/T1/top1/rerank8",
        "tokens/ce/normalized/svd/T1/top8",
        "target-tokens/js/fit/svd/T1/top4/rerank16",
        "tokens/grad/normalized/svd/T1/top1",
        "tokens/grad/normalized/svd/T1/top1/rerank8",
        "target-tokens/grad+js/normalized/svd/T1/top1/rerank8",
        "target-tokens/grad+js/normalized/svd/T1/top1/rerank16",
    ),
    "quick": ("tokens/js/normalized/paper/T1", "embeddings/js/normalized/svd/auto"),
}


DEFAULT_PRESETS = ("paper", "best")
DEFAULT_N = 4  # test examples per entry for the default presets (their cost: docs/BENCH.md)
DEFAULT_MAX_NEW_TOKENS = 32
QUICK_N = 15  # the quick preset: one entry per family (10 on the default bank), holdout entry
PRUNE = 1e-6
CONTROLS = ("base", "own", "uniform", "random-k", "nearest", "best-ce", "train", "refine", "validated")


def preset_specs(presets: list[str], settings: list[str]) -> list[Setting]:
    """The settings of the named presets plus explicit ones, without duplicates, in order."""
    texts: list[str] = []
    for p in presets:
        if p not in PRESETS:
            from lorablend.errors import suggest

            raise suggest(p, tuple(PRESETS), "preset")
        texts += PRESETS[p]
    specs = [parse_setting(t) for t in texts + list(settings)]
    return list({s.label: s for s in specs}.values())


@dataclass(frozen=True)
class Slot:
    """One record to compute for an entry: a setting or a control under one holdout ('-': none applies)."""

    holdout: str
    label: str
    control: str = ""  # "" for a setting, else one of CONTROLS
    spec: Setting | None = None  # the setting, or the setting a random-k control is paired with
    combine: str | None = None
    rank: int | None = None
    sketch_metric: tuple[str, str] | None = None  # nearest: whose distance; best-ce: ("", "ce")
    steps: int | None = None  # train / refine: training steps on the entry's first CE_EXAMPLES train examples


def uniform_label(combine: str, rank: int | None) -> str:
    return f"uniform/{combine}" + (f"/r{rank}" if rank else "")


def distributional(specs: list[Setting]) -> list[tuple[str, str]]:
    """The (sketch, metric) pairs with a distance matrix: every distance but ce and grad (whose nearest is
    best-ce and the grad setting's top-1); js for grad+js."""
    return list(dict.fromkeys((s.sketch, s.distance) for s in specs if s.distance))


def slots_for(specs: list[Setting], holdouts: tuple[str, ...], train_steps: tuple[int, ...] = ()) -> list[Slot]:
    """Every record of one entry, known before any coefficient is computed (so resumption can count).
    `train_steps`: the training curve, a LoRA trained from zero (`train/K`, no bank) and one refined from the
    default setting's blend (`refine/K`, per holdout) for K steps on the examples the model-aware settings see."""
    slots = [Slot("-", "base", "base"), Slot("-", "own", "own")]
    slots += [Slot("-", f"train/{k}", "train", steps=k) for k in train_steps]
    combos = list(dict.fromkeys((s.combine, s.rank) for s in specs))
    dists = distributional(specs)
    model_based = any(s.uses_model for s in specs)
    for h in holdouts:
        slots += [Slot(h, s.label, "", s, s.combine, s.rank) for s in specs]
        slots += [Slot(h, uniform_label(c, r), "uniform", None, c, r) for c, r in combos]
        slots += [Slot(h, f"random-k/{s.label}", "random-k", s, s.combine, s.rank)
                  for s in specs if s.has_top_k]
        slots += [Slot(h, f"nearest/{sk}/{m}", "nearest", sketch_metric=(sk, m)) for sk, m in dists]
        slots += [Slot(h, "best-ce", "best-ce", sketch_metric=("", "ce"))] if model_based else []
        slots += [Slot(h, f"refine/{k}", "refine", steps=k) for k in train_steps]
        slots += [Slot(h, "validated", "validated", combine=DEFAULT_SETTING.combine)] if validating(specs) else []
    return slots


def validating(specs: list[Setting]) -> bool:
    """Whether the run holds `generate`'s validated selection: its candidates are the default setting's pick,
    the nearest adapter, the uniform average and no adapter, so it comes with the default setting."""
    return DEFAULT_SETTING.label in {s.label for s in specs}


def candidate_specs(specs: list[Setting], train_steps: tuple[int, ...] = ()) -> list[Setting]:
    """The settings whose coefficients the run computes: its own, plus the default for refine/K's blend and
    the nearest adapter for validation."""
    extra = ([DEFAULT_SETTING] if train_steps else []) + ([NEAREST] if validating(specs) else [])
    return specs + extra


@dataclass
class Matrices:
    """Distances between bank datasets per (sketch, metric) and Gram matrices per space, computed once."""

    D: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    G: dict[str, np.ndarray] = field(default_factory=dict)


def needed(specs: list[Setting]) -> tuple[list[tuple[str, str]], list[str]]:
    """The (sketch, metric) pairs whose distances the settings and nearest controls use, and the Gram
    spaces the neural fits and calibrations need."""
    spaces = list(dict.fromkeys(s.space for s in specs if s.auto or s.operator == "neural"))
    return distributional(specs), spaces


def compute_matrices(bank: Bank, specs: list[Setting], cache: Path, seed: int, status=None) -> Matrices:
    """D and G for the settings, cached in RESULTS/matrices/ (config.json pins the bank they belong to)."""
    dists, spaces = needed(specs)
    out = Matrices()
    for sk, m in dists:
        out.D[(sk, m)] = matrices.cached_array(cache / f"D-{sk}-{m}.npy",
                                              lambda: matrices.distance_matrix(bank, sk, m, seed), status)
    for sp in spaces:
        out.G[sp] = matrices.cached_array(cache / f"G-{sp}.npy", lambda: matrices.gram(bank, sp), status)
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
