"""Greedy generation inside a job, for the scorers that need it (taqo's / taq_grad's self-answers,
taqo_gen's per-variant answers), the closed loop's held-back check and the evaluation: only when
the whole model fits the worker's memory limit; otherwise a reason the caller reports (evaluation,
the closed loop) or an InvalidSpec (scoring)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from core.errors import InvalidSpec
from core.types import QuantizedWeight

if TYPE_CHECKING:
    from core.calibration import StageProgress
    from core.job_stages import JobRun

__all__ = [
    "generation_skip_reason",
    "greedy_token_answers",
    "greedy_variant_answers",
    "require_generation",
    "variants_token_ids",
]


def generation_skip_reason(run: JobRun) -> str | None:
    """Why greedy generation cannot run in this job (the model does not fit), or None."""
    from core.memory import RUNTIME_BYTES
    from core.streaming.generate import materialized_bytes

    limit = run.inputs.memory_limit_bytes
    if limit is None:
        return None
    need = materialized_bytes(run.loaded, run.spec.max_tokens) + RUNTIME_BYTES
    if need > limit:
        return (
            f"greedy generation needs the whole model in memory ({need / 2**30:.1f} GiB) and the "
            f"worker's limit is {limit / 2**30:.1f} GiB; teacher-forced metrics were streamed instead"
        )
    return None


def require_generation(run: JobRun, why: str, fix: str) -> None:
    """InvalidSpec "<method> <why>, and <the memory reason>; <fix>" when the model does not fit."""
    reason = generation_skip_reason(run)
    if reason is not None:
        raise InvalidSpec(f"{run.spec.method.value} {why}, and {reason.split(';')[0]}; {fix}")


def greedy_token_answers(run: JobRun, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """taqo's / taq_grad's self-answers: the full-precision model's greedy continuations (token ids)."""
    from core.streaming.generate import greedy_token_ids, materialized

    require_generation(
        run, "needs the model's own answers for rows without 'answers'", "give gold answers in the calibration rows"
    )
    with materialized(run.loaded) as module:
        return greedy_token_ids(module, run.loaded.tokenizer, prompts, max_new_tokens)


def greedy_variant_answers(
    run: JobRun,
    prompts: list[list[int]],
    max_new_tokens: int,
    variants: list[dict[str, int]],
    codes: Callable[[int, int], dict[str, QuantizedWeight]],
) -> list[list[list[int]]]:
    """taqo_gen's answers: `variants_token_ids` once the model is known to fit."""
    require_generation(
        run, "generates with each layer quantized", "use method 'taqo' (teacher-forced, streamed) instead"
    )
    # the layer pass reported up to 0.9 of the score stage; generation takes the rest
    return variants_token_ids(run, prompts, max_new_tokens, variants, codes, run.tracker("score").span(0.9, 1.0))


def variants_token_ids(
    run: JobRun,
    prompts: list[list[int]],
    max_new_tokens: int,
    variants: list[dict[str, int]],
    codes: Callable[[int, int], dict[str, QuantizedWeight]],
    tracker: StageProgress,
) -> list[list[list[int]]]:
    """Per variant (a width per linear), each prompt's greedy continuation (token ids), with the
    model materialised once and each variant's codes installed in turn. The caller checks that
    generation fits (`generation_skip_reason`)."""
    from core.streaming.generate import greedy_token_ids, installed, materialized

    answers = []
    with materialized(run.loaded) as module:
        for i, bits in enumerate(variants):
            tracker.check()
            tracker.report(i / len(variants), f"generating with variant {i + 1} of {len(variants)}")
            with installed(run.loaded, bits, codes):
                answers.append(greedy_token_ids(module, run.loaded.tokenizer, prompts, max_new_tokens))
    return answers
