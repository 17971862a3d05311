"""Where entries run: in this process, a process pool, or Ray."""

from __future__ import annotations

import os
from pathlib import Path

from lorablend.bank.manifest import Bank
from lorablend.bench.entry import EntryJob, EntryPlan
from lorablend.bench.evaluator import EntryEvaluator
from lorablend.bench.plan import BenchConfig, eval_key, slots_for
from lorablend.bench.records import RecordStore
from lorablend.settings import parse_setting


def threads_per_job(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // jobs)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def execute(jobs: list[EntryJob], cfg: BenchConfig, store: RecordStore, advance) -> None:
    """Run the entries in this process, a local process pool (`--jobs`) or as Ray tasks."""
    threads = cfg.threads or threads_per_job(cfg.jobs)
    if cfg.executor == "ray":
        _execute_ray(jobs, cfg, threads, store, advance)
    elif cfg.jobs > 1:
        _execute_pool(jobs, cfg.jobs, threads, store, advance)
    else:
        _init_worker(threads)
        for job in jobs:
            run_entry(job, on_record=lambda: advance(1))


def _watch(wait_some, store: RecordStore, advance, interval: float = 1.0) -> None:
    """Advance the progress bar by the records workers have written until `wait_some(interval)` says all are done."""
    seen, finished = store.count(), False
    while not finished:
        finished = wait_some(interval)
        now = store.count()
        advance(now - seen)
        seen = now


def _execute_pool(jobs: list[EntryJob], workers: int, threads: int, store: RecordStore, advance) -> None:
    """Entries over local processes (spawned: forking a process that has used torch threads can hang)."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = [pool.submit(run_entry, job) for job in jobs]

        def wait_some(timeout: float) -> bool:
            done, pending = wait(futures, timeout=timeout, return_when=FIRST_EXCEPTION)
            for f in done:
                f.result()  # re-raise a worker's error here
            return not pending

        try:
            _watch(wait_some, store, advance)
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _ray_entry(job: EntryJob, threads: int) -> int:
    """A Ray task: one entry in a Ray worker (which keeps its model between tasks, like a pool worker)."""
    _init_worker(threads)
    return run_entry(job)


def _execute_ray(jobs: list[EntryJob], cfg: BenchConfig, threads: int, store: RecordStore, advance) -> None:
    """Entries as Ray tasks on `--ray-address` (default: a local instance, shut down afterwards).

    Workers read the bank and write records by path: on a cluster, the bank and the results dir
    must be on a filesystem every node sees at the same path.
    """
    from lorablend.cluster import ray_session

    with ray_session(cfg.ray_address) as ray:
        task = ray.remote(num_cpus=threads)(_ray_entry)
        pending = [task.remote(job, threads) for job in jobs]

        def wait_some(timeout: float) -> bool:
            nonlocal pending
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=timeout)
            ray.get(ready)  # re-raise a task's error here
            return not pending

        _watch(wait_some, store, advance)


def run_entry(job: EntryJob, on_record=None) -> int:
    """Compute the missing records of one entry; returns how many were written."""
    from lorablend.dataset import load_dataset

    bank = Bank.open(job.bank)
    store = RecordStore(Path(job.results))
    done = store.load(job.entry)
    specs = [parse_setting(s) for s in job.settings]
    slots = [s for s in slots_for(specs, job.holdouts, job.train_steps) if (s.holdout, s.label) not in done]
    if not slots:
        return 0
    entry = bank.entry(job.entry)
    dataset = load_dataset(bank.dataset_path(entry), name=entry.name)
    plan = EntryPlan(bank, entry.name, dataset, job.matrices, Path(job.results) / "ce", job.seed, job.neural_hidden,
                     job.neural_epochs)
    # per evaluation, the record that was charged its cost (the largest seconds_adapter): cost_s reads it
    charged = sorted(done.values(), key=lambda r: r["seconds_adapter"])
    evaluator = EntryEvaluator(bank, entry, dataset, job, {r["eval_key"]: r for r in charged})
    items = []
    for slot in slots:
        c, info = evaluator.validated(plan, slot.holdout) if slot.control == "validated" else plan.coefficients(slot)
        items.append((slot, c, info, eval_key(c, slot.combine, slot.rank, bank.names, slot)))
    return evaluator.run(items, store, on_record)
