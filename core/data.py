"""Calibration / eval data: JSONL parsing with per-line errors, prompt rendering, tokenization.

Rendering: rows become text with the tokenizer's chat template (`add_generation_prompt=True`)
when it has one — a `prompt` row is a single user message, a `messages` row is used as given.
Without a chat template the text is the prompt itself (or the message contents joined with
newlines).

Truncation keeps the END of a prompt: the question and the generation prompt sit at the end and
are what the model must act on, so the beginning (context, system text) is dropped first. A
leading BOS token is kept when the tokenizer adds one.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from core.errors import DataError
from core.spec import CalibrationRow

__all__ = [
    "MAX_REPORTED_ERRORS",
    "RowSplit",
    "encode_text",
    "parse_jsonl",
    "render_prompt",
    "render_prompts",
    "split_rows",
    "subsample_rows",
    "tokenize_rows",
]

#: parse_jsonl stops collecting after this many bad lines (the message says there were more)
MAX_REPORTED_ERRORS = 20


def _reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "__root__")
        msg = err.get("msg", "invalid")
        msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


#: deepest JSON nesting a row may have (a row is at most 3 deep: object, messages list, message);
#: deeper input is refused before json.loads, whose recursion would otherwise overflow
MAX_JSON_DEPTH = 32


def json_depth_exceeds(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text nests arrays/objects deeper than `limit` (brackets inside strings are
    not counted). Cheap for ordinary rows: the scan runs only when there are enough brackets."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def parse_jsonl(data: bytes) -> list[CalibrationRow]:
    """Parse and validate JSONL rows. Blank lines are skipped. Every bad line (up to
    MAX_REPORTED_ERRORS) is reported in `DataError.details` as `{"line": n (1-based), "reason"}`;
    an input without any row is an error too."""
    if isinstance(data, str):  # tolerate text for convenience
        data = data.encode("utf-8")
    rows: list[CalibrationRow] = []
    errors: list[dict[str, Any]] = []
    more = 0
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue

        def bad(reason: str) -> None:
            nonlocal more
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append({"line": number, "reason": reason})  # noqa: B023 - called in this iteration
            else:
                more += 1

        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad(f"invalid UTF-8 at byte {exc.start}")
            continue
        if number == 1:
            text = text.removeprefix("\ufeff")
        if json_depth_exceeds(text):
            bad(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            bad(f"invalid JSON: {exc.msg} (column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            bad(f"expected a JSON object, got {type(obj).__name__ if obj is not None else 'null'}")
            continue
        try:
            rows.append(CalibrationRow.model_validate(obj))
        except ValidationError as exc:
            bad(_reason(exc))
    if errors:
        n = len(errors) + more
        suffix = f" (first {len(errors)} listed)" if more else ""
        first = errors[0]
        raise DataError(
            f"{n} invalid row{'s' if n != 1 else ''}{suffix}; line {first['line']}: {first['reason']}", details=errors
        )
    if not rows:
        raise DataError("the dataset has no rows", details=[])
    return rows


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(row: CalibrationRow, tokenizer: Any) -> str:
    """The text the model sees for a row (see module docstring)."""
    if row.messages is not None:
        messages = [{"role": m.role, "content": m.content} for m in row.messages]
    else:
        messages = [{"role": "user", "content": row.prompt or ""}]
    if _has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text)
    if row.prompt is not None:
        return row.prompt
    return "\n".join(m["content"] for m in messages)


def encode_text(text: str, tokenizer: Any, *, templated: bool) -> list[int]:
    """Token ids of a rendered text. A chat template already contains the special tokens, so
    they are not added again; plain text gets the tokenizer's own (e.g. BOS)."""
    ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
    return [int(i) for i in ids]


def _truncate(ids: list[int], max_tokens: int, bos: int | None) -> list[int]:
    if len(ids) <= max_tokens:
        return ids
    if bos is not None and ids and ids[0] == bos and max_tokens > 1:
        return [bos] + ids[len(ids) - (max_tokens - 1) :]
    return ids[len(ids) - max_tokens :]


def tokenize_rows(rows: Sequence[CalibrationRow], tokenizer: Any, max_tokens: int) -> list[list[int]]:
    """Rendered and tokenized prompts, each at most `max_tokens` long (the end is kept)."""
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    templated = _has_chat_template(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    out = []
    for row in rows:
        ids = encode_text(render_prompt(row, tokenizer), tokenizer, templated=templated)
        if not ids:
            raise DataError("a row renders to no tokens", details=[])
        out.append(_truncate(ids, max_tokens, bos))
    return out


#: the name in docs/ARCHITECTURE.md
render_prompts = tokenize_rows


@dataclass(frozen=True)
class RowSplit:
    calibration: list[CalibrationRow]
    evaluation: list[CalibrationRow]


def split_rows(rows: Sequence[CalibrationRow], eval_fraction: float, seed: int) -> RowSplit:
    """Disjoint, seeded split: round(n * eval_fraction) rows (at least 1) go to evaluation, the
    rest (at least 1) to calibration; both keep the input order."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError("eval_fraction must be in (0, 1)")
    n = len(rows)
    n_eval = max(1, int(round(n * eval_fraction)))
    if n_eval >= n:
        raise DataError(f"eval_fraction {eval_fraction} leaves no calibration rows out of {n}", details=[])
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return RowSplit(
        calibration=[r for i, r in enumerate(rows) if i not in held],
        evaluation=[r for i, r in enumerate(rows) if i in held],
    )


def subsample_rows(rows: Sequence[CalibrationRow], max_rows: int, seed: int) -> list[CalibrationRow]:
    """At most `max_rows` rows, chosen uniformly with `seed` and kept in input order."""
    rows = list(rows)
    if len(rows) <= max_rows:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), max_rows))
    return [rows[i] for i in keep]
