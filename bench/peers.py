"""Task-agnostic baselines that spend a bit budget uniformly, for equal-effective-bits comparisons.

Both quantize every decoder linear at 4 bits (asymmetric: an fp16 scale and an int8 zero per
group, as our hf export stores them) and pick the group size that spends the budget: effective
bits = 4 + 24 / group_size for whole groups, so 4.1875 → group 128, 4.375 → 64, 4.75 → 32,
5.5 → 16 (the smallest group whose effective bits do not exceed the budget). `model_effective_bits`
gives the exact figure on a model, padded partial groups counted (SmolLM2's 576 inputs store 5
groups of 128).

* `rtn_matched`: our own round-to-nearest (core.quant.primitives.quantize_weight).
* `hqq`: HQQ (Half-Quadratic Quantization, `pip install hqq`), the third-party peer; it optimises
  scale and zero per group with no calibration data. HQQ groups the flattened weight, so a group
  size that does not divide `in_features` would let groups cross rows: each row is padded to a
  whole number of groups by repeating its own last columns (min/max unchanged), and the padding is
  cut off after dequantization, so every group stays inside one row, as in our format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.models import LoadedModel
from core.quant.primitives import dequantize_weight, quantize_weight
from core.scheme import effective_bits, stored_bits

PEER_BITS = 4
GROUP_SIZES = (128, 64, 32, 16)


@dataclass(frozen=True)
class UniformConfig:
    bits: int
    group_size: int

    @property
    def effective_bits(self) -> float:
        return effective_bits(self.bits, self.group_size, symmetric=False)

    def model_effective_bits(self, loaded: LoadedModel) -> float:
        """Stored bits per weight over the model's decoder linears, padded groups counted."""
        shapes = [tuple(linear.weight.shape) for ref in loaded.layers for linear in ref.linears.values()]
        total = sum(stored_bits(self.bits, self.group_size, False, shape) for shape in shapes)
        return total / sum(o * i for o, i in shapes)


def config_for_budget(avg_bits: float) -> UniformConfig | None:
    """The smallest group (most scale/zero bits) of 4-bit codes whose effective bits fit
    `avg_bits`, i.e. the uniform config that spends the budget; None when even group 128 does not."""
    fitting = [
        UniformConfig(PEER_BITS, g)
        for g in GROUP_SIZES
        if UniformConfig(PEER_BITS, g).effective_bits <= avg_bits + 1e-9
    ]
    return max(fitting, key=lambda c: c.effective_bits) if fitting else None


def rtn_dequantized(weight: torch.Tensor, config: UniformConfig) -> torch.Tensor:
    q = quantize_weight(weight.float(), config.bits, config.group_size, symmetric=False)
    return dequantize_weight(q, dtype=torch.float32)


def hqq_dequantized(weight: torch.Tensor, config: UniformConfig) -> torch.Tensor:
    from hqq.core.quantize import Quantizer

    w = weight.float()
    out_features, in_features = w.shape
    group = config.group_size
    padded = -(-in_features // group) * group
    if padded != in_features:
        extra = padded - in_features
        w = torch.cat([w, w[:, in_features - extra :]], dim=1)
    codes, meta = Quantizer.quantize(
        w,
        nbits=config.bits,
        channel_wise=True,
        group_size=group,
        optimize=True,
        axis=1,
        compute_dtype=torch.float32,
        device=str(w.device),
    )
    return Quantizer.dequantize(codes, meta).reshape(out_features, padded)[:, :in_features].float()


PEERS = {"rtn_matched": rtn_dequantized, "hqq": hqq_dequantized}


def peer_weights(loaded: LoadedModel, peer: str, config: UniformConfig) -> dict[str, torch.Tensor]:
    """Dequantized weights of every decoder linear, keyed by full dotted name."""
    fn = PEERS[peer]
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for ref in loaded.layers:
            for name, linear in ref.linears.items():
                out[name] = fn(linear.weight.detach(), config)
    return out
