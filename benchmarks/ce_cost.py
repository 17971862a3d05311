"""Cost of the `ce` distance per candidate adapter, with and without the shared prompt prefix.

    python -m benchmarks.ce_cost --bank default --tasks 5 --threads 1
    python -m benchmarks.ce_cost --bank default --tasks 2 --every 36 --candidates 1 --threads 2 --synthetic

For every `--every`-th bank entry (up to `--tasks`), a MixtureScorer over the first 16 bank
adapters scores the entry's first k train examples with 4 single candidates, once running
the examples' common prefix once (the product's path) and once on whole prompts, one after
the other on the same loaded model. Prints per task the CPU and wall seconds per candidate
of both and the largest difference of their losses (bf16 autocast: not bit-identical;
tests/test_scoring.py checks the two agree to 1e-5 in float32).

`--synthetic` also times the product's path on a model of Mistral-7B-Instruct-v0.2's shapes
(bf16, random weights, the bank's tokenizer) with synthetic r=16 q/k/v adapters of the shapes of
Lots-of-LoRAs' (docs/PERFORMANCE.md), on the same examples, and prints its ratio to the bank's
model: what a candidate costs on a 7B base, measured rather than scaled from the weights. Its
weights take ~14.5 GB of RAM.

`--first-order N` then times, on the same synthetic model and examples, what the grad settings
add: the one backward pass (`FirstOrderScorer`), and the scoring of N synthetic bf16 adapters read
from disk after it; and, beside them, the alternative a user has: one LoRA training step of the
bank's recipe (r=16 on q/k/v, batch 8, AdamW, bf16 autocast, activation checkpointing with
`--checkpointing`). Each phase reports its own peak RSS (Linux: the peak is reset between phases;
elsewhere it is the process's peak so far).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lorablend.runtime.scoring import FIRST_ORDER_TOKENS


def time_candidates(model, tok, readers, examples, share_prefix: bool, candidates: int):
    """CPU and wall seconds per candidate (after one warm-up pass), and the candidates' losses."""
    from lorablend.runtime.scoring import MixtureScorer

    scorer = MixtureScorer(model, tok, readers, examples, share_prefix=share_prefix)
    n = len(readers)
    try:
        scorer.loss(np.zeros(n))
        cpu, wall = time.process_time(), time.perf_counter()
        losses = np.array([scorer.loss(np.eye(n)[i]) for i in range(candidates)])
        return (time.process_time() - cpu) / candidates, (time.perf_counter() - wall) / candidates, losses
    finally:
        scorer.close()


