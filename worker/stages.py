"""Stage orchestration of one claimed job.

``load → calibrate → score → allocate → quantize → export → evaluate → publish``. Every stage that
produces something writes it to storage under ``jobs/{job_id}/`` before the next one starts, so a
job retried after a crash resumes at the first stage whose output is missing:

| stage    | output (checkpoint)                                         | on resume                 |
|----------|-------------------------------------------------------------|---------------------------|
| score    | ``artifacts/profile.json`` (+ rows in ``profile_layers``)    | loaded, passed as profile |
| allocate | ``artifacts/bitmap.json``, profile with bits, ``profile.png``| loaded                    |
| quantize | in memory only (re-run when export or evaluate still needed) |                           |
| export   | ``artifacts/hf/…``, ``artifacts/model.gguf`` + ``work/export-<tag>.json`` | skipped      |
| evaluate | ``artifacts/eval.json``                                      | skipped                   |
| publish  | ``artifacts/manifest.json``, artifact rows, result, status   |                           |

Cancellation is cooperative: ``should_cancel`` (polled against the DB at most every
``TAQ_CANCEL_POLL_SECONDS``) is handed to core and checked between stages.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import delete

from common.artifacts import tar_digest, tar_layout
from common.db import session_scope
from common.lifecycle import (Claim, finish_job, heartbeat, purge_job_outputs, record_stage_run,
                              release_for_retry, set_progress, still_owned_and_wanted)
from common.orm import Artifact, Dataset, JobStatus, ProfileLayer, utcnow
from common.settings import Settings
from common.storage import Storage, job_key
from core.errors import Cancelled, InvalidSpec, TaqError
from core.spec import JobSpec
from core.types import BitAllocation, Profile
from worker.errors import STOP_REQUESTED, TRANSIENT_ERRORS, LostOwnership, WorkerStopping

log = logging.getLogger("taq.worker")

STAGES = ("load", "calibrate", "score", "allocate", "quantize", "export", "evaluate", "publish")
#: share of the overall progress bar per stage
WEIGHTS = {"load": 0.05, "calibrate": 0.03, "score": 0.40, "allocate": 0.02, "quantize": 0.20,
           "export": 0.15, "evaluate": 0.12, "publish": 0.03}
_START = {s: sum(WEIGHTS[t] for t in STAGES[:i]) for i, s in enumerate(STAGES)}

EVAL_NEW_TOKENS = 32
FORMAT_BY_EXT = {"json": "json", "png": "png", "gguf": "gguf", "safetensors": "safetensors",
                 "jsonl": "jsonl", "txt": "txt"}


def pick_device(settings: Settings) -> str:
    import torch

    if settings.worker_device == "cuda":
        return "cuda"
    if settings.worker_device == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def budget_tag(avg_bits: float | None) -> str:
    return "default" if avg_bits is None else f"b{avg_bits:g}"


def jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if hasattr(value, "to_dict"):
            return jsonable(value.to_dict())
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "value") and hasattr(value, "name") and not isinstance(value, (int, float, str)):
        return value.value  # Enum
    if hasattr(value, "item") and callable(value.item):
        return value.item()  # numpy / torch scalar
    return value


def dumps(data: Any) -> bytes:
    return json.dumps(jsonable(data), indent=2, sort_keys=True).encode() + b"\n"


# ---------------------------------------------------------------------------------------------
class Heartbeat:
    """Background thread that keeps ``heartbeat_at`` fresh and notices a lost claim."""

    def __init__(self, settings: Settings, claim: Claim) -> None:
        self.settings, self.claim = settings, claim
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{claim.job_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                with session_scope(self.settings) as session:
                    if not heartbeat(session, self.claim.job_id, self.claim.token):
                        self.lost.set()
                        return
            except Exception as exc:  # transient DB trouble: try again next beat
                log.warning("heartbeat failed", extra={"job_id": self.claim.job_id, "error": repr(exc)})

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class JobRunner:
    def __init__(self, settings: Settings, storage: Storage, claim: Claim, beat: Heartbeat) -> None:
        self.settings, self.storage, self.claim, self.beat = settings, storage, claim, beat
        self.job_id = claim.job_id
        self.spec = JobSpec.model_validate(claim.spec)
        self.device = pick_device(settings)
        self.stage: str | None = None
        self.timings: dict[str, float] = {}
        self._last_poll = 0.0
        self._cancel = False
        self._last_progress_write = 0.0
        self._last_progress_event = 0.0
        # state passed between stages
        self.source = None
        self.loaded = None
        self.rows: list = []
        self.eval_rows: list = []
        self.profile: Profile | None = None
        self.allocations: list[BitAllocation] = []
        self.weights: dict[str, dict] = {}
        self.hessians = None  # GPTQ: core.calibration.HessianCollector of the calibration rows
        self.eval_report: dict | None = None

    # ---- keys ---------------------------------------------------------------------------
    def key(self, *parts: str) -> str:
        return job_key(self.job_id, *parts)

    def art(self, *parts: str) -> str:
        return self.key("artifacts", *parts)

    # ---- progress / cancel ----------------------------------------------------------------
    def should_cancel(self) -> bool:
        if self.beat.lost.is_set():
            raise LostOwnership(self.job_id)
        if STOP_REQUESTED.is_set():
            raise WorkerStopping(self.job_id)
        now = time.monotonic()
        if not self._cancel and now - self._last_poll >= self.settings.cancel_poll_seconds:
            self._last_poll = now
            with session_scope(self.settings) as session:
                owned, cancel = still_owned_and_wanted(session, self.job_id, self.claim.token)
            if not owned:
                self.beat.lost.set()
                raise LostOwnership(self.job_id)
            self._cancel = cancel
        return self._cancel

    def check_cancel(self) -> None:
        if self.should_cancel():
            raise Cancelled("cancelled by request")

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        """core's ProgressFn: DB progress at most once a second, an event every few seconds."""
        stage = stage if stage in WEIGHTS else (self.stage or stage)
        now = time.monotonic()
        if now - self._last_progress_write < 1.0 and fraction < 1.0:
            return
        self._last_progress_write = now
        overall = _START.get(stage, 0.0) + WEIGHTS.get(stage, 0.0) * max(0.0, min(1.0, fraction))
        event = None
        if now - self._last_progress_event >= self.settings.progress_event_seconds:
            self._last_progress_event = now
            event = ("progress", message or f"{stage} {100 * fraction:.0f}%")
        with session_scope(self.settings) as session:
            if not set_progress(session, self.job_id, self.claim.token, stage=self.stage, progress=overall,
                                event=event):
                self.beat.lost.set()

    @contextmanager
    def run_stage(self, name: str, *, skip: bool = False, reason: str = "") -> Iterator[None]:
        self.check_cancel()
        self.stage = name
        started = utcnow()
        t0 = time.monotonic()
        message = f"{name}: skipped ({reason})" if skip else f"{name} started"
        with session_scope(self.settings) as session:
            if not set_progress(session, self.job_id, self.claim.token, stage=name, progress=_START[name],
                                event=("stage", message)):
                raise LostOwnership(self.job_id)
        log.info("stage", extra={"stage": name, "skipped": skip, "reason": reason or None})
        outcome = "failed"
        try:
            yield
            outcome = "skipped" if skip else "ok"
        except Cancelled:
            outcome = "cancelled"
            raise
        finally:
            self.timings[name] = round(time.monotonic() - t0, 3)
            try:
                with session_scope(self.settings) as session:
                    record_stage_run(session, self.job_id, name, self.claim.attempt, started,
                                     outcome=outcome, skipped=skip)
            except Exception as exc:
                log.warning("could not record stage run", extra={"error": repr(exc)})

    # ---- what already exists ----------------------------------------------------------------
    def export_marker(self, tag: str) -> str:
        return self.key("work", f"export-{tag}.json")

    def exports_done(self) -> bool:
        return all(self.storage.exists(self.export_marker(budget_tag(b))) for b in self.budget_values())

    def budget_values(self) -> list[float | None]:
        return list(self.spec.budgets) or [None]

    def wants_eval(self) -> bool:
        return self.spec.eval_dataset_id is not None or self.spec.eval_fraction is not None

    # ---- the pipeline -----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        import torch

        torch.manual_seed(self.spec.seed)
        have_profile = self.storage.exists(self.art("profile.json"))
        have_bitmap = self.storage.exists(self.art("bitmap.json"))
        have_exports = have_bitmap and self.exports_done()
        have_eval = (not self.wants_eval()) or self.storage.exists(self.art("eval.json"))
        need_weights = not (have_exports and have_eval)
        need_model = need_weights or not have_profile

        with self.run_stage("load", skip=not need_model, reason="all model outputs stored"):
            if need_model:
                self.stage_load()
        with self.run_stage("calibrate"):
            self.stage_calibrate()
        with self.run_stage("score", skip=have_profile, reason="profile.json stored"):
            if have_profile:
                self.profile = Profile.from_dict(json.loads(self.storage.get_bytes(self.art("profile.json"))))
            else:
                self.stage_score()
        with self.run_stage("allocate", skip=have_bitmap, reason="bitmap.json stored"):
            if have_bitmap:
                self.load_bitmap()
            else:
                self.stage_allocate()
        with self.run_stage("quantize", skip=not need_weights, reason="exports and eval stored"):
            if need_weights:
                self.stage_quantize()
            if have_eval:
                self.hessians = None  # only the uniform baseline of the evaluate stage reuses them
        with self.run_stage("export", skip=have_exports, reason="exports stored"):
            if not have_exports:
                self.stage_export()
        with self.run_stage("evaluate", skip=have_eval, reason="no eval data" if not self.wants_eval()
                            else "eval.json stored"):
            if not have_eval:
                self.stage_evaluate()
            elif self.wants_eval():
                self.eval_report = json.loads(self.storage.get_bytes(self.art("eval.json")))
        with self.run_stage("publish"):
            return self.stage_publish()

    # ---- stages ------------------------------------------------------------------------------
    def stage_load(self) -> None:
        from common.models import resolve_model
        from core.models import load_model

        self.source = resolve_model(self.settings, self.spec.model)
        self.loaded = load_model(self.source, device=self.device)
        self.progress("load", 1.0, f"loaded {self.spec.model} on {self.device}")

    def _dataset_rows(self, dataset_id: str) -> list:
        from core.data import parse_jsonl

        with session_scope(self.settings) as session:
            dataset = session.get(Dataset, dataset_id)
            if dataset is None or dataset.tenant != self.claim.tenant:
                raise InvalidSpec(f"dataset '{dataset_id}' no longer exists")
            key = dataset.storage_key
        return parse_jsonl(self.storage.get_bytes(key))

    def stage_calibrate(self) -> None:
        """Calibration rows (inline or a dataset) and eval rows (a dataset, or a seeded holdout of
        the calibration rows). Subsampling to ``max_calibration_rows`` happens in core."""
        from core.data import split_rows

        spec = self.spec
        rows: list = []
        if spec.calibration is not None:
            rows = list(spec.calibration)
        elif spec.calibration_dataset_id is not None:
            rows = self._dataset_rows(spec.calibration_dataset_id)
        eval_rows: list = []
        if spec.eval_dataset_id is not None:
            eval_rows = self._dataset_rows(spec.eval_dataset_id)
        elif spec.eval_fraction is not None and rows:
            split = split_rows(rows, spec.eval_fraction, spec.seed)
            rows, eval_rows = split.calibration, split.evaluation
        self.rows, self.eval_rows = rows, eval_rows
        self.progress("calibrate", 1.0, f"{len(self.rows)} calibration rows, {len(self.eval_rows)} eval rows")

    def _reused_profile(self) -> Profile | None:
        source_id = self.spec.profile_from_job_id
        if source_id is None:
            return None
        key = job_key(source_id, "artifacts", "profile.json")
        if not self.storage.exists(key):
            raise InvalidSpec(f"job '{source_id}' has no stored profile to reuse")
        profile = Profile.from_dict(json.loads(self.storage.get_bytes(key)))
        if profile.model != self.spec.model and profile.model:
            raise InvalidSpec(f"the profile of job '{source_id}' is for model '{profile.model}', "
                              f"not '{self.spec.model}'")
        return profile.with_bits({})

    def stage_score(self) -> None:
        from core.pipeline import score_stage

        profile = self._reused_profile()
        if profile is None:
            profile = score_stage(self.spec, self.loaded, self.rows, progress=self.progress,
                                  should_cancel=self.should_cancel)
        self.check_cancel()
        self.profile = profile
        self.storage.put_bytes(self.art("profile.json"), dumps(profile.to_dict()))
        self.store_profile_rows(profile)

    def stage_allocate(self) -> None:
        from core.pipeline import allocate_stage

        self.allocations = list(allocate_stage(self.spec, self.profile))
        self.write_bitmap()

    def write_bitmap(self) -> None:
        data = {"budgets": [a.to_dict() for a in self.allocations]}
        if len(self.allocations) == 1:
            self.profile = self.profile.with_bits(self.allocations[0].bits)
        self.storage.put_bytes(self.art("profile.json"), dumps(self.profile.to_dict()))
        self.store_profile_rows(self.profile)
        self.storage.put_bytes(self.art("profile.png"), self.render_plot())
        self.storage.put_bytes(self.art("bitmap.json"), dumps(data))  # last: the checkpoint

    def load_bitmap(self) -> None:
        data = json.loads(self.storage.get_bytes(self.art("bitmap.json")))
        self.allocations = [BitAllocation(**a) for a in data["budgets"]]

    def render_plot(self) -> bytes:
        from core.plot import plot_profile

        effective = self.allocations[0].effective_bits if len(self.allocations) == 1 else None
        return plot_profile(self.profile, f"{self.spec.model} · {self.spec.method.value}",
                            group_size=self.spec.group_size, symmetric=self.spec.symmetric, effective=effective)

    def stage_quantize(self) -> None:
        """RTN, or GPTQ (``quantizer: gptq``): one full-precision pass over the calibration rows
        (loaded by ``stage_calibrate`` on every attempt, so a resumed job recomputes them)
        collects the Hessians first; they are shared by every budget and the uniform baseline."""
        from core.pipeline import collect_hessians, quantize_stage
        from core.spec import Quantizer

        share = 0.0
        if (self.spec.quantizer == Quantizer.gptq and self.hessians is None
                and any(b < 16 for a in self.allocations for b in a.bits.values())):
            share = 0.2
            self.hessians = collect_hessians(
                self.spec, self.loaded, self.rows, should_cancel=self.should_cancel,
                progress=lambda stage, fraction, message: self.progress("quantize", share * fraction, message))
        for i, allocation in enumerate(self.allocations):
            def sub_progress(stage: str, fraction: float, message: str, _i=i) -> None:
                self.progress("quantize", share + (1.0 - share) * (_i + fraction) / len(self.allocations), message)

            self.weights[budget_tag(allocation.budget)] = quantize_stage(
                self.spec, self.loaded, allocation, rows=self.rows, hessians=self.hessians,
                progress=sub_progress, should_cancel=self.should_cancel)
            self.check_cancel()

    def artifact_names(self, allocation: BitAllocation) -> dict[str, str]:
        suffix = "" if len(self.allocations) == 1 else f"-{budget_tag(allocation.budget)}"
        return {"hf": f"hf{suffix}", "gguf": f"model{suffix}.gguf"}

    def stage_export(self) -> None:
        from core.export import export_hf

        formats = [f.value for f in self.spec.exports]
        for i, allocation in enumerate(self.allocations):
            tag = budget_tag(allocation.budget)
            if self.storage.exists(self.export_marker(tag)):
                continue
            names = self.artifact_names(allocation)
            weights = self.weights[tag]
            written: list[str] = []
            with tempfile.TemporaryDirectory(prefix=f"taq-{self.job_id}-") as tmp:
                if "hf" in formats:
                    out_dir = Path(tmp) / "hf"
                    export_hf(self.loaded.model, self.loaded.tokenizer, weights, allocation.bits, self.spec, out_dir)
                    self.check_cancel()
                    # a re-export replaces a partial upload of a crashed attempt
                    self.storage.delete_prefix(self.art(names["hf"]) + "/")
                    written += [o.key for o in self.storage.put_tree(self.art(names["hf"]), out_dir)]
                if "gguf" in formats:
                    from core.export import export_gguf

                    out_path = Path(tmp) / names["gguf"]
                    source = self.loaded.source
                    path = export_gguf(self.loaded.model, self.loaded.tokenizer, weights, allocation.bits,
                                       self.spec, out_path, source_gguf=source.file if source.gguf_file else None)
                    self.check_cancel()
                    written.append(self.storage.put_file(self.art(names["gguf"]), Path(path or out_path)).key)
            self.storage.put_bytes(self.export_marker(tag), dumps({"files": written}))
            self.progress("export", (i + 1) / len(self.allocations), f"exported {tag}")

    def stage_evaluate(self) -> None:
        """Task metrics (EM/F1 on rows with answers) and fidelity (KL, top-1 agreement) of each
        quantized model against the full-precision one, written as ``eval.json``."""
        from core.data import render_prompts
        from core.evaluation import EvalReport, evaluate_generation, fidelity
        from core.pipeline import apply_quantized

        loaded, spec = self.loaded, self.spec
        if not self.eval_rows:
            log.info("no eval rows (eval_fraction without calibration rows); nothing to evaluate")
            return
        prompts = render_prompts(self.eval_rows, loaded.tokenizer, spec.max_tokens)
        answered = [i for i, row in enumerate(self.eval_rows) if row.answers]
        gen_prompts = [prompts[i] for i in answered]
        golds = [list(self.eval_rows[i].answers) for i in answered]

        def generation(model):
            if not answered:
                return None
            return evaluate_generation(model, loaded.tokenizer, gen_prompts, golds, max_new_tokens=EVAL_NEW_TOKENS,
                                       device=self.device, seed=spec.seed)

        reference = generation(loaded.model)
        self.progress("evaluate", 0.1, "full-precision reference evaluated")
        reports = []
        for i, allocation in enumerate(self.allocations):
            self.check_cancel()
            quantized = copy.deepcopy(loaded.model)
            apply_quantized(quantized, self.weights[budget_tag(allocation.budget)])
            baseline, baseline_fidelity, baseline_allocation = self._uniform_baseline(allocation, generation, prompts)
            report = EvalReport(quantized=generation(quantized), full_precision=reference,
                                quantized_fidelity=fidelity(loaded.model, quantized, prompts, device=self.device),
                                uniform=baseline, uniform_fidelity=baseline_fidelity,
                                dataset=spec.eval_dataset_id or f"holdout:{spec.eval_fraction}",
                                meta={"avg_bits": allocation.budget, "effective_bits": allocation.effective_bits,
                                      "uniform_effective_bits": baseline_allocation.effective_bits
                                      if baseline_allocation else None,
                                      "rows": len(self.eval_rows), "rows_with_answers": len(answered)},
                                seed=spec.seed)
            reports.append(report.to_dict())
            del quantized
            self.progress("evaluate", (i + 1) / len(self.allocations), f"evaluated {budget_tag(allocation.budget)}")
        self.eval_report = reports[0] if len(reports) == 1 else {"budgets": reports}
        self.storage.put_bytes(self.art("eval.json"), dumps(self.eval_report))

    def _uniform_baseline(self, allocation: BitAllocation, generation, prompts):
        """The same budget spent uniformly (the paper's baseline), so eval.json can show what the
        per-task allocation bought. Skipped for method `uniform` or when no uniform width fits."""
        from core.allocation import allocate_uniform
        from core.evaluation import fidelity
        from core.pipeline import apply_quantized, layer_costs, quantize_stage
        from core.spec import Method

        if self.spec.method == Method.uniform:
            return None, None, None
        budget = allocation.budget if allocation.budget is not None else allocation.effective_bits
        try:
            uniform = allocate_uniform(layer_costs(self.profile), budget, list(self.spec.bit_choices),
                                       self.spec.group_size, self.spec.symmetric)
        except TaqError as exc:
            log.info("no uniform baseline", extra={"reason": exc.message})
            return None, None, None
        weights = quantize_stage(self.spec, self.loaded, uniform, rows=self.rows, hessians=self.hessians,
                                 should_cancel=self.should_cancel)
        model = copy.deepcopy(self.loaded.model)
        apply_quantized(model, weights)
        try:
            return generation(model), fidelity(self.loaded.model, model, prompts, device=self.device), uniform
        finally:
            del model, weights

    def stage_publish(self) -> dict[str, Any]:
        """manifest.json (core.export.build_manifest over every stored file), artifact rows,
        result summary, then ``succeeded``."""
        self.check_cancel()
        prefix = self.key("artifacts") + "/"
        objects = [o for o in self.storage.list(prefix) if o.key != self.art("manifest.json")]
        files: dict[str, dict[str, Any]] = {}
        for obj in objects:
            files[obj.key[len(prefix):]] = {"size": obj.size, "sha256": self.storage.sha256(obj.key)}
        with tempfile.TemporaryDirectory(prefix=f"taq-{self.job_id}-publish-") as tmp:
            manifest_path = self.write_manifest(files, Path(tmp))
            info = self.storage.put_file(self.art("manifest.json"), manifest_path)
        files["manifest.json"] = {"size": info.size, "sha256": self.storage.sha256(info.key)}
        rows = self.artifact_rows(files)
        result = self.result_summary(rows)
        with session_scope(self.settings) as session:
            session.execute(delete(Artifact).where(Artifact.job_id == self.job_id))
            session.add_all(rows)
        with session_scope(self.settings) as session:
            if not finish_job(session, self.job_id, self.claim.token, JobStatus.succeeded, result=result,
                              message="succeeded"):
                raise LostOwnership(self.job_id)
        return result

    def write_manifest(self, files: dict[str, dict[str, Any]], tmp: Path) -> Path:
        """core's manifest needs local files (it measures the stored bits from their bytes): a
        file:// store hands out its paths, anything else is downloaded into ``tmp``."""
        from core.export import build_manifest, library_versions, write_manifest
        from core.export.manifest import bit_map_key

        local: list[tuple[str, Path]] = []
        for rel in sorted(files):
            key = self.art(rel)
            local.append((rel, self.storage.local_path(key) or self.storage.download_to(key, tmp / "files" / rel)))
        source = self.source
        if source is None:
            from common.models import resolve_model

            source = self.source = resolve_model(self.settings, self.spec.model)
        single = self.allocations[0] if len(self.allocations) == 1 else None
        manifest = build_manifest(self.spec, self.spec.model, source.compute_sha256(),
                                  single.bits if single else {}, single.effective_bits if single else None,
                                  local, library_versions())
        if single is None:  # a budget sweep: one bit map per budget
            manifest["budgets"] = [
                {"avg_bits": a.budget, "effective_bits": a.effective_bits, bit_map_key(self.spec): dict(a.bits),
                 "artifacts": sorted(self.artifact_names(a).values())}
                for a in self.allocations]
        return write_manifest(tmp / "manifest", manifest)

    def artifact_rows(self, files: dict[str, dict[str, Any]]) -> list[Artifact]:
        rows: list[Artifact] = []
        directories: dict[str, list[tuple[str, dict]]] = {}
        for rel, meta in sorted(files.items()):
            head, sep, rest = rel.partition("/")
            if sep:
                directories.setdefault(head, []).append((rest, meta))
                continue
            ext = rel.rsplit(".", 1)[-1] if "." in rel else ""
            rows.append(Artifact(job_id=self.job_id, name=rel, format=FORMAT_BY_EXT.get(ext, ext or "bin"),
                                 kind="file", size=meta["size"], sha256=meta["sha256"],
                                 storage_key=self.art(rel), files=None))
        for name, entries in directories.items():
            layout = tar_layout(name, [(rel, meta["size"], self.art(name, rel)) for rel, meta in entries])
            rows.append(Artifact(job_id=self.job_id, name=name, format=name.split("-")[0], kind="directory",
                                 size=layout.size, sha256=tar_digest(self.storage, layout),
                                 storage_key=self.art(name),
                                 files=[{"name": rel, "size": m["size"], "sha256": m["sha256"]}
                                        for rel, m in entries]))
        return rows

    def result_summary(self, rows: list[Artifact]) -> dict[str, Any]:
        budgets = []
        for allocation in self.allocations:
            names = self.artifact_names(allocation)
            budgets.append({
                "avg_bits": allocation.budget, "effective_bits": allocation.effective_bits,
                "rule": allocation.rule, "solver": allocation.solver, "objective": allocation.objective,
                "bits": allocation.bits,
                "artifacts": [n for key, n in names.items() if key in [f.value for f in self.spec.exports]],
            })
        metrics = None
        if self.eval_report:  # the means; eval.json has the intervals and per-item results
            reports = self.eval_report.get("budgets", [self.eval_report])
            metrics = [{"avg_bits": r.get("meta", {}).get("avg_bits"),
                        "scores": {variant: {"n": m.get("n"), **{k: (m.get(k) or {}).get("mean")
                                                                 for k in ("exact_match", "f1", "contains")}}
                                   for variant, m in r.get("metrics", {}).items()},
                        "fidelity": r.get("fidelity")}
                       for r in reports]
        return {"device": self.device, "budgets": budgets, "metrics": metrics,
                "artifacts": sorted(r.name for r in rows), "timings": self.timings,
                "attempt": self.claim.attempt}

    # ---- DB profile rows ----------------------------------------------------------------------
    def store_profile_rows(self, profile: Profile) -> None:
        with session_scope(self.settings) as session:
            session.execute(delete(ProfileLayer).where(ProfileLayer.job_id == self.job_id))
            session.add_all(ProfileLayer(job_id=self.job_id, index=l.index, name=l.name, params=int(l.params),
                                         importance=float(l.importance), sensitivity=float(l.sensitivity),
                                         bits=l.bits, scores=jsonable(l.scores),
                                         quant_error={str(k): float(v) for k, v in l.quant_error.items()},
                                         linears=[x.to_dict() for x in l.linears] or None)
                            for l in profile.layers)


