"""Task evaluation on whole models: greedy batched generation, its answers scored with
core/answers.py (EM / F1 / contains) and bootstrap confidence intervals (core/stats.py). The
teacher-forced metrics (gold-answer NLL, KL and top-1 agreement at the answer positions) are
streamed layer by layer in core/streaming/evaluate.py.

Nothing here reads the environment or prints; device and batch sizes are parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from core.answers import answer_extractor, contains_match, exact_match, f1_score
from core.stats import ConfidenceInterval, bootstrap_ci

__all__ = [
    "ConfidenceInterval",
    "EvalMetrics",
    "GenerationEval",
    "bootstrap_ci",
    "evaluate_generation",
    "generate_greedy",
    "score_predictions",
]

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
