"""The training schedule for a start and a step budget: the learning rate and warm-up the tuning sweep chose
(docs/TUNING.md; `python -m benchmarks.tune`, then `--report`), on a constant schedule after the warm-up.

The bank's own 32-step recipe (lr 1e-3, 4-step warm-up, linear decay) stays `TrainConfig()`'s default: it made the
committed bank, and a rebuilt entry must match it bit for bit.
"""

from __future__ import annotations

from dataclasses import replace

from lorablend.runtime.train import TrainConfig

BUDGET_STEPS = (1, 2, 4, 8, 16, 32)  # the budgets tuned; a budget in between runs the schedule of the one below
# start -> steps -> (lr, warm-up): the table of docs/TUNING.md, copied here by hand; tests/test_recipes.py checks
# that it is what the rule picks from docs/results-tuning/runs.csv
TUNED: dict[str, dict[int, tuple[float, int]]] = {}


def tuned(start: str, steps: int, base: TrainConfig = TrainConfig()) -> TrainConfig:
    """`base` with the tuned schedule of `start` for `steps` steps (the largest tuned budget at or below it)."""
    if start not in TUNED:
        raise ValueError(f"no tuned schedule for the {start} start (tuned: {', '.join(TUNED)})")
    k = max(b for b in BUDGET_STEPS if b <= max(steps, 1))
    lr, warmup = TUNED[start][k]
    return replace(base, steps=steps, lr=lr, warmup=warmup, decay="constant", start=start)
