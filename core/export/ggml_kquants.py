"""GGML K-quant encoders (Q4_K, Q5_K) for weights on K-quant super-blocks (`k_quants`,
core/quant/superblocks.py): exact, or refused.

A super-block is 256 weights of a row, eight sub-blocks of 32 (our groups). Layout (llama.cpp's
ggml-common.h; gguf-py's reference decoder is the test oracle):

| type | bytes | fields |
|---|---|---|
| Q4_K | 144 | fp16 d, fp16 dmin, 12 bytes of 6-bit sc/m, 128 bytes of nibbles |
| Q5_K | 176 | fp16 d, fp16 dmin, 12 bytes of 6-bit sc/m, 32 bytes qh, 128 bytes of nibbles |

Sub-block j decodes as d · sc_j · q − dmin · m_j. The 12 scale bytes: bytes 0-3 hold sc_0..3 in
their low 6 bits and the top 2 bits of sc_4..7; bytes 4-7 the same for m; bytes 8-11 hold the low
nibbles of sc_4..7 (low) and m_4..7 (high). Nibbles: byte 32c + l holds weight l of sub-block 2c
(low) and of sub-block 2c + 1 (high). Q5_K's qh[l] bit j is bit 4 of weight l of sub-block j.
"""

from __future__ import annotations

import numpy as np
import torch

from core.export.ggml_blocks import EncodedTensor, _half_bytes
from core.quant.superblocks import GROUPS_PER_SUPER, SuperParams, super_params
from core.scheme import SUPER_BLOCK
from core.types import QuantizedWeight

Q4_K, Q5_K = "Q4_K", "Q5_K"
SUPER_BLOCK_BYTES = {Q4_K: 144, Q5_K: 176}


def super_type(bits: int) -> str:
    """The K-quant type of a super-block width: 4 -> Q4_K, 5 -> Q5_K."""
    if bits == 4:
        return Q4_K
    if bits == 5:
        return Q5_K
    raise ValueError(f"no K-quant super-block type for {bits} bits")


def _scale_bytes(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """[..., 8] 6-bit sub-scales and sub-mins (uint8) -> [..., 12] bytes."""
    low, high = slice(0, 4), slice(4, 8)
    first = sc[..., low] | ((sc[..., high] >> 4) << 6)
    second = m[..., low] | ((m[..., high] >> 4) << 6)
    third = (sc[..., high] & 0xF) | ((m[..., high] & 0xF) << 4)
    return torch.cat([first, second, third], dim=-1)


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[rows, supers, 256] uint8 -> [rows, supers, 128]: sub-blocks 2c (low) and 2c + 1 (high)."""
    rows, supers, _ = codes.shape
    pairs = (codes & 0xF).reshape(rows, supers, 4, 2, 32)
    return (pairs[:, :, :, 0] | (pairs[:, :, :, 1] << 4)).reshape(rows, supers, 128)


def _high_bits(codes: torch.Tensor) -> torch.Tensor:
    """[rows, supers, 256] uint8 -> [rows, supers, 32]: bit j of byte l is bit 4 of weight l of sub-block j."""
    rows, supers, _ = codes.shape
    bit = ((codes >> 4) & 1).reshape(rows, supers, GROUPS_PER_SUPER, 32)
    shifts = torch.arange(GROUPS_PER_SUPER, dtype=torch.uint8).reshape(1, 1, GROUPS_PER_SUPER, 1)
    return (bit << shifts).sum(dim=2, dtype=torch.uint8)


def pack_super_blocks(qtype: str, codes: torch.Tensor, params: SuperParams) -> np.ndarray:
    """Q4_K / Q5_K bytes [rows, supers * block bytes] from codes [rows, supers * 256] (uint8)."""
    rows = codes.shape[0]
    blocks = codes.reshape(rows, -1, SUPER_BLOCK)
    supers = blocks.shape[1]
    out = np.empty((rows, supers, SUPER_BLOCK_BYTES[qtype]), dtype=np.uint8)
    out[..., 0:2] = _half_bytes(params.d)
    out[..., 2:4] = _half_bytes(params.dmin)
    out[..., 4:16] = _scale_bytes(params.sc, params.m).numpy()
    at = 16
    if qtype == Q5_K:
        out[..., at : at + 32] = _high_bits(blocks).numpy()
        at += 32
    out[..., at:] = _nibbles(blocks).numpy()
    return out.reshape(rows, supers * SUPER_BLOCK_BYTES[qtype])


def encode_super_blocks(q: QuantizedWeight) -> EncodedTensor | None:
    """A float-zero weight in groups of 32 (256 | in) as Q4_K / Q5_K blocks, bit for bit; None when
    its scales and offsets are not on super-block form (see core/quant/superblocks.py)."""
    rows, cols = q.shape
    if q.offset is None or q.group_size * GROUPS_PER_SUPER != SUPER_BLOCK or cols % SUPER_BLOCK:
        return None
    params = super_params(q.scale.cpu(), q.offset.cpu())
    if params is None:
        return None
    qtype = super_type(q.bits)
    data = pack_super_blocks(qtype, q.codes[:, :cols].cpu(), params)
    n = rows * (cols // SUPER_BLOCK)
    return EncodedTensor(data=data, qtype=qtype, exact_blocks=n, total_blocks=n)
