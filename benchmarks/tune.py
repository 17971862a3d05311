"""The trainer's tuning sweep: for each start, the learning rate and warm-up that do best at each step budget.

    python -m benchmarks.tune --entries E1,E2 --grid "zero:3e-3,1e-2,3e-2 lora-ga:1e-3,3e-3,1e-2" --warmups 0 \\
        --steps 16 --jobs 2 --out docs/results-tuning
    python -m benchmarks.tune --report --out docs/results-tuning   # docs/TUNING.md from runs.csv

One run per (entry, start, lr, warm-up) trains `--steps` steps on a constant schedule after its warm-up (a schedule
that does not depend on the total steps), and scores the LoRA on the entry's scored examples after steps 1, 2, 4, 8,
16 and 32 up to `--steps` (step 0 too, for the zero start, which is the base model, and the blend start, which is the blend). A run's
rows are appended to runs.csv when it ends, so a stopped sweep resumes where it was. The rule that picks the table
and the rule that drops a start are in docs/TUNING.md, written before the runs.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from benchmarks.rows import append_rows, read_rows

CHECKPOINTS = (1, 2, 4, 8, 16, 32)
SCORED = 8  # valid examples scored per checkpoint while tuning
FIELDS = ("entry", "start", "lr", "warmup", "step", "rouge_l", "loss", "seconds")
GRID = "zero:3e-3,1e-2,3e-2 blend:3e-3,1e-2,3e-2 lora-ga:1e-3,3e-3,1e-2 pissa:3e-4,1e-3,3e-3"  # phase 1
_MODEL = {}


def tuning_entries(bank) -> list[str]:
    """The second task by name of the families at odd positions (1st, 3rd, ...) in the bank's order: entries apart
    from those the study evaluates on (the first of each family)."""
    families = list(dict.fromkeys(e.family for e in bank.entries))
    names = [sorted(e.name for e in bank.entries if e.family == f) for f in families[::2]]
    return [n[1] for n in names if len(n) > 1]


def scored_examples(dataset, seed: int = 0) -> list:
    valid = dataset.split("valid")
    idx = sorted(random.Random(f"{seed}:tune:{dataset.name}").sample(range(len(valid)), min(SCORED, len(valid))))
    return [valid[i] for i in idx]


def blend_factors(bank, dataset, out: Path) -> dict:
    """The default setting's blend for this entry with its family left out (coefficients cached in out/blends/)."""
    from lorablend.bank.combination import combination
    from lorablend.generate import coefficient_row, dataset_distances, exclusions
    from lorablend.settings import DEFAULT_SETTING as S

    path = out / "blends" / f"{dataset.name}.json"
    if not path.exists():
        excluded = exclusions(bank, dataset, [dataset.name], True)
        c = coefficient_row(bank, S, dataset_distances(bank, S, dataset, 0), excluded, dataset)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({n: float(w) for n, w in zip(bank.names, c) if w > 0}, indent=1))
    coefs = json.loads(path.read_text())
    return combination(bank, {n: coefs.get(n, 0.0) for n in bank.names}, S.combine, S.rank)


def run_one(bank_root: str, entry: str, start: str, lr: float, warmup: int, out: str, threads: int,
            steps: int = CHECKPOINTS[-1]) -> list[dict]:
    """One run on the constant schedule, scored at the checkpoints: its rows of runs.csv."""
    import time

    import torch

    from lorablend.bank.manifest import Bank
    from lorablend.dataset import load_dataset
    from lorablend.runtime.evaluate import Scores, generate_answers, max_new_tokens_for
    from lorablend.runtime.models import load_model, load_tokenizer
    from lorablend.runtime.train import TrainConfig, train_factors

    torch.set_num_threads(threads)
    bank = Bank.open(bank_root)
    model_id = bank.manifest.base_model
    if model_id not in _MODEL:
        _MODEL[model_id] = (load_model(model_id), load_tokenizer(model_id))
    model, tok = _MODEL[model_id]
    ds = load_dataset(bank.dataset_path(bank.entry(entry)), name=entry)
    train, scored = ds.split("train"), scored_examples(ds)
    budget = max_new_tokens_for(tok, [e.target for e in train])
    init = blend_factors(bank, ds, Path(out)) if start == "blend" else None
    scores, t0, spent = {}, time.perf_counter(), [0.0]

    def score(step: int, peft_model, _shift) -> None:
        if step in CHECKPOINTS[: CHECKPOINTS.index(steps) + 1] or (step == 0 and start in ("zero", "blend")):
            t = time.perf_counter()
            scores[step] = (Scores.of(generate_answers(peft_model, tok, scored, max_new_tokens=budget), scored).rouge_l,
                            t - t0 - spent[0])
            spent[0] += time.perf_counter() - t

    cfg = TrainConfig(lr=lr, warmup=warmup, decay="constant", start=start)
    _, record = train_factors(model, tok, train, steps, seed=0, init=init, cfg=cfg, at_step=score)
    return [{"entry": entry, "start": start, "lr": lr, "warmup": warmup, "step": k, "rouge_l": round(r, 5),
             "loss": round(record["losses"][k - 1], 5) if k else "", "seconds": round(sec, 2)}
            for k, (r, sec) in sorted(scores.items())]


