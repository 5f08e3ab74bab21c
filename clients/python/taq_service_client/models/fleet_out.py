from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from attrs import define as _attrs_define
from attrs import field as _attrs_field

if TYPE_CHECKING:
    from ..models.worker_class_out import WorkerClassOut
    from ..models.worker_out import WorkerOut


T = TypeVar("T", bound="FleetOut")


@_attrs_define
class FleetOut:
    """
    Attributes:
        classes (list[WorkerClassOut]):
        workers (list[WorkerOut]):
    """

    classes: list[WorkerClassOut]
    workers: list[WorkerOut]
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        classes = []
        for classes_item_data in self.classes:
            classes_item = classes_item_data.to_dict()
            classes.append(classes_item)

        workers = []
        for workers_item_data in self.workers:
            workers_item = workers_item_data.to_dict()
            workers.append(workers_item)

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "classes": classes,
                "workers": workers,
            }
        )

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        from ..models.worker_class_out import WorkerClassOut  # noqa: PLC0415
        from ..models.worker_out import WorkerOut  # noqa: PLC0415

        d = dict(src_dict)
        classes = []
        _classes = d.pop("classes")
        for classes_item_data in _classes:
            classes_item = WorkerClassOut.from_dict(classes_item_data)

            classes.append(classes_item)

        workers = []
        _workers = d.pop("workers")
        for workers_item_data in _workers:
            workers_item = WorkerOut.from_dict(workers_item_data)

            workers.append(workers_item)

        fleet_out = cls(
            classes=classes,
            workers=workers,
        )

        fleet_out.additional_properties = d
        return fleet_out

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
