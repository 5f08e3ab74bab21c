from enum import StrEnum


class TargetRuntime(StrEnum):
    LLAMA_CPP = "llama.cpp"
    TRANSFORMERS = "transformers"
    VLLM = "vllm"

    def __str__(self) -> str:
        return str(self.value)
