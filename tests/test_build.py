"""bank/build.py: `lorablend bank build` on the tiny model: manifest records, per-entry seeds, determinism,
resumption, atomic entries, family interleaving, the base model recorded by its hub id, a build on Ray equal to a
local one, and (marked `rebuild`, minutes) a default entry rebuilt from its committed dataset bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import make_dataset_file

from lorablend.bank.build import Task, build_bank, interleave_families, read_tasks, select_tasks
from lorablend.bank.manifest import Bank
from lorablend.errors import InputError
from lorablend.runtime.train import TrainConfig


CFG = TrainConfig(r=4, alpha=8.0, steps=3, batch_size=4, lr=5e-3, eval_examples=3)
TINY_ID = "lorablend-tests/tiny-llama"  # the hub id the tiny model's banks record


@pytest.fixture(scope="module")
def built(tiny_model_dir, task_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "bank"
    build_bank(str(tiny_model_dir), read_tasks([task_dir / "tasks.json"]), out, CFG, model_id=TINY_ID, threads=1)
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
    build_bank(str(tiny_model_dir), [Task("math", task_dir / "math.jsonl", "a")], again, CFG, model_id=TINY_ID,
               threads=1)
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
    build_bank(TINY_ID, tasks, root, CFG, threads=1)
    assert len(trained) == 1 and sorted(Bank.open(root).names) == ["animals", "math", "music", "weather"]
    for name in ("animals", "music", "math"):
        assert _weights(root, name) == _weights(built, name)


def test_an_interrupted_entry_leaves_nothing(tiny_model_dir, task_dir, tmp_path, monkeypatch):
    from lorablend.bank import build as train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_dataset", interrupted)  # after the adapter's files are in place
    root = tmp_path / "bank"
    with pytest.raises(KeyboardInterrupt):
        build_bank(str(tiny_model_dir), [Task("math", task_dir / "math.jsonl", "a")], root, CFG, model_id=TINY_ID)
    leftovers = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    assert not (root / "adapters" / "math").exists() and all(p == "bank.json" for p in leftovers), leftovers


def test_interleave_families_round_robin():
    tasks = [Task(n, Path(n), f) for n, f in (("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("c1", "c"))]
    assert [t.name for t in interleave_families(tasks)] == ["a1", "b1", "c1", "a2", "a3"]


def test_the_bank_and_its_adapters_record_the_hub_id_never_a_path(built, tiny_model_dir, task_dir, tmp_path):
    from lorablend.adapter import read_spec

    bank = Bank.open(built)
    assert bank.manifest.base_model == TINY_ID
    assert {read_spec(bank.adapter_path(e)).base_model for e in bank.entries} == {TINY_ID}
    unnamed = shutil.copytree(tiny_model_dir, tmp_path / "model")  # a local dir lorablend was never told the id of
    with pytest.raises(InputError, match="--model-id"):
        build_bank(str(unnamed), [Task("math", task_dir / "math.jsonl", "a")], tmp_path / "b", CFG)
    assert not (tmp_path / "b").exists()


def test_read_tasks_takes_a_bank_and_rebuilds_its_entries(built, tmp_path):
    tasks = read_tasks([built])
    assert [(t.name, t.family) for t in tasks] == [(e.name, e.family) for e in Bank.open(built).entries]
    again = tmp_path / "again"
    build_bank(TINY_ID, select_tasks(tasks, ["music"]), again, CFG, threads=1)
    assert _weights(again, "music") == _weights(built, "music")
    with pytest.raises(InputError, match="no task named 'nope'"):
        select_tasks(tasks, ["nope"])


def test_a_build_on_ray_gives_the_files_of_a_local_build(built, tmp_path):
    root = tmp_path / "ray"
    report = build_bank(TINY_ID, read_tasks([built]), root, CFG, executor="ray", threads=1)
    assert sorted(report.built) == ["animals", "math", "music"] and not report.failed
    local, remote = Bank.open(built), Bank.open(root)
    for e in local.entries:
        got = remote.entry(e.name)
        assert got.family == e.family and got.files == e.files  # adapter files and dataset, by sha256


def test_a_failed_ray_entry_is_listed_and_leaves_no_partial_entry(built, tmp_path):
    root = tmp_path / "ray"
    data = make_dataset_file(tmp_path / "weather.jsonl", "weather", n=20)
    tasks = [Task("weather", data, "c")]  # fails in the worker: the config targets a module the model lacks
    report = build_bank(TINY_ID, tasks, root, TrainConfig(r=4, alpha=8.0, steps=3, batch_size=4, lr=5e-3,
                                                          eval_examples=3, target_modules=("no_such_module",)),
                        executor="ray", threads=1)
    assert list(report.failed) == ["weather"] and "\n" not in report.failed["weather"]
    assert not (root / "adapters" / "weather").exists() and Bank.open(root).names == []


# One of the 10 entries trained with today's loss (the other 51 with transformers' `labels=` loss, whose floats round
# otherwise: docs/PERFORMANCE.md, "Training the default bank").
REBUILDABLE = "subtask015_mctaco_question_generation_frequency"


@pytest.mark.rebuild
def test_a_default_entry_rebuilt_from_its_committed_dataset_is_the_committed_one(smollm2_dir, tmp_path):
    """The route to the default bank now that the BIG-bench sdist is gone: its own datasets, its recorded recipe
    (bf16 autocast included, emulated where the CPU has no native bf16). The config comes back byte for byte. The
    weights cannot: the entry records no bf16 kernel kind, and AMX and AVX512-BF16 accumulate in other orders, which
    32 Adam steps carry on. So every module's update B·A must point the same way, cosine >= 0.998 (measured: 0.9988
    at the least, on an AMX machine against the AVX512-BF16 build). Bit-identity of a rebuild from a bank's own
    datasets on one machine is `test_read_tasks_takes_a_bank_and_rebuilds_its_entries`."""
    from dataclasses import fields

    import torch
    from safetensors.torch import load_file

    default = Bank.open("default")
    entry = default.entry(REBUILDABLE)
    recipe = {k: v for k, v in default.manifest.info["train"].items() if k in {f.name for f in fields(TrainConfig)}}
    cfg = TrainConfig(**{**recipe, "target_modules": tuple(recipe["target_modules"]), "eval_examples": 1})
    build_bank("smollm2", select_tasks(read_tasks(["default"]), [entry.name]), tmp_path / "bank", cfg)
    rebuilt = tmp_path / "bank" / entry.adapter_dir
    assert (rebuilt / "adapter_config.json").read_bytes() == (default.adapter_path(entry) / "adapter_config.json").read_bytes()
    ours, theirs = (load_file(str(d / "adapter_model.safetensors")) for d in (rebuilt, default.adapter_path(entry)))
    for key in [k for k in ours if "lora_A" in k]:
        b = key.replace("lora_A", "lora_B")
        cosine = torch.nn.functional.cosine_similarity((ours[b].float() @ ours[key].float()).flatten(),
                                                       (theirs[b].float() @ theirs[key].float()).flatten(), dim=0)
        assert cosine >= 0.998, (key, float(cosine))
