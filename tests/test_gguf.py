"""GGUF LoRA export and the llama.cpp evaluation backend (issue 8).

The first group checks the file layout with the `gguf` reader alone. The second is the
proof by the real client and is skipped (with the reason shown) only where
llama-cpp-python is not installed: llama.cpp's own `convert_hf_to_gguf.py` and
`convert_lora_to_gguf.py`, taken from the llama-cpp-python sdist of the installed
version (never copied into this repo), convert a tiny random Llama and a PEFT adapter;
lorablend's file must hold the same tensors, llama-cpp-python must answer identically
with either file (and differently from the base model alone), and the llamacpp backend
of `lorablend eval` must give the PyTorch backend's answers on the f32 tiny model.

The sdist is cached under $LORABLEND_HOME/llama-cpp (the user's, not the tests' temp
home) or taken from $LLAMA_CPP_SDIST (a .tar.gz or an unpacked dir); it is fetched with
`pip download --no-deps --no-binary :all: llama-cpp-python==VERSION` when missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_adapter, make_dataset_file

from lorablend.errors import InputError
from lorablend.models import lorablend_home

# Read at import, before conftest points $LORABLEND_HOME at a session temp dir.
SDIST_CACHE = lorablend_home() / "llama-cpp"
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _read(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, np.array(t.data)) for t in reader.tensors}
    return fields, tensors


def _unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of llama.cpp's q/k row permutation, as transformers' GGUF loader writes it."""
    dim = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, dim, 2, *rows.shape[1:]).swapaxes(2, 1).reshape(rows.shape)


def _factors(adapter: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from safetensors.numpy import load_file

    t = load_file(str(adapter / "adapter_model.safetensors"))
    prefix = "base_model.model."
    return {k[len(prefix):-len(".lora_A.weight")]: (t[k], t[k.replace("lora_A", "lora_B")])
            for k in t if k.endswith(".lora_A.weight")}


@pytest.fixture(scope="module")
def full_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A random LoRA on all seven linear layers of the tiny Llama (4 heads, 2 KV heads)."""
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("full") / "adapter", seed=3, r=4, alpha=8.0,
                        targets=ALL_MODULES)


# --------------------------------------------------------------------------- #
# Layout (the gguf package only)
# --------------------------------------------------------------------------- #


def test_layout_names_shapes_and_qk_permutation(tiny_model_dir, full_adapter, tmp_path):
    from lorablend.gguf_export import export_gguf

    out = export_gguf(full_adapter, str(tiny_model_dir), tmp_path / "a.gguf")
    fields, tensors = _read(out)
    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(8.0)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    factors = _factors(full_adapter)
    assert len(tensors) == 2 * len(factors) == 2 * 2 * len(ALL_MODULES)
    for module, (A, B) in factors.items():
        layer, short = module.split(".")[2], module.rsplit(".", 1)[1]
        base = f"blk.{layer}.{names[short]}.weight"
        (ta, a), (tb, b) = tensors[base + ".lora_a"], tensors[base + ".lora_b"]
        assert ta == tb == "F32"
        assert a.shape == A.shape and b.shape == B.shape  # ggml ne: a = [in, r], b = [r, out]
        np.testing.assert_array_equal(a, A)
        if short == "q_proj":
            assert not np.array_equal(b, B)
            np.testing.assert_array_equal(_unpermute(b, 4), B)
        elif short == "k_proj":
            np.testing.assert_array_equal(_unpermute(b, 2), B)  # permuted by KV heads
        else:
            np.testing.assert_array_equal(b, B)


def test_f16_and_folded_scales(tiny_model_dir, tmp_path):
    """rank_pattern / alpha_pattern / rsLoRA: llama.cpp has one alpha, so the rest goes into B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import torch
    from lorablend.adapter import read_spec
    from lorablend.gguf_export import export_gguf

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, use_rslora=True,
                     rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 3.0})
    get_peft_model(model, cfg).save_pretrained(str(tmp_path / "ad"))
    spec = read_spec(tmp_path / "ad")
    out = export_gguf(tmp_path / "ad", str(tiny_model_dir), tmp_path / "a.gguf", dtype="f16")
    fields, tensors = _read(out)
    alpha = fields["adapter.lora.alpha"]
    for module, (A, B) in _factors(tmp_path / "ad").items():
        short, layer = module.rsplit(".", 1)[1], module.split(".")[2]
        base = f"blk.{layer}.attn_{short[0]}.weight"
        (ta, a), (_, b) = tensors[base + ".lora_a"], tensors[base + ".lora_b"]
        assert ta == "F16"
        b = b.astype(np.float32)
        if short == "q_proj":
            b = _unpermute(b, 4)
        llama_cpp_delta = (alpha / a.shape[0]) * b @ a.astype(np.float32)
        peft_delta = spec.scale(module) * B @ A
        np.testing.assert_allclose(llama_cpp_delta, peft_delta, rtol=2e-2, atol=1e-3)


