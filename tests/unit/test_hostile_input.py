"""Hostile input is refused with a clear error, never a 500: JSON nested past the parser's depth,
oversized numbers in Range headers, cursors that are not ours; and server paths are cut from
client-facing messages."""

from __future__ import annotations

import base64

import pytest

from common.artifacts import parse_range
from common.errors import InvalidRequest
from common.pagination import decode_cursor
from common.redact import redact_paths, redact_text
from core.data import MAX_JSON_DEPTH, json_depth_exceeds, parse_jsonl
from core.errors import DataError
from core.spec import BitBudget

pytestmark = pytest.mark.unit


def test_json_depth_counts_brackets_outside_strings_only():
    assert not json_depth_exceeds('{"prompt": "' + "[" * 500 + '"}')
    assert not json_depth_exceeds("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    assert json_depth_exceeds("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))
    assert not json_depth_exceeds('{"a": "\\\\"}' + "[]" * 100)  # an escaped backslash ends the string


def test_deeply_nested_rows_are_refused_by_line():
    rows = b'{"prompt": "ok"}\n' + b"[" * 5000 + b"]" * 5000 + b"\n"
    with pytest.raises(DataError) as caught:
        parse_jsonl(rows)
    assert caught.value.details == [{"line": 2, "reason": f"JSON nested deeper than {MAX_JSON_DEPTH} levels"}]


def test_range_numbers_past_64_bits_are_malformed_and_ignored():
    assert parse_range("bytes=" + "9" * 5000 + "-", 100) is None
    assert parse_range("bytes=-" + "9" * 20, 100) is None
    assert parse_range("bytes=10-19", 100) == (10, 19)


@pytest.mark.parametrize(
    "cursor",
    [
        "W" * 5000,
        base64.urlsafe_b64encode(b"[" * 100000 + b"]" * 100000).decode()[:200],
        base64.urlsafe_b64encode(b'[[[[["x"]]]], 1]').decode(),
        "!!!",
    ],
)
def test_foreign_cursors_are_400(cursor):
    with pytest.raises(InvalidRequest, match="invalid cursor"):
        decode_cursor(cursor)


def test_budget_lists_are_bounded_and_distinct_at_a_hundredth_of_a_bit():
    BitBudget(avg_bits=[4.25, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 12.0])
    with pytest.raises(ValueError, match="at most 8 budgets"):
        BitBudget(avg_bits=[4.5 + i for i in range(9)])
    with pytest.raises(ValueError, match="closer than 0.01 bit"):
        BitBudget(avg_bits=[8.0000001, 8.0000002])
    with pytest.raises(ValueError, match="closer than 0.01 bit"):
        BitBudget(avg_bits=[5.0, 5.004])


def test_server_paths_are_cut_to_their_last_component():
    message = "file /srv/taq/models/tiny/model.safetensors is truncated; tried: /srv/taq/models/x/ (no model directory)"
    assert redact_text(message) == "file …/model.safetensors is truncated; tried: …/x/ (no model directory)"
    assert (
        redact_text("see GET /v1/models or http://127.0.0.1:8000/v1/jobs/x")
        == "see GET /v1/models or http://127.0.0.1:8000/v1/jobs/x"
    )
    assert redact_paths({"/a/b/c.gguf": ["/d/e/f.json", 3]}) == {"…/c.gguf": ["…/f.json", 3]}
