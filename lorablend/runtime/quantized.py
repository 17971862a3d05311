"""A frozen base held in int8 or 4-bit NF4 (bitsandbytes) under a LoRA trained in full precision: QLoRA on the
CPU, so that a 7B training step fits a laptop's memory (docs/QUANTIZED-BASE.md chose the library by measurement).

Two traps are handled here rather than by callers. On a CPU with AVX512-BF16, an eval-mode forward repacks
bitsandbytes' 4-bit weights for inference for good, after which every LoRA gradient is silently None: `guard`
turns that repacking off. And the data-aware starts that move the base weights (LoRA-GA, PiSSA) cannot write to
quantized weights: `holds` tells the planner, `check_start` refuses them in one line.
"""

from __future__ import annotations

from lorablend.errors import InputError

KINDS = ("int8", "nf4")
BASES = ("full",) + KINDS  # what `--train-base` takes besides auto
AUTO = ("full", "nf4")  # int8 is never chosen: at 7B its step was slower than bf16's and twice NF4's memory
# A training step's peak, per parameter: the weights as held (fp32 as `load_model` loads them; NF4 with its block
# scales) plus what the step adds (activations at batch 8 with checkpointing, the LoRA and its Adam state, the
# runtime). Measured at Mistral-7B's shapes (docs/PERFORMANCE.md, `benchmarks/laptop.py`): NF4 9.1 GiB.
BYTES_PER_WEIGHT = {"full": 4.0, "nf4": 0.6}
STEP_BYTES = 0.7
# The first-order pass's peak beyond the weights, per parameter: the gradient summed for the adapted q/k/v, a
# 512-token slice's activations, the runtime. Measured at the same shapes: 11.2 GiB over NF4.
FIRST_ORDER_BYTES = 1.05


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def _bnb():
    if not available():
        raise InputError("a quantized base needs bitsandbytes: pip install 'lorablend[quantized]' "
                         "(or bitsandbytes>=0.50), or pass --train-base full")
    import bitsandbytes  # quiet: lorablend/__init__.py

    return bitsandbytes


def compute_dtype():
    """What the dequantized products run in: bf16 where the CPU computes it natively, else fp32."""
    import torch

    from lorablend.machine import native_bf16

    return torch.bfloat16 if native_bf16() else torch.float32


def quantized_linear(linear, kind: str, dtype=None):
    """A bitsandbytes layer holding `linear`'s weight as `kind` (quantized from its values here); its products
    run in `dtype` (default `compute_dtype()`)."""
    import torch

    bnb = _bnb()
    weight = linear.weight.data.float()
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=0.0)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    elif kind == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=dtype or compute_dtype(), quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    else:
        raise InputError(f"quantized base '{kind}': expected one of {', '.join(KINDS)}")
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.data.float(), requires_grad=False)
    return guard(layer.to("cpu"))  # moving to a device is what quantizes in bitsandbytes


def quantize(model, kind: str, skip: tuple[str, ...] = ("lm_head",), dtype=None):
    """`model` with every Linear layer but `skip` replaced by its `kind` counterpart, in place (one layer's float
    copy at a time)."""
    import torch

    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in skip:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, quantized_linear(module, kind, dtype))
    return model


def load_quantized(model_id: str, kind: str):
    """The model from its checkpoint with its linear layers quantized shard by shard as transformers loads them
    (the float model is never whole in memory), in eval mode."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lorablend.runtime.models import _LOAD_ERRORS, _load_error, resolve_model

    _bnb()
    config = (BitsAndBytesConfig(load_in_8bit=True) if kind == "int8" else
              BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype()))
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model(model_id), quantization_config=config,
                                                     device_map="cpu", dtype=compute_dtype())
    except _LOAD_ERRORS as err:
        raise _load_error(model_id, err) from err
    return guard(model).eval()


def guard(model):
    """Keep bitsandbytes' 4-bit layers trainable after an eval-mode pass (the AVX512-BF16 repack above)."""
    bnb = _bnb()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def holds(start: str, kind: str) -> bool:
    """Whether a `kind` base can train from `start` (LoRA-GA and PiSSA rewrite the base weights)."""
    from lorablend.runtime.starts import SHIFTS_BASE

    return kind not in KINDS or start not in SHIFTS_BASE


def check_start(start: str, kind: str) -> None:
    if not holds(start, kind):
        raise InputError(f"the {start} start rewrites the base weights, which a {kind} base cannot hold; train from "
                         "zero or from the blend, or pass --train-base full")


def step_gib(params: int, kind: str) -> float:
    """The peak memory of a training step over a `kind` base (GiB)."""
    return params * (BYTES_PER_WEIGHT[kind] + STEP_BYTES) / 2**30


def first_order_fits(params: int | None, free_gib: float) -> tuple[bool, str]:
    """Whether the first-order pass fits over an NF4 base (where full precision does not), and why in a few words."""
    if not available():
        return False, "bitsandbytes is not installed"
    if params is None:
        return False, "the model's size is unknown here"
    need = params * (BYTES_PER_WEIGHT["nf4"] + FIRST_ORDER_BYTES) / 2**30
    return need <= free_gib, f"over an NF4 base it needs ~{need:.1f} GiB and {free_gib:.1f} GiB are free"


def training_base(params: int | None, free_gib: float) -> tuple[str, str]:
    """The base a training step fits in (full precision first, then NF4), and why in a few words."""
    if params is None:
        return "full", "the model's size is unknown here"
    for kind in AUTO:
        need = step_gib(params, kind)
        if need <= free_gib and (kind == "full" or available()):
            what = "full precision" if kind == "full" else f"an {kind} base"
            return kind, f"{what} needs ~{need:.1f} GiB to train and {free_gib:.1f} GiB are free"
    return "nf4", f"even an nf4 base needs ~{step_gib(params, 'nf4'):.1f} GiB and {free_gib:.1f} GiB are free (it may swap)"
