"""`lorablend bank build`: a bank trained from task files, one LoRA per task with the bank's recipe, in this process
or as Ray tasks.

Each entry gets its own seed, derived from its name: with a shared seed every adapter starts from the same A and
they stay alike, which hides the difference between exact and inexact combination. Entries are written atomically,
where the build runs, and skipped when present, so a killed build resumes. An entry depends only on its dataset, the
recipe, its seed and the threads: trained on a Ray worker it is bit-identical to the same entry trained here."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from lorablend.atomic import atomic_dir
from lorablend.bank.manifest import MANIFEST, Bank, BankEntry, check_bank_out
from lorablend.dataset import Dataset, load_dataset, save_dataset
from lorablend.errors import InputError
from lorablend.machine import bf16_kernels
from lorablend.runtime.evaluate import Scores, generate_answers, max_new_tokens_for
from lorablend.runtime.prompts import PromptFormat
from lorablend.runtime.train import TrainConfig, train_lora

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class Task:
    """A dataset to train one bank entry on."""

    name: str
    path: Path
    family: str | None = None


@dataclass(frozen=True)
class Trained:
    """One entry trained: its adapter's files as bytes (so a Ray worker can hand them to the driver) and its record."""

    files: dict[str, bytes]
    info: dict = field(default_factory=dict)


@dataclass
class BuildReport:
    bank: Bank
    built: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # entry name -> one-line reason (Ray builds)


def entry_seed(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "little")


def read_tasks(paths: list[str | Path]) -> list[Task]:
    """Dataset files, task-list JSON files (`[{name, family, path}]`, as `data bigbench` writes), or banks (a bank
    dir or `default`: its entries' committed datasets, names and families, e.g. to rebuild the default bank)."""
    from lorablend.dataset import dataset_name

    tasks: list[Task] = []
    for p in map(Path, paths):
        if str(p) == "default" or (p / MANIFEST).is_file():
            bank = Bank.open(p)
            tasks += [Task(e.name, bank.dataset_path(e), e.family) for e in bank.entries]
        elif p.name.endswith("tasks.json"):
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


def select_tasks(tasks: list[Task], names: list[str]) -> list[Task]:
    """`--entries`: the named tasks, in the order given; an unknown name is an error listing a few known ones."""
    by_name = {t.name: t for t in tasks}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise InputError(f"--entries: no task named '{unknown[0]}' in --tasks (tasks: {', '.join(list(by_name)[:4])}…)")
    return [by_name[n] for n in names]


def interleave_families(tasks: list[Task]) -> list[Task]:
    """Round-robin over families, so a build stopped halfway still covers every family."""
    groups: dict[str | None, list[Task]] = {}
    for t in tasks:
        groups.setdefault(t.family, []).append(t)
    queues = list(groups.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def recorded_base(model: str, model_id: str | None = None) -> str:
    """The base model a bank records: a hub id, never a local path (which names a model on one machine only). A local
    dir given with its id is remembered, so that later runs on this machine load it for the id."""
    from lorablend.runtime.models import hub_id, remember_local

    recorded = model_id or hub_id(model)
    if not recorded:
        raise InputError(f"{model}: a local model dir that does not say which hub model it is; pass --model-id with "
                         "its hub id (e.g. mistralai/Mistral-7B-Instruct-v0.2): banks record the id, not the path")
    if Path(recorded).is_absolute():
        raise InputError(f"--model-id {recorded}: a path, not a hub id; give the id the model has on the hub")
    if model_id and Path(model).expanduser().is_dir():
        remember_local(model_id, model)
    return recorded


def build_bank(model: str, tasks: list[Task], out: Path, cfg: TrainConfig = TrainConfig(),
               fmt: PromptFormat = PromptFormat(), console=None, *, model_id: str | None = None,
               executor: str = "local", ray_address: str | None = None, threads: int | None = None) -> BuildReport:
    """Train the entries of `tasks` not yet in the bank at `out`. `model` is loaded (a hub id, a local dir or
    'smollm2'); `model_id` is the hub id the bank records when `model` is a local dir that does not name one."""
    base = recorded_base(model, model_id)
    check_bank_out(out)
    bank = Bank.create(out, base_model=base, tokenizer=base)
    if bank.manifest.base_model != base:
        raise InputError(f"{out}: bank is for {bank.manifest.base_model}, not {base}; use another --out")
    todo = interleave_families(
        [t for t in tasks if t.name not in bank.names or not bank.adapter_path(bank.entry(t.name)).exists()]
    )
    bank.manifest.info.update({"train": cfg.to_dict(), "prompt": fmt.to_dict()})
    report = BuildReport(bank)
    if not todo:
        bank.save()
        return report
    if executor == "ray":
        _build_on_ray(report, todo, model, cfg, fmt, console, ray_address, threads or 1)
    else:
        _build_here(report, todo, model, cfg, fmt, console, threads)
    bank.save()
    return report


def _progress(console):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    return Progress(*columns, console=console, transient=False)


def _build_here(report: BuildReport, todo: list[Task], model_name: str, cfg: TrainConfig, fmt: PromptFormat, console,
                threads: int | None) -> None:
    import torch

    from lorablend.runtime.models import load_model, load_tokenizer

    if threads:
        torch.set_num_threads(threads)
    bank = report.bank
    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name)
    with _progress(console) as progress:
        overall = progress.add_task("tasks", total=len(todo))
        steps = progress.add_task("steps", total=len(todo) * cfg.steps)
        for task in todo:
            progress.update(overall, description=f"tasks ({task.name[:40]})")
            ds = load_dataset(task.path, name=task.name)
            trained, model = train_entry(model, tokenizer, task, ds, cfg, fmt, bank.manifest.base_model,
                                         lambda loss: progress.advance(steps))
            write_entry(bank, task, ds, trained)
            bank.save()
            report.built.append(task.name)
            progress.advance(overall)


