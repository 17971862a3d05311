"""Bank building: one LoRA per task, trained on the CPU with PEFT.

This is the only gradient training in lorablend, and it happens once, when a
bank is made. Each entry gets its own seed, derived from its name: with a shared
seed every adapter starts from the same A and they stay alike, which hides the
difference between exact and inexact combination. Entries are written
atomically and skipped when present, so a killed build resumes.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .atomic import atomic_dir
from .bank import Bank, BankEntry, check_bank_out
from .dataset import Dataset, Example, load_dataset, save_dataset
from .errors import InputError
from .evaluate import Scores, generate_answers, max_new_tokens_for
from .models import target_loss
from .prompts import PromptFormat, pad_pairs, training_pair


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
    bf16_autocast: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Task:
    """A dataset to train one bank entry on."""

    name: str
    path: Path
    family: str | None = None


def entry_seed(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "little")


def read_tasks(paths: list[str | Path]) -> list[Task]:
    """Dataset files, or task-list JSON files (`[{name, family, path}]`, as `data bigbench` writes)."""
    from .dataset import dataset_name

    tasks: list[Task] = []
    for p in map(Path, paths):
        if p.name.endswith("tasks.json"):
            try:
                listed = json.loads(p.read_text(encoding="utf-8"))
                tasks += [Task(t["name"], p.parent / t["path"], t.get("family")) for t in listed]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise InputError(f"{p}: not a task list ({exc}); expected [{{name, family, path}}, ...]") from None
        else:
            tasks.append(Task(dataset_name(p), p))
    names = [t.name for t in tasks]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise InputError(f"task names must be unique; repeated: {', '.join(sorted(dup))}")
    return tasks


def interleave_families(tasks: list[Task]) -> list[Task]:
    """Round-robin over families, so a build stopped halfway still covers every family."""
    groups: dict[str | None, list[Task]] = {}
    for t in tasks:
        groups.setdefault(t.family, []).append(t)
    queues = list(groups.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def _batches(pairs: list[tuple[list[int], list[int]]], cfg: TrainConfig, rng: random.Random, pad: int):
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
    for ids, labels, mask in _batches(pairs, cfg, random.Random(seed), pad):
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
    from .combine import Factors

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


def _save_bf16(peft_model, out: Path) -> None:
    """PEFT's own save, then the tensors re-saved in bf16 (half the bank's size)."""
    import torch
    from safetensors.torch import load_file, save_file

    peft_model.save_pretrained(str(out))
    weights = out / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights))
    (out / "README.md").unlink(missing_ok=True)


def build_bank(
    model_id: str,
    tasks: list[Task],
    out: Path,
    cfg: TrainConfig = TrainConfig(),
    fmt: PromptFormat = PromptFormat(),
    console=None,
) -> Bank:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .models import load_model, load_tokenizer

    check_bank_out(out)
    bank = Bank.create(out, base_model=model_id, tokenizer=model_id)
    if bank.manifest.base_model != model_id:
        raise InputError(f"{out}: bank is for {bank.manifest.base_model}, not {model_id}; use another --out")
    todo = interleave_families(
        [t for t in tasks if t.name not in bank.names or not bank.adapter_path(bank.entry(t.name)).exists()]
    )
    bank.manifest.info.update({"train": cfg.to_dict(), "prompt": fmt.to_dict()})
    if not todo:
        bank.save()
        return bank
    tokenizer = load_tokenizer(model_id)
    model = load_model(model_id)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        overall = progress.add_task("tasks", total=len(todo))
        steps = progress.add_task("steps", total=len(todo) * cfg.steps)
        for task in todo:
            progress.update(overall, description=f"tasks ({task.name[:40]})")
            ds = load_dataset(task.path, name=task.name)
            model = _build_entry(bank, task, ds, model, tokenizer, cfg, fmt, lambda loss: progress.advance(steps))
            bank.save()
            progress.advance(overall)
    return bank


def _build_entry(bank: Bank, task: Task, ds: Dataset, model, tokenizer, cfg: TrainConfig, fmt: PromptFormat, on_step):
    seed = entry_seed(task.name, cfg.seed)
    train = ds.split("train")
    test = ds.split("test")[: cfg.eval_examples]
    t0 = time.perf_counter()
    peft_model = train_lora(model, tokenizer, train, cfg, seed, fmt, on_step)
    train_s = time.perf_counter() - t0
    budget = max_new_tokens_for(tokenizer, [e.target for e in train])
    t0 = time.perf_counter()
    own = Scores.of(generate_answers(peft_model, tokenizer, test, max_new_tokens=budget, fmt=fmt), test)
    with peft_model.disable_adapter():
        base = Scores.of(generate_answers(peft_model, tokenizer, test, max_new_tokens=budget, fmt=fmt), test)
    eval_s = time.perf_counter() - t0
    entry = BankEntry(
        name=task.name,
        adapter_dir=f"adapters/{task.name}",
        dataset=f"datasets/{task.name}.jsonl.gz",
        family=task.family,
    )
    with atomic_dir(bank.adapter_path(entry), force=True) as tmp:
        _save_bf16(peft_model, tmp)
    save_dataset(ds, bank.dataset_path(entry))
    entry.info = {
        "seed": seed,
        "steps": cfg.steps,
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "eval_examples": len(test),
        "max_new_tokens": budget,
        "own_rouge_l": round(own.rouge_l, 4),
        "base_rouge_l": round(base.rouge_l, 4),
        "own_exact_match": round(own.exact_match, 4),
        "base_exact_match": round(base.exact_match, 4),
    }
    bank.add(entry)
    return peft_model.unload()

