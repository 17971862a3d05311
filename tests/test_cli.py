"""cli.py: its one-line errors (issue 6, the catalogue of bad inputs), and options that give the same run.

Every case runs the real CLI (`lorablend.cli.main`, through `run_cli` in conftest.py).

Each case must end with the documented exit code (2: bad input or usage, 1: any other
failure, 130: Ctrl-C), exactly one line on stderr that names the file / field / entry
and how to fix it, no Python traceback, and nothing new on disk: the case's whole
directory (bank copy, dataset, --out's parent) is listed before and after, and no
`.*.tmp` file or dir may remain.

The CLI runs in-process (the import of torch would cost seconds per case in a
subprocess); `test_in_process_runs_match_subprocess_runs` checks on a few cases that
a real `python -m lorablend` gives the same exit code and stderr.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_adapter, make_bank, make_dataset_file, run_cli

ENTRY = "code"  # the entry the bank cases corrupt (not the first one, which the others are compared with)
MODULE = "base_model.model.model.layers.0.self_attn.q_proj"


# --------------------------------------------------------------------------- #
# What a case leaves on disk (the CLI itself runs through `run_cli`, in conftest.py)
# --------------------------------------------------------------------------- #


def listing(root: Path) -> dict[str, int]:
    """Every file and dir under root (relative path -> size, -1 for dirs)."""
    return {str(p.relative_to(root)): (-1 if p.is_dir() else p.stat().st_size) for p in sorted(root.rglob("*"))}


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".old")]


# --------------------------------------------------------------------------- #
# Session fixtures: extra adapters and banks, built once
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="session")
def extras(tmp_path_factory, tiny_model_dir):
    """Adapters and a bank the tiny bank lacks: other target modules, another rank/alpha, one entry."""
    from transformers import AutoTokenizer

    from lorablend.bank.manifest import Bank
    from lorablend.sketch import build_index

    root = tmp_path_factory.mktemp("error-extras")
    single = make_bank(root / "single", tiny_model_dir, topics=("math",))
    build_index(Bank.open(single), ("tokens",))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens([f"<extra_{i}>" for i in range(7)])
    tok.save_pretrained(root / "grown-tokenizer")
    return {
        "kproj": make_adapter(tiny_model_dir, root / "kproj", seed=11, targets=("q_proj", "k_proj")),
        "rank8": make_adapter(tiny_model_dir, root / "rank8", seed=12, r=8, alpha=32.0),
        "single": single,
        "grown_tokenizer": root / "grown-tokenizer",
    }


SETTING_OPTIONS = {"--setting", "--sketch", "--metric", "--operator", "--combine", "--temperature", "--top-k", "--rank",
                   "--rerank", "--auto", "--validate", "--no-validate", "--fit-budget", "--ce-examples"}


class Ctx:
    """One case's directory: a private copy of the tiny bank, a user dataset and an --out path."""

    def __init__(self, tmp: Path, tiny_bank: Path, extras: dict, monkeypatch):
        self.tmp = tmp
        self.extras = extras
        self.monkeypatch = monkeypatch
        self.bank = tmp / "bank"
        shutil.copytree(tiny_bank, self.bank)
        self.dataset = make_dataset_file(tmp / "mine.jsonl", "math", n=20, seed=7)
        self.out = tmp / "out"

    def gen(self, *extra: str, bank=None, dataset=None, out=None) -> list[str]:
        """A generate command; without setting options, the paper's setting and no validation, the path these
        cases were written for (`test_default_generate_*` cover the default's own path)."""
        chosen = any(a.split("=")[0] in SETTING_OPTIONS for a in extra)
        return ["generate", "--bank", str(bank or self.bank), "--dataset", str(dataset or self.dataset),
                "--out", str(out or self.out), *extra, *(() if chosen else ("--setting", "paper", "--no-validate"))]

    def write(self, name: str, data: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def jsonl(self, name: str, records: list) -> Path:
        return self.write(name, "".join(json.dumps(r) + "\n" for r in records))

    def edit_json(self, path: Path, fn) -> None:
        obj = json.loads(path.read_text())
        fn(obj)  # edits obj in place
        path.write_text(json.dumps(obj, indent=2))

    def manifest(self, fn) -> None:
        self.edit_json(self.bank / "bank.json", fn)

    def index(self, fn) -> None:
        self.edit_json(self.bank / "index" / "index.json", fn)

    def adapter(self, entry: str = ENTRY) -> Path:
        return self.bank / "adapters" / entry

    def config(self, fn, entry: str = ENTRY) -> None:
        self.edit_json(self.adapter(entry) / "adapter_config.json", fn)

    def tensors(self, fn, entry: str = ENTRY) -> None:
        from safetensors.numpy import load_file, save_file

        path = self.adapter(entry) / "adapter_model.safetensors"
        t = load_file(str(path))
        fn(t)  # edits t in place
        save_file(t, str(path))

    def copy_adapter(self, extra: str = "rank8") -> Path:
        """A copy of one of the extra adapters, outside the bank, as a user would `bank add` it."""
        return Path(shutil.copytree(self.extras[extra], self.tmp / "mine-adapter", dirs_exist_ok=True))

    def rehash(self, entry: str = ENTRY) -> None:
        """Record the entry's current files in bank.json (as a rebuild would)."""
        from lorablend.bank.manifest import Bank

        bank = Bank.open(self.bank)
        bank.add(bank.entry(entry))
        bank.save()


@pytest.fixture
def ctx(tmp_path, tiny_bank, extras, monkeypatch):
    return Ctx(tmp_path, tiny_bank, extras, monkeypatch)


# --------------------------------------------------------------------------- #
# The catalogue: (setup -> argv, exit code, pattern the error line must match)
# --------------------------------------------------------------------------- #

CASES = []


def case(case_id: str, code: int, pattern: str):
    def register(fn):
        CASES.append(pytest.param(fn, code, pattern, id=case_id))
        return fn
    return register


# -- datasets ------------------------------------------------------------------


@case("dataset-empty", 2, r"mine\.jsonl: no records; .*'input' and 'output'")
def _(c):
    return c.gen(dataset=c.write("mine.jsonl", ""))


@case("dataset-blank-lines-only", 2, r"mine\.jsonl: no records")
def _(c):
    return c.gen(dataset=c.write("mine.jsonl", "\n  \n\n"))


@case("dataset-record-without-input", 2, r"mine\.jsonl:2: record has no 'input' field \(fields: question_text, output\)")
def _(c):
    return c.gen(dataset=c.jsonl("mine.jsonl", [{"input": "a", "output": "b"}, {"question_text": "a", "output": "b"}]))


@case("dataset-record-without-output", 2, r"mine\.jsonl:1: record has no 'output' or 'target' field.*add the reference")
def _(c):
    return c.gen(dataset=c.jsonl("mine.jsonl", [{"input": "a", "label": "b"}]))


@case("dataset-output-empty-list", 2, r"mine\.jsonl:2: 'output' is an empty list; give at least one reference")
def _(c):
    return c.gen(dataset=c.jsonl("mine.jsonl", [{"input": "a", "output": ["b"]}, {"input": "c", "output": []}]))


@case("dataset-output-not-text", 2, r"mine\.jsonl:1: 'output' must be a string, got dict")
def _(c):
    return c.gen(dataset=c.jsonl("mine.jsonl", [{"input": "a", "output": {"text": "b"}}]))


@case("dataset-not-utf8", 2, r"mine\.jsonl: not UTF-8 text \(bad byte at offset \d+\); re-save the file as UTF-8")
def _(c):
    return c.gen(dataset=c.write("mine.jsonl", b'{"input": "caf\xe9", "output": "x"}\n'))


@case("dataset-lone-surrogate", 2, r"mine\.jsonl:1: 'input' is not valid Unicode")
def _(c):
    return c.gen(dataset=c.write("mine.jsonl", '{"input": "bad \\ud800 half", "output": "x"}\n'))


@case("dataset-invalid-json-line", 2, r"mine\.jsonl:2: invalid JSON \(.* at column \d+\)")
def _(c):
    return c.gen(dataset=c.write("mine.jsonl", '{"input": "a", "output": "b"}\n{"input": "a", "output": \n'))


@case("dataset-10mb-single-line", 2, r"mine\.jsonl:1: 'input' has 10,000,000 characters, above the 1,000,000 limit; shorten")
def _(c):
    return c.gen(dataset=c.jsonl("mine.jsonl", [{"input": "x" * 10_000_000, "output": "y"}]))


@case("dataset-csv-10mb-field", 2, r"mine\.csv:2: .*above the 1,000,000.*limit; shorten")
def _(c):
    return c.gen(dataset=c.write("mine.csv", "input,output\n" + "x" * 10_000_000 + ",y\n"))


@case("dataset-csv-without-header", 2, r"mine\.csv: CSV header must name an 'input' and an 'output'.*found: What is two plus two\?")
def _(c):
    return c.gen(dataset=c.write("mine.csv", "What is two plus two?,four\nWhat is one plus one?,two\n"))


@case("dataset-parquet-other-columns", 2, r"mine\.parquet: Parquet file needs an 'input' and an 'output'.*found: text, label")
def _(c):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), c.tmp / "mine.parquet")
    return c.gen(dataset=c.tmp / "mine.parquet")


