"""bench/ (plan, entry, evaluator, worker, executors, records, run): `lorablend bench` on the tiny bank: controls,
holdouts, honest neural fits, model-based settings, resumption, Ray."""

import json
import random

import numpy as np
import pytest
from conftest import FAST, SETTINGS

from lorablend.bank.manifest import Bank
from lorablend.bench import entry as bench_entry
from lorablend.bench import plan as bench_plan
from lorablend.bench.worker import WORKER
from lorablend.bench.plan import BenchConfig
from lorablend.bench.records import RecordStore
from lorablend.bench.run import run_bench
from lorablend.errors import InputError
from lorablend.settings import parse_setting

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL_SETTINGS = (
    "tokens/ce/normalized/svd/T1/top2",
    "tokens/js/normalized/svd/T1/top2/rerank3",
    "tokens/js/fit/svd/T1/rerank3",
)
GRAD_SETTINGS = (
    "tokens/grad/normalized/svd/T1/top1",
    "tokens/grad/normalized/svd/T1/top1/rerank2",
    "tokens/grad+js/normalized/svd/T1/top1/rerank3",
)


def test_settings_parse_round_trip_and_presets():
    for text in SETTINGS + MODEL_SETTINGS + bench_plan.PRESETS["best"] + bench_plan.PRESETS["labelled"] + ("embeddings/mmd/normalized/svd/auto/r4",
                                                                        "tokens/kl/attentional/cat/T0.5/top3",
                                                                        "embeddings/js/normalized/svd/auto/rerank16/r4"):
        assert parse_setting(text).label == text
        assert parse_setting(parse_setting(text).label) == parse_setting(text)
    assert len(bench_plan.PRESETS["paper"]) == 12 and all("/paper/" in s for s in bench_plan.PRESETS["paper"])
    assert parse_setting("embeddings/js/normalized/svd/auto/rerank16").rerank == 16
    for bad in ("tokens/js", "tokens/js/normalized/svd/X3", "tokens/js/neural/svd/auto", "tokens/js/normalized/svd/T1/auto",
                "tokens/ce/normalized/svd/auto", "tokens/js/normalized/svd/rerankX", "tokens/ce/normalized/svd/T1/rerank4",
                "tokens/js/fit/svd/auto"):
        with pytest.raises(InputError):
            parse_setting(bad)


def test_every_record_is_there(study):
    run, records, bank = study
    specs = [parse_setting(s) for s in SETTINGS]
    expected = {(e, s.holdout, s.label) for e in bank.names for s in bench_plan.slots_for(specs, ("entry", "family"))}
    assert set(records) == expected and run.written == run.total == len(expected)
    assert run.csv.exists() and (run.results / "coefficients.json").exists()
    assert not any(label == "best-ce" for _, _, label in records)  # no model-based setting, no ce control
    assert not (run.results / "ce").exists()


def test_base_and_own_are_evaluated(study):
    _, records, bank = study
    for e in bank.names:
        base, own = records[(e, "-", "base")], records[(e, "-", "own")]
        assert base["eval_key"] == "base" and base["coefficients"] == {} and base["n"] == len(base["answers"]) > 0
        assert own["eval_key"] == f"bank:{e}" and own["coefficients"] == {e: 1.0}


def test_uniform_random_k_and_nearest_controls(study):
    _, records, bank = study
    D = np.load(study[0].results / "matrices" / "D-tokens-wd.npy")
    for i, e in enumerate(bank.names):
        others = [n for n in bank.names if n != e]
        uniform = records[(e, "entry", "uniform/svd")]["coefficients"]
        assert set(uniform) == set(others) and np.allclose(list(uniform.values()), 1 / (len(bank.names) - 1))
        rk = records[(e, "entry", "random-k/tokens/wd/attentional/svd/T1/top2")]
        usable = [j for j, n in enumerate(bank.names) if n != e]
        picked = {bank.names[j] for j in random.Random(f"0:{e}:2").sample(usable, 2)}
        assert set(rk["coefficients"]) == picked and list(rk["coefficients"].values()) == [0.5, 0.5]
        nearest = records[(e, "entry", "nearest/tokens/wd")]["coefficients"]
        row = np.where(np.arange(len(bank.names)) == i, np.inf, D[i])
        assert nearest == {bank.names[int(np.argmin(row))]: 1.0}


