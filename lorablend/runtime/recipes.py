"""The training schedule for a start and a step budget: the learning rate and warm-up the tuning sweep chose
(docs/TUNING.md; `python -m benchmarks.tune`, then `--report`), on a constant schedule after the warm-up.

The bank's own 32-step recipe (lr 1e-3, 4-step warm-up, linear decay) stays `TrainConfig()`'s default: it made the
committed bank, and a rebuilt entry must match it bit for bit.
"""

from __future__ import annotations

from dataclasses import replace

from lorablend.runtime.train import TrainConfig

BUDGET_STEPS = (1, 2, 4, 8, 16)  # the budgets tuned; a budget in between runs the schedule of the one below
STEP_PASSES = 1.5  # forward-pass equivalents of a training step: forward + backward of a batch of 8 (a pass: 16)
# start -> steps -> (lr, warm-up, the mean Rouge-L it reached on the tuning entries TUNED_ON): the table of
# docs/TUNING.md, copied here by hand; tests/test_recipes.py checks that it is what the sweep's rule picks from those
# entries' rows of docs/results-tuning/runs.csv
TUNED_ON = ("subtask002_quoref_answer_generation", "subtask023_cosmosqa_question_generation",
            "subtask030_winogrande_full_person", "subtask044_essential_terms_identifying_essential_words",
            "subtask049_multirc_questions_needed_to_answer")
TUNED = {
    "zero": {1: (0.01, 2, 0.244), 2: (0.003, 2, 0.239), 4: (0.003, 0, 0.242), 8: (0.01, 0, 0.319), 16: (0.01, 2, 0.375)},
    "blend": {1: (0.01, 0, 0.277), 2: (0.003, 2, 0.282), 4: (0.003, 0, 0.273),
              8: (0.003, 2, 0.311), 16: (0.003, 4, 0.353)},
    "lora-ga": {1: (0.001, 2, 0.267), 2: (0.0003, 0, 0.248), 4: (0.003, 4, 0.269),
                8: (0.003, 0, 0.344), 16: (0.001, 4, 0.350)},
    "pissa": {1: (0.003, 4, 0.253), 2: (0.003, 0, 0.293), 4: (0.001, 2, 0.275),
              8: (0.003, 2, 0.332), 16: (0.001, 4, 0.366)},
}
BLEND_ALONE = 0.124  # the blend itself (step 0 of the blend start) on the same entries


def tuned_budget(steps: int) -> int:
    """The tuned budget whose schedule `steps` steps run: the largest at or below it."""
    return max(b for b in BUDGET_STEPS if b <= max(steps, 1))


def tuned(start: str, steps: int, base: TrainConfig = TrainConfig()) -> TrainConfig:
    """`base` with the tuned schedule of `start` for `steps` steps (the largest tuned budget at or below it)."""
    if start not in TUNED:
        raise ValueError(f"no tuned schedule for the {start} start (tuned: {', '.join(TUNED)})")
    lr, warmup, _ = TUNED[start][tuned_budget(steps)]
    return replace(base, steps=steps, lr=lr, warmup=warmup, decay="constant", start=start)
