"""7B on a laptop, measured: each path's seconds and peak RSS at Mistral-7B-Instruct-v0.2's shapes, side by side on
one machine and thread count.

    python -m benchmarks.laptop --paths ce:llamacpp-q4_k_m,ce:llamacpp-q8_0,ce:torch-bf16 --threads 2 --out docs/results-laptop
    python -m benchmarks.laptop --paths train:nf4,train:int8,train:bf16 --threads 2 --out docs/results-laptop
    python -m benchmarks.laptop --paths grad:nf4,grad:bf16 --threads 2 --out docs/results-laptop
    python -m benchmarks.laptop --report --out docs/results-laptop       # the table, with the ratios

A random model of those shapes (7.4 B parameters with SmolLM2's 49k vocabulary, whose tokenizer it uses) and
synthetic r=16 q/k/v LoRAs, on the first 16 train examples of subtask001_quoref_question_generation (the bank's
longest prompts; `ce_cost --synthetic`'s examples). Each path runs in a fresh process, so its peak RSS (ru_maxrss,
the model's creation included) is its own:

- `ce:torch-bf16`: the torch scorer (`MixtureScorer`, shared prefix) over bf16 weights;
- `ce:llamacpp-q8_0`, `ce:llamacpp-q4_k_m`: `LlamaCppModel.target_nll` (what `LlamaCppScorer` runs) over a GGUF
  quantized by llama.cpp's own quantizer from an F16 file this run writes (both deleted at the end), the
  candidates applied at run time as GGUF LoRAs;
- `grad:bf16`, `grad:nf4`: the first-order pass (`FirstOrderScorer` with its own slices: 256 tokens over bf16, 512
  over NF4) over bf16 weights or an NF4 base (the hooked gradient `generate` takes where llama.cpp scores), then `--candidates` adapters scored;
- `train:bf16`: one LoRA training step (batch 8, r=16 on q/k/v, AdamW, bf16 autocast, activation checkpointing)
  over bf16 weights; `train:int8`, `train:nf4`: the same step over a bitsandbytes base (`runtime/quantized.py`),
  built a decoder layer at a time so that no float copy of the model is ever whole.

A ce path times `--candidates` candidates after one warm-up candidate; a training path one step after one warm-up
step. A record is one line of rows.jsonl, appended when measured (a stopped run keeps the paths it finished).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from benchmarks.merge import CONFIG

PATHS = ("ce:torch-bf16", "ce:llamacpp-q8_0", "ce:llamacpp-q4_k_m", "train:bf16", "train:int8", "train:nf4",
         "grad:bf16", "grad:nf4")
TASK = "subtask001_quoref_question_generation"
EXAMPLES = 16
MISTRAL = {"layers": CONFIG["num_hidden_layers"], "hidden": CONFIG["hidden_size"],
           "intermediate": CONFIG["intermediate_size"], "heads": CONFIG["num_attention_heads"],
           "kv-heads": CONFIG["num_key_value_heads"]}


def shapes(given: dict) -> SimpleNamespace:
    """`ce_cost`'s synthetic-model arguments (activation checkpointing on, as a 7B step needs)."""
    return SimpleNamespace(**{k.replace("-", "_"): v for k, v in given.items()}, checkpointing=True)


def config(given: dict, vocab: int) -> dict:
    """The HF config of those shapes (what the GGUF and the LoRA export read)."""
    return CONFIG | {"num_hidden_layers": given["layers"], "hidden_size": given["hidden"],
                     "intermediate_size": given["intermediate"], "num_attention_heads": given["heads"],
                     "num_key_value_heads": given["kv-heads"], "vocab_size": vocab}


def examples():
    from lorablend.bank.manifest import Bank
    from lorablend.dataset import load_dataset

    bank = Bank.open("default")
    tok_id = bank.manifest.base_model
    return tok_id, load_dataset(bank.dataset_path(bank.entry(TASK)), name=TASK).split("train")[:EXAMPLES]


def peak_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def built(threads: int, sizes: SimpleNamespace, kind: str = "bf16"):
    """(tokenizer, examples, the synthetic model held as `kind`, its build seconds), torch on `threads` threads."""
    import torch

    from benchmarks.ce_cost import synthetic_model
    from lorablend.runtime.models import load_tokenizer

    torch.set_num_threads(threads)
    model_id, exs = examples()
    tok = load_tokenizer(model_id)
    t = time.perf_counter()
    model = synthetic_model(sizes, len(tok), None if kind == "bf16" else kind)
    return tok, exs, model, time.perf_counter() - t


