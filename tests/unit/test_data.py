"""JSONL parsing (every bad line with its number), prompt rendering, truncation and splits."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from core.data import (
    MAX_REPORTED_ERRORS,
    parse_jsonl,
    render_prompt,
    render_prompts,
    split_rows,
    subsample_rows,
    tokenize_rows,
)
from core.errors import DataError
from core.spec import CalibrationRow

pytestmark = pytest.mark.unit


def _lines(*objs) -> bytes:
    return "\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs).encode()


def test_parses_prompts_messages_answers_and_skips_blank_lines() -> None:
    data = (
        _lines({"prompt": "2+2?", "answers": ["4"]}, "", "   ", {"messages": [{"role": "user", "content": "hi"}]})
        + b"\n\n"
    )
    rows = parse_jsonl(data)
    assert [r.prompt for r in rows] == ["2+2?", None]
    assert rows[0].answers == ["4"] and rows[1].messages[0].content == "hi"


def test_bom_and_crlf_are_tolerated() -> None:
    rows = parse_jsonl(b"\xef\xbb\xbf" + b'{"prompt": "a"}\r\n{"prompt": "b"}\r\n')
    assert [r.prompt for r in rows] == ["a", "b"]


def test_every_bad_line_is_reported_with_its_number() -> None:
    data = b"\n".join(
        [
            b'{"prompt": "ok"}',
            b'{"prompt": ',  # 2 invalid JSON
            b"",  # blank, skipped
            b'["not", "an", "object"]',  # 4 not an object
            b'{"prompt": "x", "messages": []}',  # 5 both inputs
            b'{"prompt": "x", "extra": 1}',  # 6 unknown field
            b'{"prompt": "\xff\xfe"}',  # 7 invalid UTF-8
            b'{"prompt": "   "}',  # 8 empty prompt
            b'{"prompt": "q", "answers": ["", " "]}',  # 9 no non-empty answer
            b'{"messages": [{"role": "user"}]}',  # 10 message without content
            b"null",  # 11 null
        ]
    )
    with pytest.raises(DataError) as info:
        parse_jsonl(data)
    details = info.value.details
    assert [d["line"] for d in details] == [2, 4, 5, 6, 7, 8, 9, 10, 11]
    reasons = {d["line"]: d["reason"] for d in details}
    assert "invalid JSON" in reasons[2]
    assert "object" in reasons[4] and "list" in reasons[4]
    assert "exactly one" in reasons[5]
    assert "extra" in reasons[6]
    assert "UTF-8" in reasons[7]
    assert "empty" in reasons[8]
    assert "answers" in reasons[9]
    assert "content" in reasons[10]
    assert "null" in reasons[11]
    assert info.value.code == "invalid_dataset"
    assert "9 invalid rows" in info.value.message and "line 2" in info.value.message


def test_error_collection_is_capped() -> None:
    data = b"\n".join([b"{bad"] * (MAX_REPORTED_ERRORS + 5))
    with pytest.raises(DataError) as info:
        parse_jsonl(data)
    assert len(info.value.details) == MAX_REPORTED_ERRORS
    assert f"{MAX_REPORTED_ERRORS + 5} invalid rows" in info.value.message


@pytest.mark.parametrize("data", [b"", b"\n\n  \n"])
def test_empty_dataset_is_an_error(data: bytes) -> None:
    with pytest.raises(DataError, match="no rows"):
        parse_jsonl(data)


# ---------------------------------------------------------------------------------------------
# rendering and tokenization (SmolLM2's tokenizer, no model needed)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    return tok


def test_chat_template_with_generation_prompt(tokenizer) -> None:
    text = render_prompt(CalibrationRow(prompt="What is 2+2?"), tokenizer)
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    chat = render_prompt(
        CalibrationRow(messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]),
        tokenizer,
    )
    assert "<|im_start|>system\nBe terse.<|im_end|>" in chat and chat.endswith("<|im_start|>assistant\n")


def test_plain_text_without_template(plain_tokenizer) -> None:
    assert render_prompt(CalibrationRow(prompt="Hello there"), plain_tokenizer) == "Hello there"
    row = CalibrationRow(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert render_prompt(row, plain_tokenizer) == "a\nb"


def test_templated_tokens_are_not_doubled(tokenizer) -> None:
    ids = tokenize_rows([CalibrationRow(prompt="Hi")], tokenizer, 512)[0]
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == im_start and ids[1] != im_start
    assert tokenizer.decode(ids) == render_prompt(CalibrationRow(prompt="Hi"), tokenizer)


def test_truncation_keeps_the_end(tokenizer, plain_tokenizer) -> None:
    row = CalibrationRow(prompt="context " * 200 + "QUESTION: what is the answer?")
    full = tokenize_rows([row], tokenizer, 4096)[0]
    cut = tokenize_rows([row], tokenizer, 32)[0]
    assert len(full) > 32 and len(cut) == 32
    # SmolLM2's BOS is <|im_start|>, which opens the template: it is kept, the rest is the tail
    assert full[0] == tokenizer.bos_token_id
    assert cut == [full[0]] + full[-31:]
    assert tokenizer.decode(cut).endswith("what is the answer?<|im_end|>\n<|im_start|>assistant\n")
    assert render_prompts([row], tokenizer, 32) == [cut]
    short = tokenize_rows([CalibrationRow(prompt="hi")], tokenizer, 4096)[0]
    assert tokenize_rows([CalibrationRow(prompt="hi")], tokenizer, len(short)) == [short]


def test_truncation_keeps_a_leading_bos(tokenizer) -> None:
    from core.data import _truncate

    assert _truncate([1, 5, 6, 7, 8], 3, bos=1) == [1, 7, 8]
    assert _truncate([9, 5, 6, 7, 8], 3, bos=1) == [6, 7, 8]
    assert _truncate([1, 5], 3, bos=1) == [1, 5]


def test_split_rows_is_disjoint_seeded_and_ordered() -> None:
    rows = [CalibrationRow(prompt=f"p{i}") for i in range(20)]
    a = split_rows(rows, 0.25, seed=3)
    b = split_rows(rows, 0.25, seed=3)
    c = split_rows(rows, 0.25, seed=4)
    assert len(a.evaluation) == 5 and len(a.calibration) == 15
    assert {r.prompt for r in a.evaluation}.isdisjoint({r.prompt for r in a.calibration})
    assert {r.prompt for r in a.evaluation} | {r.prompt for r in a.calibration} == {r.prompt for r in rows}
    assert a == b and a.evaluation != c.evaluation
    prompts = [r.prompt for r in a.calibration]
    assert prompts == sorted(prompts, key=lambda p: int(p[1:]))
    with pytest.raises(DataError):
        split_rows(rows[:1], 0.5, seed=0)


def test_subsample_rows_is_deterministic() -> None:
    rows = [CalibrationRow(prompt=f"p{i}") for i in range(50)]
    a = subsample_rows(rows, 10, seed=1)
    assert a == subsample_rows(rows, 10, seed=1) and len(a) == 10
    assert a != subsample_rows(rows, 10, seed=2)
    assert subsample_rows(rows, 100, seed=1) == rows
