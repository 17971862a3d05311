"""LoRA training steps on the CPU with PEFT: from zero (a bank entry), from a blend or from a data-aware start
(`starts.py`), on the bank's recipe or a schedule tuned for a step budget (`recipes.py`). The only gradient updates
in lorablend: opt-in in `generate`, or done once when a bank is made (`bank/build.py`)."""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field, replace

from lorablend.dataset import Example
from lorablend.machine import native_bf16
from lorablend.runtime.models import target_loss
from lorablend.runtime.prompts import PromptFormat, pad_pairs, training_pair
from lorablend.runtime.starts import (GRADIENT_EXAMPLES, SHIFTS_BASE, Shift, check_start, estimate_gradient,
                                      lora_config, lora_factors, start_from)


@dataclass(frozen=True)
class TrainConfig:
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    steps: int = 32
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    eval_examples: int = 30
    bf16_autocast: bool | None = None  # None: bf16 where the CPU computes it natively, else fp32 (~20x faster there)
    warmup: int = field(default=4, metadata={"help": "Steps of linear warm-up: step s runs at (s+1)/warmup of lr; "
                                                    "0 for none."})
    decay: str = field(default="linear", metadata={"help": "linear: down to 0 at `steps`; constant: the schedule "
                                                           "does not depend on `steps` (one run scores every budget)."})
    start: str = field(default="zero", metadata={"help": "Where the LoRA starts: zero, blend, lora-ga, pissa."})

    def resolved(self) -> "TrainConfig":
        """The precision decided for this machine: what a run uses and what its record keeps."""
        return self if self.bf16_autocast is not None else replace(self, bf16_autocast=native_bf16())

    def to_dict(self) -> dict:
        return asdict(self.resolved())

    def lr_factor(self, step: int) -> float:
        """The multiplier of `lr` at 0-based `step` (the bank's recipe: 4-step warm-up, linear decay)."""
        warm = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        return warm * (1 - step / self.steps if self.decay == "linear" else 1.0)


def batches(pairs: list[tuple[list[int], list[int]]], cfg: TrainConfig, rng: random.Random, pad: int):
    order: list[int] = []
    for _ in range(cfg.steps):
        if len(order) < cfg.batch_size:
            fresh = list(range(len(pairs)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        yield pad_pairs([pairs[i] for i in idx], pad)


def add_lora(model, cfg: TrainConfig, seed: int):
    """`model` wrapped with a LoRA at the config's start (A drawn from `seed`; B zero for zero and blend)."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, lora_config(cfg.r, cfg.alpha, cfg.target_modules, cfg.start))


def train_lora(model, tokenizer, examples: list[Example], cfg: TrainConfig, seed: int, fmt: PromptFormat, on_step=None,
               init: dict | None = None, at_step=None):
    """Wrap `model` with a LoRA and train it: (the PEFT model, the start's `Shift` or None). `unload()` and then
    `shift.restore` give the base back. The LoRA starts at `cfg.start`; `init` (module -> Factors, e.g. a blend) is
    the blend start's update. `at_step(step, peft_model, shift)` is called in eval mode at the start (step 0) and after every step: checkpoints."""
    import torch

    cfg = cfg.resolved()
    if (cfg.start == "blend") != (init is not None):
        raise ValueError("the blend start needs `init`, and only it takes one")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = [training_pair(tokenizer, e, fmt) for e in examples]
    shift = Shift.before(model, cfg.target_modules) if check_start(cfg.start) in SHIFTS_BASE else None
    if cfg.start == "lora-ga":
        estimate_gradient(model, lora_config(cfg.r, cfg.alpha, cfg.target_modules, cfg.start),
                          lambda: _backward(model, pairs[:GRADIENT_EXAMPLES], cfg, pad))
    peft_model = add_lora(model, cfg, seed)
    if init is not None:
        start_from(peft_model, init)
    if shift is not None:
        shift.record(peft_model)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_factor)
    causal_lm = peft_model.get_base_model()  # with the LoRA layers in it
    if at_step is not None:
        at_step(0, peft_model.eval(), shift)
    peft_model.train()
    for step, batch in enumerate(batches(pairs, cfg, random.Random(seed), pad), 1):
        loss = _loss(causal_lm, batch, cfg)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(loss.item())
        if at_step is not None:
            peft_model.eval()
            at_step(step, peft_model, shift)
            peft_model.train()
    peft_model.eval()
    return peft_model, shift


def _backward(model, pairs, cfg: TrainConfig, pad: int) -> None:
    """Forward and backward passes over `pairs` in training batches (the gradient LoRA-GA starts from)."""
    for i in range(0, len(pairs), cfg.batch_size):
        _loss(model, pad_pairs(pairs[i : i + cfg.batch_size], pad), cfg).backward()


def _loss(model, batch, cfg: TrainConfig):
    """The batch's target loss at the run's precision (bf16 autocast where the config says)."""
    import torch

    ids, labels, mask = batch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
        return target_loss(model, ids, mask, labels)


def refine_config(init: dict, cfg: TrainConfig = TrainConfig()) -> TrainConfig:
    """The bank's recipe (learning rate, batch, schedule, alpha/r) on the modules and at the rank of `init`."""
    rank = max(f.rank for f in init.values())
    targets = tuple(sorted({m.rsplit(".", 1)[-1] for m in init}))
    return replace(cfg, r=rank, alpha=cfg.alpha / cfg.r * rank, target_modules=targets)


def train_factors(model, tokenizer, examples: list[Example], steps: int, seed: int = 0, init: dict | None = None,
                  fmt: PromptFormat = PromptFormat(), cfg: TrainConfig = TrainConfig(), at_step=None) -> tuple[dict, dict]:
    """`steps` steps of `cfg` (the bank's recipe unless told) on `examples`, from its start or from `init` (the blend
    start, at its modules and rank): the trained factors, as an update of the original base model, and a record
    (steps, seconds, the loss of every step). `model` is given back unchanged."""
    cfg = replace(cfg, steps=steps)
    if init is not None:
        cfg = refine_config(init, replace(cfg, start="blend"))
    losses: list[float] = []
    t0 = time.perf_counter()
    peft_model, shift = train_lora(model, tokenizer, examples, cfg, seed, fmt, losses.append, init=init,
                                   at_step=at_step)
    factors = lora_factors(peft_model, shift)
    base = peft_model.unload()
    if shift is not None:
        shift.restore(base)
    record = {"steps": steps, "from": cfg.start, "seconds": round(time.perf_counter() - t0, 3),
              "losses": [round(x, 5) for x in losses], "examples": len(examples), "seed": seed, **cfg.to_dict()}
    return factors, record
