"""The budget path: the best adapter a given compute buys, whichever way it is made.

A budget is in forward-pass equivalents, the bench's currency: one forward pass of the base model over 16
examples (a training step of batch 8 costs 1.5; LoRA-GA's gradient 3; the blend tier's first-order pass 3 and a
pass per reranked candidate). `plan` spends it where the tuning sweep measured the most quality for it
(`runtime/recipes.TUNED`): on training from the best start at its tuned schedule, and on the blend tier only when
the blend is a start or a candidate that pays at that budget. The label-free nearest adapter costs nothing and is
always a candidate. `validate.py` then chooses among the blend, each trained adapter, the nearest and no adapter on
the user's held-out examples, which are never trained on.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass

from lorablend.errors import InputError
from lorablend.runtime.recipes import BLEND_ALONE, STEP_PASSES, TUNED, tuned, tuned_budget
from lorablend.runtime.quantized import holds
from lorablend.runtime.starts import START_PASSES

DEFAULT_BUDGET = 15.0  # what `generate` spends with no --budget: docs/FRONTIER.md, decision rule 3
MAX_STEPS = 256  # a budget beyond this many steps is refused: it is a training run, not a few steps


@dataclass(frozen=True)
class Plan:
    """How a budget is spent: the blend tier or not, then `steps` training steps from `start`."""

    budget: float
    blend: bool
    start: str | None  # None: no training (the budget buys no step)
    steps: int
    blend_passes: float  # what the blend tier may cost at most
    expected: float  # the tuning sweep's mean Rouge-L of the planned adapter (what the choice rests on)

    @property
    def passes(self) -> float:
        """The most the plan can spend."""
        return (self.blend_passes if self.blend else 0.0) + self.training_passes

    @property
    def training_passes(self) -> float:
        return (START_PASSES.get(self.start, 0.0) + STEP_PASSES * self.steps) if self.start else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"passes": self.passes}


def plan(budget: float, blend_passes: float, base: str = "full") -> Plan:
    """The plan of the highest expected quality that fits `budget` (ties: the cheaper). Each start trains the most
    steps the rest of the budget buys; the blend start and the blend alone first pay for the blend tier. Over a
    quantized `base`, the starts that rewrite the base weights are out."""
    options = [Plan(budget, False, None, 0, blend_passes, float("-inf"))]
    if budget >= blend_passes:
        options.append(Plan(budget, True, None, 0, blend_passes, BLEND_ALONE))
    for start, table in TUNED.items():
        if not holds(start, base):
            continue
        blend = start == "blend"
        left = budget - (blend_passes if blend else 0.0) - START_PASSES.get(start, 0.0)
        steps = min(MAX_STEPS, int(left // STEP_PASSES)) if left >= STEP_PASSES else 0
        if steps:
            options.append(Plan(budget, blend, start, steps, blend_passes, table[tuned_budget(steps)][2]))
    return max(options, key=lambda p: (p.expected, -p.passes))


def parse_budget(text: str, seconds_per_pass=None) -> float:
    """'12' (forward-pass equivalents) or '3m' / '90s' (time, converted with `seconds_per_pass()`, measured on this
    machine): a budget in forward-pass equivalents."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(m|min|s)?\s*", str(text))
    if not m:
        raise InputError(f"--budget '{text}': expected forward-pass equivalents (e.g. 12) or a time (e.g. 3m, 90s)")
    value, unit = float(m.group(1)), m.group(2)
    if unit is None:
        return value
    seconds = value * (60 if unit in ("m", "min") else 1)
    return seconds / seconds_per_pass()


def seconds_per_pass(model_id: str, examples) -> float:
    """Seconds of one forward pass of the base model over these (up to 16) examples here, timed once after a
    warm-up pass: the exchange rate of a budget given in time."""
    import torch

    from lorablend.runtime.models import load_model, load_tokenizer, target_loss
    from lorablend.runtime.prompts import PromptFormat, pad_pairs, training_pair

    model, tok = load_model(model_id), load_tokenizer(model_id)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, labels, mask = pad_pairs([training_pair(tok, e, PromptFormat()) for e in examples[:16]], pad)
    with torch.inference_mode():
        target_loss(model, ids, mask, labels)
        t0 = time.perf_counter()
        target_loss(model, ids, mask, labels)
    return time.perf_counter() - t0


def training_base(model_id: str, requested: str = "auto") -> tuple[str, str]:
    """The frozen base the steps train over (full precision, int8 or nf4), and why in a few words: `requested`
    unless auto, else full precision where a step fits the free memory, else NF4 (`quantized.training_base`)."""
    from lorablend.machine import available_gib
    from lorablend.runtime import quantized
    from lorablend.runtime.models import parameter_count

    if requested not in ("auto",) + quantized.BASES:
        raise InputError(f"--train-base '{requested}': expected auto, {', '.join(quantized.BASES)}")
    if requested != "auto":
        return requested, "as asked"
    return quantized.training_base(parameter_count(model_id), available_gib())


def train(model_id: str, examples, p: Plan, seed: int, init: dict | None = None, base: str = "full"
          ) -> tuple[dict, dict]:
    """The plan's training: its steps from its start at the tuned schedule, on `examples` (the train split only),
    over a `base` (full, int8, nf4) frozen base."""
    from lorablend.runtime.models import load_model, load_tokenizer
    from lorablend.runtime.quantized import check_start, load_quantized
    from lorablend.runtime.train import train_factors

    check_start(p.start, base)
    cfg = tuned(p.start, p.steps)
    model = load_model(model_id) if base == "full" else load_quantized(model_id, base)
    factors, record = train_factors(model, load_tokenizer(model_id), examples, p.steps, seed,
                                    init if p.start == "blend" else None, cfg=cfg)
    record.pop("seconds")  # in the timings: lorablend.json stays byte-identical across reruns
    record["passes"] = START_PASSES.get(p.start, 0.0) + STEP_PASSES * len(record["losses"])
    record["base"] = base
    return factors, record


def trained_name(p: Plan) -> str:
    return f"trained ({p.start} start, {p.steps} steps)"
