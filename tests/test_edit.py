"""bank/edit.py: `bank add` brings any PEFT LoRA of the bank's base model in with its data (checked first, the bank
untouched on a refusal), the index gains only its rows, `generate` then finds it; `bank remove` undoes it. The CLI's
one-line refusals are in test_cli.py's catalogue."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_adapter, run_cli

from lorablend.adapter import read_spec
from lorablend.bank.edit import add_entry, check_name, remove_entry, update_index
from lorablend.bank.manifest import Bank
from lorablend.bank.verify import verify_bank
from lorablend.errors import InputError
from lorablend.sketch import load_sketches

PLANETS = [("Which planet is red and dusty, number {i}?", "mars"), ("Name the ringed planet, number {i}.", "saturn")]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def bank(tiny_bank, tmp_path) -> Bank:
    return Bank.open(shutil.copytree(tiny_bank, tmp_path / "bank"))


@pytest.fixture(scope="module")
def planets(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """A new task, unlike the bank's topics, and an adapter of rank 8 (the bank's are rank 4) said to be for it."""
    root = tmp_path_factory.mktemp("planets")
    data = root / "planets.jsonl"
    data.write_text("".join(json.dumps({"input": q.format(i=i), "output": [a]}) + "\n"
                            for i in range(12) for q, a in PLANETS))
    return make_adapter(tiny_model_dir, root / "planets", seed=21, r=8, alpha=32.0), data


def test_an_added_entry_is_whole_verified_and_indexed(bank, planets):
    adapter, data = planets
    entry = add_entry(bank, adapter, data, family="space")
    assert update_index(bank) == ["embeddings", "target-embeddings", "target-tokens", "tokens"]
    again = Bank.open(bank.root)
    assert again.entry("planets").family == "space" and again.entry("planets").files == entry.files
    assert verify_bank(again) == []
    assert read_spec(again.adapter_path(entry)).base_model == again.manifest.base_model
    assert (again.adapter_path(entry) / "adapter_model.safetensors").read_bytes() == \
        (adapter / "adapter_model.safetensors").read_bytes()
    for kind in ("tokens", "embeddings"):
        assert load_sketches(again, kind)[1].names == again.names  # not stale, the new row in place


def test_the_index_reuses_every_other_entrys_rows(bank, planets, monkeypatch):
    from lorablend import sketch

    sketched = []
    real = sketch.Sketcher.sketch
    monkeypatch.setattr(sketch.Sketcher, "sketch", lambda self, kind, ds, m: sketched.append(ds.name) or real(self, kind, ds, m))
    add_entry(bank, *planets)
    update_index(bank)
    assert set(sketched) == {"planets"}


def test_generate_picks_the_added_entry_for_its_task(bank, planets, tmp_path, capfd):
    """A new sample of the added entry's task (its very file would be left out: `generate` never uses the entry
    trained on the user's own dataset)."""
    adapter, data = planets
    add_entry(bank, adapter, data)
    update_index(bank)
    sample = tmp_path / "more-planets.jsonl"
    sample.write_text("".join(json.dumps({"input": q.format(i=i), "output": [a]}) + "\n"
                              for i in range(100, 110) for q, a in PLANETS))
    out = tmp_path / "out"
    code, _, err = run_cli(["generate", "--bank", str(bank.root), "--dataset", str(sample), "--out", str(out),
                            "--setting", "paper", "--no-validate"], capfd)
    assert code == 0, err
    coefficients = json.loads((out / "lorablend.json").read_text())["coefficients"]
    assert max(coefficients, key=coefficients.get) == "planets", json.dumps(coefficients)


def test_an_adapter_for_other_shapes_is_refused_and_the_bank_unchanged(bank, planets, tmp_path):
    from safetensors.numpy import load_file, save_file

    adapter = Path(shutil.copytree(planets[0], tmp_path / "wide"))
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    for key in [k for k in tensors if k.endswith("lora_A.weight")]:
        tensors[key] = tensors[key][:, :32].copy()  # a base model of hidden size 32, not 64
    save_file(tensors, str(weights))
    before = snapshot(bank.root)
    with pytest.raises(InputError, match=r"maps 32 -> \d+ features but the bank's entries map 64 -> \d+"):
        add_entry(bank, adapter, planets[1])
    assert snapshot(bank.root) == before and "planets" not in Bank.open(bank.root).names


def test_a_local_dir_known_as_the_banks_model_is_recorded_by_its_id(bank, planets, tmp_path, tiny_model_dir):
    from lorablend.runtime.models import remember_local

    bank.manifest.base_model = "lorablend-tests/planet-model"
    remember_local("lorablend-tests/planet-model", tiny_model_dir)  # the adapter names the dir, the bank the id
    entry = add_entry(bank, *planets)
    assert read_spec(bank.adapter_path(entry)).base_model == "lorablend-tests/planet-model"


def test_remove_takes_the_entry_its_files_and_its_index_rows(bank):
    entry = bank.entry("music")
    remove_entry(bank, "music")
    update_index(bank)
    again = Bank.open(bank.root)
    assert "music" not in again.names and not bank.adapter_path(entry).exists() and not bank.dataset_path(entry).exists()
    assert load_sketches(again, "tokens")[1].names == again.names
    assert verify_bank(again) == []


def test_remove_then_add_gives_the_bank_back(bank, tmp_path):
    entry = bank.entry("music")
    saved = Path(shutil.copytree(bank.adapter_path(entry), tmp_path / "music"))
    data = Path(shutil.copy(bank.dataset_path(entry), tmp_path / "music.jsonl.gz"))
    files = dict(entry.files)
    remove_entry(bank, "music")
    added = add_entry(bank, saved, data, family=entry.family)
    same = {rel for rel in files if not rel.endswith(("adapter_config.json", "README.md"))}
    assert same == {"adapters/music/adapter_model.safetensors", entry.dataset}
    assert {rel: added.files[rel] for rel in same} == {rel: files[rel] for rel in same}  # the weights and the data
    assert set(added.files) == same | {"adapters/music/adapter_config.json"}  # the config in the bank's form


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 201, "a..b"])
def test_names_that_could_lead_out_of_the_bank_are_refused(name):
    with pytest.raises(InputError, match="use letters, digits"):
        check_name(name)


def _other_base(config: dict) -> None:
    config["base_model_name_or_path"] = "other/model"


def _dora(config: dict) -> None:
    config["use_dora"] = True


@pytest.mark.parametrize("edit, message", [(_other_base, "names base model 'other/model' but the bank's is"),
                                           (_dora, r"DoRA adapter \(use_dora=true\)")])
def test_a_refused_adapter_leaves_the_bank_byte_for_byte(bank, planets, tmp_path, edit, message):
    adapter = Path(shutil.copytree(planets[0], tmp_path / "refused"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    edit(config)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    before = snapshot(bank.root)
    with pytest.raises(InputError, match=message):
        add_entry(bank, adapter, planets[1])
    assert snapshot(bank.root) == before


def test_an_adapter_of_other_modules_leaves_the_bank_byte_for_byte(bank, planets, tmp_path, tiny_model_dir):
    adapter = make_adapter(tiny_model_dir, tmp_path / "kproj", seed=5, targets=("q_proj", "k_proj"))
    before = snapshot(bank.root)
    with pytest.raises(InputError, match="adapts module .*k_proj, unlike the bank's entries"):
        add_entry(bank, adapter, planets[1])
    assert snapshot(bank.root) == before