def synthetic_model(args, vocab: int, quantized: str | None = None):
    """A Mistral-architecture model of the given shapes, random bf16 weights, never a float32 copy. `quantized`
    (int8, nf4): every decoder Linear held so (`runtime/quantized.py`); the model is made a decoder layer at a time,
    so its bf16 weights are never whole in memory either way."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from lorablend.runtime.quantized import quantize

    cfg = MistralConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                        num_hidden_layers=args.layers, num_attention_heads=args.heads,
                        num_key_value_heads=args.kv_heads, sliding_window=None, tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = MistralForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    gen = torch.Generator().manual_seed(0)
    layers = list(model.model.layers)
    for part in (model.model.embed_tokens, *layers, model.model.norm, model.lm_head):  # named_parameters' order
        part.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in part.named_parameters():
                p.fill_(1.0) if name.endswith("norm.weight") or part is model.model.norm else p.normal_(
                    0.0, 0.02, generator=gen)
        if quantized and part in layers:
            quantize(part, quantized)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)  # its buffers were left empty on meta
    return model.eval()


def synthetic_readers(args, root: Path, n: int, dtype: str = "f32"):
    """n adapters of `scale`'s synthetic kind (q/k/v, r=16) for the synthetic model's shapes."""
    from benchmarks.scale import Shape, adapter_bytes, adapter_config
    from lorablend.adapter import AdapterReader

    shape = Shape(layers=args.layers, hidden=args.hidden, kv=args.hidden // args.heads * args.kv_heads)
    readers = []
    for i in range(n):
        d = root / f"synthetic-{i}"
        d.mkdir(parents=True)
        (d / "adapter_model.safetensors").write_bytes(adapter_bytes(shape, dtype, 0, i))
        (d / "adapter_config.json").write_bytes(adapter_config(shape))
        readers.append(AdapterReader(d))
    return readers


def peak_rss_gb() -> float:
    """The process's peak RSS since the last `reset_peak_rss` (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 2**20, 2)
    import resource  # not Linux: the peak of the whole process

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def reset_peak_rss() -> None:
    """Start a new peak RSS window (Linux: writing 5 to clear_refs resets VmHWM), so each phase reports its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def time_first_order(model, tok, examples, args, root: Path) -> dict:
    """The backward pass, then the scoring of `args.first_order` adapters written to `root` (CPU and wall s)."""
    from lorablend.runtime.scoring import FirstOrderScorer

    reset_peak_rss()
    cpu, wall = time.process_time(), time.perf_counter()
    modules = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(args.layers) for p in "qkv"]
    scorer = FirstOrderScorer(model, tok, modules, examples, tokens=args.grad_tokens)
    out = {"backward_cpu_s": round(time.process_time() - cpu, 3), "backward_wall_s": round(time.perf_counter() - wall, 3),
           "backward_peak_rss_gb": peak_rss_gb()}
    print(json.dumps(out), file=sys.stderr, flush=True)  # the phases take minutes at 7B: show each as it ends
    readers = synthetic_readers(args, root, args.first_order, "bf16")
    reset_peak_rss()
    cpu, wall = time.process_time(), time.perf_counter()
    scores = scorer.scores(readers)
    out.update(adapters=len(readers), scoring_cpu_s=round(time.process_time() - cpu, 3),
               scoring_wall_s=round(time.perf_counter() - wall, 3), scoring_peak_rss_gb=peak_rss_gb(),
               finite=bool(np.isfinite(scores).all()))
    return out


def time_training_step(model, tok, examples, args) -> dict:
    """One LoRA training step of the bank's recipe on 8 of the examples (no warm-up: a step is minutes at 7B)."""
    import random

    import torch

    from lorablend.runtime.models import target_loss
    from lorablend.runtime.prompts import training_pair
    from lorablend.runtime.train import TrainConfig, add_lora, batches

    cfg = TrainConfig(r=16, alpha=32.0, target_modules=("q_proj", "k_proj", "v_proj"), steps=1, batch_size=8)
    peft_model = add_lora(model, cfg, 0)
    if args.checkpointing:
        peft_model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=cfg.lr)
    (ids, labels, mask), = batches([training_pair(tok, e) for e in examples], cfg, random.Random(0), tok.pad_token_id or 0)
    reset_peak_rss()
    cpu, wall = time.process_time(), time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = target_loss(peft_model.get_base_model(), ids, mask, labels)
    loss.backward()
    opt.step()
    return {"train_step_cpu_s": round(time.process_time() - cpu, 3), "train_step_wall_s": round(time.perf_counter() - wall, 3),
            "train_step_peak_rss_gb": peak_rss_gb(), "train_tokens": int(mask.sum()), "checkpointing": args.checkpointing}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bank", default="default")
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--every", type=int, default=9, help="take every n-th bank entry")
    ap.add_argument("--k", type=int, default=16, help="train examples per pass")
    ap.add_argument("--candidates", type=int, default=4, help="candidates timed per task and mode")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--synthetic", action="store_true", help="also time a random model of the shapes below")
    ap.add_argument("--first-order", type=int, default=0, metavar="N",
                    help="with --synthetic: also time the backward pass, scoring N adapters and a training step")
    ap.add_argument("--grad-tokens", type=int, default=FIRST_ORDER_TOKENS,
                    help=f"padded tokens per backward slice (--first-order; default {FIRST_ORDER_TOKENS})")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the training step")
    for name, value in (("layers", 32), ("hidden", 4096), ("intermediate", 14336), ("heads", 32), ("kv-heads", 8)):
        ap.add_argument(f"--{name}", type=int, default=value, help=f"synthetic model (default {value}: Mistral-7B)")
    args = ap.parse_args(argv)

    import torch

    from lorablend.bank.combination import open_readers
    from lorablend.bank.manifest import Bank
    from lorablend.dataset import load_dataset
    from lorablend.runtime.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    bank = Bank.open(args.bank)
    tok, model = load_tokenizer(bank.manifest.base_model), load_model(bank.manifest.base_model).eval()
    readers = list(open_readers(bank, bank.names[:16]).values())
    tasks = bank.names[:: args.every][: args.tasks]
    examples = {t: load_dataset(bank.dataset_path(bank.entry(t)), name=t).split("train")[: args.k] for t in tasks}
    modes = ("shared",) if args.synthetic else ("whole", "shared")
    totals = {"shared": [], "whole": [], "synthetic": []}
    rows = []
    for task in tasks:
        row, losses = {"task": task}, {}
        for mode in modes:
            cpu, wall, losses[mode] = time_candidates(model, tok, readers, examples[task], mode == "shared",
                                                      args.candidates)
            row[f"{mode}_cpu_s"], row[f"{mode}_wall_s"] = round(cpu, 4), round(wall, 4)
            totals[mode].append(cpu)
        if not args.synthetic:
            row["max_abs_diff"] = round(float(np.abs(losses["whole"] - losses["shared"]).max()), 4)
            print(json.dumps(row), flush=True)
        rows.append(row)
    if args.synthetic:
        del model
        big = synthetic_model(args, len(tok))
        with tempfile.TemporaryDirectory() as tmp:
            fake = synthetic_readers(args, Path(tmp), args.candidates)
            for row in rows:
                cpu, wall, losses = time_candidates(big, tok, fake, examples[row["task"]], True, args.candidates)
                row.update(synthetic_cpu_s=round(cpu, 3), synthetic_wall_s=round(wall, 3),
                           synthetic_ratio=round(cpu / max(row["shared_cpu_s"], 1e-9), 1),
                           synthetic_loss=round(float(losses.mean()), 3))
                totals["synthetic"].append(cpu)
                if args.first_order and row is rows[0]:
                    row.update(synthetic_peak_rss_gb=peak_rss_gb(),  # the model's creation and the forward passes
                               **time_first_order(big, tok, examples[row["task"]], args, Path(tmp) / "bank"))
                print(json.dumps(row), flush=True)
            if args.first_order:
                first = rows[0]
                first.update(time_training_step(big, tok, examples[first["task"]], args))
                forward = first["synthetic_wall_s"]
                per = {"forward_wall_s": forward,
                       "backward_forwards": round(first["backward_wall_s"] / forward, 2),
                       "scoring_forwards": round(first["scoring_wall_s"] / forward, 2),
                       "grad_top1_wall_s": round(first["backward_wall_s"] + first["scoring_wall_s"], 3),
                       "grad_rerank8_wall_s": round(first["backward_wall_s"] + first["scoring_wall_s"] + 8 * forward, 3),
                       "rerank16_wall_s": round(16 * forward, 3),
                       "train32_wall_s": round(32 * first["train_step_wall_s"], 3)}
                per["train32_over_grad_rerank8"] = round(per["train32_wall_s"] / per["grad_rerank8_wall_s"], 2)
                per["train32_over_grad_top1"] = round(per["train32_wall_s"] / per["grad_top1_wall_s"], 2)
                print(json.dumps({**first, **per}), flush=True)
    summary = {"mean_cpu_s_per_candidate": {m: round(float(np.mean(v)), 4) for m, v in totals.items() if v}}
    if args.synthetic:
        summary["synthetic_ratio"] = round(float(np.mean(totals["synthetic"]) / max(np.mean(totals["shared"]), 1e-9)), 1)
        summary["synthetic_params"] = sum(p.numel() for p in big.parameters())
    else:
        summary["ratio"] = round(float(np.mean(totals["whole"]) / max(np.mean(totals["shared"]), 1e-9)), 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
