"""Fixtures shared by the pipeline tests: the tiny Llama's source, the whole model loaded, and a
counter of the layer pass's quantize_layer calls."""

from __future__ import annotations

from pathlib import Path

import pytest
from pipeline_helpers import count_quantize_calls

from core.models import LoadedModel, load_model, resolve_model


@pytest.fixture
def count_quantize(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, list[int]]]:
    return count_quantize_calls(monkeypatch)


@pytest.fixture(scope="module")
def source(tiny_model_root: Path):
    return resolve_model("tiny-llama", [tiny_model_root], {})


@pytest.fixture(scope="module")
def loaded(source) -> LoadedModel:
    return load_model(source)
