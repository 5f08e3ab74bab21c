"""GGML block encoders (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1) for our group grid, exact wherever the block
format allows.

Block formats (32 weights a block, rows are output channels, blocks run along the input dim):

| type | bytes | layout | weight |
|---|---|---|---|
| Q8_0 | 34 | fp16 d, 32 x int8 q | d * q |
| Q4_0 | 18 | fp16 d, 16 bytes: low nibble = weight j, high nibble = weight j + 16 | d * (q - 8) |
| Q4_1 | 20 | fp16 d, fp16 m, 16 bytes as Q4_0 | d * q + m |
| Q5_0 | 22 | fp16 d, uint32 qh (bit j = 5th bit of weight j), 16 bytes of low nibbles as Q4_0 | d * (q - 16) |
| Q5_1 | 24 | fp16 d, fp16 m, qh and low nibbles as Q5_0 | d * q + m |

When `group_size` is a multiple of 32 every block lies inside one of our groups, so with
d = scale:
- symmetric b <= 4 (5) bits -> Q4_0 (Q5_0), q = code - zero + 8 (16): exact (zero is the constant
  2**(b-1));
- asymmetric b <= 4 (5) bits -> Q4_1 (Q5_1), q = code - k, m = scale * (k - zero) for an integer
  offset k that keeps q in [0, 15] ([0, 31]). m is stored in fp16, so the block is exact when
  scale * (k - zero) is representable; among the admissible k we take the one whose m rounds least
  (k = zero, m = 0 and power-of-two multiples are always exact). Otherwise the block is off by
  < half an fp16 ulp of m;
- a float zero point (`zero_point: "float"`, b <= 5 bits) -> Q4_1 (Q5_1) with d = scale,
  m = offset, q = code: always exact (it is the block's own parametrisation);
- 6, 7 and 8 bits -> Q8_0, q = code - zero: exact when it fits int8 (always for symmetric and for
  6/7 bits; GGML has no plain 6/7-bit block, so those widths are stored at 8.5 bits), otherwise the
  block is requantized from its dequantized values.
Any other grid (group size not a multiple of 32) is requantized from the dequantized weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from core.types import QuantizedWeight

BLOCK = 32
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 = "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"
BLOCK_BYTES = {Q8_0: 34, Q4_0: 18, Q4_1: 20, Q5_0: 22, Q5_1: 24}
#: the largest level q of each 4/5-bit block type (q in [0, levels]; the symmetric ones centre at (levels + 1) / 2)
_LEVELS = {Q4_0: 15, Q4_1: 15, Q5_0: 31, Q5_1: 31}


@dataclass(frozen=True)
class EncodedTensor:
    """Raw GGML bytes [rows, n_blocks * block bytes] and how many blocks reproduce our weights exactly."""

    data: np.ndarray
    qtype: str
    exact_blocks: int
    total_blocks: int


def target_type(bits: int, symmetric: bool) -> str:
    """The GGML type a width maps to: 6-8 -> Q8_0, 5 -> Q5_0 / Q5_1, <= 4 -> Q4_0 (symmetric) /
    Q4_1 (asymmetric)."""
    if 6 <= bits <= 8:
        return Q8_0
    if bits == 5:
        return Q5_0 if symmetric else Q5_1
    if 1 <= bits <= 4:
        return Q4_0 if symmetric else Q4_1
    raise ValueError(f"no GGML block type for {bits} bits")


def _half_bytes(x: torch.Tensor) -> np.ndarray:
    """float16 little-endian bytes [..., 2]."""
    arr = x.to(torch.float16).numpy().astype("<f2")
    return arr.view(np.uint8).reshape(*arr.shape, 2)


def _nibbles(q: torch.Tensor) -> np.ndarray:
    """[..., 32] uint8 values in [0, 15] -> [..., 16] bytes, weight j low nibble, weight j + 16 high."""
    return (q[..., :16] | (q[..., 16:] << 4)).numpy()


def pack_q8_0(q: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    rows, nb, _ = q.shape
    out = np.empty((rows, nb, 34), dtype=np.uint8)
    out[..., :2] = _half_bytes(d)
    out[..., 2:] = q.to(torch.int8).numpy().view(np.uint8)
    return out.reshape(rows, nb * 34)


def _high_bits(q: torch.Tensor) -> np.ndarray:
    """[..., 32] values in [0, 31] -> [..., 4] bytes: the little-endian uint32 whose bit j is bit 4
    of weight j."""
    q = q.to(torch.int64)
    word = (((q >> 4) & 1) << torch.arange(BLOCK, dtype=torch.int64)).sum(dim=-1, keepdim=True)
    return ((word >> (torch.arange(4, dtype=torch.int64) * 8)) & 0xFF).to(torch.uint8).numpy()


def pack_blocks(qtype: str, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> np.ndarray:
    """Q4_0 / Q4_1 / Q5_0 / Q5_1 blocks [rows, n_blocks * block bytes] from levels q [rows, nb, 32]
    (any integer or integral float dtype) and fp16 d (and m for the offset types), fields in the
    block's order: d, m, qh (5-bit), nibbles; each written once into the output."""
    rows, nb, _ = q.shape
    if qtype in (Q4_1, Q5_1) and m is None:
        raise ValueError(f"{qtype} blocks carry a minimum m")
    levels = q if q.dtype == torch.uint8 else q.to(torch.uint8)
    out = np.empty((rows, nb, BLOCK_BYTES[qtype]), dtype=np.uint8)
    out[..., :2] = _half_bytes(d)
    at = 2
    if qtype in (Q4_1, Q5_1):
        assert m is not None
        out[..., 2:4] = _half_bytes(m)
        at = 4
    if qtype in (Q5_0, Q5_1):
        out[..., at : at + 4] = _high_bits(levels)
        at += 4
        levels = levels & 0xF
    out[..., at:] = _nibbles(levels)
    return out.reshape(rows, nb * BLOCK_BYTES[qtype])


