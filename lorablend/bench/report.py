"""The bench's report: pure functions over scores.csv, then RESULTS.md and two PNGs.

Every comparison is paired by entry: a setting and a control are compared on the
same entries and the same test examples. Numbers that need care:
- gap recovered = (gen − base) / (own − base) per entry, averaged over the
  entries whose own adapter beats the base model by at least `MIN_GAP` Rouge-L;
  the others are listed separately. A smaller gap is within the noise of a few test
  examples, and its ratio explodes (own − base = 0.001 turns a 0.01 loss into −10).
  The ratio of the mean differences over the same entries is shown beside it.
- wins / ties / losses count entries; a tie is |difference| < `TIE` Rouge-L.
- intervals are paired bootstrap percentiles over entries (seeded, `RESAMPLES`).
- cost is the mean over entries of the seconds `generate` would spend on the adapter (forward
  passes of ce / rerank / fit plus the combination), next to the score it buys, and the same work
  in forward-pass equivalents of the base model over the k examples (`passes`: a backward pass
  counts as two), a unit that holds for any base model's size.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorablend.settings import NEAREST as NEAREST_SETTING
from lorablend.stats import RESAMPLES, TIE, paired_bootstrap, wins_ties_losses

MIN_GAP = 0.1
REFERENCE = "target-tokens/js/normalized/svd/T1/top1/rerank16"  # the model-aware setting new ones must match
NEAREST = NEAREST_SETTING.label  # the label-free nearest adapter, a candidate of validation


# --------------------------------------------------------------------------- #
# Statistics (pure)
# --------------------------------------------------------------------------- #


def has_gap(base: float, own: float) -> bool:
    """Whether the own adapter beats the base model by MIN_GAP: only such a gap is clear of the noise."""
    return own - base >= MIN_GAP


def gap_recovered(gen: float, base: float, own: float) -> float | None:
    """(gen − base) / (own − base); None without a gap clear of the noise to recover (`has_gap`)."""
    return (gen - base) / (own - base) if has_gap(base, own) else None


# --------------------------------------------------------------------------- #
# Summaries
# --------------------------------------------------------------------------- #


def read_scores(path: str | Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in ("rouge_l", "rouge_lsum", "exact_match", "seconds_generate", "seconds_adapter"):
            r[k] = float(r[k])
        r["n"] = int(r["n"])
        r["cost_s"] = float(r.get("cost_s") or "nan")  # empty for the base model and in older CSVs
        r["passes"] = float(r.get("passes") or "nan")
    return rows


@dataclass
class Row:
    """One setting or control under one holdout, summarised over entries."""

    holdout: str
    label: str
    control: str
    mean: float
    entries: int
    exact_match: float = float("nan")
    cost: float = float("nan")  # mean seconds to generate one adapter
    passes: float = float("nan")  # mean forward-pass equivalents spent on it
    gap_mean: float | None = None  # mean over entries with own ≥ base + MIN_GAP of the per-entry ratio
    gap_of_means: float | None = None  # mean(gen − base) / mean(own − base) over those entries
    vs: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)  # control kind -> (W, T, L, pairs)
    delta: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # base / uniform -> (mean, lo, hi)


def _by_label(rows: list[dict], holdout: str) -> dict[str, dict[str, dict]]:
    """label -> entry -> row, with the holdout-free controls (base, own) joined to every holdout."""
    out: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r["holdout"] in (holdout, "-"):
            out.setdefault(r["label"], {})[r["entry"]] = r
    return out


def references(label: str, first: dict, labels: set[str]) -> dict[str, str]:
    """The controls a row is compared with: base, own, its uniform, its random-k, its nearest."""
    refs = {"base": "base", "own": "own"}
    combine, rank = first.get("combine", ""), first.get("rank", "")
    uniforms = sorted(l for l in labels if l.startswith("uniform/"))
    want = f"uniform/{combine}" + (f"/r{rank}" if rank else "")
    if want in labels or uniforms:
        refs["uniform"] = want if want in labels else uniforms[0]
    if first["control"] == "" and f"random-k/{label}" in labels:
        refs["random-k"] = f"random-k/{label}"
    if first["control"] in ("", "validated") and REFERENCE in labels:
        refs["reference"] = REFERENCE
    metric = first.get("metric", "")
    nearest = "best-ce" if metric == "ce" else f"nearest/{first.get('sketch', '')}/{metric}"
    if first["control"] == "validated":  # one of its candidates: is the selection worth its validation?
        control = f"nearest/{NEAREST_SETTING.sketch}/{NEAREST_SETTING.metric}"  # the same adapter, as a control
        refs["nearest"] = NEAREST if NEAREST in labels else control
    if first["control"] in ("", "random-k") and nearest in labels and "nearest" not in refs:
        refs["nearest"] = nearest
    return {k: v for k, v in refs.items() if v != label}


def summarize(rows: list[dict], holdout: str, seed: int = 0) -> list[Row]:
    """Settings first (best mean first), then controls."""
    table = _by_label(rows, holdout)
    base, own = table.get("base", {}), table.get("own", {})
    out = []
    for label, per_entry in table.items():
        first = next(iter(per_entry.values()))
        entries = sorted(per_entry)
        costs, passes = ([per_entry[e][k] for e in entries if not np.isnan(per_entry[e][k])] for k in ("cost_s", "passes"))
        row = Row(holdout, label, first["control"], float(np.mean([per_entry[e]["rouge_l"] for e in entries])),
                  len(entries), float(np.mean([per_entry[e]["exact_match"] for e in entries])),
                  float(np.mean(costs)) if costs else float("nan"), float(np.mean(passes)) if passes else float("nan"))
        scored = [(per_entry[e]["rouge_l"], base[e]["rouge_l"], own[e]["rouge_l"]) for e in entries
                  if e in base and e in own and has_gap(base[e]["rouge_l"], own[e]["rouge_l"])]
        gaps = [(g - b, o - b) for g, b, o in scored]
        if gaps:
            row.gap_mean = float(np.mean([gap_recovered(*t) for t in scored]))
            row.gap_of_means = float(np.mean([g for g, _ in gaps]) / np.mean([d for _, d in gaps]))
        for kind, ref in references(label, first, set(table)).items():
            pairs = [e for e in entries if e in table[ref]]
            a = [per_entry[e]["rouge_l"] for e in pairs]
            b = [table[ref][e]["rouge_l"] for e in pairs]
            row.vs[kind] = (*wins_ties_losses(a, b), len(pairs))
            if kind in ("base", "uniform", "reference") or (kind == "nearest" and first["control"] == "validated"):
                row.delta[kind] = paired_bootstrap(a, b, seed=seed)
        out.append(row)
    return sorted(out, key=lambda r: (r.control != "", -r.mean, r.label))


def own_not_better(rows: list[dict]) -> list[tuple[str, float, float]]:
    """Entries whose own adapter does not beat the base model by MIN_GAP: (entry, own, base)."""
    base = {r["entry"]: r["rouge_l"] for r in rows if r["label"] == "base"}
    return sorted((r["entry"], r["rouge_l"], base[r["entry"]]) for r in rows
                  if r["label"] == "own" and r["entry"] in base and not has_gap(base[r["entry"]], r["rouge_l"]))


def best_setting(summary: list[Row]) -> Row | None:
    settings = [r for r in summary if r.control == ""]
    return max(settings, key=lambda r: r.mean) if settings else None


# --------------------------------------------------------------------------- #
# Markdown and plots
# --------------------------------------------------------------------------- #


def _num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else fmt.format(x)


def _ci(t: tuple[float, float, float] | None) -> str:
    return "–" if t is None else f"{t[0]:+.3f} [{t[1]:+.3f}, {t[2]:+.3f}]"


def _wtl(t: tuple[int, int, int, int] | None) -> str:
    return "–" if t is None else f"{t[0]}/{t[1]}/{t[2]}"


def reference_table(summary: list[Row]) -> str:
    """Every setting against REFERENCE on the same entries: the score difference and the work it took."""
    ref = next((r for r in summary if r.label == REFERENCE), None)
    rows = [r for r in summary if r.control in ("", "validated") and "reference" in r.delta]
    if ref is None or not rows:
        return ""
    lines = [f"| setting | mean Rouge-L | Δ vs `{REFERENCE}` [95% CI] | W/T/L | passes | passes / reference's "
             "| gap (ratio of means) per pass |", "|" + "---|" * 7]
    for r in sorted(rows, key=lambda r: (r.passes, r.label)):
        per_pass = r.gap_of_means / r.passes if r.gap_of_means is not None and r.passes > 0 else None
        lines.append(f"| `{r.label}` | {r.mean:.3f} | {_ci(r.delta['reference'])} | {_wtl(r.vs.get('reference'))} | "
                     f"{_num(r.passes, '{:.1f}')} | {_num(r.passes / ref.passes if ref.passes > 0 else None, '{:.2f}')} "
                     f"| {_num(per_pass, '{:.4f}')} |")
    return "\n".join(lines)


def validated_table(summary: list[Row]) -> str:
    """The validated selection: its mean, the share of entries where it lands at or above the base model (within
    TIE), and its paired differences with REFERENCE and the label-free nearest adapter."""
    row = next((r for r in summary if r.control == "validated"), None)
    if row is None or "base" not in row.vs:
        return ""
    w, t, _, pairs = row.vs["base"]
    return "\n".join([
        f"| mean Rouge-L | at or above base | Δ vs `{REFERENCE}` [95% CI] | Δ vs nearest [95% CI] | passes | entries |",
        "|" + "---|" * 6,
        f"| {row.mean:.3f} | {w + t}/{pairs} ({(w + t) / pairs:.0%}) | {_ci(row.delta.get('reference'))} | "
        f"{_ci(row.delta.get('nearest'))} | {_num(row.passes, '{:.1f}')} | {row.entries} |"])


def recall_table(recall_csv: Path, holdout: str) -> str:
    """Share of entries whose exact-ce best adapter is among a retriever's top m (recall.csv)."""
    with open(recall_csv, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["holdout"] == holdout]
    if not rows:
        return ""
    ms = sorted({int(r["m"]) for r in rows})
    lines = ["| retriever | entries | " + " | ".join(f"m = {m}" for m in ms) + " |", "|" + "---|" * (len(ms) + 2)]
    for name in sorted({r["retriever"] for r in rows}):
        mine = [r for r in rows if r["retriever"] == name]
        cells = [np.mean([int(r["found"]) for r in mine if int(r["m"]) == m]) for m in ms]
        lines.append(f"| `{name}` | {len({r['entry'] for r in mine})} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines)


def curve_table(rows: list[dict], holdout: str, seed: int = 0) -> str:
    """refine/K (from the default's blend) against train/K (from zero) at each K, paired by entry: the decision
    rule for recommending refinement reads its intervals."""
    table = _by_label(rows, holdout)
    steps = sorted(int(label.split("/")[1]) for label in table if label.startswith("refine/"))
    lines = ["| steps | entries | from zero | from the blend | Δ (blend − zero) [95% CI] | W/T/L | passes (zero / blend) |",
             "|" + "---|" * 7]
    for k in steps:
        zero, blend = table.get(f"train/{k}", {}), table[f"refine/{k}"]
        pairs = sorted(set(zero) & set(blend))
        if not pairs:
            continue
        a, b = ([t[e]["rouge_l"] for e in pairs] for t in (blend, zero))
        passes = [np.mean([t[e]["passes"] for e in pairs]) for t in (zero, blend)]
        lines.append(f"| {k} | {len(pairs)} | {np.mean(b):.3f} | {np.mean(a):.3f} | "
                     f"{_ci(paired_bootstrap(a, b, seed=seed))} | {_wtl(wins_ties_losses(a, b))} | "
                     f"{passes[0]:.1f} / {passes[1]:.1f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def markdown_table(summary: list[Row]) -> str:
    head = ("| setting or control | mean Rouge-L | cost s/adapter | exact match | entries | gap recovered (mean ratio) "
            "| gap (ratio of means) | Δ vs base [95% CI] | Δ vs uniform [95% CI] | W/T/L vs base | vs own | vs uniform "
            "| vs random-k | vs nearest |")
    lines = [head, "|" + "---|" * 14]
    for r in summary:
        name = f"`{r.label}`" if r.control == "" else f"*{r.label}*"
        lines.append(f"| {name} | {r.mean:.3f} | {_num(r.cost, '{:.2f}')} | {r.exact_match:.3f} | {r.entries} | "
                     f"{_num(r.gap_mean)} | {_num(r.gap_of_means)} | "
                     f"{_ci(r.delta.get('base'))} | {_ci(r.delta.get('uniform'))} | {_wtl(r.vs.get('base'))} | "
                     f"{_wtl(r.vs.get('own'))} | {_wtl(r.vs.get('uniform'))} | {_wtl(r.vs.get('random-k'))} | "
                     f"{_wtl(r.vs.get('nearest'))} |")
    return "\n".join(lines)


def bar_chart(summaries: dict[str, list[Row]], path: Path) -> None:
    """Mean Rouge-L per setting (blue) and control (grey), one panel per holdout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = max(3.0, 0.28 * max(len(s) for s in summaries.values()) + 1.2)
    fig, axes = plt.subplots(1, len(summaries), figsize=(7.5 * len(summaries), height), squeeze=False)
    for ax, (holdout, summary) in zip(axes[0], summaries.items()):
        rows = sorted(summary, key=lambda r: r.mean)
        ax.barh([r.label for r in rows], [r.mean for r in rows],
                color=["#4c72b0" if r.control == "" else "#999999" for r in rows])
        for ref, style in (("base", ":"), ("own", "--")):
            hit = [r.mean for r in rows if r.label == ref]
            if hit:
                ax.axvline(hit[0], color="black", linestyle=style, linewidth=1, label=f"{ref} ({hit[0]:.3f})")
        ax.set_xlabel("mean Rouge-L over entries")
        ax.set_title(f"holdout: {holdout}")
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compute_plot(summaries: dict[str, list[Row]], path: Path) -> bool:
    """Mean Rouge-L against forward-pass equivalents (log scale): the settings as points, the training curves
    (train/K from zero, refine/K from the default blend) as lines, base and own as references. False when no
    row has a compute figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(r.passes > 0 for rows in summaries.values() for r in rows):
        return False
    fig, axes = plt.subplots(1, len(summaries), figsize=(7.5 * len(summaries), 5.0), squeeze=False)
    for ax, (holdout, summary) in zip(axes[0], summaries.items()):
        for kind, style in (("train", "o-"), ("refine", "s-")):
            curve = sorted((r.passes, r.mean) for r in summary if r.control == kind and r.passes > 0)
            if curve:
                ax.plot(*zip(*curve), style, label=f"{kind}/K: LoRA trained K steps from "
                        + ("zero" if kind == "train" else "the default blend"))
        for r in summary:
            if r.control in ("", "best-ce", "validated") and r.passes > 0:
                ax.plot(r.passes, r.mean, "^" if r.control == "" else "v", color="#c44e52")
                ax.annotate(r.label.replace("normalized/svd/T1/", ""), (r.passes, r.mean), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        for ref, style in (("base", ":"), ("own", "--")):
            hit = [r.mean for r in summary if r.label == ref]
            if hit:
                ax.axhline(hit[0], color="black", linestyle=style, linewidth=1, label=f"{ref} ({hit[0]:.3f})")
        ax.set_xscale("log")
        ax.set_xlabel("forward-pass equivalents of the base model over 16 examples (log)")
        ax.set_ylabel("mean Rouge-L over entries")
        ax.set_title(f"holdout: {holdout}")
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def heatmap(coefs: dict[str, dict[str, float]], title: str, path: Path) -> None:
    """Coefficients: one row per scored entry, one column per bank entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = sorted(coefs)
    bank = sorted({n for c in coefs.values() for n in c} | set(entries))
    M = np.array([[coefs[e].get(n, 0.0) for n in bank] for e in entries])
    short = [n.split("_")[0].replace("subtask", "") if n.startswith("subtask") else n for n in bank]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.16 * len(bank) + 2), max(3.0, 0.16 * len(entries) + 1.5)))
    im = ax.imshow(M, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(bank)), short, rotation=90, fontsize=6)
    ax.set_yticks(range(len(entries)), [short[bank.index(e)] for e in entries], fontsize=6)
    ax.set_xlabel("bank entry")
    ax.set_ylabel("scored entry (held out)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="coefficient")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


METHOD_NOTES = """## How the adapters were made

- Distances between bank datasets are computed once per (sketch, metric) and sliced: row i is what `generate`
  computes for entry i's train split.
- Neural operator (`…/neural/…`): the paper's scalar MLP, refitted for every scored entry on the bank without
  that entry (holdout `entry`) or without its whole family (holdout `family`), on all remaining entries
  (the paper used 80%); it is never scored on an entry it was trained on. Loss space: parameters for the
  paper's combination, dense updates for svd/cat.
- `…/auto` settings: temperature and top-k chosen per scored entry from T ∈ {0.1, 0.2, 0.5, 1, 2, 5} and
  k ∈ {1, 2, 4, 8, 16, all} by the neural operator's own criterion, the relative reconstruction error
  ‖Σ c_j θ_j − θ_t‖² / ‖θ_t‖² of every *other* bank adapter θ_t from the rest (its family removed too in
  family mode), computed from the Gram matrix of the dense updates. It never looks at a test split, nor
  at the scored entry's adapter.
- Model-based settings score candidates with the base model on the scored entry's first 16 *train* examples
  (never its test split): `…/ce/…` ranks every other adapter by the mean target cross-entropy with it minus
  the base model's, `…/rerank<m>` keeps the m nearest by the sketch distance and ranks those by ce, `…/fit/…`
  starts from the softmin over those m and searches their weights (Nelder–Mead, 40 forward passes, seed 0).
  The ce of a candidate does not depend on the others, so it is computed once per entry and sliced for every
  setting, holdout and the *best-ce* control (the single adapter with the lowest ce).
- Cost (s/adapter): what `lorablend generate` spends on the adapter after loading the model and the query's
  sketch: candidates × the entry's measured seconds per ce forward pass, the fit's measured time, and the
  measured combination; on the bench's threads, with the machine's other load.
- Coefficients below 1e-6 are set to 0 and the rest renormalised (a softmin that is one-hot up to 1e-9 is
  the nearest adapter). Identical coefficient vectors (same combination) are evaluated once per entry;
  `reused` in the CSV marks the records that share an evaluation.
"""
BACKEND_NOTES = {
    "torch": "- Generated adapters are exact in float32: factors are combined in memory and copied into LoRA slots of\n"
             "  the base model (scaling 1), which gives the same update as loading the PEFT files `generate` writes.\n",
    "llamacpp": "- Generated adapters are combined in float32 in memory and written as float32 GGUF LoRA files (the update\n"
                "  the PEFT files `generate` writes), which llama.cpp applies to its BF16 copy of the base model; see\n"
                "  docs/PERFORMANCE.md for how its answers compare with PyTorch's.\n",
}


def _backend(run_path: Path) -> str:
    """The generation backend of the run (records made before backends existed are torch's)."""
    if not run_path.exists():
        return "torch"
    return json.loads(run_path.read_text(encoding="utf-8"))["runs"][-1].get("backend", "torch")


def _run_facts(run_path: Path) -> list[str]:
    """Command, N, max new tokens, machine and wall time, from the bench's run.json."""
    if not run_path.exists():
        return ["(no run.json beside the CSV: command and machine unknown)"]
    runs = json.loads(run_path.read_text(encoding="utf-8"))["runs"]
    last, wall = runs[-1], sum(r["wall_seconds"] for r in runs)
    m = last["machine"]
    commands = list(dict.fromkeys(r["command"] for r in runs))  # a study grown by several commands lists each
    if len(commands) == 1:
        said = [f"- Command: `{commands[0]}`" + (f" ({len(runs)} invocations; resumed runs skip finished records)"
                                                if len(runs) > 1 else "")]
    else:
        said = [f"- Commands, in order ({len(runs)} invocations into the same results; each skips the records an "
                "earlier one wrote):"] + [f"  - `{c}`" for c in commands]
    return said + [
        f"- Test examples per entry: N = {last['n']} (a fixed, seeded sample of the test split); greedy decoding; "
        f"max new tokens: the task's budget (95th percentile of train reference lengths × 1.25 + 2) capped at "
        f"{last['max_new_tokens']}; batch size {last['batch_size']}",
        f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM; torch {m['torch']}, {last['threads']} "
        f"threads × {last['jobs']} job(s), executor {last['executor']}, generation backend {last.get('backend', 'torch')}"
        + (" (llama.cpp on the base model's GGUF; adapters exported to GGUF LoRA)" if last.get("backend") == "llamacpp" else ""),
        f"- Wall time: {wall / 60:.1f} min in total over {len(runs)} invocation(s)",
    ] + ([f"- **Incomplete:** {last['records_present']} of the {last['records_total']} records the command asks for "
          "exist; the tables below cover those only. Rerun the command to resume."]
         if last.get("records_present", 0) < last.get("records_total", 0) else [])


def write_report(csv_path: str | Path, out_md: str | Path, seed: int = 0) -> Path:
    """RESULTS.md from scores.csv (with run.json and coefficients.json beside it), plus two PNGs beside the page."""
    csv_path, out_md = Path(csv_path), Path(out_md)
    rows = read_scores(csv_path)
    holdouts = [h for h in ("entry", "family") if any(r["holdout"] == h for r in rows)]
    summaries = {h: summarize(rows, h, seed) for h in holdouts}
    out_md.parent.mkdir(parents=True, exist_ok=True)
    bars = out_md.with_name(out_md.stem + "-bars.png")
    heat = out_md.with_name(out_md.stem + "-coefficients.png")
    lines = ["# lorablend bench: leave-one-out over the bank", "",
             "Generated by `lorablend bench` from `" + csv_path.name + "` (every score, one row per entry × setting "
             "or control × holdout); regenerate with `lorablend bench --report-only`.", ""]
    lines += _run_facts(csv_path.with_name("run.json")) + [""]
    lines += [
        "Settings are in `code`, controls in *italics*: *base* (no adapter), *own* (the entry's own adapter), "
        "*uniform* (uniform average of the other adapters), *random-k* (k random other adapters, uniform weights, "
        "seeded; k = the setting's top-k), *nearest* (the single nearest other adapter by the setting's distance), "
        "*best-ce* (the single other adapter with the lowest ce on the entry's first 16 train examples), "
        "*validated* (`lorablend generate`'s validated selection: the default setting's pick, the nearest adapter "
        f"`{NEAREST}`, the uniform average and no adapter answer up to 32 of the entry's valid examples, and the "
        "best by Rouge-L is scored; when no adapter wins, the base model is, as a user told there is no gain would "
        "keep it; its passes add the validation's prompt and answer tokens). "
        f"W/T/L: entries won / tied (|Δ| < {TIE}) / lost. Intervals: paired bootstrap over entries, "
        f"{RESAMPLES} resamples, seeded. Gap recovered: over entries whose own adapter beats the base model by at "
        f"least {MIN_GAP} Rouge-L (listed below: the others).", ""]
    recall_csv = csv_path.with_name("recall.csv")
    for h in holdouts:
        what = "the entry alone is left out" if h == "entry" else "the entry's whole family is left out"
        lines += [f"## Holdout: {h} ({what})", "", markdown_table(summaries[h]), ""]
        against = reference_table(summaries[h])
        if against:
            lines += [f"### Against `{REFERENCE}` (holdout {h})", "",
                      "Paired by entry. passes: forward-pass equivalents of the base model over the 16 train examples "
                      "(ce: one per candidate; grad: one forward and one backward pass, 3; fit: its evaluations); the figure of merit is gap recovered per pass.", "", against, ""]
        chosen = validated_table(summaries[h])
        if chosen:
            lines += [f"### Validated selection (holdout {h})", "",
                      "What `lorablend generate` writes by default, scored on the test sample: the candidate that won "
                      "on the entry's valid examples (see *validated* above). At or above base: within "
                      f"{TIE} Rouge-L or better.", "", chosen, ""]
        if recall_csv.exists() and recall_table(recall_csv, h):
            lines += [f"### Retrieval recall (holdout {h})", "",
                      "Share of entries whose exact-ce best adapter (the *best-ce* control, found with a forward pass "
                      "per usable adapter) is among a retriever's m candidates: the most a rerank of m can find. "
                      "`grad`: first-order scores; `SKETCH/grad+js`: first-order top ⌈m/2⌉ ∪ js top ⌊m/2⌋.", "",
                      recall_table(recall_csv, h), ""]
    weak = own_not_better(rows)
    lines += [f"## Entries whose own adapter does not beat the base model by {MIN_GAP} ({len(weak)}): not in the gap columns",
              ""]
    lines += [f"- {e}: own {o:.3f}, base {b:.3f}" for e, o, b in weak] or ["- none"]
    lines += ["", METHOD_NOTES + BACKEND_NOTES[_backend(csv_path.with_name("run.json"))]]
    if summaries:
        bar_chart(summaries, bars)
        lines += ["## Figures", "", f"![mean Rouge-L per setting and control]({bars.name})", ""]
        compute = out_md.with_name(out_md.stem + "-compute.png")
        # --train-steps runs cover some entries only: with curves, every point is a mean over those same entries
        curved = sorted({r["entry"] for r in rows if r["control"] == "train"})
        same = [r for r in rows if r["entry"] in curved] if curved else rows
        if compute_plot({h: summarize(same, h, seed) for h in holdouts}, compute):
            lines += [f"![mean Rouge-L against compute]({compute.name})", "",
                      "Quality against compute: every setting with a model-based step and the training curves "
                      "(`train/K`: a LoRA trained K steps of the bank's recipe from zero on the 16 train examples the "
                      "model-aware settings see; `refine/K`: the same from the default setting's blend), in "
                      "forward-pass equivalents of the base model over those examples (a ce candidate is 1, a "
                      "backward pass 2, a training step on a batch of 8 of them 3 × 8/16 = 1.5; refine/K adds its "
                      "blend's). These units do not depend on the base model's size. "
                      + (f"Every point is a mean over the {len(curved)} entries with training curves: "
                         + ", ".join(curved) + "." if curved else "No training curve in this run."), ""]
            for h in holdouts:
                curves = curve_table(same, h, seed)
                if curves:
                    lines += [f"### Training from the blend against training from zero (holdout {h})", "",
                              "Paired by entry: `refine/K` against `train/K` on the same test examples; passes as "
                              "above.", "", curves, ""]
        best = best_setting(summaries[holdouts[0]])
        coefs_path = csv_path.with_name("coefficients.json")
        if best is not None and coefs_path.exists():
            coefs = json.loads(coefs_path.read_text(encoding="utf-8")).get(best.holdout, {}).get(best.label, {})
            if coefs:
                heatmap(coefs, f"{best.label} (holdout {best.holdout})", heat)
                lines += [f"![coefficients of the best setting]({heat.name})", "",
                          f"Coefficients of the best setting by mean Rouge-L, `{best.label}` (holdout {best.holdout}): "
                          "one row per held-out entry, one column per bank entry.", ""]
    from lorablend.atomic import atomic_file

    with atomic_file(out_md, "w") as fh:
        fh.write("\n".join(lines))
    return out_md
