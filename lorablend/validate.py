"""Validated selection: the user's own held-out examples choose among a few adapters, and say whether any helps.

A setting's pick is a guess measured on the bank's tasks; on the user's task a simpler candidate, or
no adapter at all, can be better. So a slice of the user's labelled examples is kept apart from
everything the setting selects or fits on (`split_validation`), each candidate answers it greedily
with the fast backend, in `eval`'s prompt format, and the best by Rouge-L is written. The verdict
(every candidate's score, the base model's, the gain with its paired bootstrap interval over the
examples) is shown, written to lorablend.json and returned.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from lorablend.dataset import Dataset, Example

VALIDATION_EXAMPLES = 32  # examples scored per candidate: ~a few seconds each on SmolLM2 with llama.cpp
FEW_EXAMPLES = 24  # below this many in all, the verdict is flagged as uncertain (its interval is wide)
NO_ADAPTER = "no adapter"
PICK, NEAREST_PICK, UNIFORM = "setting's pick", "nearest", "uniform"  # the other candidates, by name


@dataclass(frozen=True)
class Candidate:
    """An adapter to try: how it was made, and its bank coefficients or its own factors (neither: the base model)."""

    name: str
    setting: str
    coefficients: dict[str, float] | None
    factors: dict | None = field(default=None, compare=False)  # module -> Factors, e.g. a trained LoRA

    @property
    def is_adapter(self) -> bool:
        return self.coefficients is not None or self.factors is not None


@dataclass
class Verdict:
    """What validation found; `chosen` may be NO_ADAPTER while `written` is the best adapter."""

    scores: dict[str, float]  # candidate name -> mean Rouge-L on the validation examples
    settings: dict[str, str]  # candidate name -> the setting that made it
    chosen: str
    written: str
    base: float
    gain: tuple[float, float, float]  # written − base: mean and 95 % paired bootstrap interval over the examples
    examples: dict  # where the validation examples came from: {"split": ..., "indices": [...]}
    n: int
    uncertain: bool  # too few examples in all for a firm verdict
    backend: str
    seconds: dict[str, float] = field(default_factory=dict)  # per candidate (not written to lorablend.json)
    reused: tuple[str, ...] = ()  # candidates answered by an earlier validation: their seconds were spent there

    @property
    def reused_seconds(self) -> float:
        """What the reused answers took where they were computed: spent there, not here."""
        return sum(self.seconds[name] for name in self.reused)

    @property
    def helps(self) -> bool:
        """Whether the written adapter beat the base model on the validation examples."""
        return self.chosen != NO_ADAPTER and self.gain[0] > 0

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("seconds", "reused")} | {"helps": self.helps}


def kept(coefs: dict[str, float]) -> dict[str, float]:
    """The coefficients that make an adapter, rounded: two candidates with equal `kept` are the same adapter."""
    return {n: round(w, 9) for n, w in coefs.items() if w > 1e-9}


def answers_key(cand: Candidate, model_id: str, examples: list[Example], max_new_tokens: int, combine: str,
                rank: int | None, backend: str) -> str:
    """Everything a candidate's greedy answers depend on, hashed: equal keys give equal answers."""
    h = hashlib.sha256(json.dumps([model_id, backend, max_new_tokens, combine, rank,
                                   [[e.instruction, e.input] for e in examples]]).encode())
    if cand.factors is not None:
        for module in sorted(cand.factors):
            f = cand.factors[module]
            h.update(f"{module}:{f.scale!r}:{f.A.dtype}{f.A.shape}{f.B.shape}".encode())
            h.update(np.ascontiguousarray(f.A).tobytes() + np.ascontiguousarray(f.B).tobytes())
    elif cand.coefficients is not None:
        h.update(json.dumps(sorted(kept(cand.coefficients).items())).encode())
    return h.hexdigest()


