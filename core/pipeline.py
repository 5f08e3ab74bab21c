"""calibrate → score → allocate → quantize, as one call or as separate stages.

The worker runs the stages separately so it can checkpoint between them:
`score_stage` → Profile, `allocate_stage` → one BitAllocation per budget (or one for the
`paper` rule), `quantize_stage` → the QuantizedWeight of every linear in a layer below 16 bits.
`run_pipeline` chains them; a given `profile` skips scoring (resume, `profile_from_job_id`).

All linears of one layer share its bits, unless `spec.allocation_unit` is `linear`: then each
linear gets its own, except that linears runtimes fuse (q/k/v, gate/up) share one
(`core.allocation.linear_units`, `BitAllocation.unit`, `linear_bits`). Rows beyond
`spec.max_calibration_rows` are subsampled deterministically with `spec.seed`. Quantized weights
are returned on the CPU.

`spec.quantizer == gptq` (error-compensating quantization, `core.quant.gptq`) needs the Hessian
H = XᵀX / n of every linear's input on the calibration rows: `collect_hessians` gets them in one
full-precision pass (the same pass and collector the scorers use), and `quantize_stage` takes
either those (`hessians=`, computed once and shared by every budget of a sweep) or the `rows`
to compute them itself (a worker whose quantize stage runs after a checkpoint). Every layer is
quantized against the full-precision inputs (no sequential propagation of quantized outputs);
linears that read the same input (q/k/v, gate/up) share one Hessian and one GPTQ sweep.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import nn

from core.calibration import HessianCollector, StageProgress, run_fp_pass
from core.errors import DataError, InvalidSpec
from core.models import LoadedModel
from core.modules import get_module
from core.scorers import score_layers
from core.scorers.common import calibration_batches, gptq_layer, prompt_sequences, select_rows
from core.spec import AllocationRule, AllocationUnit, CalibrationRow, JobSpec, Method, Quantizer
from core.types import (BitAllocation, CancelFn, Profile, ProgressFn, QuantizedWeight, never_cancel,
                        no_progress)

__all__ = [
    "PipelineResult",
    "QuantizedModelOutput",
    "QuantizedOutput",
    "allocate_stage",
    "apply_quantized",
    "collect_hessians",
    "layer_costs",
    "linear_bits",
    "quantize_stage",
    "run_pipeline",
    "score_stage",
]


@dataclass(frozen=True)
class QuantizedOutput:
    """One quantized model: the budget it was allocated for (None for the paper rule), the
    allocation, and the quantized weight of every linear in a layer below 16 bits."""

    budget: float | None
    allocation: BitAllocation
    weights: dict[str, QuantizedWeight]


#: the name used in docs/ARCHITECTURE.md
QuantizedModelOutput = QuantizedOutput


@dataclass(frozen=True)
class PipelineResult:
    profile: Profile
    outputs: list[QuantizedOutput]


def score_stage(spec: JobSpec, loaded: LoadedModel, rows: Sequence[CalibrationRow], *,
                progress: ProgressFn = no_progress, should_cancel: CancelFn = never_cancel,
                **options) -> Profile:
    """Subsample the rows (max_calibration_rows, seeded) and score every layer."""
    return score_layers(loaded, select_rows(rows, spec), spec, progress, should_cancel, **options)


def layer_costs(profile: Profile) -> list:
    """The allocator's view of a profile (`core.allocation.LayerCost` per layer)."""
    from core.allocation import layer_costs_from_profile

    return layer_costs_from_profile(profile)


