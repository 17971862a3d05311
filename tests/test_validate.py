"""validate.py: the held-out slice, the candidates, the verdict, through `generate` and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_dataset_file

from lorablend.bank.manifest import Bank
from lorablend.dataset import load_dataset
from lorablend.errors import NoGain
from lorablend.generate import generate
from lorablend.settings import Setting
from lorablend.validate import NO_ADAPTER, Candidate, answers_key, choose, split_validation

MODEL_AWARE = Setting(sketch="target-tokens", metric="js", top_k=1, rerank=3, combine="cat")
LABEL_FREE = Setting(sketch="target-tokens", metric="js", top_k=1, combine="cat")


def _plain(tmp_path, n=40, split=False):
    """A dataset file of n examples; with `split`, 8 of them marked valid."""
    path = make_dataset_file(tmp_path / "raw.jsonl", "math", n=n, seed=3)
    if split:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for i, r in enumerate(rows):
            r["split"] = "valid" if i < 8 else "train"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_dataset(path)


def test_the_validation_slice_is_the_valid_split_when_there_is_one(tmp_path):
    ds = _plain(tmp_path, split=True)
    kept, held, where = split_validation(ds)
    assert where["split"] == "valid" and held == ds.split("valid") and kept.split("train") == ds.split("train")


def test_a_slice_of_train_is_removed_from_what_the_setting_sees(tmp_path):
    ds = _plain(tmp_path)
    ds.splits.pop("valid", None)
    kept, held, where = split_validation(ds, seed=1)
    train = ds.split("train")
    assert where["split"] == "train" and len(held) == min(32, len(train) // 2) == len(where["indices"])
    assert [train[i] for i in where["indices"]] == held
    assert not set(held) & set(kept.split("train")) and len(held) + len(kept.split("train")) == len(train)
    assert split_validation(ds, seed=1)[2] == where and split_validation(ds, seed=2)[2] != where  # seeded


def test_choose_keeps_the_best_and_writes_the_best_adapter_when_no_adapter_wins(tmp_path):
    examples = _plain(tmp_path).split("train")[:6]
    right = [e.target for e in examples]
    answers = {"a": ["nothing"] * 6, "b": right[:3] + ["x"] * 3, NO_ADAPTER: right}
    cands = [Candidate("a", "s/a", {"e1": 1.0}), Candidate("b", "s/b", {"e2": 1.0}), Candidate(NO_ADAPTER, "", None)]
    v = choose(cands, lambda c: answers[c.name], examples, {"split": "valid"}, uncertain=False, backend="torch")
    assert v.chosen == NO_ADAPTER and v.written == "b" and not v.helps and v.base == 1.0
    assert v.gain[0] == pytest.approx(v.scores["b"] - 1.0) and v.gain[1] <= v.gain[0] <= v.gain[2] < 0
    answers["a"] = right
    v = choose(cands, lambda c: answers[c.name], examples, {"split": "valid"}, uncertain=False, backend="torch")
    assert v.chosen == NO_ADAPTER and v.written == "a" and v.gain[0] == 0.0 and not v.helps  # a tie: no gain


def test_answers_key_tells_adapters_and_examples_apart(tmp_path):
    from lorablend.combine import Factors

    examples = _plain(tmp_path).split("train")[:4]
    f = {"m": Factors(np.ones((2, 3), np.float32), np.ones((4, 2), np.float32), 2.0)}
    g = {"m": Factors(np.ones((2, 3), np.float32), np.full((4, 2), 1.5, np.float32), 2.0)}

    def key(c, e=examples):
        return answers_key(c, "model", e, 8, "cat", None, "torch")

    trained = Candidate("trained", "", None, f)
    assert key(trained) == key(Candidate("another name", "", None, f))  # the adapter, not its name
    assert len({key(trained), key(Candidate("trained", "", None, g)), key(Candidate(NO_ADAPTER, "", None))}) == 3
    assert key(Candidate("a", "", {"x": 0.5, "y": 0.5, "z": 0.0})) == key(Candidate("b", "", {"y": 0.5, "x": 0.5}))
    assert key(trained) != key(trained, examples[:3]) and key(trained) != answers_key(trained, "model", examples, 9,
                                                                                     "cat", None, "torch")


def test_validations_of_the_same_examples_share_their_answers(tiny_bank, tmp_path, monkeypatch):
    from lorablend.runtime import evaluate

    calls, real = [], evaluate.answers_with
    monkeypatch.setattr(evaluate, "answers_with", lambda model, name, *a, **kw: calls.append(name) or real(
        model, name, *a, **kw))
    ds, bank, answered = _plain(tmp_path), Bank.open(tiny_bank), {}
    ds.splits.pop("valid", None)
    first = generate(bank, ds, tmp_path / "a", LABEL_FREE, validate=True, backend="torch", answered=answered).verdict
    n = len(calls)
    again = generate(bank, ds, tmp_path / "b", LABEL_FREE, validate=True, backend="torch", answered=answered).verdict
    assert n == len(first.scores) and len(calls) == n  # nothing answered twice
    assert (again.scores, again.written, again.seconds) == (first.scores, first.written, first.seconds)
    assert not first.reused and set(again.reused) == set(first.scores)
    other = generate(bank, ds, tmp_path / "c", LABEL_FREE, validate=True, backend="torch", seed=1,
                     answered=answered).verdict
    assert other.examples["indices"] != first.examples["indices"]
    assert len(calls) == n + len(other.scores) and not other.reused  # other held-out examples: all answered anew


@pytest.fixture
def scored_examples(monkeypatch):
    """The examples every MixtureScorer (ce, rerank) was given."""
    from lorablend.runtime.scoring import MixtureScorer

    seen = []
    real = MixtureScorer.__init__

    def init(self, model, tokenizer, readers, examples, *a, **kw):
        seen.extend(examples)
        real(self, model, tokenizer, readers, examples, *a, **kw)

    monkeypatch.setattr(MixtureScorer, "__init__", init)
    return seen


def test_generate_validates_on_examples_the_setting_never_saw(tiny_bank, tmp_path, scored_examples):
    ds = _plain(tmp_path)
    ds.splits.pop("valid", None)
    res = generate(Bank.open(tiny_bank), ds, tmp_path / "o", MODEL_AWARE, validate=True, backend="torch")
    v = res.verdict
    held = [ds.split("train")[i] for i in v.examples["indices"]]
    assert scored_examples and not set(scored_examples) & set(held)
    assert set(v.scores) >= {"setting's pick", NO_ADAPTER} and v.written in v.scores and v.n == len(held)
    saved = json.loads((res.out / "lorablend.json").read_text())["validation"]
    assert saved["scores"] == v.scores and saved["examples"]["indices"] == v.examples["indices"]
    assert saved["written"] == v.written and "seconds" not in saved
    written = {n: w for n, w in res.provenance.coefficients.items() if w > 0}
    assert sum(written.values()) == pytest.approx(1.0)


def test_no_adapter_wins_when_every_candidate_is_worse(tiny_model_dir, tmp_path):
    """Targets are the base model's own greedy answers, and the bank's adapters are strong (alpha 512): each
    changes those answers and scores lower. (A random tiny model repeats its last prompt token, a newline: the
    tied embeddings of all tokens but words after a space are zeroed so that it says words, e.g. "the the the".)"""
    import torch
    from conftest import TOPICS, make_bank
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorablend.runtime.evaluate import answers_with, load_for_eval
    from lorablend.sketch import build_index

    model_dir, tok = tmp_path / "talkative", AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    blank = [i for i in range(len(tok)) if not (tok.decode([i]).startswith(" ") and tok.decode([i])[1:2].isalnum())]
    with torch.no_grad():
        model.get_input_embeddings().weight[blank] = 0.0
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    bank = make_bank(tmp_path / "bank", model_dir, alphas={t: 512.0 for t in TOPICS})
    build_index(Bank.open(bank))
    ds = _plain(tmp_path, n=30, split=True)
    model, tok = load_for_eval(str(model_dir), {})
    answers = {name: answers_with(model, None, tok, split, max_new_tokens=8) for name, split in ds.splits.items()}
    rows = [{"input": e.input, "output": [a], "split": name}
            for name, split in ds.splits.items() for e, a in zip(split, answers[name])]
    assert all(any(c.isalnum() for c in r["output"][0]) for r in rows)
    path = tmp_path / "own.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_dataset(path)
    res = generate(Bank.open(bank), ds, tmp_path / "o", MODEL_AWARE, validate=True, backend="torch")
    v = res.verdict
    assert v.base > 0.5 and v.chosen == NO_ADAPTER and not v.helps
    assert v.base > max(s for n, s in v.scores.items() if n != NO_ADAPTER)
    assert res.out.exists() and v.uncertain is False
    with pytest.raises(NoGain):
        generate(Bank.open(bank), ds, tmp_path / "p", MODEL_AWARE, validate=True, backend="torch", require_gain=True)
    assert not (tmp_path / "p").exists()


def test_few_examples_make_an_uncertain_verdict_not_a_failure(tiny_bank, tmp_path):
    ds = _plain(tmp_path, n=12)
    res = generate(Bank.open(tiny_bank), ds, tmp_path / "o", MODEL_AWARE, validate=True, backend="torch")
    assert res.verdict.uncertain and np.isfinite(res.verdict.gain).all()


def _cli(argv) -> int:
    import sys

    from lorablend.cli import main

    old, sys.argv = sys.argv, ["lorablend", *map(str, argv)]
    try:
        main()
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    finally:
        sys.argv = old


def test_cli_default_runs_the_best_setting_and_prints_the_verdict(tiny_bank, tmp_path, capfd):
    data = make_dataset_file(tmp_path / "mine.jsonl", "math", n=40, seed=5)
    code = _cli(["generate", "--bank", tiny_bank, "--dataset", data, "--out", tmp_path / "o", "--backend", "torch"])
    out = " ".join(capfd.readouterr().out.split())
    assert code == 0, out
    saved = json.loads((tmp_path / "o" / "lorablend.json").read_text())
    assert saved["metric"] == "grad+js" and saved["sketch"] == "target-tokens" and saved["rerank"] == 4
    assert "validation:" in out and "gain of the written adapter" in out and "chosen" in out
    assert _cli(["generate", "--bank", tiny_bank, "--dataset", data, "--out", tmp_path / "p", "--setting", "paper",
                 "--no-validate"]) == 0
    saved = json.loads((tmp_path / "p" / "lorablend.json").read_text())
    assert (saved["sketch"], saved["metric"], saved["rerank"], saved["validation"]) == ("tokens", "js", None, None)
    capfd.readouterr()
    assert _cli(["generate", "--bank", tiny_bank, "--dataset", data, "--out", tmp_path / "q", "--backend", "torch",
                 "--setting", "paper", "--require-gain"]) in (0, 3)
