"""Property-based fuzzing of the whole HTTP API with Schemathesis, generated from the app's own
OpenAPI document: every operation gets valid and invalid requests (bodies, query strings, headers,
path parameters); each answer must not be a 5xx and must match what the document declares (status
code, content type, headers, body schema).

The app runs in-process (ASGI) on the embedded defaults (SQLite, file:// storage, filesystem
broker) in a temporary directory, with auth on, and again in the keyless loopback mode; a third
test calls every operation that takes an id with another tenant's real ids (always 404).
Deterministic: Hypothesis is derandomized (its seed derives from the test code) with no example
database and no shrinking, and every operation gets a bounded number of examples (~2000 requests,
~15-30 s on 2 cores).
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
CHECKS = [
    st_checks.not_a_server_error,
    oa_checks.status_code_conformance,
    oa_checks.content_type_conformance,
    oa_checks.response_headers_conformance,
    oa_checks.response_schema_conformance,
    oa_checks.ignored_auth,
    oa_checks.missing_required_header,
]
# not `negative_data_rejection`: it counts an unknown query parameter (`?x=1`) as invalid data, and
# ignoring unknown query parameters is deliberate (HTTP convention; older clients keep working)


def _make_app(data, tiny_model_root, api_keys: str):
    from fastapi.testclient import TestClient

    from api.main import create_app
    from common.db import migrate
    from common.settings import Settings

    cfg = Settings(
        data_dir=data,
        model_roots=[tiny_model_root],
        api_keys=api_keys,
        sse_max_seconds=1.0,
        sse_poll_seconds=0.1,
        max_queued_jobs_per_tenant=1000,
        log_level="WARNING",
        rate_limit_per_second=0,
    )
    migrate(cfg)
    app = create_app(cfg)
    auth = AUTH if api_keys else {}
    # real rows (a dataset, a queued and a cancelled job; no worker runs them) so that the list
    # endpoints answer with real bodies for the schema checks
    with TestClient(app) as client:
        ds = client.post(
            "/v1/datasets", headers=auth, files={"file": ("cal.jsonl", calibration_jsonl(), "application/json")}
        )
        assert ds.status_code == 201, ds.text
        job = client.post("/v1/jobs", headers=auth, json=tiny_spec("taq"))
        assert job.status_code == 202, job.text
        cancelled = client.post("/v1/jobs", headers=auth, json=tiny_spec("uniform"))
        assert client.post(f"/v1/jobs/{cancelled.json()['id']}/cancel", headers=auth).status_code == 202
    app.state.fuzz_ids = {"job_id": job.json()["id"], "dataset_id": ds.json()["id"]}
    return app


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory, tiny_model_root):
    return _make_app(tmp_path_factory.mktemp("fuzz"), tiny_model_root, f"fuzz:{KEY}")


@pytest.fixture(scope="module")
def keyless_app(tmp_path_factory, tiny_model_root):
    return _make_app(tmp_path_factory.mktemp("fuzz-keyless"), tiny_model_root, "")


def _check_envelope(response) -> None:
    assert response.status_code < 500, response.text[:500]
    content_type = (response.headers.get("content-type") or [""])[0]
    # (a HEAD answer has the headers of the error but no body)
    if response.status_code >= 400 and content_type.startswith("application/json") and response.content:
        body = json.loads(response.content)
        assert set(body) == {"error"} and {"code", "message", "details"} <= set(body["error"]), body


def _fuzzer(strategy, label: str, calls: dict[str, int], headers: dict[str, str] = AUTH, checks=CHECKS):
    @given(case=strategy)
    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=False,
        suppress_health_check=list(HealthCheck),
        phases=PHASES,
    )
    def run(case):
        calls[label] = calls.get(label, 0) + 1
        response = case.call_and_validate(headers=headers, checks=checks)
        STATUSES[response.status_code] += 1
        _check_envelope(response)

    return run


@pytest.mark.parametrize("mode", ["keys", "keyless"])
def test_api_conforms_to_its_openapi_document(mode, request):
    from schemathesis.generation.modes import GenerationMode

    fuzz_app = request.getfixturevalue("fuzz_app" if mode == "keys" else "keyless_app")
    headers = AUTH if mode == "keys" else {}
    # keyless, a request without a key is accepted by design: schemathesis' ignored-auth check
    # (which expects a 401 without credentials) does not apply
    checks = CHECKS if mode == "keys" else [c for c in CHECKS if c is not oa_checks.ignored_auth]
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    calls: dict[str, int] = {}
    failures: dict[str, str] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 13, [op.label for op in operations]
    for operation in operations:
        for generation in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            label = f"{operation.label} [{generation.value}]"

            run = _fuzzer(operation.as_strategy(generation_mode=generation), label, calls, headers, checks)
            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
                assert (
                    generation == GenerationMode.NEGATIVE
                    and not operation.body
                    and not list(operation.iter_parameters())
                ), label
            except BaseException as exc:  # noqa: BLE001 - collect every operation's failure, then report
                if isinstance(exc, (KeyboardInterrupt, SystemExit, pytest.fail.Exception)):
                    raise
                failures[label] = f"{type(exc).__name__}: {str(exc)[:3000]}"
    total = sum(calls.values())
    print(
        f"schemathesis: {total} generated requests over {len(operations)} operations; "
        f"status codes {dict(sorted(STATUSES.items()))}"
    )
    assert not failures, "\n\n".join(f"{k}\n{v}" for k, v in failures.items())
    assert total >= 300, calls


def test_another_tenants_ids_are_404_on_every_operation(fuzz_app):
    """Every operation whose path names a job or a dataset, called by a second tenant with the
    first tenant's real ids, answers 404 (never 200, 403 or 500: nothing reveals the id exists)."""
    from fastapi.testclient import TestClient

    from common.auth import create_key
    from common.db import session_scope

    settings = fuzz_app.state.settings
    with session_scope(settings) as session:
        other = {"Authorization": f"Bearer {create_key(session, 'intruder').key}"}
    ids = {**fuzz_app.state.fuzz_ids, "name": "manifest.json"}
    schema = fuzz_app.openapi()
    tried = []
    with TestClient(fuzz_app, raise_server_exceptions=False) as client:
        for path, operations in schema["paths"].items():
            if "{job_id}" not in path and "{dataset_id}" not in path:
                continue
            url = path.replace("{name}", ids["name"]).format(**ids)
            for method in operations:
                response = client.request(
                    method.upper(),
                    url,
                    headers={**other, "Accept": "text/event-stream"} if path.endswith("/events") else other,
                )
                tried.append((method.upper(), path, response.status_code))
                assert response.status_code == 404, (method, path, response.status_code, response.text[:300])
    assert len(tried) >= 9, tried