def allocate_stage(spec: JobSpec, profile: Profile) -> list[BitAllocation]:
    """One allocation per budget in `spec.budgets` (budget rule, and `uniform`: the widest single
    width that fits each budget), or a single one for the paper rule. Raises BudgetInfeasible."""
    from core import allocation as alloc

    bit_choices = list(spec.bit_choices)
    if spec.allocation == AllocationRule.paper:
        if spec.method not in (Method.taq, Method.taqo):
            raise InvalidSpec(f"allocation 'paper' is defined for methods 'taq' and 'taqo', not '{spec.method.value}'")
        budget = spec.budgets[0] if spec.budgets else None  # the smallest: the rule must fit every one
        return [alloc.allocate_paper(profile, spec.method, spec.group_size, spec.symmetric, avg_bits=budget)]
    if not spec.budgets:
        raise InvalidSpec("allocation 'budget' needs 'bit_budget'")
    allocate = alloc.allocate_uniform if spec.method == Method.uniform else alloc.allocate_budget
    if spec.allocation_unit == AllocationUnit.linear:
        units = alloc.linear_units(profile)
        return [alloc.expand_units(allocate([u.cost for u in units], budget, bit_choices, spec.group_size,
                                            spec.symmetric), units)
                for budget in spec.budgets]
    costs = layer_costs(profile)
    return [allocate(costs, budget, bit_choices, spec.group_size, spec.symmetric) for budget in spec.budgets]


def collect_hessians(spec: JobSpec, loaded: LoadedModel, rows: Sequence[CalibrationRow], *,
                     progress: ProgressFn = no_progress, should_cancel: CancelFn = never_cancel,
                     stage: str = "quantize", batch_tokens: int | None = None) -> HessianCollector:
    """H = XᵀX / n of every decoder linear's input over the valid tokens of the (subsampled)
    calibration rows, from one full-precision pass. Progress is reported under `stage`."""
    return _collect_hessians(spec, loaded, rows, StageProgress(progress, should_cancel, stage), batch_tokens)


def _collect_hessians(spec: JobSpec, loaded: LoadedModel, rows: Sequence[CalibrationRow],
                      tracker: StageProgress, batch_tokens: int | None = None) -> HessianCollector:
    rows = select_rows(rows, spec)
    if not rows:
        raise DataError(f"quantizer '{spec.quantizer.value}' needs calibration rows", details=[])
    batches = calibration_batches(loaded, prompt_sequences(loaded, rows, spec), batch_tokens)
    hessians = HessianCollector(loaded)
    run_fp_pass(loaded, batches, hessians=hessians, tracker=tracker)
    return hessians


def quantize_stage(spec: JobSpec, loaded: LoadedModel, allocation: BitAllocation, *,
                   rows: Sequence[CalibrationRow] | None = None, hessians: HessianCollector | None = None,
                   progress: ProgressFn = no_progress, should_cancel: CancelFn = never_cancel
                   ) -> dict[str, QuantizedWeight]:
    """Quantize every linear allocated below 16 bits (its layer's bits, or its own under
    per-linear allocation) with `spec.quantizer`. Progress and cancellation once per layer;
    weights end up on the CPU.

    GPTQ needs `hessians` (from `collect_hessians`) or the calibration `rows` to collect them
    (then the pass takes the first quarter of this stage's progress); RTN ignores both."""
    from core.quant.primitives import quantize_weight

    tracker = StageProgress(progress, should_cancel, "quantize")
    bits_by_linear = linear_bits(loaded, allocation)
    gptq = spec.quantizer == Quantizer.gptq
    if gptq and hessians is None and any(b < 16 for b in bits_by_linear.values()):
        if rows is None:
            raise InvalidSpec("quantizer 'gptq' needs the calibration rows or their Hessians")
        hessians = _collect_hessians(spec, loaded, rows, tracker.span(0.0, 0.25))
        tracker = tracker.span(0.25, 1.0)
    weights: dict[str, QuantizedWeight] = {}
    n = len(loaded.layers)
    for ref in loaded.layers:
        tracker.check()
        bits = {name: bits_by_linear[name] for name in ref.linears}
        low = {name: linear for name, linear in ref.linears.items() if bits[name] < 16}
        if low:
            if gptq:
                quantized = gptq_layer(low, hessians, bits, spec)
            else:
                quantized = {name: quantize_weight(linear.weight.detach().float(), bits[name], spec.group_size,
                                                   spec.symmetric, clip_search=spec.clip_search)
                             for name, linear in low.items()}
            for name in low:
                weights[name] = _to_cpu(quantized[name])
        widths = "/".join(str(b) for b in sorted(set(bits.values())))
        tracker.report((ref.index + 1) / n, f"quantized {ref.name} at {widths} bits ({ref.index + 1}/{n})")
    return weights


