"""runtime/gguf_io.py: a GGUF model dequantised (or requantised) tensor by tensor, then run by llama.cpp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import gguf_prompts, read_gguf

from lorablend.errors import InputError


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16", "q8_0"])
def test_dequantize_gguf_copies_metadata_and_dequantizes(quantized_gguf, tmp_path, dtype):
    """Every field is copied (file_type says the new type); F32 is exactly gguf's dequantisation, the others round it."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader
    from gguf.quants import dequantize, quantize

    from lorablend.runtime.gguf_io import dequantize_gguf

    out = dequantize_gguf(quantized_gguf, tmp_path / "out.gguf", dtype)
    src_fields, _ = read_gguf(quantized_gguf)
    out_fields, out_tensors = read_gguf(out)
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
    from lorablend.runtime.gguf_io import dequantize_gguf

    (tmp_path / "not.gguf").write_text("hello")
    for args, message in (((tmp_path / "not.gguf", tmp_path / "o.gguf"), "not a readable GGUF file"),
                          ((tmp_path / "missing.gguf", tmp_path / "o.gguf"), "not a readable GGUF file"),
                          ((quantized_gguf, tmp_path / "o.gguf", "q4_k"), "dtype must be one of f32, bf16, f16, q8_0")):
        with pytest.raises(InputError, match=message) as err:
            dequantize_gguf(*args)
        assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not.gguf"]


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
    from lorablend.runtime.gguf_io import dequantize_gguf
    from lorablend.runtime.models import load_tokenizer

    q4 = _requantize(converted["base"], tmp_path / "q4.gguf")
    files = {"f32": converted["base"], "q4_1": q4, "deq": dequantize_gguf(q4, tmp_path / "deq.gguf", "f32")}
    prompts = gguf_prompts(load_tokenizer(str(converted["model"])))
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
