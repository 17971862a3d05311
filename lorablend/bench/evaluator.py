"""Answers an entry's test sample under each distinct adapter of its slots, and writes their records."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lorablend.bank.manifest import Bank
from lorablend.bench.entry import EntryJob, EntryPlan, test_sample, validation_pool
from lorablend.bench.plan import Slot, eval_key, uniform_label
from lorablend.bench.records import RecordStore
from lorablend.bench.worker import WORKER
from lorablend.runtime.scoring import CE_EXAMPLES
from lorablend.settings import DEFAULT_SETTING, NEAREST


class EntryEvaluator:
    """Builds an entry's distinct adapters, answers its test sample under all of them, writes records."""

    def __init__(self, bank: Bank, entry, dataset, job: EntryJob, known: dict[str, dict]):
        from lorablend.runtime.evaluate import max_new_tokens_for
        from lorablend.runtime.models import load_tokenizer

        self.bank, self.entry, self.job, self.known = bank, entry, job, dict(known)
        self.examples = test_sample(dataset, job.n, job.seed)
        self.tokenizer = load_tokenizer(bank.manifest.base_model)
        refs = [e.target for e in (dataset.splits.get("train") or self.examples)]
        self.budget = max_new_tokens_for(self.tokenizer, refs, cap=job.max_new_tokens)
        self._charged = set(known)  # evaluations whose cost an earlier record already carries
        self.per_chunk = max(1, job.batch_size // max(1, len(self.examples)))  # adapters decoded together
        self._validation: dict[str, list[str]] = {}  # evaluation key -> answers to the validation examples
        self._validation_s: dict[str, float] = {}  # and the seconds they took

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
        from lorablend.bank.combination import combination

        c, combine, rank = recipe
        if isinstance(c, dict):  # trained factors
            return c
        coefs = {n: float(w) for n, w in zip(self.bank.names, c)}
        return combination(self.bank, coefs, "cat" if key.startswith("bank:") else combine, rank,
                           readers=WORKER.readers(self.bank))

    def evaluate(self, keys: list[str], recipes: dict) -> None:
        """One pass over the test sample for these keys (mixed-adapter batches); scores go into `known`."""
        from lorablend.runtime.evaluate import Scores

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
        Rouge-L is the record's adapter (None: the base model, what a user told "no gain" keeps). Its passes add
        the validation's prompt and answer tokens, in units of the 16 train examples' tokens."""
        from lorablend.runtime.evaluate import max_new_tokens_for
        from lorablend.runtime.prompts import prompt_ids, training_pair
        from lorablend.validate import NEAREST_PICK, NO_ADAPTER, PICK, UNIFORM, Candidate, choose, split_validation

        names = self.bank.names
        _, held, where = split_validation(validation_pool(plan.dataset), self.job.seed)
        combine = DEFAULT_SETTING.combine  # `generate` combines every candidate as its setting does
        picks = [(PICK, Slot(holdout, DEFAULT_SETTING.label, "", DEFAULT_SETTING, combine)),
                 (NEAREST_PICK, Slot(holdout, NEAREST.label, "", NEAREST, combine)),
                 (UNIFORM, Slot(holdout, uniform_label(combine, None), "uniform", None, combine))]
        made = {}
        for name, slot in picks:
            c, info = plan.coefficients(slot)
            made.setdefault(eval_key(c, combine, None, names), (name, slot.label, c, info))
        made["base"] = (NO_ADAPTER, "", None, {})
        t0 = time.perf_counter()
        keys = list(made)
        todo = [k for k in keys if k not in self._validation]  # the holdouts share their validation examples
        adapters = {k: self.factors(k, (made[k][2], combine, None)) for k in todo if k != "base"}
        budget = max_new_tokens_for(self.tokenizer, [e.target for e in held])
        answers = self.answer(adapters, todo, held, budget)[0] if todo else []
        self._validation.update({k: answers[j * len(held) : (j + 1) * len(held)] for j, k in enumerate(todo)})
        self._validation_s.update({k: (time.perf_counter() - t0) / len(todo) for k in todo})
        per_key = {k: self._validation[k] for k in keys}
        answers = [a for k in keys for a in per_key[k]]  # the selection's tokens count in full for each holdout
        by_name = {made[k][0]: k for k in keys}
        verdict = choose([Candidate(n, label, None if c is None else {b: float(w) for b, w in zip(names, c) if w > 0})
                          for n, label, c, _ in made.values()],
                         lambda cand: per_key[by_name[cand.name]], held, where, uncertain=False,
                         backend=self.job.backend, seed=self.job.seed)
        seconds = sum(self._validation_s[k] for k in keys)  # what `generate` spends on it, cached or not
        prompts = sum(len(prompt_ids(self.tokenizer, e)) for e in held) * len(keys)
        answered = sum(len(self.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
        unit = sum(len(p) + len(t) for p, t in (training_pair(self.tokenizer, e)
                                                 for e in plan.dataset.split("train")[:CE_EXAMPLES]))
        _, _, c, info = made[by_name[verdict.chosen]]
        pick = made[by_name[PICK]][3]
        return c, {"excluded": pick.get("excluded", []), "model_s": pick.get("model_s", 0.0) + seconds,
                   "passes": pick.get("passes", 0) + round((prompts + answered) / unit, 2),
                   "validation": {"chosen": verdict.chosen, "scores": verdict.scores, "examples": where, "n": verdict.n}}

    def _torch(self, adapters: dict, rows: list, budget: int) -> tuple[list[str], float, float]:
        """Answers from the slot model: (answers, seconds filling slots, seconds generating)."""
        from lorablend.runtime.evaluate import generate_answers

        readers = WORKER.readers(self.bank)
        modules = next(iter(readers.values())).modules
        rank = max([f.rank for a in adapters.values() for f in a.values()] or [1])
        sm = WORKER.slot_model(self.bank.manifest.base_model, modules, max(self.per_chunk, len(adapters)), rank)
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

        from lorablend.runtime.gguf import write_gguf
        from lorablend.runtime.llamacpp import BASE

        lm = WORKER.llamacpp_model(self.bank.manifest.base_model, self.job.threads)
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
        s = slot.spec if slot.spec else None
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
