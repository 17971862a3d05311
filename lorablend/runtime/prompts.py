"""The one prompt format, shared by bank training, evaluation and the `ce` distance.

A prompt is the model's chat template with one user turn:
``instruction (first 96 tokens) + "\\n\\n" + input``. When the rendered prompt is
longer than `max_prompt_tokens`, its middle is cut: the head keeps the
instruction, the tail keeps the end of the input (where NI tasks put the
question) and the assistant header. Targets are cut to `max_target_tokens` and
end with the end-of-turn token. Training and evaluation call the same functions,
so the rule cannot drift between them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lorablend.dataset import Example


@dataclass(frozen=True)
class PromptFormat:
    max_instruction_tokens: int = 96
    max_prompt_tokens: int = 256
    max_target_tokens: int = 96

    def to_dict(self) -> dict:
        return asdict(self)


def _user_text(tokenizer, example: Example, fmt: PromptFormat) -> str:
    instruction = example.instruction.strip()
    if instruction:
        ids = tokenizer(instruction, add_special_tokens=False)["input_ids"]
        if len(ids) > fmt.max_instruction_tokens:
            instruction = tokenizer.decode(ids[: fmt.max_instruction_tokens]).rstrip() + " …"
        return f"{instruction}\n\n{example.input}"
    return example.input


def prompt_ids(tokenizer, example: Example, fmt: PromptFormat = PromptFormat()) -> list[int]:
    messages = [{"role": "user", "content": _user_text(tokenizer, example, fmt)}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = f"{messages[0]['content']}\nAnswer: "
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) > fmt.max_prompt_tokens:
        head = fmt.max_prompt_tokens // 2
        ids = ids[:head] + ids[len(ids) - (fmt.max_prompt_tokens - head) :]
    return ids


def end_of_turn_id(tokenizer) -> int:
    """The token a chat model emits after its answer (`<|im_end|>` for ChatML models)."""
    for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            return tid
    return tokenizer.eos_token_id


def target_ids(tokenizer, text: str, fmt: PromptFormat = PromptFormat()) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: fmt.max_target_tokens]
    return ids + [end_of_turn_id(tokenizer)]


def training_pair(tokenizer, example: Example, fmt: PromptFormat = PromptFormat()) -> tuple[list[int], list[int]]:
    """(input ids, labels): the loss falls on the target tokens only (-100 elsewhere)."""
    p = prompt_ids(tokenizer, example, fmt)
    t = target_ids(tokenizer, example.target, fmt)
    return p + t, [-100] * len(p) + t


def prompt_len(labels: list[int]) -> int:
    """Tokens before the first target token of a `training_pair`'s labels."""
    return next((i for i, t in enumerate(labels) if t != -100), len(labels))


def common_prefix(a: list[int], b: list[int]) -> int:
    """The length of the common prefix of two token lists (prompts share their chat header and instruction)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def pad_pairs(pairs: list[tuple[list[int], list[int]]], pad: int):
    """`training_pair`s right-padded into tensors (input ids, labels with -100 on padding, attention mask)."""
    import torch

    width = max(len(ids) for ids, _ in pairs)
    ids = torch.tensor([p + [pad] * (width - len(p)) for p, _ in pairs])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in pairs])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p, _ in pairs])
    return ids, labels, mask
