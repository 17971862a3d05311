"""Cost of the `ce` distance per candidate adapter, with and without the shared prompt prefix.

    python -m lorablend.benchmarks.ce_cost --bank default --tasks 5 --threads 1

For every `--every`-th bank entry (up to `--tasks`), a MixtureScorer over the first 16 bank
adapters scores the entry's first k train examples with 4 single candidates, once running
the examples' common prefix once (the product's path) and once on whole prompts, one after
the other on the same loaded model. Prints per task the CPU and wall seconds per candidate
of both and the largest difference of their losses (bf16 autocast: not bit-identical;
tests/test_pipeline.py checks the two agree to 1e-5 in float32).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bank", default="default")
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--every", type=int, default=9, help="take every n-th bank entry")
    ap.add_argument("--k", type=int, default=16, help="train examples per pass")
    ap.add_argument("--candidates", type=int, default=4, help="candidates timed per task and mode")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    from ..bank import Bank
    from ..ce import MixtureScorer
    from ..dataset import load_dataset
    from ..generate import open_readers
    from ..models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    bank = Bank.open(args.bank)
    tok, model = load_tokenizer(bank.manifest.base_model), load_model(bank.manifest.base_model).eval()
    readers = list(open_readers(bank, bank.names[:16]).values())
    n = len(readers)
    totals = {"shared": [], "whole": []}
    for task in bank.names[:: args.every][: args.tasks]:
        examples = load_dataset(bank.dataset_path(bank.entry(task)), name=task).split("train")[: args.k]
        row, losses = {"task": task}, {}
        for mode in ("whole", "shared"):
            scorer = MixtureScorer(model, tok, readers, examples, share_prefix=mode == "shared")
            scorer.loss(np.zeros(n))  # warm-up
            cpu, wall = time.process_time(), time.perf_counter()
            losses[mode] = np.array([scorer.loss(np.eye(n)[i]) for i in range(args.candidates)])
            row[f"{mode}_cpu_s"] = round((time.process_time() - cpu) / args.candidates, 4)
            row[f"{mode}_wall_s"] = round((time.perf_counter() - wall) / args.candidates, 4)
            totals[mode].append(row[f"{mode}_cpu_s"])
            scorer.close()
        row["max_abs_diff"] = round(float(np.abs(losses["whole"] - losses["shared"]).max()), 4)
        print(json.dumps(row), flush=True)
    print(json.dumps({"mean_cpu_s_per_candidate": {m: round(float(np.mean(v)), 4) for m, v in totals.items()},
                      "ratio": round(float(np.mean(totals["whole"]) / max(np.mean(totals["shared"]), 1e-9)), 2)}))


if __name__ == "__main__":
    main()