def test_unsupported_architecture_and_module(tiny_model_dir, full_adapter, tmp_path):
    from lorablend.gguf_export import export_gguf

    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(InputError, match="architecture 'gpt2'; GGUF LoRA export supports llama, mistral"):
        export_gguf(full_adapter, str(other), tmp_path / "x.gguf")
    # a LoRA on lm_head (PEFT would also save the tied embeddings; write the factors directly)
    from safetensors.numpy import load_file, save_file

    head = make_adapter(tiny_model_dir, tmp_path / "head", seed=0, targets=("q_proj",))
    tensors = load_file(str(head / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.lora_A.weight"] = np.ones((4, 64), np.float32)
    tensors["base_model.model.lm_head.lora_B.weight"] = np.ones((100, 4), np.float32)
    save_file(tensors, str(head / "adapter_model.safetensors"))
    with pytest.raises(InputError, match="module 'lm_head' has no llama.cpp counterpart") as err:
        export_gguf(head, str(tiny_model_dir), tmp_path / "x.gguf")
    assert "\n" not in str(err.value)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))


def test_write_is_atomic(tiny_model_dir, full_adapter, tmp_path, monkeypatch):
    import gguf

    from lorablend.gguf_export import export_gguf

    def boom(self):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(full_adapter, str(tiny_model_dir), tmp_path / "a.gguf")
    assert list(tmp_path.iterdir()) == []


def _write_model_gguf(path: Path, tensors: dict, fields: dict) -> Path:
    """A GGUF model file: `tensors` name -> (GGML type name, float array), quantized here; `fields` key -> (value, type)."""
    import gguf
    from gguf.quants import quantize

    writer = gguf.GGUFWriter(str(path), "llama")
    for key, (value, vtype) in fields.items():
        sub = vtype[1] if isinstance(vtype, tuple) else None
        writer.add_key_value(key, value, vtype[0] if sub else vtype, sub_type=sub)
    for name, (kind, data) in tensors.items():
        qtype = gguf.GGMLQuantizationType[kind]
        data = data.astype(np.float32)
        if kind == "F32":
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def quantized_gguf(tmp_path_factory) -> Path:
    """A small GGUF model in the SmolLM2 wheel's mix of types (Q4_1 blocks, Q8_0 embeddings, F32 norms) + an F16 tensor."""
    from gguf import GGUFValueType as V

    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": ("Q8_0", rng.normal(size=(96, 64))),
               "blk.0.attn_norm.weight": ("F32", rng.normal(size=64)),
               "blk.0.attn_q.weight": ("Q4_1", rng.normal(size=(64, 64))),
               "blk.0.ffn_up.weight": ("F16", rng.normal(size=(128, 64)))}
    fields = {"general.name": ("tiny", V.STRING), "general.file_type": (3, V.UINT32),
              "llama.block_count": (1, V.UINT32), "llama.rope.freq_base": (100000.0, V.FLOAT32),
              "tokenizer.ggml.add_bos_token": (True, V.BOOL),
              "tokenizer.ggml.tokens": (["a", "b", "<|im_end|>"], (V.ARRAY, V.STRING)),
              "tokenizer.ggml.token_type": ([1, 1, 3], (V.ARRAY, V.INT32)),
              "tokenizer.chat_template": ("{{ messages }}", V.STRING)}
    return _write_model_gguf(tmp_path_factory.mktemp("quantized") / "q.gguf", tensors, fields)


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16", "q8_0"])
def test_dequantize_gguf_copies_metadata_and_dequantizes(quantized_gguf, tmp_path, dtype):
    """Every field is copied (file_type says the new type); F32 is exactly gguf's dequantisation, the others round it."""
    from gguf.quants import dequantize, quantize
    from gguf import GGMLQuantizationType as Q, GGUFReader

    from lorablend.gguf_export import dequantize_gguf

    out = dequantize_gguf(quantized_gguf, tmp_path / "out.gguf", dtype)
    src_fields, _ = _read(quantized_gguf)
    out_fields, out_tensors = _read(out)
    assert out_fields.pop("general.file_type") == {"f32": 0, "bf16": 32, "f16": 1, "q8_0": 7}[dtype]
    src_fields.pop("general.file_type")
    assert out_fields == src_fields and list(out_fields) == list(src_fields)
    src = GGUFReader(quantized_gguf).tensors
    assert list(out_tensors) == [t.name for t in src]
    want_type = {"f32": Q.F32, "bf16": Q.BF16, "f16": Q.F16, "q8_0": Q.Q8_0}[dtype]
    for t in src:
        kind, data = out_tensors[t.name]
        exact = dequantize(np.array(t.data), t.tensor_type)
        if t.tensor_type == Q.F32:
            assert kind == "F32"
            np.testing.assert_array_equal(data, exact)
            continue
        assert kind == want_type.name
        assert data.tobytes() == quantize(exact, want_type).tobytes(), t.name
        # q8_0 blocks of 32 share one scale: the error is up to half a step of the block maximum / 127
        atol = np.abs(exact).max() / 250 if dtype == "q8_0" else 1e-6
        np.testing.assert_allclose(dequantize(data, want_type).reshape(exact.shape), exact, rtol=1e-2, atol=atol)


