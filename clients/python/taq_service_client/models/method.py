from enum import StrEnum


class Method(StrEnum):
    TAQ = "taq"
    TAQO = "taqo"
    TAQO_GEN = "taqo_gen"
    TAQ_GRAD = "taq_grad"
    TAQ_KL = "taq_kl"
    UNIFORM = "uniform"

    def __str__(self) -> str:
        return str(self.value)
