"""Typed errors of the core library. Each carries a stable `code` the API maps to an HTTP status."""

from __future__ import annotations

from typing import Any


class TaqError(Exception):
    """Base error: `code` is stable and machine-readable, the message tells the user what to do."""

    code = "taq_error"

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class ModelNotFound(TaqError):
    code = "model_not_found"


class UnsupportedModel(TaqError):
    code = "unsupported_model"


class UnsafeModel(TaqError):
    """Pickle weights without operator opt-in, or a path escaping the model roots."""

    code = "unsafe_model"


class DataError(TaqError):
    """Bad calibration / eval data; `details` lists `{"line": n, "reason": ...}`."""

    code = "invalid_dataset"


class BudgetInfeasible(TaqError):
    """No allocation meets the bit budget; `details` has `min_avg_bits`."""

    code = "budget_infeasible"


class InvalidSpec(TaqError):
    code = "invalid_spec"


class Cancelled(TaqError):
    code = "cancelled"


class ExportError(TaqError):
    code = "export_failed"


class ModelInvalid(TaqError):
    """A checkpoint whose files contradict themselves or the model config: a missing or truncated
    shard, a corrupt header, an index naming a file outside the model directory, a tensor of the
    wrong shape. The message names the tensor or file (by its name inside the model, never a
    server path)."""

    code = "model_invalid"


class InsufficientDisk(TaqError):
    """The worker's disk has less free space than the job would write there at once
    (`core.disk.estimate_work_disk`); `details` has the estimate and the free bytes."""

    code = "insufficient_disk"
