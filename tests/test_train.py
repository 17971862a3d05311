"""`lorablend bank build` on the tiny model: manifest records, per-entry seeds, determinism, resumption,
atomic entries, family interleaving, and that training lowers the loss."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_dataset_file

from lorablend.bank import Bank
from lorablend.train import Task, TrainConfig, build_bank, interleave_families, read_tasks

CFG = TrainConfig(r=4, alpha=8.0, steps=3, batch_size=4, lr=5e-3, eval_examples=3)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Three tasks in a tasks.json list, as `lorablend data bigbench` writes it."""
    root = tmp_path_factory.mktemp("tasks")
    listed = []
    for topic, family in (("animals", "a"), ("math", "a"), ("music", "b")):
        make_dataset_file(root / f"{topic}.jsonl", topic, n=20)
        listed.append({"name": topic, "family": family, "path": f"{topic}.jsonl"})
    (root / "tasks.json").write_text(json.dumps(listed))
    return root


@pytest.fixture(scope="module")
def built(tiny_model_dir, task_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "bank"
    build_bank(str(tiny_model_dir), read_tasks([task_dir / "tasks.json"]), out, CFG)
    return out


def _weights(bank_root: Path, name: str) -> bytes:
    return (bank_root / "adapters" / name / "adapter_model.safetensors").read_bytes()


def test_manifest_records_each_entry(built):
    from safetensors import safe_open

    bank = Bank.open(built)
    assert sorted(bank.names) == ["animals", "math", "music"]
    assert bank.manifest.info["train"]["steps"] == 3
    seeds = set()
    for e in bank.entries:
        info = e.info
        assert info["steps"] == 3 and info["train_seconds"] >= 0 and 1 <= info["eval_examples"] <= 3  # 0.0 s on a fast CPU
        assert 0 <= info["own_rouge_l"] <= 1 and 0 <= info["base_rouge_l"] <= 1
        seeds.add(info["seed"])
        with safe_open(str(bank.adapter_path(e) / "adapter_model.safetensors"), "pt") as f:
            assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}
        assert bank.dataset_path(e).is_file()
    assert len(seeds) == 3  # one seed per entry, derived from its name
    assert len({_weights(built, n) for n in bank.names}) == 3


def test_same_task_and_seed_give_a_bit_identical_adapter(tiny_model_dir, task_dir, built, tmp_path):
    again = tmp_path / "again"
    build_bank(str(tiny_model_dir), [Task("math", task_dir / "math.jsonl", "a")], again, CFG)
    assert _weights(again, "math") == _weights(built, "math")


def test_resume_skips_finished_entries_and_trains_new_ones(tiny_model_dir, task_dir, built, tmp_path, monkeypatch):
    from lorablend import train

    root = tmp_path / "bank"
    shutil.copytree(built, root)
    trained = []
    real = train.train_lora
    monkeypatch.setattr(train, "train_lora", lambda *a, **k: trained.append(1) or real(*a, **k))
    make_dataset_file(tmp_path / "weather.jsonl", "weather", n=20)
    tasks = read_tasks([task_dir / "tasks.json"]) + [Task("weather", tmp_path / "weather.jsonl", "c")]
    build_bank(str(tiny_model_dir), tasks, root, CFG)
    assert len(trained) == 1 and sorted(Bank.open(root).names) == ["animals", "math", "music", "weather"]
    for name in ("animals", "music", "math"):
        assert _weights(root, name) == _weights(built, name)


def test_an_interrupted_entry_leaves_nothing(tiny_model_dir, task_dir, tmp_path, monkeypatch):
    from lorablend import train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_save_bf16", interrupted)
    root = tmp_path / "bank"
    with pytest.raises(KeyboardInterrupt):
        build_bank(str(tiny_model_dir), [Task("math", task_dir / "math.jsonl", "a")], root, CFG)
    leftovers = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    assert not (root / "adapters" / "math").exists() and all(p == "bank.json" for p in leftovers), leftovers


def test_training_lowers_the_loss(tiny_model_dir, task_dir):
    from lorablend.dataset import load_dataset
    from lorablend.models import load_model, load_tokenizer
    from lorablend.prompts import PromptFormat
    from lorablend.train import train_lora

    losses = []
    examples = load_dataset(task_dir / "math.jsonl").split("train")
    cfg = TrainConfig(r=4, alpha=8.0, steps=12, batch_size=4, lr=2e-2, bf16_autocast=False)
    train_lora(load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), examples, cfg, 0, PromptFormat(),
               losses.append)
    assert len(losses) == 12
    assert sum(losses[-3:]) < 0.97 * sum(losses[:3]), losses  # 5.88 -> 5.52 with this seed


