"""runtime/llamacpp.py: the llama.cpp backend against PyTorch, batched sequences, and its use by `eval` and `bench`
(llama.cpp's own converters make the tiny model's GGUF: see `converted` in conftest.py)."""

from __future__ import annotations

import json

import numpy as np

import pytest
from conftest import make_dataset_file, run_main

from lorablend.errors import InputError


def test_llamacpp_backend_matches_torch(converted, tmp_path):
    """The llamacpp backend decodes the torch path's very prompts: on the f32 tiny model, the same greedy tokens.

    A random model has near-ties, which llama.cpp's f16 KV cache may break the other way: tokens are
    compared up to the first step whose top-2 logit margin under torch is below 0.05.
    """
    import contextlib

    import torch

    from lorablend.dataset import load_dataset
    from lorablend.runtime.evaluate import answers_with, generate_answers, load_for_eval
    from lorablend.runtime.prompts import end_of_turn_id, prompt_ids

    model_id = str(converted["model"])
    ds = load_dataset(make_dataset_file(tmp_path / "d.jsonl", "animals", n=12), name="animals")
    examples = ds.split("train")[:6]
    adapters = {"a": str(converted["adapter"])}
    lm, tok = load_for_eval(model_id, adapters, backend="llamacpp")
    assert getattr(lm, "is_llamacpp", False)
    tm, _ = load_for_eval(model_id, adapters, backend="torch")
    stop = end_of_turn_id(tok)
    compared = 0
    for name in ("a", None):
        for e in examples:
            p = prompt_ids(tok, e)
            tm.set_adapter("a")
            with (tm.disable_adapter() if name is None else contextlib.nullcontext()), torch.inference_mode():
                out = tm.generate(input_ids=torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=[stop],
                                  pad_token_id=stop, output_scores=True, return_dict_in_generate=True)
            want = out.sequences[0, len(p):].tolist()
            got = lm.answer_ids(p, 12, {stop}, name)
            for k, scores in enumerate(out.scores):
                top = torch.topk(scores[0], 2).values
                if float(top[0] - top[1]) < 0.05 or want[k] == stop:
                    break
                assert got[k] == want[k], (name, e.input, k, got, want)
                compared += 1
    assert compared >= 60  # with this seed 77 of the 144 steps are clear-cut, and all of them agree
    # whole answers through the evaluation API, and mixed adapters in one call as `lorablend bench` passes them
    mixed = generate_answers(lm, tok, examples, max_new_tokens=10, adapter_names=["a", "__base__"] * 3)
    with_a = answers_with(lm, "a", tok, examples, max_new_tokens=10)
    alone = answers_with(lm, None, tok, examples, max_new_tokens=10)
    assert mixed == [with_a[i] if i % 2 == 0 else alone[i] for i in range(6)]
    assert with_a != alone
    lm.close()


def test_batched_decoding_matches_one_sequence(converted, tmp_path):
    """n_seq prompts decoded as parallel sequences (shared prefix copied) give the one-sequence path's tokens."""
    from lorablend.dataset import load_dataset
    from lorablend.runtime.llamacpp import LlamaCppModel
    from lorablend.runtime.models import load_tokenizer
    from lorablend.runtime.prompts import end_of_turn_id, prompt_ids

    model_id = str(converted["model"])
    tok = load_tokenizer(model_id)
    examples = [e for topic in ("animals", "code") for e in
                load_dataset(make_dataset_file(tmp_path / f"{topic}.jsonl", topic, n=12), name=topic).split("train")[:6]]
    prompts = sorted(prompt_ids(tok, e) for e in examples)
    prompts.insert(3, prompts[3][:-4])  # a prompt that is a prefix of its neighbour
    stop = {end_of_turn_id(tok)}
    one = LlamaCppModel(model_id, n_threads=1, n_seq=1)
    many = LlamaCppModel(model_id, n_threads=1, n_seq=4)  # groups of 4, 4, 4, 1
    try:
        answers = {}
        for m in (one, many):
            m.load_adapters({"a": str(converted["adapter"])})
        for adapter in ("a", None, "a"):  # switching back and forth reuses nothing stale
            want = [one.answer_ids(p, 10, stop, adapter) for p in prompts]
            got = many.answers_ids(prompts, 10, stop, adapter)
            assert got == want, adapter
            assert sum(map(len, got)) > 2 * len(got)
            answers[adapter] = got
        assert answers["a"] != answers[None]
        with pytest.raises(InputError, match="more than the 512 of .*lower --max-new-tokens"):
            many.answers_ids(prompts, 500, stop)
        with pytest.raises(InputError, match="no adapter named 'b'"):
            many.answers_ids(prompts, 10, stop, "b")
    finally:
        one.close()
        many.close()


