"""One entry of the study: the coefficients of each of its slots, and the run of its missing records."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lorablend.atomic import write_json
from lorablend.bank import fit as bank_fit
from lorablend.bank.manifest import Bank
from lorablend.bench.plan import DEFAULT_MAX_NEW_TOKENS, DEFAULT_N, Matrices, Slot, one_hot, prune
from lorablend.bench.worker import WORKER
from lorablend.generate import coefficient_row, exclusions, mixture_scorer, retrieve
from lorablend.runtime.recipes import STEP_PASSES
from lorablend.runtime.scoring import CE_EXAMPLES, FIRST_ORDER_PASSES
from lorablend.settings import DEFAULT_SETTING, Setting


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

    def neural(self, holdout: str, spec: Setting):
        """The paper's MLP fitted on the bank without this entry (and its family): (operator, names trained on)."""
        from lorablend.coefficients import NeuralConfig

        s = spec

        def fit():
            cfg = NeuralConfig(hidden=self.neural_hidden, epochs=self.neural_epochs, seed=self.seed,
                               sketch=s.sketch, metric=s.distance, space=spec.space)
            op, train, _ = bank_fit.fit_meta(self.bank, cfg, holdout=0.0, exclude=self.excluded(holdout),
                                            D=self.m.D[(s.sketch, s.distance)], G=self.m.G[spec.space], save=False)
            return op, [self.bank.names[j] for j in train]

        return self._cached(("neural", holdout, s.sketch, s.distance, spec.space), fit)

    def calibration(self, holdout: str, spec: Setting):
        """(T, top-k) for an `auto` setting, chosen on the bank without this entry (and its family)."""
        from lorablend.bank.calibrate import calibrate

        s = spec
        families = [e.family for e in self.bank.entries] if holdout == "family" else None
        return self._cached(("cal", holdout, s.sketch, s.distance, s.operator, spec.space),
                            lambda: calibrate(self.m.D[(s.sketch, s.distance)], self.m.G[spec.space],
                                              self.usable(holdout), s.operator, families))

    def concrete(self, holdout: str, spec: Setting) -> Setting:
        """The setting as run for this entry: calibrated (T, k) for `auto`, k capped at the candidates left
        (a family holdout can leave fewer than k; a rerank keeps m)."""
        s = spec
        if spec.auto:
            cal = self.calibration(holdout, spec)
            s = replace(s, temperature=cal.temperature, top_k=cal.top_k, auto=False)
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
        from lorablend.runtime.models import load_tokenizer
        from lorablend.runtime.train import train_factors

        init, info = None, {"passes": STEP_PASSES * slot.steps, "model_s": 0.0}
        if slot.control == "refine":
            init, c, blend = self.blend(slot.holdout)
            info.update(excluded=blend["excluded"], model_s=blend["model_s"], passes=info["passes"] + blend["passes"],
                        blend={n: float(w) for n, w in zip(self.bank.names, c) if w > 0})
        with WORKER.training_model(self.bank.manifest.base_model) as model:
            factors, record = train_factors(model, load_tokenizer(self.bank.manifest.base_model),
                                            self.dataset.split("train")[:CE_EXAMPLES], slot.steps, self.seed, init)
        info["model_s"] += record["seconds"]
        info["training"] = record
        return factors, info

    def blend(self, holdout: str):
        """The default setting's adapter under this holdout: (its factors, its coefficients, its record info)."""
        from lorablend.bank.combination import combination

        def make():
            spec = DEFAULT_SETTING
            c, info = self.coefficients(Slot(holdout, spec.label, "", spec, DEFAULT_SETTING.combine))
            return combination(self.bank, {n: float(w) for n, w in zip(self.bank.names, c)}, DEFAULT_SETTING.combine,
                               readers=WORKER.readers(self.bank)), c, info

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
    from lorablend.generate import first_order_scorer

    readers = WORKER.readers(bank)
    with WORKER.scoring_model(bank.manifest.base_model) as model:
        scorer = first_order_scorer(bank, readers[names[0]].modules, dataset, CE_EXAMPLES, model)
        timing.update(backward_s=scorer.seconds, backward_cpu_s=scorer.cpu_seconds)
        return scorer.scores([readers[n] for n in names])


def with_scorer(bank: Bank, names: list[str], dataset, use):
    """`use(MixtureScorer)` over these candidates and the first CE_EXAMPLES train examples, on the worker's
    base model with cached bank factors; the scorer's hooks are removed afterwards."""
    with WORKER.scoring_model(bank.manifest.base_model) as model:
        scorer = mixture_scorer(bank, names, dataset, CE_EXAMPLES, model=model, readers=WORKER.readers(bank))
        try:
            return use(scorer)
        finally:
            scorer.close()


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


