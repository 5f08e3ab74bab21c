"""The one job pipeline, used by the worker, the bench and the tests alike:

    load → calibrate → score → allocate → quantize → export → evaluate → publish

| stage     | does                                                                  | output (in the store)                         |
|-----------|-----------------------------------------------------------------------|-----------------------------------------------|
| load      | opens the checkpoint for streaming (skeleton, tokenizer, headers)      | —                                             |
| calibrate | subsamples rows, builds the sequences the pass runs                    | —                                             |
| score     | the layer pass: statistics, errors and codes at every width, per layer | `work/layers/…` per layer, `artifacts/profile.json` |
| allocate  | bits per layer (or linear) for every budget                            | `artifacts/bitmap.json`, `profile.png`        |
| quantize  | a codes-only pass when the profile was reused from another job         | `work/layers/…`                               |
| export    | streams the chosen codes into each format                              | `artifacts/hf…/`, `artifacts/model….gguf`, `work/export-<tag>.json` |
| evaluate  | streamed teacher-forced metrics; greedy generation when the model fits | `artifacts/eval.json`                          |
| publish   | the caller's (`JobHooks.publish`): manifest, records, final status     | `artifacts/manifest.json`                      |

Resume (`StagePlan.from_store`): a stage whose output exists is skipped; inside the score and
quantize passes a layer whose checkpoint exists is not recomputed. Same inputs and seed give the
same bytes. Stage order, resume decisions and progress shares live here and nowhere else.
"""  # noqa: E501 - the stage table above is wider than the code

from __future__ import annotations

import hashlib
from abc import ABC
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from core.canonical_json import compact_json
from core.errors import Cancelled, DataError, InvalidSpec
from core.models import ModelSource
from core.spec import AllocationRule, AllocationUnit, CalibrationRow, JobSpec, Method, Quantizer
from core.streaming.checkpoints import CheckpointStore
from core.types import BitAllocation, Profile

__all__ = [
    "ArtifactStore",
    "JobHooks",
    "JobInputs",
    "JobOutputs",
    "STAGES",
    "STAGE_SHARES",
    "StagePlan",
    "allocate_stage",
    "budget_tag",
    "overall_progress",
    "reference_bits",
    "run_job",
]

STAGES = ("load", "calibrate", "score", "allocate", "quantize", "export", "evaluate", "publish")
#: share of the overall progress bar per stage (sums to 1)
STAGE_SHARES = {
    "load": 0.02,
    "calibrate": 0.01,
    "score": 0.55,
    "allocate": 0.01,
    "quantize": 0.05,
    "export": 0.16,
    "evaluate": 0.17,
    "publish": 0.03,
}
_STAGE_START = {s: sum(STAGE_SHARES[t] for t in STAGES[:i]) for i, s in enumerate(STAGES)}

LAYERS_PREFIX = "work/layers"
CODES_PREFIX = "work/codes"  # the quantize stage's pass (reused profiles)


def overall_progress(stage: str, fraction: float) -> float:
    """Job progress in [0, 1] when `stage` is `fraction` done."""
    return _STAGE_START[stage] + STAGE_SHARES[stage] * max(0.0, min(1.0, fraction))


def budget_tag(avg_bits: float | None) -> str:
    """Artifact suffix of a budget: 'default' for the paper rule, else b<bits> (`4.5` -> `b4.5`)."""
    return "default" if avg_bits is None else f"b{avg_bits:g}"


class ArtifactStore(CheckpointStore, Protocol):
    """Where a job's outputs go (keys like `artifacts/profile.json`)."""

    def put_file(self, key: str, path: Path, *, handover: bool = False) -> Any:
        """`handover`: the caller will not write to `path` again (see common.storage.Storage)."""

    def delete_prefix(self, prefix: str) -> Any: ...


class JobHooks(ABC):
    """What the caller learns and decides while the pipeline runs. The defaults suit tests and the
    bench; the worker records stages, progress and cancellation in the database."""

    def stage(self, name: str, *, skipped: bool, reason: str) -> AbstractContextManager[None]:
        return nullcontext()

    def progress(self, stage: str, fraction: float, message: str) -> None:
        return None

    def should_cancel(self) -> bool:
        return False

    def profile_ready(self, profile: Profile) -> None:
        """The profile was stored (with bits once allocated)."""

    def exported(self, tag: str, files: list[tuple[str, Path]]) -> dict[str, Any]:
        """One budget's artifacts were written and uploaded; `files` are (name under artifacts/,
        local path) while the local copies still exist. What this returns is kept with the
        export's record (`ExportRecord.extra`), e.g. digests the caller derives from the files."""
        return {}

    def publish(self, outputs: JobOutputs) -> Any:
        """The last stage; returns what `run_job` returns."""
        return outputs


