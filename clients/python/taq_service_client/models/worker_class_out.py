from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, cast

from attrs import define as _attrs_define
from attrs import field as _attrs_field

T = TypeVar("T", bound="WorkerClassOut")


@_attrs_define
class WorkerClassOut:
    """
    Attributes:
        device (str):
        live_workers (int):
        memory_bytes (int | None):
        name (str):
        queue (str):
        queued_jobs (int):
    """

    device: str
    live_workers: int
    memory_bytes: int | None
    name: str
    queue: str
    queued_jobs: int
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        device = self.device

        live_workers = self.live_workers

        memory_bytes: int | None
        memory_bytes = self.memory_bytes

        name = self.name

        queue = self.queue

        queued_jobs = self.queued_jobs

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "device": device,
                "live_workers": live_workers,
                "memory_bytes": memory_bytes,
                "name": name,
                "queue": queue,
                "queued_jobs": queued_jobs,
            }
        )

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        d = dict(src_dict)
        device = d.pop("device")

        live_workers = d.pop("live_workers")

        def _parse_memory_bytes(data: object) -> int | None:
            if data is None:
                return data
            return cast(int | None, data)

        memory_bytes = _parse_memory_bytes(d.pop("memory_bytes"))

        name = d.pop("name")

        queue = d.pop("queue")

        queued_jobs = d.pop("queued_jobs")

        worker_class_out = cls(
            device=device,
            live_workers=live_workers,
            memory_bytes=memory_bytes,
            name=name,
            queue=queue,
            queued_jobs=queued_jobs,
        )

        worker_class_out.additional_properties = d
        return worker_class_out

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
