"""The disk side of the preflight: layer checkpoints at every width plus every budget's export in
every format, from the shapes alone."""

from __future__ import annotations

import pytest

from core.disk import estimate_job_disk
from core.model_dims import ModelDims

pytestmark = pytest.mark.unit

DIMS = ModelDims(
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    vocab_size=1000,
    tie_word_embeddings=True,
)


def test_by_hand():
    linear = DIMS.linear_parameters  # per layer: q 64x64, k/v 2x64x32, o 64x64, gate/up/down 3x64x128
    assert linear == 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)
    groups = linear // 64
    rest = (DIMS.parameters - linear) * 2
    estimate = estimate_job_disk(DIMS, bit_choices=[4, 8, 16], group_size=64, budgets=[5.0, 6.0], formats=2)
    assert estimate.checkpoint_bytes == linear * 4 // 8 + linear * 8 // 8 + 2 * groups * 3
    assert estimate.export_bytes == int(linear * 5.0 / 8 + rest + linear * 6.0 / 8 + rest) * 2
    assert estimate.total_bytes == estimate.checkpoint_bytes + estimate.export_bytes


def test_every_budget_and_format_counts():
    one = estimate_job_disk(DIMS, bit_choices=[4, 8], group_size=64, budgets=[6.0], formats=1)
    sweep = estimate_job_disk(DIMS, bit_choices=[4, 8], group_size=64, budgets=[6.0, 6.0 + 1e-3, 7.0], formats=2)
    assert sweep.export_bytes > 6 * one.export_bytes * 0.95 and sweep.checkpoint_bytes == one.checkpoint_bytes
    paper = estimate_job_disk(DIMS, bit_choices=[4, 8], group_size=64, budgets=[], formats=1)
    assert paper.export_bytes > one.export_bytes  # no budget: the widest choice bounds it
