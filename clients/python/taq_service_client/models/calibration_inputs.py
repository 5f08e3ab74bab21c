from enum import StrEnum


class CalibrationInputs(StrEnum):
    FP = "fp"
    QUANTIZED = "quantized"

    def __str__(self) -> str:
        return str(self.value)
