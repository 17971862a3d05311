"""benchmarks/ce_cost.py: ce and first-order scoring cost, on the tiny bank and a synthetic model."""

import json

import numpy as np
import pytest

from lorablend.bank.manifest import Bank


def test_ce_cost_benchmark_runs(tiny_bank, capsys):
    """`python -m benchmarks.ce_cost` on the tiny bank: both modes timed, their losses agree."""
    from benchmarks.ce_cost import main

    main(["--bank", str(tiny_bank), "--tasks", "2", "--every", "2", "--k", "4", "--candidates", "2"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["task"] for r in rows[:-1]] == Bank.open(tiny_bank).names[::2][:2]
    assert all(r["shared_cpu_s"] >= 0 and r["whole_cpu_s"] >= 0 and r["max_abs_diff"] < 0.05 for r in rows[:-1]), rows
    assert rows[-1]["ratio"] > 0


def test_ce_cost_benchmark_times_a_synthetic_model(tiny_bank, capsys):
    """`--synthetic`: the same examples through a random Mistral-architecture model with q/k/v adapters."""
    from benchmarks.ce_cost import main

    main(["--bank", str(tiny_bank), "--tasks", "1", "--k", "4", "--candidates", "2", "--synthetic", "--layers", "2",
          "--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2"])
    row, summary = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["task"] == Bank.open(tiny_bank).names[0] and "whole_cpu_s" not in row
    assert row["synthetic_cpu_s"] >= 0 and np.isfinite(row["synthetic_loss"]) and row["synthetic_loss"] > 0
    from lorablend.runtime.models import load_tokenizer

    vocab = len(load_tokenizer(Bank.open(tiny_bank).manifest.base_model))  # q, o 64x64; k, v 64x32; MLP 3 x 64x128
    assert summary["synthetic_params"] == 2 * vocab * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64


@pytest.mark.parametrize("checkpointing", [[], ["--checkpointing"]], ids=["plain", "checkpointing"])
def test_ce_cost_benchmark_times_first_order_scoring_and_a_training_step(tiny_bank, capsys, checkpointing):
    from benchmarks.ce_cost import main

    main(["--bank", str(tiny_bank), "--tasks", "1", "--k", "8", "--candidates", "1", "--synthetic", "--layers", "2",
          "--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2", "--first-order", "5",
          "--grad-tokens", "64"] + checkpointing)
    row, last, _summary = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["adapters"] == 5 and row["finite"] and row["backward_peak_rss_gb"] > 0
    assert last["train_tokens"] > 0 and last["checkpointing"] == bool(checkpointing)
    assert last["grad_rerank8_wall_s"] >= last["grad_top1_wall_s"] > 0 and last["train32_over_grad_rerank8"] > 0
