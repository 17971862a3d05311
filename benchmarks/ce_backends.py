"""Does llama.cpp's ce over a quantized base rank the bank's adapters as torch's does?

    python -m benchmarks.ce_backends --entries E1,E2 --threads 1 --out docs/results-ce-backends   # resumable, in chunks
    python -m benchmarks.ce_backends --report --out docs/results-ce-backends   # the table docs/PERFORMANCE.md quotes

For each entry of the default bank taken as the user's task: its first 16 train examples (as `generate` scores), and
as candidates the 16 other entries nearest by answer-token JS (the pool the rerank draws from). Each candidate's ce
(mean target-token cross-entropy, the adapter alone at scale 1) under torch in fp32 (the reference, what the
model's weights are), then under llama.cpp's runtime LoRA over SmolLM2's GGUF in F32, Q8_0 and Q4_K_M (written by
llama.cpp's own quantizer from the F32 file, in a temp dir, deleted after the run). A record is one line of
losses.csv: entry, backend, the candidates in order and their losses.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.rows import append_rows, read_rows

FIELDS = ("entry", "backend", "candidates", "losses", "seconds")
BACKENDS = ("torch-f32", "llamacpp-f32", "llamacpp-q8_0", "llamacpp-q4_k_m")
CANDIDATES = 16
EXAMPLES = 16


def read(out: Path) -> list[dict]:
    return read_rows(out / "losses.csv", {"candidates": json.loads, "losses": json.loads, "seconds": float})


def candidates(bank, name: str) -> list[str]:
    from lorablend.dataset import load_dataset
    from lorablend.generate import dataset_distances
    from lorablend.settings import NEAREST

    ds = load_dataset(bank.dataset_path(bank.entry(name)), name=name)
    d = dataset_distances(bank, NEAREST, ds, 0)
    order = [bank.names[i] for i in np.argsort(d, kind="stable") if bank.names[i] != name]
    return order[:CANDIDATES]


def quantize(f32: Path, out: Path, kind: str) -> Path:
    """llama.cpp's own quantizer (what `llama-quantize` runs); tensors whose rows do not fit a K-quant fall back."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[kind]
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {kind}")
    return out


def run(entries: list[str], out: Path, tmp: Path, threads: int = 1) -> None:
    """Entry by entry, every backend, so that a chunk stopped at its time limit leaves whole entries."""
    from lorablend.adapter import AdapterReader
    from lorablend.bank.manifest import Bank
    from lorablend.dataset import load_dataset
    from lorablend.runtime.gguf_io import dequantize_gguf
    from lorablend.runtime.llamacpp import LlamaCppModel, LlamaCppScorer
    from lorablend.runtime.models import load_model, load_tokenizer, smollm2_gguf
    from lorablend.runtime.scoring import MixtureScorer

    bank = Bank.open("default")
    model_id = bank.manifest.base_model
    tok = load_tokenizer(model_id)
    done = {(r["entry"], r["backend"]) for r in read(out)}
    loaded: dict[str, object] = {}

    def scorer(backend: str, names: list[str], examples):
        if backend == "torch-f32":
            if backend not in loaded:
                loaded[backend] = load_model(model_id)
            return MixtureScorer(loaded[backend], tok, [AdapterReader(bank.adapter_path(bank.entry(n))) for n in names],
                                 examples, bf16=False)
        if backend not in loaded:
            kind = backend.split("-")[1]
            f32 = tmp / "base-f32.gguf"
            if not f32.exists():
                dequantize_gguf(smollm2_gguf(), f32, "f32")
            gguf = f32 if kind == "f32" else quantize(f32, tmp / f"base-{kind}.gguf", kind)
            loaded[backend] = LlamaCppModel(model_id, n_threads=threads, gguf=gguf)
        return LlamaCppScorer(loaded[backend], tok, [bank.adapter_path(bank.entry(n)) for n in names], examples)

    for name in entries:
        names = candidates(bank, name)
        examples = load_dataset(bank.dataset_path(bank.entry(name)), name=name).split("train")[:EXAMPLES]
        for backend in [b for b in BACKENDS if (name, b) not in done]:
            t0 = time.perf_counter()
            s = scorer(backend, names, examples)
            try:
                losses = s.losses().tolist()
            finally:
                s.close()
            append_rows(out / "losses.csv", FIELDS, [{"entry": name, "backend": backend, "candidates": json.dumps(names),
                                                     "losses": json.dumps([round(x, 6) for x in losses]),
                                                     "seconds": round(time.perf_counter() - t0, 1)}])
            print(f"{backend} {name}: {time.perf_counter() - t0:.1f}s", flush=True)


def report(out: Path) -> str:
    """The agreement of each llama.cpp base with torch-f32, over the entries every backend has measured."""
    from scipy.stats import spearmanr

    rows = read(out)
    by = {(r["entry"], r["backend"]): r for r in rows}
    entries = sorted({r["entry"] for r in rows if all((r["entry"], b) in by for b in BACKENDS)})
    lines = ["| llama.cpp base | entries | mean Spearman with torch-f32 (min) | same lowest-ce pick | max abs Δce | "
             "seconds per entry (torch-f32 alongside) |", "|---|---|---|---|---|---|"]
    ref_s = np.mean([by[(e, "torch-f32")]["seconds"] for e in entries]) if entries else float("nan")
    for b in BACKENDS[1:]:
        rho, same, gap, secs = [], 0, 0.0, []
        for e in entries:
            ref, got = by[(e, "torch-f32")], by[(e, b)]
            assert ref["candidates"] == got["candidates"]
            rho.append(spearmanr(ref["losses"], got["losses"]).statistic)
            same += int(np.argmin(ref["losses"]) == np.argmin(got["losses"]))
            gap = max(gap, float(np.max(np.abs(np.subtract(ref["losses"], got["losses"])))))
            secs.append(got["seconds"])
        if entries:
            lines.append(f"| {b.split('-')[1].upper()} | {len(entries)} | {np.mean(rho):.4f} ({np.min(rho):.4f}) | "
                         f"{same} of {len(entries)} ({100 * same / len(entries):.0f} %) | {gap:.4f} | "
                         f"{np.mean(secs):.1f} ({ref_s:.1f}) |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", help="comma-separated; default: every entry of the default bank")
    ap.add_argument("--out", type=Path, default=Path("docs/results-ce-backends"))
    ap.add_argument("--threads", type=int, default=1, help="torch and llama.cpp threads")
    ap.add_argument("--report", action="store_true", help="print the agreement table from losses.csv")
    args = ap.parse_args(argv)
    if args.report:
        print(report(args.out))
        return
    from lorablend.bank.manifest import Bank

    import torch

    torch.set_num_threads(args.threads)
    entries = args.entries.split(",") if args.entries else Bank.open("default").names
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ce-backends-") as tmp:  # the GGUFs go with it
        run(entries, args.out, Path(tmp), args.threads)


if __name__ == "__main__":
    sys.exit(main())
