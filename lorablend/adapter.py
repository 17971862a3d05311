"""Stage 6 — adapters on disk: read bank adapters lazily, write the standard PEFT format.

Reading is memory-mapped (safetensors `safe_open`) and module by module, so a
combination streams over the bank instead of stacking it. Only plain LoRA is
combined exactly; DoRA and other variants are refused rather than mis-merged.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from .combine import Factors
from .errors import InputError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
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


class AdapterReader:
    """Memory-mapped access to one adapter's LoRA factors, one module at a time."""

    def __init__(self, adapter_dir: str | Path):
        self.spec = read_spec(adapter_dir)
        path = Path(adapter_dir) / WEIGHTS
        if not path.exists():
            raise InputError(f"{path}: adapter weights not found; an adapter dir needs {CONFIG} and {WEIGHTS}")
        try:
            self._file = safe_open(str(path), framework="pt")
            keys = list(self._file.keys())
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise InputError(f"{path}: unreadable safetensors file ({exc}); re-download or rebuild it") from None
        self.path = path
        self.modules: list[str] = sorted(
            k[len(_PREFIX) : -len(".lora_A.weight")] for k in keys if k.endswith(".lora_A.weight")
        )
        if not self.modules:
            raise InputError(f"{path}: no LoRA tensors (*.lora_A.weight) found")
        known = {f"{_PREFIX}{m}.lora_{ab}.weight" for m in self.modules for ab in "AB"}
        extra = [k for k in keys if k not in known]
        if extra:
            raise InputError(f"{path}: unsupported tensor '{extra[0]}' (DoRA or another LoRA variant?); remove it")
        missing = sorted(known - set(keys))
        if missing:
            raise InputError(f"{path}: '{missing[0]}' is missing (a lora_A without its lora_B); the adapter is corrupt: "
                             "rebuild it or remove it from the bank")

    def factors(self, module: str) -> Factors:
        import torch

        A = self._file.get_tensor(f"{_PREFIX}{module}.lora_A.weight").to(torch.float32).numpy()
        B = self._file.get_tensor(f"{_PREFIX}{module}.lora_B.weight").to(torch.float32).numpy()
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
            tensors[f"{_PREFIX}{m}.lora_{ab}.weight"] = arr
    if np_dtype is None:
        _save_bf16(tensors, out_dir / WEIGHTS)
    else:
        save_file({k: np.ascontiguousarray(v, dtype=np_dtype) for k, v in tensors.items()}, str(out_dir / WEIGHTS))


def _save_bf16(tensors: dict, path: Path) -> None:
    import torch
    from safetensors.torch import save_file as save_torch

    save_torch({k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16) for k, v in tensors.items()}, str(path))
