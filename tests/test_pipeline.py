"""End to end on a tiny bank: generate writes a PEFT adapter whose update is the exact combination."""

import json
import shutil
from dataclasses import replace
import subprocess
import sys

import numpy as np
import pytest
import torch

from lorablend.adapter import AdapterReader
from lorablend.bank import Bank
from lorablend.dataset import load_dataset
from lorablend.errors import InputError
from lorablend.generate import Setting, generate

from conftest import make_dataset_file


@pytest.fixture
def user_dataset(tmp_path):
    return make_dataset_file(tmp_path / "mine.jsonl", "math", n=20, seed=7)


def _dense_update(bank, coefs, module):
    total = 0
    for name, c in coefs.items():
        if c > 0:
            f = AdapterReader(bank.adapter_path(bank.entry(name))).factors(module)
            total = total + c * f.scale * (f.B.astype(np.float64) @ f.A.astype(np.float64))
    return total


@pytest.mark.parametrize("sketch", ["tokens", "embeddings"])
@pytest.mark.parametrize("metric", ["wd", "kl", "js", "mmd"])
def test_every_sketch_and_metric_gives_coefficients_summing_to_one(tiny_bank, user_dataset, tmp_path, sketch, metric):
    bank = Bank.open(tiny_bank)
    res = generate(bank, load_dataset(user_dataset), tmp_path / "out", Setting(sketch=sketch, metric=metric, combine="cat"))
    c = np.array(list(res.provenance.coefficients.values()))
    assert c.min() >= 0 and abs(c.sum() - 1) < 1e-9
    assert set(res.provenance.coefficients) == set(bank.names)


