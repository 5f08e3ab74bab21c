from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

from attrs import define as _attrs_define
from attrs import field as _attrs_field

if TYPE_CHECKING:
    from ..models.event_out_data_type_0 import EventOutDataType0


T = TypeVar("T", bound="EventOut")


@_attrs_define
class EventOut:
    """
    Attributes:
        created_at (datetime.datetime):
        data (EventOutDataType0 | None):
        id (int):
        job_id (str):
        kind (str): status | stage | progress | info
        message (None | str):
        progress (float | None):
        stage (None | str):
        status (None | str):
    """

    created_at: datetime.datetime
    data: EventOutDataType0 | None
    id: int
    job_id: str
    kind: str
    message: None | str
    progress: float | None
    stage: None | str
    status: None | str
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from ..models.event_out_data_type_0 import EventOutDataType0  # noqa: PLC0415

        created_at = self.created_at.isoformat()

        data: dict[str, Any] | None
        if isinstance(self.data, EventOutDataType0):
            data = self.data.to_dict()
        else:
            data = self.data

        id = self.id

        job_id = self.job_id

        kind = self.kind

        message: None | str
        message = self.message

        progress: float | None
        progress = self.progress

        stage: None | str
        stage = self.stage

        status: None | str
        status = self.status

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "created_at": created_at,
                "data": data,
                "id": id,
                "job_id": job_id,
                "kind": kind,
                "message": message,
                "progress": progress,
                "stage": stage,
                "status": status,
            }
        )

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        from ..models.event_out_data_type_0 import EventOutDataType0  # noqa: PLC0415

        d = dict(src_dict)
        created_at = datetime.datetime.fromisoformat(d.pop("created_at"))

        def _parse_data(data: object) -> EventOutDataType0 | None:
            if data is None:
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                data_type_0 = EventOutDataType0.from_dict(data)

                return data_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(EventOutDataType0 | None, data)

        data = _parse_data(d.pop("data"))

        id = d.pop("id")

        job_id = d.pop("job_id")

        kind = d.pop("kind")

        def _parse_message(data: object) -> None | str:
            if data is None:
                return data
            return cast(None | str, data)

        message = _parse_message(d.pop("message"))

        def _parse_progress(data: object) -> float | None:
            if data is None:
                return data
            return cast(float | None, data)

        progress = _parse_progress(d.pop("progress"))

        def _parse_stage(data: object) -> None | str:
            if data is None:
                return data
            return cast(None | str, data)

        stage = _parse_stage(d.pop("stage"))

        def _parse_status(data: object) -> None | str:
            if data is None:
                return data
            return cast(None | str, data)

        status = _parse_status(d.pop("status"))

        event_out = cls(
            created_at=created_at,
            data=data,
            id=id,
            job_id=job_id,
            kind=kind,
            message=message,
            progress=progress,
            stage=stage,
            status=status,
        )

        event_out.additional_properties = d
        return event_out

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
