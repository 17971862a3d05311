"""runtime/starts.py: each start gives the update it claims, and a base-shifting start's adapter applies to the
unchanged base model."""

from __future__ import annotations

import numpy as np
import pytest

from lorablend.runtime.train import TrainConfig

CFG = TrainConfig(r=4, alpha=8.0, batch_size=4, lr=1e-2, bf16_autocast=False, warmup=0, decay="constant")


def _setup(tiny_model_dir, task_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorablend.dataset import load_dataset

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir), load_dataset(task_dir / "math.jsonl").split("train")


def _start(model, tok, examples, start):
    """The factors (as an update of the original base) and the PEFT model right after the start."""
    from dataclasses import replace

    from lorablend.runtime.prompts import PromptFormat
    from lorablend.runtime.starts import lora_factors
    from lorablend.runtime.train import train_lora

    seen = {}
    peft_model, shift = train_lora(model, tok, examples, replace(CFG, steps=1, start=start), 0, PromptFormat(),
                                   at_step=lambda k, m, s: seen.setdefault(k, lora_factors(m, s)))
    return seen[0], peft_model, shift


def test_the_zero_start_is_no_update(tiny_model_dir, task_dir):
    model, tok, examples = _setup(tiny_model_dir, task_dir)
    factors, _, shift = _start(model, tok, examples, "zero")
    assert shift is None and all(np.count_nonzero(f.B) == 0 for f in factors.values())


@pytest.mark.parametrize("start", ["lora-ga", "pissa"])
def test_a_base_shifting_start_leaves_the_model_unchanged_and_its_update_zero(tiny_model_dir, task_dir, start):
    model, tok, examples = _setup(tiny_model_dir, task_dir)
    factors, peft_model, shift = _start(model, tok, examples, start)
    for name, f in factors.items():
        A0, B0, s = shift.initial[name]
        assert np.count_nonzero(B0) and np.count_nonzero(A0)  # a real start, not zero
        assert f.rank == 2 * CFG.r
        np.testing.assert_allclose(f.delta(), 0.0, atol=1e-6)  # s·(B·A − B0·A0) before any step
        W = peft_model.get_base_model().get_submodule(name).base_layer.weight.detach().numpy()
        np.testing.assert_allclose(W + s * B0 @ A0, shift.weights[name].numpy(), atol=1e-5)


def test_the_gradient_aligned_start_is_lora_ga_of_the_mean_gradient(tiny_model_dir, task_dir):
    """LoRA-GA's definition (arXiv 2407.05000, PEFT's defaults: direction ArB2r, stable scale γ = 16): A0 spans the
    top r right singular vectors of ∂L/∂W, B0 is the next r left ones times their singular values and out^¼/√γ.
    ∂L/∂W is computed here independently: the mean over the training batches of the first 16 examples."""
    import torch

    from lorablend.runtime.models import target_loss
    from lorablend.runtime.prompts import PromptFormat, pad_pairs, training_pair

    model, tok, examples = _setup(tiny_model_dir, task_dir)
    pairs = [training_pair(tok, e, PromptFormat()) for e in examples[:16]]
    name = "model.layers.0.self_attn.q_proj"
    W = model.get_submodule(name).weight
    grads = []
    for i in range(0, len(pairs), CFG.batch_size):
        ids, labels, mask = pad_pairs(pairs[i : i + CFG.batch_size], tok.pad_token_id)
        grads.append(torch.autograd.grad(target_loss(model, ids, mask, labels), W)[0])
    U, S, Vh = torch.linalg.svd(torch.stack(grads).mean(0).double())
    r = CFG.r
    _, _, shift = _start(model, tok, examples, "lora-ga")
    A0, B0, _ = (torch.from_numpy(x).double() if not isinstance(x, float) else x for x in shift.initial[name])
    np.testing.assert_allclose((A0.T @ A0).numpy(), (Vh[:r].T @ Vh[:r]).numpy(), atol=1e-3)
    want_B = U[:, r : 2 * r] * S[r : 2 * r] * (W.shape[0] ** 0.25 / 16 ** 0.5)
    np.testing.assert_allclose((B0 @ B0.T).numpy(), (want_B @ want_B.T).numpy(), atol=1e-3 * float(S[r] ** 2))


@pytest.mark.parametrize("start", ["lora-ga", "pissa"])
def test_the_written_adapter_on_the_original_base_gives_the_trained_models_outputs(tiny_model_dir, task_dir, tmp_path,
                                                                                    start):
    import torch
    from dataclasses import replace

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorablend.adapter import write_adapter
    from lorablend.runtime.train import train_factors

    model, tok, examples = _setup(tiny_model_dir, task_dir)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([tok("2 plus 3 is 5, 7 plus 1 is").input_ids])
    trained_logits = {}

    def keep(k, m, _shift):
        if k == 3:
            with torch.no_grad():
                trained_logits["x"] = m(input_ids=ids).logits
    factors, record = train_factors(model, tok, examples, 3, 0, cfg=replace(CFG, start=start), at_step=keep)
    assert record["from"] == start
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())  # the base is given back
    (tmp_path / "a").mkdir()
    write_adapter(tmp_path / "a", factors, str(tiny_model_dir), dtype="float32")
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "a")).eval()
    with torch.no_grad():
        got = fresh(input_ids=ids).logits
    assert (trained_logits["x"] - model(input_ids=ids).logits).abs().max() > 1e-3  # training moved the model
    torch.testing.assert_close(got, trained_logits["x"], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("start", ["zero", "lora-ga", "pissa"])
def test_training_from_each_start_is_bit_identical_across_reruns(tiny_model_dir, task_dir, start):
    from dataclasses import replace

    from lorablend.runtime.train import train_factors

    model, tok, examples = _setup(tiny_model_dir, task_dir)
    a, _ = train_factors(model, tok, examples, 2, 0, cfg=replace(CFG, start=start))
    b, _ = train_factors(model, tok, examples, 2, 0, cfg=replace(CFG, start=start))
    assert all(a[m].A.tobytes() == b[m].A.tobytes() and a[m].B.tobytes() == b[m].B.tobytes() for m in a)


def test_an_unknown_start_is_one_clear_error():
    from lorablend.errors import InputError
    from lorablend.runtime.starts import check_start

    with pytest.raises(InputError, match="one of zero, blend, lora-ga, pissa"):
        check_start("eva")
