"""`lorablend demo`: `generate` on a few bank tasks, each treated as a user's new task, both ways.

Each task's whole family is left out of the bank, as for a task of a kind the bank does not hold.
Two adapters are made as `lorablend generate` makes them: the gradient-free path (`--budget 0`: the
default setting, then validation on the task's valid split) and the default budget's (the blend where
it pays, then tuned training steps, validated the same way). The base model, both adapters and the
task's own trained LoRA answer the same test examples. Both paths validate on the same held-out examples, so the
second reuses the first's answers for the candidates both try (no adapter, the nearest, the uniform average);
each path's seconds still count them, as a user running that path alone would spend them. The tasks are the
cheapest of the first task of each family (`demo_tasks`): a rule on cost, so that the demo stays short.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorablend.bank.manifest import Bank
from lorablend.budget import DEFAULT_BUDGET
from lorablend.dataset import load_dataset
from lorablend.generate import generate
from lorablend.runtime.evaluate import Scores, answers_with, load_for_eval, max_new_tokens_for
from lorablend.runtime.scoring import CE_EXAMPLES
from lorablend.settings import DEFAULT_SETTING, Setting
from lorablend.validate import Verdict

DEMO_TASKS = 2  # tasks in the demo, so that it stays within a few minutes on 2 cores (its timing: docs/GUIDE.md)


def demo_tasks(bank: Bank, k: int = DEMO_TASKS) -> list[str]:
    """The k cheapest of the first task by name of each family: fewest tokens in the train examples the model-aware
    steps run on (prompt and answer, as trained), ties by name. Cost picks them, not results."""
    from lorablend.runtime.models import load_tokenizer
    from lorablend.runtime.prompts import training_pair

    tok = load_tokenizer(bank.manifest.base_model)

    def tokens(task: str) -> float:
        train = load_dataset(bank.dataset_path(bank.entry(task)), name=task).split("train")[:CE_EXAMPLES]
        return sum(len(training_pair(tok, e)[0]) for e in train) / max(1, len(train))

    return sorted(bank.first_of_each_family(), key=lambda t: (tokens(t), t))[:k]


@dataclass
class Made:
    """One way of making the task's adapter: its scores, its verdict, its seconds and where it was written."""

    scores: Scores
    verdict: Verdict
    seconds: float  # the path on its own: generate's seconds plus the validation answers it reused
    adapter: Path


@dataclass
class DemoTask:
    task: str
    base: Scores
    own: Scores
    paths: dict[str, Made]  # "gradient-free" and "budget N"
    backend: str


def run_demo(tasks: list[str], bank: str = "default", out: Path | None = None, n: int = 30,
             setting: Setting = DEFAULT_SETTING, backend: str = "auto", status=None,
             budget: float = DEFAULT_BUDGET) -> list[DemoTask]:
    say = status or (lambda msg: None)
    b = Bank.open(bank)
    out = out or Path("lorablend-demo")
    model, rows = None, []
    ways = {"gradient-free": 0.0} | ({f"budget {budget:g}": budget} if budget else {})
    for task in tasks:
        entry = b.entry(task)
        dataset = load_dataset(b.dataset_path(entry), name=task)
        left = len([e for e in b.entries if e.family != entry.family or (entry.family is None and e.name != task)])
        made, answered = {}, {}
        for way, passes in ways.items():
            say(f"{task}: the {way} adapter, from the {left} entries outside its family, then validated")
            made[way] = generate(b, dataset, out / task / way.replace(" ", "-"), setting.capped(left),
                                 exclude_family=True, force=True, validate=True, backend=backend, budget=passes,
                                 answered=answered)
        say(f"{task}: answering test examples with the base model, the adapters and the task's own LoRA")
        model, tokenizer = load_for_eval(b.manifest.base_model, {way: str(r.out) for way, r in made.items()}
                                         | {"own": str(b.adapter_path(entry))}, model=_plain(model), backend=backend)
        test = dataset.split("test")[:n]
        tokens = max_new_tokens_for(tokenizer, [e.target for e in dataset.split("train")])
        scores = {name: Scores.of(answers_with(model, name, tokenizer, test, max_new_tokens=tokens), test)
                  for name in (None, "own", *made)}
        rows.append(DemoTask(task, scores[None], scores["own"],
                             {way: Made(scores[way], r.verdict, alone(r), r.out) for way, r in made.items()},
                             "llama.cpp" if getattr(model, "is_llamacpp", False) else "PyTorch"))
    return rows


def alone(result) -> float:
    """A path's seconds as if run alone: what it spent, plus the validation answers it took from the other path."""
    return result.seconds + result.verdict.reused_seconds


def _plain(model):
    """The base model to reuse for the next task's adapters (a PEFT model gives its base back)."""
    if model is None or getattr(model, "is_llamacpp", False):
        return model
    return model.unload()
