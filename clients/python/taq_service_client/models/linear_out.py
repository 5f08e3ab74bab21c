from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..types import UNSET, Unset

if TYPE_CHECKING:
    from ..models.linear_out_quant_error import LinearOutQuantError


T = TypeVar("T", bound="LinearOut")


@_attrs_define
class LinearOut:
    """One linear of a layer: its relative output error per width and, under per-linear
    allocation, its bits.

        Attributes:
            name (str):
            params (int):
            quant_error (LinearOutQuantError):
            bits (int | None | Unset):
    """

    name: str
    params: int
    quant_error: LinearOutQuantError
    bits: int | None | Unset = UNSET
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        name = self.name

        params = self.params

        quant_error = self.quant_error.to_dict()

        bits: int | None | Unset
        if isinstance(self.bits, Unset):
            bits = UNSET
        else:
            bits = self.bits

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "name": name,
                "params": params,
                "quant_error": quant_error,
            }
        )
        if bits is not UNSET:
            field_dict["bits"] = bits

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        from ..models.linear_out_quant_error import LinearOutQuantError  # noqa: PLC0415

        d = dict(src_dict)
        name = d.pop("name")

        params = d.pop("params")

        quant_error = LinearOutQuantError.from_dict(d.pop("quant_error"))

        def _parse_bits(data: object) -> int | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(int | None | Unset, data)

        bits = _parse_bits(d.pop("bits", UNSET))

        linear_out = cls(
            name=name,
            params=params,
            quant_error=quant_error,
            bits=bits,
        )

        linear_out.additional_properties = d
        return linear_out

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
