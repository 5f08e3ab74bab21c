"""Layer scorers, one module per method; `score_layers` dispatches on `spec.method`.

Every scorer returns a `core.types.Profile` with one `LayerProfile` per decoder layer (index,
full dotted name, quantizable weight count, raw scores, importance, sensitivity >= 0 and
quant_error[b] for every b in `spec.bit_choices`), reports progress at least once per layer in
each long stage and checks cancellation at least once per layer (raising `Cancelled`).
Same model, rows, spec and seed give an identical profile (seeded `torch.Generator`s only).
"""

from __future__ import annotations

from typing import Callable, Sequence

from core.models import LoadedModel
from core.spec import CalibrationRow, JobSpec, Method
from core.types import CancelFn, Profile, ProgressFn, never_cancel, no_progress

__all__ = ["SCORERS", "score_layers"]


def _taq(*args, **kwargs) -> Profile:
    from core.scorers.taq import score_taq

    return score_taq(*args, **kwargs)


def _taq_kl(*args, **kwargs) -> Profile:
    from core.scorers.taq_kl import score_taq_kl

    return score_taq_kl(*args, **kwargs)


def _taqo(*args, **kwargs) -> Profile:
    from core.scorers.taqo import score_taqo

    return score_taqo(*args, **kwargs)


def _uniform(*args, **kwargs) -> Profile:
    from core.scorers.uniform import score_uniform

    return score_uniform(*args, **kwargs)


SCORERS: dict[Method, Callable[..., Profile]] = {
    Method.taq: _taq,
    Method.taq_kl: _taq_kl,
    Method.taqo: _taqo,
    Method.uniform: _uniform,
}


def score_layers(loaded: LoadedModel, rows: Sequence[CalibrationRow], spec: JobSpec,
                 progress: ProgressFn = no_progress, should_cancel: CancelFn = never_cancel,
                 **options) -> Profile:
    """Score every decoder layer with `spec.method`. `options` go to the method's scorer
    (e.g. `batch_tokens`)."""
    from core.errors import DataError

    method = Method(spec.method)
    if method != Method.uniform and not rows:
        raise DataError(f"method '{method.value}' needs calibration rows", details=[])
    return SCORERS[method](loaded, list(rows), spec, progress, should_cancel, **options)
