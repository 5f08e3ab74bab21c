"""Answer scoring: normalisation, exact match, token F1, `contains`, and the extraction of an
answer from a generation (first line, or a choice letter).

Scoring follows the SQuAD / TriviaQA conventions with three deliberate deviations, each tested:

* a non-empty answer never normalises to the empty string (the lone letter "A" is an article;
  dropping it would make "A" equal to "" and, in code that treats empty-vs-empty as a match,
  score empty predictions as correct on multiple choice). When normalisation would empty a
  non-empty text, the text before the emptying step is kept instead (see `normalize_answer`);
* accents are folded (NFKD, combining marks dropped) so "Bogota" matches "Bogotá";
* signs and decimal points of numbers survive punctuation removal ("-5" is not "5", "3.5" is not
  "35"), which matters for arithmetic and code-evaluation tasks; other punctuation becomes a
  space, so it separates words instead of gluing them ("10-5=5" is "10 5 5", not "1055").

An empty prediction, or an empty gold, never matches anything.

Pure functions of strings; nothing here reads the environment or prints.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence

__all__ = [
    "answer_extractor",
    "choice_letter_answer",
    "contains_match",
    "exact_match",
    "f1_score",
    "first_line_answer",
    "is_choice_letter",
    "normalize_answer",
]

# --------------------------------------------------------------------------------------------
# Normalisation and string metrics
# --------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
# "-" directly before a digit and not glued to a preceding word char is a sign: keep it.
_SIGN = re.compile(r"(?<![\w])-(?=\d)")
# "." between two digits is a decimal point: keep it.
_DECIMAL = re.compile(r"(?<=\d)\.(?=\d)")
# "," between digits with exactly three after it is a thousands separator: drop it ("1,000" is 1000).
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_PUNCT = set(string.punctuation) | {"“", "”", "‘", "’", "«", "»", "–", "—", "…", "¿", "¡"}
_SIGN_MARK = "\x00"
_DECIMAL_MARK = "\x01"


def _fold_accents(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def _collapse(text: str) -> str:
    return " ".join(text.split())


def normalize_answer(s: str) -> str:
    """Lower-case, fold accents, replace punctuation by spaces (keeping number signs and decimal
    points), drop the articles a/an/the, collapse whitespace.

    A text that is non-empty after stripping never normalises to "": when dropping articles would
    empty it ("A", "(a)", "The") the text before that step is returned ("a"); when punctuation
    removal already empties it (".") the lower-cased, accent-folded, whitespace-collapsed text is.
    """
    if s is None:
        return ""
    base = _collapse(_fold_accents(str(s)).lower())
    if not base:
        return ""
    text = _THOUSANDS.sub("", base)
    text = _SIGN.sub(_SIGN_MARK, text)
    text = _DECIMAL.sub(_DECIMAL_MARK, text)
    # a space, not nothing: "10-5=5" is "10 5 5", not "1055"; "St.John's" is "st john s"
    text = "".join(" " if ch in _PUNCT else ch for ch in text)
    text = _collapse(text.replace(_SIGN_MARK, "-").replace(_DECIMAL_MARK, "."))
    without_articles = _collapse(_ARTICLES.sub(" ", text))
    return without_articles or text or base


def _golds(golds: Sequence[str] | str) -> list[str]:
    if isinstance(golds, str):
        golds = [golds]
    return [n for n in (normalize_answer(g) for g in golds) if n]


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised, non-empty gold, else 0.0."""
    pred = normalize_answer(prediction)
    if not pred:
        return 0.0
    return float(any(pred == g for g in _golds(golds)))


def _token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    """Token-level F1 of the normalised texts, the maximum over the golds (0.0 when empty)."""
    pred_tokens = normalize_answer(prediction).split()
    if not pred_tokens:
        return 0.0
    return max((_token_f1(pred_tokens, g.split()) for g in _golds(golds)), default=0.0)


def contains_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when some normalised gold occurs in the normalised prediction as whole words
    (a contiguous run of its tokens), else 0.0. "Paris" is in "the capital is paris", "4" is not
    in "14"."""
    pred_tokens = normalize_answer(prediction).split()
    if not pred_tokens:
        return 0.0
    for gold in _golds(golds):
        g = gold.split()
        for start in range(len(pred_tokens) - len(g) + 1):
            if pred_tokens[start : start + len(g)] == g:
                return 1.0
    return 0.0


_ANSWER_LABEL = re.compile(r"^\s*(?:final\s+)?answer\s*[:：]\s*", re.IGNORECASE)


def first_line_answer(generation: str, stop_strings: Sequence[str] = ()) -> str:
    """The answer-extraction policy used by `evaluate_generation`.

    1. cut at the first of `stop_strings` (e.g. a textual end-of-turn marker) if present;
    2. take the first line that is not blank (the model is asked for a short answer, anything
       after the first line break is explanation);
    3. drop a leading "Answer:" / "Final answer:" label and surrounding markdown emphasis
       (`**`, `__`, backticks) and whitespace.

    Punctuation, articles and case are left to `normalize_answer`.
    """
    text = generation or ""
    for stop in stop_strings:
        if stop and stop in text:
            text = text[: text.index(stop)]
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    line = _ANSWER_LABEL.sub("", line.strip())
    return line.strip().strip("*_`").strip()


# an option letter opening the answer: "B", "B)", "(B) Accra", "B. Accra", "Answer: B" — not the
# article of "A city ..." (a letter followed by a space and a lower-case word)
_CHOICE = re.compile(r"^[\s(\[*_`]*([A-Z])(?:[)\].:,]|\s*$|\s+(?=[A-Z0-9(]))")


def is_choice_letter(gold: str) -> bool:
    """A multiple-choice gold: one capital letter."""
    letter = gold.strip()
    return len(letter) == 1 and letter.isalpha() and letter.isupper()


def choice_letter_answer(generation: str, stop_strings: Sequence[str] = ()) -> str:
    """Multiple choice: the option letter the answer opens with ("D) Plymouth" → "D"), else the
    `first_line_answer`. Without this, "A) Kingston" would normalise to "kingston" (the article
    rule drops "a") and an answer "A" could never be credited."""
    line = first_line_answer(generation, stop_strings)
    match = _CHOICE.match(line)
    return match.group(1) if match else line


def answer_extractor(golds: Sequence[Sequence[str]]) -> Callable[[str], str]:
    """`choice_letter_answer` when every row's golds are option letters, else `first_line_answer`."""
    if golds and all(g and all(is_choice_letter(x) for x in g) for g in golds):
        return choice_letter_answer
    return first_line_answer
