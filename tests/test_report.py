"""bench/report.py: RESULTS.md, its statistics, tables and plots, and the facts of a run."""

import json

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_report_statistics():
    from lorablend.bench.report import gap_recovered
    from lorablend.stats import paired_bootstrap, wins_ties_losses

    assert gap_recovered(0.5, 0.2, 0.8) == pytest.approx(0.5) and gap_recovered(0.5, 0.3, 0.3) is None
    assert gap_recovered(0.29, 0.3, 0.301) is None  # a gap within the noise would make this −10
    assert gap_recovered(0.45, 0.2, 0.45) == pytest.approx(1.0)
    assert wins_ties_losses([0.5, 0.5, 0.5], [0.2, 0.495, 0.9]) == (1, 1, 1)
    mean, lo, hi = paired_bootstrap([0.3, 0.5, 0.4, 0.9], [0.1, 0.2, 0.4, 0.3])
    assert lo <= mean <= hi and mean == pytest.approx(0.275)
    assert paired_bootstrap([0.3, 0.5], [0.1, 0.3]) == pytest.approx((0.2, 0.2, 0.2))
    assert paired_bootstrap([1, 2, 3], [0, 0, 0]) == paired_bootstrap([1, 2, 3], [0, 0, 0])  # seeded


def test_report_lists_every_command_of_a_grown_study(tmp_path):
    from lorablend.bench.report import _run_facts

    base = {"wall_seconds": 60.0, "n": 8, "max_new_tokens": 32, "batch_size": 16, "threads": 1, "jobs": 2,
            "executor": "local", "machine": {"nproc": 2, "cpu": "x", "ram_gib": 1.0, "torch": "t"}}
    runs = [{**base, "command": c} for c in ("bench --settings a", "bench --settings a", "bench --settings b")]
    (tmp_path / "run.json").write_text(json.dumps({"runs": runs}))
    facts = "\n".join(_run_facts(tmp_path / "run.json"))
    assert "3 invocations" in facts and facts.count("`bench --settings a`") == 1 and "`bench --settings b`" in facts
    assert "3.0 min in total" in facts
    (tmp_path / "run.json").write_text(json.dumps({"runs": runs[:2]}))
    assert "- Command: `bench --settings a` (2 invocations" in _run_facts(tmp_path / "run.json")[0]


def test_report_has_tables_intervals_and_plots(study, tmp_path):
    from typer.testing import CliRunner

    from lorablend.cli import app

    res = CliRunner().invoke(app, ["bench", "--report-only", "--results", str(study[0].results),
                                   "--report", str(tmp_path / "docs" / "RESULTS.md")])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "docs" / "RESULTS.md").read_text()
    for needle in ("## Holdout: entry", "## Holdout: family", "Δ vs base [95% CI]", "W/T/L vs base", "cost s/adapter",
                   "`embeddings/js/normalized/svd/auto`", "*uniform/paper*", "*random-k/", "*nearest/tokens/js*",
                   "N = 3", "Machine: ", "Wall time: ", "Command: `", "RESULTS-bars.png", "RESULTS-coefficients.png"):
        assert needle in page, needle
    assert (tmp_path / "docs" / "RESULTS-bars.png").stat().st_size > 1000
    assert (tmp_path / "docs" / "RESULTS-coefficients.png").stat().st_size > 1000
    coefs = json.loads((study[0].results / "coefficients.json").read_text())
    assert set(coefs) == {"-", "entry", "family"}


def test_curve_table_pairs_refinement_with_training_from_zero_by_entry():
    from lorablend.bench.report import curve_table

    def row(entry, holdout, label, rouge, passes):
        return {"entry": entry, "holdout": holdout, "label": label, "rouge_l": rouge, "passes": passes}

    rows = [row("a", "-", "train/4", 0.2, 6.0), row("b", "-", "train/4", 0.4, 6.0), row("c", "-", "train/4", 0.1, 6.0),
            row("a", "family", "refine/4", 0.5, 18.0), row("b", "family", "refine/4", 0.3, 16.0)]
    table = curve_table(rows, "family")
    line = next(l for l in table.splitlines() if l.startswith("| 4 |"))
    # c has no refine/4 record: the pairs are a and b only; the differences are +0.3 and −0.1
    assert line.startswith("| 4 | 2 | 0.300 | 0.400 | +0.100 [") and "| 1/0/1 |" in line and "6.0 / 17.0" in line
    assert curve_table(rows, "entry") == ""  # no refinement under that holdout
