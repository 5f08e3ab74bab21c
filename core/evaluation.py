"""Task evaluation on whole models: answer normalisation, EM / F1 / contains metrics with
bootstrap confidence intervals (core/stats.py), and greedy batched generation. The teacher-forced
metrics (gold-answer NLL, KL and top-1 agreement at the answer positions) are streamed layer by
layer in core/streaming/evaluate.py.

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

Nothing here reads the environment or prints; device and batch sizes are parameters.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from core.stats import ConfidenceInterval, bootstrap_ci

__all__ = [
    "ConfidenceInterval",
    "EvalMetrics",
    "GenerationEval",
    "answer_extractor",
    "bootstrap_ci",
    "choice_letter_answer",
    "contains_match",
    "evaluate_generation",
    "exact_match",
    "f1_score",
    "first_line_answer",
    "generate_greedy",
    "normalize_answer",
    "score_predictions",
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


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------

Prompt = str | Sequence[int]


def _encode(tokenizer: Any, prompt: Prompt, add_special_tokens: bool) -> list[int]:
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
    return [int(t) for t in prompt]


def _pad_id(tokenizer: Any) -> int:
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, getattr(tokenizer, "eos_token_id", None)):
        if value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if int(v) not in ids:
                ids.append(int(v))
    return ids


def _left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids) :] = 1
    return input_ids, attention


@torch.no_grad()
def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    device: str = "cpu",
    add_special_tokens: bool = False,
) -> list[str]:
    """Greedy continuation of each prompt, decoded without special tokens.

    Prompts are rendered strings (tokenised with `add_special_tokens`; a chat-template rendering
    already carries its special tokens, hence the default False) or token-id lists used as is.
    Batches are left-padded with an attention mask, so each item's continuation does not depend
    on its batch neighbours (up to float rounding). Prompts are processed longest-first to keep
    padding small; the output keeps the input order.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    from transformers import GenerationConfig

    encoded = [_encode(tokenizer, p, add_special_tokens) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} is empty after tokenisation")
    pad_id = _pad_id(tokenizer)
    eos = _eos_ids(model, tokenizer)
    config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos or None
    )
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    outputs: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            input_ids, attention = _left_pad([encoded[i] for i in idx], pad_id)
            generated = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=config
            )
            new_tokens = generated[:, input_ids.shape[1] :].cpu()
            for row, i in enumerate(idx):
                tokens = new_tokens[row].tolist()
                # cut at the first end-of-sequence token (later positions are padding)
                for pos, tok in enumerate(tokens):
                    if tok in eos:
                        tokens = tokens[:pos]
                        break
                outputs[i] = tokenizer.decode(tokens, skip_special_tokens=True)
    finally:
        if was_training:
            model.train()
    return outputs


@dataclass(frozen=True)
class GenerationEval:
    """Per-item predictions and scores, plus mean metrics with bootstrap CIs."""

    predictions: list[str]
    generations: list[str]
    golds: list[list[str]]
    em: list[float]
    f1: list[float]
    contains: list[float]
    exact_match: ConfidenceInterval
    f1_score: ConfidenceInterval
    contains_match: ConfidenceInterval
    max_new_tokens: int

    @property
    def n(self) -> int:
        return len(self.predictions)

    def summary(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "max_new_tokens": self.max_new_tokens,
            "exact_match": self.exact_match.to_dict(),
            "f1": self.f1_score.to_dict(),
            "contains": self.contains_match.to_dict(),
        }

    def to_dict(self, include_items: bool = True) -> dict[str, Any]:
        data = self.summary()
        if include_items:
            data["items"] = [
                {"prediction": p, "generation": g, "golds": list(gs), "em": e, "f1": f, "contains": c}
                for p, g, gs, e, f, c in zip(
                    self.predictions, self.generations, self.golds, self.em, self.f1, self.contains
                )
            ]
        return data


#: Name used in docs/ARCHITECTURE.md.
EvalMetrics = GenerationEval


def score_predictions(
    predictions: Sequence[str],
    golds: Sequence[Sequence[str]],
    *,
    generations: Sequence[str] | None = None,
    max_new_tokens: int = 0,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> GenerationEval:
    """Score already-extracted predictions against golds (no model involved)."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions but {len(golds)} gold lists")
    if not predictions:
        raise ValueError("nothing to score")
    golds_list = [list(g) for g in golds]
    em = [exact_match(p, g) for p, g in zip(predictions, golds_list)]
    f1 = [f1_score(p, g) for p, g in zip(predictions, golds_list)]
    contains = [contains_match(p, g) for p, g in zip(predictions, golds_list)]
    ci: dict[str, Any] = dict(n_resamples=n_resamples, alpha=alpha, seed=seed)
    return GenerationEval(
        predictions=list(predictions),
        generations=list(generations) if generations is not None else list(predictions),
        golds=golds_list,
        em=em,
        f1=f1,
        contains=contains,
        exact_match=bootstrap_ci(em, **ci),
        f1_score=bootstrap_ci(f1, **ci),
        contains_match=bootstrap_ci(contains, **ci),
        max_new_tokens=max_new_tokens,
    )


def evaluate_generation(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    golds: Sequence[Sequence[str]],
    *,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    device: str = "cpu",
    render: Callable[[Any], Prompt] | None = None,
    extract: Callable[[str], str] | None = None,
    add_special_tokens: bool = False,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> GenerationEval:
    """Greedy-generate an answer for every prompt and score it against its golds.

    `prompts` are chat-template-rendered strings or token-id lists; with `render`, any items
    (e.g. `CalibrationRow`s) that `render(item)` turns into one of those. The answer is
    `extract(generation)` (default `answer_extractor(golds)`: the option letter when every gold is
    one, else `first_line_answer`). Metrics are means over items with
    percentile-bootstrap CIs (`n_resamples`, `alpha`, `seed`).
    """
    if len(prompts) != len(golds):
        raise ValueError(f"{len(prompts)} prompts but {len(golds)} gold lists")
    rendered = [render(p) for p in prompts] if render is not None else list(prompts)
    generations = generate_greedy(
        model,
        tokenizer,
        rendered,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        device=device,
        add_special_tokens=add_special_tokens,
    )
    extract = extract or answer_extractor(golds)
    predictions = [extract(g) for g in generations]
    return score_predictions(
        predictions,
        golds,
        generations=generations,
        max_new_tokens=max_new_tokens,
        n_resamples=n_resamples,
        alpha=alpha,
        seed=seed,
    )
