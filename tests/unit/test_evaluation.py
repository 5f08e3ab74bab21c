"""core.answers (normalisation, metrics) and core.evaluation (bootstrap, batched greedy generation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.answers import contains_match, exact_match, f1_score, first_line_answer, normalize_answer
from core.evaluation import (
    ConfidenceInterval,
    GenerationEval,
    bootstrap_ci,
    evaluate_generation,
    generate_greedy,
    score_predictions,
)

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------------------ normalisation


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  Paris.  ", "paris"),
        ("an apple and a pear", "apple and pear"),
        ("Washington, D.C.", "washington d c"),
        ("Bogotá", "bogota"),
        ("São   Tomé", "sao tome"),
        ("-5", "-5"),
        ("x = -5", "x -5"),
        ("3.5", "3.5"),
        ("1,000", "1000"),  # a thousands separator joins digits
        ("12,345,678", "12345678"),
        ("1,2", "1 2"),  # not a thousands separator
        ("end.", "end"),
        ("well-known", "well known"),  # punctuation separates words, it does not glue them
        ("10-5=5", "10 5 5"),
        ("St.John's", "st john s"),
    ],
)
def test_normalize_answer_squad_style(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected", [("A", "a"), ("(A)", "a"), ("The", "the"), (" a  AN ", "a an"), (".", "."), ("?!", "?!")]
)
def test_normalize_never_empties_a_non_empty_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_normalize_empty_stays_empty(text: str) -> None:
    assert normalize_answer(text) == ""


def test_multiple_choice_letters_are_not_confused() -> None:
    # the lone letter "A" is an article: plain SQuAD normalisation maps it to "", the same as an
    # empty prediction; here letters stay distinct and "" never matches anything
    assert exact_match("A", ["B"]) == 0.0
    assert exact_match("A", ["A"]) == 1.0
    assert exact_match("(A)", ["A"]) == 1.0
    assert exact_match("", ["A"]) == 0.0
    assert exact_match("A", [""]) == 0.0
    assert exact_match("", [""]) == 0.0
    assert f1_score("", [""]) == 0.0
    assert contains_match("", [""]) == 0.0
    assert contains_match("The answer is B", ["A"]) == 0.0


def test_exact_match_max_over_golds() -> None:
    assert exact_match("the Paris", ["London", "Paris"]) == 1.0
    assert exact_match("Paris France", ["Paris"]) == 0.0
    assert exact_match("-5", ["5"]) == 0.0
    assert exact_match("35", ["3.5"]) == 0.0
    assert exact_match("Bogota", ["Bogotá"]) == 1.0
    assert exact_match("anything", []) == 0.0


def test_f1_token_overlap() -> None:
    assert f1_score("Paris", ["Paris"]) == 1.0
    # pred {new, york, city} vs gold {new, york}: p=2/3, r=1 -> 0.8
    assert f1_score("New York City", ["new york"]) == pytest.approx(0.8)
    assert f1_score("New York City", ["Boston", "new york"]) == pytest.approx(0.8)
    assert f1_score("Berlin", ["Paris"]) == 0.0
    # duplicates count once per matching occurrence
    assert f1_score("paris paris", ["paris"]) == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_contains_match_whole_words() -> None:
    assert contains_match("The capital of France is Paris.", ["Paris"]) == 1.0
    assert contains_match("It is New York City", ["new york"]) == 1.0
    assert contains_match("14", ["4"]) == 0.0
    assert contains_match("Parisian food", ["Paris"]) == 0.0
    assert contains_match("the answer is -4", ["4"]) == 0.0
    assert contains_match("the answer is 4.", ["4"]) == 1.0


@pytest.mark.parametrize(
    "generation, expected",
    [
        ("Paris", "Paris"),
        ("  Paris.\nIt is in France.", "Paris."),
        ("\n\nAnswer: 42\nbecause", "42"),
        ("Final answer: **Lima**", "Lima"),
        ("`7`", "7"),
        ("", ""),
        ("Paris<|im_end|>junk", "Paris"),
    ],
)
def test_first_line_answer(generation: str, expected: str) -> None:
    assert first_line_answer(generation, stop_strings=["<|im_end|>"]) == expected


# ------------------------------------------------------------------------------ bootstrap


def test_bootstrap_ci_is_seeded_and_brackets_the_mean() -> None:
    rng = np.random.default_rng(0)
    values = (rng.random(200) < 0.4).astype(float).tolist()
    a = bootstrap_ci(values, seed=3)
    b = bootstrap_ci(values, seed=3)
    c = bootstrap_ci(values, seed=4)
    assert a == b
    assert a != c
    assert a.low <= a.mean <= a.high
    assert a.mean == pytest.approx(float(np.mean(values)))
    # binomial standard error ~ sqrt(.4*.6/200) = 0.035, 95 % half-width ~ 0.068
    assert 0.10 < a.high - a.low < 0.18
    assert a.n == 200


def test_bootstrap_ci_degenerate_and_alpha() -> None:
    ones = bootstrap_ci([1.0] * 50)
    assert (ones.mean, ones.low, ones.high) == (1.0, 1.0, 1.0)
    values = np.random.default_rng(1).normal(size=300).tolist()
    wide = bootstrap_ci(values, alpha=0.01)
    narrow = bootstrap_ci(values, alpha=0.2)
    assert wide.low < narrow.low <= narrow.high < wide.high
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError):
        bootstrap_ci([1.0], alpha=1.5)


def test_score_predictions_aggregates() -> None:
    result = score_predictions(["Paris", "The answer is 4", ""], [["Paris"], ["4"], ["x"]], seed=0)
    assert result.em == [1.0, 0.0, 0.0]
    assert result.contains == [1.0, 1.0, 0.0]
    assert result.exact_match.mean == pytest.approx(1 / 3)
    assert result.contains_match.mean == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        score_predictions(["a"], [["a"], ["b"]])


# ------------------------------------------------------------------------------ models


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, tokenizer


PROMPTS = [
    "What is the capital of France?",
    "2 + 2 =",
    "Name a colour.",
    "A much longer prompt so that the batch really needs left padding to line up the ends.",
]


def _rendered(tokenizer) -> list[str]:
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]


def test_generate_greedy_batched_equals_unbatched(tiny) -> None:
    model, tokenizer = tiny
    prompts = _rendered(tokenizer)
    single = generate_greedy(model, tokenizer, prompts, max_new_tokens=8, batch_size=1)
    batched = generate_greedy(model, tokenizer, prompts, max_new_tokens=8, batch_size=4)
    again = generate_greedy(model, tokenizer, prompts, max_new_tokens=8, batch_size=4)
    assert batched == single
    assert again == batched
    assert all(isinstance(g, str) for g in batched)


def test_generate_greedy_accepts_token_ids(tiny) -> None:
    model, tokenizer = tiny
    prompts = _rendered(tokenizer)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert generate_greedy(model, tokenizer, ids, max_new_tokens=6, batch_size=3) == generate_greedy(
        model, tokenizer, prompts, max_new_tokens=6, batch_size=2
    )


def test_generate_greedy_matches_manual_argmax_loop(tiny) -> None:
    model, tokenizer = tiny
    prompt = _rendered(tokenizer)[0]
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    eos = tokenizer.eos_token_id
    out: list[int] = []
    with torch.no_grad():
        for _ in range(5):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    expected = tokenizer.decode(out, skip_special_tokens=True)
    assert (
        generate_greedy(model, tokenizer, [prompt, _rendered(tokenizer)[3]], max_new_tokens=5, batch_size=2)[0]
        == expected
    )


def test_evaluate_generation_with_render_callable(tiny) -> None:
    model, tokenizer = tiny
    rows = [{"q": p} for p in PROMPTS]
    seen: list[str] = []

    def render(row):
        seen.append(row["q"])
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": row["q"]}], tokenize=False, add_generation_prompt=True
        )

    generations = generate_greedy(model, tokenizer, _rendered(tokenizer), max_new_tokens=6)
    # golds = what the model itself says, so every item must score 1
    golds = [[first_line_answer(g)] if first_line_answer(g) else ["<none>"] for g in generations]
    result = evaluate_generation(model, tokenizer, rows, golds, render=render, max_new_tokens=6, batch_size=2)
    assert seen == PROMPTS
    assert isinstance(result, GenerationEval)
    assert result.generations == generations
    expected_em = [1.0 if first_line_answer(g) and normalize_answer(first_line_answer(g)) else 0.0 for g in generations]
    assert result.em == expected_em
    assert result.n == len(PROMPTS)
    assert set(result.to_dict()) >= {"exact_match", "f1", "contains", "items"}
    with pytest.raises(ValueError):
        evaluate_generation(model, tokenizer, PROMPTS, [["a"]])


def test_confidence_interval_to_dict() -> None:
    ci = ConfidenceInterval(mean=0.5, low=0.4, high=0.6, n=10)
    assert ci.to_dict() == {"mean": 0.5, "low": 0.4, "high": 0.6, "n": 10, "alpha": 0.05}


def test_choice_letter_answers_are_extracted_so_option_a_can_score() -> None:
    from core.answers import answer_extractor, choice_letter_answer, first_line_answer
    from core.evaluation import score_predictions

    cases = {
        "A) Kingston Amalie": "A",
        "D) Plymouth": "D",
        "(B) Accra": "B",
        "B. Accra": "B",
        "Answer: C": "C",
        "**C**": "C",
        "A\nbecause it is": "A",
        "A city in Ghana": "A city in Ghana",  # the article, not an option
        "The answer is B": "The answer is B",
    }
    for generation, expected in cases.items():
        assert choice_letter_answer(generation) == expected, generation
    assert answer_extractor([["A"], ["D"]]) is choice_letter_answer
    assert answer_extractor([["A"], ["Accra"]]) is first_line_answer
    assert answer_extractor([]) is first_line_answer
    # without the extraction "A) Kingston" normalises to "kingston" and gold "A" never scores
    golds = [["A"], ["D"]]
    plain = score_predictions([first_line_answer(g) for g in ("A) Kingston", "D) Plymouth")], golds)
    letters = score_predictions([choice_letter_answer(g) for g in ("A) Kingston", "D) Plymouth")], golds)
    assert plain.contains == [0.0, 1.0] and letters.em == [1.0, 1.0]
