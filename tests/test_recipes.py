"""runtime/recipes.py and the schedules of runtime/train.py: the bank's recipe unchanged, the tuned table as the
sweep's rule picks it from the committed runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorablend.runtime.recipes import BUDGET_STEPS, TUNED, TUNED_ON, tuned
from lorablend.runtime.train import TrainConfig

RUNS = Path(__file__).resolve().parents[1] / "docs" / "results-tuning"


def test_the_banks_recipe_keeps_its_schedule():
    cfg = TrainConfig()  # lr 1e-3, 4-step warm-up, linear decay to 0 at 32 steps: what built the committed bank
    assert [round(cfg.lr_factor(s), 9) for s in range(32)] == [
        round(min(1.0, (s + 1) / 4) * (1 - s / 32), 9) for s in range(32)]


def test_a_constant_schedule_does_not_depend_on_the_total_steps():
    a, b = TrainConfig(warmup=2, decay="constant", steps=4), TrainConfig(warmup=2, decay="constant", steps=16)
    assert [a.lr_factor(s) for s in range(4)] == [b.lr_factor(s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert TrainConfig(warmup=0, decay="constant").lr_factor(0) == 1.0


def test_tuned_takes_the_schedule_of_the_budget_at_or_below():
    start = next(iter(TUNED))
    for steps in (1, 3, 5, 8, 12, 40):
        k = max(b for b in BUDGET_STEPS if b <= steps)
        cfg = tuned(start, steps)
        assert (cfg.lr, cfg.warmup, cfg.steps, cfg.start, cfg.decay) == (*TUNED[start][k][:2], steps, start, "constant")


def test_the_tuned_table_is_what_the_sweeps_rule_picks():
    from benchmarks.tune import choose, read_runs

    chosen = choose([r for r in read_runs(RUNS) if r["entry"] in TUNED_ON])
    assert set(TUNED) <= set(chosen)
    for start, table in TUNED.items():
        for k, (lr, warmup, mean) in table.items():
            assert chosen[start][k][:3] == pytest.approx((lr, warmup, mean), abs=5e-4), (start, k)


def test_the_blend_alone_is_the_sweeps_step_0_of_the_blend_start():
    from benchmarks.tune import read_runs

    from lorablend.runtime.recipes import BLEND_ALONE

    per_entry = {r["entry"]: r["rouge_l"] for r in read_runs(RUNS)
                 if r["start"] == "blend" and r["step"] == 0 and r["entry"] in TUNED_ON}
    assert BLEND_ALONE == pytest.approx(sum(per_entry.values()) / len(per_entry), abs=5e-4)