def test_dequantize_gguf_bad_input(quantized_gguf, tmp_path):
    from lorablend.gguf_export import dequantize_gguf

    (tmp_path / "not.gguf").write_text("hello")
    for args, message in (((tmp_path / "not.gguf", tmp_path / "o.gguf"), "not a readable GGUF file"),
                          ((tmp_path / "missing.gguf", tmp_path / "o.gguf"), "not a readable GGUF file"),
                          ((quantized_gguf, tmp_path / "o.gguf", "q4_k"), "dtype must be one of f32, bf16, f16, q8_0")):
        with pytest.raises(InputError, match=message) as err:
            dequantize_gguf(*args)
        assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not.gguf"]


def test_fetch_adds_the_llamacpp_gguf_to_older_installs(quantized_gguf, tmp_path, monkeypatch):
    """A conversion made before the full-precision GGUF existed gets just that file, atomically; else Q4_1 runs."""
    from lorablend import gguf_export, models
    from lorablend.llamacpp import model_gguf

    monkeypatch.setenv("LORABLEND_HOME", str(tmp_path))
    monkeypatch.setattr(models, "smollm2_gguf", lambda: quantized_gguf)
    target = tmp_path / "models" / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    for name in models._REQUIRED_FILES:
        (target / name).write_text("{}")
    (target / models.SOURCE_FILE).write_text(json.dumps({"gguf": str(quantized_gguf)}))
    mtime = (target / "config.json").stat().st_mtime_ns

    def unwritable(*args):
        raise PermissionError("read-only")

    monkeypatch.setattr(gguf_export, "dequantize_gguf", unwritable)
    assert models.fetch_smollm2(progress=False) == target
    assert model_gguf(str(target)) == quantized_gguf  # the wheel's file, as before
    monkeypatch.undo()
    monkeypatch.setenv("LORABLEND_HOME", str(tmp_path))
    monkeypatch.setattr(models, "smollm2_gguf", lambda: quantized_gguf)
    assert models.fetch_smollm2(progress=False) == target
    made = target / models.LLAMACPP_GGUF
    assert model_gguf(str(target)) == model_gguf("smollm2") == made
    assert _read(made)[1].keys() == _read(quantized_gguf)[1].keys()
    assert (target / "config.json").stat().st_mtime_ns == mtime
    assert not list(target.glob(".*tmp"))


