"""GGUF files on disk: written atomically, and rewritten tensor by tensor with their source pages released."""

from __future__ import annotations

import mmap
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from lorablend.atomic import atomic_file
from lorablend.errors import InputError

# dequantize_gguf's output types: (GGMLQuantizationType, LlamaFileType) names.
BASE_DTYPES = {"f32": ("F32", "ALL_F32"), "bf16": ("BF16", "MOSTLY_BF16"), "f16": ("F16", "MOSTLY_F16"),
               "q8_0": ("Q8_0", "MOSTLY_Q8_0")}  # q8_0: for speed comparisons (docs/PERFORMANCE.md, "Why not 4x")


def write_atomic(writer, out: Path, data: Iterable[np.ndarray] | None = None) -> None:
    """Write a GGUFWriter to `out` through `atomic_file` (GGUFWriter would open the path itself).

    `data`: the tensors' bytes, one array per `add_tensor_info` and in its order, made as they are
    written (streaming); None when the writer holds them (`add_tensor`). A path that cannot hold a
    file is bad input (exit 2); other OS errors, such as a full disk, are not.
    """
    from gguf.gguf_writer import WriterState

    try:
        with atomic_file(out) as fh:
            writer.fout, writer.state = [fh], WriterState.EMPTY
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            if data is None:
                writer.write_tensors_to_file()
            else:
                writer.write_ti_data_to_file()
                for arr in data:
                    writer.write_tensor_data(arr)
            writer.fout = None  # atomic_file flushes, syncs and closes fh
    except (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
        raise InputError(f"{out}: cannot write there ({exc.strerror}); choose a writable --out") from None


def dequantize_gguf(src: str | Path, out: str | Path, dtype: str = "f32") -> Path:
    """Rewrite a quantized GGUF model with full-precision weights, every metadata field copied; atomic.

    llama.cpp's Q4_1 prompt processing is slower than PyTorch's fp32 GEMM (docs/PERFORMANCE.md).
    `f32` holds exactly the weights `gguf.quants.dequantize` gives, which are the weights
    transformers' GGUF loader gives the torch path; `bf16` / `f16` / `q8_0` round them once more.
    Tensors that are F32 already (the norms) stay F32; `general.file_type` says the new type.
    """
    return rewrite_gguf(src, out, dtype)


def rewrite_gguf(src: str | Path, out: str | Path, dtype: str, update=None, metadata: Mapping[str, str] | None = None,
                  expect: set[str] = frozenset()) -> Path:
    """Copy the GGUF model `src` to `out` as `dtype`, adding `update(name)` (an f32 array or None) to each
    tensor; streamed, atomic. Every tensor named in `expect` must exist, with the update's shape."""
    import gguf
    from gguf.quants import dequantize, quant_shape_to_byte_shape, quantize

    if dtype not in BASE_DTYPES:
        raise InputError(f"dtype must be one of {', '.join(BASE_DTYPES)}, got '{dtype}'")
    qtype, file_type = BASE_DTYPES[dtype]
    qtype, file_type = gguf.GGMLQuantizationType[qtype], gguf.LlamaFileType[file_type]
    F32 = gguf.GGMLQuantizationType.F32
    try:
        reader = gguf.GGUFReader(src)
    except (OSError, ValueError) as exc:
        raise InputError(f"{src}: not a readable GGUF file ({exc})") from None
    keys = gguf.Keys.General
    if reader.endianess != gguf.GGUFEndian.LITTLE or keys.ARCHITECTURE not in reader.fields:
        raise InputError(f"{src}: not a little-endian GGUF model file (no {keys.ARCHITECTURE})")
    if reader.fields.get(keys.TYPE) and reader.fields[keys.TYPE].contents() == gguf.GGUFType.ADAPTER:
        raise InputError(f"{src}: is a GGUF LoRA adapter, not a model; pass the base model's GGUF")
    missing = sorted(expect - {t.name for t in reader.tensors})
    if missing:
        raise InputError(f"{src}: has no tensor {missing[0]}, which the adapter changes; pass the GGUF of the "
                         "adapter's own base model")
    writer = gguf.GGUFWriter(None, reader.fields[keys.ARCHITECTURE].contents())
    for field in reader.fields.values():
        if field.name in (keys.ARCHITECTURE, keys.FILE_TYPE) or field.name.startswith("GGUF."):
            continue  # the writer's own, or replaced below
        if field.name in (metadata or {}):
            continue
        if field.name == keys.ALIGNMENT:
            writer.add_custom_alignment(field.contents())
            continue
        copy_field(writer, field)
    writer.add_file_type(file_type)
    for key, value in (metadata or {}).items():
        writer.add_string(key, value)

    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape))
        out_type = F32 if tensor.tensor_type == F32 or qtype == F32 else qtype
        nbytes = 4 * int(np.prod(shape)) if out_type == F32 else int(np.prod(quant_shape_to_byte_shape(shape, out_type)))
        writer.add_tensor_info(tensor.name, shape, np.float32, nbytes, raw_dtype=out_type)

    def data():
        for tensor in reader.tensors:
            try:
                w = np.asarray(tensor.data) if tensor.tensor_type == F32 else dequantize(tensor.data, tensor.tensor_type)
            except NotImplementedError:
                raise InputError(f"{src}: tensor {tensor.name} has type {tensor.tensor_type.name}, which the gguf "
                                 "package cannot dequantize") from None
            delta = update(tensor.name) if update is not None else None
            if delta is not None:
                if delta.shape != w.shape:
                    raise InputError(f"{src}: tensor {tensor.name} is {w.shape[::-1]} (ggml order) but the adapter's "
                                     f"update is {delta.shape[::-1]}; pass the GGUF of the adapter's own base model")
                w = w.astype(np.float32) + delta
            keep = tensor.tensor_type == F32 or qtype == F32
            yield np.ascontiguousarray(w, np.float32) if keep else quantize(np.asarray(w, np.float32), qtype)
            release_pages(reader, tensor.data_offset + tensor.n_bytes)

    out = Path(out)
    write_atomic(writer, out, data())
    return out


def copy_field(writer, field) -> None:
    """A metadata field of a GGUFReader into a GGUFWriter, with its value type (and an array's element type)."""
    import gguf

    vtype = field.types[0]
    writer.add_key_value(field.name, field.contents(), vtype,
                         sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)


def release_pages(reader, end: int) -> None:
    """Drop the process's pages of the memory-mapped source up to `end`: touched pages of a read-only
    map stay in RSS, so without this a 7B merge holds the whole base (15.6 GB measured) though it
    needs one tensor."""
    mm = getattr(reader.data, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise"):  # Windows: nothing to drop
        mm.madvise(mmap.MADV_DONTNEED, 0, min(end, len(mm)))