@case("dataset-parquet-garbage", 2, r"mine\.parquet: cannot read as Parquet")
def _(c):
    return c.gen(dataset=c.write("mine.parquet", b"PAR1 this is not parquet"))


@case("dataset-task-json-without-examples", 2, r"task\.json: a JSON object needs an 'examples' list")
def _(c):
    (c.tmp / "mytask").mkdir()
    path = c.tmp / "mytask" / "task.json"
    path.write_text(json.dumps({"name": "mytask", "description": "no examples here", "keywords": []}))
    return c.gen(dataset=path)


@case("dataset-unknown-format", 2, r"mine\.txt: unknown dataset format '\.txt'; use \.jsonl")
def _(c):
    return c.gen(dataset=c.write("mine.txt", "input: a\noutput: b\n"))


@case("dataset-missing-file", 2, r"nope\.jsonl: no such file")
def _(c):
    return c.gen(dataset=c.tmp / "nope.jsonl")


@case("dataset-is-a-directory", 2, r"mine\.jsonl: is a directory; give a dataset file")
def _(c):
    c.dataset.unlink()
    c.dataset.mkdir()
    return c.gen()


@case("dataset-bad-gzip", 2, r"mine\.jsonl\.gz: not a valid gzip file .*; re-compress it")
def _(c):
    return c.gen(dataset=c.write("mine.jsonl.gz", b"\x1f\x8b\x08 definitely not gzip"))


@case("dataset-no-train-split", 2, r"mine\.jsonl: no 'train' split \(splits present: test\)")
def _(c):
    return c.gen(dataset=c.jsonl("mine.jsonl", [{"input": "a", "output": "b", "split": "test"}] * 3))


