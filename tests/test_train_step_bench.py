"""benchmarks/train_step.py: one training step, transformers' loss against target_loss, on the tiny model."""

import json


def test_train_step_benchmark_runs(tiny_model_dir, task_dir, capsys):
    """`python -m benchmarks.train_step` on the tiny model: both losses agree on the first step."""
    from benchmarks.train_step import main

    main(["--task", str(task_dir / "math.jsonl"), "--model", str(tiny_model_dir), "--steps", "1", "--threads", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["mode"] for r in rows[:2]] == ["labels", "target_loss"]
    assert abs(rows[0]["first_loss"] - rows[1]["first_loss"]) < 0.05  # bf16 autocast: close, not equal
    assert all(r["peak_rss_gb"] > 0 and r["cpu_s_per_step"] >= 0 for r in rows[:2]) and "rss_ratio" in rows[2]


def test_train_step_benchmark_compares_precisions(tiny_model_dir, task_dir, capsys):
    """`--pair precision`: the same step under bf16 autocast and in fp32, with their ratio."""
    from benchmarks.train_step import main

    main(["--task", str(task_dir / "math.jsonl"), "--model", str(tiny_model_dir), "--steps", "1", "--threads", "1",
          "--pair", "precision"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["mode"] for r in rows[:2]] == ["target_loss", "fp32"]
    assert abs(rows[0]["first_loss"] - rows[1]["first_loss"]) < 0.05 and rows[0]["first_loss"] != rows[1]["first_loss"]
    assert rows[2]["cpu_ratio"] > 0
