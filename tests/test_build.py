"""bank/build.py: `lorablend bank build` on the tiny model: manifest records, per-entry seeds, determinism,
resumption, atomic entries, family interleaving."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import make_dataset_file

from lorablend.bank.build import Task, build_bank, interleave_families, read_tasks
from lorablend.bank.manifest import Bank
from lorablend.runtime.train import TrainConfig


CFG = TrainConfig(r=4, alpha=8.0, steps=3, batch_size=4, lr=5e-3, eval_examples=3)


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
    from lorablend.bank import build as train

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
    from lorablend.bank import build as train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_save_bf16", interrupted)
    root = tmp_path / "bank"
    with pytest.raises(KeyboardInterrupt):
        build_bank(str(tiny_model_dir), [Task("math", task_dir / "math.jsonl", "a")], root, CFG)
    leftovers = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    assert not (root / "adapters" / "math").exists() and all(p == "bank.json" for p in leftovers), leftovers


def test_interleave_families_round_robin():
    tasks = [Task(n, Path(n), f) for n, f in (("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("c1", "c"))]
    assert [t.name for t in interleave_families(tasks)] == ["a1", "b1", "c1", "a2", "a3"]