def _cli(argv, capfd) -> tuple[int, str, str]:
    from lorablend.cli import main

    capfd.readouterr()
    old, sys.argv = sys.argv, ["lorablend", *map(str, argv)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    finally:
        sys.argv = old
    out, err = capfd.readouterr()
    return code, out, err


def test_cli_export(tiny_model_dir, full_adapter, tmp_path, capfd):
    adapter = tmp_path / "ad"
    shutil.copytree(full_adapter, adapter)
    code, out, err = _cli(["export", "gguf", adapter, "--base", tiny_model_dir], capfd)
    assert code == 0, err
    assert (adapter / "adapter.gguf").is_file() and "GGUF LoRA written to" in out
    code, out, err = _cli(["export", "gguf", adapter, "--base", tiny_model_dir], capfd)
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    code, out, err = _cli(["export", "gguf", adapter, "--out", tmp_path / "b.gguf"], capfd)  # base from the config
    assert code == 0, err
    assert _read(tmp_path / "b.gguf")[1].keys() == _read(adapter / "adapter.gguf")[1].keys()
    code, out, err = _cli(["export", "gguf", tmp_path, "--base", tiny_model_dir], capfd)
    assert code == 2 and "adapter config not found" in err and len(err.strip().splitlines()) == 1


def test_cached_export_and_backend_choice(tiny_model_dir, full_adapter):
    from lorablend.gguf_export import cached_gguf
    from lorablend.llamacpp import resolve_backend

    first = cached_gguf(full_adapter, str(tiny_model_dir))
    mtime = first.stat().st_mtime_ns
    again = cached_gguf(full_adapter, str(tiny_model_dir))
    assert again == first and first.stat().st_size > 0 and first.parent.name == "gguf-adapters"
    assert again.stat().st_mtime_ns >= mtime
    assert resolve_backend("torch", str(tiny_model_dir)) == "torch"
    assert resolve_backend("auto", str(tiny_model_dir)) == "torch"  # no GGUF beside the tiny model
    with pytest.raises(InputError, match="backend 'lamacpp'.*llamacpp"):
        resolve_backend("lamacpp", str(tiny_model_dir))
    with pytest.raises(InputError, match="(has no GGUF|needs llama-cpp-python)"):
        resolve_backend("llamacpp", str(tiny_model_dir))


# --------------------------------------------------------------------------- #
# The real client: llama.cpp's converters and llama-cpp-python
# --------------------------------------------------------------------------- #

_CONVERT = """
import runpy, sys
vendor, base_dir, base_out, lora_dir, lora_out = sys.argv[1:6]
sys.path[:0] = [vendor, vendor + "/gguf-py"]
# The tiny test tokenizer is a BPE llama.cpp's converter does not know by hash; the tests feed
# llama.cpp token ids, never text, so any pre-tokenizer name does.
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
# No tokenizer.model here: skip the SentencePiece attempt (it imports sentencepiece before looking).
def _no_sentencepiece(self):
    raise FileNotFoundError("no tokenizer.model")
conversion.base.TextModel._set_vocab_sentencepiece = _no_sentencepiece
for argv in (["convert_hf_to_gguf.py", base_dir, "--outfile", base_out, "--outtype", "f32"],
             ["convert_lora_to_gguf.py", "--base", base_dir, "--outfile", lora_out, "--outtype", "f32", lora_dir]):
    sys.argv = argv
    runpy.run_path(vendor + "/" + argv[0], run_name="__main__")
"""
_VENDOR_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")


def _vendor_dir(version: str) -> Path:
    """llama.cpp's converter scripts from the llama-cpp-python sdist (downloaded once, unpacked once)."""
    from lorablend.atomic import atomic_dir

    given = os.environ.get("LLAMA_CPP_SDIST")
    if given and Path(given).is_dir():
        found = next(Path(given).glob("**/vendor/llama.cpp/convert_lora_to_gguf.py"), None)
        if found is None:
            pytest.fail(f"LLAMA_CPP_SDIST={given} holds no vendor/llama.cpp/convert_lora_to_gguf.py")
        return found.parent
    name = f"llama_cpp_python-{version}"
    tgz = Path(given) if given else SDIST_CACHE / f"{name}.tar.gz"
    vendor = SDIST_CACHE / f"{name}-convert"
    if (vendor / "convert_lora_to_gguf.py").is_file():
        return vendor
    if not tgz.is_file():
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                               f"llama-cpp-python=={version}", "-d", str(tgz.parent)], capture_output=True, text=True)
        if proc.returncode or not tgz.is_file():
            pytest.fail(f"cannot fetch the llama-cpp-python {version} sdist for llama.cpp's converters "
                        f"({proc.stderr.strip()[-300:]}); set LLAMA_CPP_SDIST to a downloaded copy")
    prefix = f"{name}/vendor/llama.cpp/"
    try:
        with atomic_dir(vendor) as tmp, tarfile.open(tgz) as tar:
            for member in tar:
                rel = member.name[len(prefix):] if member.name.startswith(prefix) else None
                if rel and (rel in _VENDOR_FILES or rel.startswith(_VENDOR_FILES[2:])) and member.isfile():
                    member.name = rel
                    tar.extract(member, tmp, filter="data")
    except FileExistsError:  # another session unpacked it first
        pass
    return vendor


