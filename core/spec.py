"""The job spec: one typed object stored in the DB, written to the manifest and accepted by the API."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.runtimes import RUNTIMES, spec_problems
from core.scheme import SUPER_FLOAT_BITS, SUPER_GROUP_SIZE, SUPER_SYMMETRIC_BITS, QuantScheme

ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
#: Rows allowed inline in a spec; larger sets go through POST /v1/datasets.
MAX_INLINE_ROWS = 64


class Method(str, Enum):
    taq = "taq"
    taqo = "taqo"
    taqo_gen = "taqo_gen"
    taq_kl = "taq_kl"
    taq_grad = "taq_grad"
    uniform = "uniform"


#: the methods the paper's fixed allocation rule is defined for (taqo_gen uses taqo's rule)
PAPER_METHODS = (Method.taq, Method.taqo, Method.taqo_gen)
#: "'taq', 'taqo' and 'taqo_gen'", for the refusals of allocation "paper"
PAPER_METHODS_TEXT = ", ".join(f"'{m.value}'" for m in PAPER_METHODS[:-1]) + f" and '{PAPER_METHODS[-1].value}'"


class AllocationRule(str, Enum):
    """How a budget becomes bits per layer: `budget` the exact knapsack over the method's
    sensitivities, `paper` the paper's fixed rule; and two task-agnostic controls at the same
    budget (core/controls.py): `error_only` the same knapsack with every sensitivity 1, `random`
    layers raised in a seeded random order."""

    budget = "budget"
    paper = "paper"
    error_only = "error_only"
    random = "random"


class AllocationUnit(str, Enum):
    """What one allocated width covers: a whole transformer `layer` (the default), or each
    `linear` of it separately (q/k/v/o and the MLP projections get their own bits)."""

    layer = "layer"
    linear = "linear"


class ExportFormat(str, Enum):
    hf = "hf"
    gguf = "gguf"


class ZeroPoint(str, Enum):
    """How an asymmetric group stores where its range starts: `integer` a uint8 zero point on the
    code grid (w = scale · (code − zero); every export carries it); `float` an fp16 offset
    (w = scale · code + offset, GGUF's Q4_1/Q5_1 blocks, HQQ) for widths up to 5 bits, exported
    to GGUF only (compressed-tensors and vLLM read integer zero points)."""

    integer = "integer"
    float = "float"


class TargetRuntime(str, Enum):
    """The runtime the artifact must load in (core/runtimes.py): the spec's menu is checked
    against it and the export written in the layout it reads."""

    vllm = "vllm"
    llama_cpp = "llama.cpp"
    transformers = "transformers"


class Quantizer(str, Enum):
    """How a weight is rounded to its grid: `rtn` round-to-nearest per weight; `gptq`
    error-compensating (GPTQ-style) using the Hessian XᵀX of each linear's input on the
    calibration rows (see core/quant/gptq.py)."""

    rtn = "rtn"
    gptq = "gptq"


class CalibrationInputs(str, Enum):
    """What each layer is calibrated on in the layer pass: the full-precision model's activations
    (`fp`), or the outputs of the layers before it already quantized (`quantized`, sequential
    calibration as in llm-compressor's sequential pipeline; the earlier layers are quantized at
    the widest width whose uniform cost fits the smallest budget)."""

    fp = "fp"
    quantized = "quantized"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(_Strict):
    role: str = Field(min_length=1)
    content: str


class CalibrationRow(_Strict):
    """One calibration / eval row: a `prompt` or chat `messages`, optional gold `answers`."""

    prompt: str | None = None
    messages: list[Message] | None = None
    answers: list[str] | None = None

    @model_validator(mode="after")
    def _exactly_one_input(self) -> CalibrationRow:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a row needs exactly one of 'prompt' or 'messages'")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("'prompt' is empty")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' is empty")
        if self.answers is not None and not any(a.strip() for a in self.answers):
            raise ValueError("'answers' has no non-empty answer")
        return self


#: budgets one job may sweep: each budget is exported in full (hf and/or gguf) and counted by the
#: preflight and the disk estimate
MAX_BUDGETS = 8


class BitBudget(_Strict):
    """Effective-bits ceiling; a list runs a budget sweep (one artifact set per budget)."""

    avg_bits: float | list[float]

    @field_validator("avg_bits")
    @classmethod
    def _sane(cls, value: float | list[float]) -> float | list[float]:
        values = value if isinstance(value, list) else [value]
        if not values:
            raise ValueError("avg_bits list is empty")
        for v in values:
            if not 1.0 < v <= 32.0:
                raise ValueError(f"avg_bits {v} is outside (1, 32]")
        if isinstance(value, list):
            if len(values) > MAX_BUDGETS:
                raise ValueError(
                    f"avg_bits lists at most {MAX_BUDGETS} budgets (each is a full export), "
                    f"got {len(values)}; run several jobs for a wider sweep"
                )
            rounded = [round(v, 2) for v in values]
            if len(set(rounded)) != len(rounded):
                raise ValueError(
                    "avg_bits list has budgets closer than 0.01 bit (duplicates after rounding "
                    "to 0.01); give distinct budgets"
                )
            return sorted(values)
        return value

    @property
    def budgets(self) -> list[float]:
        return list(self.avg_bits) if isinstance(self.avg_bits, list) else [self.avg_bits]


class JobSpec(_Strict):
    model: str = Field(min_length=1, max_length=256)
    method: Method = Method.taq
    calibration_dataset_id: str | None = None
    calibration: list[CalibrationRow] | None = Field(default=None, max_length=MAX_INLINE_ROWS)
    bit_budget: BitBudget | None = None
    bit_choices: list[int] = Field(default_factory=lambda: [4, 8, 16])
    group_size: int = Field(default=128, ge=8, le=4096)
    #: widths stored in groups of their own size, e.g. {"8": 128} with group_size 32: 8-bit weights in
    #: groups of 128, the other widths in groups of 32 (widths from bit_choices, below 16)
    group_size_by_bits: dict[int, Annotated[int, Field(ge=8, le=4096)]] = Field(default_factory=dict)
    symmetric: bool = False
    #: asymmetric grids only; `float` exports to GGUF only, and `exports` defaults to it then
    zero_point: ZeroPoint = ZeroPoint.integer
    #: groups of 32: with zero_point `float` 4- and 5-bit weights whose input dim is a multiple of 256
    #: are stored as GGUF Q4_K / Q5_K super-blocks (4.5 / 5.5 bits a weight, not 5.0 / 6.0); with
    #: `symmetric` 6-bit ones as Q6_K (6.5625 bits, not Q8_0's 8.5)
    k_quants: bool = False
    allocation: AllocationRule = AllocationRule.budget
    allocation_unit: AllocationUnit = AllocationUnit.layer
    exports: list[ExportFormat] = Field(default_factory=lambda: [ExportFormat.hf])
    #: None: no restriction (every width, the `auto` HF layout). When set and `exports` is not
    #: given, exports default to the runtime's format (llama.cpp: gguf)
    target_runtime: TargetRuntime | None = None
    eval_dataset_id: str | None = None
    eval_fraction: float | None = Field(default=None, gt=0.0, lt=1.0)
    profile_from_job_id: str | None = None
    max_tokens: int = Field(default=256, ge=8, le=8192)
    max_calibration_rows: int = Field(default=256, ge=1, le=4096)
    reservoir_size: int = Field(default=256, ge=8, le=4096)
    clip_search: bool = False
    quantizer: Quantizer = Quantizer.rtn
    calibration_inputs: CalibrationInputs = CalibrationInputs.fp
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    #: evaluate the task-agnostic controls at each budget next to the method (uniform at equal
    #: bits, error_only, random; see docs/SERVICE.md "Evaluation") when the job evaluates
    eval_controls: bool = True
    #: hold back a quarter of the calibration rows with answers and ship, per budget, whichever of
    #: the method's allocation, uniform at equal bits and error_only measures the lowest
    #: gold-answer NLL on them (core/closed_loop.py)
    closed_loop: bool = False
    #: run only on workers of this class (the deployment's TAQ_WORKER_CLASSES); None: the service
    #: picks the smallest class whose memory holds the job
    worker_class: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")

    @field_validator("bit_choices")
    @classmethod
    def _bits(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("bit_choices is empty")
        bad = sorted(set(value) - set(ALLOWED_BITS))
        if bad:
            raise ValueError(f"bit_choices {bad} not allowed; choose from {list(ALLOWED_BITS)}")
        return sorted(set(value))

    @field_validator("exports")
    @classmethod
    def _exports(cls, value: list[ExportFormat]) -> list[ExportFormat]:
        return sorted(set(value), key=lambda f: f.value)

    @model_validator(mode="after")
    def _cross_field(self) -> JobSpec:
        has_calibration = self.calibration_dataset_id is not None or self.calibration is not None
        if self.calibration_dataset_id is not None and self.calibration is not None:
            raise ValueError("give either 'calibration_dataset_id' or inline 'calibration', not both")
        if self.method != Method.uniform and not has_calibration and self.profile_from_job_id is None:
            raise ValueError(
                f"method '{self.method.value}' needs calibration data "
                "('calibration_dataset_id' or inline 'calibration')"
            )
        if self.quantizer == Quantizer.gptq and not has_calibration:
            # also with profile_from_job_id: a reused profile has no activations, and GPTQ needs
            # the Hessians of every linear's input on this job's calibration rows
            raise ValueError(
                "quantizer 'gptq' needs calibration data ('calibration_dataset_id' or "
                "inline 'calibration'), also when the profile is reused"
            )
        if self.allocation != AllocationRule.paper and self.bit_budget is None:
            raise ValueError(f"allocation '{self.allocation.value}' needs 'bit_budget'")
        if self.closed_loop and (self.method == Method.uniform or self.allocation != AllocationRule.budget):
            raise ValueError(
                "closed_loop checks a method's budget allocation: use allocation 'budget' and a "
                "method other than 'uniform'"
            )
        if self.closed_loop and self.profile_from_job_id is not None:
            raise ValueError(
                "closed_loop measures codes of the job's own layer pass; it cannot reuse a profile "
                "(profile_from_job_id)"
            )
        if self.allocation == AllocationRule.paper and self.method not in PAPER_METHODS:
            raise ValueError(f"allocation 'paper' is defined for methods {PAPER_METHODS_TEXT} only")
        if self.allocation == AllocationRule.paper and self.allocation_unit == AllocationUnit.linear:
            raise ValueError(
                "allocation 'paper' assigns bits to whole layers; use allocation_unit 'layer' or allocation 'budget'"
            )
        if self.eval_fraction is not None and self.eval_dataset_id is not None:
            raise ValueError("give either 'eval_dataset_id' or 'eval_fraction', not both")
        odd = sorted(b for b in self.group_size_by_bits if b not in self.bit_choices or b >= 16)
        if odd:
            raise ValueError(
                f"group_size_by_bits names widths {odd} that bit_choices {self.bit_choices} does not quantize; "
                "list only widths from bit_choices below 16"
            )
        if self.target_runtime is not None:
            runtime = self.target_runtime.value
            if "exports" not in self.model_fields_set:
                self.exports = [ExportFormat(RUNTIMES[runtime].export)]
            problems = spec_problems(
                runtime,
                bit_choices=self.bit_choices,
                group_sizes=self.group_sizes,
                exports=[f.value for f in self.exports],
                k_quant_widths=self.k_quant_widths,
            )
            if problems:
                raise ValueError("; ".join(problems))
        self._check_zero_point()
        self._check_k_quants()
        return self

    def _check_zero_point(self) -> None:
        if self.zero_point != ZeroPoint.float:
            return
        if self.symmetric:
            raise ValueError("zero_point 'float' is for asymmetric grids; set symmetric false or zero_point 'integer'")
        if "exports" not in self.model_fields_set and self.target_runtime is None:
            self.exports = [ExportFormat.gguf]
        if ExportFormat.hf in self.exports:
            raise ValueError(
                "zero_point 'float' is carried only by the GGUF export (Q4_1/Q5_1 blocks); "
                "compressed-tensors and vLLM read integer zero points: set exports ['gguf'] or "
                "zero_point 'integer'"
            )

    def _check_k_quants(self) -> None:
        if not self.k_quants:
            return
        if self.zero_point != ZeroPoint.float and not self.symmetric:
            raise ValueError(
                "k_quants stores GGUF super-blocks of float zero points (Q4_K/Q5_K) or of a symmetric grid "
                "(Q6_K): set zero_point 'float' or symmetric true"
            )
        kinds = SUPER_SYMMETRIC_BITS if self.symmetric else SUPER_FLOAT_BITS
        widths = [b for b in self.bit_choices if b in kinds]
        if not widths:
            raise ValueError(
                f"k_quants applies to {' and '.join(map(str, kinds))}-bit weights on this grid; "
                f"bit_choices {self.bit_choices} has none"
            )
        odd = [b for b in widths if self.scheme.group_size_at(b) != SUPER_GROUP_SIZE]
        if odd:
            raise ValueError(
                f"k_quants needs groups of {SUPER_GROUP_SIZE} at {odd} bits (a super-block's sub-blocks): "
                f"set group_size {SUPER_GROUP_SIZE} (group_size_by_bits may give other widths other sizes)"
            )

    @property
    def float_zero(self) -> bool:
        """Asymmetric widths up to 5 bits store a float zero point (`zero_point: "float"`)."""
        return self.zero_point == ZeroPoint.float

    @property
    def scheme(self) -> QuantScheme:
        """The grid the job's widths are stored on and priced by."""
        return QuantScheme(
            self.group_size,
            self.symmetric,
            self.float_zero,
            tuple(self.group_size_by_bits.items()),
            # validators read `scheme` before `_check_k_quants` names the fix for a k_quants
            # without its grid; until then the scheme leaves super-blocks off
            k_quants=self.k_quants and (self.float_zero or self.symmetric),
        )

    @property
    def k_quant_widths(self) -> list[int]:
        """The widths of `bit_choices` stored in K-quant super-blocks where a linear's shape allows."""
        return [b for b in self.bit_choices if b < 16 and self.scheme.superblocks_at(b)]

    @property
    def group_sizes(self) -> list[int]:
        """The group sizes a runtime must accept: those of the quantized widths (`group_size` when
        every width is 16, as before per-width sizes existed)."""
        return self.scheme.group_sizes(self.bit_choices) or [self.group_size]

    @property
    def budgets(self) -> list[float]:
        return self.bit_budget.budgets if self.bit_budget is not None else []
