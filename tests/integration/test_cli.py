"""The `taq` client commands as a user runs them: subprocesses against a live `taq serve` on the
embedded default (the `served` fixture of test_embedded, one service for this module) with the
tiny Llama. Covers submit --wait to success, the --json read commands, download with sha256
verification and Range resume, a job that fails at run time, cancel, and the documented exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess

import pytest

from .conftest import CALIBRATION, TAQ, calibration_jsonl, tiny_spec
from .test_embedded import served  # noqa: F401  (module-scoped `taq serve`, reused, not duplicated)

pytestmark = pytest.mark.integration


def taq(base_url: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAQ_")}
    env.update({"TAQ_URL": base_url, "COLUMNS": "200", "NO_COLOR": "1"})
    return subprocess.run([TAQ, *args], env=env, capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (result.args, result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture(scope="module")
def svc(served):  # noqa: F811
    return str(served["client"].base_url).rstrip("/")


@pytest.fixture(scope="module")
def done_job(svc, tmp_path_factory):
    """One uniform job submitted through the CLI (spec file + options + uploaded calibration)."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "cal.jsonl").write_bytes(calibration_jsonl())
    base = tiny_spec("uniform", model="not-this-one", bit_budget={"avg_bits": 4.5})
    (tmp / "spec.json").write_text(json.dumps(base))
    result = ok(
        taq(
            svc,
            "submit",
            "--spec",
            str(tmp / "spec.json"),
            "--model",
            "tiny-llama",
            "--method",
            "uniform",
            "--calibration",
            str(tmp / "cal.jsonl"),
            "--avg-bits",
            "6",
            "--bit-choices",
            "4,8",
            "--group-size",
            "32",
            "--export",
            "hf",
            "--seed",
            "0",
            "--allocation-unit",
            "linear",
            "--quantizer",
            "gptq",
            "--clip-search",
            "--wait",
            "--json",
            "--interval",
            "0.5",
        )
    )
    job = json.loads(result.stdout)
    assert job["status"] == "succeeded", job
    assert job["spec"]["model"] == "tiny-llama" and job["spec"]["calibration_dataset_id"].startswith("ds_")
    assert job["spec"]["bit_budget"] == {"avg_bits": 6.0} and job["spec"]["bit_choices"] == [4, 8]
    assert (job["spec"]["allocation_unit"], job["spec"]["quantizer"], job["spec"]["clip_search"]) == (
        "linear",
        "gptq",
        True,
    )
    return job


def test_submit_wait_and_read_commands(svc, done_job, tmp_path):
    job_id = done_job["id"]
    assert json.loads(ok(taq(svc, "status", job_id, "--json")).stdout)["status"] == "succeeded"
    assert job_id in ok(taq(svc, "status", job_id)).stdout
    page = json.loads(ok(taq(svc, "list", "--status", "succeeded", "--limit", "5", "--json")).stdout)
    assert page["items"][0]["id"] == job_id and all(j["status"] == "succeeded" for j in page["items"])
    assert job_id in ok(taq(svc, "list", "--limit", "3")).stdout
    png = tmp_path / "profile.png"
    profile = json.loads(ok(taq(svc, "profile", job_id, "--json", "--png", str(png))).stdout)
    assert [l["index"] for l in profile["layers"]] == [0, 1, 2, 3]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "model.layers.0" in ok(taq(svc, "profile", job_id)).stdout
    events = json.loads(ok(taq(svc, "events", job_id, "--json")).stdout)
    assert [e["status"] for e in events if e["kind"] == "status"] == ["queued", "running", "succeeded"]
    followed = [json.loads(line) for line in ok(taq(svc, "events", job_id, "--follow", "--json")).stdout.splitlines()]
    assert [e["id"] for e in followed] == [e["id"] for e in events]  # SSE replay up to the end event
    polled = ok(taq(svc, "events", job_id, "--follow", "--poll")).stdout
    assert "status=succeeded" in polled
    models = json.loads(ok(taq(svc, "models", "--json")).stdout)
    assert "tiny-llama" in [m["id"] for m in models]


