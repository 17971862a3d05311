"""`lorablend bench`: plan the run, compute every missing record (entry by entry, in whatever executor), export
scores.csv, recall.csv and the run log. How the study works, and what it costs: docs/BENCH.md."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lorablend.atomic import write_json
from lorablend.bank.manifest import Bank
from lorablend.bench.entry import EntryJob, EntryPlan
from lorablend.bench.executors import execute, threads_per_job
from lorablend.bench.plan import (DEFAULT_N, HOLDOUTS, PRUNE, QUICK_N, BenchConfig, Matrices, candidate_specs,
                                  compute_matrices, preset_specs, slots_for)
from lorablend.bench.records import RecordStore, export_csv
from lorablend.errors import InputError
from lorablend.runtime.scoring import CE_EXAMPLES
from lorablend.settings import Setting
from lorablend.machine import machine


class Reporter:
    """What the CLI shows; the default shows nothing."""

    def start(self, total: int) -> None: ...

    def advance(self, k: int = 1) -> None: ...

    def status(self, message: str) -> None: ...


@dataclass
class BenchRun:
    results: Path
    csv: Path
    written: int
    total: int
    seconds: float


@dataclass(frozen=True)
class RunPlan:
    """What a run covers, from its config and the bank."""

    settings: list[Setting]
    entries: list[str]
    holdouts: tuple[str, ...]
    n: int
    backend: str  # resolved: torch | llamacpp


def plan_run(cfg: BenchConfig, bank: Bank) -> RunPlan:
    """The quick preset defaults to one entry per family, holdout entry and QUICK_N examples; otherwise every
    entry, both holdouts and DEFAULT_N."""
    specs = preset_specs(list(cfg.presets), list(cfg.settings))
    if not specs:
        raise InputError("no settings to run: give --preset or --settings")
    quick = "quick" in cfg.presets
    entries = list(cfg.entries) if cfg.entries else (bank.first_of_each_family() if quick else bank.names)
    unknown = [e for e in entries if e not in bank.names]
    if unknown:
        raise InputError(f"--entries: no bank entry named {unknown[0]}; see `lorablend bank info {bank.root}`")
    holdouts = tuple(cfg.holdouts) if cfg.holdouts else (("entry",) if quick else HOLDOUTS)
    bad = [h for h in holdouts if h not in HOLDOUTS]
    if bad:
        from lorablend.errors import suggest

        raise suggest(bad[0], HOLDOUTS, "holdout")
    n = cfg.n or (QUICK_N if quick else DEFAULT_N)
    if cfg.executor not in ("local", "ray"):
        raise InputError(f"unknown --executor '{cfg.executor}'; choose local or ray")
    if n < 1 or cfg.max_new_tokens < 1 or cfg.batch_size < 1 or cfg.jobs < 1:
        raise InputError("--n, --max-new-tokens, --batch-size and --jobs must be >= 1")
    if len(bank.entries) < 4:
        raise InputError(f"{bank.root}: the bench needs a bank of at least 4 entries")
    from lorablend.runtime.llamacpp import resolve_backend

    return RunPlan(specs, entries, holdouts, n, resolve_backend(cfg.backend, bank.manifest.base_model))


def pin_config(results: Path, bank: Bank, cfg: BenchConfig, n: int, backend: str) -> None:
    """RESULTS/config.json: what the records depend on. A different run refuses to mix with them."""
    from lorablend import __version__

    want = {"bank": str(bank.root.resolve()), "bank_manifest_sha256": bank.sha256, "n": n,
            "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "neural_hidden": cfg.neural_hidden,
            "neural_epochs": cfg.neural_epochs, "prune": PRUNE, "backend": backend}
    path = results / "config.json"
    if path.exists():
        have = json.loads(path.read_text(encoding="utf-8"))
        diff = [k for k in want if have.get(k) != want[k]]
        if diff:
            raise InputError(f"{results}: holds records made with another {diff[0]} ({have.get(diff[0])!r}, now "
                             f"{want[diff[0]]!r}); use another --results or remove that directory")
        return
    write_json(path, {**want, "lorablend_version": __version__})


def run_bench(cfg: BenchConfig, reporter: Reporter | None = None) -> BenchRun:
    """Compute every missing record, then export scores.csv and coefficients.json into the results dir."""
    reporter = reporter or Reporter()
    t0, started = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    bank = Bank.open(cfg.bank)
    plan = plan_run(cfg, bank)
    specs, entries, holdouts, n, backend = plan.settings, plan.entries, plan.holdouts, plan.n, plan.backend
    results = Path(cfg.results)
    pin_config(results, bank, cfg, n, backend)
    store = RecordStore(results)
    if not store.count() and (results / "scores.csv").exists():
        reporter.status(f"restored {store.restore(results / 'scores.csv')} records from {results / 'scores.csv'}")
    slots = slots_for(specs, holdouts, cfg.train_steps)
    missing = store.missing(entries, slots)
    todo = [e for e in entries if missing[e]]
    reporter.start(sum(missing.values()))
    before, finished = store.count(), False
    try:
        matrices = compute_matrices(bank, candidate_specs(specs, cfg.train_steps), results / "matrices", cfg.seed,
                                    reporter.status)
        if todo:
            jobs = [EntryJob(str(bank.root), e, [s.label for s in specs], holdouts, str(results), matrices, n,
                             cfg.max_new_tokens, cfg.seed, cfg.batch_size, cfg.neural_hidden, cfg.neural_epochs,
                             backend, cfg.threads or threads_per_job(cfg.jobs), cfg.train_steps)
                    for e in todo]
            reporter.status(f"records ({len(todo)} entries to run)")
            execute(jobs, cfg, store, reporter.advance)
        write_recall(bank, specs, holdouts, matrices, results)
        finished = True
    finally:  # an interrupted run is logged too: its wall time counts in the report
        seconds = time.perf_counter() - t0
        total = len(entries) * len(slots)
        log_run(results, cfg, n, backend, started, seconds, store.count() - before, finished,
                (total - sum(store.missing(entries, slots).values()), total))
    return BenchRun(results, export_csv(store, results), store.count() - before, len(entries) * len(slots), seconds)


RECALL_M = (1, 2, 4, 6, 8, 10, 12, 16)


def write_recall(bank: Bank, specs: list[Setting], holdouts: tuple[str, ...], matrices: Matrices, results: Path) -> Path | None:
    """RESULTS/recall.csv: for every entry with cached ce (and grad) rows, every rerank retriever of the
    settings and holdout, whether its top m holds the exact-ce best adapter (m in RECALL_M). Rows of other
    retrievers and holdouts already in the file are kept: a run of a few settings must not erase the study's."""
    import csv
    import io

    from lorablend.atomic import atomic_file
    from lorablend.dataset import load_dataset

    retrievers = list(dict.fromkeys((s.sketch, s.metric) for s in specs if s.rerank))

    def cached(kind: str) -> set[str]:  # ENTRY.k16.SHA.json (ce), ENTRY.grad.k16.SHA.json
        files = (results / "ce").glob(f"*.k{CE_EXAMPLES}.{bank.sha256[:16]}.json")
        return {p.name.split(".")[0] for p in files if p.name.split(".")[1] == kind}

    done = cached(f"k{CE_EXAMPLES}")
    if any(m.startswith("grad") for _, m in retrievers):
        done &= cached("grad")
    entries = [e for e in bank.names if e in done]
    if not retrievers or not entries:
        return None
    rows = []
    for e in entries:
        plan = EntryPlan(bank, e, load_dataset(bank.dataset_path(bank.entry(e)), name=e), matrices, results / "ce")
        rows += [r for h in holdouts for ret in retrievers for r in plan.recall(h, ret, RECALL_M)]
    path = results / "recall.csv"
    if path.exists():
        new = {(r["entry"], r["holdout"], r["retriever"]) for r in rows}
        with open(path, newline="", encoding="utf-8") as fh:
            rows += [r for r in csv.DictReader(fh) if (r["entry"], r["holdout"], r["retriever"]) not in new]
    rows.sort(key=lambda r: (r["entry"], r["holdout"], r["retriever"], int(r["m"])))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_file(path, "w") as fh:
        fh.write(buf.getvalue())
    return path


def log_run(results: Path, cfg: BenchConfig, n: int, backend: str, started: str, seconds: float, written: int,
            finished: bool, records: tuple[int, int]) -> None:
    """Append this invocation to RESULTS/run.json (the report sums wall time over resumed runs).

    `records`: how many of this invocation's records exist after it, of how many it asked for.
    """
    path = results / "run.json"
    runs = json.loads(path.read_text(encoding="utf-8"))["runs"] if path.exists() else []
    runs.append({"command": cfg.command or " ".join(sys.argv), "started_utc": started, "wall_seconds": round(seconds, 1),
                 "records_written": written, "records_present": records[0], "records_total": records[1], "finished": finished, "n": n, "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size,
                 "jobs": cfg.jobs, "threads": cfg.threads or threads_per_job(cfg.jobs), "executor": cfg.executor, "backend": backend,
                 "machine": machine()})
    write_json(path, {"runs": runs})
