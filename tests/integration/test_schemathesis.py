"""Property-based fuzzing of the whole HTTP API with Schemathesis, generated from the app's own
OpenAPI document: every operation gets valid and invalid requests (bodies, query strings, headers,
path parameters); each answer must not be a 5xx and must match what the document declares (status
code, content type, headers, body schema).

The app runs in-process (ASGI) on the embedded defaults (SQLite, file:// storage, filesystem
broker) in a temporary directory, with auth on. Deterministic: Hypothesis is derandomized (its
seed derives from the test code) with no example database and no shrinking, and every operation
gets a bounded number of examples (~2000 requests, ~15-30 s on 2 cores).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402  (hypothesis comes with schemathesis)
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import checks as st_checks  # noqa: E402
from schemathesis.specs.openapi import checks as oa_checks  # noqa: E402

from .conftest import calibration_jsonl, tiny_spec  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

KEY = "fuzz-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
#: examples per operation and generation mode (positive / negative): ~2000 requests over 13 operations
MAX_EXAMPLES = 100

STATUSES: Counter[int] = Counter()
#: no shrinking: a failure is reported as found (shrinking could take minutes)
PHASES = [Phase.explicit, Phase.generate]
CHECKS = [st_checks.not_a_server_error, oa_checks.status_code_conformance, oa_checks.content_type_conformance,
          oa_checks.response_headers_conformance, oa_checks.response_schema_conformance,
          oa_checks.ignored_auth, oa_checks.missing_required_header]
# not `negative_data_rejection`: it counts an unknown query parameter (`?x=1`) as invalid data, and
# ignoring unknown query parameters is deliberate (HTTP convention; older clients keep working)


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory, tiny_model_root):
    from fastapi.testclient import TestClient

    from api.main import create_app
    from common.db import migrate
    from common.settings import Settings

    data = tmp_path_factory.mktemp("fuzz")
    cfg = Settings(data_dir=data, model_roots=[tiny_model_root], api_keys=f"fuzz:{KEY}", sse_max_seconds=1.0,
                   sse_poll_seconds=0.1, max_queued_jobs_per_tenant=1000, log_level="WARNING")
    migrate(cfg)
    app = create_app(cfg)
    # real rows (a dataset, a queued and a cancelled job; no worker runs them) so that the list
    # endpoints answer with real bodies for the schema checks
    with TestClient(app) as client:
        ds = client.post("/v1/datasets", headers=AUTH,
                         files={"file": ("cal.jsonl", calibration_jsonl(), "application/json")})
        assert ds.status_code == 201, ds.text
        job = client.post("/v1/jobs", headers=AUTH, json=tiny_spec("taq"))
        assert job.status_code == 202, job.text
        cancelled = client.post("/v1/jobs", headers=AUTH, json=tiny_spec("uniform"))
        assert client.post(f"/v1/jobs/{cancelled.json()['id']}/cancel", headers=AUTH).status_code == 202
    return app


def _check_envelope(response) -> None:
    assert response.status_code < 500, response.text[:500]
    content_type = (response.headers.get("content-type") or [""])[0]
    # (a HEAD answer has the headers of the error but no body)
    if response.status_code >= 400 and content_type.startswith("application/json") and response.content:
        body = json.loads(response.content)
        assert set(body) == {"error"} and {"code", "message", "details"} <= set(body["error"]), body


def _fuzzer(strategy, label: str, calls: dict[str, int]):
    @given(case=strategy)
    @settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=False,
              suppress_health_check=list(HealthCheck), phases=PHASES)
    def run(case):
        calls[label] = calls.get(label, 0) + 1
        response = case.call_and_validate(headers=AUTH, checks=CHECKS)
        STATUSES[response.status_code] += 1
        _check_envelope(response)

    return run


def test_api_conforms_to_its_openapi_document(fuzz_app):
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    calls: dict[str, int] = {}
    failures: dict[str, str] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 13, [op.label for op in operations]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            label = f"{operation.label} [{mode.value}]"

            run = _fuzzer(operation.as_strategy(generation_mode=mode), label, calls)
            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
                assert mode == GenerationMode.NEGATIVE and not operation.body and \
                    not list(operation.iter_parameters()), label
            except BaseException as exc:  # noqa: BLE001 - collect every operation's failure, then report
                if isinstance(exc, (KeyboardInterrupt, SystemExit, pytest.fail.Exception)):
                    raise
                failures[label] = f"{type(exc).__name__}: {str(exc)[:3000]}"
    total = sum(calls.values())
    print(f"schemathesis: {total} generated requests over {len(operations)} operations; "
          f"status codes {dict(sorted(STATUSES.items()))}")
    assert not failures, "\n\n".join(f"{k}\n{v}" for k, v in failures.items())
    assert total >= 300, calls