@case("dataset-rich-markup-in-field-names", 2, r"mine\.jsonl:1: record has no 'input' field \(fields: \[/x\], \[bold\]y, :smile:\)")
def _(c):
    return c.gen(dataset=c.jsonl("mine.jsonl", [{"[/x]": 1, "[bold]y": 2, ":smile:": 3}]))


# -- banks ---------------------------------------------------------------------


@case("bank-manifest-missing", 2, r"bank\.json: bank manifest not found; build it with `lorablend bank build`")
def _(c):
    (c.bank / "bank.json").unlink()
    return c.gen()


@case("bank-dir-missing", 2, r"nowhere/bank\.json: bank manifest not found; check the path")
def _(c):
    return c.gen(bank=c.tmp / "nowhere")


@case("bank-manifest-invalid-json", 2, r"bank\.json: invalid JSON .*; restore the file or rebuild the bank")
def _(c):
    path = c.bank / "bank.json"
    path.write_text(path.read_text()[:-40])
    return c.gen()


@case("bank-manifest-not-lorablend", 2, r"bank\.json: not a lorablend bank manifest")
def _(c):
    c.manifest(lambda m: m.pop("format"))
    return c.gen()


@case("bank-manifest-future-version", 2, r"bank\.json: bank format version 99 is newer than this lorablend supports \(1\); upgrade")
def _(c):
    c.manifest(lambda m: m.update(version=99))
    return c.gen()


@case("bank-manifest-without-version", 2, r"bank\.json: manifest has no valid 'version'")
def _(c):
    c.manifest(lambda m: m.pop("version"))
    return c.gen()


@case("bank-entries-not-a-list", 2, r"bank\.json: 'entries' must be a list of entries")
def _(c):
    c.manifest(lambda m: m.update(entries={"code": {}}))
    return c.gen()


@case("bank-entry-field-wrong-type", 2, r"bank\.json: entry 1 \(code\): 'files' must be an object")
def _(c):
    c.manifest(lambda m: m["entries"][1].update(files=["adapters/code"]) if m["entries"][1]["name"] == "code" else None)
    return c.gen()


@case("bank-duplicate-entry-names", 2, r"bank\.json: duplicate entry name 'code'; entry names must be unique")
def _(c):
    c.manifest(lambda m: m["entries"].append(dict(m["entries"][1])))
    return c.gen()


@case("bank-entry-adapter-missing", 2, r"adapters/code/adapter_config\.json: adapter config not found")
def _(c):
    shutil.rmtree(c.adapter())
    return c.gen()


@case("bank-entry-dataset-missing-index", 2, r"entry code: .*datasets/code\.jsonl\.gz: dataset file is missing; restore it")
def _(c):
    (c.bank / "datasets" / "code.jsonl.gz").unlink()
    shutil.rmtree(c.bank / "index")
    return ["bank", "index", str(c.bank), "--sketch", "tokens"]


@case("bank-entry-dataset-missing-verify", 2, r"entry code: .*datasets/code\.jsonl\.gz: file is missing; restore it")
def _(c):
    (c.bank / "datasets" / "code.jsonl.gz").unlink()
    return c.gen("--verify")


@case("bank-single-entry-leave-one-out", 2, r"no bank entry is left to combine: .*excluded: math.*; use a bank with more entries")
def _(c):
    single = c.tmp / "single"
    shutil.copytree(c.extras["single"], single)
    return c.gen(bank=single, dataset=single / "datasets" / "math.jsonl.gz")


@case("bank-index-missing", 2, r"bank: no 'tokens' sketches in the index; run `lorablend bank index .*--sketch tokens`")
def _(c):
    shutil.rmtree(c.bank / "index")
    return c.gen()


@case("auto-bank-index-missing", 2, r"bank: no 'tokens' sketches in the index; run `lorablend bank index .*--sketch tokens`")
def _(c):
    shutil.rmtree(c.bank / "index")
    return c.gen("--auto")


@case("bank-index-stale", 2, r"bank: index is stale for code; run `lorablend bank index")
def _(c):
    c.manifest(lambda m: [e["files"].update({e["dataset"]: "0" * 64}) for e in m["entries"] if e["name"] == ENTRY])
    return c.gen()


@case("bank-index-other-tokenizer", 2, r"index\.json: .*built with tokenizer 'other/tokenizer'.*bank uses .*; re-index")
def _(c):
    c.index(lambda m: m.update(tokenizer="other/tokenizer"))
    return c.gen()


@case("bank-tokenizer-vocab-changed", 2, r"tokenizer .*grown-tokenizer has \d+ tokens but the 'tokens' index has \d+; re-index")
def _(c):
    tok = str(c.extras["grown_tokenizer"])
    c.manifest(lambda m: m.update(tokenizer=tok))
    c.index(lambda m: m.update(tokenizer=tok))
    return c.gen()


@case("bank-tokenizer-unloadable", 2, r"cannot load the bank's tokenizer .*no-such-tokenizer.*; make it available offline .* fix 'tokenizer' in the bank's bank\.json")
def _(c):
    tok = str(c.tmp / "no-such-tokenizer")
    c.manifest(lambda m: m.update(tokenizer=tok))
    c.index(lambda m: m.update(tokenizer=tok))
    return c.gen()


