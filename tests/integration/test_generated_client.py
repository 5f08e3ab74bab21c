"""The generated Python client (clients/python, from the committed openapi.json) drives a whole
job against a live `taq serve`: upload, submit, poll, profile, list artifacts, download."""

from __future__ import annotations

import hashlib
import io
import sys
import time
from pathlib import Path

import pytest

from .conftest import calibration_jsonl, tiny_spec
from .test_embedded import served  # noqa: F401  (module-scoped `taq serve`, reused)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "clients" / "python"))

from taq_service_client import AuthenticatedClient  # noqa: E402
from taq_service_client.api.datasets import upload_dataset  # noqa: E402
from taq_service_client.api.jobs import create_job, download_job_artifact, get_job, get_job_profile, list_job_artifacts  # noqa: E402
from taq_service_client.models import BodyUploadDataset, DatasetOut, JobOut, JobSpec, ProfileOut  # noqa: E402
from taq_service_client.types import File  # noqa: E402

pytestmark = pytest.mark.integration


def test_full_job_through_generated_client(served):  # noqa: F811
    base_url = str(served["client"].base_url).rstrip("/")
    # auth is off on the embedded default; the generated client still sends a bearer header
    client = AuthenticatedClient(base_url=base_url, token="unused-when-auth-is-off", raise_on_unexpected_status=True)

    dataset = upload_dataset.sync(
        client=client,
        body=BodyUploadDataset(
            file=File(payload=io.BytesIO(calibration_jsonl()), file_name="cal.jsonl", mime_type="application/jsonl")
        ),
    )
    assert isinstance(dataset, DatasetOut), dataset
    assert dataset.rows == 4 and dataset.has_answers is True

    spec = tiny_spec("taq", calibration_dataset_id=dataset.id)
    del spec["calibration"]
    job = create_job.sync(client=client, body=JobSpec.from_dict(spec), idempotency_key="generated-client-1")
    assert isinstance(job, JobOut), job

    deadline = time.monotonic() + 240
    while job.status.value in ("queued", "running"):
        assert time.monotonic() < deadline, "job did not finish"
        time.sleep(0.5)
        job = get_job.sync(job.id, client=client)
    assert job.status.value == "succeeded", job.error

    profile = get_job_profile.sync(job.id, client=client)
    assert isinstance(profile, ProfileOut)
    assert [layer.name for layer in profile.layers] == [f"model.layers.{i}" for i in range(4)]
    assert all(layer.bits in (4, 8) for layer in profile.layers)

    artifacts = {a.name: a for a in list_job_artifacts.sync(job.id, client=client)}
    manifest = artifacts["manifest.json"]
    response = download_job_artifact.sync_detailed(job.id, "manifest.json", client=client)
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == manifest.sha256
    assert len(response.content) == manifest.size
