"""budget.py: a plan never spends more than it is given, and `generate --budget` trains only on the train split,
counts what it ran, and writes the same bytes twice."""

from __future__ import annotations

import json

import pytest

from lorablend import budget
from lorablend.runtime import recipes

# A tuned table of the sweep's shape (the real one comes from docs/results-tuning): start -> steps -> (lr, w, mean)
TABLE = {"zero": {1: (3e-2, 0, 0.30), 2: (3e-2, 0, 0.36), 4: (1e-2, 0, 0.50), 8: (1e-2, 0, 0.60), 16: (1e-2, 0, 0.62)},
         "lora-ga": {1: (1e-3, 0, 0.33), 2: (1e-3, 0, 0.37), 4: (1e-3, 0, 0.45), 8: (1e-3, 0, 0.55),
                     16: (1e-3, 0, 0.58)},
         "blend": {1: (1e-2, 0, 0.45), 2: (1e-2, 0, 0.46), 4: (1e-2, 0, 0.52), 8: (1e-2, 0, 0.57),
                   16: (1e-2, 0, 0.63)}}


@pytest.fixture
def table(monkeypatch):
    for module in (budget, recipes):
        monkeypatch.setattr(module, "TUNED", TABLE)
    monkeypatch.setattr(budget, "BLEND_ALONE", 0.40)


@pytest.mark.parametrize("given", [0.0, 1.0, 1.5, 2.9, 3.0, 6.0, 11.0, 12.5, 20.0, 36.0, 100.0])
def test_a_plan_never_spends_more_than_its_budget(table, given):
    p = budget.plan(given, blend_passes=11.0)
    assert p.passes <= given
    if given < 1.5:
        assert p.start is None and not p.blend  # nothing fits: no step, no blend


def test_the_plan_follows_the_measured_table(table):
    assert budget.plan(12.0, 11.0).start == "zero"  # 8 zero steps (0.60) beat the blend + 0 steps
    assert budget.plan(1.5, 11.0).start == "zero"  # lora-ga's gradient pass does not fit
    p = budget.plan(35.0, 11.0)  # blend + 16 steps from it (0.63) beat 16 zero steps (0.62)
    assert p.blend and p.start == "blend" and p.steps == 16 and p.passes <= 35.0


@pytest.mark.parametrize("text, passes", [("12", 12.0), ("0", 0.0), ("2.5", 2.5), ("3m", 180.0), ("90s", 90.0)])
def test_a_budget_reads_as_passes_or_time(text, passes):
    assert budget.parse_budget(text, lambda: 1.0) == passes


@pytest.mark.parametrize("text", ["abc", "-3", "3h", ""])
def test_a_bad_budget_is_one_clear_error(text):
    from lorablend.errors import InputError

    with pytest.raises(InputError, match="--budget"):
        budget.parse_budget(text, lambda: 1.0)


def _dataset(tmp_path):
    from conftest import make_dataset_file

    from lorablend.dataset import load_dataset

    ds = load_dataset(make_dataset_file(tmp_path / "mine.jsonl", "math", n=40, seed=4))
    ds.splits.pop("valid", None)  # validation then comes out of the train split
    return ds


@pytest.mark.parametrize("given", [6.0, 16.0])
def test_generate_within_a_budget_trains_on_train_examples_only_and_counts_what_it_ran(table, tiny_bank, tmp_path,
                                                                                        monkeypatch, given):
    from lorablend.bank.manifest import Bank
    from lorablend.generate import generate
    from lorablend.runtime import train
    from lorablend.settings import Setting

    seen, steps = [], []
    real, real_batches = train.train_lora, train.batches

    def spy(model, tokenizer, examples, *a, **kw):
        seen.extend(examples)
        return real(model, tokenizer, examples, *a, **kw)

    def counted(*a, **kw):  # every batch the optimiser steps on
        for batch in real_batches(*a, **kw):
            steps.append(1)
            yield batch

    monkeypatch.setattr(train, "train_lora", spy)
    monkeypatch.setattr(train, "batches", counted)
    ds = _dataset(tmp_path)
    setting = Setting(sketch="target-tokens", metric="grad+js", top_k=1, rerank=3, combine="cat")
    res = generate(Bank.open(tiny_bank), ds, tmp_path / "o", setting, validate=True, backend="torch", budget=given)
    record = json.loads((res.out / "lorablend.json").read_text())["budget"]
    held = [ds.split("train")[i] for i in res.verdict.examples["indices"]]
    assert seen and not set(seen) & set(held)  # never a validation example
    p = record["plan"]
    assert record["spent"] <= given
    ran = (p["blend_passes"] if p["blend"] else 0) + 1.5 * len(steps) + (3.0 if p["start"] == "lora-ga" else 0)
    assert record["spent"] <= ran and len(steps) == p["steps"] == record["training"]["steps"]
    assert any(name.startswith("trained") for name in res.verdict.scores)  # the trained adapter was a candidate