def test_family_holdout_removes_the_family(study):
    _, records, bank = study
    for e in bank.entries:
        family = {x.name for x in bank.entries if x.family == e.family}
        for (entry, holdout, label), r in records.items():
            if entry == e.name and holdout == "family":
                assert set(r["excluded"]) == family and not family & set(r["coefficients"]), label
                if r["neural_trained_on"] is not None:
                    assert not family & set(r["neural_trained_on"])


def test_neural_is_never_trained_on_the_entry_it_scores(tiny_bank, tmp_path, monkeypatch):
    from lorablend.bank import fit as metafit

    calls = []
    real = metafit.fit_meta

    def spy(bank_, config, **kw):
        calls.append(set(kw["exclude"]))
        return real(bank_, config, **kw)

    monkeypatch.setattr(metafit, "fit_meta", spy)
    cfg = BenchConfig(bank=str(tiny_bank), results=tmp_path / "r", entries=("math", "music"),
                      **{**FAST, "settings": ("tokens/js/neural/paper/T1",)})
    run_bench(cfg)
    bank = Bank.open(tiny_bank)
    fam = {e.name for e in bank.entries if e.family == bank.entry("math").family}
    assert calls == [{"math"}, fam, {"music"}, {"music"}]  # music's family is music alone
    for r in RecordStore(tmp_path / "r").all():
        if r["label"] == "tokens/js/neural/paper/T1":
            assert r["entry"] not in r["neural_trained_on"] and len(r["neural_trained_on"]) == 5 - len(r["excluded"])


class Killed(Exception):
    pass


def test_a_killed_run_resumes_without_recomputing(tiny_bank, tmp_path, monkeypatch):
    from lorablend.runtime import evaluate

    calls, real = [], evaluate.generate_answers

    def flaky(*args, **kw):
        calls.append(1)
        if fail_after is not None and len(calls) > fail_after:
            raise Killed
        return real(*args, **kw)

    monkeypatch.setattr(evaluate, "generate_answers", flaky)
    cfg = BenchConfig(bank=str(tiny_bank), results=tmp_path / "r", entries=("math", "code"), batch_size=2,
                      **{**FAST, "settings": SETTINGS[:1], "holdouts": ("entry",)})
    fail_after = 3  # one adapter per call with batch 2: three evaluations, then a "kill"
    with pytest.raises(Killed):
        run_bench(cfg)
    root = tmp_path / "r" / "records"
    kept = {p.relative_to(root): p.read_text() for p in root.rglob("*.json")}
    assert 3 <= len(kept) < 2 * 5
    from lorablend.bench.records import export_csv
    from lorablend.bench.report import write_report

    last = json.loads((tmp_path / "r" / "run.json").read_text())["runs"][-1]
    assert (last["finished"], last["records_present"], last["records_total"]) == (False, len(kept), 10)
    report = write_report(export_csv(RecordStore(tmp_path / "r"), tmp_path / "r"), tmp_path / "partial.md").read_text()
    assert f"**Incomplete:** {len(kept)} of the 10 records" in report
    calls.clear()
    fail_after = None
    run = run_bench(cfg)
    records = RecordStore(tmp_path / "r").all()
    distinct = len({(r["entry"], r["eval_key"]) for r in records})
    assert len(calls) == distinct - 3 and run.written == len(records) - len(kept) == 10 - len(kept)
    assert all((root / rel).read_text() == text for rel, text in kept.items())  # untouched
    report = write_report(export_csv(RecordStore(tmp_path / "r"), tmp_path / "r"), tmp_path / "full.md").read_text()
    assert "Incomplete" not in report
    calls.clear()
    assert run_bench(cfg).written == 0 and calls == []  # a finished study computes nothing