@case("bank-tokenizer-not-json", 2, r"cannot load the bank's tokenizer .*bad-tokenizer' \(Expecting value.*\); .*fix 'tokenizer' in the bank's bank\.json")
def _(c):
    tok = c.tmp / "bad-tokenizer"
    shutil.copytree(c.extras["grown_tokenizer"], tok)
    (tok / "tokenizer.json").write_text("<html>not a tokenizer</html>")
    c.manifest(lambda m: m.update(tokenizer=str(tok)))
    c.index(lambda m: m.update(tokenizer=str(tok)))
    return c.gen()


@case("bank-empty", 2, r"bank: the bank has no entries; add some with `lorablend bank build")
def _(c):
    c.manifest(lambda m: m.update(entries=[]))
    return c.gen()


@case("bank-empty-index", 2, r"bank: the bank has no entries")
def _(c):
    c.manifest(lambda m: m.update(entries=[]))
    shutil.rmtree(c.bank / "index")
    return ["bank", "index", str(c.bank)]


@case("bank-index-truncated", 2, r"index/tokens\.npz: unreadable or damaged index file \(.*\); rebuild it with `lorablend bank index .*bank`$")
def _(c):
    path = c.bank / "index" / "tokens.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return c.gen()


@case("bank-index-wrong-shapes", 2, r"index/tokens\.npz: unreadable or damaged index file \(5 histograms for 4 names\); rebuild it with `lorablend bank index")
def _(c):
    path = c.bank / "index" / "tokens.npz"
    with np.load(path) as z:
        arrays = dict(z)
    arrays["names"] = arrays["names"][:-1]
    np.savez_compressed(path, **arrays)
    return c.gen()


@case("bank-index-embeddings-wrong-shapes", 2, r"index/embeddings\.npz: unreadable or damaged index file \(arrays of inconsistent shapes")
def _(c):
    path = c.bank / "index" / "embeddings.npz"
    with np.load(path) as z:
        arrays = dict(z)
    arrays["offsets"] = arrays["offsets"][:-1]
    np.savez_compressed(path, **arrays)
    return c.gen("--sketch", "embeddings")


def _outside(c, entry: str = ENTRY) -> Path:
    """A copy of the entry's adapter outside the bank (its sha256 in bank.json still matches)."""
    shutil.copytree(c.adapter(entry), c.tmp / "outside" / entry)
    return c.tmp / "outside" / entry


@case("bank-entry-path-escapes", 2, r"bank\.json: entry 1 \(code\): 'adapter_dir' '\.\./outside/code' points outside the bank .*; restore the file or rebuild")
def _(c):
    _outside(c)
    c.manifest(lambda m: m["entries"][1].update(adapter_dir="../outside/code"))
    return c.gen()


@case("bank-entry-path-escapes-verify", 2, r"bank\.json: entry 1 \(code\): 'dataset' '\.\./outside/code\.jsonl\.gz' points outside the bank")
def _(c):
    shutil.copy(c.bank / "datasets" / "code.jsonl.gz", c.tmp / "outside.jsonl.gz")
    c.manifest(lambda m: m["entries"][1].update(dataset="../outside/code.jsonl.gz"))
    return ["bank", "verify", str(c.bank)]


@case("bank-entry-path-absolute", 2, r"bank\.json: entry 1 \(code\): 'files' '/.*/outside/code/adapter_config\.json' points outside the bank")
def _(c):
    outside = _outside(c)
    c.manifest(lambda m: m["entries"][1]["files"].update({str(outside / "adapter_config.json"): "0" * 64}))
    return ["bank", "verify", str(c.bank)]


@case("bank-entry-symlink-leads-out", 2, r"bank\.json: entry 1 \(code\): 'adapter_dir' 'adapters/code' points outside the bank .*symlinks included")
def _(c):
    outside = _outside(c)
    shutil.rmtree(c.adapter())
    c.adapter().symlink_to(outside, target_is_directory=True)
    return c.gen()


# -- adapters ------------------------------------------------------------------


@case("adapter-for-another-base-model", 2, r"entry code: adapter is for base model meta-llama/Llama-2-7b-hf, the bank is for .*; remove it")
def _(c):
    c.config(lambda cfg: cfg.update(base_model_name_or_path="meta-llama/Llama-2-7b-hf"))
    return c.gen()


@case("adapter-other-target-modules", 2, r"entry code: target modules differ from entry animals \(e\.g\. .*k_proj\); all bank adapters")
def _(c):
    shutil.rmtree(c.adapter())
    shutil.copytree(c.extras["kproj"], c.adapter())
    c.rehash()
    return c.gen()


@case("adapter-shape-mismatch", 2, r"entry code: module .*q_proj maps 48 -> 64 features but entry animals maps 64 -> 64")
def _(c):
    def narrow(t):
        t[f"{MODULE}.lora_A.weight"] = np.ascontiguousarray(t[f"{MODULE}.lora_A.weight"][:, :48])
    c.tensors(narrow)
    return c.gen()


@case("adapter-shape-mismatch-default-setting", 2, r"adapters/code: module .*q_proj maps 48 -> 64 features but the base "
      r"model maps 64 -> 64; the adapters are not for one base model")
def _(c):
    c.tensors(_narrow)
    return c.gen("--validate", "--backend", "torch", "--budget", "0")  # the default setting: its rerank stacks them


@case("adapter-shape-mismatch-default-budget", 2, r"entry code: module .*q_proj maps 48 -> 64 features but entry "
      r"\w+ maps 64 -> 64; the adapters are not for one base model: remove entry code from the bank")
def _(c):
    c.tensors(_narrow)
    return c.gen("--validate", "--backend", "torch")  # the default budget: the uniform candidate combines them all


