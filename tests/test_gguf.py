"""runtime/gguf.py: PEFT adapter -> GGUF LoRA, and a base GGUF with an adapter merged in.

The first group checks the file layout with the `gguf` reader alone. The second is the proof by
the real client: llama.cpp's own `convert_lora_to_gguf.py` (see `converted` in conftest.py) must
write the same tensors, llama-cpp-python must answer identically with either file (and differently
from the base model alone), and a merged model must answer as the base with the LoRA applied.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import ALL_MODULES, gguf_prompts, make_adapter, make_dataset_file, read_gguf, run_main

from lorablend.errors import InputError


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


# --------------------------------------------------------------------------- #
# Layout (the gguf package only)
# --------------------------------------------------------------------------- #


def test_layout_names_shapes_and_qk_permutation(tiny_model_dir, full_adapter, tmp_path):
    from lorablend.runtime.gguf import export_gguf

    out = export_gguf(full_adapter, str(tiny_model_dir), tmp_path / "a.gguf")
    fields, tensors = read_gguf(out)
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
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorablend.adapter import read_spec
    from lorablend.runtime.gguf import export_gguf

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, use_rslora=True,
                     rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 3.0})
    get_peft_model(model, cfg).save_pretrained(str(tmp_path / "ad"))
    spec = read_spec(tmp_path / "ad")
    out = export_gguf(tmp_path / "ad", str(tiny_model_dir), tmp_path / "a.gguf", dtype="f16")
    fields, tensors = read_gguf(out)
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
    from lorablend.runtime.gguf import export_gguf

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

    from lorablend.runtime.gguf import export_gguf

    def boom(self):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(full_adapter, str(tiny_model_dir), tmp_path / "a.gguf")
    assert list(tmp_path.iterdir()) == []


def test_cli_export(tiny_model_dir, full_adapter, tmp_path, capfd):
    adapter = tmp_path / "ad"
    shutil.copytree(full_adapter, adapter)
    code, out, err = run_main(["export", "gguf", adapter, "--base", tiny_model_dir], capfd)
    assert code == 0, err
    assert (adapter / "adapter.gguf").is_file() and "GGUF LoRA written to" in out
    code, out, err = run_main(["export", "gguf", adapter, "--base", tiny_model_dir], capfd)
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_main(["export", "gguf", adapter, "--out", tmp_path / "b.gguf"], capfd)  # base from the config
    assert code == 0, err
    assert read_gguf(tmp_path / "b.gguf")[1].keys() == read_gguf(adapter / "adapter.gguf")[1].keys()
    code, out, err = run_main(["export", "gguf", tmp_path, "--base", tiny_model_dir], capfd)
    assert code == 2 and "adapter config not found" in err and len(err.strip().splitlines()) == 1


def test_cached_export_and_backend_choice(tiny_model_dir, full_adapter):
    from lorablend.runtime.gguf import cached_gguf
    from lorablend.runtime.llamacpp import resolve_backend

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


def test_same_tensors_as_llama_cpp_converter(converted, tmp_path):
    from lorablend.runtime.gguf import export_gguf

    mine = export_gguf(converted["adapter"], str(converted["model"]), tmp_path / "mine.gguf")
    f_mine, t_mine = read_gguf(mine)
    f_theirs, t_theirs = read_gguf(converted["theirs"])
    for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"):
        assert f_mine[key] == f_theirs[key], key
    assert list(t_mine) == list(t_theirs)  # same names, same order
    for name, (kind, data) in t_theirs.items():
        assert t_mine[name][0] == kind
        np.testing.assert_array_equal(t_mine[name][1], data, err_msg=name)


def test_llama_cpp_answers_identically_with_both_files(converted, llama_cpp, tmp_path):
    from lorablend.runtime.gguf import export_gguf
    from lorablend.runtime.models import load_tokenizer

    mine = export_gguf(converted["adapter"], str(converted["model"]), tmp_path / "mine.gguf")
    prompts = gguf_prompts(load_tokenizer(str(converted["model"])))

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


def test_generate_gguf_flag(tiny_bank, tmp_path, capfd):
    data = make_dataset_file(tmp_path / "d.jsonl", "music", n=12)
    code, out, err = run_main(["generate", "--bank", tiny_bank, "--dataset", data, "--out", tmp_path / "out", "--gguf"], capfd)
    assert code == 0, err
    fields, tensors = read_gguf(tmp_path / "out" / "adapter.gguf")
    assert fields["general.type"] == "adapter" and len(tensors) == 2 * 2 * 2  # 2 layers x (q, v) x (a, b)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


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
    from lorablend.runtime.gguf import merge_gguf, merged_metadata

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
    _, base = read_gguf(converted["base"])
    _, out = read_gguf(merged["path"])
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

    fields, _ = read_gguf(merged["path"])
    base_fields, _ = read_gguf(converted["base"])
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
    from lorablend.runtime.gguf import export_gguf
    from lorablend.runtime.models import load_tokenizer

    lora = export_gguf(converted["adapter"], str(converted["model"]), tmp_path / "lora.gguf")
    prompts = gguf_prompts(load_tokenizer(str(converted["model"])))
    with_lora = _greedy(llama_cpp, converted["base"], prompts, lora)
    assert _greedy(llama_cpp, merged["path"], prompts) == with_lora
    assert with_lora != _greedy(llama_cpp, converted["base"], prompts)


def test_merged_gguf_bad_input_and_cli(converted, merged, tmp_path, capfd):
    from lorablend.runtime.gguf import export_gguf, merge_gguf

    lora = export_gguf(converted["adapter"], str(converted["model"]), tmp_path / "lora.gguf")
    with pytest.raises(InputError, match="is a GGUF LoRA adapter, not a model"):
        merge_gguf(converted["adapter"], str(converted["model"]), lora, tmp_path / "x.gguf")
    with pytest.raises(InputError, match="dtype must be one of"):
        merge_gguf(converted["adapter"], str(converted["model"]), converted["base"], tmp_path / "x.gguf", "q4_1")
    assert not (tmp_path / "x.gguf").exists()
    out = tmp_path / "m.gguf"
    argv = ["export", "gguf-merged", merged["adapter"], "--base", converted["model"], "--out", out, "--dtype", "q8_0"]
    code, stdout, err = run_main(argv, capfd)
    assert code == 0, err
    assert "merged model written to" in stdout and read_gguf(out)[0]["general.file_type"] == 7  # MOSTLY_Q8_0
    code, stdout, err = run_main(argv, capfd)
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    code, stdout, err = run_main([*argv[:-4], "--out", tmp_path / "n.gguf", "--base-gguf", lora], capfd)
    assert code == 2 and "not a model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "n.gguf").exists()


def test_generate_gguf_merged_flag(tiny_bank, converted, tmp_path, capfd, monkeypatch):
    """generate --gguf-merged writes model.gguf beside the PEFT files, from the base's GGUF."""
    data = make_dataset_file(tmp_path / "d.jsonl", "music", n=12)
    argv = ["generate", "--bank", tiny_bank, "--dataset", data, "--out", tmp_path / "out", "--gguf-merged"]
    code, out, err = run_main(argv, capfd)  # the bank's tiny model dir has no GGUF
    assert code == 2 and "has no GGUF file to merge into" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("LORABLEND_LLAMACPP_GGUF", str(converted["base"]))  # the GGUF of a copy of that model
    code, out, err = run_main([*argv, "--force"], capfd)
    assert code == 0, err
    fields, tensors = read_gguf(tmp_path / "out" / "model.gguf")
    assert fields["general.file_type"] == 32 and json.loads(fields["lorablend.provenance"])["bank"]  # MOSTLY_BF16
    assert tensors.keys() == read_gguf(converted["base"])[1].keys()


def test_merged_gguf_never_written_into_a_bank(tiny_bank, converted, merged, tmp_path, capfd):
    bank = tmp_path / "bank"
    shutil.copytree(tiny_bank, bank)
    target = bank / "adapters" / "animals" / "model.gguf"
    code, out, err = run_main(["export", "gguf-merged", merged["adapter"], "--base", converted["model"], "--out", target,
                           "--force"], capfd)
    assert code == 2 and "never writes into a bank" in err and len(err.strip().splitlines()) == 1
    assert not target.exists()