def test_results_dir_refuses_other_options(tiny_bank, study):
    with pytest.raises(InputError, match="another n"):
        run_bench(BenchConfig(bank=str(tiny_bank), results=study[0].results, **{**FAST, "n": 2}))


def test_slots_give_the_same_model_as_loading_the_written_adapter(tiny_bank, tmp_path):
    """The bench never writes its adapters: a slot filled with the combination must equal the PEFT files."""
    import torch

    from lorablend.bank.combination import combination
    from lorablend.output import write_combination
    from lorablend.runtime.evaluate import load_for_eval

    bank = Bank.open(tiny_bank)
    coefs = {"animals": 0.5, "code": 0.3, "music": 0.2, "math": 0.0, "weather": 0.0}
    write_combination(bank, coefs, tmp_path / "a", "svd", 3)
    peft_model, _ = load_for_eval(bank.manifest.base_model, {"a": str(tmp_path / "a")})
    modules = combination(bank, coefs, "svd", 3, readers=WORKER.readers(bank))
    sm = WORKER.slot_model(bank.manifest.base_model, list(modules), 2, 4)
    sm.fill(1, modules)
    x = torch.tensor([[1, 17, 42, 99, 5, 7]])
    with torch.no_grad():
        want = peft_model(input_ids=x).logits
        got = sm.model(input_ids=x, adapter_names=["slot1"]).logits
        base = sm.model(input_ids=x, adapter_names=["__base__"]).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, base, atol=1e-3)


def test_ray_executor_with_a_local_instance(tiny_bank, tmp_path):
    import ray  # noqa: F401  (the setup installs the ray extra: missing, this fails rather than skips)
    cfg = BenchConfig(bank=str(tiny_bank), results=tmp_path / "r", entries=("math",), executor="ray",
                      **{**FAST, "settings": SETTINGS[:1], "holdouts": ("entry",)})
    run = run_bench(cfg)
    assert run.written == run.total == 5
    assert {r["entry"] for r in RecordStore(tmp_path / "r").all()} == {"math"}


@pytest.fixture
def scorer_calls(monkeypatch):
    """Counts the forward-pass work the bench asks of MixtureScorer, and the examples each scorer gets."""
    from lorablend.runtime.scoring import MixtureScorer

    calls = {"ce_row": [], "fit": [], "examples": []}
    real_init, real_row, real_fit = MixtureScorer.__init__, MixtureScorer.ce_row, MixtureScorer.fit

    def init(self, model, tokenizer, readers, examples, *a, **kw):
        calls["examples"].append(list(examples))
        real_init(self, model, tokenizer, readers, examples, *a, **kw)

    def ce_row(self):
        calls["ce_row"].append(len(self.weights))
        return real_row(self)

    def fit(self, init_, **kw):
        calls["fit"].append(len(self.weights))
        return real_fit(self, init_, **kw)

    monkeypatch.setattr(MixtureScorer, "__init__", init)
    monkeypatch.setattr(MixtureScorer, "ce_row", ce_row)
    monkeypatch.setattr(MixtureScorer, "fit", fit)
    return calls


def model_run(tiny_bank, results, entries=("math", "code")):
    cfg = BenchConfig(bank=str(tiny_bank), results=results, entries=entries, **{**FAST, "settings": MODEL_SETTINGS})
    return run_bench(cfg), {(r["entry"], r["holdout"], r["label"]): r for r in RecordStore(results).all()}


def ce_cache(results, entry):
    (path,) = (results / "ce").glob(f"{entry}.k*.json")
    return json.loads(path.read_text())


