"""runtime/evaluate.py: Rouge-L and exact match, the answer budget, and greedy answers in input order."""

import math

import pytest

from lorablend.dataset import Example
from lorablend.runtime.evaluate import (Scores, exact_match, generate_answers, max_new_tokens_for, normalize_answer,
                                        rouge)
from lorablend.runtime.models import load_tokenizer


def test_rouge_of_identical_text_is_one_and_of_disjoint_text_zero():
    assert rouge("the cat sat on the mat", ["the cat sat on the mat"]) == (1.0, 1.0)
    assert rouge("the cat sat", ["blue green red"]) == (0.0, 0.0)
    assert rouge("Paris", ["London", "paris"]) == (1.0, 1.0)  # the best reference counts, case aside
    partial, _ = rouge("the cat sat on a mat", ["the cat sat on the mat"])
    assert partial == pytest.approx(5 / 6)  # LCS 5 of 6 tokens each way


def test_exact_match_ignores_case_punctuation_and_spacing():
    assert normalize_answer("  Hello,  World! ") == "hello world"
    assert exact_match("No.", ["no"]) == 1.0
    assert exact_match("The   answer is 42!", ["the answer is 42"]) == 1.0
    assert exact_match("yes", ["no", "YES"]) == 1.0
    assert exact_match("no", ["not", "know"]) == 0.0


def test_scores_average_over_the_examples():
    examples = [Example(input="q1", outputs=("yes",)), Example(input="q2", outputs=("blue sky",))]
    s = Scores.of(["Yes!", "red"], examples)
    assert (s.rouge_l, s.rouge_lsum, s.exact_match, s.n) == (0.5, 0.5, 0.5, 2)


def test_the_answer_budget_has_room_for_long_references_within_the_cap(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    assert max_new_tokens_for(tok, ["yes"] * 10) == 8  # never below 8
    long = "The quick brown fox jumps over the lazy dog. " * 3
    n = len(tok(long, add_special_tokens=False)["input_ids"])
    assert max_new_tokens_for(tok, [long]) == min(96, math.ceil(1.25 * n) + 2) > n
    assert max_new_tokens_for(tok, [long] * 3, cap=16) == 16
    assert max_new_tokens_for(tok, []) == 96


def test_generate_answers_are_each_prompts_greedy_continuation_in_input_order(tiny_model_dir, tiny_bank):
    """Prompts are run sorted by length and the answers put back in the caller's order (batch 1: no padding, so
    each answer is exactly the model's own greedy continuation of its prompt)."""
    import torch

    from lorablend.runtime.evaluate import load_for_eval
    from lorablend.runtime.prompts import end_of_turn_id, prompt_ids

    # the tiny random model alone answers every prompt alike; a bank adapter makes the answers differ
    model, tok = load_for_eval(str(tiny_model_dir), {"a": str(tiny_bank / "adapters" / "math")})
    examples = [Example(input=text, outputs=("x",)) for text in
                ("Explain why the sky is blue in simple words, please.", "Hi", "What is the capital of France?",
                 "The cat sat on the mat.", "Write a function that adds numbers.")]
    got = generate_answers(model, tok, examples, max_new_tokens=6, batch_size=1)
    eot = end_of_turn_id(tok)
    want = []
    for e in examples:
        p = prompt_ids(tok, e)
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=list({eot, tok.eos_token_id} - {None}))
        want.append(tok.decode(out[0, len(p):], skip_special_tokens=True).strip())
    assert got == want and len(set(got)) >= 3  # distinct answers: a wrong order would show
