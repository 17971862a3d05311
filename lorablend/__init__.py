"""lorablend: LoRA adapters without gradient training, on a CPU."""

__version__ = "0.1.0"