def _narrow(t):
    """An adapter of another base model's shape: q_proj's A maps 48 features, not 64."""
    t[f"{MODULE}.lora_A.weight"] = np.ascontiguousarray(t[f"{MODULE}.lora_A.weight"][:, :48])


@case("adapter-shape-mismatch-grad", 2, r"adapters/code: module .*q_proj maps 48 -> 64 features but the base model")
def _(c):
    def narrow(t):
        t[f"{MODULE}.lora_A.weight"] = np.ascontiguousarray(t[f"{MODULE}.lora_A.weight"][:, :48])
    c.tensors(narrow)
    return c.gen("--metric", "grad", "--top-k", "1")


@case("adapter-inconsistent-factor-shapes", 2, r"adapters/code/adapter_model\.safetensors: module .*q_proj has inconsistent shapes")
def _(c):
    def cut(t):
        t[f"{MODULE}.lora_B.weight"] = np.ascontiguousarray(t[f"{MODULE}.lora_B.weight"][:, :3])
    c.tensors(cut)
    return c.gen()


@case("adapter-rank-differs-from-config", 2, r"adapters/code/adapter_model\.safetensors: module .*q_proj has rank 4 but adapter_config\.json says 8")
def _(c):
    c.config(lambda cfg: cfg.update(r=8))
    return c.gen()


@case("adapter-nan", 2, r"adapters/code/adapter_model\.safetensors: module .*q_proj holds NaN or Inf values; the adapter is corrupt")
def _(c):
    c.tensors(lambda t: t[f"{MODULE}.lora_B.weight"].__setitem__((0, 0), np.nan))
    return c.gen()


@case("adapter-inf", 2, r"adapters/code/adapter_model\.safetensors: module .*q_proj holds NaN or Inf values")
def _(c):
    c.tensors(lambda t: t[f"{MODULE}.lora_A.weight"].__setitem__((1, 2), -np.inf))
    return c.gen()


@case("adapter-truncated-safetensors", 2, r"adapters/code/adapter_model\.safetensors: unreadable safetensors file .*; re-download or rebuild")
def _(c):
    path = c.adapter() / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return c.gen()


@case("adapter-weights-missing", 2, r"adapters/code/adapter_model\.safetensors: adapter weights not found")
def _(c):
    (c.adapter() / "adapter_model.safetensors").unlink()
    return c.gen()


@case("adapter-config-invalid-json", 2, r"adapters/code/adapter_config\.json: invalid JSON")
def _(c):
    (c.adapter() / "adapter_config.json").write_text("{'r': 4,")
    return c.gen()


@case("adapter-config-bad-value", 2, r"adapters/code/adapter_config\.json: invalid LoRA config \(.*\); fix r, lora_alpha")
def _(c):
    c.config(lambda cfg: cfg.update(r="four"))
    return c.gen()


@case("adapter-lora-b-missing", 2, r"adapters/code/adapter_model\.safetensors: '.*q_proj\.lora_B\.weight' is missing .*corrupt")
def _(c):
    c.tensors(lambda t: t.pop(f"{MODULE}.lora_B.weight"))
    return c.gen()


@case("adapter-dora-in-config", 2, r"adapters/code/adapter_config\.json: DoRA adapter \(use_dora=true\) cannot be combined exactly")
def _(c):
    c.config(lambda cfg: cfg.update(use_dora=True))
    return c.gen()


@case("adapter-dora-magnitude-tensor", 2, r"adapters/code/adapter_model\.safetensors: unsupported tensor '.*lora_magnitude_vector.*' \(DoRA")
def _(c):
    c.tensors(lambda t: t.update({f"{MODULE}.lora_magnitude_vector": np.ones(64, dtype=np.float32)}))
    return c.gen()


@case("adapter-not-lora", 2, r"adapters/code/adapter_config\.json: peft_type LOHA is not LoRA")
def _(c):
    c.config(lambda cfg: cfg.update(peft_type="LOHA"))
    return c.gen()


@case("adapter-sha256-mismatch-verify", 2, r"entry code: .*adapters/code/adapter_model\.safetensors: sha256 mismatch .*restore it")
def _(c):
    c.tensors(lambda t: t[f"{MODULE}.lora_A.weight"].__setitem__((0, 0), 0.5))  # still a valid adapter
    return c.gen("--verify")


# -- options -------------------------------------------------------------------


@case("unknown-metric", 2, r"unknown metric 'jss' \(did you mean 'js'\?\); choose one of: wd, kl, js, mmd")
def _(c):
    return c.gen("--metric", "jss")


@case("unknown-operator", 2, r"unknown operator 'softmax'; choose one of: attentional, normalized, neural")
def _(c):
    return c.gen("--operator", "softmax")


@case("unknown-combine", 2, r"unknown combine 'avg'; choose one of: .*svd")
def _(c):
    return c.gen("--combine", "avg")


@case("unknown-sketch", 2, r"unknown sketch 'token' \(did you mean 'tokens'\?\)")
def _(c):
    return c.gen("--sketch", "token")


@case("temperature-zero", 2, r"--temperature must be > 0, got 0")
def _(c):
    return c.gen("--temperature", "0")


@case("temperature-negative", 2, r"--temperature must be > 0, got -1")
def _(c):
    return c.gen("--temperature", "-1")


@case("top-k-zero", 2, r"--top-k must be >= 1, got 0")
def _(c):
    return c.gen("--top-k", "0")


