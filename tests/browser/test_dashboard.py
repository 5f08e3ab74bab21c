"""The dashboard (/ui) in a real browser against the real service on the embedded default.

`taq api` and a `taq worker` run as subprocesses on SQLite, file:// storage and the filesystem
broker with an API key required, the tiny random Llama as the model. The worker starts only once
the browser has queued its jobs, so the job cancelled in the browser is still queued (no race), and
the job page is open before the job starts, so its progress can only arrive live. The tests run in
order and share the browser page: a wrong key answers 401 in words; sign in; the form uploads a
bad JSONL (per-line problems shown), the calibration and eval files, is refused an infeasible
budget with the API's words, then submits a two-budget sweep; a queued job is cancelled from the
list; the job page follows the event stream to `succeeded` without a reload, draws the profile
and the Pareto plot and shows the eval table; an artifact is downloaded through fetch → Blob and
its sha256 matches the API's; two profiles are compared; 404s and phone width; no script error
and no Content-Security-Policy violation on the way. A keyless service skips the sign-in, and
when it stops the jobs page says it cannot reach it."""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path

import pytest
from integration.conftest import CALIBRATION, TAQ, Proc, free_port, http, service_env, tiny_spec, wait_for

from .conftest import write_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.browser]

KEY = "ui-test-key-0123456789abcdef"
WRONG_KEY = "not-the-key-0123456789"
EVAL_ROWS = [
    {"prompt": "What is the capital of Germany?", "answers": ["Berlin"]},
    {"prompt": "What is the capital of Egypt?", "answers": ["Cairo"]},
    {"prompt": "What is the capital of Peru?", "answers": ["Lima"]},
]

# canvas pixels that are not transparent: the chart has drawn
DRAWN = """(id) => {
  const c = document.getElementById(id);
  if (!c || !c.width || !c.height) return false;
  const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let painted = 0;
  for (let i = 3; i < data.length; i += 4) if (data[i]) painted += 1;
  return painted > 2000;
}"""


def start_api(data: Path, model_root: Path, **taq: str) -> tuple[Proc, str, dict]:
    port = free_port()
    env = service_env(data_dir=str(data), model_roots=str(model_root), **taq)
    proc = Proc([TAQ, "api", "--host", "127.0.0.1", "--port", str(port)], env, data / "api.log")
    base = f"http://127.0.0.1:{port}"
    with http(base) as client:

        def ready():
            assert proc.alive(), proc.tail()
            try:
                return client.get("/readyz").status_code == 200
            except Exception:
                return False

        wait_for(ready, 120, what="taq api /readyz")
    return proc, base, env


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model_root):
    data = tmp_path_factory.mktemp("dashboard")
    api, base, env = start_api(data, tiny_model_root, api_keys=f"acme:{KEY}")
    client = http(base, {"Authorization": f"Bearer {KEY}"})
    state = {"base": base, "client": client, "env": env, "data": data, "workers": []}
    try:
        yield state
    finally:
        for worker in state["workers"]:
            worker.stop(signal.SIGTERM)
        api.stop(signal.SIGINT)
        client.close()


@pytest.fixture(scope="module")
def page(chromium, service):
    context = chromium.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    problems: list[str] = []
    pg.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    pg.on(
        "console",
        lambda msg: (
            problems.append(f"console: {msg.text}")
            if msg.type == "error" and "Content Security Policy" in msg.text
            else None
        ),
    )
    pg.problems = problems
    yield pg
    context.close()


def test_root_redirects_and_a_wrong_key_is_refused_in_words(page, service):
    base = service["base"]
    headers = service["client"].get("/ui/").headers
    assert "default-src 'self'" in headers["content-security-policy"]
    assert "unsafe-inline" not in headers["content-security-policy"]
    page.goto(base + "/")
    assert page.url.startswith(base + "/ui/")
    page.wait_for_selector("#login-form")
    page.fill("#api-key", WRONG_KEY)
    page.click("#sign-in")
    error = page.wait_for_selector("#login-error:not([hidden])")
    assert "401 unauthorized" in error.inner_text()
    assert "invalid or revoked API key" in error.inner_text()
    assert page.evaluate("sessionStorage.getItem('taq.apiKey')") is None


