from enum import StrEnum


class AllocationRule(StrEnum):
    BUDGET = "budget"
    ERROR_ONLY = "error_only"
    PAPER = "paper"
    RANDOM = "random"

    def __str__(self) -> str:
        return str(self.value)