def test_cat_output_loads_in_peft_and_matches_dense_update(tiny_bank, tiny_model_dir, user_dataset, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    bank = Bank.open(tiny_bank)
    res = generate(bank, load_dataset(user_dataset), tmp_path / "out", Setting(combine="cat", temperature=0.5))
    coefs = res.provenance.coefficients
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    x = torch.tensor([[3, 17, 42, 99, 5]])
    # reference: the base model with the dense update added to each adapted weight
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reader = AdapterReader(bank.adapter_path(bank.entries[0]))
    with torch.no_grad():
        for module in reader.modules:
            weight = ref.get_submodule(module).weight
            weight += torch.tensor(_dense_update(bank, coefs, module), dtype=weight.dtype)
        want = ref(x).logits
        got = PeftModel.from_pretrained(base, str(res.out)).eval()(x).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_svd_is_the_best_rank_r_approximation(tiny_bank, user_dataset, tmp_path):
    bank = Bank.open(tiny_bank)
    res = generate(bank, load_dataset(user_dataset), tmp_path / "out", Setting(combine="svd", rank=3))
    out = AdapterReader(res.out)
    for module in out.modules[:2]:
        dense = _dense_update(bank, res.provenance.coefficients, module)
        u, s, vt = np.linalg.svd(dense, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vt[:3]
        f = out.factors(module)
        got = f.scale * f.B.astype(np.float64) @ f.A.astype(np.float64)
        assert np.linalg.norm(got - best) <= 1e-5 * np.linalg.norm(best)


def test_leave_one_out_and_family_exclusion(tiny_bank, tmp_path):
    bank = Bank.open(tiny_bank)
    own = load_dataset(bank.dataset_path(bank.entry("math")))
    res = generate(bank, own, tmp_path / "a", Setting())
    assert res.provenance.excluded == ["math"] and res.provenance.coefficients["math"] == 0
    fam = generate(bank, own, tmp_path / "b", Setting(), exclude_family=True)
    same_family = {e.name for e in bank.entries if e.family == bank.entry("math").family}
    assert set(fam.provenance.excluded) == same_family and len(same_family) == 2
    assert all(fam.provenance.coefficients[n] == 0 for n in same_family)


@pytest.mark.parametrize("family", [False, True])
def test_auto_uses_the_benchs_calibration_and_caches_the_matrices(tiny_bank, tmp_path, monkeypatch, family):
    from lorablend import bench
    from lorablend.models import lorablend_home

    monkeypatch.setenv("LORABLEND_HOME", str(tmp_path / "home"))
    bank = Bank.open(tiny_bank)
    own = load_dataset(bank.dataset_path(bank.entry("math")))
    setting = Setting("embeddings", "wd", "normalized", "svd")
    res = generate(bank, own, tmp_path / "a", setting, exclude_family=family, auto=True)
    spec = bench.parse_setting("embeddings/wd/normalized/svd/auto")
    matrices = bench.compute_matrices(bank, [spec], tmp_path / "m", seed=0)
    cal = bench.EntryPlan(bank, "math", own, matrices, tmp_path / "ce").calibration("family" if family else "entry", spec)
    prov = res.provenance
    assert (prov.temperature, prov.top_k, prov.calibration["loss"]) == (cal.temperature, cal.top_k, cal.loss)
    assert prov.calibration == {"temperature": cal.temperature, "top_k": cal.top_k, "loss": cal.loss}
    want = generate(bank, own, tmp_path / "b", replace(setting, temperature=cal.temperature, top_k=cal.top_k),
                    exclude_family=family)
    assert prov.coefficients == want.provenance.coefficients
    cached = sorted(p.name for p in (lorablend_home() / "bank-matrices").rglob("*.npy"))
    assert cached == ["D-embeddings-wd.npy", "G-update.npy"]
    again = generate(bank, own, tmp_path / "c", setting, exclude_family=family, auto=True)  # from the cache
    assert again.provenance.coefficients == prov.coefficients


def test_auto_where_the_cache_cannot_be_written_computes_each_time(tiny_bank, user_dataset, tmp_path, monkeypatch):
    import errno

    import lorablend.metafit

    def read_only(path, mode="wb"):
        raise PermissionError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setenv("LORABLEND_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(lorablend.metafit, "atomic_file", read_only)
    res = generate(Bank.open(tiny_bank), load_dataset(user_dataset), tmp_path / "o", Setting(), auto=True)
    assert res.provenance.calibration and not (tmp_path / "home").exists()


def test_generate_setting_option_equals_the_separate_options(tiny_bank, user_dataset, tmp_path, capfd):
    """`--setting` takes any setting the bench reports, `auto` included, and writes the same adapter as the options."""
    from test_errors import run_cli

    common = ["generate", "--bank", str(tiny_bank), "--dataset", str(user_dataset)]
    for text, options in (("embeddings/wd/attentional/cat/T0.5/top2", ["--sketch", "embeddings", "--metric", "wd",
                                                                       "--operator", "attentional", "--combine", "cat",
                                                                       "--temperature", "0.5", "--top-k", "2"]),
                          ("target-tokens/js/normalized/svd/auto", ["--sketch", "target-tokens", "--auto"])):
        a, b = tmp_path / f"a{len(options)}", tmp_path / f"b{len(options)}"
        assert run_cli(common + ["--out", str(a), "--setting", text], capfd)[0] == 0
        assert run_cli(common + ["--out", str(b)] + options, capfd)[0] == 0
        for name in ("adapter_model.safetensors", "lorablend.json"):
            assert (a / name).read_bytes() == (b / name).read_bytes()


def test_top_k_keeps_k_entries(tiny_bank, user_dataset, tmp_path):
    res = generate(Bank.open(tiny_bank), load_dataset(user_dataset), tmp_path / "o", Setting(top_k=2))
    assert sum(w > 0 for w in res.provenance.coefficients.values()) == 2


def test_mixed_ranks_and_alphas_work(tmp_path, tiny_model_dir, user_dataset):
    from conftest import make_bank
    from lorablend.sketch import build_index

    root = make_bank(tmp_path / "bank", tiny_model_dir, topics=("animals", "math", "code"),
                     ranks={"animals": 2, "math": 4, "code": 8}, alphas={"animals": 4.0, "math": 32.0, "code": 8.0})
    bank = Bank.open(root)
    build_index(bank, ("tokens",))
    res = generate(bank, load_dataset(user_dataset), tmp_path / "out", Setting(combine="cat"))
    f = AdapterReader(res.out).factors(AdapterReader(res.out).modules[0])
    dense = _dense_update(bank, res.provenance.coefficients, AdapterReader(res.out).modules[0])
    got = f.scale * f.B.astype(np.float64) @ f.A.astype(np.float64)
    assert np.linalg.norm(got - dense) <= 1e-5 * np.linalg.norm(dense)
    assert f.rank == 14


DETERMINISM = {  # settings whose outputs must not depend on the process that wrote them
    "svd": ["--combine", "svd"],
    "paper": ["--combine", "paper"],
    "tokens-mmd": ["--sketch", "tokens", "--metric", "mmd"],
    "embeddings-mmd": ["--sketch", "embeddings", "--metric", "mmd"],
}
# Runs several `lorablend generate` command lines through the real CLI in one process.
_DRIVER = """
import json, sys
from lorablend.cli import main
for argv in json.loads(sys.argv[1]):
    sys.argv = ["lorablend", *argv]
    try:
        main()
    except SystemExit as exc:
        if exc.code:
            raise
"""


@pytest.fixture(scope="module")
def two_processes(tiny_bank, tmp_path_factory):
    """Every DETERMINISM setting generated by two processes, the second in reverse order (so no
    state carried from one run to the next inside a process can hide)."""
    root = tmp_path_factory.mktemp("determinism")
    dataset = make_dataset_file(root / "mine.jsonl", "math", n=20, seed=7)
    for run, order in (("run0", list(DETERMINISM)), ("run1", list(reversed(DETERMINISM)))):
        jobs = [["generate", "--bank", str(tiny_bank), "--dataset", str(dataset), "--out", str(root / run / name),
                 *DETERMINISM[name]] for name in order]
        proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(jobs)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    return root


@pytest.mark.parametrize("name", list(DETERMINISM))
def test_two_processes_write_byte_identical_adapters(two_processes, name):
    a, b = two_processes / "run0" / name, two_processes / "run1" / name
    for f in ("adapter_model.safetensors", "lorablend.json", "adapter_config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f"{name}: {f} differs between processes"


def test_neural_operator_fits_and_generates(tiny_bank, user_dataset, tmp_path):
    from lorablend.coefficients import NeuralConfig
    from lorablend.metafit import fit_meta

    root = tmp_path / "bank"
    shutil.copytree(tiny_bank, root)
    bank = Bank.open(root)
    op, train, val = fit_meta(bank, NeuralConfig(hidden=16, epochs=40, metric="js"))
    assert len(train) + len(val) == 5 and op.history[-1] < op.history[0]
    res = generate(bank, load_dataset(user_dataset), tmp_path / "out", Setting(operator="neural"))
    assert abs(sum(res.provenance.coefficients.values()) - 1) < 1e-9
    assert json.loads((res.out / "lorablend.json").read_text())["operator"] == "neural"


@pytest.mark.parametrize("setting", [
    Setting(metric="ce", combine="cat"),
    Setting(metric="js", rerank=3, combine="cat"),
    Setting(metric="js", operator="fit", top_k=3, fit_budget=12, combine="cat"),
    Setting(metric="grad", top_k=1, combine="cat"),
    Setting(metric="grad", top_k=1, rerank=2, combine="cat"),
    Setting(metric="grad+js", top_k=1, rerank=3, combine="cat"),
], ids=["ce", "rerank", "fit", "grad", "grad-rerank", "union-rerank"])
def test_model_based_settings(tiny_bank, user_dataset, tmp_path, setting):
    res = generate(Bank.open(tiny_bank), load_dataset(user_dataset), tmp_path / "o", setting)
    c = np.array(list(res.provenance.coefficients.values()))
    assert c.min() >= 0 and abs(c.sum() - 1) < 1e-6
    if setting.rerank or setting.top_k:
        assert (c > 0).sum() <= (setting.rerank or setting.top_k)


def test_grad_top1_writes_the_adapter_with_the_lowest_first_order_score(tiny_bank, user_dataset, tmp_path):
    from lorablend.generate import first_order_row

    bank, ds = Bank.open(tiny_bank), load_dataset(user_dataset)
    res = generate(bank, ds, tmp_path / "o", Setting(metric="grad", top_k=1))
    usable = [n for n in bank.names if n not in res.provenance.excluded]
    g = dict(zip(usable, first_order_row(bank, usable, ds, 16)))
    assert {n: w for n, w in res.provenance.coefficients.items() if w > 0} == {min(g, key=g.get): 1.0}
    assert json.loads((res.out / "lorablend.json").read_text())["metric"] == "grad"


def test_union_retriever_takes_half_from_each_and_fewer_when_they_agree():
    from lorablend.generate import retrieve_union

    g = np.array([0.1, -0.5, 0.3, -0.2, np.inf, 0.0])
    d = np.array([0.2, 0.9, 0.1, 0.8, np.inf, 0.05])
    assert np.flatnonzero(np.isfinite(retrieve_union(g, d, 4))).tolist() == [1, 2, 3, 5]  # grad 1, 3; js 2, 5
    assert np.flatnonzero(np.isfinite(retrieve_union(g, d, 3))).tolist() == [1, 3, 5]  # grad takes the odd one
    assert np.flatnonzero(np.isfinite(retrieve_union(g, g, 4))).tolist() == [1, 3]  # the same two twice
    assert np.isfinite(retrieve_union(g, d, 50)).sum() == 5  # never the excluded (inf) entry


@pytest.mark.parametrize("kw, needle", [
    (dict(metric="grad+js"), "--rerank"),
    (dict(metric="grad+kl", operator="neural", rerank=4), "neural"),
    (dict(metric="grad", operator="neural"), "neural"),
])
def test_first_order_settings_refused_with_one_line(kw, needle):
    with pytest.raises(InputError, match=needle):
        Setting(**kw).check()


def test_mixture_scorer_hooks_equal_the_cat_adapter(tiny_bank, tiny_model_dir, user_dataset, tmp_path):
    """The hook-based mixture is exactly base + cat adapter: its loss equals the PEFT model's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorablend.ce import MixtureScorer
    from lorablend.generate import open_readers

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

    from lorablend.ce import MixtureScorer
    from lorablend.generate import open_readers

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

    from lorablend.ce import MixtureScorer
    from lorablend.generate import open_readers
    from lorablend.prompts import training_pair

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

    from lorablend.models import target_loss
    from lorablend.prompts import training_pair

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


def test_ce_cost_benchmark_runs(tiny_bank, capsys):
    """`python -m lorablend.benchmarks.ce_cost` on the tiny bank: both modes timed, their losses agree."""
    from lorablend.benchmarks.ce_cost import main

    main(["--bank", str(tiny_bank), "--tasks", "2", "--every", "2", "--k", "4", "--candidates", "2"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["task"] for r in rows[:-1]] == Bank.open(tiny_bank).names[::2][:2]
    assert all(r["shared_cpu_s"] >= 0 and r["whole_cpu_s"] >= 0 and r["max_abs_diff"] < 0.05 for r in rows[:-1]), rows
    assert rows[-1]["ratio"] > 0


def test_ce_cost_benchmark_times_a_synthetic_model(tiny_bank, capsys):
    """`--synthetic`: the same examples through a random Mistral-architecture model with q/k/v adapters."""
    from lorablend.benchmarks.ce_cost import main

    main(["--bank", str(tiny_bank), "--tasks", "1", "--k", "4", "--candidates", "2", "--synthetic", "--layers", "2",
          "--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2"])
    row, summary = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["task"] == Bank.open(tiny_bank).names[0] and "whole_cpu_s" not in row
    assert row["synthetic_cpu_s"] >= 0 and np.isfinite(row["synthetic_loss"]) and row["synthetic_loss"] > 0
    from lorablend.models import load_tokenizer

    vocab = len(load_tokenizer(Bank.open(tiny_bank).manifest.base_model))  # q, o 64x64; k, v 64x32; MLP 3 x 64x128
    assert summary["synthetic_params"] == 2 * vocab * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64


@pytest.mark.parametrize("checkpointing", [[], ["--checkpointing"]], ids=["plain", "checkpointing"])
def test_ce_cost_benchmark_times_first_order_scoring_and_a_training_step(tiny_bank, capsys, checkpointing):
    from lorablend.benchmarks.ce_cost import main

    main(["--bank", str(tiny_bank), "--tasks", "1", "--k", "8", "--candidates", "1", "--synthetic", "--layers", "2",
          "--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2", "--first-order", "5",
          "--grad-tokens", "64"] + checkpointing)
    row, last, _summary = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["adapters"] == 5 and row["finite"] and row["backward_peak_rss_gb"] > 0
    assert last["train_tokens"] > 0 and last["checkpointing"] == bool(checkpointing)
    assert last["grad_rerank8_wall_s"] >= last["grad_top1_wall_s"] > 0 and last["train32_over_grad_rerank8"] > 0


def test_demo_runs_the_default_generate_on_family_out_tasks(tiny_bank, tmp_path, capfd):
    """`lorablend demo` end to end (the README's main command), on the tiny bank with PyTorch: the fixed tasks,
    each with its family left out, validated, scored beside the base model and the own LoRA, then the mean."""
    from test_errors import run_cli

    from lorablend.demo import demo_tasks

    bank = Bank.open(tiny_bank)
    tasks = demo_tasks(bank)
    assert tasks == ["animals", "code", "music"]  # the first task by name of the first families by name
    out = tmp_path / "demo-out"
    code, stdout, err = run_cli(["demo", "--bank", str(tiny_bank), "--n", "3", "--out", str(out), "--backend", "torch"],
                                capfd)
    assert code == 0, err
    flat = " ".join(stdout.split())
    for word in tasks + ["base", "generated", "own LoRA", "mean", "PyTorch"]:
        assert word in flat, stdout
    for task in tasks:
        provenance = json.loads((out / task / "lorablend.json").read_text())
        family = bank.entry(task).family
        used = {n for n, c in provenance["coefficients"].items() if c > 0}
        assert used and not {n for n in used if bank.entry(n).family == family}  # the whole family left out
        assert provenance["validation"]["written"] and provenance["metric"] == "grad+js"
    code, stdout, err = run_cli(["demo", "--bank", str(tiny_bank), "--task", "math", "--n", "2", "--out", str(out),
                                 "--backend", "torch"], capfd)
    assert code == 0 and (out / "math" / "adapter_model.safetensors").is_file() and "mean" not in stdout