def test_interleave_families_round_robin():
    tasks = [Task(n, Path(n), f) for n, f in (("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("c1", "c"))]
    assert [t.name for t in interleave_families(tasks)] == ["a1", "b1", "c1", "a2", "a3"]


def test_train_step_benchmark_runs(tiny_model_dir, task_dir, capsys):
    """`python -m lorablend.benchmarks.train_step` on the tiny model: both losses agree on the first step."""
    from lorablend.benchmarks.train_step import main

    main(["--task", str(task_dir / "math.jsonl"), "--model", str(tiny_model_dir), "--steps", "1", "--threads", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["mode"] for r in rows[:2]] == ["labels", "target_loss"]
    assert abs(rows[0]["first_loss"] - rows[1]["first_loss"]) < 0.05  # bf16 autocast: close, not equal
    assert all(r["peak_rss_gb"] > 0 and r["cpu_s_per_step"] >= 0 for r in rows[:2]) and "rss_ratio" in rows[2]


# --------------------------------------------------------------------------- #
# Training from a blend (generate --refine-steps, the bench's refine/K)
# --------------------------------------------------------------------------- #


def _blend(tiny_bank):
    from lorablend.bank import Bank
    from lorablend.generate import combination

    bank = Bank.open(tiny_bank)
    return bank, combination(bank, {"math": 0.6, "code": 0.4, **{n: 0.0 for n in ("animals", "weather", "music")}},
                             "svd")


def test_a_lora_started_from_a_blend_holds_exactly_its_update(tiny_bank, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lorablend.train import TrainConfig, add_lora, lora_factors, refine_config, start_from

    _, blend = _blend(tiny_bank)
    cfg = refine_config(blend, TrainConfig())
    assert cfg.r == max(f.rank for f in blend.values()) and cfg.alpha / cfg.r == TrainConfig().alpha / TrainConfig().r
    peft_model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg, 0)
    start_from(peft_model, blend)
    got = lora_factors(peft_model)
    assert set(got) == set(blend)
    for m, f in blend.items():
        np.testing.assert_allclose(got[m].delta(), f.delta(), rtol=1e-5, atol=1e-7)


def test_refinement_is_deterministic_and_moves_from_the_blend(tiny_bank, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorablend.dataset import load_dataset
    from lorablend.train import train_factors

    bank, blend = _blend(tiny_bank)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = load_dataset(bank.dataset_path(bank.entry("music")), name="music").split("train")[:8]
    runs = [train_factors(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tok, examples, 3, 0, blend)
            for _ in range(2)]
    (a, rec), (b, _) = runs
    assert all(a[m].A.tobytes() == b[m].A.tobytes() and a[m].B.tobytes() == b[m].B.tobytes() for m in a)
    assert rec["steps"] == 3 and rec["from"] == "blend" and len(rec["losses"]) == 3
    moved = max(float(np.abs(a[m].delta() - blend[m].delta()).max()) for m in a)
    assert moved > 1e-6


def test_generate_refine_steps_trains_on_train_examples_only(tiny_bank, tmp_path, monkeypatch):
    import json

    from conftest import make_dataset_file
    from lorablend import train
    from lorablend.bank import Bank
    from lorablend.dataset import load_dataset
    from lorablend.generate import Setting, generate

    seen = []
    real = train.train_lora

    def spy(model, tokenizer, examples, *a, **kw):
        seen.extend(examples)
        return real(model, tokenizer, examples, *a, **kw)

    monkeypatch.setattr(train, "train_lora", spy)
    ds = load_dataset(make_dataset_file(tmp_path / "mine.jsonl", "math", n=40, seed=4))
    ds.splits.pop("valid", None)
    setting = Setting(sketch="target-tokens", metric="js", top_k=1, rerank=3, combine="cat")
    res = generate(Bank.open(tiny_bank), ds, tmp_path / "o", setting, validate=True, backend="torch", refine_steps=2)
    held = [ds.split("train")[i] for i in res.verdict.examples["indices"]]
    assert seen and not set(seen) & set(held)
    saved = json.loads((res.out / "lorablend.json").read_text())
    assert saved["refinement"]["steps"] == 2 and len(saved["refinement"]["losses"]) == 2
    plain = generate(Bank.open(tiny_bank), ds, tmp_path / "p", setting, validate=True, backend="torch")
    assert json.loads((plain.out / "lorablend.json").read_text())["refinement"] is None
    zero = generate(Bank.open(tiny_bank), ds, tmp_path / "z", setting, validate=True, backend="torch", refine_steps=0)
    assert (zero.out / "adapter_model.safetensors").read_bytes() == (plain.out / "adapter_model.safetensors").read_bytes()
    again = generate(Bank.open(tiny_bank), ds, tmp_path / "q", setting, validate=True, backend="torch", refine_steps=2)
    assert (again.out / "adapter_model.safetensors").read_bytes() == (res.out / "adapter_model.safetensors").read_bytes()
    assert (again.out / "lorablend.json").read_bytes() == (res.out / "lorablend.json").read_bytes()