def read_runs(out: Path) -> list[dict]:
    return read_rows(out / "runs.csv", {"lr": float, "warmup": int, "step": int, "rouge_l": float})


def append_runs(out: Path, rows: list[dict]) -> None:
    append_rows(out / "runs.csv", FIELDS, rows)


def sweep(bank_root: str, entries: list[str], grid: dict[str, list[float]], warmups: list[int], out: Path, jobs: int,
          threads: int, steps: int) -> None:
    """Every (entry, start, lr, warm-up) of the grid (start -> its lrs) not yet in runs.csv at `steps`."""
    from rich.progress import Progress

    from lorablend.bank.manifest import Bank
    from lorablend.dataset import load_dataset

    out.mkdir(parents=True, exist_ok=True)
    done = {(r["entry"], r["start"], r["lr"], r["warmup"]) for r in read_runs(out) if r["step"] == steps}
    todo = [(e, s, lr, w) for e in entries for s, lrs in grid.items() for lr in lrs for w in warmups
            if (e, s, lr, w) not in done]
    if "blend" in grid:  # the blends first, once per entry, on both cores
        import torch

        torch.set_num_threads(jobs * threads)
        bank = Bank.open(bank_root)
        for e in dict.fromkeys(e for e, s, _, _ in todo if s == "blend"):
            blend_factors(bank, load_dataset(bank.dataset_path(bank.entry(e)), name=e), out)
    with Progress() as progress, ProcessPoolExecutor(jobs) as pool:
        bar = progress.add_task("tuning runs", total=len(todo))
        futures = {pool.submit(run_one, bank_root, *job, str(out), threads, steps): job for job in todo}
        for fut in as_completed(futures):
            append_runs(out, fut.result())
            progress.advance(bar)


MARKER = "<!-- tables: generated by `python -m benchmarks.tune --report`; everything below this line is rewritten -->"
TIE = 0.005
DROP = 0.05


def means(rows: list[dict]) -> dict:
    """(start, lr, warm-up, step) -> (mean Rouge-L, number of entries), over the entries that reached that step."""
    acc: dict = {}
    for r in rows:
        acc.setdefault((r["start"], r["lr"], r["warmup"], r["step"]), []).append(r["rouge_l"])
    return {k: (sum(v) / len(v), len(v)) for k, v in acc.items()}


def choose(rows: list[dict]) -> dict:
    """start -> budget -> (lr, warm-up, mean, n): the rule of docs/TUNING.md, among the schedules measured on the
    most entries at that budget."""
    m, out = means(rows), {}
    for start in dict.fromkeys(k[0] for k in m):
        for k in CHECKPOINTS:
            cands = {(lr, w): v for (s, lr, w, step), v in m.items() if s == start and step == k}
            if not cands:
                continue
            most = max(n for _, n in cands.values())
            cands = {c: v for c, v in cands.items() if v[1] == most}
            best = max(v[0] for v in cands.values())
            lr, w = min(c for c, v in cands.items() if v[0] >= best - TIE)
            out.setdefault(start, {})[k] = (lr, w, cands[(lr, w)][0], most)
    return out


def step0(rows: list[dict]) -> dict[str, tuple[float, int]]:
    """start -> (mean over entries, entries) of its step 0: the base model (zero) and the blend itself (blend)."""
    per: dict = {}
    for r in rows:
        if r["step"] == 0:
            per.setdefault(r["start"], {})[r["entry"]] = r["rouge_l"]
    return {s: (sum(v.values()) / len(v), len(v)) for s, v in per.items()}


def dropped(chosen: dict, margin: float = DROP) -> dict[str, float]:
    """start -> its smallest shortfall: the starts whose best mean trails the best start's by more than `margin` at
    every budget (the rule of docs/TUNING.md, applied after phase 1)."""
    budgets = set.intersection(*(set(per) for per in chosen.values())) if chosen else set()
    best = {k: max(per[k][2] for per in chosen.values()) for k in budgets}
    short = {s: min(best[k] - per[k][2] for k in budgets) for s, per in chosen.items()} if budgets else {}
    return {s: d for s, d in short.items() if d > margin}


