"""LoRA training steps on the CPU with PEFT, the bank's one recipe: from zero (a bank entry) or from a blend
(`generate --refine-steps`, the bench's training curves). The only gradient updates in lorablend, both opt-in or
done once when a bank is made (`bank/build.py`)."""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from lorablend.dataset import Example
from lorablend.machine import native_bf16
from lorablend.runtime.models import target_loss
from lorablend.runtime.prompts import PromptFormat, pad_pairs, training_pair


@dataclass(frozen=True)
class TrainConfig:
    r: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    steps: int = 32
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    eval_examples: int = 30
    bf16_autocast: bool | None = None  # None: bf16 where the CPU computes it natively, else fp32 (~20x faster there)

    def resolved(self) -> "TrainConfig":
        """The precision decided for this machine: what a run uses and what its record keeps."""
        return self if self.bf16_autocast is not None else replace(self, bf16_autocast=native_bf16())

    def to_dict(self) -> dict:
        return asdict(self.resolved())


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
    """`model` wrapped with a fresh LoRA (A drawn from `seed`, B zero, as PEFT initialises it)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(
        model,
        LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            target_modules=list(cfg.target_modules),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )


def train_lora(model, tokenizer, examples: list[Example], cfg: TrainConfig, seed: int, fmt: PromptFormat, on_step=None,
               init: dict | None = None):
    """Wrap `model` with a LoRA and train it; returns the PEFT model (unload() restores the base). The LoRA is
    fresh (B = 0), or starts from `init` (module -> Factors, e.g. a blend: `start_from`)."""
    import torch

    cfg = cfg.resolved()
    peft_model = add_lora(model, cfg, seed)
    if init is not None:
        start_from(peft_model, init)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4) * (1 - s / cfg.steps) + 0.0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = [training_pair(tokenizer, e, fmt) for e in examples]
    causal_lm = peft_model.get_base_model()  # with the LoRA layers in it
    peft_model.train()
    for ids, labels, mask in batches(pairs, cfg, random.Random(seed), pad):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
            loss = target_loss(causal_lm, ids, mask, labels)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(loss.item())
    peft_model.eval()
    return peft_model


def refine_config(init: dict, cfg: TrainConfig = TrainConfig()) -> TrainConfig:
    """The bank's recipe (learning rate, batch, schedule, alpha/r) on the modules and at the rank of `init`."""
    rank = max(f.rank for f in init.values())
    targets = tuple(sorted({m.rsplit(".", 1)[-1] for m in init}))
    return replace(cfg, r=rank, alpha=cfg.alpha / cfg.r * rank, target_modules=targets)


def start_from(peft_model, init: dict) -> None:
    """Set the LoRA's factors to `init`'s updates: A as given, B divided by the LoRA's own scaling (alpha / r), so
    the starting update is exactly s·B·A of each module (a lower rank is padded with zero rows and columns)."""
    import torch

    causal_lm = peft_model.get_base_model()
    with torch.no_grad():
        for module, f in init.items():
            layer = causal_lm.get_submodule(module)
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            A.zero_()
            B.zero_()
            A[: f.rank] = torch.from_numpy(np.ascontiguousarray(f.A, dtype=np.float32))
            B[:, : f.rank] = torch.from_numpy(np.ascontiguousarray(f.B * (f.scale / layer.scaling["default"]),
                                                                    dtype=np.float32))


def lora_factors(peft_model) -> dict:
    """The trained LoRA as module -> Factors (float32), in the bank's module names."""
    from lorablend.combine import Factors

    out = {}
    for name, layer in peft_model.get_base_model().named_modules():
        if hasattr(layer, "lora_A") and "default" in layer.lora_A:
            out[name] = Factors(A=layer.lora_A["default"].weight.detach().float().numpy().copy(),
                                B=layer.lora_B["default"].weight.detach().float().numpy().copy(),
                                scale=float(layer.scaling["default"]))
    return out


def train_factors(model, tokenizer, examples: list[Example], steps: int, seed: int = 0, init: dict | None = None,
                  fmt: PromptFormat = PromptFormat()) -> tuple[dict, dict]:
    """`steps` steps of the bank's recipe on `examples`, from zero or from `init` (its modules and rank): the
    trained factors and a record (steps, seconds, the loss of every step). `model` is given back unchanged."""
    cfg = replace(refine_config(init) if init is not None else TrainConfig(), steps=steps)
    losses: list[float] = []
    t0 = time.perf_counter()
    peft_model = train_lora(model, tokenizer, examples, cfg, seed, fmt, losses.append, init=init)
    factors = lora_factors(peft_model)
    peft_model.unload()
    record = {"steps": steps, "from": "blend" if init is not None else "zero", "seconds": round(time.perf_counter() - t0, 3),
              "losses": [round(x, 5) for x in losses], "examples": len(examples), "seed": seed, **cfg.to_dict()}
    return factors, record