def test_sign_in_and_submit_a_job_through_the_form(page, service, tmp_path):
    page.fill("#api-key", KEY)
    page.click("#sign-in")
    page.wait_for_selector("text=No jobs yet")
    assert page.evaluate("sessionStorage.getItem('taq.apiKey')") == KEY
    page.click("a[data-route=new]")
    page.wait_for_selector("#new-job-form")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\nnot json\n{"prompt": "x", "extra": 1}\n')
    page.set_input_files("#calibration-file", str(bad))
    refused = page.wait_for_selector("#calibration-status .error-block")
    text = refused.inner_text()
    assert "invalid_dataset" in text and "invalid JSON" in text
    assert [r.inner_text() for r in page.query_selector_all("#calibration-status tbody tr td:first-child")] == [
        "2",
        "3",
    ]

    page.set_input_files("#calibration-file", str(write_jsonl(tmp_path / "cal.jsonl", CALIBRATION)))
    assert "4 rows, with gold answers" in page.wait_for_selector("#calibration-status .ok").inner_text()
    page.select_option("#eval-mode", "dataset")
    page.set_input_files("#eval-file", str(write_jsonl(tmp_path / "eval.jsonl", EVAL_ROWS)))
    page.wait_for_selector("#eval-status .ok")
    page.select_option("#model", "tiny-llama")
    page.select_option("#method", "taq")
    page.uncheck("input[name=bit-choices][value='16']")
    page.fill("#group-size", "32")
    page.check("input[name=exports][value=gguf]")
    page.click("details.advanced summary")
    page.fill("#max-calibration-rows", "8")
    page.fill("#max-tokens", "32")
    page.fill("#reservoir-size", "16")
    page.fill("#group-size-by-bits", "8:64")
    assert "not BITS=SIZE" in (page.text_content("#spec-preview") or "")
    page.fill("#group-size-by-bits", "8=64")

    page.fill("#budgets", "3")  # below 4-bit's effective bits: the API refuses, the page says why
    page.click("#submit-job")
    refusal = page.wait_for_selector("#submit-error [data-code=budget_infeasible]")
    assert "raise avg_bits" in refusal.inner_text() and "min avg bits" in refusal.inner_text().lower()

    page.fill("#budgets", "5.5, 6")
    page.click("#submit-job")
    page.wait_for_url("**/ui/#/job/job_*")
    job_id = page.url.rsplit("/", 1)[1]
    page.wait_for_selector("#job-status [data-status=queued]")
    job = service["client"].get(f"/v1/jobs/{job_id}").json()
    assert job["spec"]["bit_budget"]["avg_bits"] == [5.5, 6.0] and job["spec"]["bit_choices"] == [4, 8]
    assert job["spec"]["exports"] == ["gguf", "hf"] and job["spec"]["eval_dataset_id"]
    assert job["spec"]["group_size_by_bits"] == {"8": 64}
    service["job"] = job_id


def test_cancel_a_queued_job_from_the_list(page, service):
    client = service["client"]
    other = client.post("/v1/jobs", json=tiny_spec("uniform")).json()["id"]
    page.click("a[data-route=jobs]")
    button = page.wait_for_selector(f"tr[data-job='{other}'] button[data-action=cancel]")
    button.click()
    assert button.inner_text() == "Confirm cancel"
    button.click()
    page.wait_for_selector(f"tr[data-job='{other}'][data-status=cancelled]")
    assert client.get(f"/v1/jobs/{other}").json()["status"] == "cancelled"
    page.select_option("#status-filter", "queued")
    page.wait_for_url("**/ui/#/jobs?status=queued")
    page.wait_for_selector(f"tr[data-job='{service['job']}'][data-status=queued]")
    assert page.query_selector(f"tr[data-job='{other}']") is None