def split_validation(dataset: Dataset, seed: int = 0, n: int = VALIDATION_EXAMPLES) -> tuple[Dataset, list[Example], dict]:
    """(the dataset the setting may use, the validation examples, where they came from).

    The `valid` split when the file has one (a seeded sample of up to n); else a seeded slice of up to
    n train examples (at most half of them), removed from the train split the setting sees."""
    valid = dataset.splits.get("valid") or []
    source, pool = ("valid", valid) if valid else ("train", dataset.split("train"))
    k = min(n, len(pool)) if valid else min(n, len(pool) // 2)
    if k < 1:
        from lorablend.errors import InputError

        raise InputError(f"{dataset.source or dataset.name}: too few examples to validate on ({len(pool)} train, no "
                         "valid split); add examples, give a valid split, or pass --no-validate")
    idx = sorted(random.Random(f"{seed}:validation").sample(range(len(pool)), k))
    held = [pool[i] for i in idx]
    if source == "train":
        keep = set(range(len(pool))) - set(idx)
        dataset = replace(dataset, splits={**dataset.splits, "train": [pool[i] for i in sorted(keep)]})
    return dataset, held, {"split": source, "indices": idx}


def total_examples(dataset: Dataset) -> int:
    return sum(len(v) for v in dataset.splits.values())


def choose(candidates: list[Candidate], answers_of, examples: list[Example], where: dict, *, uncertain: bool,
           backend: str, seed: int = 0) -> Verdict:
    """Score every candidate with `answers_of(candidate) -> answers` and pick the best by mean Rouge-L.
    NO_ADAPTER must be one of them and wins ties (an adapter that only equals the base model does not help);
    among adapters, the earlier wins a tie."""
    from lorablend.runtime.evaluate import rouge
    from lorablend.stats import paired_bootstrap

    per_example, seconds = {}, {}
    for cand in candidates:
        t0 = time.perf_counter()
        answers = answers_of(cand)
        seconds[cand.name] = time.perf_counter() - t0
        per_example[cand.name] = np.array([rouge(a, e.outputs)[0] for a, e in zip(answers, examples)])
    means = {name: float(v.mean()) for name, v in per_example.items()}
    chosen = max(means, key=lambda name: (means[name], name == NO_ADAPTER, -list(means).index(name)))
    adapters = [c.name for c in candidates if c.is_adapter]
    written = chosen if chosen != NO_ADAPTER else max(adapters, key=lambda n: (means[n], -adapters.index(n)))
    gain = paired_bootstrap(per_example[written], per_example[NO_ADAPTER], seed=seed)
    return Verdict(scores=means, settings={c.name: c.setting for c in candidates}, chosen=chosen, written=written,
                   base=means[NO_ADAPTER], gain=gain, examples=where, n=len(examples), uncertain=uncertain,
                   backend=backend, seconds=seconds)


def validate(bank, candidates: list[Candidate], examples: list[Example], where: dict, *, combine: str,
             rank: int | None, uncertain: bool, backend: str = "auto", seed: int = 0,
             answered: dict | None = None) -> Verdict:
    """Build each candidate in a temporary dir, answer the validation examples with it and choose.

    `answered` (answers_key -> (answers, seconds)) carries answers across validations of the same examples: a
    candidate found there is not answered again, and what this one answers is added (the demo's two paths share
    their no-adapter, nearest and uniform candidates)."""
    import tempfile

    from lorablend.output import write_combination, write_output
    from lorablend.runtime.evaluate import answers_with, load_for_eval, max_new_tokens_for
    from lorablend.runtime.llamacpp import resolve_backend
    from lorablend.runtime.models import load_tokenizer

    model_id = bank.manifest.base_model
    answered = {} if answered is None else answered
    budget = max_new_tokens_for(load_tokenizer(model_id), [e.target for e in examples])
    used = resolve_backend(backend, model_id)
    keys = {c.name: answers_key(c, model_id, examples, budget, combine, rank, used) for c in candidates}
    new = [c for c in candidates if keys[c.name] not in answered]
    with tempfile.TemporaryDirectory(prefix="lorablend-validate-") as tmp:
        dirs = {}
        for j, cand in enumerate(new):
            if cand.factors is not None:
                dirs[cand.name] = Path(tmp) / str(j)
                write_output(dirs[cand.name], cand.factors, model_id, None, force=False, dtype="float32")
            elif cand.coefficients is not None:
                dirs[cand.name] = Path(tmp) / str(j)
                write_combination(bank, cand.coefficients, dirs[cand.name], combine, rank)
        model, tok = load_for_eval(model_id, {name: str(d) for name, d in dirs.items()}, backend=backend) if new \
            else (None, None)
        try:
            for cand in new:
                t0 = time.perf_counter()
                answers = answers_with(model, cand.name if cand.is_adapter else None, tok, examples,
                                       max_new_tokens=budget)
                answered[keys[cand.name]] = (answers, time.perf_counter() - t0)
        finally:
            if hasattr(model, "close"):
                model.close()
    verdict = choose(candidates, lambda c: answered[keys[c.name]][0], examples, where, uncertain=uncertain,
                     backend=used, seed=seed)
    verdict.seconds = {c.name: answered[keys[c.name]][1] for c in candidates}
    fresh = {c.name for c in new}
    verdict.reused = tuple(c.name for c in candidates if c.name not in fresh)
    return verdict