# ---------------------------------------------------------------------------------------------
# Requantization of float weights (the fallback); same rules as llama.cpp's reference quantizers,
# except that codes are computed with the fp16-rounded d that is stored.
# ---------------------------------------------------------------------------------------------


def _safe_div(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    d = d.to(torch.float32)
    return torch.where(d != 0, x / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(x))


def requant_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, nb, 32] float32 -> (int q, fp16 d)."""
    d = (x.abs().amax(dim=-1) / 127.0).to(torch.float16)
    q = torch.round(_safe_div(x, d.unsqueeze(-1))).clamp(-128, 127)
    return q, d


def requant_symmetric(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 (levels 15) / Q5_0 (31): the value of largest magnitude gets code 0 (d may be
    negative), as llama.cpp does."""
    half = (levels + 1) // 2
    lo, hi = x.amin(dim=-1), x.amax(dim=-1)
    m = torch.where(-lo >= hi, lo, hi)
    d = (m / -float(half)).to(torch.float16)
    q = (torch.round(_safe_div(x, d.unsqueeze(-1))) + half).clamp(0, levels)
    return q, d


def requant_offset(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 (levels 15) / Q5_1 (31): d = range / levels, m = the block's minimum."""
    lo, hi = x.amin(dim=-1), x.amax(dim=-1)
    d = ((hi - lo) / float(levels)).to(torch.float16)
    m = lo.to(torch.float16)
    q = torch.round(_safe_div(x - m.to(torch.float32).unsqueeze(-1), d.unsqueeze(-1))).clamp(0, levels)
    return q, d, m


def requantize(x: torch.Tensor, qtype: str) -> EncodedTensor:
    """Encode a float [rows, cols] weight (cols a multiple of 32) into `qtype` blocks."""
    rows, cols = x.shape
    blocks = x.detach().to(torch.float32).reshape(rows, cols // BLOCK, BLOCK)
    if qtype == Q8_0:
        data = pack_q8_0(*requant_q8_0(blocks))
    elif qtype in (Q4_0, Q5_0):
        data = pack_blocks(qtype, *requant_symmetric(blocks, _LEVELS[qtype]))
    else:
        data = pack_blocks(qtype, *requant_offset(blocks, _LEVELS[qtype]))
    return EncodedTensor(data=data, qtype=qtype, exact_blocks=0, total_blocks=rows * (cols // BLOCK))


# ---------------------------------------------------------------------------------------------
# Exact mapping of our grid
# ---------------------------------------------------------------------------------------------


def _blocks(q: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes [rows, nb, 32] (no wider copy: levels are formed in uint8 by `_shifted`) and
    the group index of each block [nb]."""
    rows, cols = q.shape
    nb = cols // BLOCK
    return q.codes[:, :cols].reshape(rows, nb, BLOCK), torch.arange(nb) * BLOCK // q.group_size


def _block_params(q: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 codes [rows, nb, 32] and each block's scale (float32 of the fp16) and zero [rows, nb] (int16)."""
    codes, group_of_block = _blocks(q)
    scale = q.scale.to(torch.float32)[:, group_of_block]
    zero = q.zero_points().to(torch.int16)[:, group_of_block]
    return codes, scale, zero


def _code_range(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's smallest and largest code [rows, nb] (int16)."""
    return codes.amin(dim=-1).to(torch.int16), codes.amax(dim=-1).to(torch.int16)


def _shifted(codes: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """codes - k per block in uint8 arithmetic, i.e. modulo 256: exact wherever the true value lies
    in [0, 255] (as uint8) or, viewed as int8, in [-128, 127]."""
    return codes + (-k).to(torch.uint8).unsqueeze(-1)


def _exact_symmetric(q: QuantizedWeight, qtype: str) -> EncodedTensor:
    codes, scale, zero = _block_params(q)
    # levels code - zero + 8 (16): in [0, 15] ([0, 31]) for b <= 4 (5)
    levels = _shifted(codes, zero - (_LEVELS[qtype] + 1) // 2)
    data = pack_blocks(qtype, levels, scale.to(torch.float16))
    n = codes.shape[0] * codes.shape[1]
    return EncodedTensor(data=data, qtype=qtype, exact_blocks=n, total_blocks=n)


def _float_offset(q: QuantizedWeight, qtype: str) -> EncodedTensor:
    """A float zero point maps 1:1: d = scale, m = offset, q = code (always exact)."""
    assert q.offset is not None
    codes, group_of_block = _blocks(q)
    scale = q.scale.to(torch.float16)[:, group_of_block]
    offset = q.offset.to(torch.float16)[:, group_of_block]
    data = pack_blocks(qtype, codes.cpu(), scale.cpu(), offset.cpu())
    n = codes.shape[0] * codes.shape[1]
    return EncodedTensor(data=data, qtype=qtype, exact_blocks=n, total_blocks=n)


def _exact_offset(q: QuantizedWeight, qtype: str) -> EncodedTensor:
    if q.offset is not None:
        return _float_offset(q, qtype)
    codes, scale, zero = _block_params(q)
    cmin, cmax = _code_range(codes)
    top = _LEVELS[qtype]
    # candidate offsets k = cmin - t are admissible while the largest code still fits in [0, top],
    # i.e. t <= slack; only t up to the largest slack of any block need be tried (blocks usually
    # span most of the range, so that is a few candidates, not top + 1)
    slack = top - (cmax - cmin)
    t = torch.arange(int(slack.max()) + 1)
    k = cmin.unsqueeze(-1) - t.to(torch.int16)
    admissible = t <= slack.unsqueeze(-1)
    # float32 is exact here: an fp16 scale (11 significant bits) times |k - zero| < 2**6 needs at
    # most 17 bits, and its distance to the nearest fp16 at most as many
    m_true = scale.unsqueeze(-1) * (k - zero.unsqueeze(-1)).to(torch.float32)
    m16 = m_true.to(torch.float16)
    err = (m16.to(torch.float32) - m_true).abs()
    err = torch.where(admissible, err, torch.full_like(err, float("inf")))
    best = err.argmin(dim=-1, keepdim=True)  # ties: the first, i.e. the largest admissible k
    k_best = k.gather(-1, best).squeeze(-1)
    m_best = m16.gather(-1, best).squeeze(-1)
    exact = err.gather(-1, best).squeeze(-1) == 0
    data = pack_blocks(qtype, _shifted(codes, k_best), scale.to(torch.float16), m_best)
    return EncodedTensor(data=data, qtype=qtype, exact_blocks=int(exact.sum()), total_blocks=exact.numel())


def _exact_q8_0(q: QuantizedWeight) -> EncodedTensor:
    codes, scale, zero = _block_params(q)
    cmin, cmax = _code_range(codes)
    fits = (cmin - zero >= -128) & (cmax - zero <= 127)
    levels = _shifted(codes, zero).view(torch.int8)  # code - zero where it fits int8
    d = scale.to(torch.float16)
    if not bool(fits.all()):
        # asymmetric 8-bit blocks spanning more than int8: requantize just those blocks
        where = (~fits).nonzero(as_tuple=True)
        values = (codes[where].to(torch.int16) - zero[where].unsqueeze(-1)).to(torch.float32)
        rq, rd = requant_q8_0(values * scale[where].unsqueeze(-1))
        levels[where] = rq.to(torch.int8)
        d[where] = rd
    data = pack_q8_0(levels, d)
    return EncodedTensor(data=data, qtype=Q8_0, exact_blocks=int(fits.sum()), total_blocks=fits.numel())


def exact_grid(q: QuantizedWeight) -> bool:
    """True when every 32-block lies inside one of our groups (group size a multiple of 32)."""
    return q.group_size % BLOCK == 0 and q.shape[1] % BLOCK == 0


def encode_quantized(q: QuantizedWeight) -> EncodedTensor:
    """Our quantized weight as GGML blocks of its target type; `q.shape[1]` must be a multiple of 32."""
    from core.quant.primitives import dequantize_weight

    if q.shape[1] % BLOCK != 0:
        raise ValueError(f"in_features {q.shape[1]} is not a multiple of {BLOCK}")
    qtype = target_type(q.bits, q.symmetric)
    if not exact_grid(q):
        return requantize(dequantize_weight(q, torch.float32), qtype)
    if qtype in (Q4_0, Q5_0):
        return _exact_symmetric(q, qtype)
    if qtype in (Q4_1, Q5_1):
        return _exact_offset(q, qtype)
    return _exact_q8_0(q)
