"""What a worker process keeps between entries: the base model (with LoRA slots, or as llama.cpp) and the bank's
factors, loaded once."""

from __future__ import annotations

import atexit
import warnings
from contextlib import contextmanager

import numpy as np

from lorablend.bank.combination import open_readers
from lorablend.bank.manifest import Bank


class CachedReader:
    """An AdapterReader whose factors stay in memory: the bench combines the same bank thousands of times."""

    def __init__(self, reader):
        self.spec, self.modules, self.path, self._reader, self._factors = reader.spec, reader.modules, reader.path, reader, {}

    def factors(self, module: str):
        if module not in self._factors:
            self._factors[module] = self._reader.factors(module)
        return self._factors[module]

    def release(self, module: str) -> None:
        """Nothing to release: the factors stay cached for the next combination."""


class SlotModel:
    """The base model with a few LoRA slots whose weights are overwritten for each evaluation.

    Loading dozens of adapters per entry through PEFT's loader walks every module for each load; copying
    factors into existing slots costs milliseconds, and nothing is written to disk. Slots have
    lora_alpha = r (scaling 1): a factor's own scale is folded into A, and ranks below the slot's are
    zero-padded, which leaves B·A unchanged. Slots decode together in PEFT mixed-adapter batches.
    """

    def __init__(self, base, model_id: str, modules: list[str], slots: int, rank: int):
        from peft import LoraConfig, get_peft_model

        self.model_id, self.modules, self.rank = model_id, list(modules), rank
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=self.modules, lora_dropout=0.0, bias="none")
        self.names = [f"slot{k}" for k in range(slots)]
        with warnings.catch_warnings():  # transformers' deprecation notices from inside PEFT
            warnings.simplefilter("ignore", FutureWarning)
            self.model = get_peft_model(base, config, adapter_name=self.names[0])
            for name in self.names[1:]:
                self.model.add_adapter(name, config)
        self.model.eval()
        self._layers = {m: self.model.base_model.model.get_submodule(m) for m in self.modules}

    def fits(self, model_id: str, modules: list[str], slots: int, rank: int) -> bool:
        return model_id == self.model_id and list(modules) == self.modules and slots <= len(self.names) and rank <= self.rank

    def unload(self):
        """The base model back, without slots, for a SlotModel of another shape."""
        return self.model.unload()

    def fill(self, slot: int, modules: dict) -> None:
        """Slot `slot` := these factors (module -> Factors), exactly: s·B·A = B_slot·A_slot."""
        import torch

        name = self.names[slot]
        with torch.no_grad():
            for m, layer in self._layers.items():
                f = modules[m]
                A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
                A.zero_()
                B.zero_()
                A[: f.rank] = torch.from_numpy(np.asarray(f.A * np.float32(f.scale), dtype=np.float32))
                B[:, : f.rank] = torch.from_numpy(np.asarray(f.B, dtype=np.float32))


class Worker:
    """One process's models and bank factors. The base model is loaded once and shared: wrapped in LoRA slots
    to answer, under `disable_adapter` to score; training gets a copy of its own (no nested LoRA)."""

    def __init__(self):
        self._readers: dict = {}
        self._base = None  # (model_id, plain base model) while no SlotModel wraps it
        self._slots: SlotModel | None = None
        self._train = None  # (model_id, model)
        self._llamacpp = None

    def readers(self, bank: Bank) -> dict:
        """The bank's adapters with their factors cached in memory."""
        key = (str(bank.root), bank.sha256)
        if key not in self._readers:
            self._readers[key] = {n: CachedReader(r) for n, r in open_readers(bank, bank.names).items()}
        return self._readers[key]

    def _plain(self, model_id: str):
        from lorablend.runtime.models import load_model

        if self._base is None or self._base[0] != model_id:
            self._base = (model_id, load_model(model_id))
        return self._base[1]

    @contextmanager
    def scoring_model(self, model_id: str):
        """The base model without LoRA updates, for the scorers' hooks: the slot model's own under
        `disable_adapter` (no second copy in memory, same weights), else the plain model a SlotModel will wrap."""
        if self._slots is not None and self._slots.model_id == model_id:
            with self._slots.model.disable_adapter():
                yield self._slots.model.base_model.model
            return
        yield self._plain(model_id)

    @contextmanager
    def training_model(self, model_id: str):
        """A plain base model of the worker's own for training curves (never the slot model)."""
        if self._train is None or self._train[0] != model_id:
            from lorablend.runtime.models import load_model

            self._train = (model_id, load_model(model_id))
        yield self._train[1]

    def slot_model(self, model_id: str, modules: list[str], slots: int, rank: int) -> SlotModel:
        """The SlotModel, rebuilt (base model kept) only when more slots or a higher rank are needed."""
        current = self._slots
        if current is None or not current.fits(model_id, modules, slots, rank):
            if current is not None:
                self._base, self._slots = (current.model_id, current.unload()), None
                rank, slots = max(rank, current.rank), max(slots, len(current.names))
            base = self._plain(model_id)
            self._base = None  # the SlotModel wraps it now
            self._slots = SlotModel(base, model_id, modules, slots, rank)
        return self._slots

    def llamacpp_model(self, model_id: str, threads: int):
        """The llama.cpp model (loaded once; its adapters change per evaluation)."""
        from lorablend.runtime.llamacpp import LlamaCppModel

        if self._llamacpp is None or self._llamacpp.model_id != model_id:
            if self._llamacpp is not None:
                self._llamacpp.close()
            self._llamacpp = LlamaCppModel(model_id, n_threads=threads)
            atexit.register(self._llamacpp.close)  # before interpreter teardown unloads llama_cpp under __del__
        return self._llamacpp


WORKER = Worker()  # this process's; pools and Ray run one process per job
