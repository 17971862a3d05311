"""Side-by-side speed and agreement of the two evaluation backends (torch vs llama.cpp).

    python scripts/llamacpp_speed.py --bank /work/cache/bank_default --data /work/cache/ni \
        --tasks 3 --examples 16 --json docs/llamacpp_speed.json

For each of the first `--tasks` bank entries (its own adapter on its own task's test
split, as `lorablend bank build` scores it) and for the base model on the first task,
both backends answer the same examples, alternating which goes first, with 2 threads
each. Reported per evaluation: wall time, answer tokens per second (the same count for
both: the tokens of the decoded answers plus the end-of-turn token), mean Rouge-L, and
the per-example agreement (identical answers, |Rouge-L difference|).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bank", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="dir of <entry>.jsonl.gz task files")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from lorablend import llamacpp
    from lorablend.bank import Bank
    from lorablend.dataset import load_dataset
    from lorablend.evaluate import answers_with, load_for_eval, max_new_tokens_for, rouge

    llamacpp.N_THREADS = args.threads
    bank = Bank.open(str(args.bank))
    entries = [e for e in bank.entries if (args.data / f"{e.name}.jsonl.gz").is_file()
               and (bank.root / e.adapter_dir / "adapter_model.safetensors").is_file()][: args.tasks]
    if not entries:
        sys.exit(f"no bank entry of {args.bank} has a task file in {args.data}")
    adapters = {e.name: str(bank.root / e.adapter_dir) for e in entries}
    model_id = bank.manifest.base_model
    t0 = time.perf_counter()
    tm, tok = load_for_eval(model_id, adapters, backend="torch")
    load_torch = time.perf_counter() - t0
    t0 = time.perf_counter()
    lm, _ = load_for_eval(model_id, adapters, backend="llamacpp")
    load_llama = time.perf_counter() - t0  # includes the GGUF export of uncached adapters

    jobs = [(e.name, e.name) for e in entries] + [(entries[0].name, None)]
    rows, diffs = [], []
    for k, (task, adapter) in enumerate(jobs):
        ds = load_dataset(args.data / f"{task}.jsonl.gz", seed=0)
        examples = ds.split("test")[: args.examples]
        budget = max_new_tokens_for(tok, [e.target for e in ds.splits.get("train") or examples])
        result = {}
        order = ("torch", "llamacpp") if k % 2 == 0 else ("llamacpp", "torch")
        for backend in order:
            model = tm if backend == "torch" else lm
            t = time.perf_counter()
            answers = answers_with(model, adapter, tok, examples, max_new_tokens=budget, batch_size=8)
            seconds = time.perf_counter() - t
            tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)
            result[backend] = {"seconds": seconds, "tokens": tokens, "answers": answers,
                               "rouge_l": [rouge(a, e.outputs)[0] for a, e in zip(answers, examples)]}
        a, b = result["torch"], result["llamacpp"]
        diff = np.abs(np.array(a["rouge_l"]) - np.array(b["rouge_l"]))
        diffs += diff.tolist()
        row = {
            "task": task, "adapter": adapter or "(base model)", "n": len(examples), "max_new_tokens": budget,
            "torch_s": round(a["seconds"], 2), "llamacpp_s": round(b["seconds"], 2),
            "speedup": round(a["seconds"] / b["seconds"], 2),
            "torch_tok_s": round(a["tokens"] / a["seconds"], 1), "llamacpp_tok_s": round(b["tokens"] / b["seconds"], 1),
            "torch_rouge_l": round(float(np.mean(a["rouge_l"])), 4),
            "llamacpp_rouge_l": round(float(np.mean(b["rouge_l"])), 4),
            "identical_answers": int(sum(x == y for x, y in zip(a["answers"], b["answers"]))),
            "mean_abs_rouge_l_diff": round(float(diff.mean()), 4), "max_abs_rouge_l_diff": round(float(diff.max()), 4),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    ts, ls = sum(r["torch_s"] for r in rows), sum(r["llamacpp_s"] for r in rows)
    summary = {
        "evaluations": len(rows), "examples": sum(r["n"] for r in rows), "threads": args.threads,
        "load_torch_s": round(load_torch, 1), "load_llamacpp_s": round(load_llama, 1),
        "torch_s": round(ts, 1), "llamacpp_s": round(ls, 1), "speedup": round(ts / ls, 2),
        "identical_answers": sum(r["identical_answers"] for r in rows),
        "mean_abs_rouge_l_diff": round(float(np.mean(diffs)), 4), "max_abs_rouge_l_diff": round(float(np.max(diffs)), 4),
        "torch_rouge_l": round(float(np.mean([r["torch_rouge_l"] for r in rows])), 4),
        "llamacpp_rouge_l": round(float(np.mean([r["llamacpp_rouge_l"] for r in rows])), 4),
    }
    print(json.dumps(summary), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
