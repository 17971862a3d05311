"""runtime/prompts.py: the one prompt format (training, evaluation, scoring) on the tiny ChatML tokenizer."""

from lorablend.dataset import Example
from lorablend.runtime.models import load_tokenizer
from lorablend.runtime.prompts import (PromptFormat, common_prefix, end_of_turn_id, pad_pairs, prompt_ids,
                                       training_pair)

QUESTION = Example(input="What is two plus two?", outputs=("four",), instruction="Answer briefly.")


def test_the_prompt_ends_inside_the_assistant_turn_and_the_target_with_the_end_of_turn(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    ids = prompt_ids(tok, QUESTION)
    assert tok.decode(ids) == ("<|im_start|>user\nAnswer briefly.\n\nWhat is two plus two?<|im_end|>\n"
                               "<|im_start|>assistant\n")
    pair, labels = training_pair(tok, QUESTION)
    assert pair[:len(ids)] == ids and labels[:len(ids)] == [-100] * len(ids)  # no loss on the prompt
    target = pair[len(ids):]
    assert labels[len(ids):] == target and target[-1] == end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(target[:-1]) == "four"


def test_a_long_prompt_loses_its_middle_and_keeps_the_instruction_and_the_assistant_header(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    long = Example(input=" ".join(["The quick brown fox jumps over the lazy dog."] * 40), outputs=("x",),
                   instruction="Answer briefly.")
    full = prompt_ids(tok, long, PromptFormat(max_prompt_tokens=10_000))
    cut = prompt_ids(tok, long, PromptFormat(max_prompt_tokens=40))
    assert len(full) > 256 and len(cut) == 40
    assert cut == full[:20] + full[-20:]
    assert tok.decode(cut).startswith("<|im_start|>user\nAnswer briefly.") and tok.decode(cut).endswith("assistant\n")
    assert len(prompt_ids(tok, long)) == PromptFormat().max_prompt_tokens


def test_common_prefix_of_two_prompts_is_their_shared_header(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    a = prompt_ids(tok, QUESTION)
    b = prompt_ids(tok, Example(input="Is it raining in the city today?", outputs=("yes",), instruction="Answer briefly."))
    n = common_prefix(a, b)
    assert 0 < n < min(len(a), len(b)) and a[:n] == b[:n] and a[n] != b[n]
    assert tok.decode(a[:n]).startswith("<|im_start|>user\nAnswer briefly.")
    assert common_prefix(a, a) == len(a) and common_prefix(a, a[:5]) == 5 and common_prefix([], a) == 0


def test_pad_pairs_masks_the_padding_and_keeps_it_out_of_the_loss(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    pairs = [training_pair(tok, QUESTION), training_pair(tok, Example(input="Hi", outputs=("Hello, world!",)))]
    ids, labels, mask = pad_pairs(pairs, tok.pad_token_id)
    width = max(len(p) for p, _ in pairs)
    assert ids.shape == labels.shape == mask.shape == (2, width)
    for row, (p, lab) in enumerate(pairs):
        assert mask[row].sum() == len(p) and ids[row, :len(p)].tolist() == p and labels[row, :len(p)].tolist() == lab
        assert set(ids[row, len(p):].tolist()) <= {tok.pad_token_id} and set(labels[row, len(p):].tolist()) <= {-100}
