"""The worker's disk check before a claimed job runs (worker/disk.py): the work estimate of the
stages that will run, on the tiny Llama's real shapes, and the refusal when the disk is short."""

from __future__ import annotations

import pytest
from pipeline_helpers import ROWS, make_spec

from core.disk import WorkDiskEstimate, spill_bytes
from core.errors import InsufficientDisk
from core.model_dims import read_model_dims
from core.pipeline import JobInputs
from core.streaming.checkpoints import MemoryStore
from worker.disk import check_work_disk, refuse_without_room, work_disk_estimate

pytestmark = pytest.mark.unit

GiB = 1 << 30


def test_the_worker_estimates_the_stages_that_will_run(source, tmp_path):
    spec = make_spec(method="taq_kl", exports=["hf", "gguf"])
    inputs = JobInputs(spec=spec, source=source, rows=list(ROWS), activation_ram_bytes=0, work_dir=tmp_path / "work")
    estimate = work_disk_estimate(inputs, MemoryStore())
    assert estimate is not None and set(estimate.phases) == {"layer pass", "export"}  # no eval rows
    dims = read_model_dims(source)
    assert estimate.phases["layer pass"] == spill_bytes(
        dims,
        method="taq_kl",
        calibration_rows=len(ROWS),
        max_tokens=spec.max_tokens,
        sequential=False,
        hidden_bytes=4,  # float32 on the CPU
        activation_ram_bytes=0,
    )
    assert estimate.phases["layer pass"] > 0
    # a resumed job whose profile is stored runs no layer pass
    store = MemoryStore()
    store.put_bytes("artifacts/profile.json", b"{}")
    assert set(work_disk_estimate(inputs, store).phases) == {"export"}
    # within the memory limit nothing spills
    roomy = JobInputs(spec=spec, source=source, rows=list(ROWS), activation_ram_bytes=1 << 30)
    assert work_disk_estimate(roomy, MemoryStore()).phases["layer pass"] == 0
    # this disk holds the tiny job: the check passes and leaves the work directory ready
    assert check_work_disk(inputs, MemoryStore()) == estimate and (tmp_path / "work").is_dir()


def test_a_job_larger_than_the_free_disk_is_refused_with_its_code():
    estimate = WorkDiskEstimate({"layer pass": 3 * GiB, "export": GiB})
    refuse_without_room(estimate, 3 * GiB)  # exactly enough
    with pytest.raises(InsufficientDisk) as refused:
        refuse_without_room(estimate, 2 * GiB)
    error = refused.value
    assert error.code == "insufficient_disk"
    assert "about 3.00 GiB of free disk" in error.message and "2.00 GiB are free" in error.message
    assert "$TAQ_DATA_DIR/work" in error.message and "TAQ_ACTIVATION_RAM_BYTES" in error.message
    assert error.details == {
        "estimate_bytes": 3 * GiB,
        "free_bytes": 2 * GiB,
        "phase": "layer pass",
        "phases": {"layer pass": 3 * GiB, "export": GiB},
        "where": "$TAQ_DATA_DIR/work",
    }
    with pytest.raises(InsufficientDisk, match="export fewer formats"):
        refuse_without_room(WorkDiskEstimate({"layer pass": 0, "export": 2 * GiB}), GiB)
