"""GGML K-quant encoders (Q4_K, Q5_K, Q6_K) for weights on K-quant super-blocks (`k_quants`,
core/quant/superblocks.py): exact, or refused.

A super-block is 256 weights of a row, eight sub-blocks of 32 (our groups). Layout (llama.cpp's
ggml-common.h; gguf-py's reference decoder is the test oracle):

| type | bytes | fields |
|---|---|---|
| Q4_K | 144 | fp16 d, fp16 dmin, 12 bytes of 6-bit sc/m, 128 bytes of nibbles |
| Q5_K | 176 | fp16 d, fp16 dmin, 12 bytes of 6-bit sc/m, 32 bytes qh, 128 bytes of nibbles |
| Q6_K | 210 | 128 bytes ql (low 4 bits), 64 bytes qh (high 2 bits), 16 int8 sc, fp16 d |

Sub-block j decodes as d · sc_j · q − dmin · m_j. The 12 scale bytes: bytes 0-3 hold sc_0..3 in
their low 6 bits and the top 2 bits of sc_4..7; bytes 4-7 the same for m; bytes 8-11 hold the low
nibbles of sc_4..7 (low) and m_4..7 (high). Nibbles: byte 32c + l holds weight l of sub-block 2c
(low) and of sub-block 2c + 1 (high). Q5_K's qh[l] bit j is bit 4 of weight l of sub-block j.

Q6_K: sixteen sub-blocks of 16, weight k decodes as d · sc[k // 16] · (q − 32). Each half of 128
weights (quarters Q0..Q3 of 32) has 64 ql bytes, ql[l] = Q0[l] | Q2[l] << 4 and ql[32 + l] = Q1[l] |
Q3[l] << 4 (low 4 bits each), and 32 qh bytes, qh[l] = the top 2 bits of Q0..Q3[l] at bits 0, 2, 4, 6.
A group of 32 of ours is two sub-blocks with its sc.
"""

from __future__ import annotations

import numpy as np
import torch

from core.export.ggml_blocks import EncodedTensor, _half_bytes
from core.quant.superblocks import GROUPS_PER_SUPER, SuperParams, SymmetricParams, super_params, symmetric_params
from core.scheme import SUPER_BLOCK
from core.types import QuantizedWeight

Q4_K, Q5_K, Q6_K = "Q4_K", "Q5_K", "Q6_K"
SUPER_BLOCK_BYTES = {Q4_K: 144, Q5_K: 176, Q6_K: 210}
_TYPES = {4: Q4_K, 5: Q5_K, 6: Q6_K}


def super_type(bits: int) -> str:
    """The K-quant type of a super-block width: 4 -> Q4_K, 5 -> Q5_K, 6 -> Q6_K (symmetric)."""
    if bits not in _TYPES:
        raise ValueError(f"no K-quant super-block type for {bits} bits")
    return _TYPES[bits]


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


def pack_q6_k(codes: torch.Tensor, params: SymmetricParams) -> np.ndarray:
    """Q6_K bytes [rows, supers * 210] from 6-bit codes [rows, supers * 256] (uint8)."""
    rows = codes.shape[0]
    halves = codes.reshape(rows, -1, 2, 4, 32)  # [rows, supers, half, quarter, 32]
    supers = halves.shape[1]
    low, top = halves & 0xF, halves >> 4
    ql = torch.cat([low[:, :, :, 0] | (low[:, :, :, 2] << 4), low[:, :, :, 1] | (low[:, :, :, 3] << 4)], dim=-1)
    qh = top[:, :, :, 0] | (top[:, :, :, 1] << 2) | (top[:, :, :, 2] << 4) | (top[:, :, :, 3] << 6)
    out = np.empty((rows, supers, SUPER_BLOCK_BYTES[Q6_K]), dtype=np.uint8)
    out[..., 0:128] = ql.reshape(rows, supers, 128).numpy()
    out[..., 128:192] = qh.reshape(rows, supers, 64).numpy()
    out[..., 192:208] = params.sc.repeat_interleave(2, dim=-1).numpy().view(np.uint8)  # one sc per 16
    out[..., 208:210] = _half_bytes(params.d)
    return out.reshape(rows, supers * SUPER_BLOCK_BYTES[Q6_K])


def encode_super_blocks(q: QuantizedWeight) -> EncodedTensor | None:
    """A weight in groups of 32 (256 | in) on K-quant super-blocks as Q4_K / Q5_K (float zero
    points) or Q6_K (symmetric 6-bit) blocks, bit for bit; None when it is not on that form (see
    core/quant/superblocks.py)."""
    rows, cols = q.shape
    if q.bits not in _TYPES or q.group_size * GROUPS_PER_SUPER != SUPER_BLOCK or cols % SUPER_BLOCK:
        return None
    codes = q.codes[:, :cols].cpu()
    qtype = super_type(q.bits)
    if qtype == Q6_K:
        symmetric = symmetric_params(q.scale.cpu()) if q.symmetric else None
        if symmetric is None:
            return None
        data = pack_q6_k(codes, symmetric)
    else:
        params = super_params(q.scale.cpu(), q.offset.cpu()) if q.offset is not None else None
        if params is None:
            return None
        data = pack_super_blocks(qtype, codes, params)
    n = rows * (cols // SUPER_BLOCK)
    return EncodedTensor(data=data, qtype=qtype, exact_blocks=n, total_blocks=n)
