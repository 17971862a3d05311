"""demo.py: `lorablend demo` end to end on the tiny bank."""

import json

import numpy as np

from conftest import run_cli

from lorablend.bank.manifest import Bank
from lorablend.dataset import load_dataset
from lorablend.validate import NO_ADAPTER


def test_demo_runs_the_default_generate_on_family_out_tasks(tiny_bank, tmp_path, capfd):
    """`lorablend demo` end to end (the README's main command), on the tiny bank with PyTorch: the fixed tasks,
    each with its family left out, validated, scored beside the base model and the own LoRA, then the mean."""
    from lorablend.demo import demo_tasks

    bank = Bank.open(tiny_bank)
    tasks = demo_tasks(bank)
    assert len(tasks) == 2 and set(tasks) < set(bank.first_of_each_family())  # one task per family
    out = tmp_path / "demo-out"
    code, stdout, err = run_cli(["demo", "--bank", str(tiny_bank), "--n", "3", "--out", str(out), "--backend", "torch"],
                                capfd)
    assert code == 0, err
    flat = " ".join(stdout.split())
    for word in tasks + ["base", "gradient-free", "own LoRA", "mean", "PyTorch"]:
        assert word in flat, stdout
    for task in tasks:
        provenance = json.loads((out / task / "gradient-free" / "lorablend.json").read_text())
        family = bank.entry(task).family
        used = {n for n, c in provenance["coefficients"].items() if c > 0}
        assert used and not {n for n in used if bank.entry(n).family == family}  # the whole family left out
        assert provenance["validation"]["written"] and provenance["metric"] == "grad+js"
    code, stdout, err = run_cli(["demo", "--bank", str(tiny_bank), "--task", "math", "--n", "2", "--out", str(out),
                                 "--backend", "torch"], capfd)
    assert code == 0 and (out / "math" / "gradient-free" / "adapter_model.safetensors").is_file()
    assert "mean" not in stdout


def test_demo_takes_the_cheapest_first_tasks_of_the_families(tiny_bank):
    from lorablend.demo import demo_tasks
    from lorablend.runtime.models import load_tokenizer
    from lorablend.runtime.prompts import training_pair

    bank = Bank.open(tiny_bank)
    tok = load_tokenizer(bank.manifest.base_model)
    cost = {t: np.mean([len(training_pair(tok, e)[0]) for e in load_dataset(bank.dataset_path(bank.entry(t)), name=t)
                        .split("train")[:16]]) for t in bank.first_of_each_family()}
    assert len(set(cost.values())) > 2  # the rule has something to choose
    tasks = demo_tasks(bank, 3)
    assert sorted(cost[t] for t in tasks) == sorted(cost.values())[:3] and demo_tasks(bank, 1) == tasks[:1]


def test_demo_shows_the_gradient_free_adapter_and_the_budgets_side_by_side(tiny_bank, tmp_path, monkeypatch):
    from lorablend import budget
    from lorablend.demo import run_demo
    from lorablend.runtime import recipes

    table = {"zero": {k: (1e-2, 0, 0.5) for k in recipes.BUDGET_STEPS}}
    for module in (budget, recipes):
        monkeypatch.setattr(module, "TUNED", table)
    rows = run_demo(["math"], str(tiny_bank), tmp_path / "o", n=2, backend="torch", budget=4.0)
    paths = rows[0].paths
    assert list(paths) == ["gradient-free", "budget 4"]
    record = json.loads((paths["budget 4"].adapter / "lorablend.json").read_text())["budget"]
    assert record["spent"] <= 4.0 and record["plan"]["start"] == "zero"
    assert json.loads((paths["gradient-free"].adapter / "lorablend.json").read_text())["budget"] is None
    assert all(m.seconds > 0 and 0.0 <= m.scores.rouge_l <= 1.0 for m in paths.values())
    budget_verdict = paths["budget 4"].verdict  # the second path reuses the first's answers, and still counts them
    assert NO_ADAPTER in budget_verdict.reused and not paths["gradient-free"].verdict.reused
    assert [n for n in budget_verdict.scores if n not in budget_verdict.reused] == [
        n for n in budget_verdict.scores if n.startswith("trained")]