def test_eval_cli_defaults_to_llamacpp(converted, tmp_path, capfd):
    data = make_dataset_file(tmp_path / "d.jsonl", "math", n=8)
    argv = ["eval", "--dataset", data, "--adapter", converted["adapter"], "--model", converted["model"], "--limit", "3",
            "--max-new-tokens", "6"]
    code, out, err = run_main(argv, capfd)
    assert code == 0, err
    out = " ".join(out.split())  # rich wraps long lines
    assert "backend llamacpp" in out
    code, out2, err = run_main(argv + ["--backend", "torch"], capfd)
    assert code == 0, err
    out2 = " ".join(out2.split())
    assert "backend torch" in out2
    code, out, err = run_main(argv + ["--backend", "lamacpp"], capfd)
    assert code == 2 and "unknown backend 'lamacpp'" in err and len(err.strip().splitlines()) == 1


def test_bench_llamacpp_backend(converted, tmp_path):
    """`lorablend bench --backend llamacpp`: every adapter (controls and mixtures) exported with `write_gguf` and
    run by llama.cpp. The own-adapter control answers exactly as the PEFT dir's export does through `eval`,
    adapters change answers, the records agree with the torch backend's, and the two never share a results dir."""
    from conftest import make_bank

    from lorablend.bank.manifest import Bank
    from lorablend.bench.entry import test_sample
    from lorablend.bench.plan import BenchConfig
    from lorablend.bench.records import RecordStore
    from lorablend.bench.run import run_bench
    from lorablend.dataset import load_dataset
    from lorablend.runtime.evaluate import answers_with, load_for_eval
    from lorablend.sketch import build_index

    root = make_bank(tmp_path / "bank", converted["model"], topics=("animals", "math", "weather", "code"))
    bank = Bank.open(root)
    build_index(bank)
    settings = ("tokens/js/normalized/paper/T1", "embeddings/js/normalized/svd/auto")
    common = dict(bank=str(root), entries=("math",), holdouts=("entry",), n=3, max_new_tokens=5, threads=1, presets=(),
                  settings=settings)
    runs = {b: run_bench(BenchConfig(results=tmp_path / b, backend=b, **common)) for b in ("llamacpp", "torch")}
    records = {b: {r["label"]: r for r in RecordStore(run.results).all()} for b, run in runs.items()}
    assert json.loads((tmp_path / "llamacpp" / "config.json").read_text())["backend"] == "llamacpp"
    assert json.loads((tmp_path / "llamacpp" / "run.json").read_text())["runs"][0]["backend"] == "llamacpp"
    mine = records["llamacpp"]
    assert set(mine) == set(records["torch"]) and {"base", "own"} <= set(mine) and len(mine) >= 6

    entry = bank.entry("math")
    examples = test_sample(load_dataset(bank.dataset_path(entry), name="math"), 3, 0)
    lm, tok = load_for_eval(str(converted["model"]), {"own": str(root / entry.adapter_dir)}, backend="llamacpp")
    budget = mine["own"]["max_new_tokens"]
    assert mine["own"]["answers"] == answers_with(lm, "own", tok, examples, max_new_tokens=budget)
    assert mine["base"]["answers"] == answers_with(lm, None, tok, examples, max_new_tokens=budget)
    lm.close()
    assert mine["own"]["answers"] != mine["base"]["answers"]
    # f32 GGUF vs f32 torch on a random model: near-ties may break either way, most answers agree
    pairs = [(a, b) for label in mine for a, b in zip(mine[label]["answers"], records["torch"][label]["answers"])]
    assert sum(a == b for a, b in pairs) >= 0.75 * len(pairs), pairs
    with pytest.raises(InputError, match="backend"):
        run_bench(BenchConfig(results=tmp_path / "llamacpp", backend="torch", **common))


