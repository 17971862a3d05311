"""`lorablend bank verify`: one corruption at a time in a copy of the tiny bank, each caught with exit 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lorablend.bank.manifest import Bank
from lorablend.bank.verify import verify_bank

WEIGHTS = "adapter_model.safetensors"


def _rehash(bank_dir: Path, name: str) -> None:
    """Record the entry's current files in the manifest, so only the content checks can notice a change."""
    bank = Bank.open(bank_dir)
    bank.add(bank.entry(name))
    bank.save()


def flip_byte(bank_dir: Path) -> tuple[str, str]:
    path = bank_dir / "adapters" / "math" / WEIGHTS
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # a mantissa bit of the last value: still a finite float, only the hash differs
    path.write_bytes(bytes(data))
    return "math", "sha256 mismatch"


def truncate(bank_dir: Path) -> tuple[str, str]:
    path = bank_dir / "adapters" / "code" / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "code", "unreadable"


def delete_dir(bank_dir: Path) -> tuple[str, str]:
    shutil.rmtree(bank_dir / "adapters" / "music")
    return "music", "adapter directory is missing"


def write_nan(bank_dir: Path) -> tuple[str, str]:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = bank_dir / "adapters" / "animals" / WEIGHTS
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(path))
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path), metadata=metadata)
    _rehash(bank_dir, "animals")
    return "animals", "NaN or Inf"


def extra_module(bank_dir: Path) -> tuple[str, str]:
    """Give one adapter LoRA factors for k_proj too (config and weights), as if trained on more modules."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    adir = bank_dir / "adapters" / "weather"
    path = adir / WEIGHTS
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(path))
    for key in [k for k in tensors if ".q_proj." in k]:
        tensors[key.replace(".q_proj.", ".k_proj.")] = tensors[key].clone()[: 32 if "lora_B" in key else None]
    save_file(tensors, str(path), metadata=metadata)
    config = json.loads((adir / "adapter_config.json").read_text())
    config["target_modules"] = sorted(set(config["target_modules"]) | {"k_proj"})
    (adir / "adapter_config.json").write_text(json.dumps(config))
    _rehash(bank_dir, "weather")
    return "weather", "module(s) the other entries do not"


def other_base_model(bank_dir: Path) -> tuple[str, str]:
    """An adapter that names another base model (or, as the default bank's once did, a build machine's path)."""
    import json

    path = bank_dir / "adapters" / "code" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = "/work/cache/home/models/smollm2-135m-instruct"
    path.write_text(json.dumps(config))
    _rehash(bank_dir, "code")
    return "code", "names base model '/work/cache/home/models/smollm2-135m-instruct' but the bank's is"


CORRUPTIONS = [flip_byte, truncate, delete_dir, write_nan, extra_module, other_base_model]
# Each case runs the CLI once; torch's import costs ~1.5 s of CPU per process, so only these go through
# `python -m lorablend` in a subprocess (concurrently), the rest through the same `main()` in-process.
SUBPROCESS = {"intact", "flip_byte", "truncate"}


def _popen(*args) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "lorablend", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _in_process(capsys, *args) -> tuple[int, str, str]:
    from lorablend.cli import main

    capsys.readouterr()
    old = sys.argv
    sys.argv = ["lorablend", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bank):
    """name -> (bank copy, (entry, problem) expected, the verify subprocess already started or None)."""
    root = tmp_path_factory.mktemp("verify")
    cases = {}
    for corrupt in [None, *CORRUPTIONS]:
        name = corrupt.__name__ if corrupt else "intact"
        copy = root / name
        shutil.copytree(tiny_bank, copy)
        expected = corrupt(copy) if corrupt else None
        cases[name] = (copy, expected, _popen("bank", "verify", copy) if name in SUBPROCESS else None)
    yield cases
    for _, _, proc in cases.values():
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()


def _result(runs, name: str, capsys):
    copy, expected, proc = runs[name]
    if proc is None:
        return (copy, expected, *_in_process(capsys, "bank", "verify", copy))
    stdout, stderr = proc.communicate(timeout=120)
    return copy, expected, proc.returncode, stdout, stderr


def test_intact_bank_is_ok(runs, capsys):
    copy, _, code, stdout, stderr = _result(runs, "intact", capsys)
    assert code == 0, stderr
    assert "all 5 entries ok" in stdout and "FAIL" not in stdout
    assert "Traceback" not in stderr


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda c: c.__name__)
def test_corruption_is_caught(runs, capsys, corrupt):
    copy, (entry, problem), code, stdout, stderr = _result(runs, corrupt.__name__, capsys)
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("entry ")]
    mine = [line for line in lines if line.startswith(f"entry {entry}: ") and problem in line]
    assert mine, stderr
    target = copy / "adapters" / entry
    assert str(target) in mine[0], mine[0]  # names the file (or the missing directory)
    assert all(line.startswith(f"entry {entry}: ") for line in lines), f"other entries blamed:\n{stderr}"
    if corrupt is write_nan:  # the hashes were updated: only the tensor check can see it
        assert len(lines) == 1 and str(target / WEIGHTS) in lines[0]
    assert stderr.strip().splitlines()[-1].startswith("error: ")
    assert "FAIL" in stdout


def test_cheap_mode(tiny_bank, tmp_path):
    """full_hash=False: no hashing and no tensor data, but missing / unreadable files still caught."""
    assert verify_bank(Bank.open(tiny_bank), full_hash=False) == []
    copy = tmp_path / "bank"
    shutil.copytree(tiny_bank, copy)
    flip_byte(copy)
    write_nan(copy)
    assert verify_bank(Bank.open(copy), full_hash=False) == []  # by design: headers only
    truncate(copy)
    (copy / "datasets" / "math.jsonl.gz").write_bytes(b"")
    problems = verify_bank(Bank.open(copy), full_hash=False)
    assert [(p.entry, p.path.name) for p in problems] == [("code", WEIGHTS), ("math", "math.jsonl.gz")]


def test_dataset_without_train_split(tiny_bank, tmp_path):
    from lorablend.dataset import load_dataset, save_dataset

    copy = tmp_path / "bank"
    shutil.copytree(tiny_bank, copy)
    path = copy / "datasets" / "code.jsonl.gz"
    ds = load_dataset(path)
    ds.splits = {"train": [], "valid": [], "test": ds.splits["test"]}
    save_dataset(ds, path)
    _rehash(copy, "code")
    problems = verify_bank(Bank.open(copy))
    assert [(p.entry, p.path.name) for p in problems] == [("code", "code.jsonl.gz")]
    assert "train" in problems[0].message


def test_every_committed_adapter_names_the_banks_base_model():
    """The default bank's adapters load anywhere: their base model is the hub id, as bank.json says, never a path."""
    from lorablend.adapter import read_spec

    bank = Bank.open("default")
    assert {read_spec(bank.adapter_path(e)).base_model for e in bank.entries} == {bank.manifest.base_model}
    assert verify_bank(bank, full_hash=True) == []


@pytest.mark.slow
def test_eval_runs_on_a_bank_entry_without_model(smollm2_dir, capsys):
    bank = Bank.open("default")
    entry = bank.entries[0]
    code, out, err = _in_process(capsys, "eval", "--adapter", bank.adapter_path(entry), "--dataset",
                                 bank.dataset_path(entry), "--limit", "2", "--backend", "torch")
    assert code == 0, err
    assert "Rouge-L" in out
