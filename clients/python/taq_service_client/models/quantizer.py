from enum import StrEnum


class Quantizer(StrEnum):
    GPTQ = "gptq"
    RTN = "rtn"

    def __str__(self) -> str:
        return str(self.value)
