"""Bit-packing of unsigned quantization codes, one registry entry per storage format.

Every format is the same dense little-endian bitstream along the last dimension: code i occupies
bits [i·b, (i+1)·b) counting from the least significant bit of the first storage word. For bytes
that is "4-bit: two codes a byte, low nibble first", "2-bit: four a byte, lowest bits first",
"3-bit: eight codes in three bytes" and identity for 8 bits; bits past the last code are 0.

- `uint8`: that bitstream in ceil(n·b / 8) bytes (our own storage, `pack_codes` / `unpack_codes`).
- `int32`: the same bitstream read as little-endian int32 words, ceil(n·b / 32) of them — exactly
  compressed-tensors' "pack-quantized" layout (`pack_to_int32`, packed_dim=1). That function takes
  signed int8 values and adds 2^(b-1) before packing; our codes already are that unsigned value
  (signed = code − 2^(b-1)), so they are packed as they are. On a little-endian host the words
  are the byte stream reinterpreted in place; elsewhere they are built arithmetically, so the
  result does not depend on the host's byte order.

4-bit codes (the common width) take a nibble path in uint8 and 8-bit ones are stored as they are;
the other widths go through an int64 bit-field sum. Same bytes either way (tested), but the
generic path is ~7× slower (bench/bench_packing.py), which an 8B export (billions of codes
unpacked and repacked) feels.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

PACKABLE_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
_LITTLE_ENDIAN = sys.byteorder == "little"


def _check(codes: torch.Tensor, bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"can only pack 1..8-bit codes, got bits={bits}")
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    if codes.dim() == 0:
        raise ValueError("codes must have at least one dimension")
    if bits < 8 and codes.numel() and int(codes.max()) >= 2**bits:
        raise ValueError(f"a code exceeds the {bits}-bit range (max {2**bits - 1})")


def _packed_len(n: int, bits: int, word_bits: int) -> int:
    return -(-n * bits // word_bits)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned `bits`-wide codes along the last dim into ceil(n·bits/8) uint8 bytes."""
    _check(codes, bits)
    if bits == 8:
        return codes.clone()
    if bits == 4:
        pairs = torch.nn.functional.pad(codes, (0, codes.shape[-1] % 2))
        return (pairs[..., 0::2] | (pairs[..., 1::2] << 4)).contiguous()
    return _pack_bitfields(codes, bits)


def _pack_bitfields(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The generic path of `pack_codes` (any width, int64 bit fields)."""
    *lead, n = codes.shape
    # 8 codes span exactly `bits` bytes (≤ 56 bits, so int64 never overflows)
    blocks = -(-n // 8)
    x = torch.nn.functional.pad(codes.to(torch.int64), (0, blocks * 8 - n))
    x = x.reshape(*lead, blocks, 8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (x << shifts).sum(dim=-1, keepdim=True)  # disjoint bit fields: sum == or
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    out = ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(*lead, blocks * bits)
    return out[..., : _packed_len(n, bits, 8)].contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `n` codes along the last dim, as uint8."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"can only unpack 1..8-bit codes, got bits={bits}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    need = _packed_len(n, bits, 8)
    if n < 0 or packed.shape[-1] < need:
        raise ValueError(f"{n} {bits}-bit codes need {need} bytes, got {packed.shape[-1]}")
    if bits == 8:
        return packed[..., :n].clone()
    if bits == 4:
        x = packed[..., :need]
        return torch.stack((x & 0xF, x >> 4), dim=-1).reshape(*x.shape[:-1], need * 2)[..., :n].contiguous()
    return _unpack_bitfields(packed, bits, n)


def _unpack_bitfields(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The generic path of `unpack_codes` (any width, int64 bit fields)."""
    need = _packed_len(n, bits, 8)
    *lead, _ = packed.shape
    blocks = -(-n // 8)
    x = torch.nn.functional.pad(packed[..., :need].to(torch.int64), (0, blocks * bits - need))
    x = x.reshape(*lead, blocks, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (x << byte_shifts).sum(dim=-1, keepdim=True)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes: torch.Tensor = ((word >> shifts) & (2**bits - 1)).to(torch.uint8).reshape(*lead, blocks * 8)
    return codes[..., :n].contiguous()


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes along the last dim into ceil(n·bits/32) int32 words (compressed-tensors layout)."""
    _check(codes, bits)
    n = codes.shape[-1]
    n_words = _packed_len(n, bits, 32)
    stream = pack_codes(codes, bits)
    if _LITTLE_ENDIAN:  # the words' bytes are the stream's, in order
        return torch.nn.functional.pad(stream, (0, n_words * 4 - stream.shape[-1])).contiguous().view(torch.int32)
    stream = torch.nn.functional.pad(stream.to(torch.int64), (0, n_words * 4 - stream.shape[-1]))
    stream = stream.reshape(*codes.shape[:-1], n_words, 4)
    shifts = torch.arange(4, device=codes.device, dtype=torch.int64) * 8
    word = (stream << shifts).sum(dim=-1)  # unsigned 32-bit value in int64
    word = torch.where(word >= 2**31, word - 2**32, word)  # reinterpret as two's complement
    return word.to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_int32`: the first `n` codes along the last dim, as uint8."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed must be int32, got {packed.dtype}")
    need = _packed_len(n, bits, 32)
    if packed.shape[-1] < need:
        raise ValueError(f"{n} {bits}-bit codes need {need} int32 words, got {packed.shape[-1]}")
    if _LITTLE_ENDIAN:
        return unpack_codes(packed[..., :need].contiguous().view(torch.uint8), bits, n)
    words = packed[..., :need].to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(4, device=packed.device, dtype=torch.int64) * 8
    stream = ((words.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).reshape(*packed.shape[:-1], need * 4)
    return unpack_codes(stream, bits, n)


@dataclass(frozen=True)
class Packer:
    """One storage format: `pack(codes uint8, bits)` and `unpack(packed, bits, n) -> codes uint8`."""

    name: str
    dtype: torch.dtype
    word_bits: int
    pack: Callable[[torch.Tensor, int], torch.Tensor]
    unpack: Callable[[torch.Tensor, int, int], torch.Tensor]

    def packed_length(self, n: int, bits: int) -> int:
        """Storage words needed along the packed dim for `n` codes."""
        return _packed_len(n, bits, self.word_bits)


PACKERS: dict[str, Packer] = {
    "uint8": Packer("uint8", torch.uint8, 8, pack_codes, unpack_codes),
    "int32": Packer("int32", torch.int32, 32, pack_int32, unpack_int32),
}
