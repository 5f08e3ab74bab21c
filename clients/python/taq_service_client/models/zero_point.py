from enum import StrEnum


class ZeroPoint(StrEnum):
    FLOAT = "float"
    INTEGER = "integer"

    def __str__(self) -> str:
        return str(self.value)
