"""How much disk a job needs, from the model's shapes and the spec alone (the disk side of the
memory preflight):

* `estimate_job_disk`: the object storage it writes, counted against the tenant's stored bytes at
  submit: the layer pass's checkpoints (every linear's codes at every width below 16, kept until
  the job succeeds) and every budget's export in every format.
* `estimate_work_disk`: what it writes at once under the worker's work directory, checked against
  that disk's free space before the worker runs it: the hidden states the layer pass spills
  (`core.streaming.hidden.SpillArea`: beyond the memory limit; probe-stream methods carry one
  stream per layer), the evaluation's, and one budget's export staged in every format.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from core.memory import ANSWER_TOKENS, calibration_tokens, hidden_streams
from core.model_dims import ModelDims

#: per group: a float16 scale and a zero point stored in a byte (an upper bound for both formats
#: on an integer grid; `group_bytes` gives the others)
_GROUP_BYTES = 3
#: everything that is not a quantized linear (embeddings, norms, head) is exported as float16
_FLOAT_BYTES = 2


@dataclass(frozen=True)
class DiskEstimate:
    checkpoint_bytes: int
    export_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.checkpoint_bytes + self.export_bytes

    def to_dict(self) -> dict[str, int]:
        return {
            "checkpoint_bytes": self.checkpoint_bytes,
            "export_bytes": self.export_bytes,
            "total_bytes": self.total_bytes,
        }


def group_bytes(*, float_zero: bool, k_quants: bool) -> int:
    """Bytes a group's parameters take in the layer checkpoints (core.streaming.checkpoints), at
    most: a float16 scale and a uint8 zero point; a float16 offset instead where zero points are
    float; float32 scale and offset on K-quant super-blocks (d · sc is exact only there)."""
    return 8 if k_quants else 4 if float_zero else _GROUP_BYTES


def estimate_job_disk(
    dims: ModelDims,
    *,
    bit_choices: list[int],
    group_size: int,
    budgets: list[float],
    formats: int,
    group_param_bytes: int = _GROUP_BYTES,
) -> DiskEstimate:
    """Bytes a job stores: the checkpoints of the layer pass plus, per budget and export format,
    the quantized linears at the budget's effective bits (the largest choice when the budget is
    unknown: the paper rule) and the rest of the model in float16. `group_param_bytes`: see
    `group_bytes`."""
    linear = dims.linear_parameters
    groups = -(-linear // group_size)
    widths = [b for b in bit_choices if b < 16]
    checkpoint = sum(linear * b // 8 + groups * group_param_bytes for b in widths)
    export = int(sum(_export_per_budget(dims, bit_choices, group_size, budgets, group_param_bytes))) * max(1, formats)
    return DiskEstimate(checkpoint_bytes=int(checkpoint), export_bytes=export)


def _export_per_budget(
    dims: ModelDims, bit_choices: list[int], group_size: int, budgets: list[float], group_param_bytes: int
) -> list[float]:
    """One format's export of each budget: the quantized linears at the budget's effective bits
    (the largest choice plus its group parameters when the budget is unknown: the paper rule) and
    the rest of the model in float16."""
    linear = dims.linear_parameters
    groups = -(-linear // group_size)
    rest = max(0, dims.parameters - linear) * _FLOAT_BYTES
    per_budget = [linear * min(float(max(bit_choices)), b) / 8 for b in budgets] or [
        linear * max(bit_choices) / 8 + groups * group_param_bytes
    ]
    return [p + rest for p in per_budget]


# ---- the worker's work directory ---------------------------------------------------------------
#: the stages that write under the work directory; "quantize" is the codes-only pass of a reused
#: profile (one stream, as uniform)
WORK_STAGES = frozenset({"score", "quantize", "export", "evaluate"})


def spill_bytes(
    dims: ModelDims,
    *,
    method: str,
    calibration_rows: int,
    max_tokens: int,
    sequential: bool,
    hidden_bytes: int,
    activation_ram_bytes: int,
) -> int:
    """The most the layer pass spills to disk: the input and the output of every hidden stream
    (streams × rows × tokens × hidden size × `hidden_bytes`, twice), when that is more than the
    `activation_ram_bytes` a `SpillArea` keeps in memory; 0 when it all fits (nothing spills).
    Tokens are bounded by `max_tokens` per row (plus the answer for the methods that score it),
    so the bound errs high."""
    tokens = calibration_tokens(method, calibration_rows, max_tokens)
    streams = hidden_streams(method, dims.num_layers, sequential=sequential)  # as core/memory.py counts them
    carried = 2 * streams * tokens * dims.hidden_size * hidden_bytes
    return carried if carried > activation_ram_bytes else 0


@dataclass(frozen=True)
class WorkDiskEstimate:
    """Bytes a job keeps under the worker's work directory, per phase. The phases never overlap
    (a stage removes its files before the next starts), so the need is the largest one."""

    phases: dict[str, int]

    @property
    def total_bytes(self) -> int:
        return max(self.phases.values(), default=0)

    @property
    def phase(self) -> str | None:
        """The phase that needs the most, None when nothing is written."""
        return max(self.phases, key=lambda name: self.phases[name]) if self.total_bytes else None

    def to_dict(self) -> dict[str, object]:
        return {"phases": dict(self.phases), "phase": self.phase, "total_bytes": self.total_bytes}


def estimate_work_disk(
    dims: ModelDims,
    *,
    method: str,
    calibration_rows: int,
    max_tokens: int,
    sequential: bool,
    hidden_bytes: int,
    activation_ram_bytes: int,
    bit_choices: list[int],
    group_size: int,
    budgets: list[float],
    formats: int,
    eval_rows: int = 0,
    group_param_bytes: int = _GROUP_BYTES,
    stages: Collection[str] = WORK_STAGES,
) -> WorkDiskEstimate:
    """What a job writes at once under the work directory, for the `stages` that will run:

    * ``layer pass`` (score; quantize for a reused profile, one stream): `spill_bytes`;
    * ``evaluation``: the variants' streams (full precision and two per budget, prompt and answer
      tokens of every eval row, core/memory.py's evaluation phase) beyond `activation_ram_bytes`;
    * ``export``: the largest budget's export in every format, staged before its upload.

    `hidden_bytes` is the compute dtype's width (4: float32 on CPU, 2: bf16 on CUDA)."""
    unknown = set(stages) - WORK_STAGES
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; known: {sorted(WORK_STAGES)}")
    phases: dict[str, int] = {}
    passes = [method] if "score" in stages else []
    passes += ["uniform"] if "quantize" in stages else []
    if passes:
        phases["layer pass"] = max(
            spill_bytes(
                dims,
                method=m,
                calibration_rows=calibration_rows,
                max_tokens=max_tokens,
                sequential=sequential,
                hidden_bytes=hidden_bytes,
                activation_ram_bytes=activation_ram_bytes,
            )
            for m in passes
        )
    if "evaluate" in stages and eval_rows > 0:
        variants = 1 + 2 * max(1, len(budgets))
        carried = 2 * variants * eval_rows * (max_tokens + ANSWER_TOKENS) * dims.hidden_size * hidden_bytes
        phases["evaluation"] = carried if carried > activation_ram_bytes else 0
    if "export" in stages:
        staged = max(_export_per_budget(dims, bit_choices, group_size, budgets, group_param_bytes)) * max(1, formats)
        phases["export"] = int(staged)
    return WorkDiskEstimate(phases=phases)
