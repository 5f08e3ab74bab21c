"""How much object storage a job writes, from the model's shapes and the spec alone (the disk
side of the memory preflight): the layer pass's checkpoints (every linear's codes at every width
below 16, kept until the job succeeds) and every budget's export in every format."""

from __future__ import annotations

from dataclasses import dataclass

from core.model_dims import ModelDims

#: per group: a float16 scale and a zero point stored in a byte (an upper bound for both formats)
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


def estimate_job_disk(
    dims: ModelDims, *, bit_choices: list[int], group_size: int, budgets: list[float], formats: int
) -> DiskEstimate:
    """Bytes a job stores: the checkpoints of the layer pass plus, per budget and export format,
    the quantized linears at the budget's effective bits (the largest choice when the budget is
    unknown: the paper rule) and the rest of the model in float16."""
    linear = dims.linear_parameters
    groups = -(-linear // group_size)
    widths = [b for b in bit_choices if b < 16]
    checkpoint = sum(linear * b // 8 + groups * _GROUP_BYTES for b in widths)
    rest = max(0, dims.parameters - linear) * _FLOAT_BYTES
    per_budget = [linear * min(float(max(bit_choices)), b) / 8 for b in budgets] or [
        linear * max(bit_choices) / 8 + groups * _GROUP_BYTES
    ]
    export = int(sum(p + rest for p in per_budget)) * max(1, formats)
    return DiskEstimate(checkpoint_bytes=int(checkpoint), export_bytes=export)
