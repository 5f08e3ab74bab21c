"""The clients against a production-shaped `taq serve`: API keys on (tenant `alpha` from
TAQ_API_KEYS, tenant `beta` from a DB key made with `taq admin create-key`) and artifacts on S3 (a
moto server) with TAQ_S3_PRESIGN_DOWNLOADS on, so whole-file downloads answer 307 to a presigned
URL. One service and one tiny job for the module.

Covers: the CLI with --api-key / TAQ_API_KEY (submit --wait, status, list); no key, a wrong key
and a revoked key print the server's `unauthorized: message` and exit 7 (no traceback); another
tenant's job is `job_not_found` (exit 3) from every command; the presigned redirect (bytes checked
against manifest.json), what is served by the API instead (ranges, directory tars, 304), and
`taq download` through the redirect, including a Range resume from S3."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from .conftest import TAQ, calibration_jsonl, make_bucket, serve_embedded, service_env, tiny_spec

pytestmark = pytest.mark.integration

ALPHA_KEY = "alpha-key-0123456789abcdef"
NEED_KEY = (
    "unauthorized: this service needs an API key: send 'Authorization: Bearer <key>'\n"
    "(pass --api-key KEY or set TAQ_API_KEY)\n"
)
BAD_KEY = "unauthorized: invalid or revoked API key\n(pass --api-key KEY or set TAQ_API_KEY)\n"


def cli(
    base_url: str, *args: str, key: str | None = None, cwd: Path | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    """`taq …` as a user runs it; ``key`` goes in TAQ_API_KEY (None: no key at all)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAQ_")}
    env.update({"TAQ_URL": base_url, "COLUMNS": "200", "NO_COLOR": "1"})
    if key is not None:
        env["TAQ_API_KEY"] = key
    return subprocess.run([TAQ, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (result.args, result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    return result


def refused(result: subprocess.CompletedProcess, code: int, stderr: str | None = None, prefix: str | None = None):
    assert result.returncode == code, (result.args, result.returncode, result.stdout, result.stderr)
    assert result.stdout == "" and "Traceback" not in result.stderr
    if stderr is not None:
        assert result.stderr == stderr
    if prefix is not None:
        assert result.stderr.startswith(prefix), result.stderr


def admin(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([TAQ, "admin", *args], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


@pytest.fixture(scope="module")
def svc(tmp_path_factory, tiny_model_root, s3_endpoint):
    data = tmp_path_factory.mktemp("auth-s3")
    bucket = make_bucket(s3_endpoint)
    taq_env = {
        "api_keys": f"alpha:{ALPHA_KEY}",
        "storage_url": f"s3://{bucket}/taq",
        "s3_endpoint_url": s3_endpoint,
        "s3_region": "us-east-1",
        "s3_presign_downloads": "true",
    }
    # a DB-managed key, made before the service starts (same SQLite under TAQ_DATA_DIR)
    created = admin(service_env(data_dir=str(data), **taq_env), "create-key", "--tenant", "beta", "--name", "cli")
    beta_key = created.stdout.strip()
    assert beta_key.startswith("taq_") and "for tenant beta" in created.stderr
    with serve_embedded(data, tiny_model_root, **taq_env) as service:
        base = str(service["client"].base_url).rstrip("/")
        yield {**service, "base": base, "alpha": ALPHA_KEY, "beta": beta_key, "endpoint": s3_endpoint, "bucket": bucket}


@pytest.fixture(scope="module")
def alpha_job(svc, tmp_path_factory):
    """One tiny uniform job (hf + gguf) submitted by tenant alpha through the CLI (TAQ_API_KEY)."""
    tmp = tmp_path_factory.mktemp("alpha")
    (tmp / "cal.jsonl").write_bytes(calibration_jsonl())
    (tmp / "spec.json").write_text(json.dumps(tiny_spec("uniform", exports=["hf", "gguf"])))
    result = ok(
        cli(
            svc["base"],
            "submit",
            "--spec",
            str(tmp / "spec.json"),
            "--calibration",
            str(tmp / "cal.jsonl"),
            "--wait",
            "--json",
            "--interval",
            "0.5",
            key=svc["alpha"],
        )
    )
    job = json.loads(result.stdout)
    assert job["status"] == "succeeded", job
    assert job["spec"]["calibration_dataset_id"].startswith("ds_")
    return job


def test_no_key_wrong_key_exit_7(svc, tmp_path):
    base, job_id = svc["base"], "job_whatever"
    (tmp_path / "cal.jsonl").write_bytes(calibration_jsonl())
    refused(cli(base, "list"), 7, NEED_KEY)
    refused(cli(base, "models", "--json"), 7, NEED_KEY)
    refused(cli(base, "status", job_id), 7, NEED_KEY)
    refused(cli(base, "download", job_id, "hf", "-o", str(tmp_path / "hf.tar")), 7, NEED_KEY)
    # submit fails at the upload, before any job exists
    refused(
        cli(
            base,
            "submit",
            "--model",
            "tiny-llama",
            "--method",
            "taq",
            "--calibration",
            str(tmp_path / "cal.jsonl"),
            "--wait",
        ),
        7,
        NEED_KEY,
    )
    refused(cli(base, "list", "--api-key", "wrong-key-0123456789"), 7, BAD_KEY)
    refused(cli(base, "status", job_id, "--json", key="wrong-key-0123456789"), 7, BAD_KEY)
    assert not (tmp_path / "hf.tar").exists()
    # a key is accepted: the same commands now reach the real answers
    assert "tiny-llama" in [m["id"] for m in json.loads(ok(cli(base, "models", "--json", key=svc["alpha"])).stdout)]
    refused(cli(base, "status", job_id, key=svc["alpha"]), 3, prefix="job_not_found: ")


def test_keyed_cli_and_tenant_isolation(svc, alpha_job, tmp_path):
    base, alpha, beta, job_id = svc["base"], svc["alpha"], svc["beta"], alpha_job["id"]
    # alpha (env key) sees its job
    assert json.loads(ok(cli(base, "status", job_id, "--json", key=alpha)).stdout)["status"] == "succeeded"
    assert job_id in ok(cli(base, "status", job_id, key=alpha)).stdout
    page = json.loads(ok(cli(base, "list", "--json", key=alpha)).stdout)
    assert [j["id"] for j in page["items"]] == [job_id]
    assert job_id in ok(cli(base, "list", key=alpha)).stdout
    # events with the key; --follow honours --after (server-sent events and polling alike)
    ids = [e["id"] for e in json.loads(ok(cli(base, "events", job_id, "--json", key=alpha)).stdout)]
    assert len(ids) >= 3
    for extra in ([], ["--poll"]):
        followed = ok(cli(base, "events", job_id, "--follow", "--json", "--after", str(ids[1]), *extra, key=alpha))
        assert [json.loads(line)["id"] for line in followed.stdout.splitlines()] == ids[2:]
    # beta (DB key via --api-key, which wins over TAQ_API_KEY) sees nothing of it
    assert json.loads(ok(cli(base, "list", "--json", "--api-key", beta, key=alpha)).stdout)["items"] == []
    for args in (
        ["status", job_id],
        ["status", job_id, "--json"],
        ["wait", job_id, "-q"],
        ["cancel", job_id],
        ["events", job_id],
        ["profile", job_id],
        ["download", job_id, "manifest.json", "-o", str(tmp_path / "m.json")],
    ):
        refused(cli(base, *args, "--api-key", beta), 3, f"job_not_found: job '{job_id}' not found\n")
    assert not (tmp_path / "m.json").exists()
    # and beta's own job is invisible to alpha
    (tmp_path / "spec.json").write_text(json.dumps(tiny_spec("uniform")))
    beta_job = ok(cli(base, "submit", "--spec", str(tmp_path / "spec.json"), "--api-key", beta)).stdout.strip()
    assert beta_job.startswith("job_")
    refused(cli(base, "status", beta_job, key=alpha), 3, f"job_not_found: job '{beta_job}' not found\n")
    assert [j["id"] for j in json.loads(ok(cli(base, "list", "--json", key=alpha)).stdout)["items"]] == [job_id]
    assert [j["id"] for j in json.loads(ok(cli(base, "list", "--json", key=beta)).stdout)["items"]] == [beta_job]


def test_revoked_db_key_exit_7(svc):
    created = admin(svc["env"], "create-key", "--tenant", "gamma")
    key = created.stdout.strip()
    key_id = re.match(r"key id (key_\S+) for tenant gamma", created.stderr).group(1)
    assert json.loads(ok(cli(svc["base"], "list", "--json", key=key)).stdout)["items"] == []
    assert admin(svc["env"], "revoke-key", key_id).stdout == f"revoked {key_id}\n"
    # the API trusts a valid key for TAQ_AUTH_CACHE_SECONDS (5 s) without a database read; the
    # revoke, made by another process, takes effect within that
    time.sleep(5.5)
    refused(cli(svc["base"], "list", key=key), 7, BAD_KEY)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_s3_download_redirects_to_presigned_url(svc, alpha_job):
    client, job_id, endpoint = svc["client"], alpha_job["id"], svc["endpoint"]
    auth = {"Authorization": f"Bearer {svc['alpha']}"}
    listing = {a["name"]: a for a in client.get(f"/v1/jobs/{job_id}/artifacts", headers=auth).json()}
    assert {"manifest.json", "profile.json", "profile.png", "bitmap.json", "hf", "model.gguf"} <= set(listing)

    def presigned(name: str) -> str:
        response = client.get(f"/v1/jobs/{job_id}/artifacts/{name}", headers=auth)  # redirects not followed
        assert response.status_code == 307, (name, response.status_code, response.text[:300])
        location = response.headers["location"]
        assert location.startswith(f"{endpoint}/{svc['bucket']}/taq/jobs/{job_id}/artifacts/{name}?")
        assert "Signature" in location and "Expires=" in location
        return location

    # manifest.json through the redirect, fetched with no credentials of ours
    location = presigned("manifest.json")
    redirect = client.get(f"/v1/jobs/{job_id}/artifacts/manifest.json", headers=auth)
    assert redirect.headers["etag"] == f'"{listing["manifest.json"]["sha256"]}"'
    assert redirect.headers["x-checksum-sha256"] == listing["manifest.json"]["sha256"]
    fetched = httpx.get(location, timeout=60)
    assert fetched.status_code == 200
    assert _sha(fetched.content) == listing["manifest.json"]["sha256"]
    assert fetched.headers["content-disposition"] == 'attachment; filename="manifest.json"'
    manifest = json.loads(fetched.content)

    # every file the manifest names, each through its own presigned URL, matches the manifest
    names = [entry["name"] for entry in manifest["files"]]
    assert "model.gguf" in names and "hf/config.json" in names and "profile.json" in names
    for entry in manifest["files"]:
        body = httpx.get(presigned(entry["name"]), timeout=60).content
        assert (len(body), _sha(body)) == (entry["size"], entry["sha256"]), entry["name"]

    # a client that follows redirects with its Authorization header still gets the bytes (httpx,
    # like curl, drops the header on the cross-origin hop, and S3 would refuse two auth schemes)
    with httpx.Client(base_url=str(client.base_url), headers=auth, follow_redirects=True, timeout=60) as follow:
        gguf = follow.get(f"/v1/jobs/{job_id}/artifacts/model.gguf")
        assert gguf.status_code == 200 and [r.status_code for r in gguf.history] == [307]
        assert _sha(gguf.content) == listing["model.gguf"]["sha256"]

        # served by the API itself: ranges (If-Range needs our sha256 ETag), directory tars, 304
        part = follow.get(f"/v1/jobs/{job_id}/artifacts/model.gguf", headers={"Range": "bytes=100-1123"})
        assert part.status_code == 206 and not part.history and part.content == gguf.content[100:1124]
        assert part.headers["content-range"] == f"bytes 100-1123/{len(gguf.content)}"
        tar = follow.get(f"/v1/jobs/{job_id}/artifacts/hf")
        assert tar.status_code == 200 and not tar.history and _sha(tar.content) == listing["hf"]["sha256"]
        etag = f'"{listing["model.gguf"]["sha256"]}"'
        assert follow.get(f"/v1/jobs/{job_id}/artifacts/model.gguf", headers={"If-None-Match": etag}).status_code == 304

    # no redirect (and so no URL) for another tenant or without a key
    other = client.get(f"/v1/jobs/{job_id}/artifacts/model.gguf", headers={"Authorization": f"Bearer {svc['beta']}"})
    assert other.status_code == 404 and "location" not in other.headers
    assert other.json()["error"]["code"] == "job_not_found"
    anonymous = client.get(f"/v1/jobs/{job_id}/artifacts/model.gguf")
    assert anonymous.status_code == 401 and "location" not in anonymous.headers


def test_cli_download_through_redirect_and_resume(svc, alpha_job, tmp_path, caplog):
    base, alpha, job_id = svc["base"], svc["alpha"], alpha_job["id"]
    caplog.set_level(logging.INFO, logger="werkzeug")  # moto runs in this process: its access log

    def presigned_gets(name: str) -> int:
        path = f"GET /{svc['bucket']}/taq/jobs/{job_id}/artifacts/{name}?"
        return sum(1 for r in caplog.records if path in r.getMessage() and "Signature=" in r.getMessage())

    listing = {
        a["name"]: a
        for a in svc["client"].get(f"/v1/jobs/{job_id}/artifacts", headers={"Authorization": f"Bearer {alpha}"}).json()
    }
    # whole files: the CLI follows the 307 to S3 and verifies the sha256
    target = tmp_path / "model.gguf"
    info = json.loads(ok(cli(base, "download", job_id, "model.gguf", "-o", str(target), "--json", key=alpha)).stdout)
    assert info == {
        "name": "model.gguf",
        "path": str(target),
        "size": listing["model.gguf"]["size"],
        "sha256": listing["model.gguf"]["sha256"],
        "resumed_from": 0,
    }
    full = target.read_bytes()
    assert _sha(full) == listing["model.gguf"]["sha256"]
    assert presigned_gets("model.gguf") == 1  # the bytes came from the presigned URL
    config = next(f for f in listing["hf"]["files"] if f["name"] == "hf/config.json")
    ok(cli(base, "download", job_id, "hf/config.json", key=alpha, cwd=tmp_path))
    assert _sha((tmp_path / "config.json").read_bytes()) == config["sha256"]
    assert presigned_gets("hf/config.json") == 1

    # an interrupted download resumes with Range (answered 206 by the API, read from S3)
    half = len(full) // 2
    target.write_bytes(full[:half])
    info = json.loads(
        ok(cli(base, "download", job_id, "model.gguf", "-o", str(target), "--json", "--api-key", alpha)).stdout
    )
    assert info["resumed_from"] == half and target.read_bytes() == full
    assert presigned_gets("model.gguf") == 1  # a ranged request is not redirected

    # the directory tar, streamed from S3 objects, resumes the same way
    tar_target = tmp_path / "hf.tar"
    ok(cli(base, "download", job_id, "hf", "-o", str(tar_target), key=alpha))
    tar = tar_target.read_bytes()
    assert _sha(tar) == listing["hf"]["sha256"]
    tar_target.write_bytes(tar[:1000])
    info = json.loads(ok(cli(base, "download", job_id, "hf", "-o", str(tar_target), "--json", key=alpha)).stdout)
    assert info["resumed_from"] == 1000 and tar_target.read_bytes() == tar

    # a corrupt partial file still ends in exit 6 and is removed
    target.write_bytes(b"\0" * half)
    refused(
        cli(base, "download", job_id, "model.gguf", "-o", str(target), "--json", key=alpha),
        6,
        prefix="checksum_mismatch: ",
    )
    assert not target.exists()