@case("top-k-above-n", 2, r"--top-k must be between 1 and 5 \(the candidate entries\), got 6")
def _(c):
    return c.gen("--top-k", "6")


@case("rank-zero", 2, r"--rank must be >= 1, got 0")
def _(c):
    return c.gen("--rank", "0")


@case("auto-with-temperature", 2, r"--auto chooses --temperature and --top-k on the bank; drop them or drop --auto")
def _(c):
    return c.gen("--auto", "--temperature", "0.5")


@case("auto-with-neural-operator", 2, r"--auto calibrates temperature and top-k for the attentional or normalized operator, not 'neural'")
def _(c):
    return c.gen("--auto", "--operator", "neural")


@case("auto-with-ce", 2, r"--auto calibrates on the distances between the bank's datasets, which metric ce does not have")
def _(c):
    return c.gen("--auto", "--metric", "ce")


@case("setting-with-an-option-it-gives", 2, r"--setting already gives the sketch, .*; drop --top-k or drop --setting")
def _(c):
    return c.gen("--setting", "tokens/js/normalized/svd/T1", "--top-k", "2")


@case("setting-unreadable", 2, r"setting 'tokens/js/normalized/svd/X2': cannot read 'X2' \(use T<temperature>, top<k>")
def _(c):
    return c.gen("--setting", "tokens/js/normalized/svd/X2")


@case("exclude-unknown-entry", 2, r"--exclude names no bank entry: cooking")
def _(c):
    return c.gen("--exclude", "cooking")


@case("neural-operator-not-fitted", 2, r"neural-tokens-js\.json: no fitted neural operator; run `lorablend bank fit-meta")
def _(c):
    return c.gen("--operator", "neural")


@case("neural-operator-interrupted-fit", 2, r"neural-tokens-js\.safetensors: does not match neural-tokens-js\.json .*; run `lorablend bank fit-meta` again")
def _(c):
    from safetensors.torch import save

    from lorablend.coefficients import NeuralConfig, NeuralOperator

    path = c.bank / "index" / "neural-tokens-js"
    for hidden in (8, 4):  # the second fit is killed after writing its weights, before its config
        op = NeuralOperator(NeuralConfig(hidden=hidden))
        op.net = op._build()
        if hidden == 8:
            op.save(path)
        else:
            path.with_suffix(".safetensors").write_bytes(save(op.net.state_dict()))
    return c.gen("--operator", "neural")


@case("usage-missing-option", 2, r"Missing option '--dataset'.*\(see `lorablend generate --help`\)")
def _(c):
    return ["generate", "--bank", str(c.bank), "--out", str(c.out)]


@case("usage-unknown-option", 2, r"No such option: --temprature.*see `lorablend generate --help`")
def _(c):
    return c.gen("--temprature", "2")


@case("usage-not-an-integer", 2, r"Invalid value for '--top-k'")
def _(c):
    return c.gen("--top-k", "three")


@case("usage-unknown-command", 2, r"No such command 'genrate'")
def _(c):
    return ["genrate", "--bank", str(c.bank)]


# -- the output ------------------------------------------------------------------


@case("out-exists", 2, r"out: already exists; choose another --out or pass --force to replace it")
def _(c):
    c.out.mkdir()
    (c.out / "keep.txt").write_text("mine")
    return c.gen()


@case("out-is-a-file-even-with-force", 2, r"out: exists and is not a directory; .*--out")
def _(c):
    c.out.write_text("not an adapter")
    return c.gen("--force")


@case("out-not-writable", 2, r"afile/out: cannot write there \(.*afile is not a directory\); choose a writable --out")
def _(c):
    c.write("afile", "a regular file where a directory should be")
    return c.gen(out=c.tmp / "afile" / "out")


@case("out-force-would-replace-the-bank", 2, r"bank: --force would delete .*bank \(the bank or the dataset\); choose another --out")
def _(c):
    return c.gen("--force", out=c.bank)


@case("out-force-would-delete-the-dataset", 2, r"mydata: --force would delete .*mydata/mine\.jsonl \(the bank or the dataset\)")
def _(c):
    (c.tmp / "mydata").mkdir()
    return c.gen("--force", dataset=c.dataset.rename(c.tmp / "mydata" / "mine.jsonl"), out=c.tmp / "mydata")


@case("out-inside-a-bank-entry-even-with-force", 2, r"adapters/code: is inside the bank .*bank, and lorablend never writes into a bank; choose a --out outside it")
def _(c):
    return c.gen("--force", out=c.adapter())


@case("out-new-dir-inside-the-bank", 2, r"bank/mine: is inside the bank .*bank, and lorablend never writes into a bank")
def _(c):
    return c.gen(out=c.bank / "mine")


@case("out-symlink-into-the-bank", 2, r"link/out: is inside the bank .*bank, and lorablend never writes")
def _(c):
    (c.tmp / "link").symlink_to(c.bank / "adapters", target_is_directory=True)
    return c.gen(out=c.tmp / "link" / "out")


@case("out-name-too-long", 2, r"a{300}: file name too long \(300 bytes, at most \d+ here\); choose a shorter --out")
def _(c):
    return c.gen(out=c.tmp / ("a" * 300))


@case("rerank-above-n", 2, r"--rerank must be between 1 and 5 \(the candidate entries\), got 999")
def _(c):
    return c.gen("--rerank", "999")


@case("export-gguf-into-a-bank-entry", 2, r"adapters/code/adapter\.gguf: is inside the bank .*, and lorablend never writes into a bank; choose a --out")
def _(c):
    return ["export", "gguf", str(c.adapter()), "--force"]


