"""generate.py: end to end on a tiny bank, generate writes a PEFT adapter whose update is the exact combination."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import make_dataset_file

from lorablend.adapter import AdapterReader
from lorablend.bank.manifest import Bank
from lorablend.dataset import load_dataset
from lorablend.generate import generate
from lorablend.settings import Setting


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
    from lorablend.bench.entry import EntryPlan
    from lorablend.bench.plan import compute_matrices
    from lorablend.runtime.models import lorablend_home
    from lorablend.settings import parse_setting

    monkeypatch.setenv("LORABLEND_HOME", str(tmp_path / "home"))
    bank = Bank.open(tiny_bank)
    own = load_dataset(bank.dataset_path(bank.entry("math")))
    setting = Setting("embeddings", "wd", "normalized", "svd", auto=True)
    res = generate(bank, own, tmp_path / "a", setting, exclude_family=family)
    spec = parse_setting("embeddings/wd/normalized/svd/auto")
    matrices = compute_matrices(bank, [spec], tmp_path / "m", seed=0)
    cal = EntryPlan(bank, "math", own, matrices, tmp_path / "ce").calibration("family" if family else "entry", spec)
    prov = res.provenance
    assert (prov.temperature, prov.top_k, prov.calibration["loss"]) == (cal.temperature, cal.top_k, cal.loss)
    assert prov.calibration == {"temperature": cal.temperature, "top_k": cal.top_k, "loss": cal.loss}
    want = generate(bank, own, tmp_path / "b", replace(setting, temperature=cal.temperature, top_k=cal.top_k, auto=False),
                    exclude_family=family)
    assert prov.coefficients == want.provenance.coefficients
    cached = sorted(p.name for p in (lorablend_home() / "bank-matrices").rglob("*.npy"))
    assert cached == ["D-embeddings-wd.npy", "G-update.npy"]
    again = generate(bank, own, tmp_path / "c", setting, exclude_family=family)  # from the cache
    assert again.provenance.coefficients == prov.coefficients


def test_auto_where_the_cache_cannot_be_written_computes_each_time(tiny_bank, user_dataset, tmp_path, monkeypatch):
    import errno

    import lorablend.bank.matrices

    def read_only(path, mode="wb"):
        raise PermissionError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setenv("LORABLEND_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(lorablend.bank.matrices, "atomic_file", read_only)
    res = generate(Bank.open(tiny_bank), load_dataset(user_dataset), tmp_path / "o", Setting(auto=True))
    assert res.provenance.calibration and not (tmp_path / "home").exists()


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


def test_scoring_on_llamacpp_reranks_what_torch_reranks(converted, tiny_bank, user_dataset, tmp_path, monkeypatch):
    """On llama.cpp (what `auto` picks without native bf16 or the memory) the rerank's ce runs there, and the union
    retriever's first-order half runs on torch where full precision fits (then the pick is torch's), else over an
    NF4 base, else not at all (grad+js retrieves by js alone: then the pick is torch's js pick)."""
    from lorablend.runtime import llamacpp, quantized
    from lorablend.settings import parse_setting

    root = shutil.copytree(tiny_bank, tmp_path / "bank")
    manifest = json.loads((root / "bank.json").read_text())
    manifest["base_model"] = manifest["tokenizer"] = str(converted["model"])  # the tiny model with its f32 GGUF
    (root / "bank.json").write_text(json.dumps(manifest))
    bank, ds = Bank.open(root), load_dataset(user_dataset)
    for entry in bank.entries:  # the adapters name it too
        config = bank.adapter_path(entry) / "adapter_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": str(converted["model"])}))
    union, js = (parse_setting(f"target-tokens/{m}/normalized/svd/top1/rerank3") for m in ("grad+js", "js"))

    def run(name, backend, setting):
        return generate(bank, ds, tmp_path / name, setting, backend=backend)

    torch_union, torch_js = run("torch-union", "torch", union), run("torch-js", "torch", js)
    assert torch_union.scoring == {"backend": "torch", "why": "--backend torch"}
    forced = run("forced", "llamacpp", union)  # torch fits this model: the first-order half stays on it
    assert forced.scoring["backend"] == "llamacpp" and forced.scoring["first_order"] == "full"
    assert forced.provenance.metric == "grad+js" and forced.provenance.scoring == "llamacpp"
    assert forced.provenance.coefficients == torch_union.provenance.coefficients

    monkeypatch.setattr(llamacpp, "scoring_backend", lambda model_id: ("llamacpp", "the memory (test)"))
    nf4 = run("nf4", "auto", union)
    assert nf4.scoring["first_order"] == "nf4" and "over an NF4 base" in nf4.scoring["why"]
    assert nf4.provenance.metric == "grad+js" and sum(nf4.provenance.coefficients.values()) == pytest.approx(1.0)

    monkeypatch.setattr(quantized, "available", lambda: False)
    alone = run("js-alone", "auto", union)
    assert "retrieved by js alone" in alone.scoring["why"] and "bitsandbytes is not installed" in alone.scoring["why"]
    assert "first_order" not in alone.scoring
    assert alone.provenance.metric == "js" and alone.provenance.coefficients == torch_js.provenance.coefficients