def test_model_based_settings_run_and_share_one_ce_row_per_entry(tiny_bank, tmp_path, scorer_calls):
    run, records = model_run(tiny_bank, tmp_path / "r")
    bank = Bank.open(tiny_bank)
    specs = [parse_setting(s) for s in MODEL_SETTINGS]
    slots = bench_plan.slots_for(specs, ("entry", "family"))
    assert run.written == run.total == len(records) == 2 * len(slots)
    assert scorer_calls["ce_row"] == [4, 4]  # once per entry, over the 4 others, for 3 settings x 2 holdouts + best-ce
    assert scorer_calls["fit"] == [3, 3, 3, 3]  # fit over the rerank's 3 (each family leaves 3 usable)
    for e in ("math", "code"):
        cached = ce_cache(tmp_path / "r", e)
        assert cached["names"] == [n for n in bank.names if n != e] and cached["seconds_per_candidate"] > 0
        ce = dict(zip(cached["names"], cached["ce"]))
        for h in ("entry", "family"):
            best = records[(e, h, "best-ce")]
            usable = [n for n in bank.names if n not in best["excluded"]]
            assert best["coefficients"] == {min(usable, key=ce.get): 1.0}
            assert best["cost_s"] >= cached["seconds_per_candidate"] * len(usable)
            for label in MODEL_SETTINGS:
                r = records[(e, h, label)]
                assert r["cost_s"] > 0 and not set(r["excluded"]) & set(r["coefficients"])
            rerank = records[(e, h, MODEL_SETTINGS[1])]["coefficients"]
            assert len(rerank) <= 2 and max(rerank, key=rerank.get) == min(rerank, key=ce.get)
        assert records[(e, "-", "base")]["cost_s"] is None and records[(e, "-", "own")]["cost_s"] >= 0
    from lorablend.bench.report import read_scores, summarize

    rows = {r.label: r for r in summarize(read_scores(run.csv), "entry")}
    assert rows[MODEL_SETTINGS[0]].vs["nearest"][3] == 2  # a ce setting's nearest control is best-ce
    assert rows["best-ce"].cost > 0 and np.isnan(rows["base"].cost)


def test_model_based_records_resume_without_recomputing_the_ce_row(tiny_bank, tmp_path, scorer_calls):
    results = tmp_path / "r"
    _, first = model_run(tiny_bank, results, entries=("math",))
    for label in ("best-ce",) + MODEL_SETTINGS:  # as if killed before these were written
        RecordStore(results).path("math", "family", label).unlink()
    for k in scorer_calls:
        scorer_calls[k].clear()
    run, again = model_run(tiny_bank, results, entries=("math",))
    assert run.written == 4 and scorer_calls["ce_row"] == [] and scorer_calls["fit"] == [3]
    for label in ("best-ce",) + MODEL_SETTINGS:
        assert again[("math", "family", label)]["coefficients"] == first[("math", "family", label)]["coefficients"]
    assert model_run(tiny_bank, results, entries=("math",))[0].written == 0 and scorer_calls["fit"] == [3]


def test_fit_and_ce_never_see_test_examples(tiny_bank, tmp_path, scorer_calls):
    from lorablend.dataset import load_dataset
    from lorablend.runtime.scoring import CE_EXAMPLES

    model_run(tiny_bank, tmp_path / "r", entries=("math",))
    bank = Bank.open(tiny_bank)
    ds = load_dataset(bank.dataset_path(bank.entry("math")), name="math")
    train, test = ds.split("train"), ds.split("test")
    assert len(scorer_calls["examples"]) == 3  # the ce row, then one fit per holdout
    for examples in scorer_calls["examples"]:
        assert examples == train[:CE_EXAMPLES] and not any(e in test for e in examples)
    assert not any(e in test for e in train[:CE_EXAMPLES])  # the splits themselves do not overlap


