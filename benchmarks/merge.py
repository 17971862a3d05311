"""Peak memory and time of `export gguf-merged` on a base of Mistral-7B-Instruct-v0.2's shapes.

    python -m benchmarks.merge [--dtype bf16] [--out-dtype bf16] [--dir DIR] [--keep]

Writes a synthetic base GGUF (random weights, Mistral-7B's tensor shapes, `--dtype`) and one
synthetic r=16 q/k/v adapter (the scale benchmark's kind), then runs `merge_gguf` in a child
process and prints its wall seconds, its peak RSS (the child's ru_maxrss) and that peak as a
share of the base file: the merge streams one tensor at a time, so it should hold about one
tensor, not the model. Needs about twice the base file on disk (14.5 GB each at bf16) in `--dir`
(default: a temp dir), removed at the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIG = {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 4096,
          "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
          "vocab_size": 32000, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 32768}


def base_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, numpy shape) of a Llama-architecture model, in convert_hf_to_gguf.py's order."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    out = [("token_embd.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        out += [(f"blk.{i}.attn_norm.weight", (h,)), (f"blk.{i}.attn_q.weight", (h, h)),
                (f"blk.{i}.attn_k.weight", (kv, h)), (f"blk.{i}.attn_v.weight", (kv, h)),
                (f"blk.{i}.attn_output.weight", (h, h)), (f"blk.{i}.ffn_norm.weight", (h,)),
                (f"blk.{i}.ffn_gate.weight", (f, h)), (f"blk.{i}.ffn_up.weight", (f, h)),
                (f"blk.{i}.ffn_down.weight", (h, f))]
    return out + [("output_norm.weight", (h,)), ("output.weight", (v, h))]


def write_base(path: Path, cfg: dict, dtype: str, seed: int = 0, like: Path | None = None) -> Path:
    """A synthetic model GGUF, streamed tensor by tensor (random weights; norms F32). `like`: a GGUF of the Llama
    architecture whose tokenizer and chat template are copied and the shapes' hyperparameters written, so that
    llama.cpp runs the file; its weights are then drawn at a trained model's scale (std 0.02, norms 1) so that 32
    layers stay finite."""
    import gguf
    from gguf.quants import quant_shape_to_byte_shape, quantize

    from lorablend.runtime.gguf_io import BASE_DTYPES, write_atomic

    qtype = gguf.GGMLQuantizationType[BASE_DTYPES[dtype][0]]
    writer = gguf.GGUFWriter(None, "llama")
    writer.add_name("synthetic Mistral-7B shapes")
    writer.add_file_type(gguf.LlamaFileType[BASE_DTYPES[dtype][1]])
    if like is None:
        writer.add_string("tokenizer.chat_template", "{{ messages }}")
    else:
        copy_tokenizer(writer, like)
        h = cfg["hidden_size"]
        writer.add_context_length(cfg["max_position_embeddings"])
        writer.add_embedding_length(h)
        writer.add_feed_forward_length(cfg["intermediate_size"])
        writer.add_block_count(cfg["num_hidden_layers"])
        writer.add_head_count(cfg["num_attention_heads"])
        writer.add_head_count_kv(cfg["num_key_value_heads"])
        writer.add_rope_freq_base(cfg["rope_theta"])
        writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        writer.add_rope_dimension_count(h // cfg["num_attention_heads"])
        writer.add_vocab_size(cfg["vocab_size"])
    tensors = base_tensors(cfg)
    for name, shape in tensors:
        t = gguf.GGMLQuantizationType.F32 if len(shape) == 1 else qtype
        nbytes = 4 * int(np.prod(shape)) if t == gguf.GGMLQuantizationType.F32 else \
            int(np.prod(quant_shape_to_byte_shape(shape, t)))
        writer.add_tensor_info(name, shape, np.float32, nbytes, raw_dtype=t)
    rng = np.random.default_rng(seed)
    scale = np.float32(1.0 if like is None else 0.02 * 12**0.5)  # uniform on [-scale/2, scale/2): std scale/sqrt(12)

    def data():
        for _, shape in tensors:
            if like is not None and len(shape) == 1:
                yield np.ones(shape, np.float32)
                continue
            w = (rng.random(shape, dtype=np.float32) - np.float32(0.5)) * scale
            yield w if len(shape) == 1 or qtype == gguf.GGMLQuantizationType.F32 else quantize(w, qtype)

    write_atomic(writer, path, data())
    return path


def copy_tokenizer(writer, like: Path) -> None:
    """Every `tokenizer.*` field of the GGUF `like`."""
    import gguf

    from lorablend.runtime.gguf_io import copy_field

    for field in gguf.GGUFReader(like).fields.values():
        if field.name.startswith("tokenizer."):
            copy_field(writer, field)


def write_inputs(root: Path, base_dtype: str, cfg: dict = CONFIG) -> tuple[Path, Path, Path]:
    """The base model dir (config.json), its synthetic GGUF, and one synthetic adapter."""
    from benchmarks.scale import Shape, adapter_bytes, adapter_config

    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(cfg))
    shape = Shape(layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"],
                  kv=cfg["hidden_size"] // cfg["num_attention_heads"] * cfg["num_key_value_heads"])
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(adapter_bytes(shape, "f32", 0, 0))
    (adapter / "adapter_config.json").write_bytes(adapter_config(shape))
    return model, write_base(root / f"base-{base_dtype}.gguf", cfg, base_dtype), adapter


def _merge_child(adapter: str, model: str, src: str, out: str, dtype: str, result) -> None:
    from lorablend.runtime.gguf import merge_gguf, merged_metadata

    start = time.perf_counter()
    merge_gguf(adapter, model, src, out, dtype, merged_metadata(adapter))
    result.put({"seconds": time.perf_counter() - start,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bf16", help="the synthetic base's type (bf16 | f16 | f32 | q8_0)")
    parser.add_argument("--out-dtype", default="bf16", help="the merged file's type")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="lorablend-merge-", dir=args.dir))
    try:
        start = time.perf_counter()
        model, src, adapter = write_inputs(root, args.dtype)
        print(f"synthetic base {src} ({src.stat().st_size / 1e9:.2f} GB) written in {time.perf_counter() - start:.0f} s")
        out = root / f"merged-{args.out_dtype}.gguf"
        ctx = mp.get_context("spawn")  # a fresh process: its peak RSS is the merge's alone
        result = ctx.Queue()
        child = ctx.Process(target=_merge_child, args=(str(adapter), str(model), str(src), str(out), args.out_dtype,
                                                       result))
        child.start()
        measured = result.get()
        child.join()
        if child.exitcode:
            raise SystemExit(f"the merge failed (exit {child.exitcode})")
        size = out.stat().st_size
        print(f"merge {args.dtype} -> {args.out_dtype}: {measured['seconds']:.0f} s wall, peak RSS "
              f"{measured['peak_rss_bytes'] / 1e9:.2f} GB = {measured['peak_rss_bytes'] / size:.3f} x the merged file "
              f"({size / 1e9:.2f} GB); largest tensor {max(np.prod(s) for _, s in base_tensors(CONFIG)) * 4 / 1e9:.2f} GB "
              "as f32")
    finally:
        if args.keep:
            print(f"kept {root}; remove it with: rm -rf {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
