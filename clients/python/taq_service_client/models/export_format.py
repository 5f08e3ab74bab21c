from enum import StrEnum


class ExportFormat(StrEnum):
    GGUF = "gguf"
    HF = "hf"

    def __str__(self) -> str:
        return str(self.value)
