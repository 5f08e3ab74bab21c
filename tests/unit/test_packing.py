"""core.quant.packing: exact round trips for every width, byte layouts, compressed-tensors parity."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from core.quant.packing import PACKERS, pack_codes, pack_int32, unpack_codes, unpack_int32
from core.quant.primitives import quantize_weight

pytestmark = pytest.mark.unit

LENGTHS = [1, 2, 3, 7, 8, 9, 31, 33, 127, 576, 1001]


def random_codes(shape: tuple[int, ...], bits: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def to_signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)


@pytest.mark.parametrize("name", sorted(PACKERS))
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_round_trip_every_width_and_odd_lengths(name: str, bits: int) -> None:
    packer = PACKERS[name]
    for i, n in enumerate(LENGTHS):
        codes = random_codes((3, n), bits, seed=100 * bits + i)
        packed = packer.pack(codes, bits)
        assert packed.dtype == packer.dtype
        assert packed.shape == (3, packer.packed_length(n, bits)) == (3, -(-n * bits // packer.word_bits))
        assert torch.equal(packer.unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_round_trip_extreme_values_and_3d(bits: int) -> None:
    codes = torch.full((2, 2, 13), 2**bits - 1, dtype=torch.uint8)
    codes[0, 1] = 0
    for packer in PACKERS.values():
        assert torch.equal(packer.unpack(packer.pack(codes, bits), bits, 13), codes)


def test_four_bit_layout_low_nibble_first() -> None:
    codes = torch.tensor([[1, 2, 3, 15, 9]], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [[0x21, 0xF3, 0x09]]


def test_two_bit_layout_lowest_bits_first() -> None:
    codes = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)
    assert pack_codes(codes, 2).tolist() == [[1 | 2 << 2 | 3 << 4, 3]]


def test_three_bit_is_a_dense_bitstream() -> None:
    codes = torch.tensor([[7, 0, 5, 1, 2, 3, 4, 6, 1]], dtype=torch.uint8)
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes[0].tolist()))
    expected = [(stream >> (8 * j)) & 0xFF for j in range(-(-9 * 3 // 8))]
    assert pack_codes(codes, 3).tolist() == [expected]


def test_eight_bit_is_identity_copy() -> None:
    codes = random_codes((4, 5), 8, seed=1)
    packed = pack_codes(codes, 8)
    assert torch.equal(packed, codes) and packed.data_ptr() != codes.data_ptr()


def test_padding_bits_are_zero() -> None:
    packed = pack_codes(torch.full((1, 3), 7, dtype=torch.uint8), 3)  # 9 bits in 2 bytes
    assert packed.tolist() == [[0xFF, 0x01]]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_int32_matches_compressed_tensors(bits: int) -> None:
    for i, n in enumerate(LENGTHS):
        codes = random_codes((4, n), bits, seed=7 * bits + i)
        ours = pack_int32(codes, bits)
        theirs = pack_to_int32(to_signed(codes, bits), bits, packed_dim=1)
        assert torch.equal(ours, theirs), (bits, n)
        assert torch.equal(unpack_from_int32(ours, bits, torch.Size((4, n)), packed_dim=1), to_signed(codes, bits))
        assert torch.equal(unpack_int32(theirs, bits, n), codes)


def test_int32_sign_bit_words_round_trip() -> None:
    codes = torch.full((1, 8), 15, dtype=torch.uint8)  # one word with every bit set = -1
    assert pack_int32(codes, 4).tolist() == [[-1]]
    assert torch.equal(unpack_int32(pack_int32(codes, 4), 4, 8), codes)


def test_quantized_codes_survive_packing() -> None:
    w = torch.randn(16, 576, generator=torch.Generator().manual_seed(3))
    q = quantize_weight(w, 4, 128, False)
    n = q.codes.shape[1]
    assert torch.equal(unpack_codes(pack_codes(q.codes, 4), 4, n), q.codes)
    assert pack_codes(q.codes, 4).shape == (16, n // 2)


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: pack_codes(torch.tensor([[16]], dtype=torch.uint8), 4), "exceeds the 4-bit range"),
        (lambda: pack_codes(torch.tensor([[1]], dtype=torch.int32), 4), "must be uint8"),
        (lambda: pack_codes(torch.tensor([[1]], dtype=torch.uint8), 9), "1..8-bit"),
        (lambda: unpack_codes(torch.zeros(1, 1, dtype=torch.uint8), 4, 3), "need 2 bytes"),
        (lambda: unpack_int32(torch.zeros(1, 1, dtype=torch.int32), 4, 9), "need 2 int32 words"),
        (lambda: unpack_int32(torch.zeros(1, 1, dtype=torch.uint8), 4, 1), "must be int32"),
    ],
)
def test_invalid_inputs_raise(bad, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bad()


def _reference_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The format's definition, code by code: code i at bits [i·b, (i+1)·b) of the byte stream."""
    rows = codes.reshape(-1, codes.shape[-1]).tolist()
    n = codes.shape[-1]
    out = []
    for row in rows:
        value = sum(int(c) << (i * bits) for i, c in enumerate(row))
        out.append([(value >> (8 * j)) & 0xFF for j in range(-(-n * bits // 8))])
    return torch.tensor(out, dtype=torch.uint8).reshape(*codes.shape[:-1], -1)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", [(3, 1), (2, 7), (2, 3, 33), (1, 64)])
def test_fast_and_generic_paths_write_the_defined_stream(
    monkeypatch: pytest.MonkeyPatch, bits: int, shape: tuple[int, ...]
) -> None:
    """The 4-bit nibble path, the 8-bit copy and the int64 bit-field path all write the stream the
    format defines; the int32 words are the same whether reinterpreted or built arithmetically."""
    import core.quant.packing as packing

    g = torch.Generator().manual_seed(bits * 100 + shape[-1])
    codes = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.uint8)
    stream = _reference_stream(codes, bits)
    assert torch.equal(pack_codes(codes, bits), stream)
    assert torch.equal(packing._pack_bitfields(codes, bits), stream)
    assert torch.equal(unpack_codes(stream, bits, shape[-1]), codes)
    assert torch.equal(packing._unpack_bitfields(stream, bits, shape[-1]), codes)
    words = pack_int32(codes, bits)
    monkeypatch.setattr(packing, "_LITTLE_ENDIAN", False)
    assert torch.equal(pack_int32(codes, bits), words)
    assert torch.equal(unpack_int32(words, bits, shape[-1]), codes)