def test_bench_ce_row_equals_generates(tiny_bank, tmp_path):
    """The bench scores on the worker's (PEFT-wrapped) model; `generate` loads a plain one: same row."""
    from lorablend.bank.combination import combination
    from lorablend.dataset import load_dataset
    from lorablend.generate import mixture_scorer
    from lorablend.runtime.scoring import CE_EXAMPLES

    bank = Bank.open(tiny_bank)
    others = [n for n in bank.names if n != "music"]
    sm = WORKER.slot_model(bank.manifest.base_model, bank_modules(bank), 2, 4)
    sm.fill(0, combination(bank, {"math": 1.0}, "cat", readers=WORKER.readers(bank)))  # a slot that must not leak in
    sm.fill(1, combination(bank, {"code": 1.0}, "cat", readers=WORKER.readers(bank)))
    model_run(tiny_bank, tmp_path / "r", entries=("music",))
    cached = ce_cache(tmp_path / "r", "music")
    ds = load_dataset(bank.dataset_path(bank.entry("music")), name="music")
    scorer = mixture_scorer(bank, others, ds, CE_EXAMPLES)
    try:
        want = scorer.ce_row()
    finally:
        scorer.close()
    assert cached["names"] == others and np.allclose(cached["ce"], want, atol=1e-6, rtol=0)
    assert np.ptp(want) > 1e-3  # the adapters do change the loss: the comparison has something to compare


def bank_modules(bank):
    return next(iter(WORKER.readers(bank).values())).modules


def test_first_order_settings_share_one_backward_pass_and_one_ce_row_per_entry(tiny_bank, tmp_path, scorer_calls):
    from lorablend.generate import retrieve_union

    results = tmp_path / "r"
    run = run_bench(BenchConfig(bank=str(tiny_bank), results=results, entries=("math",),
                                **{**FAST, "settings": GRAD_SETTINGS}))
    records = {(r["entry"], r["holdout"], r["label"]): r for r in RecordStore(results).all()}
    assert run.written == run.total == len(records)
    assert scorer_calls["ce_row"] == [4]  # the ce row, once, sliced by both reranks, both holdouts and best-ce
    (path,) = (results / "ce").glob("math.grad.k*.json")
    cached = json.loads(path.read_text())
    grad, ce = dict(zip(cached["names"], cached["ce"])), dict(zip(*(lambda c: (c["names"], c["ce"]))(ce_cache(results, "math"))))
    assert cached["backward_seconds"] > 0 and cached["seconds_per_candidate"] > 0
    bank = Bank.open(tiny_bank)
    D = np.load(results / "matrices" / "D-tokens-js.npy")[bank.names.index("math")]
    for h in ("entry", "family"):
        excluded = records[("math", h, GRAD_SETTINGS[0])]["excluded"]
        usable = [n for n in bank.names if n not in excluded]
        top1, rerank, union = (records[("math", h, label)] for label in GRAD_SETTINGS)
        assert top1["coefficients"] == {min(usable, key=grad.get): 1.0} and top1["passes"] == 3
        pool = sorted(usable, key=grad.get)[:2]
        assert rerank["coefficients"] == {min(pool, key=ce.get): 1.0} and rerank["passes"] == 3 + len(pool)
        g = np.array([grad[n] if n in usable else np.inf for n in bank.names])
        d = np.where([n in usable for n in bank.names], D, np.inf)
        pool = [bank.names[j] for j in np.flatnonzero(np.isfinite(retrieve_union(g, d, 3)))]
        assert union["coefficients"] == {min(pool, key=ce.get): 1.0} and union["passes"] == 3 + len(pool)
        assert union["cost_s"] >= cached["backward_seconds"] + cached["seconds_per_candidate"] * len(usable)
    assert records[("math", "-", "base")]["passes"] is None


