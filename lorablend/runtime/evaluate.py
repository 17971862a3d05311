"""Evaluation: batched greedy generation on the CPU, scored with Rouge-L and exact match.

Metrics are pure functions (scikit-learn style); `generate_answers` is the one
place that runs the model, with the prompt format training used.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorablend.dataset import Example
from lorablend.runtime.prompts import PromptFormat, end_of_turn_id, prompt_ids

_SCORER = None


def _scorer():
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"], use_stemmer=True)
    return _SCORER


def rouge(prediction: str, references: tuple[str, ...] | list[str]) -> tuple[float, float]:
    """(Rouge-L F, Rouge-Lsum F), each the max over the references."""
    scores = [_scorer().score(ref, prediction) for ref in references]
    return max(s["rougeL"].fmeasure for s in scores), max(s["rougeLsum"].fmeasure for s in scores)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and extra spaces: 'No.' and 'no' match."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def exact_match(prediction: str, references) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def max_new_tokens_for(tokenizer, references: list[str], cap: int = 96) -> int:
    """Room for the long answers of the task (95th percentile of reference lengths + 25%), capped."""
    lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references] or [cap]
    return int(min(cap, max(8, math.ceil(1.25 * float(np.percentile(lengths, 95))) + 2)))


@dataclass
class Scores:
    rouge_l: float
    rouge_lsum: float
    exact_match: float
    n: int

    @classmethod
    def of(cls, predictions: list[str], examples: list[Example]) -> "Scores":
        pairs = [rouge(p, e.outputs) for p, e in zip(predictions, examples)]
        em = [exact_match(p, e.outputs) for p, e in zip(predictions, examples)]
        return cls(
            rouge_l=float(np.mean([a for a, _ in pairs])),
            rouge_lsum=float(np.mean([b for _, b in pairs])),
            exact_match=float(np.mean(em)),
            n=len(examples),
        )


def generate_answers(
    model,
    tokenizer,
    examples: list[Example],
    *,
    max_new_tokens: int,
    fmt: PromptFormat = PromptFormat(),
    batch_size: int = 8,
    progress=None,
    adapter_names: list[str] | None = None,
) -> list[str]:
    """Greedy answers, batched by similar prompt length with left padding.

    `adapter_names` (one per example; PEFT's "__base__" for none) runs several named adapters in
    one batch, as PEFT's mixed-adapter inference does: `lorablend bench` scores a few examples
    under dozens of adapters, and full batches decode far faster than batches of three.
    A llama.cpp model (`load_for_eval(..., backend="llamacpp")`) answers the same prompts itself.
    """
    if getattr(model, "is_llamacpp", False):
        return model.generate_answers(tokenizer, examples, max_new_tokens=max_new_tokens, fmt=fmt, progress=progress,
                                      adapter_names=adapter_names)
    import torch

    eot = end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    prompts = [prompt_ids(tokenizer, e, fmt) for e in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
        mixed = {"adapter_names": [adapter_names[i] for i in idx]} if adapter_names is not None else {}
        with torch.inference_mode():
            out = model.generate(
                **mixed,
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=list({eot, tokenizer.eos_token_id} - {None}),
            )
        for row, i in enumerate(idx):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
        if progress is not None:
            progress(len(idx))
    return answers


def load_for_eval(model_id: str, adapters: dict[str, str | None], model=None, backend: str = "torch"):
    """One base model with every adapter loaded under its name (None = the base model alone).

    Switching adapters is then a `set_adapter` call, not a model reload. Pass `model` (a plain
    base model, e.g. from a PEFT model's `unload()`) to reuse one already in memory.
    `backend`: torch | llamacpp | auto (llama.cpp when installed and the model has a GGUF); a
    llama.cpp model takes the same calls (`answers_with`, `generate_answers`, `model=` reuse).
    """
    from lorablend.runtime.llamacpp import load_llamacpp, resolve_backend
    from lorablend.runtime.models import load_model, load_tokenizer

    if resolve_backend(backend, model_id) == "llamacpp":
        return load_llamacpp(model_id, adapters, model), load_tokenizer(model_id)
    from lorablend.adapter import WEIGHTS, map_weights

    named = {k: v for k, v in adapters.items() if v is not None}
    for path in named.values():  # PEFT's own error on a damaged file names neither the file nor the fix
        map_weights(Path(path) / WEIGHTS)[0].close()
    model = load_model(model_id) if model is None else model
    if named:
        from peft import PeftModel

        first, *rest = named.items()
        model = PeftModel.from_pretrained(model, first[1], adapter_name=first[0])
        for name, path in rest:
            model.load_adapter(path, adapter_name=name)
        model.eval()
    return model, load_tokenizer(model_id)


def answers_with(model, adapter: str | None, tokenizer, examples, **kwargs) -> list[str]:
    """Answers with one named adapter active, or with the base model when `adapter` is None."""
    import contextlib

    if adapter is None:
        ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    else:
        model.set_adapter(adapter)
        ctx = contextlib.nullcontext()
    with ctx:
        return generate_answers(model, tokenizer, examples, **kwargs)