def ce_torch(threads: int, candidates: int, tmp: Path, sizes: SimpleNamespace) -> dict:
    from benchmarks.ce_cost import synthetic_readers, time_candidates

    tok, exs, model, load_s = built(threads, sizes)
    readers = synthetic_readers(sizes, tmp, candidates + 1)
    cpu, wall, losses = time_candidates(model, tok, readers, exs, True, candidates)
    return {"load_s": round(load_s, 1), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "loss": round(float(losses.mean()), 3)}


def ce_llamacpp(threads: int, candidates: int, tmp: Path, sizes: SimpleNamespace, gguf: Path) -> dict:
    import numpy as np

    from benchmarks.ce_cost import synthetic_readers
    from lorablend.runtime.gguf import export_gguf
    from lorablend.runtime.llamacpp import LlamaCppModel, build_features
    from lorablend.runtime.models import load_tokenizer
    from lorablend.runtime.prompts import training_pair

    model_id, exs = examples()
    tok = load_tokenizer(model_id)
    config_dir = gguf.parent / "model"  # config.json of the shapes: what the LoRA export reads
    readers = synthetic_readers(sizes, tmp, candidates + 1)
    files = {f"c{i}": export_gguf(r.path.parent, str(config_dir), tmp / f"c{i}.gguf") for i, r in enumerate(readers)}
    t = time.perf_counter()
    model = LlamaCppModel(str(config_dir), n_threads=threads, gguf=gguf)
    model.load_gguf_adapters(files)
    load_s = time.perf_counter() - t
    pairs = [training_pair(tok, e) for e in exs]
    model.target_nll(pairs, {"c0": 1.0})  # warm-up: pages the weights in
    cpu, wall, losses = time.process_time(), time.perf_counter(), []
    for i in range(1, candidates + 1):
        total, count = model.target_nll(pairs, {f"c{i}": 1.0})
        losses.append(total / count)
    return {"load_s": round(load_s, 1), "wall_s": round((time.perf_counter() - wall) / candidates, 2),
            "cpu_s": round((time.process_time() - cpu) / candidates, 2), "loss": round(float(np.mean(losses)), 3),
            "llamacpp": build_features()}  # rows of an AMX build and of one without must be told apart


def train(threads: int, kind: str, sizes: SimpleNamespace) -> dict:
    from benchmarks.ce_cost import time_training_step

    tok, exs, model, load_s = built(threads, sizes, kind)
    step = time_training_step(model, tok, exs, sizes)  # one step, no warm-up (`ce_cost`'s: a step is minutes at 7B)
    return {"load_s": round(load_s, 1), "wall_s": step["train_step_wall_s"], "cpu_s": step["train_step_cpu_s"],
            "tokens": step["train_tokens"]}


def first_order(threads: int, kind: str, tmp: Path, sizes: SimpleNamespace, candidates: int) -> dict:
    """The first-order pass (`FirstOrderScorer`: forward and backward over the 16 examples, in the slices it takes
    for this base), then `candidates` synthetic adapters scored after it."""
    from benchmarks.ce_cost import synthetic_readers
    from lorablend.runtime.scoring import FirstOrderScorer

    tok, exs, model, load_s = built(threads, sizes, kind)
    readers = synthetic_readers(sizes, tmp, candidates)
    scorer = FirstOrderScorer(model, tok, readers[0].modules, exs)
    t = time.perf_counter()
    scorer.scores(readers)
    return {"load_s": round(load_s, 1), "wall_s": round(scorer.seconds, 2), "cpu_s": round(scorer.cpu_seconds, 2),
            "scoring_s_per_adapter": round((time.perf_counter() - t) / candidates, 2)}


def _child(path: str, threads: int, candidates: int, given: dict, gguf: str | None, result) -> None:
    sizes = shapes(given)
    with tempfile.TemporaryDirectory() as tmp:
        what, kind = path.split(":")
        if what == "train":
            row = train(threads, kind, sizes)
        elif what == "grad":
            row = first_order(threads, kind, Path(tmp), sizes, candidates)
        elif kind == "torch-bf16":
            row = ce_torch(threads, candidates, Path(tmp), sizes)
        else:
            row = ce_llamacpp(threads, candidates, Path(tmp), sizes, Path(gguf))
    result.put(row | {"peak_rss_gb": peak_gb()})


def _result(child, queue, path: str) -> dict:
    """The child's row, or a clear exit when it died without one (its traceback is on stderr above)."""
    import queue as q

    while True:
        try:
            row = queue.get(timeout=5)
            child.join()
            return row
        except q.Empty:
            if not child.is_alive():
                sys.exit(f"{path}: the measuring process died (exit code {child.exitcode}) without a result")


