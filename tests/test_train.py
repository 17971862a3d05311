"""runtime/train.py: LoRA training steps lower the loss; training from a blend (generate --refine-steps)."""

from __future__ import annotations

import numpy as np
import pytest

from lorablend.runtime.train import TrainConfig


def test_training_lowers_the_loss(tiny_model_dir, task_dir):
    from lorablend.dataset import load_dataset
    from lorablend.runtime.models import load_model, load_tokenizer
    from lorablend.runtime.prompts import PromptFormat
    from lorablend.runtime.train import train_lora

    losses = []
    examples = load_dataset(task_dir / "math.jsonl").split("train")
    cfg = TrainConfig(r=4, alpha=8.0, steps=12, batch_size=4, lr=2e-2, bf16_autocast=False)
    train_lora(load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), examples, cfg, 0, PromptFormat(),
               losses.append)
    assert len(losses) == 12
    assert sum(losses[-3:]) < 0.97 * sum(losses[:3]), losses  # 5.88 -> 5.52 with this seed


# --------------------------------------------------------------------------- #
# Training from a blend (generate --refine-steps, the bench's refine/K)
# --------------------------------------------------------------------------- #


def _blend(tiny_bank):
    from lorablend.bank.combination import combination
    from lorablend.bank.manifest import Bank

    bank = Bank.open(tiny_bank)
    return bank, combination(bank, {"math": 0.6, "code": 0.4, **{n: 0.0 for n in ("animals", "weather", "music")}},
                             "svd")


def test_a_lora_started_from_a_blend_holds_exactly_its_update(tiny_bank, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lorablend.runtime.starts import lora_factors, start_from
    from lorablend.runtime.train import TrainConfig, add_lora, refine_config

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
    from lorablend.runtime.train import train_factors

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

    from lorablend.bank.manifest import Bank
    from lorablend.dataset import load_dataset
    from lorablend.generate import generate
    from lorablend.runtime import train
    from lorablend.settings import Setting

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


@pytest.mark.parametrize("native", [True, False])
def test_the_recipe_uses_bf16_only_where_the_cpu_computes_it(monkeypatch, native):
    from lorablend.runtime import train

    monkeypatch.setattr(train, "native_bf16", lambda: native)
    assert train.TrainConfig().resolved().bf16_autocast is native
    assert train.TrainConfig().to_dict()["bf16_autocast"] is native  # what bank.json and bench records keep
    assert train.TrainConfig(bf16_autocast=True).resolved().bf16_autocast is True  # an explicit choice stands