_WORKER_MODELS: dict[str, tuple] = {}  # a Ray worker keeps its model between tasks, as a local build does


def _train_on_worker(model_name: str, task: Task, ds: Dataset, cfg: TrainConfig, fmt: PromptFormat, base: str,
                     threads: int) -> Trained:
    import torch

    from lorablend.runtime.models import load_model, load_tokenizer

    torch.set_num_threads(threads)
    if model_name not in _WORKER_MODELS:
        _WORKER_MODELS[model_name] = (load_model(model_name), load_tokenizer(model_name))
    model, tokenizer = _WORKER_MODELS[model_name]
    trained, model = train_entry(model, tokenizer, task, ds, cfg, fmt, base)
    _WORKER_MODELS[model_name] = (model, tokenizer)
    return trained


def _build_on_ray(report: BuildReport, todo: list[Task], model_name: str, cfg: TrainConfig, fmt: PromptFormat, console,
                  address: str | None, threads: int) -> None:
    """Entries as Ray tasks of `threads` CPUs; each result is written here as it arrives, a failure listed and
    skipped (the next build retries it)."""
    from lorablend.cluster import ray_session

    bank = report.bank
    datasets = {t.name: load_dataset(t.path, name=t.name) for t in todo}  # bad input fails here, before any work
    with ray_session(address) as ray, _progress(console) as progress:
        bar = progress.add_task("entries (Ray)", total=len(todo))
        remote = ray.remote(num_cpus=threads)(_train_on_worker)
        pending = {remote.remote(model_name, t, datasets[t.name], cfg, fmt, bank.manifest.base_model, threads): t
                   for t in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            task = pending.pop(ready[0])
            try:
                trained = ray.get(ready[0])
            except Exception as exc:  # a task's error: listed at the end, the other entries go on
                cause = getattr(exc, "cause", None) or exc
                report.failed[task.name] = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            else:
                write_entry(bank, task, datasets[task.name], trained)
                bank.save()
                report.built.append(task.name)
            progress.advance(bar)


def train_entry(model, tokenizer, task: Task, ds: Dataset, cfg: TrainConfig, fmt: PromptFormat, base: str,
                on_step=None) -> tuple[Trained, object]:
    """(the entry's adapter and record, `model` given back without the LoRA, for the next entry)."""
    import torch

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
        base_scores = Scores.of(generate_answers(peft_model, tokenizer, test, max_new_tokens=budget, fmt=fmt), test)
    eval_s = time.perf_counter() - t0
    info = {
        "seed": seed,
        "steps": cfg.steps,
        "bf16_autocast": cfg.resolved().bf16_autocast,
        "bf16_kernels": bf16_kernels(),  # with torch's version, what a bit-identical rebuild needs to match
        "torch": torch.__version__,
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "eval_examples": len(test),
        "max_new_tokens": budget,
        "own_rouge_l": round(own.rouge_l, 4),
        "base_rouge_l": round(base_scores.rouge_l, 4),
        "own_exact_match": round(own.exact_match, 4),
        "base_exact_match": round(base_scores.exact_match, 4),
    }
    return Trained(_adapter_files(peft_model, base), info), peft_model.unload()


def _adapter_files(peft_model, base: str) -> dict[str, bytes]:
    """PEFT's own save, the tensors re-saved in bf16 (half the bank's size), the config made the same in every
    process: the base model named by its hub id, target_modules sorted (PEFT keeps a set, ordered by the process's
    string hashes)."""
    from safetensors.torch import load_file

    from lorablend.adapter import CONFIG, WEIGHTS, save_bf16

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        peft_model.save_pretrained(str(out), save_embedding_layers=False)  # "auto" would look the id up on the hub
        save_bf16(load_file(str(out / WEIGHTS)), out / WEIGHTS)
        config = json.loads((out / CONFIG).read_text(encoding="utf-8"))
        return {CONFIG: portable_config(config, base), WEIGHTS: (out / WEIGHTS).read_bytes()}


def portable_config(config: dict, base: str) -> bytes:
    """An adapter_config.json as a bank keeps it: the base model's hub id, target_modules sorted, PEFT's layout."""
    targets = config.get("target_modules")
    config = {**config, "base_model_name_or_path": base,
              "target_modules": sorted(targets) if isinstance(targets, list) else targets}
    return json.dumps(config, indent=2, sort_keys=True).encode()


def write_entry(bank: Bank, task: Task, ds: Dataset, trained: Trained) -> BankEntry:
    entry = BankEntry(
        name=task.name,
        adapter_dir=f"adapters/{task.name}",
        dataset=f"datasets/{task.name}.jsonl.gz",
        family=task.family,
        info=dict(trained.info),
    )
    try:
        with atomic_dir(bank.adapter_path(entry), force=True) as tmp:
            for name, blob in trained.files.items():
                (tmp / name).write_bytes(blob)
        save_dataset(ds, bank.dataset_path(entry))
    except BaseException:  # an entry is in the bank whole, or not at all
        shutil.rmtree(bank.adapter_path(entry), ignore_errors=True)
        bank.dataset_path(entry).unlink(missing_ok=True)
        raise
    bank.add(entry)
    return entry