@dataclass
class JobInputs:
    spec: JobSpec
    source: ModelSource
    rows: list[CalibrationRow]
    eval_rows: list[CalibrationRow] = field(default_factory=list)
    reused_profile: Profile | None = None
    device: str = "cpu"
    dtype: Any = None  # torch dtype; None: float32 on CPU, bf16 on CUDA
    memory_limit_bytes: int | None = None  # greedy generation only when the whole model fits
    activation_ram_bytes: int = 2 << 30  # carried hidden states kept in RAM before spilling
    work_dir: Path | None = None  # spill files and export staging (a temp dir when None)
    batch_tokens: int | None = None


@dataclass
class ExportRecord:
    tag: str
    files: list[dict[str, Any]]  # {"name" (under artifacts/), "size", "sha256"}
    storage: dict[str, Any]  # stored bits per artifact (core.export.manifest)
    extra: dict[str, Any] = field(default_factory=dict)  # JobHooks.exported's result


@dataclass
class JobOutputs:
    spec: JobSpec
    source: ModelSource
    profile: Profile
    allocations: list[BitAllocation]
    exports: list[ExportRecord]
    eval_report: dict[str, Any] | None
    written: dict[str, tuple[int, str]]  # small artifacts: key -> (size, sha256)
    generation: dict[str, Any] | None = None

    def artifact_names(self, allocation: BitAllocation) -> dict[str, str]:
        return artifact_names(self.allocations, allocation)


def artifact_names(allocations: Sequence[BitAllocation], allocation: BitAllocation) -> dict[str, str]:
    suffix = "" if len(allocations) == 1 else f"-{budget_tag(allocation.budget)}"
    return {"hf": f"hf{suffix}", "gguf": f"model{suffix}.gguf"}


# ---------------------------------------------------------------------------------------------
# decisions that need no model
# ---------------------------------------------------------------------------------------------


def allocate_stage(spec: JobSpec, profile: Profile) -> list[BitAllocation]:
    """One allocation per budget in `spec.budgets` (budget rule; `uniform`: the widest single
    width that fits each budget; the error_only / random controls), or a single one for the paper
    rule. Raises BudgetInfeasible."""
    from functools import partial

    from core import allocation as alloc
    from core import controls
    from core.allocation_paper import allocate_paper

    bit_choices = list(spec.bit_choices)
    if spec.allocation == AllocationRule.paper:
        # allocate_paper refuses a method the rule is not defined for (InvalidSpec)
        budget = spec.budgets[0] if spec.budgets else None  # the smallest: the rule must fit every one
        return [allocate_paper(profile, spec.method, spec.scheme, avg_bits=budget)]
    if not spec.budgets:
        raise InvalidSpec(f"allocation '{spec.allocation.value}' needs 'bit_budget'")
    allocate: Callable[..., BitAllocation]
    if spec.allocation == AllocationRule.error_only:
        allocate = controls.allocate_error_only
    elif spec.allocation == AllocationRule.random:
        allocate = partial(controls.allocate_random, seed=spec.seed)
    elif spec.method == Method.uniform:
        allocate = alloc.allocate_uniform
    else:
        allocate = alloc.allocate_budget
    if spec.allocation_unit == AllocationUnit.linear:
        units = alloc.linear_units(profile)
        return [
            alloc.expand_units(allocate([u.cost for u in units], budget, bit_choices, spec.scheme), units)
            for budget in spec.budgets
        ]
    costs = alloc.layer_costs_from_profile(profile)
    return [allocate(costs, budget, bit_choices, spec.scheme) for budget in spec.budgets]


def reference_bits(spec: JobSpec) -> int | None:
    """The width the sequentially calibrated stream is quantized at (`calibration_inputs:
    quantized`): the widest choice below 16 whose uniform cost fits the smallest budget, else the
    lowest choice below 16; None when every choice is 16."""
    low = sorted(b for b in spec.bit_choices if b < 16)
    if not low:
        return None
    if spec.budgets:
        fitting = [b for b in low if spec.scheme.effective_bits(b) <= min(spec.budgets)]
        if fitting:
            return fitting[-1]
    return low[0]


