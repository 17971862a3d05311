"""benchmarks/frontier.py on the tiny bank: every kind of row, resumption, the report and its plot."""

from __future__ import annotations

import pytest

TABLE = {"zero": {1: (3e-2, 0, 0.3), 2: (3e-2, 0, 0.4), 4: (1e-2, 0, 0.5), 8: (1e-2, 0, 0.6), 16: (1e-2, 0, 0.6)}}


@pytest.fixture
def table(monkeypatch):
    from lorablend import budget
    from lorablend.runtime import recipes

    for module in (budget, recipes):
        monkeypatch.setattr(module, "TUNED", TABLE)
    monkeypatch.setattr(recipes, "BUDGET_STEPS", (1, 2))
    monkeypatch.setattr(budget, "BLEND_ALONE", 0.35)


def test_the_frontier_study_runs_resumes_and_reports(table, tiny_bank, tmp_path):
    from benchmarks import frontier

    out = tmp_path / "frontier"
    frontier.run(str(tiny_bank), ["math"], 2, [3.0], ["zero"], out)
    rows = frontier.read(out)
    kinds = {(r["what"], r["steps"]) for r in rows}
    assert kinds == {("base", 0), ("nearest", 0), ("blend", 0), ("own", 32), ("train:zero", 1), ("train:zero", 2),
                     ("budget:3", 0)}
    assert all(len(r["per_example"]) == 2 for r in rows)
    budget_row = next(r for r in rows if r["what"] == "budget:3")
    assert budget_row["passes"] <= 3.0 and budget_row["won"]
    frontier.run(str(tiny_bank), ["math"], 2, [3.0], ["zero"], out)  # resumes: nothing measured twice
    assert len(frontier.read(out)) == len(rows)
    page, plot = tmp_path / "F.md", tmp_path / "F.png"
    page.write_text("rules\n\n" + frontier.MARKER + "\n")
    frontier.write_report(rows, page, plot)
    assert "| train:zero | 2 |" in page.read_text() and plot.stat().st_size > 1000
    assert "Left out" not in page.read_text()


def test_a_changed_tuned_table_reruns_the_cells_it_changed_and_the_report_leaves_out_the_old(
        table, tiny_bank, tmp_path, monkeypatch):
    from benchmarks import frontier
    from lorablend.runtime import recipes

    out = tmp_path / "frontier"
    frontier.run(str(tiny_bank), ["math"], 2, [], ["zero"], out)
    before = frontier.read(out)
    assert {r["schedule"] for r in before if r["what"] == "train:zero"} == {"0.03/0"}
    monkeypatch.setattr(recipes, "TUNED", {"zero": {**TABLE["zero"], 2: (1e-2, 1, 0.5)}})
    frontier.run(str(tiny_bank), ["math"], 2, [], ["zero"], out)
    new = frontier.read(out)[len(before):]
    assert [(r["what"], r["steps"], r["schedule"]) for r in new] == [("train:zero", 2, "0.01/1")]
    page = tmp_path / "F.md"
    frontier.write_report(frontier.read(out), page, tmp_path / "F.png")
    assert "Left out: 1 trained records" in page.read_text()


def test_tasks_outside_the_bank_get_every_row_but_an_own_lora(table, tiny_bank, tmp_path):
    from conftest import make_dataset_file

    from benchmarks import frontier
    from lorablend.dataset import load_dataset, save_dataset

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    save_dataset(load_dataset(make_dataset_file(tmp_path / "x.jsonl", "weather", n=30, seed=7)),
                 tasks / "outside_weather.jsonl.gz")
    out = tmp_path / "outside"
    frontier.run(str(tiny_bank), ["outside_weather"], 2, [0.0], ["zero"], out, tasks)
    kinds = {(r["what"], r["steps"]) for r in frontier.read(out)}
    assert kinds == {("base", 0), ("nearest", 0), ("blend", 0), ("train:zero", 1), ("train:zero", 2), ("budget:0", 0)}


def test_steps_over_a_quantized_base_are_scored_and_paired_with_the_full_bases(table, tiny_bank, tmp_path, monkeypatch):
    from benchmarks import frontier

    monkeypatch.setattr(frontier, "QUANTIZED_STEPS", 2)
    out = tmp_path / "frontier"
    frontier.run(str(tiny_bank), ["math"], 2, [], ["zero"], out, bases=["nf4"])
    rows = frontier.read(out)
    q = next(r for r in rows if r["what"] == "train:zero@nf4")
    assert q["steps"] == 2 and q["passes"] == 3.0 and len(q["per_example"]) == 2
    page = tmp_path / "F.md"
    frontier.write_report(rows, page, tmp_path / "F.png")
    text = page.read_text()
    line = next(x for x in text.splitlines() if x.startswith("| zero start over a nf4 base − over the full-precision"))
    assert line.count("(n 1)") == 3  # within 6, 12 and 24 passes: against the zero start's 2 steps
