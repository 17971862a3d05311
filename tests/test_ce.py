"""ce.py: the first-order scorer against the loss it approximates (MixtureScorer, float32)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_bank, make_dataset_file
from lorablend.bank import Bank
from lorablend.dataset import load_dataset


@pytest.fixture(scope="module")
def mixed_bank(tmp_path_factory, tiny_model_dir):
    """Five adapters of ranks 2-8 and alphas 4-32: the scale s = alpha / r differs per adapter."""
    root = tmp_path_factory.mktemp("mixed") / "bank"
    return make_bank(root, tiny_model_dir, ranks={"math": 2, "code": 8}, alphas={"math": 4.0, "code": 32.0,
                                                                                   "music": 2.0})


@pytest.fixture
def user_dataset(tmp_path):
    return make_dataset_file(tmp_path / "mine.jsonl", "math", n=20, seed=7)


def _setup(bank_root, model_dir, user_dataset):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorablend.generate import open_readers

    bank = Bank.open(bank_root)
    readers = list(open_readers(bank, bank.names).values())
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return model, AutoTokenizer.from_pretrained(model_dir), readers, load_dataset(user_dataset).split("train")[:5]


def test_first_order_scores_equal_finite_differences_of_the_loss(mixed_bank, tiny_model_dir, user_dataset):
    from lorablend.ce import FirstOrderScorer, MixtureScorer

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
    from lorablend.ce import FirstOrderScorer

    model, tok, readers, examples = _setup(mixed_bank, tiny_model_dir, user_dataset)
    flags = [p.requires_grad for p in model.parameters()]
    runs = [FirstOrderScorer(model, tok, readers[0].modules, examples, bf16=False, share_prefix=share, tokens=tokens)
            .scores(readers) for share, tokens in ((True, 64), (False, 10_000), (True, 1), (True, 64))]
    for other in runs[1:3]:
        np.testing.assert_allclose(runs[0], other, rtol=1e-4, atol=1e-6)
    assert runs[0].tobytes() == runs[3].tobytes()
    assert [p.requires_grad for p in model.parameters()] == flags  # the model is left as it was found
    assert all(p.grad is None for p in model.parameters())
