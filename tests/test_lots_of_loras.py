"""`lorablend bank import-lots-of-loras`: a synthetic folder in the Lots-of-LoRAs layout becomes a bank."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_adapter

from lorablend.atomic import sha256_file
from lorablend.bank.manifest import Bank
from lorablend.bank.sources.lots_of_loras import import_lots_of_loras, scan_source, split_files
from lorablend.dataset import load_dataset
from lorablend.errors import InputError

BASE = "mistralai/Mistral-7B-Instruct-v0.2"
PREFIX = "Mistral-7B-Instruct-v0.2-4b-r16-"
# dataset repo -> (layout, split sizes)
DATASETS = {
    "task190_snli_classification": ("jsonl", {"train": 12, "valid": 3, "test": 5}),
    "task1_copa_question_generation": ("parquet", {"train": 9, "valid": 2, "test": 4}),
    "task36_qasc_topic_word": ("jsonl-validation", {"train": 7, "valid": 4, "test": 3}),
}


def _records(task: str, split: str, n: int) -> list[dict]:
    return [{"input": f"{task} {split} question {i}?", "output": [f"answer {i}", f"alt {i}"], "id": f"{task}-{split}-{i}"}
            for i in range(n)]


def _write_dataset_repo(root: Path, name: str, layout: str, sizes: dict[str, int]) -> None:
    repo = root / name
    repo.mkdir(parents=True)
    (repo / "README.md").write_text(f"# {name}\n")
    (repo / ".gitattributes").write_text("*.parquet filter=lfs\n")
    for split, n in sizes.items():
        recs = _records(name, split, n)
        if layout == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            file_split = "validation" if split == "valid" else split
            (repo / "data").mkdir(exist_ok=True)
            pq.write_table(pa.Table.from_pylist(recs), repo / "data" / f"{file_split}-00000-of-00001.parquet")
        else:
            file_split = "validation" if split == "valid" and layout == "jsonl-validation" else split
            (repo / f"{file_split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def _set_base(adapter_dir: Path, base: str) -> None:
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base
    cfg_path.write_text(json.dumps(cfg, indent=2))


@pytest.fixture(scope="module")
def lol_src(tmp_path_factory, tiny_model_dir) -> Path:
    """3 paired adapter + dataset repos and one adapter (task999) without a dataset."""
    src = tmp_path_factory.mktemp("lol") / "src"
    for seed, name in enumerate(DATASETS):
        task = name.split("_")[0]
        make_adapter(tiny_model_dir, src / f"{PREFIX}{task}", seed=seed, r=4)
        _set_base(src / f"{PREFIX}{task}", BASE)
        _write_dataset_repo(src, name, *DATASETS[name])
    shutil.copytree(src / f"{PREFIX}task190", src / f"{PREFIX}task999")
    return src


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "lorablend", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_import_cli(lol_src, tmp_path):
    bank_dir = tmp_path / "bank"
    run = _cli("bank", "import-lots-of-loras", lol_src, "--out", bank_dir)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert "1 adapter repo(s) without a dataset repo" in run.stderr and f"{PREFIX}task999" in run.stderr
    assert "3 imported" in run.stdout

    manifest = json.loads((bank_dir / "bank.json").read_text())
    assert manifest["base_model"] == BASE and manifest["tokenizer"] == BASE
    assert sorted(e["name"] for e in manifest["entries"]) == sorted(DATASETS)
    for e in manifest["entries"]:
        name, task = e["name"], e["name"].split("_")[0]
        assert e["family"] is None
        assert e["adapter_dir"] == f"adapters/{name}" and e["dataset"] == f"datasets/{name}.jsonl.gz"
        adir = bank_dir / e["adapter_dir"]
        assert adir.is_dir() and not adir.is_symlink()
        for fname in ("adapter_config.json", "adapter_model.safetensors"):
            copied, source = adir / fname, lol_src / f"{PREFIX}{task}" / fname
            assert not copied.is_symlink()
            assert e["files"][f"{e['adapter_dir']}/{fname}"] == sha256_file(copied) == sha256_file(source)
        assert e["files"][e["dataset"]] == sha256_file(bank_dir / e["dataset"])
        ds = load_dataset(bank_dir / e["dataset"])
        assert {s: len(v) for s, v in ds.splits.items()} == DATASETS[name][1]
        assert all(len(x.outputs) == 2 for x in ds.splits["train"])
        assert e["info"]["task"] == int(task[4:]) and e["info"]["examples"] == DATASETS[name][1]
    assert not list(bank_dir.glob("adapters/.*")), "temporary dirs left behind"

    before = (bank_dir / "bank.json").read_bytes()
    again = _cli("bank", "import-lots-of-loras", lol_src, "--out", bank_dir)
    assert again.returncode == 0, again.stderr
    assert "0 imported, 3 already present" in again.stdout
    assert (bank_dir / "bank.json").read_bytes() == before

    info = _cli("bank", "info", bank_dir, "--json")
    assert info.returncode == 0, info.stderr
    listed = json.loads(info.stdout)
    assert sorted(e["name"] for e in listed["entries"]) == sorted(DATASETS)
    assert listed["base_model"] == BASE


def test_split_files_layouts(lol_src):
    files = split_files(lol_src / "task1_copa_question_generation")
    assert sorted(files) == ["test", "train", "valid"]
    assert files["train"][0].name == "train-00000-of-00001.parquet"
    files = split_files(lol_src / "task36_qasc_topic_word")
    assert files["valid"][0].name == "validation.jsonl"


def test_families_limit_force(lol_src, tmp_path):
    fams = {"task190_snli_classification": "snli", "task1_copa_question_generation": "copa"}
    r1 = import_lots_of_loras(lol_src, tmp_path / "b", families=fams, limit=2)
    assert r1.imported == ["task1_copa_question_generation", "task36_qasc_topic_word"]  # by task number
    b = Bank.open(tmp_path / "b")
    assert {e.name: e.family for e in b.entries} == {"task1_copa_question_generation": "copa",
                                                     "task36_qasc_topic_word": None}
    r2 = import_lots_of_loras(lol_src, tmp_path / "b", force=True)
    assert sorted(r2.imported) == sorted(DATASETS) and not r2.present
    b = Bank.open(tmp_path / "b")
    assert b.entry("task1_copa_question_generation").family == "copa"  # kept on re-import without --families
    r3 = import_lots_of_loras(lol_src, tmp_path / "b", families={"task36_qasc_topic_word": "qasc"})
    assert not r3.imported and Bank.open(tmp_path / "b").entry("task36_qasc_topic_word").family == "qasc"


def test_hf_cache_layout(lol_src, tmp_path):
    """models--Lots-of-LoRAs--X/snapshots/<rev>/ with files symlinked to blobs, as huggingface_hub leaves them."""
    src = tmp_path / "hub"
    for kind, name in (("models", f"{PREFIX}task190"), ("datasets", "task190_snli_classification")):
        cache = src / f"{kind}--Lots-of-LoRAs--{name}"
        snap = cache / "snapshots" / "abc123"
        (cache / "blobs").mkdir(parents=True)
        (cache / "refs").mkdir()
        (cache / "refs" / "main").write_text("abc123")
        snap.mkdir(parents=True)
        for f in sorted((lol_src / name).iterdir()):
            if f.is_file():
                blob = cache / "blobs" / sha256_file(f)
                shutil.copyfile(f, blob)
                (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    scan = scan_source(src)
    assert [(a.name, d.name) for a, d in scan.pairs] == [(f"{PREFIX}task190", "task190_snli_classification")]
    report = import_lots_of_loras(src, tmp_path / "bank")
    assert report.imported == ["task190_snli_classification"]
    weights = tmp_path / "bank" / "adapters" / "task190_snli_classification" / "adapter_model.safetensors"
    assert weights.is_file() and not weights.is_symlink()


def test_base_models_disagree(lol_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(lol_src, src)
    _set_base(src / f"{PREFIX}task36", "meta-llama/Llama-2-7b-hf")
    with pytest.raises(InputError, match="disagree on the base model") as err:
        import_lots_of_loras(src, tmp_path / "bank")
    assert BASE in str(err.value) and "meta-llama/Llama-2-7b-hf" in str(err.value)
    assert not (tmp_path / "bank" / "bank.json").exists()


def test_nothing_pairs(lol_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(lol_src / f"{PREFIX}task999", src / f"{PREFIX}task999")
    run = _cli("bank", "import-lots-of-loras", src, "--out", tmp_path / "bank")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "pairs with a dataset repo" in run.stderr


def test_bad_dataset_is_reported_and_others_imported(lol_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(lol_src, src)
    (src / "task36_qasc_topic_word" / "train.jsonl").write_text('{"input": "x"}\n')  # no output
    report = import_lots_of_loras(src, tmp_path / "bank")
    assert sorted(report.imported) == ["task190_snli_classification", "task1_copa_question_generation"]
    assert "no 'output'" in report.failed["task36_qasc_topic_word"]
    assert "task36_qasc_topic_word" not in Bank.open(tmp_path / "bank").names
