"""One bank-building training step, two ways side by side: transformers' `labels=` loss against
`models.target_loss` (`--pair loss`), or `target_loss` under bf16 autocast against fp32 (`--pair precision`).

    python -m benchmarks.train_step --task /path/to/task.jsonl.gz --steps 4 [--pair precision]

Each mode runs in its own fresh process (so its peak RSS is its own): the base model, a
LoRA as `lorablend bank build` makes it, and `--steps` AdamW steps on the task's first
train batches (bf16 autocast but for mode fp32), after one warm-up step. Prints CPU and wall
seconds per step, the peak RSS of the process, the first step's loss, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

PAIRS = {"loss": ("labels", "target_loss"), "precision": ("target_loss", "fp32")}


def run(mode: str, model_id: str, task: str, steps: int, threads: int) -> dict:
    import random

    import torch

    from lorablend.dataset import load_dataset
    from lorablend.runtime.models import load_model, load_tokenizer, target_loss
    from lorablend.runtime.prompts import training_pair
    from lorablend.runtime.train import TrainConfig, add_lora, batches

    torch.set_num_threads(threads)
    cfg = TrainConfig(steps=steps + 1)
    tok = load_tokenizer(model_id)
    examples = load_dataset(task).split("train")
    peft_model = add_lora(load_model(model_id), cfg, 0)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    pairs = [training_pair(tok, e) for e in examples]
    causal_lm = peft_model.get_base_model()
    out, cpu, wall = {"mode": mode}, 0.0, 0.0
    for k, (ids, labels, mask) in enumerate(batches(pairs, cfg, random.Random(0), tok.pad_token_id or 0)):
        c, w = time.process_time(), time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
            if mode == "labels":
                loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
            else:
                loss = target_loss(causal_lm, ids, mask, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if k == 0:
            out["first_loss"] = round(float(loss), 5)
        else:  # step 0 is the warm-up
            cpu += time.process_time() - c
            wall += time.perf_counter() - w
    out.update(cpu_s_per_step=round(cpu / steps, 4), wall_s_per_step=round(wall / steps, 4),
               peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True, help="a dataset file with a train split")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pair", choices=tuple(PAIRS), default="loss", help="what the two runs differ in")
    ap.add_argument("--mode", choices=sorted({m for p in PAIRS.values() for m in p}), help=argparse.SUPPRESS)  # child
    args = ap.parse_args(argv)
    if args.mode:
        print(json.dumps(run(args.mode, args.model, args.task, args.steps, args.threads)))
        return
    rows = []
    for mode in PAIRS[args.pair]:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--task", args.task, "--model", args.model, "--steps",
                               str(args.steps), "--threads", str(args.threads), "--mode", mode],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"cpu_ratio": round(rows[0]["cpu_s_per_step"] / max(rows[1]["cpu_s_per_step"], 1e-9), 2),
                      "rss_ratio": round(rows[0]["peak_rss_gb"] / rows[1]["peak_rss_gb"], 2)}))


if __name__ == "__main__":
    main()