def test_generate_within_a_budget_writes_the_same_bytes_twice(table, tiny_bank, tmp_path):
    from lorablend.bank.manifest import Bank
    from lorablend.generate import generate
    from lorablend.settings import Setting

    ds = _dataset(tmp_path)
    setting = Setting(sketch="target-tokens", metric="js", top_k=1, rerank=3, combine="cat")
    runs = [generate(Bank.open(tiny_bank), ds, tmp_path / f"o{i}", setting, validate=True, backend="torch", budget=16.0)
            for i in range(2)]
    for name in ("adapter_model.safetensors", "lorablend.json"):
        assert (runs[0].out / name).read_bytes() == (runs[1].out / name).read_bytes()


@pytest.mark.parametrize("kwargs, message", [({"budget": 8.0, "validate": False}, "drop --no-validate"),
                                             ({"budget": -1.0, "validate": True}, "--budget must be >= 0"),
                                             ({"budget": 8.0, "validate": True, "refine_steps": 2}, "both train")])
def test_a_budget_request_that_cannot_be_kept_is_refused(table, tiny_bank, tmp_path, kwargs, message):
    from lorablend.bank.manifest import Bank
    from lorablend.errors import InputError
    from lorablend.generate import generate

    with pytest.raises(InputError, match=message):
        generate(Bank.open(tiny_bank), _dataset(tmp_path), tmp_path / "o", backend="torch", **kwargs)
    assert not (tmp_path / "o").exists()


def test_a_plan_over_a_quantized_base_leaves_out_the_starts_that_rewrite_it(table, monkeypatch):
    ga_best = {**TABLE, "lora-ga": {k: (lr, w, mean + 0.5) for k, (lr, w, mean) in TABLE["lora-ga"].items()}}
    for module in (budget, recipes):
        monkeypatch.setattr(module, "TUNED", ga_best)
    assert budget.plan(20.0, 11.0).start == "lora-ga"
    assert budget.plan(20.0, 11.0, base="nf4").start == "zero"


def test_generate_within_a_budget_trains_over_the_base_asked_for(table, tiny_bank, tmp_path):
    from lorablend.bank.manifest import Bank
    from lorablend.generate import generate
    from lorablend.settings import Setting

    setting = Setting(sketch="target-tokens", metric="js", top_k=1, rerank=3, combine="cat")
    res = generate(Bank.open(tiny_bank), _dataset(tmp_path), tmp_path / "o", setting, validate=True, backend="torch",
                   budget=16.0, train_base="nf4")
    record = json.loads((res.out / "lorablend.json").read_text())["budget"]
    assert record["training"]["base"] == "nf4" and res.training_base == {"base": "nf4", "why": "as asked"}
    assert record["training"]["losses"]


def test_an_unknown_training_base_is_refused_before_any_work(table, tiny_bank, tmp_path):
    from lorablend.bank.manifest import Bank
    from lorablend.errors import InputError
    from lorablend.generate import generate

    with pytest.raises(InputError, match="--train-base 'int4': expected auto, full, int8, nf4"):
        generate(Bank.open(tiny_bank), _dataset(tmp_path), tmp_path / "o", validate=True, backend="torch", budget=8.0,
                 train_base="int4")
    assert not (tmp_path / "o").exists()
