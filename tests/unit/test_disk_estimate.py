"""The disk side of the preflight, from the shapes alone: the object storage a job writes (layer
checkpoints at every width plus every budget's export in every format) and what it writes at once
under the worker's work directory (spilled hidden states, export staging)."""

from __future__ import annotations

import pytest

from core.disk import estimate_job_disk, estimate_work_disk, spill_bytes
from core.memory import ANSWER_TOKENS, hidden_streams
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


# ---- the worker's work directory ---------------------------------------------------------------
SPILL = dict(calibration_rows=8, max_tokens=16, sequential=False, hidden_bytes=4, activation_ram_bytes=0)


def test_the_layer_pass_spills_input_and_output_of_every_stream_by_hand():
    taq = spill_bytes(DIMS, method="taq", **SPILL)
    assert taq == 2 * 1 * (8 * 16) * 64 * 4  # one stream, its input and output, float32
    assert spill_bytes(DIMS, method="uniform", **SPILL) == taq
    # probe streams: one per layer by the last layer
    assert hidden_streams("taq_kl", 2, sequential=False) == hidden_streams("taqo", 2, sequential=False) == 3
    assert spill_bytes(DIMS, method="taq_kl", **SPILL) == 3 * taq
    # taqo's sequences are the prompt and an answer
    assert spill_bytes(DIMS, method="taqo", **SPILL) == 3 * 2 * 8 * (16 + ANSWER_TOKENS) * 64 * 4
    assert spill_bytes(DIMS, method="taq", **{**SPILL, "sequential": True}) == 2 * taq  # the quantized stream
    assert spill_bytes(DIMS, method="taq", **{**SPILL, "hidden_bytes": 2}) == taq // 2  # bf16 on CUDA
    # what the memory limit holds is never spilled; past it, everything carried may be
    assert spill_bytes(DIMS, method="taq", **{**SPILL, "activation_ram_bytes": taq}) == 0
    assert spill_bytes(DIMS, method="taq_kl", **{**SPILL, "activation_ram_bytes": taq}) == 3 * taq
    assert spill_bytes(DIMS, method="taq_kl", **{**SPILL, "calibration_rows": 0}) == 0


WORK = dict(
    method="taq_kl",
    **SPILL,
    bit_choices=[4, 8, 16],
    group_size=64,
    budgets=[5.0, 6.0],
    formats=2,
    eval_rows=4,
)


def test_the_work_estimate_is_its_largest_phase():
    every = estimate_work_disk(DIMS, **WORK)
    storage = estimate_job_disk(DIMS, bit_choices=[4, 8, 16], group_size=64, budgets=[6.0], formats=2)
    assert every.phases == {
        "layer pass": spill_bytes(DIMS, method="taq_kl", **SPILL),
        "evaluation": 2 * (1 + 2 * 2) * 4 * (16 + ANSWER_TOKENS) * 64 * 4,  # full precision + 2 per budget
        "export": storage.export_bytes,  # the largest budget, staged in both formats
    }
    assert every.total_bytes == max(every.phases.values()) and every.phases[every.phase] == every.total_bytes
    assert every.to_dict()["total_bytes"] == every.total_bytes
    # only the stages that run count: a resumed job past its layer pass spills nothing there
    resumed = estimate_work_disk(DIMS, **{**WORK, "stages": {"export", "evaluate"}})
    assert "layer pass" not in resumed.phases and resumed.phases["export"] == every.phases["export"]
    # a reused profile's codes-only pass carries one stream whatever the method
    quantize = estimate_work_disk(DIMS, **{**WORK, "stages": {"quantize"}})
    assert quantize.phases == {"layer pass": spill_bytes(DIMS, method="uniform", **SPILL)}
    assert estimate_work_disk(DIMS, **{**WORK, "eval_rows": 0}).phases.keys() == {"layer pass", "export"}
    nothing = estimate_work_disk(DIMS, **{**WORK, "stages": set()})
    assert nothing.total_bytes == 0 and nothing.phase is None
    with pytest.raises(ValueError, match="unknown stages"):
        estimate_work_disk(DIMS, **{**WORK, "stages": {"publish"}})