@pytest.fixture(scope="module")
def llama_cpp():
    import llama_cpp  # the setup installs the llamacpp extra: missing, these tests fail rather than skip

    return llama_cpp


@pytest.fixture(scope="module")
def converted(llama_cpp, tiny_model_dir, full_adapter, tmp_path_factory):
    """The tiny model dir + its f32 GGUF (recorded in lorablend-source.json) and llama.cpp's export of the adapter."""
    vendor = _vendor_dir(llama_cpp.__version__)
    root = tmp_path_factory.mktemp("llamacpp")
    model = root / "tiny"
    shutil.copytree(tiny_model_dir, model)
    base, theirs = root / "tiny-f32.gguf", root / "theirs.gguf"
    proc = subprocess.run([sys.executable, "-c", _CONVERT, str(vendor), str(model), str(base), str(full_adapter),
                           str(theirs)], capture_output=True, text=True)
    assert proc.returncode == 0 and theirs.is_file(), proc.stderr[-3000:]
    (model / "lorablend-source.json").write_text(json.dumps({"gguf": str(base)}))
    return {"model": model, "base": base, "theirs": theirs, "adapter": full_adapter}


def test_same_tensors_as_llama_cpp_converter(converted, tmp_path):
    from lorablend.gguf_export import export_gguf

    mine = export_gguf(converted["adapter"], str(converted["model"]), tmp_path / "mine.gguf")
    f_mine, t_mine = _read(mine)
    f_theirs, t_theirs = _read(converted["theirs"])
    for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"):
        assert f_mine[key] == f_theirs[key], key
    assert list(t_mine) == list(t_theirs)  # same names, same order
    for name, (kind, data) in t_theirs.items():
        assert t_mine[name][0] == kind
        np.testing.assert_array_equal(t_mine[name][1], data, err_msg=name)


def _prompts(tokenizer) -> list[list[int]]:
    from lorablend.dataset import Example
    from lorablend.prompts import prompt_ids

    texts = ["The cat sat on the mat.", "What is two plus two?", "Write a function that adds numbers."]
    return [prompt_ids(tokenizer, Example(instruction="Answer briefly.", input=t, outputs=("x",))) for t in texts]


def test_llama_cpp_answers_identically_with_both_files(converted, llama_cpp, tmp_path):
    from lorablend.gguf_export import export_gguf
    from lorablend.models import load_tokenizer

    mine = export_gguf(converted["adapter"], str(converted["model"]), tmp_path / "mine.gguf")
    prompts = _prompts(load_tokenizer(str(converted["model"])))

    def greedy(lora: Path | None) -> list[list[int]]:
        llm = llama_cpp.Llama(model_path=str(converted["base"]), lora_path=str(lora) if lora else None, n_ctx=512,
                              n_threads=2, verbose=False)
        try:
            outs = []
            for p in prompts:
                gen = llm.generate(p, temp=0.0, top_k=1, repeat_penalty=1.0)
                outs.append([next(gen) for _ in range(12)])
            return outs
        finally:
            llm.close()

    base, ours, theirs = greedy(None), greedy(mine), greedy(converted["theirs"])
    assert ours == theirs
    assert all(o != b for o, b in zip(ours, base)), "the adapter must change every greedy answer"


def test_llamacpp_backend_matches_torch(converted, tmp_path):
    """The llamacpp backend decodes the torch path's very prompts: on the f32 tiny model, the same greedy tokens.

    A random model has near-ties, which llama.cpp's f16 KV cache may break the other way: tokens are
    compared up to the first step whose top-2 logit margin under torch is below 0.05.
    """
    import contextlib

    import torch

    from lorablend.dataset import load_dataset
    from lorablend.evaluate import answers_with, generate_answers, load_for_eval
    from lorablend.prompts import end_of_turn_id, prompt_ids

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