def test_the_job_page_follows_the_job_live_to_success(page, service):
    job_id = service["job"]
    page.goto(f"{service['base']}/ui/#/job/{job_id}")
    page.wait_for_selector("#job-status [data-status=queued]")
    page.evaluate("window.__sameDocument = true")
    worker = Proc([TAQ, "worker"], service["env"], service["data"] / "worker.log")
    service["workers"].append(worker)
    page.wait_for_selector("#job-status [data-status=running]", timeout=120_000)
    page.wait_for_selector("#job-status [data-status=succeeded]", timeout=240_000)
    assert page.evaluate("window.__sameDocument") is True, "the page reloaded instead of updating live"
    states = page.eval_on_selector_all("#timeline li", "els => els.map(e => [e.dataset.stage, e.dataset.state])")
    assert [s for s, _ in states] == [
        "load",
        "calibrate",
        "score",
        "allocate",
        "quantize",
        "export",
        "evaluate",
        "publish",
    ]
    assert {state for _, state in states} <= {"done", "skipped"}, states

    page.wait_for_function(DRAWN, arg="profile-chart", timeout=30_000)
    labels = page.evaluate("Chart.getChart(document.getElementById('profile-chart')).data.labels")
    assert labels == ["0", "1", "2", "3"]
    variants = page.eval_on_selector_all("#eval-table tbody tr", "rows => rows.map(r => r.dataset.variant)")
    assert variants[:2] == ["full_precision", "quantized"], variants
    cells = page.eval_on_selector_all(
        "#eval-table tbody tr[data-variant=quantized] td", "tds => tds.map(t => t.textContent)"
    )
    assert any("[" in c and "]" in c for c in cells), cells  # an interval: mean [low, high]
    page.wait_for_function(DRAWN, arg="pareto-chart", timeout=30_000)
    assert len(page.query_selector_all("#evaluation .tab")) == 2  # one tab per budget


def test_download_an_artifact_with_its_sha256(page, service):
    listing = service["client"].get(f"/v1/jobs/{service['job']}/artifacts").json()
    for artifact in (
        next(a for a in listing if a["format"] == "gguf"),
        next(a for a in listing if a["kind"] == "directory"),
    ):
        with page.expect_download() as download_info:
            page.click(f"button[data-download='{artifact['name']}']")
        download = download_info.value
        expected_name = artifact["name"] + (".tar" if artifact["kind"] == "directory" else "")
        assert download.suggested_filename == expected_name
        body = Path(download.path()).read_bytes()
        assert len(body) == artifact["size"]
        assert hashlib.sha256(body).hexdigest() == artifact["sha256"]
        page.wait_for_selector(f"[data-status='{artifact['name']}']:has-text('sha256 verified')")
    page.click("#manifest-section summary")
    assert '"manifest_version"' in page.wait_for_selector("#manifest:has-text('manifest_version')").inner_text()


def test_compare_two_profiles_on_one_chart(page, service):
    job_id = service["job"]
    page.goto(f"{service['base']}/ui/#/compare?a={job_id}&b={job_id}")
    page.wait_for_function(DRAWN, arg="compare-chart")
    series = page.evaluate("Chart.getChart(document.getElementById('compare-chart')).data.datasets.map(d => d.label)")
    assert sum(not s.endswith(": bits") for s in series) == 2, series
    assert "1.000" in page.inner_text("#compare-summary")  # a profile against itself