def recipes_literal(rows: list[dict]) -> str:
    """The chosen table as runtime/recipes.py spells it (TUNED_ON, TUNED without the dropped starts, BLEND_ALONE)."""
    chosen = choose(rows)
    kept = {s: per for s, per in chosen.items() if s not in dropped(chosen)}
    lines = [f"TUNED_ON = {tuple(sorted({r['entry'] for r in rows}))!r}", "TUNED = {"]
    lines += [f'    "{s}": {{' + ", ".join(f"{k}: ({v[0]:g}, {v[1]}, {v[2]:.3f})" for k, v in per.items()) + "},"
              for s, per in kept.items()]
    return "\n".join(lines + ["}", f"BLEND_ALONE = {step0(rows).get('blend', (0.0,))[0]:.3f}"])


def write_report(rows: list[dict], page: Path) -> None:
    m, chosen = means(rows), choose(rows)
    steps = [k for k in CHECKPOINTS if any(key[3] == k for key in m)]
    entries = sorted({r["entry"] for r in rows})
    lines = [MARKER, "", f"Runs: {len({(r['entry'], r['start'], r['lr'], r['warmup']) for r in rows})} complete on "
             f"{len(entries)} entries ({', '.join(entries)}). Mean Rouge-L on 8 valid examples per entry; n: entries.",
             ""]
    for s, v in step0(rows).items():
        lines.append(f"- step 0 of the {s} start ({'the base model' if s == 'zero' else 'the blend itself'}): "
                     f"{v[0]:.3f} (n = {v[1]})")
    lines += ["", "## The chosen schedule per start and budget", "",
              "| start | " + " | ".join(f"{k} steps" for k in steps) + " |",
              "|---|" + "---|" * len(steps)]
    for start, per in chosen.items():
        cells = [f"lr {per[k][0]:g}, w {per[k][1]}: {per[k][2]:.3f} (n {per[k][3]})" if k in per else "–"
                 for k in steps]
        lines.append(f"| {start} | " + " | ".join(cells) + " |")
    gone = dropped(chosen)
    lines += ["", "Rule to drop a start (phase 1, warm-up 0): "
              + ("; ".join(f"{s} trails the best start by at least {d:.3f} at every budget: dropped" for s, d in
                           gone.items()) or "no start trails the best by more than 0.05 at every budget: none dropped")
              + "."]
    lines += ["", "## Every schedule measured", ""]
    for start in chosen:
        scheds = sorted({(lr, w) for (s, lr, w, step) in m if s == start})
        lines += [f"### {start}", "", "| lr, warm-up | " + " | ".join(f"{k}" for k in steps) + " |",
                  "|---|" + "---|" * len(steps)]
        for lr, w in scheds:
            cells = []
            for k in steps:
                v = m.get((start, lr, w, k))
                mark = "**" if k in chosen[start] and chosen[start][k][:2] == (lr, w) else ""
                cells.append(f"{mark}{v[0]:.3f}{mark} ({v[1]})" if v else "–")
            lines.append(f"| {lr:g}, {w} | " + " | ".join(cells) + " |")
        lines.append("")
    text = page.read_text()
    page.write_text(text[: text.index(MARKER)] + "\n".join(lines).rstrip() + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bank", default="default")
    ap.add_argument("--entries", default="", help="comma-separated; default: the tuning entries (tuning_entries)")
    ap.add_argument("--grid", default=GRID, help="start:lr,lr,... separated by spaces")
    ap.add_argument("--steps", type=int, default=16, help="the longest budget tuned (a checkpoint: 1, 2, 4, ... 32)")
    ap.add_argument("--warmups", default="0")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("docs/results-tuning"))
    ap.add_argument("--report", action="store_true", help="write docs/TUNING.md's tables from runs.csv")
    args = ap.parse_args(argv)
    from lorablend.bank.manifest import Bank

    bank = Bank.open(args.bank)
    if args.report:
        rows = read_runs(args.out)
        write_report(rows, Path("docs/TUNING.md"))
        print(recipes_literal(rows))
        return
    entries = [e for e in args.entries.split(",") if e] or tuning_entries(bank)
    grid = {g.split(":")[0]: [float(x) for x in g.split(":")[1].split(",")] for g in args.grid.split()}
    if args.steps not in CHECKPOINTS:
        ap.error(f"--steps must be one of {CHECKPOINTS}")
    sweep(str(bank.root), entries, grid, [int(x) for x in args.warmups.split(",")], args.out, args.jobs, args.threads,
          args.steps)


if __name__ == "__main__":
    sys.exit(main())
