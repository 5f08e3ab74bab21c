"""Profile plot: a deterministic PNG with importance bars and chosen bits."""

from __future__ import annotations

import io

import pytest

from core.plot import plot_profile, profile_effective_bits
from core.scheme import QuantScheme
from core.types import LayerProfile, Profile

pytestmark = pytest.mark.unit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _profile(with_bits: bool) -> Profile:
    layers = [
        LayerProfile(
            index=i,
            name=f"model.layers.{i}",
            params=1000 * (1 + i % 2),
            scores={"information": float(i)},
            importance=(-1) ** i * 0.3 * i,
            sensitivity=1.0 + 0.1 * i,
            quant_error={4: 0.01, 8: 0.001, 16: 0.0},
            bits=([4, 8, 16, 4, 8, 4][i] if with_bits else None),
        )
        for i in range(6)
    ]
    return Profile(model="tiny-llama", method="taq", layers=layers)


def _size(png: bytes) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(png)).size


@pytest.mark.parametrize("with_bits", [True, False])
def test_png_is_valid_and_deterministic(with_bits: bool) -> None:
    png = plot_profile(_profile(with_bits), "tiny-llama · taq")
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    assert plot_profile(_profile(with_bits), "tiny-llama · taq") == png
    width, height = _size(png)
    assert width >= 600 and height >= 400


def test_bits_change_the_picture() -> None:
    assert plot_profile(_profile(True), None) != plot_profile(_profile(False), None)


def test_effective_bits() -> None:
    profile = _profile(True)
    # params 1000, 2000, 1000, 2000, 1000, 2000; bits 4, 8, 16, 4, 8, 4
    nominal = (4 * 1000 + 8 * 2000 + 16 * 1000 + 4 * 2000 + 8 * 1000 + 4 * 2000) / 9000
    assert profile_effective_bits(profile) == pytest.approx(nominal)
    with_overhead = profile_effective_bits(profile, QuantScheme(128))
    assert with_overhead == pytest.approx(nominal + 24 / 128 * 8000 / 9000)  # fp16 scale + int8 zero per group
    assert profile_effective_bits(_profile(False)) is None


def test_many_layers_render() -> None:
    layers = [
        LayerProfile(index=i, name=f"model.layers.{i}", params=10, scores={}, importance=0.0, sensitivity=0.0, bits=4)
        for i in range(80)
    ]
    assert plot_profile(Profile(model="m", method="uniform", layers=layers), "m").startswith(PNG_MAGIC)
