"""`uniform`: no scoring. The profile still carries parameter counts and measured quantization
errors (activation-aware when calibration rows are given, relative weight error otherwise) so the
allocator and the plots work; importance is 0 and sensitivity 1 for every layer."""

from __future__ import annotations

from typing import Sequence

from core.calibration import HessianCollector, StageProgress, run_fp_pass
from core.models import LoadedModel
from core.scorers.common import (LayerScores, build_profile, calibration_batches, prompt_sequences,
                                 quant_error_profile, select_rows)
from core.spec import CalibrationRow, JobSpec
from core.types import CancelFn, Profile, ProgressFn, never_cancel, no_progress

__all__ = ["score_uniform"]


def score_uniform(loaded: LoadedModel, rows: Sequence[CalibrationRow], spec: JobSpec,
                  progress: ProgressFn = no_progress, should_cancel: CancelFn = never_cancel, *,
                  batch_tokens: int | None = None) -> Profile:
    tracker = StageProgress(progress, should_cancel, "score")
    rows = select_rows(rows, spec)
    hessians = None
    if rows:
        hessians = HessianCollector(loaded)
        batches = calibration_batches(loaded, prompt_sequences(loaded, rows, spec), batch_tokens)
        run_fp_pass(loaded, batches, hessians=hessians, tracker=tracker.span(0.0, 0.5))
    quant_errors = quant_error_profile(loaded, hessians, spec, tracker.span(0.5 if rows else 0.0, 1.0))
    scores = [LayerScores(scores={}, importance=0.0, sensitivity=1.0) for _ in loaded.layers]
    return build_profile(spec, loaded, "uniform", scores, quant_errors)