def test_bench_first_order_row_equals_generates(tiny_bank, tmp_path):
    """The bench takes the backward pass on the worker's PEFT-wrapped slot model; `generate` on a plain one."""
    from lorablend.bank.combination import combination
    from lorablend.dataset import load_dataset
    from lorablend.generate import first_order_row
    from lorablend.runtime.scoring import CE_EXAMPLES

    bank = Bank.open(tiny_bank)
    sm = WORKER.slot_model(bank.manifest.base_model, bank_modules(bank), 2, 4)
    sm.fill(0, combination(bank, {"math": 1.0}, "cat", readers=WORKER.readers(bank)))  # a slot that must not leak in
    run_bench(BenchConfig(bank=str(tiny_bank), results=tmp_path / "r", entries=("music",),
                          **{**FAST, "settings": GRAD_SETTINGS[:1]}))
    (path,) = (tmp_path / "r" / "ce").glob("music.grad.k*.json")
    cached = json.loads(path.read_text())
    ds = load_dataset(bank.dataset_path(bank.entry("music")), name="music")
    want = first_order_row(bank, cached["names"], ds, CE_EXAMPLES)
    assert np.allclose(cached["ce"], want, atol=1e-6, rtol=1e-5)
    assert np.ptp(want) > 1e-3


def test_recall_csv_says_whether_each_retrievers_top_m_holds_the_best_ce_adapter(tiny_bank, tmp_path):
    import csv

    results = tmp_path / "r"
    run_bench(BenchConfig(bank=str(tiny_bank), results=results, entries=("math", "code"),
                          **{**FAST, "settings": GRAD_SETTINGS[1:] + MODEL_SETTINGS[1:2]}))
    rows = list(csv.DictReader(open(results / "recall.csv")))
    assert {r["retriever"] for r in rows} == {"grad", "tokens/grad+js", "tokens/js"}
    assert {r["entry"] for r in rows} == {"math", "code"} and {r["holdout"] for r in rows} == {"entry", "family"}
    bank = Bank.open(tiny_bank)
    for e in ("math", "code"):
        c = ce_cache(results, e)
        ce = dict(zip(c["names"], c["ce"]))
        (path,) = (results / "ce").glob(f"{e}.grad.k*.json")
        g = json.loads(path.read_text())
        grad = dict(zip(g["names"], g["ce"]))
        family = bank.entry(e).family
        for h in ("entry", "family"):
            usable = [n for n in bank.names if n != e and (h == "entry" or bank.entry(n).family != family)]
            best = min(usable, key=ce.get)
            for m in (1, 2, 4):
                (got,) = [r for r in rows if (r["entry"], r["holdout"], r["retriever"], r["m"]) == (e, h, "grad", str(m))]
                assert got["found"] == str(int(best in sorted(usable, key=grad.get)[:m]))
    assert all(r["found"] == "1" for r in rows if r["m"] == "4" and r["holdout"] == "entry")  # 4 others: all kept
    # a later run of one setting under one holdout rewrites its own rows and keeps the others
    run_bench(BenchConfig(bank=str(tiny_bank), results=results, entries=("math",), holdouts=("family",),
                          **{**FAST, "settings": GRAD_SETTINGS[1:2]}))
    again = list(csv.DictReader(open(results / "recall.csv")))
    assert sorted(map(str, again)) == sorted(map(str, rows))


def test_a_study_resumes_from_its_committed_scores_csv(tiny_bank, tmp_path):
    """Records are scratch; scores.csv is what gets committed: with only the CSV left, a rerun restores the
    records, computes only what is new and exports the old rows unchanged."""
    import shutil

    results = tmp_path / "r"
    first = run_bench(BenchConfig(bank=str(tiny_bank), results=results, entries=("math",), **FAST))
    before, coefs = first.csv.read_text(), (results / "coefficients.json").read_text()
    shutil.rmtree(results / "records")
    again = run_bench(BenchConfig(bank=str(tiny_bank), results=results, entries=("math",), **FAST))
    assert again.written == 0 and again.csv.read_text() == before
    assert (results / "coefficients.json").read_text() == coefs  # restored records keep their coefficients
    assert any(v["math"] for by_label in json.loads(coefs).values() for v in by_label.values())
    shutil.rmtree(results / "records")
    grown = run_bench(BenchConfig(bank=str(tiny_bank), results=results, entries=("math",),
                                  **{**FAST, "settings": SETTINGS + ("tokens/kl/normalized/svd/T1",)}))
    restored = [r for r in RecordStore(results).all() if r.get("restored")]
    assert {r["control"] for r in restored} >= {"", "base"} and all(r["rank"] is None or r["rank"] > 0 for r in restored)
    new = [r for r in RecordStore(results).all() if not r.get("restored")]
    assert grown.written == len(new) > 0 and {r["label"] for r in new} >= {"tokens/kl/normalized/svd/T1"}
    assert set(before.splitlines()) <= set(grown.csv.read_text().splitlines())