def test_ce_through_llamacpp_equals_torch_on_the_f32_base(converted, tmp_path):
    """The llama.cpp scorer's loss (runtime LoRA at a scale, the shared prefix once, logits at the targets only) is
    torch's MixtureScorer's on the f32 model, for the base, the adapter, a fraction of it and a mixture: within
    1e-4 relative, what llama.cpp's f16 KV cache leaves (the adapter moves it ~30 times more)."""
    from lorablend.adapter import AdapterReader
    from lorablend.dataset import load_dataset
    from lorablend.runtime.llamacpp import LlamaCppModel, LlamaCppScorer
    from lorablend.runtime.models import load_model, load_tokenizer
    from lorablend.runtime.scoring import MixtureScorer

    model_id = str(converted["model"])
    tok = load_tokenizer(model_id)
    examples = [e for topic in ("animals", "code") for e in  # two instructions: groups with and without a shared prefix
                load_dataset(make_dataset_file(tmp_path / f"{topic}.jsonl", topic, n=12), name=topic).split("train")[:5]]
    adapters = [converted["adapter"], converted["adapter"]]
    lm = LlamaCppModel(model_id, n_threads=1, n_seq=4)
    ours = LlamaCppScorer(lm, tok, adapters, examples)
    torch_scorer = MixtureScorer(load_model(model_id), tok, [AdapterReader(a) for a in adapters], examples, bf16=False)
    try:
        for w in ([0, 0], [1, 0], [0.5, 0], [0.25, 1.5]):
            assert ours.loss(w) == pytest.approx(torch_scorer.loss(w), rel=1e-4), w
        assert np.allclose(ours.losses(), torch_scorer.losses(), rtol=1e-4)
        base = ours.loss([0, 0])
        assert abs(ours.loss([1, 0]) - base) > 20 * 1e-4 * base  # the adapter matters
        assert ours.passes == 4 + 2 + 2  # one per loss evaluated
    finally:
        torch_scorer.close()
        lm.close()


@pytest.mark.parametrize("bf16, params, free, want", [
    (True, 135e6, 20.0, "torch"),  # SmolLM2 anywhere
    (True, 7.2e9, 20.0, "torch"),  # 7B on an AMX / AVX512-BF16 machine with 24 GB: 18.8 GB fits
    (True, 7.2e9, 12.0, "llamacpp"),  # the same CPU in a 16 GB laptop
    (False, 7.2e9, 24.0, "llamacpp"),  # no native bf16 and 24 GB: fp32 weights alone are 29 GB
    (False, 1e9, 20.0, "torch"),  # a small model in fp32
])
def test_scoring_backend_follows_precision_and_memory(converted, monkeypatch, bf16, params, free, want):
    import lorablend.machine
    import lorablend.runtime.models
    from lorablend.runtime.llamacpp import scoring_backend

    monkeypatch.setattr(lorablend.machine, "native_bf16", lambda: bf16)
    monkeypatch.setattr(lorablend.machine, "available_gib", lambda: free)
    monkeypatch.setattr(lorablend.runtime.models, "parameter_count", lambda model_id: int(params))
    chosen, why = scoring_backend(str(converted["model"]))
    assert chosen == want and f"{free:.1f} GiB are free" in why


@pytest.mark.parametrize("cpu, build, noted", [
    ({"avx512f", "amx_int8"}, b"CPU : AVX512 = 1 | REPACK = 1 |", True),  # AMX CPU, llama.cpp built without it
    ({"avx512f", "amx_int8"}, b"CPU : AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 |", False),
    ({"avx2"}, b"CPU : AVX2 = 1 | REPACK = 1 |", False),  # no AMX to miss
])
def test_llamacpp_scoring_notes_missing_amx_kernels(converted, monkeypatch, cpu, build, noted):
    import llama_cpp

    import lorablend.machine
    import lorablend.runtime.models
    from lorablend.runtime.llamacpp import scoring_backend

    monkeypatch.setattr(lorablend.machine, "native_bf16", lambda: True)
    monkeypatch.setattr(lorablend.machine, "available_gib", lambda: 12.0)
    monkeypatch.setattr(lorablend.machine, "cpu_flags", lambda: frozenset(cpu))
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: build)
    monkeypatch.setattr(lorablend.runtime.models, "parameter_count", lambda model_id: int(7.2e9))
    chosen, why = scoring_backend(str(converted["model"]))
    assert chosen == "llamacpp" and ("without its AMX kernels" in why) == noted, why


def test_scoring_backend_without_a_gguf_is_torch(tiny_model_dir):
    from lorablend.runtime.llamacpp import scoring_backend

    assert scoring_backend(str(tiny_model_dir)) == ("torch", "the model has no GGUF for llama.cpp")


def test_the_base_gguf_is_read_into_memory_not_mapped(converted):
    """A mapped file's pages stay in the process beside llama.cpp's repacked copy of its weights (twice the
    memory of a 7B K-quant base): the loaded model holds no mapping of its GGUF."""
    from pathlib import Path

    from lorablend.runtime.llamacpp import LlamaCppModel

    lm = LlamaCppModel(str(converted["model"]), n_threads=1, n_seq=1)
    try:
        mapped = Path("/proc/self/maps").read_text()
        assert str(lm.path) not in mapped and lm.path.name not in mapped
    finally:
        lm.close()