# eval.json as the documented contract allows it to grow: more variants, a `variants` map,
# `comparisons`, a per-variant map the page has never heard of ("retained"), missing metrics
GROWN_REPORT = {
    "dataset": "ds_x",
    "n_items": 3,
    "meta": {"avg_bits": 4.5, "effective_bits": 4.5},
    "teacher_forced": {
        "uniform": {"gold_nll": {"mean": 2.0, "low": 1.5, "high": 2.5, "n": 3, "alpha": 0.05}, "mean_kl": 0.2},
        "full_precision": {"gold_nll": {"mean": 1.5, "low": 1.0, "high": 2.0, "n": 3, "alpha": 0.05}, "mean_kl": 0.0},
        "quantized": {"gold_nll": None, "mean_kl": 0.1, "items": [{"x": 1}]},
        "random": {"mean_kl": 0.3},
    },
    "metrics": {
        "full_precision": {"contains": {"mean": 0.5, "low": 0.2, "high": 0.8}},
        "quantized": {"contains": {"mean": 0.4, "low": 0.1, "high": 0.7}, "items": []},
    },
    "delta_vs_full_precision": {"quantized": {"contains": {"mean": -0.1, "low": -0.3, "high": 0.1}}},
    "variants": {
        "quantized": {"effective_bits": 4.5, "rule": "budget", "bits_histogram": {"4": 20, "8": 10}},
        "uniform": {"effective_bits": 4.25},
        "random": {"effective_bits": 4.49},
    },
    "comparisons": [
        {
            "variant": "quantized",
            "baseline": "uniform",
            "metric": "contains",
            "verdict": "no_difference",
            "difference": {"mean": -0.1, "low": -0.2, "high": 0.05, "alpha": 0.05},
        }
    ],
    "retained": {"quantized": {"mean": 0.9, "low": 0.7, "high": 1.1}},
    "something_new": [1, 2],
}


def test_the_eval_table_renders_what_the_report_has(page, service):
    page.goto(f"{service['base']}/ui/#/jobs")
    page.wait_for_selector("#jobs-body")
    seen = page.evaluate(
        """async (report) => {
      const m = await import('/ui/static/js/evaltable.js');
      const text = (el, sel) => [...el.querySelectorAll(sel)].map((x) => x.textContent);
      const grown = m.reportView(report);
      const out = {
        rows: [...grown.querySelectorAll('#eval-table tbody tr')].map((r) => r.dataset.variant),
        headers: text(grown, '#eval-table thead th'),
        quantized: text(grown, '#eval-table tr[data-variant=quantized] td'),
        variants: text(grown, '#eval-variants tbody td'),
        comparisons: text(grown, '#eval-comparisons tbody td'),
      };
      for (const odd of [{}, {budgets: []}, {teacher_forced: null, metrics: 3}, {budgets: [{}, {meta: null}]}]) {
        m.evalSection(odd).after();
      }
      return out;
    }""",
        GROWN_REPORT,
    )
    assert seen["rows"] == ["full_precision", "quantized", "uniform", "random"]
    assert "retained" in seen["headers"] and "contains ↑" in seen["headers"]
    assert "—" in seen["quantized"] and "0.9 [0.7, 1.1]" in seen["quantized"]  # no gold NLL; retained
    assert "4: 20 · 8: 10" in seen["variants"]
    assert "-0.1 [-0.2, +0.05]" in seen["comparisons"] and "no difference" in seen["comparisons"]


def test_errors_are_words_and_phone_width_fits(page, service):
    page.goto(f"{service['base']}/ui/#/job/job_doesnotexist")
    assert "404 not found" in page.wait_for_selector(".card .error").inner_text()
    page.set_viewport_size({"width": 375, "height": 800})
    for route in (f"#/job/{service['job']}", "#/jobs", "#/new", "#/compare"):
        page.goto(f"{service['base']}/ui/{route}")
        page.wait_for_selector(".card h1, .card h2")
        if route.startswith("#/job/"):
            page.wait_for_function(DRAWN, arg="profile-chart")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, f"{route} is {width} px wide at a 375 px viewport"
    page.set_viewport_size({"width": 1280, "height": 900})
    assert not page.problems, page.problems


def test_a_keyless_service_needs_no_sign_in_and_an_outage_is_told(chromium, tmp_path, tiny_model_root):
    api, base, _ = start_api(tmp_path, tiny_model_root)
    context = chromium.new_context()
    try:
        pg = context.new_page()
        pg.goto(base + "/ui/")
        pg.wait_for_selector("text=No jobs yet")
        assert pg.inner_text("#who-label") == "keyless service"
        api.stop(signal.SIGINT)  # the list polls every 2 s: the next poll finds nobody
        told = pg.wait_for_selector("text=Cannot reach the service", timeout=15_000).inner_text()
        assert told.startswith("Live update failed: Cannot reach the service"), told
    finally:
        context.close()
        api.stop(signal.SIGINT)