@case("eval-predictions-into-the-bank", 2, r"bank/preds\.jsonl: is inside the bank .*; choose a --predictions outside it")
def _(c):
    return ["eval", "--dataset", str(c.dataset), "--adapter", str(c.adapter()), "--predictions", str(c.bank / "preds.jsonl")]


@case("bench-results-into-the-bank", 2, r"bank/results: is inside the bank .*; choose a --results outside it")
def _(c):
    return ["bench", "--bank", str(c.bank), "--results", str(c.bank / "results"), "--report", str(c.tmp / "r.md")]


@case("eval-torch-truncated-safetensors", 2, r"adapters/code/adapter_model\.safetensors: unreadable safetensors file \(truncated: .*\); re-download or rebuild it")
def _(c):
    path = c.adapter() / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    base = json.loads((c.bank / "bank.json").read_text())["base_model"]
    return ["eval", "--dataset", str(c.dataset), "--adapter", str(c.adapter()), "--model", base, "--backend", "torch"]


def _add(c, adapter=None, *extra: str) -> list[str]:
    """`bank add` of a copy of an adapter (the rank-8 one by default) with the user's dataset."""
    return ["bank", "add", str(adapter or c.copy_adapter()), "--bank", str(c.bank), "--dataset", str(c.dataset), *extra]


@case("bank-add-other-base-model", 2, r"mine-adapter/adapter_config\.json: names base model 'other/model' but the bank's is '.*'; if it was trained on")
def _(c):
    adapter = c.copy_adapter()
    c.edit_json(adapter / "adapter_config.json", lambda cfg: cfg.update(base_model_name_or_path="other/model"))
    return _add(c, adapter)


@case("bank-add-other-modules", 2, r"mine-adapter/adapter_model\.safetensors: adapts module .*k_proj, unlike the bank's entries \(e\.g\. animals\); every entry must adapt the same modules")
def _(c):
    return _add(c, c.copy_adapter("kproj"))


@case("bank-add-dora", 2, r"mine-adapter/adapter_config\.json: DoRA adapter \(use_dora=true\) cannot be combined exactly")
def _(c):
    adapter = c.copy_adapter()
    c.edit_json(adapter / "adapter_config.json", lambda cfg: cfg.update(use_dora=True))
    return _add(c, adapter)


@case("bank-add-half-copied", 2, r"mine-adapter/adapter_model\.safetensors: unreadable safetensors file \(truncated: .*\); re-download or rebuild it")
def _(c):
    path = c.copy_adapter() / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return _add(c, path.parent)


@case("bank-add-missing-weights", 2, r"mine-adapter/adapter_model\.safetensors: adapter weights not found")
def _(c):
    adapter = c.copy_adapter()
    (adapter / "adapter_model.safetensors").unlink()
    return _add(c, adapter)


@case("bank-add-missing-dataset", 2, r"nope\.jsonl: no such dataset file; give the examples the adapter was trained on")
def _(c):
    return _add(c, None, "--dataset", str(c.tmp / "nope.jsonl"))


@case("bank-add-name-escapes-the-bank", 2, r"entry name '\.\./\.\./evil': use letters, digits")
def _(c):
    return _add(c, None, "--name", "../../evil")


@case("bank-add-name-taken", 2, r"bank: already has an entry named 'code'; choose another --name, or remove it first")
def _(c):
    return _add(c, None, "--name", "code")


@case("bank-add-ctrl-c-while-copying", 130, r"^interrupted; nothing half-written was left$")
def _(c):
    import lorablend.bank.build

    def interrupted(*a, **k):  # after the adapter's files are in place, before its dataset
        raise KeyboardInterrupt

    c.monkeypatch.setattr(lorablend.bank.build, "save_dataset", interrupted)
    return _add(c)


@case("bank-remove-unknown-entry", 2, r"bank: no entry named 'nope' \(entries: animals")
def _(c):
    return ["bank", "remove", str(c.bank), "nope"]


@case("bank-build-into-a-foreign-dir", 2, r"mydir: exists and is not a lorablend bank \(it holds notes\.txt and no bank\.json\); choose a new or empty --out")
def _(c):
    (c.tmp / "mydir").mkdir()
    (c.tmp / "mydir" / "notes.txt").write_text("mine")
    return ["bank", "build", "--tasks", str(c.dataset), "--out", str(c.tmp / "mydir")]


@case("write-fails-midway-enospc", 1, r"out: writing the adapter failed \(No space left on device\); nothing was written")
def _(c):
    import safetensors.numpy

    import lorablend.adapter

    def full_disk(tensors, filename, *a, **k):
        with open(filename, "wb") as fh:
            fh.write(b"\0" * 4096)  # part of the file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    c.monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    c.monkeypatch.setattr(lorablend.adapter, "save_file", full_disk)
    return c.gen()


