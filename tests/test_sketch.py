"""sketch.py: token histograms of a dataset, the bank's cached index, distances to the bank."""

import shutil

import numpy as np
from conftest import make_dataset_file

from lorablend.bank.manifest import Bank
from lorablend.dataset import load_dataset
from lorablend.runtime.models import load_tokenizer
from lorablend.sketch import build_index, distances_to_bank, load_sketches, query_sketch, token_counts


def test_token_counts_sum_to_the_number_of_tokens(tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    examples = load_dataset(make_dataset_file(tmp_path / "d.jsonl", "code", n=12)).split("train")
    ids = [tok(f"{e.input} {e.target}", add_special_tokens=False)["input_ids"] for e in examples]
    counts = token_counts(tok, examples)
    assert counts.shape == (len(tok),) and counts.sum() == sum(map(len, ids))
    assert all(counts[t] >= 1 for row in ids for t in row)
    target = token_counts(tok, examples, target_only=True)
    assert target.sum() == sum(len(tok(e.target, add_special_tokens=False)["input_ids"]) for e in examples)


def test_build_index_is_deterministic_and_holds_each_entrys_token_counts(tiny_bank, tmp_path):
    root = tmp_path / "bank"
    shutil.copytree(tiny_bank, root)
    shutil.rmtree(root / "index")
    bank = Bank.open(root)
    build_index(bank, ("tokens", "target-tokens"))
    tok = load_tokenizer(bank.manifest.tokenizer)
    for kind in ("tokens", "target-tokens"):
        _, again = load_sketches(bank, kind)
        _, first = load_sketches(Bank.open(tiny_bank), kind)
        assert again.names == first.names == bank.names
        assert again.counts.shape == first.counts.shape and (again.counts != first.counts).nnz == 0
        for i, e in enumerate(bank.entries):
            train = load_dataset(bank.dataset_path(e), name=e.name).split("train")
            want = token_counts(tok, train, target_only=kind == "target-tokens")
            np.testing.assert_array_equal(again.counts[i].toarray().ravel(), want)


def test_an_entrys_own_dataset_is_nearest_to_its_own_sketch(tiny_bank):
    bank = Bank.open(tiny_bank)
    _, sk = load_sketches(bank, "tokens")
    for name in bank.names:
        ds = load_dataset(bank.dataset_path(bank.entry(name)), name=name)
        d = distances_to_bank(sk, "js", query_sketch(bank, "tokens", ds))
        assert d.shape == (len(bank.names),) and int(np.argmin(d)) == bank.names.index(name)
        assert d[bank.names.index(name)] < 1e-6 < np.delete(d, bank.names.index(name)).min()
