"""benchmarks/tune.py: the tuning sweep on the tiny bank: checkpoint rows, resumption, the rule and the report."""

from __future__ import annotations


def test_the_sweep_scores_checkpoints_resumes_and_reports(tiny_bank, tmp_path):
    from benchmarks import tune

    out = tmp_path / "runs"
    grid = {"zero": [1e-2], "lora-ga": [1e-3], "blend": [1e-2]}
    tune.sweep(str(tiny_bank), ["math"], grid, [0], out, jobs=1, threads=1, steps=2)
    rows = tune.read_runs(out)
    got = {(r["start"], r["step"]) for r in rows}
    assert got == {("zero", 0), ("zero", 1), ("zero", 2), ("lora-ga", 1), ("lora-ga", 2), ("blend", 0), ("blend", 1),
                   ("blend", 2)}
    assert all(0.0 <= r["rouge_l"] <= 1.0 for r in rows)
    tune.sweep(str(tiny_bank), ["math"], grid, [0], out, jobs=1, threads=1, steps=2)  # all done: nothing added
    assert len(tune.read_runs(out)) == len(rows)
    chosen = tune.choose(rows)
    assert set(chosen) == {"zero", "lora-ga", "blend"} and set(chosen["zero"]) == {1, 2}
    assert chosen["zero"][2][:2] == (1e-2, 0)
    page = tmp_path / "TUNING.md"
    page.write_text("rules\n\n" + tune.MARKER + "\nold tables\n")
    tune.write_report(rows, page)
    text = page.read_text()
    assert text.startswith("rules") and "old tables" not in text and "| lora-ga |" in text


def test_tuning_entries_are_second_tasks_of_every_other_family(tiny_bank):
    from benchmarks.tune import tuning_entries

    from lorablend.bank.manifest import Bank

    bank = Bank.open(tiny_bank)
    picked = tuning_entries(bank)
    firsts = set(bank.first_of_each_family())
    assert picked and not set(picked) & firsts