@case("write-fails-midway-force-keeps-old", 1, r"out: writing the adapter failed \(No space left on device\); nothing was written")
def _(c):
    import lorablend.adapter

    c.out.mkdir()
    (c.out / "adapter_model.safetensors").write_text("the previous adapter")

    def full_disk(tensors, filename, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    c.monkeypatch.setattr(lorablend.adapter, "save_file", full_disk)
    return c.gen("--force")


@case("write-fails-midway-in-new-dirs", 1, r"new/deeper/out: writing the adapter failed \(No space left on device\)")
def _(c):
    import lorablend.adapter

    def full_disk(tensors, filename, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    c.monkeypatch.setattr(lorablend.adapter, "save_file", full_disk)
    return c.gen(out=c.tmp / "new" / "deeper" / "out")  # the parents it made are removed too


@case("ctrl-c-during-combine", 130, r"^interrupted; nothing half-written was left$")
def _(c):
    import lorablend.bank.combination

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    c.monkeypatch.setattr(lorablend.bank.combination, "combine_factors", interrupted)
    return c.gen()


@case("ctrl-c-during-write", 130, r"^interrupted; nothing half-written was left$")
def _(c):
    import lorablend.adapter

    def interrupted(tensors, filename, *a, **k):
        Path(filename).write_bytes(b"\0" * 100)
        raise KeyboardInterrupt

    c.monkeypatch.setattr(lorablend.adapter, "save_file", interrupted)
    return c.gen()


# --------------------------------------------------------------------------- #
# The tests
# --------------------------------------------------------------------------- #


def test_catalogue_is_large_enough():
    assert len(CASES) >= 30
    assert len({p.id for p in CASES}) == len(CASES)


@pytest.mark.parametrize("setup, code, pattern", CASES)
def test_bad_input(ctx, capfd, setup, code, pattern):
    argv = setup(ctx)
    before = listing(ctx.tmp)
    got, out, err = run_cli(argv, capfd)
    lines = [line for line in err.splitlines() if line.strip()]
    assert got == code, f"exit {got} (want {code}); stderr:\n{err}"
    assert "Traceback" not in err + out, err
    assert len(lines) == 1, f"want one line on stderr, got:\n{err}"
    line = lines[0]
    if code != 130:
        assert line.startswith("error: "), line
    assert re.search(pattern, line), f"{line!r} does not match {pattern!r}"
    assert listing(ctx.tmp) == before, "the run changed files on disk"
    assert leftovers(ctx.tmp) == []


def test_mixed_ranks_and_alphas_are_a_positive_control(ctx, capfd):
    """Entries of different rank and alpha combine; the run adds --out and nothing else."""
    shutil.rmtree(ctx.adapter())
    shutil.copytree(ctx.extras["rank8"], ctx.adapter())
    ctx.rehash()
    before = listing(ctx.tmp)
    code, out, err = run_cli(ctx.gen("--combine", "cat", "--verify"), capfd)
    assert code == 0, err
    assert err.strip() == "" and "adapter written to" in out
    after = listing(ctx.tmp)
    assert {k for k in after if not k.startswith("out")} == set(before)
    assert sorted(p.name for p in ctx.out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                         "lorablend.json"]
    assert json.loads((ctx.out / "lorablend.json").read_text())["rank"] == 4 * 4 + 8  # cat keeps every rank
    assert leftovers(ctx.tmp) == []


def test_force_replaces_an_existing_adapter(ctx, capfd):
    ctx.out.mkdir()
    (ctx.out / "stale.txt").write_text("old")
    code, _, err = run_cli(ctx.gen("--force"), capfd)
    assert code == 0, err
    assert not (ctx.out / "stale.txt").exists() and (ctx.out / "adapter_model.safetensors").exists()
    assert leftovers(ctx.tmp) == []


def test_bank_index_repairs_a_damaged_index(ctx, capfd):
    """The fix the damaged-index message gives works: `bank index` recomputes what it cannot read."""
    path = ctx.bank / "index" / "tokens.npz"
    path.write_bytes(path.read_bytes()[:100])
    code, _, err = run_cli(["bank", "index", str(ctx.bank), "--sketch", "tokens"], capfd)
    assert code == 0, err
    code, _, err = run_cli(ctx.gen(), capfd)
    assert code == 0, err


def test_nan_input_is_read_as_text(ctx):
    """A JSON NaN (or any number) in a text field is that text: "nan" is a valid, if odd, input (docs/ERRORS.md)."""
    from lorablend.dataset import load_dataset

    path = ctx.write("nan.jsonl", '{"input": NaN, "output": "b"}\n' * 3)
    assert {e.input for e in load_dataset(path).splits["train"]} == {"nan"}


def test_debug_shows_the_traceback(ctx, monkeypatch):
    """`--debug` (anywhere on the line) lets the exception through, so python prints its traceback."""
    from lorablend.cli import main
    from lorablend.errors import InputError

    monkeypatch.setattr(sys, "argv", ["lorablend", *ctx.gen("--metric", "jss"), "--debug"])
    with pytest.raises(InputError, match="unknown metric"):
        main()


SUBPROCESS_CASES = ["adapter-nan", "usage-unknown-option"]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_in_process_runs_match_subprocess_runs(ctx, capfd, case_id):
    """The in-process harness is faithful: a real `python -m lorablend` gives the same code and stderr."""
    setup, code, pattern = next(p.values for p in CASES if p.id == case_id)
    argv = setup(ctx)
    got, _, err = run_cli(argv, capfd)
    env = {**os.environ, "COLUMNS": "80"}
    proc = subprocess.run([sys.executable, "-m", "lorablend", *argv], capture_output=True, text=True, env=env,
                          cwd=ctx.tmp)
    assert (proc.returncode, proc.stderr.strip()) == (got, err.strip())
    assert proc.returncode == code and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- #
# Options that give the same run
# --------------------------------------------------------------------------- #


def test_generate_setting_option_equals_the_separate_options(tiny_bank, user_dataset, tmp_path, capfd):
    """`--setting` takes any setting the bench reports, `auto` included, and writes the same adapter as the options."""
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