def linear_bits(loaded: LoadedModel, allocation: BitAllocation) -> dict[str, int]:
    """The bits of every decoder linear (full dotted name) under `allocation`, per layer or per
    linear; InvalidSpec when the allocation misses one."""
    out: dict[str, int] = {}
    missing: list[str] = []
    for ref in loaded.layers:
        for name in ref.linears:
            try:
                out[name] = allocation.bits_of(name, ref.name)
            except KeyError:
                missing.append(name if allocation.unit == "linear" else ref.name)
    if missing:
        missing = list(dict.fromkeys(missing))
        raise InvalidSpec(f"the allocation has no bits for {missing[:3]}{' …' if len(missing) > 3 else ''}")
    return out


def _to_cpu(q: QuantizedWeight) -> QuantizedWeight:
    return replace(q, codes=q.codes.cpu(), scale=q.scale.cpu(), zero=None if q.zero is None else q.zero.cpu())


def apply_quantized(model: nn.Module, weights: dict[str, QuantizedWeight]) -> None:
    """Replace each quantized linear's weight by its dequantized value, in place (the core's own
    dequantized model)."""
    from core.quant.primitives import dequantize_weight

    with torch.no_grad():
        for name, q in weights.items():
            module = get_module(model, name)
            weight = module.weight
            if tuple(weight.shape) != tuple(q.shape):
                raise ValueError(f"{name}: weight shape {tuple(weight.shape)} != quantized shape {q.shape}")
            weight.copy_(dequantize_weight(q, dtype=torch.float32).to(device=weight.device, dtype=weight.dtype))


def run_pipeline(spec: JobSpec, loaded: LoadedModel, rows: Sequence[CalibrationRow], *,
                 progress: ProgressFn = no_progress, should_cancel: CancelFn = never_cancel,
                 profile: Profile | None = None) -> PipelineResult:
    """calibrate → score (skipped when `profile` is given) → allocate → quantize."""
    rows = select_rows(rows, spec)
    progress("calibrate", 1.0, f"{len(rows)} calibration rows")
    if profile is None:
        profile = score_stage(spec, loaded, rows, progress=progress, should_cancel=should_cancel)
    if [l.name for l in profile.layers] != [ref.name for ref in loaded.layers]:
        raise InvalidSpec("the given profile does not match the model's layers")
    if should_cancel():
        from core.errors import Cancelled

        raise Cancelled("cancelled by request")
    allocations = allocate_stage(spec, profile)
    progress("allocate", 1.0, f"{len(allocations)} allocation(s)")
    hessians, share = None, 0.0
    if spec.quantizer == Quantizer.gptq and any(b < 16 for a in allocations for b in a.bits.values()):
        # one pass shared by every budget: the first 20 % of "quantize"
        share = 0.2
        hessians = collect_hessians(spec, loaded, rows, should_cancel=should_cancel,
                                    progress=lambda stage, fraction, message: progress(stage, share * fraction,
                                                                                       message))
    outputs = []
    for i, allocation in enumerate(allocations):
        def sub(stage: str, fraction: float, message: str, _i: int = i) -> None:
            progress(stage, share + (1.0 - share) * (_i + fraction) / len(allocations), message)

        weights = quantize_stage(spec, loaded, allocation, hessians=hessians, progress=sub,
                                 should_cancel=should_cancel)
        outputs.append(QuantizedOutput(budget=allocation.budget, allocation=allocation, weights=weights))
    if len(allocations) == 1:
        profile = profile.with_bits(allocations[0].bits)
    return PipelineResult(profile=profile, outputs=outputs)
