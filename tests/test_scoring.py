"""runtime/scoring.py: the first-order scorer against the loss it approximates (MixtureScorer, float32), the
hooked mixture against the PEFT model, the shared prompt prefix, fit; and runtime/models.target_loss."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import dequantize, make_bank

from lorablend.bank.manifest import Bank
from lorablend.dataset import load_dataset
from lorablend.generate import generate
from lorablend.settings import Setting


@pytest.fixture(scope="module")
def mixed_bank(tmp_path_factory, tiny_model_dir):
    """Five adapters of ranks 2-8 and alphas 4-32: the scale s = alpha / r differs per adapter."""
    root = tmp_path_factory.mktemp("mixed") / "bank"
    return make_bank(root, tiny_model_dir, ranks={"math": 2, "code": 8}, alphas={"math": 4.0, "code": 32.0,
                                                                                   "music": 2.0})


def _setup(bank_root, model_dir, user_dataset):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorablend.bank.combination import open_readers

    bank = Bank.open(bank_root)
    readers = list(open_readers(bank, bank.names).values())
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return model, AutoTokenizer.from_pretrained(model_dir), readers, load_dataset(user_dataset).split("train")[:5]


def test_first_order_scores_equal_finite_differences_of_the_loss(mixed_bank, tiny_model_dir, user_dataset):
    from lorablend.runtime.scoring import FirstOrderScorer, MixtureScorer

    model, tok, readers, examples = _setup(mixed_bank, tiny_model_dir, user_dataset)
    assert len({r.spec.r for r in readers}) > 1 and len({r.spec.alpha for r in readers}) > 1
    scores = FirstOrderScorer(model, tok, readers[0].modules, examples, bf16=False, tokens=64).scores(readers)
    mix = MixtureScorer(model, tok, readers, examples, bf16=False)
    eps, n = 1e-3, len(readers)
    fd = np.array([(mix.loss(eps * np.eye(n)[i]) - mix.loss(-eps * np.eye(n)[i])) / (2 * eps) for i in range(n)])
    mix.close()
    assert np.abs(fd).min() > 1e-3  # every adapter moves the loss: the comparison has something to compare
    np.testing.assert_allclose(scores, fd, rtol=2e-2, atol=2e-4)


def test_first_order_scores_do_not_depend_on_prefix_sharing_or_batching_and_are_deterministic(
        mixed_bank, tiny_model_dir, user_dataset):
    from lorablend.runtime.scoring import FirstOrderScorer

    model, tok, readers, examples = _setup(mixed_bank, tiny_model_dir, user_dataset)
    flags = [p.requires_grad for p in model.parameters()]
    runs = [FirstOrderScorer(model, tok, readers[0].modules, examples, bf16=False, share_prefix=share, tokens=tokens)
            .scores(readers) for share, tokens in ((True, 64), (False, 10_000), (True, 1), (True, 64))]
    for other in runs[1:3]:
        np.testing.assert_allclose(runs[0], other, rtol=1e-4, atol=1e-6)
    assert runs[0].tobytes() == runs[3].tobytes()
    assert [p.requires_grad for p in model.parameters()] == flags  # the model is left as it was found
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kind", ("int8", "nf4"))
def test_first_order_scores_over_a_quantized_base_are_those_of_its_dequantized_weights(
        mixed_bank, tiny_model_dir, user_dataset, kind):
    """Over bitsandbytes layers the weights take no gradient: the hooks' sum of δ xᵀ stands in for it."""
    import copy

    import torch

    from lorablend.runtime import quantized
    from lorablend.runtime.scoring import FirstOrderScorer

    model, tok, readers, examples = _setup(mixed_bank, tiny_model_dir, user_dataset)
    q = quantized.quantize(copy.deepcopy(model), kind, dtype=torch.float32)
    ref = copy.deepcopy(q)
    dequantize(ref)
    modules = readers[0].modules
    got, want = (FirstOrderScorer(m, tok, modules, examples, bf16=False, tokens=64) for m in (q, ref))
    for m in modules:
        assert not q.get_submodule(m).weight.is_floating_point()  # the hooked path ran
        g, w = got.gradients[m].numpy(), want.gradients[m].numpy()
        assert np.linalg.norm(g - w) <= 1e-4 * np.linalg.norm(w), m
        assert not q.get_submodule(m)._forward_hooks  # the hooks are gone
    np.testing.assert_allclose(got.scores(readers), want.scores(readers), rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- #
# MixtureScorer: the hooked mixture, its shared prefix, fit; and target_loss
# --------------------------------------------------------------------------- #


def test_mixture_scorer_hooks_equal_the_cat_adapter(tiny_bank, tiny_model_dir, user_dataset, tmp_path):
    """The hook-based mixture is exactly base + cat adapter: its loss equals the PEFT model's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorablend.bank.combination import open_readers
    from lorablend.runtime.scoring import MixtureScorer

    bank = Bank.open(tiny_bank)
    ds = load_dataset(user_dataset)
    res = generate(bank, ds, tmp_path / "o", Setting(combine="cat"))
    w = np.array([res.provenance.coefficients[n] for n in bank.names])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    scorer = MixtureScorer(model, tok, list(open_readers(bank, bank.names).values()), ds.split("train")[:4], bf16=False)
    hooked = scorer.loss(w)
    scorer.close()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(res.out)).eval()
    ref = MixtureScorer(peft_model.base_model.model, tok, list(open_readers(bank, bank.names[:1]).values()),
                        ds.split("train")[:4], bf16=False).loss(np.zeros(1))
    assert abs(hooked - ref) < 1e-5
    assert abs(scorer.loss(np.zeros(len(w))) - hooked) > 1e-6  # the adapters do change the loss


def test_fit_searches_only_the_weighed_candidates_within_its_budget(tiny_bank, tiny_model_dir, user_dataset):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorablend.bank.combination import open_readers
    from lorablend.runtime.scoring import MixtureScorer

    bank = Bank.open(tiny_bank)
    scorer = MixtureScorer(AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir),
                           list(open_readers(bank, bank.names).values()), load_dataset(user_dataset).split("train")[:4])
    init = np.array([0.5, 0.0, 0.3, 0.0, 0.2])
    w = scorer.fit(init, budget=10, penalty=0.0)
    assert scorer.evaluations <= 10 and w[[1, 3]].tolist() == [0.0, 0.0] and abs(w.sum() - 1) < 1e-9
    assert scorer.loss(w) <= scorer.loss(init)  # Nelder–Mead keeps the best point, the start included
    before = scorer.evaluations
    assert scorer.fit(np.array([0.0, 0.0, 1.0, 0.0, 0.0])).tolist() == [0, 0, 1, 0, 0]  # one candidate: nothing to search
    assert scorer.evaluations == before


def test_mixture_scorer_runs_the_shared_prompt_prefix_once_and_exactly(tiny_bank, tiny_model_dir, user_dataset):
    """The scorer runs the examples' common prefix once and the suffixes on its KV cache: the loss equals
    the model's own label loss on the full, unshared prompts, with and without adapters."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorablend.bank.combination import open_readers
    from lorablend.runtime.prompts import training_pair
    from lorablend.runtime.scoring import MixtureScorer

    bank = Bank.open(tiny_bank)
    examples = load_dataset(user_dataset).split("train")[:5]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    scorer = MixtureScorer(model, tok, list(open_readers(bank, bank.names).values()), examples, bf16=False)
    assert scorer._batch.prefix is not None and scorer._batch.prefix.shape[1] >= 3
    pairs = [training_pair(tok, e) for e in examples]
    width = max(len(ids) for ids, _ in pairs)
    ids = torch.tensor([p + [0] * (width - len(p)) for p, _ in pairs])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p, _ in pairs])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in pairs])
    for w in (np.zeros(len(bank.names)), np.full(len(bank.names), 1 / len(bank.names)), np.eye(len(bank.names))[2]):
        shared = scorer.loss(w)  # leaves the hooks on with these weights for the reference pass
        with torch.inference_mode():
            full = float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
        assert abs(shared - full) < 1e-5, (w, shared, full)
    scorer.close()


def test_target_loss_equals_the_models_label_loss_and_gradients(tiny_model_dir, user_dataset):
    """Training's loss projects only the target positions onto the vocabulary: same value and LoRA gradients as
    transformers' `labels=` loss over every position."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorablend.runtime.models import target_loss
    from lorablend.runtime.prompts import training_pair

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pairs = [training_pair(tok, e) for e in load_dataset(user_dataset).split("train")[:4]]
    width = max(len(p) for p, _ in pairs)
    ids = torch.tensor([p + [0] * (width - len(p)) for p, _ in pairs])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p, _ in pairs])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in pairs])
    lora = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for loss_of in (lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss,
                    lambda: target_loss(model.get_base_model(), ids, mask, labels)):
        model.zero_grad()
        loss = loss_of()
        loss.backward()
        grads.append((float(loss), [p.grad.clone() for p in lora]))
    assert abs(grads[0][0] - grads[1][0]) < 1e-5
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads[1][1])
