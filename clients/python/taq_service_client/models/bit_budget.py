from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, cast

from attrs import define as _attrs_define

T = TypeVar("T", bound="BitBudget")


@_attrs_define
class BitBudget:
    """Effective-bits ceiling; a list runs a budget sweep (one artifact set per budget).

    Attributes:
        avg_bits (float | list[float]):
    """

    avg_bits: float | list[float]

    def to_dict(self) -> dict[str, Any]:
        avg_bits: float | list[float]
        if isinstance(self.avg_bits, list):
            avg_bits = self.avg_bits

        else:
            avg_bits = self.avg_bits

        field_dict: dict[str, Any] = {}

        field_dict.update(
            {
                "avg_bits": avg_bits,
            }
        )

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        d = dict(src_dict)

        def _parse_avg_bits(data: object) -> float | list[float]:
            try:
                if not isinstance(data, list):
                    raise TypeError()
                avg_bits_type_1 = cast(list[float], data)

                return avg_bits_type_1
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(float | list[float], data)

        avg_bits = _parse_avg_bits(d.pop("avg_bits"))

        bit_budget = cls(
            avg_bits=avg_bits,
        )

        return bit_budget
