from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

from attrs import define as _attrs_define

from ..models.allocation_rule import AllocationRule
from ..models.allocation_unit import AllocationUnit
from ..models.calibration_inputs import CalibrationInputs
from ..models.export_format import ExportFormat
from ..models.method import Method
from ..models.quantizer import Quantizer
from ..models.target_runtime import TargetRuntime
from ..models.zero_point import ZeroPoint
from ..types import UNSET, Unset

if TYPE_CHECKING:
    from ..models.bit_budget import BitBudget
    from ..models.calibration_row import CalibrationRow
    from ..models.job_spec_group_size_by_bits import JobSpecGroupSizeByBits


T = TypeVar("T", bound="JobSpec")


@_attrs_define
class JobSpec:
    """
    Attributes:
        model (str):
        allocation (AllocationRule | Unset): How a budget becomes bits per layer: `budget` the exact knapsack over the
            method's
            sensitivities, `paper` the paper's fixed rule; and two task-agnostic controls at the same
            budget (core/controls.py): `error_only` the same knapsack with every sensitivity 1, `random`
            layers raised in a seeded random order.
        allocation_unit (AllocationUnit | Unset): What one allocated width covers: a whole transformer `layer` (the
            default), or each
            `linear` of it separately (q/k/v/o and the MLP projections get their own bits).
        bit_budget (BitBudget | None | Unset):
        bit_choices (list[int] | Unset):
        calibration (list[CalibrationRow] | None | Unset):
        calibration_dataset_id (None | str | Unset):
        calibration_inputs (CalibrationInputs | Unset): What each layer is calibrated on in the layer pass: the full-
            precision model's activations
            (`fp`), or the outputs of the layers before it already quantized (`quantized`, sequential
            calibration as in llm-compressor's sequential pipeline; the earlier layers are quantized at
            the widest width whose uniform cost fits the smallest budget).
        clip_search (bool | Unset):  Default: False.
        closed_loop (bool | Unset):  Default: False.
        eval_controls (bool | Unset):  Default: True.
        eval_dataset_id (None | str | Unset):
        eval_fraction (float | None | Unset):
        exports (list[ExportFormat] | Unset):
        group_size (int | Unset):  Default: 128.
        group_size_by_bits (JobSpecGroupSizeByBits | Unset):
        k_quants (bool | Unset):  Default: False.
        max_calibration_rows (int | Unset):  Default: 256.
        max_tokens (int | Unset):  Default: 256.
        method (Method | Unset):
        profile_from_job_id (None | str | Unset):
        quantizer (Quantizer | Unset): How a weight is rounded to its grid: `rtn` round-to-nearest per weight; `gptq`
            error-compensating (GPTQ-style) using the Hessian XᵀX of each linear's input on the
            calibration rows (see core/quant/gptq.py).
        reservoir_size (int | Unset):  Default: 256.
        seed (int | Unset):  Default: 0.
        symmetric (bool | Unset):  Default: False.
        target_runtime (None | TargetRuntime | Unset):
        worker_class (None | str | Unset):
        zero_point (ZeroPoint | Unset): How an asymmetric group stores where its range starts: `integer` a uint8 zero
            point on the
            code grid (w = scale · (code − zero); every export carries it); `float` an fp16 offset
            (w = scale · code + offset, GGUF's Q4_1/Q5_1 blocks, HQQ) for widths up to 5 bits, exported
            to GGUF only (compressed-tensors and vLLM read integer zero points).
    """

    model: str
    allocation: AllocationRule | Unset = UNSET
    allocation_unit: AllocationUnit | Unset = UNSET
    bit_budget: BitBudget | None | Unset = UNSET
    bit_choices: list[int] | Unset = UNSET
    calibration: list[CalibrationRow] | None | Unset = UNSET
    calibration_dataset_id: None | str | Unset = UNSET
    calibration_inputs: CalibrationInputs | Unset = UNSET
    clip_search: bool | Unset = False
    closed_loop: bool | Unset = False
    eval_controls: bool | Unset = True
    eval_dataset_id: None | str | Unset = UNSET
    eval_fraction: float | None | Unset = UNSET
    exports: list[ExportFormat] | Unset = UNSET
    group_size: int | Unset = 128
    group_size_by_bits: JobSpecGroupSizeByBits | Unset = UNSET
    k_quants: bool | Unset = False
    max_calibration_rows: int | Unset = 256
    max_tokens: int | Unset = 256
    method: Method | Unset = UNSET
    profile_from_job_id: None | str | Unset = UNSET
    quantizer: Quantizer | Unset = UNSET
    reservoir_size: int | Unset = 256
    seed: int | Unset = 0
    symmetric: bool | Unset = False
    target_runtime: None | TargetRuntime | Unset = UNSET
    worker_class: None | str | Unset = UNSET
    zero_point: ZeroPoint | Unset = UNSET

    def to_dict(self) -> dict[str, Any]:
        from ..models.bit_budget import BitBudget  # noqa: PLC0415

        model = self.model

        allocation: str | Unset = UNSET
        if not isinstance(self.allocation, Unset):
            allocation = self.allocation.value

        allocation_unit: str | Unset = UNSET
        if not isinstance(self.allocation_unit, Unset):
            allocation_unit = self.allocation_unit.value

        bit_budget: dict[str, Any] | None | Unset
        if isinstance(self.bit_budget, Unset):
            bit_budget = UNSET
        elif isinstance(self.bit_budget, BitBudget):
            bit_budget = self.bit_budget.to_dict()
        else:
            bit_budget = self.bit_budget

        bit_choices: list[int] | Unset = UNSET
        if not isinstance(self.bit_choices, Unset):
            bit_choices = self.bit_choices

        calibration: list[dict[str, Any]] | None | Unset
        if isinstance(self.calibration, Unset):
            calibration = UNSET
        elif isinstance(self.calibration, list):
            calibration = []
            for calibration_type_0_item_data in self.calibration:
                calibration_type_0_item = calibration_type_0_item_data.to_dict()
                calibration.append(calibration_type_0_item)

        else:
            calibration = self.calibration

        calibration_dataset_id: None | str | Unset
        if isinstance(self.calibration_dataset_id, Unset):
            calibration_dataset_id = UNSET
        else:
            calibration_dataset_id = self.calibration_dataset_id

        calibration_inputs: str | Unset = UNSET
        if not isinstance(self.calibration_inputs, Unset):
            calibration_inputs = self.calibration_inputs.value

        clip_search = self.clip_search

        closed_loop = self.closed_loop

        eval_controls = self.eval_controls

        eval_dataset_id: None | str | Unset
        if isinstance(self.eval_dataset_id, Unset):
            eval_dataset_id = UNSET
        else:
            eval_dataset_id = self.eval_dataset_id

        eval_fraction: float | None | Unset
        if isinstance(self.eval_fraction, Unset):
            eval_fraction = UNSET
        else:
            eval_fraction = self.eval_fraction

        exports: list[str] | Unset = UNSET
        if not isinstance(self.exports, Unset):
            exports = []
            for exports_item_data in self.exports:
                exports_item = exports_item_data.value
                exports.append(exports_item)

        group_size = self.group_size

        group_size_by_bits: dict[str, Any] | Unset = UNSET
        if not isinstance(self.group_size_by_bits, Unset):
            group_size_by_bits = self.group_size_by_bits.to_dict()

        k_quants = self.k_quants

        max_calibration_rows = self.max_calibration_rows

        max_tokens = self.max_tokens

        method: str | Unset = UNSET
        if not isinstance(self.method, Unset):
            method = self.method.value

        profile_from_job_id: None | str | Unset
        if isinstance(self.profile_from_job_id, Unset):
            profile_from_job_id = UNSET
        else:
            profile_from_job_id = self.profile_from_job_id

        quantizer: str | Unset = UNSET
        if not isinstance(self.quantizer, Unset):
            quantizer = self.quantizer.value

        reservoir_size = self.reservoir_size

        seed = self.seed

        symmetric = self.symmetric

        target_runtime: None | str | Unset
        if isinstance(self.target_runtime, Unset):
            target_runtime = UNSET
        elif isinstance(self.target_runtime, TargetRuntime):
            target_runtime = self.target_runtime.value
        else:
            target_runtime = self.target_runtime

        worker_class: None | str | Unset
        if isinstance(self.worker_class, Unset):
            worker_class = UNSET
        else:
            worker_class = self.worker_class

        zero_point: str | Unset = UNSET
        if not isinstance(self.zero_point, Unset):
            zero_point = self.zero_point.value

        field_dict: dict[str, Any] = {}

        field_dict.update(
            {
                "model": model,
            }
        )
        if allocation is not UNSET:
            field_dict["allocation"] = allocation
        if allocation_unit is not UNSET:
            field_dict["allocation_unit"] = allocation_unit
        if bit_budget is not UNSET:
            field_dict["bit_budget"] = bit_budget
        if bit_choices is not UNSET:
            field_dict["bit_choices"] = bit_choices
        if calibration is not UNSET:
            field_dict["calibration"] = calibration
        if calibration_dataset_id is not UNSET:
            field_dict["calibration_dataset_id"] = calibration_dataset_id
        if calibration_inputs is not UNSET:
            field_dict["calibration_inputs"] = calibration_inputs
        if clip_search is not UNSET:
            field_dict["clip_search"] = clip_search
        if closed_loop is not UNSET:
            field_dict["closed_loop"] = closed_loop
        if eval_controls is not UNSET:
            field_dict["eval_controls"] = eval_controls
        if eval_dataset_id is not UNSET:
            field_dict["eval_dataset_id"] = eval_dataset_id
        if eval_fraction is not UNSET:
            field_dict["eval_fraction"] = eval_fraction
        if exports is not UNSET:
            field_dict["exports"] = exports
        if group_size is not UNSET:
            field_dict["group_size"] = group_size
        if group_size_by_bits is not UNSET:
            field_dict["group_size_by_bits"] = group_size_by_bits
        if k_quants is not UNSET:
            field_dict["k_quants"] = k_quants
        if max_calibration_rows is not UNSET:
            field_dict["max_calibration_rows"] = max_calibration_rows
        if max_tokens is not UNSET:
            field_dict["max_tokens"] = max_tokens
        if method is not UNSET:
            field_dict["method"] = method
        if profile_from_job_id is not UNSET:
            field_dict["profile_from_job_id"] = profile_from_job_id
        if quantizer is not UNSET:
            field_dict["quantizer"] = quantizer
        if reservoir_size is not UNSET:
            field_dict["reservoir_size"] = reservoir_size
        if seed is not UNSET:
            field_dict["seed"] = seed
        if symmetric is not UNSET:
            field_dict["symmetric"] = symmetric
        if target_runtime is not UNSET:
            field_dict["target_runtime"] = target_runtime
        if worker_class is not UNSET:
            field_dict["worker_class"] = worker_class
        if zero_point is not UNSET:
            field_dict["zero_point"] = zero_point

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        from ..models.bit_budget import BitBudget  # noqa: PLC0415
        from ..models.calibration_row import CalibrationRow  # noqa: PLC0415
        from ..models.job_spec_group_size_by_bits import JobSpecGroupSizeByBits  # noqa: PLC0415

        d = dict(src_dict)
        model = d.pop("model")

        _allocation = d.pop("allocation", UNSET)
        allocation: AllocationRule | Unset
        if isinstance(_allocation, Unset):
            allocation = UNSET
        else:
            allocation = AllocationRule(_allocation)

        _allocation_unit = d.pop("allocation_unit", UNSET)
        allocation_unit: AllocationUnit | Unset
        if isinstance(_allocation_unit, Unset):
            allocation_unit = UNSET
        else:
            allocation_unit = AllocationUnit(_allocation_unit)

        def _parse_bit_budget(data: object) -> BitBudget | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                bit_budget_type_0 = BitBudget.from_dict(data)

                return bit_budget_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(BitBudget | None | Unset, data)

        bit_budget = _parse_bit_budget(d.pop("bit_budget", UNSET))

        bit_choices = cast(list[int], d.pop("bit_choices", UNSET))

        def _parse_calibration(data: object) -> list[CalibrationRow] | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, list):
                    raise TypeError()
                calibration_type_0 = []
                _calibration_type_0 = data
                for calibration_type_0_item_data in _calibration_type_0:
                    calibration_type_0_item = CalibrationRow.from_dict(calibration_type_0_item_data)

                    calibration_type_0.append(calibration_type_0_item)

                return calibration_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(list[CalibrationRow] | None | Unset, data)

        calibration = _parse_calibration(d.pop("calibration", UNSET))

        def _parse_calibration_dataset_id(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        calibration_dataset_id = _parse_calibration_dataset_id(d.pop("calibration_dataset_id", UNSET))

        _calibration_inputs = d.pop("calibration_inputs", UNSET)
        calibration_inputs: CalibrationInputs | Unset
        if isinstance(_calibration_inputs, Unset):
            calibration_inputs = UNSET
        else:
            calibration_inputs = CalibrationInputs(_calibration_inputs)

        clip_search = d.pop("clip_search", UNSET)

        closed_loop = d.pop("closed_loop", UNSET)

        eval_controls = d.pop("eval_controls", UNSET)

        def _parse_eval_dataset_id(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        eval_dataset_id = _parse_eval_dataset_id(d.pop("eval_dataset_id", UNSET))

        def _parse_eval_fraction(data: object) -> float | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(float | None | Unset, data)

        eval_fraction = _parse_eval_fraction(d.pop("eval_fraction", UNSET))

        _exports = d.pop("exports", UNSET)
        exports: list[ExportFormat] | Unset = UNSET
        if _exports is not UNSET:
            exports = []
            for exports_item_data in _exports:
                exports_item = ExportFormat(exports_item_data)

                exports.append(exports_item)

        group_size = d.pop("group_size", UNSET)

        _group_size_by_bits = d.pop("group_size_by_bits", UNSET)
        group_size_by_bits: JobSpecGroupSizeByBits | Unset
        if isinstance(_group_size_by_bits, Unset):
            group_size_by_bits = UNSET
        else:
            group_size_by_bits = JobSpecGroupSizeByBits.from_dict(_group_size_by_bits)

        k_quants = d.pop("k_quants", UNSET)

        max_calibration_rows = d.pop("max_calibration_rows", UNSET)

        max_tokens = d.pop("max_tokens", UNSET)

        _method = d.pop("method", UNSET)
        method: Method | Unset
        if isinstance(_method, Unset):
            method = UNSET
        else:
            method = Method(_method)

        def _parse_profile_from_job_id(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        profile_from_job_id = _parse_profile_from_job_id(d.pop("profile_from_job_id", UNSET))

        _quantizer = d.pop("quantizer", UNSET)
        quantizer: Quantizer | Unset
        if isinstance(_quantizer, Unset):
            quantizer = UNSET
        else:
            quantizer = Quantizer(_quantizer)

        reservoir_size = d.pop("reservoir_size", UNSET)

        seed = d.pop("seed", UNSET)

        symmetric = d.pop("symmetric", UNSET)

        def _parse_target_runtime(data: object) -> None | TargetRuntime | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, str):
                    raise TypeError()
                target_runtime_type_0 = TargetRuntime(data)

                return target_runtime_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(None | TargetRuntime | Unset, data)

        target_runtime = _parse_target_runtime(d.pop("target_runtime", UNSET))

        def _parse_worker_class(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        worker_class = _parse_worker_class(d.pop("worker_class", UNSET))

        _zero_point = d.pop("zero_point", UNSET)
        zero_point: ZeroPoint | Unset
        if isinstance(_zero_point, Unset):
            zero_point = UNSET
        else:
            zero_point = ZeroPoint(_zero_point)

        job_spec = cls(
            model=model,
            allocation=allocation,
            allocation_unit=allocation_unit,
            bit_budget=bit_budget,
            bit_choices=bit_choices,
            calibration=calibration,
            calibration_dataset_id=calibration_dataset_id,
            calibration_inputs=calibration_inputs,
            clip_search=clip_search,
            closed_loop=closed_loop,
            eval_controls=eval_controls,
            eval_dataset_id=eval_dataset_id,
            eval_fraction=eval_fraction,
            exports=exports,
            group_size=group_size,
            group_size_by_bits=group_size_by_bits,
            k_quants=k_quants,
            max_calibration_rows=max_calibration_rows,
            max_tokens=max_tokens,
            method=method,
            profile_from_job_id=profile_from_job_id,
            quantizer=quantizer,
            reservoir_size=reservoir_size,
            seed=seed,
            symmetric=symmetric,
            target_runtime=target_runtime,
            worker_class=worker_class,
            zero_point=zero_point,
        )

        return job_spec
