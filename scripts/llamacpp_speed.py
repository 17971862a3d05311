"""Side-by-side speed and agreement of the evaluation backends (torch vs llama.cpp).

    python scripts/llamacpp_speed.py --bank /work/cache/bank_default --data /work/cache/ni \
        --tasks 3 --examples 8 --configs torch:1,llamacpp:1,llamacpp:1:1 --json /tmp/llamacpp_speed.json

A config is `torch:THREADS` or `llamacpp:THREADS[:SEQS[:GGUF]]`: SEQS sequences decoded
together (default 8, the backend's default), GGUF a base model file other than the model's
own (e.g. the wheel's Q4_1 file, to compare GGUF types); configs are labelled by the
GGUF's file name. For each of the first `--tasks` bank entries (its own adapter on its own task's test
split, as `lorablend bank build` scores it) and for the base model on the first task,
every config (backend:threads) answers the same examples, in a rotating order so that
load changes on a shared machine hit all of them alike. Reported per evaluation: wall
time and CPU time of the process (on a shared, busy machine the wall time mostly measures
the neighbours: CPU time is the work done), answer tokens per second (counted the same way for every config: the tokens of
the decoded answer plus the end-of-turn token), mean Rouge-L, and the per-example
agreement with the first config (identical answers, |Rouge-L difference|).

    python scripts/llamacpp_speed.py --micro MODEL.gguf,OTHER.gguf --threads 1

instead measures llama.cpp alone on each GGUF file, in tokens per CPU-second (and per wall
second): prefill of a 256-token prompt, decoding one sequence, prefill of 8 sequences of 64
tokens after a shared 128-token prefix, and decoding those 8 sequences together (random
token ids; decoding never stops early).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def micro(gguf: Path, threads: int) -> dict:
    """Prefill / decode tokens per CPU-second and per second of one GGUF file (see the module docstring)."""
    from lorablend.runtime.llamacpp import LlamaCppModel

    m = LlamaCppModel("smollm2", n_threads=threads, n_seq=8, gguf=gguf)
    rng = np.random.default_rng(0)

    def rand(n):
        return [int(t) for t in rng.integers(100, m.n_vocab - 100, n)]

    def timed(n_tokens, fn):
        t, c = time.perf_counter(), time.process_time()
        fn()
        return {"tok_per_cpu_s": round(n_tokens / (time.process_time() - c)), "tok_s": round(n_tokens / (time.perf_counter() - t))}

    def steps(seqs, start):
        for k in range(32):
            m._decode([(t, start + k, s) for s, t in enumerate(rand(seqs))], set(range(seqs)))

    out = {"gguf": gguf.name, "threads": threads}
    m._lib.llama_memory_clear(m._mem, True)
    out["prefill_256"] = timed(256, lambda: m._decode([(t, i, 0) for i, t in enumerate(rand(256))], {255}))
    out["decode_1"] = timed(32, lambda: steps(1, 256))
    m._lib.llama_memory_clear(m._mem, True)
    m._decode([(t, i, 0) for i, t in enumerate(rand(128))], set())
    for s in range(1, 8):
        m._lib.llama_memory_seq_cp(m._mem, 0, s, -1, -1)
    suffixes = [(t, 128 + i, s) for s in range(8) for i, t in enumerate(rand(64))]
    out["prefill_8x64"] = timed(512, lambda: m._decode(suffixes, {64 * s + 63 for s in range(8)}))
    out["decode_8"] = timed(256, lambda: steps(8, 192))
    m.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bank", type=Path)
    ap.add_argument("--data", type=Path, help="dir of <entry>.jsonl.gz task files")
    ap.add_argument("--micro", help="GGUF files, comma-separated: measure llama.cpp alone on each")
    ap.add_argument("--threads", type=int, default=1, help="threads for --micro")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--configs", default="torch:1,llamacpp:1", help="torch:THREADS or llamacpp:THREADS[:SEQS[:GGUF]], comma-separated")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.micro:
        for gguf in args.micro.split(","):
            print(json.dumps(micro(Path(gguf), args.threads)), flush=True)
        return
    if not (args.bank and args.data):
        ap.error("--bank and --data are required (or --micro)")

    import torch

    from lorablend.bank.manifest import Bank
    from lorablend.dataset import load_dataset
    from lorablend.runtime.evaluate import answers_with, load_for_eval, max_new_tokens_for, rouge
    from lorablend.runtime.llamacpp import N_SEQ, LlamaCppModel
    from lorablend.runtime.models import load_tokenizer

    configs = []  # (label, backend, threads, seqs, gguf)
    for c in args.configs.split(","):
        backend, threads, *rest = c.split(":", 3)
        seqs = int(rest[0]) if rest else N_SEQ
        gguf = Path(rest[1]) if len(rest) > 1 else None
        label = ":".join([backend, threads] + rest[:1] + ([gguf.name] if gguf else []))
        configs.append((label, backend, int(threads), seqs, gguf))
    bank = Bank.open(str(args.bank))
    entries = [e for e in bank.entries if (args.data / f"{e.name}.jsonl.gz").is_file()
               and (bank.root / e.adapter_dir / "adapter_model.safetensors").is_file()][: args.tasks]
    if not entries:
        sys.exit(f"no bank entry of {args.bank} has a task file in {args.data}")
    adapters = {e.name: str(bank.root / e.adapter_dir) for e in entries}
    model_id = bank.manifest.base_model
    tok = load_tokenizer(model_id)
    models, load_s = {}, {}
    for label, backend, threads, seqs, gguf in configs:
        t0 = time.perf_counter()
        if backend == "torch":
            if "torch" not in models:
                models["torch"], _ = load_for_eval(model_id, adapters, backend="torch")
        else:
            m = LlamaCppModel(model_id, n_threads=threads, n_seq=seqs, gguf=gguf)
            m.load_adapters(adapters)  # exports uncached adapters to GGUF
            models[label] = m
        load_s[label] = round(time.perf_counter() - t0, 1)
    print(json.dumps({"gguf": {k: str(m.path) for k, m in models.items() if k != "torch"}}), flush=True)

    names = [c[0] for c in configs]
    jobs = [(e.name, e.name) for e in entries] + [(entries[0].name, None)]
    rows, totals = [], {n: {"seconds": 0.0, "cpu": 0.0, "tokens": 0, "rouge": [], "answers": []} for n in names}
    for k, (task, adapter) in enumerate(jobs):
        ds = load_dataset(args.data / f"{task}.jsonl.gz", seed=0)
        examples = ds.split("test")[: args.examples]
        budget = max_new_tokens_for(tok, [e.target for e in ds.splits.get("train") or examples])
        result = {}
        for j in range(len(configs)):
            name, backend, threads, _, _ = configs[(j + k) % len(configs)]
            if backend == "torch":
                torch.set_num_threads(threads)
                model = models["torch"]
            else:
                model = models[name]
            t, c = time.perf_counter(), time.process_time()
            answers = answers_with(model, adapter, tok, examples, max_new_tokens=budget, batch_size=8)
            seconds, cpu = time.perf_counter() - t, time.process_time() - c
            tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)
            result[name] = {"seconds": seconds, "cpu": cpu, "tokens": tokens, "answers": answers,
                            "rouge": [rouge(a, e.outputs)[0] for a, e in zip(answers, examples)]}
            for key in ("seconds", "cpu", "tokens"):
                totals[name][key] += result[name][key]
            totals[name]["rouge"] += result[name]["rouge"]
            totals[name]["answers"] += answers
        ref = result[names[0]]
        row = {"task": task, "adapter": adapter or "(base model)", "n": len(examples), "max_new_tokens": budget}
        for name in names:
            r = result[name]
            row[name] = {"s": round(r["seconds"], 1), "cpu_s": round(r["cpu"], 1),
                         "tok_s": round(r["tokens"] / r["seconds"], 1), "tok_per_cpu_s": round(r["tokens"] / r["cpu"], 1),
                         "cpu_speedup": round(ref["cpu"] / r["cpu"], 2),
                         "rouge_l": round(float(np.mean(r["rouge"])), 4),
                         "speedup": round(ref["seconds"] / r["seconds"], 2),
                         "identical": int(sum(a == b for a, b in zip(ref["answers"], r["answers"]))),
                         "mean_abs_rouge_diff": round(float(np.mean(np.abs(np.subtract(ref["rouge"], r["rouge"])))), 4)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    ref = totals[names[0]]
    summary = {"evaluations": len(rows), "examples": len(ref["rouge"]), "load_s": load_s, "loadavg": os.getloadavg()}
    for name in names:
        t = totals[name]
        diff = np.abs(np.subtract(ref["rouge"], t["rouge"]))
        summary[name] = {"s": round(t["seconds"], 1), "cpu_s": round(t["cpu"], 1),
                         "tok_s": round(t["tokens"] / t["seconds"], 1), "tok_per_cpu_s": round(t["tokens"] / t["cpu"], 1),
                         "cpu_speedup": round(ref["cpu"] / t["cpu"], 2),
                         "s_per_eval": round(t["seconds"] / len(rows), 1), "speedup": round(ref["seconds"] / t["seconds"], 2),
                         "rouge_l": round(float(np.mean(t["rouge"])), 4),
                         "identical": int(sum(a == b for a, b in zip(ref["answers"], t["answers"]))),
                         "mean_abs_rouge_diff": round(float(diff.mean()), 4), "max_abs_rouge_diff": round(float(diff.max()), 4),
                         "rouge_diff_over_0.1": int((diff > 0.1).sum())}
    print(json.dumps(summary), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"configs": names, "rows": rows, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
