from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any, TypeVar, cast

from attrs import define as _attrs_define
from attrs import field as _attrs_field

T = TypeVar("T", bound="WorkerOut")


@_attrs_define
class WorkerOut:
    """
    Attributes:
        device (str):
        heartbeat_at (datetime.datetime):
        job_id (None | str): the job it is running now; null when idle
        memory_bytes (int | None): memory one job may use on this worker (its class's)
        name (str): host:pid of the worker process
        started_at (datetime.datetime):
        worker_class (str):
    """

    device: str
    heartbeat_at: datetime.datetime
    job_id: None | str
    memory_bytes: int | None
    name: str
    started_at: datetime.datetime
    worker_class: str
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        device = self.device

        heartbeat_at = self.heartbeat_at.isoformat()

        job_id: None | str
        job_id = self.job_id

        memory_bytes: int | None
        memory_bytes = self.memory_bytes

        name = self.name

        started_at = self.started_at.isoformat()

        worker_class = self.worker_class

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "device": device,
                "heartbeat_at": heartbeat_at,
                "job_id": job_id,
                "memory_bytes": memory_bytes,
                "name": name,
                "started_at": started_at,
                "worker_class": worker_class,
            }
        )

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        d = dict(src_dict)
        device = d.pop("device")

        heartbeat_at = datetime.datetime.fromisoformat(d.pop("heartbeat_at"))

        def _parse_job_id(data: object) -> None | str:
            if data is None:
                return data
            return cast(None | str, data)

        job_id = _parse_job_id(d.pop("job_id"))

        def _parse_memory_bytes(data: object) -> int | None:
            if data is None:
                return data
            return cast(int | None, data)

        memory_bytes = _parse_memory_bytes(d.pop("memory_bytes"))

        name = d.pop("name")

        started_at = datetime.datetime.fromisoformat(d.pop("started_at"))

        worker_class = d.pop("worker_class")

        worker_out = cls(
            device=device,
            heartbeat_at=heartbeat_at,
            job_id=job_id,
            memory_bytes=memory_bytes,
            name=name,
            started_at=started_at,
            worker_class=worker_class,
        )

        worker_out.additional_properties = d
        return worker_out

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