def test_download_verifies_and_resumes(svc, done_job, served, tmp_path):  # noqa: F811
    job_id = done_job["id"]
    listing = {a["name"]: a for a in served["client"].get(f"/v1/jobs/{job_id}/artifacts").json()}
    info = json.loads(
        ok(taq(svc, "download", job_id, "manifest.json", "-o", str(tmp_path / "m.json"), "--json")).stdout
    )
    assert info["sha256"] == listing["manifest.json"]["sha256"] and info["resumed_from"] == 0
    assert hashlib.sha256((tmp_path / "m.json").read_bytes()).hexdigest() == info["sha256"]

    # a directory artifact downloads as its .tar; an interrupted download resumes with Range
    full = served["client"].get(f"/v1/jobs/{job_id}/artifacts/hf").content
    assert hashlib.sha256(full).hexdigest() == listing["hf"]["sha256"]
    target = tmp_path / "hf.tar"
    half = len(full) // 2
    target.write_bytes(full[:half])
    info = json.loads(ok(taq(svc, "download", job_id, "hf", "-o", str(target), "--json")).stdout)
    assert info["resumed_from"] == half  # the server answered the Range request with 206
    assert target.read_bytes() == full and info["sha256"] == listing["hf"]["sha256"]
    # already complete: nothing fetched, still verified
    assert json.loads(ok(taq(svc, "download", job_id, "hf", "-o", str(target), "--json")).stdout)["resumed_from"] == 0

    # a corrupt partial file: the resumed bytes do not add up -> exit 6, file removed
    target.write_bytes(b"\0" * half)
    bad = taq(svc, "download", job_id, "hf", "-o", str(target))
    assert bad.returncode == 6, (bad.stdout, bad.stderr)
    assert "checksum_mismatch" in bad.stderr and not target.exists()

    # one file of the directory, default output name in the working directory
    name = listing["hf"]["files"][0]["name"]
    result = subprocess.run(
        [TAQ, "download", job_id, name, "--url", svc], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert (
        hashlib.sha256((tmp_path / name.split("/")[-1]).read_bytes()).hexdigest() == listing["hf"]["files"][0]["sha256"]
    )


def test_failed_job_exits_1(svc, tmp_path):
    # one calibration row with a held-out eval fraction leaves nothing to calibrate on: the worker
    # fails the job at the calibrate stage (a run-time failure, not a 422 at submit)
    (tmp_path / "one.jsonl").write_bytes(calibration_jsonl(CALIBRATION[:1]))
    (tmp_path / "spec.json").write_text(json.dumps(tiny_spec("taq", calibration=None, eval_fraction=0.5)))
    result = taq(
        svc,
        "submit",
        "--spec",
        str(tmp_path / "spec.json"),
        "--calibration",
        str(tmp_path / "one.jsonl"),
        "--wait",
        "--interval",
        "0.5",
    )
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "failed" in result.stderr and "eval_fraction" in result.stderr and "Traceback" not in result.stderr


def test_cancel_and_timeout(svc, tmp_path):
    # a budget sweep with both formats: long enough that it is still running when `taq wait`
    # (a fresh process) gives up after 0.01 s, even on a loaded machine
    sweep = tiny_spec("taq", bit_budget={"avg_bits": [5.0, 6.0, 7.0, 8.0, 8.5]}, exports=["gguf", "hf"])
    (tmp_path / "spec.json").write_text(json.dumps(sweep))
    job_id = ok(taq(svc, "submit", "--spec", str(tmp_path / "spec.json"))).stdout.strip()
    timed_out = taq(svc, "wait", job_id, "--timeout", "0.01", "-q")
    assert timed_out.returncode == 5 and "timeout" in timed_out.stderr
    cancelled = taq(svc, "cancel", job_id, "--json")
    if cancelled.returncode == 0:  # queued or running: cancelled / flagged
        assert json.loads(cancelled.stdout)["cancel_requested"] is True
        waited = taq(svc, "wait", job_id, "--timeout", "120", "--json", "-q")
        status = json.loads(waited.stdout)["status"]
        assert waited.returncode == (0 if status == "succeeded" else 1), (status, waited.stderr)
    else:  # it finished before the cancel arrived: 409 job_finished
        assert cancelled.returncode == 3 and "job_finished" in cancelled.stderr
    again = taq(svc, "cancel", job_id)
    assert again.returncode == 3 and again.stderr.startswith("job_finished: ")


def test_server_errors_and_unreachable(svc, tmp_path):
    missing = taq(svc, "status", "job_does_not_exist")
    assert missing.returncode == 3 and missing.stderr.startswith("job_not_found: "), missing.stderr
    assert taq(svc, "download", "job_does_not_exist", "hf").returncode == 3
    bad_spec = taq(svc, "submit", "--model", "no-such-model", "--method", "uniform", "--avg-bits", "4.5")
    assert bad_spec.returncode == 3 and "model_not_found" in bad_spec.stderr, bad_spec.stderr
    usage = taq(svc, "submit", "--spec", str(tmp_path / "nope.json"))
    assert usage.returncode == 2 and "Traceback" not in usage.stderr
    pair = taq(svc, "submit", "--model", "m", "--group-size-at", "8:128")
    assert pair.returncode == 2 and "BITS=SIZE" in pair.stderr and "'8:128'" in pair.stderr, pair.stderr
    # a well-formed pair the server refuses: 8 bits is not on the menu
    unused = taq(svc, "submit", "--model", "m", "--method", "uniform", "--avg-bits", "4.5", "--bit-choices", "4,16",
                 "--group-size-at", "8=128")  # fmt: skip
    assert unused.returncode == 3 and "group_size_by_bits" in unused.stderr, unused.stderr
    down = taq("http://127.0.0.1:9", "list")
    assert down.returncode == 4 and "cannot reach" in down.stderr


def test_status_shows_the_evaluation_and_profile_the_bits_of_each_budget(svc, tmp_path):
    # an evaluated taq sweep: `status` prints one evaluation table per budget, `profile` one bits
    # column per budget (a sweep's profile holds no single choice)
    spec = tiny_spec(
        "taq", bit_budget={"avg_bits": [5.0, 8.0]}, eval_fraction=0.5, calibration=CALIBRATION * 2, exports=["hf"]
    )
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    job = json.loads(
        ok(taq(svc, "submit", "--spec", str(tmp_path / "spec.json"), "--wait", "--json", "--interval", "0.5")).stdout
    )
    assert job["status"] == "succeeded", job["error"]
    shown = ok(taq(svc, "status", job["id"])).stdout
    assert shown.count("evaluation · budget") == 2 and "budget 5.0 bits" in shown and "budget 8.0 bits" in shown
    for variant in ("full precision", "quantized", "uniform", "error only", "random"):
        assert shown.count(variant) >= 2, shown
    # the quantized model against each control, per budget, with a verdict
    assert shown.count("quantized vs task-agnostic controls") == 2, shown
    assert re.search(r"(beats|loses|no difference)", shown), shown
    assert "gold NLL" in shown and re.search(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", shown), shown
    profile = ok(taq(svc, "profile", job["id"])).stdout
    assert "bits @5.0" in profile and "bits @8.0" in profile
    bits = {b["avg_bits"]: b["bits"] for b in job["result"]["budgets"]}
    row = next(line for line in profile.splitlines() if "model.layers.0" in line)
    cells = [cell.strip() for cell in row.split("│") if cell.strip()]
    assert cells[-2:] == [str(bits[5.0]["model.layers.0"]), str(bits[8.0]["model.layers.0"])], row


def test_datasets_and_delete(svc, tmp_path):
    # an uploaded dataset is listed, a finished job deleted, then its dataset (no job reads it now)
    (tmp_path / "cal.jsonl").write_bytes(calibration_jsonl())
    (tmp_path / "spec.json").write_text(json.dumps(tiny_spec("taq", calibration=None)))
    job = json.loads(
        ok(
            taq(
                svc,
                "submit",
                "--spec",
                str(tmp_path / "spec.json"),
                "--calibration",
                str(tmp_path / "cal.jsonl"),
                "--wait",
                "--json",
                "--interval",
                "0.5",
            )
        ).stdout
    )
    dataset_id = job["spec"]["calibration_dataset_id"]
    page = json.loads(ok(taq(svc, "datasets", "list", "--json")).stdout)
    assert dataset_id in [d["id"] for d in page["items"]]
    assert dataset_id in ok(taq(svc, "datasets", "list", "--limit", "50")).stdout
    assert ok(taq(svc, "delete", job["id"])).stdout.strip() == f"{job['id']} deleted"
    gone = taq(svc, "status", job["id"])
    assert gone.returncode == 3 and gone.stderr.startswith("job_not_found: ")
    assert ok(taq(svc, "datasets", "delete", dataset_id)).stdout.strip() == f"{dataset_id} deleted"
    assert dataset_id not in [d["id"] for d in json.loads(ok(taq(svc, "datasets", "list", "--json")).stdout)["items"]]
    again = taq(svc, "datasets", "delete", dataset_id)
    assert again.returncode == 3 and "not_found" in again.stderr


def test_closed_loop_job_says_what_it_shipped(svc, tmp_path):
    """A taq_grad job with --closed-loop through the CLI: the result names the candidate shipped
    and every candidate's held-back gold NLL, and `taq status` prints it."""
    rows = [{"prompt": f"What is {i} plus {i}?", "answers": [str(2 * i)]} for i in range(8)]
    (tmp_path / "cal.jsonl").write_bytes(calibration_jsonl(rows))
    (tmp_path / "spec.json").write_text(json.dumps(tiny_spec("taq_grad", calibration=None)))
    result = ok(
        taq(
            svc,
            "submit",
            "--spec",
            str(tmp_path / "spec.json"),
            "--calibration",
            str(tmp_path / "cal.jsonl"),
            "--closed-loop",
            "--wait",
            "--json",
            "--interval",
            "0.5",
        )
    )
    job = json.loads(result.stdout)
    assert job["status"] == "succeeded", job
    assert job["spec"]["closed_loop"] is True and job["spec"]["method"] == "taq_grad"
    (budget,) = job["result"]["budgets"]
    loop = budget["closed_loop"]
    assert loop["holdout_rows"] == 4
    names = [c["name"] for c in loop["candidates"]]
    assert names[:3] == ["allocation", "uniform", "error_only"] and loop["shipped"] in names
    assert "new_tokens" in loop["answers_check"]  # the CLI's worker has no memory limit: it generated
    assert all(isinstance(c["answers_fewer"], bool) for c in loop["candidates"])
    best = min((c for c in loop["candidates"] if not c["answers_fewer"]), key=lambda c: c["measured_gold_nll"])
    assert loop["shipped"] == best["name"] and "closed loop" in budget["solver"]
    status = ok(taq(svc, "status", job["id"])).stdout
    assert "closed loop" in status and f"shipped {loop['shipped']}" in status
