"""`lorablend demo`: the whole job on the embedded default, offline, in a few minutes.

One bank task plays the user's new dataset (leave-one-out): an adapter is
generated from the other entries, then the base model, the generated adapter
and the task's own trained adapter answer the same test examples. The default
task is fixed (chosen before any result was seen), not picked for its score.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from .bank import Bank
from .dataset import load_dataset
from .evaluate import Scores, answers_with, load_for_eval, max_new_tokens_for
from .generate import Setting, generate

DEFAULT_TASK = "subtask037_qasc_generate_related_fact"
# The best setting of the bench at its cost (docs/RESULTS-labelled.md): the 16 bank adapters whose answers' tokens
# are nearest (JS) to the dataset's, reranked by the model's loss on 16 train examples, the lowest kept.
DEFAULT_SETTING = Setting(sketch="target-tokens", metric="js", operator="normalized", combine="svd", top_k=1, rerank=16)


@dataclass
class DemoRow:
    model: str
    scores: Scores
    seconds: float
    backend: str


def run_demo(task: str = DEFAULT_TASK, bank: str = "default", out: Path | None = None, n: int = 30,
             setting: Setting = DEFAULT_SETTING, backend: str = "auto", status=None) -> tuple[list[DemoRow], Path, dict[str, float]]:
    say = status or (lambda msg: None)
    b = Bank.open(bank)
    entry = b.entry(task)
    dataset = load_dataset(b.dataset_path(entry), name=task)
    test = dataset.split("test")[:n]
    out = out or Path("lorablend-demo") / task
    if setting.rerank:  # the fixed setting fits a bank smaller than the default one (generate refuses more)
        setting = replace(setting, rerank=max(1, min(setting.rerank, len(b.entries) - 1)))
    say(f"generating an adapter for {task} from the other {len(b.entries) - 1} entries")
    result = generate(b, dataset, out, setting, force=True)
    say("loading the base model and the adapters")
    model, tokenizer = load_for_eval(b.manifest.base_model, {"generated": str(out), "own": str(b.adapter_path(entry))},
                                     backend=backend)
    used = "llama.cpp" if getattr(model, "is_llamacpp", False) else "PyTorch"
    budget = max_new_tokens_for(tokenizer, [e.target for e in dataset.split("train")])
    rows = []
    for label, adapter in (("base model", None), ("generated adapter", "generated"), ("task's own LoRA", "own")):
        say(f"answering {len(test)} test examples with the {label}")
        t0 = time.perf_counter()
        answers = answers_with(model, adapter, tokenizer, test, max_new_tokens=budget)
        rows.append(DemoRow(label, Scores.of(answers, test), time.perf_counter() - t0, used))
    return rows, result.out, result.provenance.coefficients
