from enum import StrEnum


class AllocationRule(StrEnum):
    BUDGET = "budget"
    PAPER = "paper"

    def __str__(self) -> str:
        return str(self.value)