def _requantize(src: Path, out: Path) -> Path:
    """`src` (an F32 GGUF model) in the SmolLM2 wheel's types: Q4_1 matrices, Q8_0 embeddings, F32 norms."""
    import gguf
    from gguf.quants import quantize

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(out), "llama")
    for field in reader.fields.values():
        if field.name != "general.architecture" and not field.name.startswith("GGUF."):
            vtype = field.types[0]
            writer.add_key_value(field.name, field.contents(), vtype,
                                 sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        data = np.array(t.data)
        if data.ndim == 1:
            writer.add_tensor(t.name, data)
        else:
            qtype = gguf.GGMLQuantizationType.Q8_0 if t.name == "token_embd.weight" else gguf.GGMLQuantizationType.Q4_1
            writer.add_tensor(t.name, quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_dequantized_gguf_runs_the_quantized_weights(converted, llama_cpp, tmp_path):
    """llama.cpp runs the dequantised file: its logits are those of the Q4_1 file (up to llama.cpp's 8-bit
    activations there), far from those of the f32 original the Q4_1 file was made from."""
    from lorablend.gguf_export import dequantize_gguf
    from lorablend.models import load_tokenizer

    q4 = _requantize(converted["base"], tmp_path / "q4.gguf")
    files = {"f32": converted["base"], "q4_1": q4, "deq": dequantize_gguf(q4, tmp_path / "deq.gguf", "f32")}
    prompts = _prompts(load_tokenizer(str(converted["model"])))
    logits = {}
    for name, path in files.items():
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
        try:
            rows = []
            for p in prompts:
                llm.reset()
                llm.eval(p)
                rows.append(np.array(llm.scores[len(p) - 1]))
            logits[name] = np.stack(rows)
        finally:
            llm.close()
    to_q4 = np.abs(logits["deq"] - logits["q4_1"]).max()
    to_f32 = np.abs(logits["deq"] - logits["f32"]).max()
    assert to_q4 < to_f32 / 4, (to_q4, to_f32)


def test_batched_decoding_matches_one_sequence(converted, tmp_path):
    """n_seq prompts decoded as parallel sequences (shared prefix copied) give the one-sequence path's tokens."""
    from lorablend.dataset import load_dataset
    from lorablend.llamacpp import LlamaCppModel
    from lorablend.models import load_tokenizer
    from lorablend.prompts import end_of_turn_id, prompt_ids

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
    code, out, err = _cli(argv, capfd)
    assert code == 0, err
    out = " ".join(out.split())  # rich wraps long lines
    assert "backend llamacpp" in out
    code, out2, err = _cli(argv + ["--backend", "torch"], capfd)
    assert code == 0, err
    out2 = " ".join(out2.split())
    assert "backend torch" in out2
    code, out, err = _cli(argv + ["--backend", "lamacpp"], capfd)
    assert code == 2 and "unknown backend 'lamacpp'" in err and len(err.strip().splitlines()) == 1


def test_generate_gguf_flag(tiny_bank, tmp_path, capfd):
    data = make_dataset_file(tmp_path / "d.jsonl", "music", n=12)
    code, out, err = _cli(["generate", "--bank", tiny_bank, "--dataset", data, "--out", tmp_path / "out", "--gguf"], capfd)
    assert code == 0, err
    fields, tensors = _read(tmp_path / "out" / "adapter.gguf")
    assert fields["general.type"] == "adapter" and len(tensors) == 2 * 2 * 2  # 2 layers x (q, v) x (a, b)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_bench_llamacpp_backend(converted, tmp_path):
    """`lorablend bench --backend llamacpp`: every adapter (controls and mixtures) exported with `write_gguf` and
    run by llama.cpp. The own-adapter control answers exactly as the PEFT dir's export does through `eval`,
    adapters change answers, the records agree with the torch backend's, and the two never share a results dir."""
    from conftest import make_bank

    from lorablend.bank import Bank
    from lorablend.bench import BenchConfig, RecordStore, run_bench, test_sample
    from lorablend.dataset import load_dataset
    from lorablend.evaluate import answers_with, load_for_eval
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


def test_model_gguf_command_and_env_override(quantized_gguf, tiny_model_dir, tmp_path, capfd, monkeypatch):
    """`lorablend model gguf` writes a base GGUF of another type; $LORABLEND_LLAMACPP_GGUF makes the backend run it."""
    from lorablend.llamacpp import GGUF_ENV, model_gguf

    out = tmp_path / "base-f32.gguf"
    code, stdout, err = _cli(["model", "gguf", "--src", quantized_gguf, "--out", out, "--dtype", "f32"], capfd)
    assert code == 0 and out.is_file(), err
    assert f"LORABLEND_LLAMACPP_GGUF={out}" in " ".join(stdout.split()).replace(" ", "") or GGUF_ENV in stdout
    _, tensors = _read(out)
    assert {kind for kind, _ in tensors.values()} == {"F32"}
    monkeypatch.setenv(GGUF_ENV, str(out))
    assert model_gguf(str(tiny_model_dir)) == out
    monkeypatch.setenv(GGUF_ENV, str(tmp_path / "missing.gguf"))
    with pytest.raises(InputError, match="LORABLEND_LLAMACPP_GGUF"):
        model_gguf(str(tiny_model_dir))
    (tmp_path / "afile").write_text("")
    code, _, err = _cli(["model", "gguf", "--src", quantized_gguf, "--out", tmp_path / "afile" / "x.gguf"], capfd)
    assert code == 2 and "cannot write there" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- #
# Merged model GGUF (Ollama FROM, LM Studio)
# --------------------------------------------------------------------------- #


def _greedy(llama_cpp, model: Path, prompts, lora: Path | None = None, n: int = 12) -> list[list[int]]:
    llm = llama_cpp.Llama(model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=512, n_threads=2,
                          verbose=False)
    try:
        outs = []
        for p in prompts:
            gen = llm.generate(p, temp=0.0, top_k=1, repeat_penalty=1.0)
            outs.append([next(gen) for _ in range(n)])
        return outs
    finally:
        llm.close()


@pytest.fixture(scope="module")
def merged(converted, tmp_path_factory):
    """The tiny f32 base with the full adapter merged in, at f32, plus the adapter copy it came from."""
    from lorablend.gguf_export import merge_gguf, merged_metadata

    root = tmp_path_factory.mktemp("merged")
    adapter = root / "adapter"
    shutil.copytree(converted["adapter"], adapter)
    (adapter / "lorablend.json").write_text(json.dumps({"bank": "b", "metric": "js", "coefficients": {"x": 1.0}}))
    path = merge_gguf(adapter, str(converted["model"]), converted["base"], root / "model.gguf", "f32",
                      merged_metadata(adapter))
    return {"path": path, "adapter": adapter}


def test_merged_weights_are_base_plus_update(converted, merged):
    """Each adapted tensor is the base's plus scale * B @ A in llama.cpp's rotary row order; the rest is unchanged."""
    config = json.loads((converted["model"] / "config.json").read_text())
    _, base = _read(converted["base"])
    _, out = _read(merged["path"])
    assert out.keys() == base.keys()
    factors = _factors(converted["adapter"])
    changed = set()
    for module, (A, B) in factors.items():
        layer, kind = module.split(".")[2], module.rsplit(".", 1)[-1]
        name = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[kind]
        tensor = f"blk.{layer}.{name}.weight"
        delta = out[tensor][1].astype(np.float64) - base[tensor][1]
        if kind in ("q_proj", "k_proj"):
            heads = config["num_attention_heads"] if kind == "q_proj" else config["num_key_value_heads"]
            delta = _unpermute(delta, heads)
        np.testing.assert_allclose(delta, (8.0 / 4) * (B.astype(np.float64) @ A), atol=1e-6)
        changed.add(tensor)
    assert len(changed) == 2 * len(ALL_MODULES)
    for tensor in base.keys() - changed:
        assert np.array_equal(out[tensor][1], base[tensor][1]), tensor


def test_merged_gguf_keeps_metadata_and_records_provenance(converted, merged):
    import hashlib

    fields, _ = _read(merged["path"])
    base_fields, _ = _read(converted["base"])
    assert "tokenizer.chat_template" in fields and fields["tokenizer.chat_template"] == base_fields["tokenizer.chat_template"]
    for key, value in base_fields.items():
        if key != "general.file_type":
            assert fields[key] == value, key
    assert fields["lorablend.version"] == "0.1.0"
    weights = (merged["adapter"] / "adapter_model.safetensors").read_bytes()
    assert fields["lorablend.adapter_sha256"] == hashlib.sha256(weights).hexdigest()
    assert json.loads(fields["lorablend.provenance"]) == {"bank": "b", "metric": "js"}
    assert fields["lorablend.coefficients_sha256"] == hashlib.sha256(b'{"x": 1.0}').hexdigest()


def test_merged_gguf_answers_as_the_base_with_the_lora(converted, merged, llama_cpp, tmp_path):
    """llama.cpp's greedy answers from the merged f32 file are those of the base file with the GGUF LoRA applied.

    The two compute W x + s B (A x) and (W + s B A) x: equal up to float rounding, and on these prompts
    every token agrees. (PEFT's own answers are those of the LoRA file: test_llamacpp_backend_matches_torch.)
    """
    from lorablend.gguf_export import export_gguf
    from lorablend.models import load_tokenizer

    lora = export_gguf(converted["adapter"], str(converted["model"]), tmp_path / "lora.gguf")
    prompts = _prompts(load_tokenizer(str(converted["model"])))
    with_lora = _greedy(llama_cpp, converted["base"], prompts, lora)
    assert _greedy(llama_cpp, merged["path"], prompts) == with_lora
    assert with_lora != _greedy(llama_cpp, converted["base"], prompts)


def test_merged_gguf_bad_input_and_cli(converted, merged, tmp_path, capfd):
    from lorablend.gguf_export import export_gguf, merge_gguf

    lora = export_gguf(converted["adapter"], str(converted["model"]), tmp_path / "lora.gguf")
    with pytest.raises(InputError, match="is a GGUF LoRA adapter, not a model"):
        merge_gguf(converted["adapter"], str(converted["model"]), lora, tmp_path / "x.gguf")
    with pytest.raises(InputError, match="dtype must be one of"):
        merge_gguf(converted["adapter"], str(converted["model"]), converted["base"], tmp_path / "x.gguf", "q4_1")
    assert not (tmp_path / "x.gguf").exists()
    out = tmp_path / "m.gguf"
    argv = ["export", "gguf-merged", merged["adapter"], "--base", converted["model"], "--out", out, "--dtype", "q8_0"]
    code, stdout, err = _cli(argv, capfd)
    assert code == 0, err
    assert "merged model written to" in stdout and _read(out)[0]["general.file_type"] == 7  # MOSTLY_Q8_0
    code, stdout, err = _cli(argv, capfd)
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    code, stdout, err = _cli([*argv[:-4], "--out", tmp_path / "n.gguf", "--base-gguf", lora], capfd)
    assert code == 2 and "not a model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "n.gguf").exists()


def test_generate_gguf_merged_flag(tiny_bank, converted, tmp_path, capfd, monkeypatch):
    """generate --gguf-merged writes model.gguf beside the PEFT files, from the base's GGUF."""
    data = make_dataset_file(tmp_path / "d.jsonl", "music", n=12)
    argv = ["generate", "--bank", tiny_bank, "--dataset", data, "--out", tmp_path / "out", "--gguf-merged"]
    code, out, err = _cli(argv, capfd)  # the bank's tiny model dir has no GGUF
    assert code == 2 and "has no GGUF file to merge into" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("LORABLEND_LLAMACPP_GGUF", str(converted["base"]))  # the GGUF of a copy of that model
    code, out, err = _cli([*argv, "--force"], capfd)
    assert code == 0, err
    fields, tensors = _read(tmp_path / "out" / "model.gguf")
    assert fields["general.file_type"] == 32 and json.loads(fields["lorablend.provenance"])["bank"]  # MOSTLY_BF16
    assert tensors.keys() == _read(converted["base"])[1].keys()


def test_merged_gguf_never_written_into_a_bank(tiny_bank, converted, merged, tmp_path, capfd):
    bank = tmp_path / "bank"
    shutil.copytree(tiny_bank, bank)
    target = bank / "adapters" / "animals" / "model.gguf"
    code, out, err = _cli(["export", "gguf-merged", merged["adapter"], "--base", converted["model"], "--out", target,
                           "--force"], capfd)
    assert code == 2 and "never writes into a bank" in err and len(err.strip().splitlines()) == 1
    assert not target.exists()
