"""`lorablend bank build`: a bank trained from task files, one LoRA per task with the bank's recipe.

Each entry gets its own seed, derived from its name: with a shared seed every adapter starts from the same A and
they stay alike, which hides the difference between exact and inexact combination. Entries are written atomically
and skipped when present, so a killed build resumes."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from lorablend.atomic import atomic_dir
from lorablend.bank.manifest import Bank, BankEntry, check_bank_out
from lorablend.dataset import Dataset, load_dataset, save_dataset
from lorablend.errors import InputError
from lorablend.runtime.evaluate import Scores, generate_answers, max_new_tokens_for
from lorablend.runtime.prompts import PromptFormat
from lorablend.runtime.train import TrainConfig, train_lora


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
    from lorablend.dataset import dataset_name

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


def build_bank(
    model_id: str,
    tasks: list[Task],
    out: Path,
    cfg: TrainConfig = TrainConfig(),
    fmt: PromptFormat = PromptFormat(),
    console=None,
) -> Bank:
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from lorablend.runtime.models import load_model, load_tokenizer

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
    peft_model, _ = train_lora(model, tokenizer, train, cfg, seed, fmt, on_step)  # the zero start: no shift
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
        "bf16_autocast": cfg.resolved().bf16_autocast,
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


def _save_bf16(peft_model, out: Path) -> None:
    """PEFT's own save, then the tensors re-saved in bf16 (half the bank's size)."""
    from safetensors.torch import load_file

    from lorablend.adapter import WEIGHTS, save_bf16

    peft_model.save_pretrained(str(out))
    save_bf16(load_file(str(out / WEIGHTS)), out / WEIGHTS)
    (out / "README.md").unlink(missing_ok=True)
