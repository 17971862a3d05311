"""Where a LoRA starts before its first training step.

- `zero`: PEFT's default (A random, B = 0): the update starts at nothing.
- `blend`: a bank blend's exact update s·B·A (`start_from`); the base weights are untouched.
- `lora-ga`: the gradient-aligned start of LoRA-GA (arXiv 2407.05000), PEFT's own (`preprocess_loraga`): A and B
  from the SVD of ∂L/∂W at the base model on the first examples.
- `pissa`: PEFT's PiSSA: A and B from the top singular directions of W itself.

LoRA-GA and PiSSA move s·B0·A0 out of the base weight so that the model starts unchanged. An adapter trained from
them applies to the *original* base only as s·(B·A − B0·A0), a LoRA of rank 2r (PEFT's
`path_initial_model_for_weight_conversion` writes the same): `Shift` keeps B0, A0 and the original weights, and
gives both back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STARTS = ("zero", "blend", "lora-ga", "pissa")
SHIFTS_BASE = ("lora-ga", "pissa")
START_PASSES = {"lora-ga": 3.0}  # forward-pass equivalents a start spends before training: LoRA-GA's forward+backward
GRADIENT_EXAMPLES = 16  # LoRA-GA's gradient is estimated on the first examples, as first-order scoring does
_PEFT_INIT = {"zero": True, "blend": True, "lora-ga": "lora_ga", "pissa": "pissa"}


def check_start(start: str) -> str:
    if start not in STARTS:
        from lorablend.errors import InputError

        raise InputError(f"start '{start}' is not one of {', '.join(STARTS)}")
    return start


def lora_config(r: int, alpha: float, target_modules, start: str):
    """PEFT's LoraConfig for this start (the blend's factors are set afterwards by `start_from`)."""
    from peft import LoraConfig

    extra = {}
    if start == "lora-ga":
        from peft import LoraGAConfig

        extra["lora_ga_config"] = LoraGAConfig()
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM", init_lora_weights=_PEFT_INIT[check_start(start)], **extra)


def estimate_gradient(model, config, backward_step) -> None:
    """LoRA-GA's preprocessing, PEFT's own: `backward_step()` runs the forward and backward passes whose mean
    gradient of the target weights PEFT attaches to each module for its initialisation."""
    import warnings

    from peft.tuners.lora.loraga import preprocess_loraga

    with warnings.catch_warnings():  # PEFT's counting hooks fire with no input needing a gradient: expected here
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        preprocess_loraga(model, config, backward_step)


@dataclass
class Shift:
    """What a base-shifting start changed: the original target weights and the starting factors B0, A0."""

    weights: dict  # module -> the original weight (a copy)
    initial: dict  # module -> (A0, B0, s) as float32 numpy

    @classmethod
    def before(cls, model, target_modules) -> "Shift":
        """Copy the target weights before PEFT's start shifts them."""
        leaves = set(target_modules)
        return cls({n: m.weight.detach().clone() for n, m in model.named_modules()
                    if n.rsplit(".", 1)[-1] in leaves and hasattr(m, "weight")}, {})

    def record(self, peft_model) -> None:
        """Keep the starting factors, just after the start."""
        for name, layer in _lora_layers(peft_model):
            self.initial[name] = (_numpy(layer.lora_A["default"].weight), _numpy(layer.lora_B["default"].weight),
                                  float(layer.scaling["default"]))

    def restore(self, model) -> None:
        """Put the original weights back into the (unloaded) base model."""
        import torch

        with torch.no_grad():
            for name, w in self.weights.items():
                model.get_submodule(name).weight.copy_(w)


def start_from(peft_model, init: dict) -> None:
    """Set the LoRA's factors to `init`'s updates: A as given, B divided by the LoRA's own scaling (alpha / r), so
    the starting update is exactly s·B·A of each module (a lower rank is padded with zero rows and columns)."""
    import torch

    causal_lm = peft_model.get_base_model()
    with torch.no_grad():
        for module, f in init.items():
            layer = causal_lm.get_submodule(module)
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            A.zero_()
            B.zero_()
            A[: f.rank] = torch.from_numpy(np.ascontiguousarray(f.A, dtype=np.float32))
            B[:, : f.rank] = torch.from_numpy(np.ascontiguousarray(f.B * (f.scale / layer.scaling["default"]),
                                                                    dtype=np.float32))


def lora_factors(peft_model, shift: Shift | None = None) -> dict:
    """The trained LoRA as module -> Factors (float32), in the bank's module names, as an update of the original
    base model: with a base-shifting start, [B, −B0]·[A; A0] at the LoRA's scaling (rank 2r)."""
    from lorablend.combine import Factors

    out = {}
    for name, layer in _lora_layers(peft_model):
        A, B = _numpy(layer.lora_A["default"].weight), _numpy(layer.lora_B["default"].weight)
        s = float(layer.scaling["default"])
        if shift is not None:
            A0, B0, s0 = shift.initial[name]
            A, B = np.concatenate([A, A0]), np.concatenate([B, -B0 * (s0 / s)], axis=1)
        out[name] = Factors(A=A, B=B, scale=s)
    return out


def _lora_layers(peft_model):
    for name, layer in peft_model.get_base_model().named_modules():
        if hasattr(layer, "lora_A") and "default" in layer.lora_A:
            yield name, layer


def _numpy(t) -> np.ndarray:
    return t.detach().float().numpy().copy()
