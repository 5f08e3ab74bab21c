from enum import StrEnum


class AllocationUnit(StrEnum):
    LAYER = "layer"
    LINEAR = "linear"

    def __str__(self) -> str:
        return str(self.value)
