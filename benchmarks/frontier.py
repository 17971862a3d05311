"""Quality against compute on the first task of each family, its whole family left out of the bank, or on tasks
outside the bank (`--tasks`, the whole bank available): the blend, the tuned trainer from each start, and
`generate --budget`, on the same test examples.

    python -m benchmarks.frontier --entries E1,E2 --n 16 --budgets 6,12 --out docs/results-frontier
    python -m benchmarks.frontier --report --out docs/results-frontier      # docs/FRONTIER.md and its plot
    python -m benchmarks.frontier --tasks benchmarks/outside --n 16 --budgets 0,15 --starts zero,lora-ga
    python -m benchmarks.frontier --report --out docs/results-frontier-outside   # docs/FRONTIER-OUTSIDE.md

Per entry: the base model, the nearest bank adapter (0 passes), the default setting's blend (its counted passes),
the task's own 32-step LoRA (a reference; bank entries only), each start of `runtime/recipes.TUNED` (or `--starts`)
trained at its tuned schedule for 1, 2, 4, 8 and 16 steps (one run per distinct schedule, scored at the budgets it
is chosen for: the schedule is constant, so the first K steps of a run are the K-step adapter), and
`generate --budget B` for each B (validated on the valid split, scored on the test sample). Trained adapters learn
from the whole train split. A record is one line of scores.csv with its per-example Rouge-L, appended when measured,
so a stopped run resumes. A trained record names its schedule: when the tuned table changes, the cells it changed run
again and the report leaves out the records of schedules the table no longer chooses.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.rows import append_rows, read_rows

FIELDS = ("entry", "what", "steps", "passes", "rouge_l", "per_example", "seconds", "won", "schedule")
_MODEL: dict = {}


def first_entries(bank) -> list[str]:
    families = list(dict.fromkeys(e.family for e in bank.entries))
    return [sorted(e.name for e in bank.entries if e.family == f)[0] for f in families]


def schedule(start: str, steps: int) -> str:
    """The tuned schedule a trained record ran, as scores.csv names it: 'lr/warm-up'."""
    from lorablend.runtime.recipes import tuned

    cfg = tuned(start, steps)
    return f"{cfg.lr:g}/{cfg.warmup}"


def current(r: dict) -> bool:
    """Whether a record is of the tuned table as it stands (records that are not trained always are)."""
    return not r["what"].startswith("train:") or r["schedule"] == schedule(r["what"][6:].split("@")[0], r["steps"])


def read(out: Path) -> list[dict]:
    return read_rows(out / "scores.csv", {"steps": int, "passes": float, "rouge_l": float, "per_example": json.loads})


def append(out: Path, rows: list[dict]) -> None:
    append_rows(out / "scores.csv", FIELDS, [{**r, "per_example": json.dumps(r["per_example"])} for r in rows])


class Entry:
    """One entry's data, test sample and answer budget, on a model loaded once per process: a bank entry, its family
    left out of the bank, or (`path`) a dataset outside the bank, which leaves nothing out and has no own LoRA."""

    def __init__(self, bank, name: str, n: int, path: Path | None = None):
        from lorablend.bench.entry import test_sample
        from lorablend.settings import DEFAULT_SETTING
        from lorablend.dataset import load_dataset
        from lorablend.generate import exclusions
        from lorablend.runtime.evaluate import max_new_tokens_for
        from lorablend.runtime.models import load_model, load_tokenizer

        self.bank, self.name, self.model_id = bank, name, bank.manifest.base_model
        if self.model_id not in _MODEL:
            _MODEL[self.model_id] = (load_model(self.model_id), load_tokenizer(self.model_id))
        self.model, self.tok = _MODEL[self.model_id]
        self.ds = load_dataset(path or bank.dataset_path(bank.entry(name)), name=name)
        self.test = test_sample(self.ds, n, 0)
        self.budget = max_new_tokens_for(self.tok, [e.target for e in self.ds.split("train")])
        self.own = None if path else bank.adapter_path(bank.entry(name))
        self.exclude = [] if path else [name]
        self.excluded = exclusions(bank, self.ds, self.exclude, True)
        self.setting = DEFAULT_SETTING.capped(len(bank.names) - len(self.excluded))

    def per_example(self, model, adapter=None) -> list[float]:
        from lorablend.runtime.evaluate import answers_with, generate_answers, rouge

        answers = (generate_answers(model, self.tok, self.test, max_new_tokens=self.budget) if adapter is False else
                   answers_with(model, adapter, self.tok, self.test, max_new_tokens=self.budget))
        return [round(rouge(a, e.outputs)[0], 5) for a, e in zip(answers, self.test)]

    def row(self, what: str, steps: int, passes: float, scores: list[float], seconds: float, schedule: str = ""
            ) -> dict:
        return {"entry": self.name, "what": what, "steps": steps, "passes": round(passes, 2),
                "rouge_l": round(sum(scores) / len(scores), 5), "per_example": scores, "seconds": round(seconds, 1),
                "won": "", "schedule": schedule}


def fixed_rows(e: Entry, out: Path) -> list[dict]:
    """The base model, the nearest adapter, the default setting's blend and the task's own LoRA (if it has one)."""
    from lorablend.generate import blend_tier, nearest_coefficients
    from lorablend.output import write_combination
    from lorablend.runtime.evaluate import load_for_eval
    from lorablend.settings import DEFAULT_SETTING

    t0 = time.perf_counter()
    spent = {"passes": 0.0}
    _, blend, _ = blend_tier(e.bank, e.setting, e.ds, e.excluded, True, 0, False, {}, spent)
    blend_s = time.perf_counter() - t0
    (out / "blends").mkdir(parents=True, exist_ok=True)
    (out / "blends" / f"{e.name}.json").write_text(json.dumps({"passes": spent["passes"], "coefficients": {
        n: w for n, w in blend.items() if w > 0}}, indent=1))
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"own": str(e.own)} if e.own else {}
        for what, coefs in (("nearest", nearest_coefficients(e.bank, e.ds, e.excluded, 0)), ("blend", blend)):
            dirs[what] = f"{tmp}/{what}"
            write_combination(e.bank, coefs, Path(dirs[what]), DEFAULT_SETTING.combine, DEFAULT_SETTING.rank)
        model, _ = load_for_eval(e.model_id, dirs, model=e.model, backend="torch")
        rows = []
        kinds = [("base", 0.0), ("nearest", 0.0), ("blend", spent["passes"])] + ([("own", 48.0)] if e.own else [])
        for what, passes in kinds:
            t = time.perf_counter()
            rows.append(e.row(what, 0 if what != "own" else 32, passes,
                              e.per_example(model, None if what == "base" else what),
                              time.perf_counter() - t + (blend_s if what == "blend" else 0.0)))
        e.model = model.unload()
        _MODEL[e.model_id] = (e.model, e.tok)
    return rows


def trained_rows(e: Entry, start: str, out: Path, done: set) -> list[dict]:
    """Each budget of `start` at its tuned schedule: one run per distinct (lr, warm-up), scored at its budgets."""
    from lorablend.bank.combination import combination
    from lorablend.runtime.recipes import BUDGET_STEPS, STEP_PASSES, tuned
    from lorablend.runtime.starts import START_PASSES
    from lorablend.runtime.train import train_factors
    from lorablend.settings import DEFAULT_SETTING

    init, extra = None, 0.0
    if start == "blend":
        saved = json.loads((out / "blends" / f"{e.name}.json").read_text())
        init = combination(e.bank, {n: saved["coefficients"].get(n, 0.0) for n in e.bank.names},
                           DEFAULT_SETTING.combine, DEFAULT_SETTING.rank)
        extra = saved["passes"]
    groups: dict = {}
    for k in BUDGET_STEPS:
        if (f"train:{start}", k, schedule(start, k)) not in done:
            groups.setdefault(schedule(start, k), []).append(k)
    rows = []
    for ks in groups.values():
        t0, spent = time.perf_counter(), [0.0]

        def score(step, peft_model, _shift, ks=ks):
            if step in ks:
                t = time.perf_counter()
                s = e.per_example(peft_model, False)
                spent[0] += time.perf_counter() - t
                rows.append(e.row(f"train:{start}", step, extra + START_PASSES.get(start, 0.0) + STEP_PASSES * step,
                                  s, time.perf_counter() - t0 - spent[0], schedule(start, step)))

        train_factors(e.model, e.tok, e.ds.split("train"), max(ks), 0, init, cfg=tuned(start, max(ks)), at_step=score)
    return rows


QUANTIZED_STEPS = 8


def quantized_rows(e: Entry, bases: list[str], done: set) -> list[dict]:
    """The zero start's tuned 8 steps over a quantized copy of the base (`runtime/quantized.py`, as `generate
    --train-base` trains at 7B), the plain LoRA they give scored on the full-precision base, as a user applies it.
    Same seed, batches and schedule as the `train:zero` run: a paired comparison of the base's precision alone."""
    import copy

    from lorablend.output import write_output
    from lorablend.runtime.evaluate import load_for_eval
    from lorablend.runtime.quantized import quantize
    from lorablend.runtime.recipes import STEP_PASSES, tuned
    from lorablend.runtime.train import train_factors

    rows = []
    for base in bases:
        what = f"train:zero@{base}"
        if (what, QUANTIZED_STEPS, schedule("zero", QUANTIZED_STEPS)) in done:
            continue
        t0 = time.perf_counter()
        factors, _ = train_factors(quantize(copy.deepcopy(e.model), base), e.tok, e.ds.split("train"),
                                   QUANTIZED_STEPS, 0, cfg=tuned("zero", QUANTIZED_STEPS))
        seconds = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            write_output(Path(tmp) / "a", factors, e.model_id, None, force=False, dtype="float32")
            model, _ = load_for_eval(e.model_id, {"a": f"{tmp}/a"}, model=e.model, backend="torch")
            scores = e.per_example(model, "a")
            e.model = model.unload()
            _MODEL[e.model_id] = (e.model, e.tok)
        rows.append(e.row(what, QUANTIZED_STEPS, STEP_PASSES * QUANTIZED_STEPS, scores, seconds,
                          schedule("zero", QUANTIZED_STEPS)))
    return rows


def budget_rows(e: Entry, budgets: list[float], out: Path, done: set) -> list[dict]:
    """`generate --budget B` as a user runs it (validated on the valid split), scored on the test sample; its passes
    are what the record says it spent (validation's generation is not in them). B = 0 is the gradient-free default,
    validated: what `generate --budget 0` writes."""
    from lorablend.generate import generate
    from lorablend.runtime.evaluate import load_for_eval

    rows = []
    for b in budgets:
        if (f"budget:{b:g}", 0, "") in done:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = generate(e.bank, e.ds, Path(tmp) / "a", e.setting, exclude=e.exclude, exclude_family=True,
                           validate=True, backend="auto", budget=b)
            seconds = time.perf_counter() - t0
            model, _ = load_for_eval(e.model_id, {"a": str(res.out)}, model=e.model, backend="torch")
            scores = e.per_example(model, "a")
            e.model = model.unload()
            _MODEL[e.model_id] = (e.model, e.tok)
        spent = (res.provenance.budget["spent"] if res.provenance.budget else  # --budget 0: the blend tier's passes
                 json.loads((out / "blends" / f"{e.name}.json").read_text())["passes"])
        rows.append(e.row(f"budget:{b:g}", 0, spent, scores, seconds)
                    | {"won": res.verdict.written})
    return rows


def run(bank_root: str, entries: list[str], n: int, budgets: list[float], starts: list[str], out: Path,
        tasks: Path | None = None, bases: list[str] = ()) -> None:
    """Each entry's missing rows; with `tasks`, the entries are the datasets `tasks/<entry>.jsonl.gz`."""
    from rich.progress import Progress

    from lorablend.bank.manifest import Bank

    bank = Bank.open(bank_root)
    out.mkdir(parents=True, exist_ok=True)
    with Progress() as progress:
        bar = progress.add_task("entries", total=len(entries))
        for name in entries:
            done = {(r["what"], r["steps"], r["schedule"]) for r in read(out) if r["entry"] == name}
            e = Entry(bank, name, n, tasks / f"{name}.jsonl.gz" if tasks else None)
            if ("base", 0, "") not in done or not (out / "blends" / f"{name}.json").exists():
                append(out, fixed_rows(e, out))
            for start in starts:
                append(out, trained_rows(e, start, out, done))
            append(out, quantized_rows(e, bases, done))
            append(out, budget_rows(e, budgets, out, done))
            progress.advance(bar)


MARKER = "<!-- tables: generated by `python -m benchmarks.frontier --report`; everything below this line is rewritten -->"
COMPARED_AT = (6, 12, 24)  # passes: 4, 8 and 16 steps from zero


def write_report(rows: list[dict], page: Path, plot: Path) -> None:
    """The means over the entries measured under every row kind, the paired intervals and the plot (a new page gets
    the plot and the tables; its prose is written after)."""
    import numpy as np

    from lorablend.stats import paired_bootstrap

    by: dict = {}
    superseded = [r for r in rows if not current(r)]
    for r in filter(current, rows):
        by.setdefault((r["what"], r["steps"]), {})[r["entry"]] = r
    entries = sorted({r["entry"] for r in rows if ("base", 0) in by and r["entry"] in by[("base", 0)]})
    common = [e for e in entries if all(e in v for k, v in by.items() if not k[0].startswith("budget")
                                        and "@" not in k[0])]

    def mean(key, field="rouge_l", among=common):
        vals = [by[key][e][field] for e in among if e in by.get(key, {})]
        return (sum(vals) / len(vals), len(vals)) if vals else (float("nan"), 0)

    lines = [MARKER, "", f"Entries with every trained and blend row: {len(common)} ({', '.join(common)}); "
             f"{len(entries)} with any. Test examples per entry: {len(rows[0]['per_example']) if rows else 0}. "
             "Means over the entries (each entry's mean Rouge-L on its test sample)."
             + (f" Left out: {len(superseded)} trained records of schedules the tuned table no longer chooses."
                if superseded else ""), "",
             "| what | steps | passes (mean) | mean Rouge-L | entries |", "|---|---|---|---|---|"]
    for key in sorted(by, key=lambda k: (k[0].split(":")[0] != "base", k[0], k[1])):
        among = common if not key[0].startswith("budget") and "@" not in key[0] else entries
        m, n = mean(key, among=among)
        lines.append(f"| {key[0]} | {key[1]} | {mean(key, 'passes', among)[0]:.1f} | {m:.3f} | {n} |")
    starts = sorted({k[0].split(":")[1] for k in by if k[0].startswith("train:") and "@" not in k[0]})
    over = sorted({k[0].split(":")[1] for k in by if k[0].startswith("train:") and "@" in k[0]})  # zero@nf4, ...

    def within(start: str, budget: float, entry: str):
        """The entry's adapter from `start` with the most steps whose passes fit `budget` (None: none fits, or the
        entry lacks one of the start's budgets, as while a changed table's cells are rerun)."""
        runs = [v for (w, _), v in by.items() if w == f"train:{start}"]
        if any(entry not in v for v in runs):
            return None
        fits = [v[entry] for v in runs if v[entry]["passes"] <= budget]
        return max(fits, key=lambda r: r["passes"])["rouge_l"] if fits else None

    def diff(a, b) -> str:
        """a − b over the entries where both fit (a, b: entry -> Rouge-L or None)."""
        both = [e for e in entries if a(e) is not None and b(e) is not None]
        if not both:
            return "–"
        d = paired_bootstrap([a(e) for e in both], [b(e) for e in both])
        return f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] (n {len(both)})"

    blend = lambda e: by[("blend", 0)][e]["rouge_l"]  # noqa: E731
    lines += ["", "## At equal compute (paired over entries, 95% bootstrap interval over entries)", "",
              "Each start at the most steps whose passes fit the budget (the blend start pays for its blend first); "
              "the gradient-free default blend costs 8–11 passes. \"best other start\" is the start with the highest "
              "mean within that budget, chosen on these same entries.", "",
              "| comparison | " + " | ".join(f"within {b:g} passes" for b in COMPARED_AT) + " |",
              "|---|" + "---|" * len(COMPARED_AT)]
    for s in starts:
        if s != "zero":
            lines.append(f"| {s} start − zero start | " + " | ".join(
                diff(lambda e, s=s, b=b: within(s, b, e), lambda e, b=b: within("zero", b, e)) for b in COMPARED_AT)
                + " |")

    def best_other(b: float, but: str):
        means = {s: [within(s, b, e) for e in common] for s in starts if s != but}
        means = {s: sum(v) / len(v) for s, v in means.items() if v and None not in v}
        return max(means, key=means.get) if means else None

    if "blend" in starts:
        lines.append("| blend start − best other start | " + " | ".join(
            diff(lambda e, b=b: within("blend", b, e), lambda e, b=b: within(best_other(b, "blend"), b, e))
            if best_other(b, "blend") else "–" for b in COMPARED_AT) + " |")
    for q in over:
        start, base = q.split("@")
        lines.append(f"| {start} start over a {base} base − over the full-precision base | " + " | ".join(
            diff(lambda e, b=b: within(q, b, e), lambda e, b=b: within(start, b, e)) for b in COMPARED_AT) + " |")
    for s in ("zero", None):
        label = "zero start" if s else "best start"
        lines.append(f"| {label} − the default blend (gradient-free) | " + " | ".join(
            diff(lambda e, b=b, s=s: within(s or best_other(b, ""), b, e), blend) for b in COMPARED_AT) + " |")
    budgets = sorted({k[0] for k in by if k[0].startswith("budget:")}, key=lambda w: float(w.split(":")[1]))
    for b in budgets:
        won = {}
        for r in by[(b, 0)].values():
            won[r["won"]] = won.get(r["won"], 0) + 1
        lines.append(f"\n`{b}`: the path that won validation, by entry: "
                     + ", ".join(f"{w} {c}" for w, c in sorted(won.items(), key=lambda x: -x[1])) + ".")
    text = page.read_text() if page.exists() else f"![quality against compute]({plot.name})\n\n{MARKER}"
    page.write_text(text[: text.index(MARKER)] + "\n".join(lines).rstrip() + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for s in starts:
        ks = sorted({k[1] for k in by if k[0] == f"train:{s}"})
        ax.plot([mean((f"train:{s}", k), "passes")[0] for k in ks], [mean((f"train:{s}", k))[0] for k in ks],
                marker="o", label=f"trained from {s} (tuned)")
    for what, marker, color in (("base", "x", "black"), ("nearest", "s", "grey"), ("blend", "D", "purple")):
        ax.scatter([mean((what, 0), "passes")[0]], [mean((what, 0))[0]], marker=marker, s=60, zorder=3, color=color,
                   label={"blend": "the default blend (gradient-free)"}.get(what, what))
    for b, color in zip(budgets, ("gold", "darkorange", "brown", "olive")):
        ax.scatter([mean((b, 0), "passes", entries)[0]], [mean((b, 0), among=entries)[0]], marker="*", s=180,
                   zorder=4, color=color, edgecolor="black", label=f"generate --budget {b.split(':')[1]} (validated)")
    own = mean(("own", 32))[0]
    if not np.isnan(own):
        ax.axhline(own, color="grey", ls="--", lw=1, label="the task's own 32-step LoRA")
    ax.set_xlabel("compute: forward-pass equivalents of the base model over 16 examples")
    held_out = "outside the bank" if np.isnan(own) else "family left out"
    ax.set_ylabel(f"mean Rouge-L ({len(common)} entries, {held_out})")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(left=-0.3)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(plot, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bank", default="default")
    ap.add_argument("--tasks", type=Path, help="a directory of datasets outside the bank (<entry>.jsonl.gz, e.g. "
                    "benchmarks/outside from benchmarks.outside_tasks): run on them, the whole bank available")
    ap.add_argument("--entries", default="", help="comma-separated; default: the first task of each family, with "
                    "--tasks every dataset there")
    ap.add_argument("--n", type=int, default=16, help="test examples per entry")
    ap.add_argument("--budgets", default="", help="generate --budget values to run, e.g. 6,12")
    ap.add_argument("--starts", default="", help="comma-separated starts to train from; default: all of TUNED")
    ap.add_argument("--train-bases", default="", help="also train the zero start's 8 steps over these quantized "
                    "bases (int8,nf4), scored on the full-precision base")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="default: docs/results-frontier, with --tasks "
                    "docs/results-frontier-outside")
    ap.add_argument("--report", action="store_true", help="write --out's page (docs/results-X: docs/X.md, upper "
                    "case, and its plot beside it) from its scores.csv")
    args = ap.parse_args(argv)
    import torch

    from lorablend.bank.manifest import Bank
    from lorablend.runtime.recipes import TUNED

    out = args.out or Path("docs/results-frontier" + ("-outside" if args.tasks else ""))
    starts = [x for x in args.starts.split(",") if x] or list(TUNED)
    if set(starts) - set(TUNED):
        ap.error(f"--starts: unknown {', '.join(sorted(set(starts) - set(TUNED)))} (tuned: {', '.join(TUNED)})")
    torch.set_num_threads(args.threads)
    bank = Bank.open(args.bank)
    if args.report:
        page = out.parent / f"{out.name.removeprefix('results-').upper()}.md"
        write_report(read(out), page, page.with_suffix(".png"))
        return
    entries = [x for x in args.entries.split(",") if x] or (
        sorted(p.name.split(".")[0] for p in args.tasks.glob("*.jsonl.gz")) if args.tasks else first_entries(bank))
    run(str(bank.root), entries, args.n, [float(b) for b in args.budgets.split(",") if b], starts, out, args.tasks,
        [x for x in args.train_bases.split(",") if x])


if __name__ == "__main__":
    sys.exit(main())