@dataclass(frozen=True)
class StagePlan:
    """Which stages run and which are skipped (with the reason), decided from what the store
    already holds."""

    have_profile: bool
    have_bitmap: bool
    have_exports: bool
    have_eval: bool
    wants_eval: bool
    reused_profile: bool

    @classmethod
    def from_store(cls, store: CheckpointStore, spec: JobSpec, *, reused_profile: bool) -> StagePlan:
        have_bitmap = store.exists("artifacts/bitmap.json")
        tags = [budget_tag(b) for b in spec.budgets] or [budget_tag(None)]
        if spec.allocation == AllocationRule.paper:
            tags = [budget_tag(spec.budgets[0] if spec.budgets else None)]
        wants_eval = spec.eval_dataset_id is not None or spec.eval_fraction is not None
        return cls(
            have_profile=store.exists("artifacts/profile.json"),
            have_bitmap=have_bitmap,
            have_exports=have_bitmap and all(store.exists(f"work/export-{t}.json") for t in tags),
            have_eval=(not wants_eval) or store.exists("artifacts/eval.json"),
            wants_eval=wants_eval,
            reused_profile=reused_profile,
        )

    @property
    def needs_codes(self) -> bool:
        return not (self.have_exports and self.have_eval)

    @property
    def needs_model(self) -> bool:
        return self.needs_codes or not self.have_profile

    def skip(self, stage: str) -> str | None:
        """None when `stage` runs, else why it is skipped."""
        if stage == "load":
            return None if self.needs_model else "all model outputs stored"
        if stage == "score":
            if self.have_profile:
                return "profile.json stored"
            return "profile reused from another job" if self.reused_profile else None
        if stage == "allocate":
            return "bitmap.json stored" if self.have_bitmap else None
        if stage == "quantize":
            if not self.reused_profile:
                return "codes stored per layer by the score stage"
            return None if self.needs_codes else "exports and eval stored"
        if stage == "export":
            return "exports stored" if self.have_exports else None
        if stage == "evaluate":
            if not self.wants_eval:
                return "no eval data"
            return "eval.json stored" if self.have_eval else None
        return None


def pass_key(
    spec: JobSpec,
    rows: Sequence[CalibrationRow],
    widths: Sequence[int],
    source: ModelSource,
    scorer: str,
    *,
    device: str = "cpu",
    dtype: Any = None,
) -> str:
    """Digest of everything that shapes a layer pass's checkpoints (a job retried on a worker of
    another device or compute dtype recomputes its layers rather than mixing the two)."""
    fields = spec.model_dump(
        mode="json",
        include={
            "model",
            "method",
            "bit_choices",
            "group_size",
            "symmetric",
            "quantizer",
            "clip_search",
            "max_tokens",
            "max_calibration_rows",
            "reservoir_size",
            "seed",
            "calibration_inputs",
            "bit_budget",
        },
    )
    # only when set, so checkpoints of grids without them keep their keys
    if spec.float_zero:
        fields["zero_point"] = spec.zero_point.value
    if spec.k_quants:
        fields["k_quants"] = True
    if spec.scheme.group_size_by_bits:
        fields["group_size_by_bits"] = [list(pair) for pair in spec.scheme.group_size_by_bits]
    digest = hashlib.sha256(
        compact_json(
            {
                "spec": fields,
                "widths": list(widths),
                "scorer": scorer,
                "source": source.model_id,
                "device": str(device).split(":")[0],
                "dtype": str(dtype),
            }
        ).encode()
    )
    for row in rows:
        digest.update(row.model_dump_json().encode())
    return digest.hexdigest()


def run_job(inputs: JobInputs, store: ArtifactStore, hooks: JobHooks | None = None) -> Any:
    """Run every stage (see the module docstring); returns `hooks.publish(outputs)`."""
    from core.job_stages import JobRun

    return JobRun(inputs, store, hooks or JobHooks()).run()


def check_rows(spec: JobSpec, rows: Sequence[CalibrationRow]) -> None:
    if spec.method != Method.uniform and not rows and spec.profile_from_job_id is None:
        raise DataError(f"method '{spec.method.value}' needs calibration rows", details=[])
    if spec.quantizer == Quantizer.gptq and not rows:
        raise DataError("quantizer 'gptq' needs calibration rows", details=[])


def cancelled() -> Cancelled:
    return Cancelled("cancelled by request")