def write_ggufs(root: Path, kinds: list[str], given: dict) -> dict[str, Path]:
    """The synthetic base as F16, then each of `kinds` by llama.cpp's quantizer; the F16 file is removed."""
    from benchmarks.ce_backends import quantize
    from benchmarks.merge import write_base
    from lorablend.runtime.models import load_tokenizer, model_gguf

    model_id, _ = examples()
    cfg = config(given, len(load_tokenizer(model_id)))
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text(json.dumps(cfg))
    t = time.perf_counter()
    f16 = write_base(root / "base-f16.gguf", cfg, "f16", like=model_gguf(model_id))
    print(f"F16 base written ({f16.stat().st_size / 1e9:.1f} GB, {time.perf_counter() - t:.0f} s)", flush=True)
    out = {}
    for kind in kinds:
        t = time.perf_counter()
        out[kind] = quantize(f16, root / f"base-{kind}.gguf", kind)
        print(f"{kind} written ({out[kind].stat().st_size / 1e9:.2f} GB, {time.perf_counter() - t:.0f} s)", flush=True)
    f16.unlink()
    return out


def run(paths: list[str], threads: int, candidates: int, out: Path, scratch: Path | None, given: dict = MISTRAL
        ) -> None:
    from lorablend.machine import bf16_kernels, machine

    out.mkdir(parents=True, exist_ok=True)
    rows = out / "rows.jsonl"
    done = {json.loads(line)["path"] for line in rows.read_text().splitlines()} if rows.exists() else set()
    todo = [p for p in paths if p not in done]
    root = Path(tempfile.mkdtemp(prefix="lorablend-laptop-", dir=scratch))
    try:
        ggufs = write_ggufs(root, [p.split("-", 1)[1] for p in todo if p.startswith("ce:llamacpp")], given) \
            if any(p.startswith("ce:llamacpp") for p in todo) else {}
        ctx = mp.get_context("spawn")
        for path in todo:
            result = ctx.Queue()
            gguf = ggufs.get(path.split("-", 1)[-1]) if path.startswith("ce:llamacpp") else None
            child = ctx.Process(target=_child, args=(path, threads, candidates, given, str(gguf) if gguf else None,
                                                     result))
            t = time.perf_counter()
            child.start()
            row = _result(child, result, path)
            row = {"path": path, "threads": threads, "candidates": None if path.startswith("train:") else candidates,
                   "examples": EXAMPLES, **row, "process_s": round(time.perf_counter() - t, 1),
                   "shapes": given, "cpu": machine()["cpu"], "bf16_kernels": bf16_kernels()}
            print(json.dumps(row), flush=True)
            with rows.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(out: Path) -> str:
    rows = {r["path"]: r for r in map(json.loads, (out / "rows.jsonl").read_text().splitlines())}
    lines = ["| path | seconds (wall) | CPU s | peak RSS GB | load s | vs torch bf16 (seconds) |", "|---|---|---|---|---|---|"]
    for what, ref in (("ce:", "ce:torch-bf16"), ("train:", "train:bf16"), ("grad:", "grad:bf16")):
        for p in [p for p in PATHS if p.startswith(what) and p in rows]:
            r = rows[p]
            ratio = f"{r['wall_s'] / rows[ref]['wall_s']:.2f}×" if ref in rows else ""
            lines.append(f"| {p} | {r['wall_s']} | {r['cpu_s']} | {r['peak_rss_gb']} | {r['load_s']} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--candidates", type=int, default=2, help="ce candidates timed per path, after one warm-up")
    ap.add_argument("--out", type=Path, default=Path("docs/results-laptop"))
    ap.add_argument("--scratch", type=Path, default=None, help="where the GGUFs go (~22 GB at once; default: a temp dir)")
    ap.add_argument("--report", action="store_true", help="print the table of what --out holds")
    for name, value in MISTRAL.items():
        ap.add_argument(f"--{name}", type=int, default=value, help=f"synthetic model (default {value}: Mistral-7B)")
    args = ap.parse_args(argv)
    if args.report:
        print(report(args.out))
        return
    paths = [p for p in args.paths.split(",") if p]
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        sys.exit(f"--paths: unknown {', '.join(unknown)}; expected some of {', '.join(PATHS)}")
    run(paths, args.threads, args.candidates, args.out, args.scratch,
        {name: getattr(args, name.replace("-", "_")) for name in MISTRAL})


if __name__ == "__main__":
    main()
