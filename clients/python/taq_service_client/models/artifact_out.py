from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..models.artifact_out_kind import ArtifactOutKind
from ..types import UNSET, Unset

if TYPE_CHECKING:
    from ..models.artifact_file_out import ArtifactFileOut


T = TypeVar("T", bound="ArtifactOut")


@_attrs_define
class ArtifactOut:
    """
    Attributes:
        format_ (str):
        name (str):
        sha256 (str): of the download; for a directory, of its .tar
        size (int): bytes; for a directory, the size of its .tar download
        files (list[ArtifactFileOut] | None | Unset):
        kind (ArtifactOutKind | Unset):  Default: ArtifactOutKind.FILE.
    """

    format_: str
    name: str
    sha256: str
    size: int
    files: list[ArtifactFileOut] | None | Unset = UNSET
    kind: ArtifactOutKind | Unset = ArtifactOutKind.FILE
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        format_ = self.format_

        name = self.name

        sha256 = self.sha256

        size = self.size

        files: list[dict[str, Any]] | None | Unset
        if isinstance(self.files, Unset):
            files = UNSET
        elif isinstance(self.files, list):
            files = []
            for files_type_0_item_data in self.files:
                files_type_0_item = files_type_0_item_data.to_dict()
                files.append(files_type_0_item)

        else:
            files = self.files

        kind: str | Unset = UNSET
        if not isinstance(self.kind, Unset):
            kind = self.kind.value

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "format": format_,
                "name": name,
                "sha256": sha256,
                "size": size,
            }
        )
        if files is not UNSET:
            field_dict["files"] = files
        if kind is not UNSET:
            field_dict["kind"] = kind

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        from ..models.artifact_file_out import ArtifactFileOut  # noqa: PLC0415

        d = dict(src_dict)
        format_ = d.pop("format")

        name = d.pop("name")

        sha256 = d.pop("sha256")

        size = d.pop("size")

        def _parse_files(data: object) -> list[ArtifactFileOut] | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, list):
                    raise TypeError()
                files_type_0 = []
                _files_type_0 = data
                for files_type_0_item_data in _files_type_0:
                    files_type_0_item = ArtifactFileOut.from_dict(files_type_0_item_data)

                    files_type_0.append(files_type_0_item)

                return files_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(list[ArtifactFileOut] | None | Unset, data)

        files = _parse_files(d.pop("files", UNSET))

        _kind = d.pop("kind", UNSET)
        kind: ArtifactOutKind | Unset
        if isinstance(_kind, Unset):
            kind = UNSET
        else:
            kind = ArtifactOutKind(_kind)

        artifact_out = cls(
            format_=format_,
            name=name,
            sha256=sha256,
            size=size,
            files=files,
            kind=kind,
        )

        artifact_out.additional_properties = d
        return artifact_out

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