# ---------------------------------------------------------------------------------------------
def run_claimed(settings: Settings, storage: Storage, claim: Claim) -> str:
    """Run a claimed job to a final state. Returns ``succeeded|failed|cancelled|lost|retry``."""
    job_id = claim.job_id
    with Heartbeat(settings, claim) as beat:
        runner = JobRunner(settings, storage, claim, beat)
        try:
            runner.run()
            log.info("job succeeded", extra={"timings": runner.timings})
            return "succeeded"
        except LostOwnership:
            log.warning("lost ownership of the job; stopping without writing")
            return "lost"
        except WorkerStopping:
            log.info("worker stopping; the job goes back to the queue")
            try:
                with session_scope(settings) as session:
                    released = release_for_retry(session, job_id, claim.token, "worker stopped")
                if released:
                    from common.broker import enqueue_job

                    enqueue_job(settings, job_id)
            except Exception:
                log.warning("could not hand the job back; the reaper will requeue it", exc_info=True)
            return "interrupted"
        except Cancelled:
            with session_scope(settings) as session:
                purge_job_outputs(session, storage, job_id)
                finish_job(session, job_id, claim.token, JobStatus.cancelled, message="cancelled; outputs removed")
            log.info("job cancelled")
            return "cancelled"
        except TaqError as exc:
            log.info("job failed", extra={"error_code": exc.code, "error": exc.message})
            _fail(settings, claim, exc.code, exc.message, exc.details)
            return "failed"
        except TRANSIENT_ERRORS as exc:
            if claim.attempt >= settings.max_attempts:
                _fail(settings, claim, "transient_error",
                      f"infrastructure error after {claim.attempt} attempts: {type(exc).__name__}")
                return "failed"
            log.warning("transient error; job goes back to the queue", exc_info=True)
            try:
                with session_scope(settings) as session:
                    release_for_retry(session, job_id, claim.token, type(exc).__name__)
            except Exception:
                log.warning("could not release the job; the reaper will requeue it", exc_info=True)
            return "retry"
        except Exception as exc:
            log.exception("job crashed")
            _fail(settings, claim, "internal_error", f"{type(exc).__name__}: {str(exc)[:500]}")
            return "failed"
        finally:
            runner.loaded = None
            runner.hessians = None
            runner.weights.clear()


def _fail(settings: Settings, claim: Claim, code: str, message: str, details: Any = None) -> None:
    try:
        with session_scope(settings) as session:
            finish_job(session, claim.job_id, claim.token, JobStatus.failed, error_code=code,
                       error_message=message, error_details=jsonable(details))
    except Exception:
        log.exception("could not record the failure; the reaper will requeue the job")
