from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..types import UNSET, Unset

if TYPE_CHECKING:
    from ..models.layer_out_quant_error_type_0 import LayerOutQuantErrorType0
    from ..models.layer_out_scores import LayerOutScores
    from ..models.linear_out import LinearOut


T = TypeVar("T", bound="LayerOut")


@_attrs_define
class LayerOut:
    """
    Attributes:
        bits (int | None): the layer's width; null before allocation, or under per-linear allocation when its linears
            got different widths (see linears)
        importance (float):
        index (int):
        name (str):
        params (int):
        scores (LayerOutScores):
        sensitivity (float):
        linears (list[LinearOut] | Unset): each linear's own quant_error and, under allocation_unit 'linear', its bits
        quant_error (LayerOutQuantErrorType0 | None | Unset):
    """

    bits: int | None
    importance: float
    index: int
    name: str
    params: int
    scores: LayerOutScores
    sensitivity: float
    linears: list[LinearOut] | Unset = UNSET
    quant_error: LayerOutQuantErrorType0 | None | Unset = UNSET
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from ..models.layer_out_quant_error_type_0 import LayerOutQuantErrorType0  # noqa: PLC0415

        bits: int | None
        bits = self.bits

        importance = self.importance

        index = self.index

        name = self.name

        params = self.params

        scores = self.scores.to_dict()

        sensitivity = self.sensitivity

        linears: list[dict[str, Any]] | Unset = UNSET
        if not isinstance(self.linears, Unset):
            linears = []
            for linears_item_data in self.linears:
                linears_item = linears_item_data.to_dict()
                linears.append(linears_item)

        quant_error: dict[str, Any] | None | Unset
        if isinstance(self.quant_error, Unset):
            quant_error = UNSET
        elif isinstance(self.quant_error, LayerOutQuantErrorType0):
            quant_error = self.quant_error.to_dict()
        else:
            quant_error = self.quant_error

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "bits": bits,
                "importance": importance,
                "index": index,
                "name": name,
                "params": params,
                "scores": scores,
                "sensitivity": sensitivity,
            }
        )
        if linears is not UNSET:
            field_dict["linears"] = linears
        if quant_error is not UNSET:
            field_dict["quant_error"] = quant_error

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        from ..models.layer_out_quant_error_type_0 import LayerOutQuantErrorType0  # noqa: PLC0415
        from ..models.layer_out_scores import LayerOutScores  # noqa: PLC0415
        from ..models.linear_out import LinearOut  # noqa: PLC0415

        d = dict(src_dict)

        def _parse_bits(data: object) -> int | None:
            if data is None:
                return data
            return cast(int | None, data)

        bits = _parse_bits(d.pop("bits"))

        importance = d.pop("importance")

        index = d.pop("index")

        name = d.pop("name")

        params = d.pop("params")

        scores = LayerOutScores.from_dict(d.pop("scores"))

        sensitivity = d.pop("sensitivity")

        _linears = d.pop("linears", UNSET)
        linears: list[LinearOut] | Unset = UNSET
        if _linears is not UNSET:
            linears = []
            for linears_item_data in _linears:
                linears_item = LinearOut.from_dict(linears_item_data)

                linears.append(linears_item)

        def _parse_quant_error(data: object) -> LayerOutQuantErrorType0 | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                quant_error_type_0 = LayerOutQuantErrorType0.from_dict(data)

                return quant_error_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(LayerOutQuantErrorType0 | None | Unset, data)

        quant_error = _parse_quant_error(d.pop("quant_error", UNSET))

        layer_out = cls(
            bits=bits,
            importance=importance,
            index=index,
            name=name,
            params=params,
            scores=scores,
            sensitivity=sensitivity,
            linears=linears,
            quant_error=quant_error,
        )

        layer_out.additional_properties = d
        return layer_out

    @property
    def additional_keys(self) -> list[str]:
        return list(self.additional_properties.keys())

    def __getitem__(self, key: str) -> Any:
        return self.additional_properties[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.additional_properties[key] = value

    def __delitem__(self, key: str) -> None:
        del self.additional_properties[key]

    def __contains__(self, key: str) -> bool:
        return key in self.additional_properties
