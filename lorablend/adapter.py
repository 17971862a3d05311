"""Stage 6 — adapters on disk: read bank adapters lazily, write the standard PEFT format.

Reading is memory-mapped and module by module, so a combination streams over the
bank instead of stacking it, and holds about one module of each adapter in memory. Only plain LoRA is
combined exactly; DoRA and other variants are refused rather than mis-merged.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from lorablend.combine import Factors
from lorablend.errors import InputError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
_DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2)}  # safetensors dtype -> numpy, bytes
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "use_qalora": "QA-LoRA",
    "lora_bias": "LoRA bias",
}


@dataclass
class AdapterSpec:
    """What lorablend needs from an adapter_config.json."""

    path: Path
    r: int
    alpha: float
    use_rslora: bool
    base_model: str
    target_modules: list[str]
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def _pattern(self, pattern: dict, module: str, default):
        """The value of the first key matching `module` the way PEFT matches it (a regex on the name's tail)."""
        for key, value in pattern.items():
            try:
                if re.match(rf"(.*\.)?({key})$", module):
                    return value
            except re.error:
                if module == key or module.endswith("." + key):
                    return value
        return default

    def rank(self, module: str) -> int:
        """The rank the config gives a module: rank_pattern, else r."""
        return int(self._pattern(self.rank_pattern, module, self.r))

    def scale(self, module: str) -> float:
        """PEFT's scaling for one module: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r = self._pattern(self.rank_pattern, module, self.r)
        alpha = self._pattern(self.alpha_pattern, module, self.alpha)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def read_spec(adapter_dir: str | Path) -> AdapterSpec:
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / CONFIG
    if not cfg_path.exists():
        raise InputError(f"{cfg_path}: adapter config not found; an adapter dir needs {CONFIG} and {WEIGHTS}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{cfg_path}: invalid JSON ({exc}); restore the file or rebuild the adapter") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{cfg_path}: expected a JSON object (a PEFT LoraConfig), got {type(cfg).__name__}")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InputError(f"{cfg_path}: peft_type {peft_type} is not LoRA; lorablend combines LoRA adapters only")
    for key, label in _UNSUPPORTED.items():
        if cfg.get(key):
            raise InputError(
                f"{cfg_path}: {label} adapter ({key}=true) cannot be combined exactly; remove it from the bank"
            )
    if cfg.get("modules_to_save"):
        raise InputError(f"{cfg_path}: modules_to_save is set; lorablend combines only the LoRA factors")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    try:
        spec = AdapterSpec(
            path=adapter_dir,
            r=int(cfg.get("r", 8)),
            alpha=float(cfg.get("lora_alpha", cfg.get("r", 8))),
            use_rslora=bool(cfg.get("use_rslora", False)),
            base_model=str(cfg.get("base_model_name_or_path") or ""),
            target_modules=sorted(map(str, targets)),
            rank_pattern=dict(cfg.get("rank_pattern") or {}),
            alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
        )
    except (TypeError, ValueError) as exc:
        raise InputError(f"{cfg_path}: invalid LoRA config ({exc}); fix r, lora_alpha, rank_pattern, alpha_pattern") from None
    if spec.r < 1 or not math.isfinite(spec.alpha):
        raise InputError(f"{cfg_path}: invalid LoRA config (r={spec.r}, lora_alpha={spec.alpha}); r must be >= 1")
    return spec


def map_weights(path: Path) -> tuple[mmap.mmap, int, dict]:
    """(read-only map of the safetensors file, offset of its data, its tensor header). A missing,
    cut-short or damaged file is one InputError, whichever backend then loads it."""
    if not path.exists():
        raise InputError(f"{path}: adapter weights not found; an adapter dir needs {CONFIG} and {WEIGHTS}")
    try:
        with open(path, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        (n,) = struct.unpack("<Q", mm[:8])
        header = json.loads(mm[8 : 8 + n])
        header.pop("__metadata__", None)
        if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
            raise ValueError("the header is not a JSON object of tensors")
        size = 8 + n + max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        if size > len(mm):
            raise ValueError(f"truncated: {len(mm)} of {size} bytes")
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: unreadable safetensors file ({exc}); re-download or rebuild it") from None
    return mm, 8 + n, header


class AdapterReader:
    """One adapter's LoRA factors, one module at a time, straight from a memory map.

    Why not safetensors' `safe_open`: its tensors are views into a map of the whole file that
    stays in the process until the reader goes, so streaming over a 500-adapter bank shows the
    whole bank in RSS. Here float32 factors are numpy views (no copy) and `release` drops a
    module's pages from the process once it is combined (madvise DONTNEED on a read-only file
    map): they stay in the page cache, and RSS holds about one module of each adapter.
    """

    def __init__(self, adapter_dir: str | Path):
        self.spec = read_spec(adapter_dir)
        self.path = path = Path(adapter_dir) / WEIGHTS
        self._mm, self._base, header = map_weights(path)
        self._tensors = header
        self.modules: list[str] = sorted(
            k[len(PREFIX) : -len(".lora_A.weight")] for k in header if k.endswith(".lora_A.weight")
        )
        if not self.modules:
            raise InputError(f"{path}: no LoRA tensors (*.lora_A.weight) found")
        known = {f"{PREFIX}{m}.lora_{ab}.weight" for m in self.modules for ab in "AB"}
        extra = [k for k in header if k not in known]
        if extra:
            raise InputError(f"{path}: unsupported tensor '{extra[0]}' (DoRA or another LoRA variant?); remove it")
        missing = sorted(known - set(header))
        if missing:
            raise InputError(f"{path}: '{missing[0]}' is missing (a lora_A without its lora_B); the adapter is corrupt: "
                             "rebuild it or remove it from the bank")

    def features(self, module: str) -> tuple[int, int]:
        """(in, out) features of a module, from the header: what ties an adapter to one base model's shapes."""
        a, b = (self._tensors[f"{PREFIX}{module}.lora_{ab}.weight"].get("shape") or [0, 0] for ab in "AB")
        return int(a[-1]), int(b[0])

    def _tensor(self, key: str) -> np.ndarray:
        """float32: a read-only view into the map for F32, a converted copy for F16 / BF16."""
        meta = self._tensors[key]
        if meta.get("dtype") not in _DTYPES:
            raise InputError(f"{self.path}: tensor {key} has dtype {meta.get('dtype')}; lorablend reads F32, F16 "
                             "and BF16 adapters: convert it")
        np_dtype, size = _DTYPES[meta["dtype"]]
        try:
            shape = tuple(int(d) for d in meta["shape"])
            start, end = (int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{self.path}: tensor {key} has no valid shape / data_offsets; re-download or rebuild it") from None
        count = math.prod(shape)
        if end - start != count * size or start < 0 or self._base + end > len(self._mm):
            raise InputError(f"{self.path}: tensor {key} is truncated or has a wrong size; re-download or rebuild it")
        raw = np.frombuffer(self._mm, dtype=np_dtype, count=count, offset=self._base + start)
        if meta["dtype"] == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        return raw.astype(np.float32, copy=False).reshape(shape)

    def factors(self, module: str) -> Factors:
        A = self._tensor(f"{PREFIX}{module}.lora_A.weight")
        B = self._tensor(f"{PREFIX}{module}.lora_B.weight")
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise InputError(f"{self.path}: module {module} has inconsistent shapes A{A.shape} B{B.shape}; "
                             "the adapter is corrupt: rebuild it or remove it from the bank")
        if A.shape[0] != self.spec.rank(module):
            # its scale (alpha / r) would be wrong, and PEFT itself refuses such an adapter
            raise InputError(f"{self.path}: module {module} has rank {A.shape[0]} but {CONFIG} says "
                             f"{self.spec.rank(module)}; fix r / rank_pattern in the config or rebuild the adapter")
        if not (np.isfinite(A).all() and np.isfinite(B).all()):
            raise InputError(f"{self.path}: module {module} holds NaN or Inf values; the adapter is corrupt: "
                             "rebuild it or remove it from the bank")
        return Factors(A=A, B=B, scale=self.spec.scale(module))

    def release(self, module: str) -> None:
        """Drop the process's pages of the file up to the module's end (from the start, because the
        kernel maps up to 64 KB of cached neighbours on each fault, earlier modules' pages too)."""
        if not hasattr(self._mm, "madvise"):  # Windows: nothing to drop
            return
        end = self._base + max(int(self._tensors[f"{PREFIX}{module}.lora_{ab}.weight"]["data_offsets"][1]) for ab in "AB")
        self._mm.madvise(mmap.MADV_DONTNEED, 0, min(end, len(self._mm)))


def check_shapes(module: str, labels: list[str], factors: list[Factors], weight: tuple[int, int] | None = None) -> None:
    """Refuse one module's factors that map different features: the adapters are not for one base model.
    `labels` name each adapter in the message (e.g. "entry NAME"); `weight`, the base model's (out, in)
    shape when it is at hand, else the shape most adapters share, is what the odd one is compared with."""
    from collections import Counter

    shapes = [(f.B.shape[0], f.A.shape[1]) for f in factors]
    want = weight or Counter(shapes).most_common(1)[0][0]
    odd = next((j for j, sh in enumerate(shapes) if sh != want), None)
    if odd is None:
        return
    ref = "the base model" if weight else labels[shapes.index(want)]
    raise InputError(
        f"{labels[odd]}: module {module} maps {shapes[odd][1]} -> {shapes[odd][0]} features but {ref} maps "
        f"{want[1]} -> {want[0]}; the adapters are not for one base model: remove {labels[odd]} from the bank"
    )


def write_adapter(
    out_dir: Path,
    modules: dict[str, Factors],
    base_model: str,
    dtype: str = "float32",
) -> None:
    """Write factors as a PEFT adapter with scaling 1 (lora_alpha = r).

    Modules whose rank differs from the most common one go into rank_pattern /
    alpha_pattern, which PEFT reads back per module.
    """
    from peft import LoraConfig

    ranks = {m: f.rank for m, f in modules.items()}
    r = max(set(ranks.values()), key=lambda v: (list(ranks.values()).count(v), v))
    pattern = {m: k for m, k in ranks.items() if k != r}
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=targets,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )
    # PEFT keeps target_modules as a set, whose order changes between processes:
    # write the config ourselves with a sorted list so reruns are byte-identical.
    cfg = config.to_dict()
    cfg["target_modules"] = targets
    cfg["peft_type"] = str(getattr(cfg["peft_type"], "value", cfg["peft_type"]))
    cfg["task_type"] = str(getattr(cfg["task_type"], "value", cfg["task_type"]))
    (out_dir / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype] if dtype != "bfloat16" else None
    tensors = {}
    for m in sorted(modules):
        f = modules[m]
        for ab, arr in (("A", f.A * np.float32(f.scale) if f.scale != 1 else f.A), ("B", f.B)):
            tensors[f"{PREFIX}{m}.lora_{ab}.weight"] = arr
    if np_dtype is None:
        save_bf16(tensors, out_dir / WEIGHTS)
    else:
        save_file({k: np.ascontiguousarray(v, dtype=np_dtype) for k, v in tensors.items()}, str(out_dir / WEIGHTS))


def save_bf16(tensors: dict, path: Path) -> None:
    """numpy or torch tensors saved as bf16 safetensors (numpy has no bf16)."""
    import torch
    from safetensors.torch import save_file as save_torch

    save_torch({k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v).to(torch.bfloat16)
                .contiguous() for k, v in tensors.items()}, str(path))