def test_training_curves_from_zero_and_from_the_blend(tiny_bank, tmp_path):
    from lorablend.bench.report import read_scores, summarize

    results = tmp_path / "r"
    run = run_bench(BenchConfig(bank=str(tiny_bank), results=results, entries=("math",), train_steps=(1, 2),
                                **{**FAST, "settings": ("tokens/js/normalized/svd/T1",)}))
    records = {(r["entry"], r["holdout"], r["label"]): r for r in RecordStore(results).all()}
    assert run.written == run.total == len(records)
    for k in (1, 2):
        zero = records[("math", "-", f"train/{k}")]
        assert zero["passes"] == 1.5 * k and zero["training"]["from"] == "zero" and len(zero["training"]["losses"]) == k
        assert zero["eval_key"] == f"train:-:{k}" and zero["coefficients"] == {}
        for h in ("entry", "family"):
            ref = records[("math", h, f"refine/{k}")]
            assert ref["training"]["from"] == "blend" and ref["blend"] and ref["passes"] > 1.5 * k
            assert not set(ref["blend"]) & set(ref["excluded"])
    rows = {r.label: r for r in summarize(read_scores(run.csv), "family")}
    assert rows["train/2"].passes == 3.0 and rows["refine/1"].control == "refine"


def test_validated_selection_picks_on_valid_examples_and_scores_its_pick_on_test(tiny_bank, tmp_path):
    from lorablend.bench.report import read_scores, summarize, validated_table
    from lorablend.settings import DEFAULT_SETTING, NEAREST

    results = tmp_path / "r"
    default, nearest = parse_setting(DEFAULT_SETTING.label).label, parse_setting(NEAREST.label).label
    run = run_bench(BenchConfig(bank=str(tiny_bank), results=results, entries=("math", "code"),
                                **{**FAST, "settings": (default, NEAREST.label)}))
    records = {(r["entry"], r["holdout"], r["label"]): r for r in RecordStore(results).all()}
    assert run.written == run.total == len(records)
    bank = Bank.open(tiny_bank)
    for entry in ("math", "code"):
        from lorablend.dataset import load_dataset

        ds = load_dataset(bank.dataset_path(bank.entry(entry)), name=entry)
        seen = {e.input for e in ds.split("train")[:16]} | {e.input for e in bench_entry.test_sample(ds, 3, 0)}
        for h in ("entry", "family"):
            rec = records[(entry, h, "validated")]
            val = rec["validation"]
            pool = bench_entry.validation_pool(ds).split(val["examples"]["split"])
            held = {pool[i].input for i in val["examples"]["indices"]}
            assert held and not held & seen  # never the test sample nor what the settings selected on
            assert val["scores"][val["chosen"]] == max(val["scores"].values())
            candidates = {"setting's pick": records[(entry, h, default)], "nearest": records[(entry, h, nearest)],
                          "uniform": records[(entry, h, "uniform/svd")], "no adapter": records[(entry, "-", "base")]}
            pick = candidates[val["chosen"]]
            assert rec["eval_key"] == pick["eval_key"] and rec["rouge_l"] == pick["rouge_l"]
            assert rec["passes"] > records[(entry, h, default)]["passes"]
    summary = summarize(read_scores(run.csv), "entry")
    row = next(r for r in summary if r.label == "validated")
    assert row.control == "validated" and "nearest" in row.delta and "at or above base" in validated_table(summary)
