"""The first-order retriever over a quantized base: does it still find the adapter an exact ce search would pick?

    python -m benchmarks.first_order_bases --entries E1,E2 --threads 1 --out docs/results-first-order-bases  # resumable
    python -m benchmarks.first_order_bases --report --out docs/results-first-order-bases   # the table PERFORMANCE quotes

Where llama.cpp scores because torch's full precision does not fit, `generate` takes the union retriever's
first-order half over an NF4 base (bitsandbytes). This compares that retriever with the full-precision one on the
labelled study's own cached rows (`--labelled`, default docs/results-labelled): for each entry that has its exact ce
row and its full-precision first-order row there, the first-order row is computed again over each quantized base
(SmolLM2 loaded by `quantized.load_quantized`, as `generate` does), on the same 16 train examples and candidates.
Recall at m is the study's: whether the exact-ce best usable adapter is among the retriever's m candidates, under
the entry and the family holdouts, for `grad` alone and for the default's union with answer-token JS. A record is
one line of rows.csv: entry, base, the candidates in order, their first-order scores and the pass's seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.rows import append_rows, read_rows

FIELDS = ("entry", "base", "candidates", "scores", "seconds")
BASES = ("nf4", "int8")
# grad alone; the default setting's union; its distributional half alone (the fallback without a backward pass)
RETRIEVERS = (("tokens", "grad"), ("target-tokens", "grad+js"), ("target-tokens", "js"))


def read(out: Path) -> list[dict]:
    return read_rows(out / "rows.csv", {"candidates": json.loads, "scores": json.loads, "seconds": float})


def study_sha(labelled: Path) -> str:
    """The bank manifest the study's rows were cached under (since then only the adapters' configs changed: their
    base model is named by hub id, not by a path; the weights are the same)."""
    return json.loads((labelled / "config.json").read_text())["bank_manifest_sha256"][:16]


def cached(labelled: Path, entry: str, kind: str = "") -> Path:
    from lorablend.runtime.scoring import CE_EXAMPLES

    return labelled / "ce" / f"{entry}{kind}.k{CE_EXAMPLES}.{study_sha(labelled)}.json"


def labelled_entries(bank, labelled: Path) -> list[str]:
    """The entries with both cached rows (exact ce and full-precision first order) in the labelled study."""
    return [e for e in bank.names if cached(labelled, e).exists() and cached(labelled, e, ".grad").exists()]


def run(entries: list[str], bases: list[str], labelled: Path, out: Path, threads: int) -> None:
    import torch

    from lorablend.bank.combination import open_readers
    from lorablend.bank.manifest import Bank
    from lorablend.dataset import load_dataset
    from lorablend.generate import first_order_row
    from lorablend.runtime.quantized import load_quantized
    from lorablend.runtime.scoring import CE_EXAMPLES

    torch.set_num_threads(threads)
    bank = Bank.open("default")
    readers = open_readers(bank, bank.names)
    done = {(r["entry"], r["base"]) for r in read(out)}
    out.mkdir(parents=True, exist_ok=True)
    for base in bases:
        todo = [e for e in entries if (e, base) not in done]
        model = load_quantized(bank.manifest.base_model, base) if todo else None
        for e in todo:
            full = json.loads(cached(labelled, e, ".grad").read_text())
            names = full["names"]  # the candidates under holdout entry, in the study's order
            t = time.perf_counter()
            scores = first_order_row(bank, names, load_dataset(bank.dataset_path(bank.entry(e)), name=e), CE_EXAMPLES,
                                     model=model, readers=readers)
            row = {"entry": e, "base": base, "candidates": json.dumps(names),
                   "scores": json.dumps([round(float(s), 9) for s in scores]),
                   "seconds": round(time.perf_counter() - t, 2)}
            append_rows(out / "rows.csv", FIELDS, [row])
            print(f"{e} {base}: {row['seconds']} s", flush=True)
        del model


def _with_rows(plan, ce: dict[str, float], first_order: dict[str, float]):
    """The study's plan of an entry answering from these rows (the study's cached ce; a first-order row, full
    precision or over a quantized base) instead of its cache."""
    plan.ce = lambda: (ce, 0.0)
    plan.first_order = lambda: (first_order, 0.0, 0.0)
    return plan


def report(out: Path, labelled: Path) -> str:
    import tempfile

    from scipy.stats import spearmanr

    from lorablend.bank.manifest import Bank
    from lorablend.bench.entry import EntryPlan
    from lorablend.bench.plan import compute_matrices
    from lorablend.bench.run import RECALL_M
    from lorablend.dataset import load_dataset
    from lorablend.settings import Setting

    bank = Bank.open("default")
    rows = read(out)
    bases = [b for b in BASES if any(r["base"] == b for r in rows)]
    entries = [e for e in bank.names if all(any(r["entry"] == e and r["base"] == b for r in rows) for b in bases)]
    if not entries:
        return "no entry has a row for every base yet"
    specs = [Setting(sk, m, rerank=8) for sk, m in RETRIEVERS]
    with tempfile.TemporaryDirectory() as tmp:
        matrices = compute_matrices(bank, specs, Path(tmp), 0)
    found: dict = {}
    rho: dict = {b: [] for b in bases}
    top1: dict = {b: 0 for b in bases}
    for e in entries:
        ds = load_dataset(bank.dataset_path(bank.entry(e)), name=e)
        ce, full = ({n: v for n, v in zip(got["names"], got["ce"])} for got in
                    (json.loads(cached(labelled, e, kind).read_text()) for kind in ("", ".grad")))
        plans = {"full": _with_rows(EntryPlan(bank, e, ds, matrices, labelled / "ce"), ce, full)}
        for r in (r for r in rows if r["entry"] == e):
            over = dict(zip(r["candidates"], r["scores"]))
            plans[r["base"]] = _with_rows(EntryPlan(bank, e, ds, matrices, labelled / "ce"), ce, over)
            rho[r["base"]].append(spearmanr([full[n] for n in r["candidates"]], r["scores"]).statistic)
            top1[r["base"]] += min(full, key=full.get) == min(over, key=over.get)
        for base, plan in plans.items():
            for h in ("entry", "family"):
                for retriever in RETRIEVERS:
                    for rec in plan.recall(h, retriever, RECALL_M):
                        found.setdefault((base, h, rec["retriever"]), {}).setdefault(rec["m"], []).append(
                            rec["found"])
    lines = [f"{len(entries)} entries. First-order scores over each quantized base against full precision: "
             + "; ".join(f"{b}: mean Spearman {np.mean(rho[b]):.3f} (min {np.min(rho[b]):.3f}), same lowest "
                         f"score {top1[b]}/{len(entries)}" for b in bases), "",
             "| holdout | retriever | base | " + " | ".join(f"m = {m}" for m in RECALL_M) + " |",
             "|---|---|---|" + "---|" * len(RECALL_M)]
    for h in ("entry", "family"):
        for name in ("grad", "target-tokens/grad+js", "target-tokens/js"):
            for base in ("full", *bases) if "grad" in name else ("–",):
                got = found[("full" if base == "–" else base, h, name)]
                lines.append(f"| {h} | `{name}` | {base} | " + " | ".join(f"{np.mean(got[m]):.2f}" for m in RECALL_M)
                             + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", default="", help="comma-separated; default: every entry with both cached rows")
    ap.add_argument("--bases", default="nf4", help=f"comma-separated, of {', '.join(BASES)}")
    ap.add_argument("--labelled", type=Path, default=Path("docs/results-labelled"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("docs/results-first-order-bases"))
    ap.add_argument("--report", action="store_true", help="print the recall table of what --out holds")
    args = ap.parse_args(argv)
    if args.report:
        print(report(args.out, args.labelled))
        return
    from lorablend.bank.manifest import Bank

    have = labelled_entries(Bank.open("default"), args.labelled)
    entries = [e for e in args.entries.split(",") if e] or have
    missing = [e for e in entries if e not in have]
    bases = [b for b in args.bases.split(",") if b]
    if missing or not set(bases) <= set(BASES):
        sys.exit(f"--entries: no cached ce and first-order rows in {args.labelled / 'ce'} for {', '.join(missing)}"
                 if missing else f"--bases: expected some of {', '.join(BASES)}")
    run(entries, bases, args.labelled, args.out, args.threads)


if __name__ == "__main__":
    main()
