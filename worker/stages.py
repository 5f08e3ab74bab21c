"""One claimed job on this worker: the database side of `core.pipeline.run_job`.

core runs the stages (order, resume decisions, progress shares: core/pipeline.py); this module
gives it the job's rows and a store scoped to ``jobs/{job_id}/``, and records what happens:
stage runs and timings, throttled progress and events, per-stage peak memory, cooperative
cancellation (polled against the DB at most every ``TAQ_CANCEL_POLL_SECONDS``), profile rows, and
the final publish (worker/publish.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.db import session_scope
from common.job_status import JobStatus
from common.lifecycle import (
    Claim,
    finish_job,
    heartbeat,
    purge_job_outputs,
    record_stage_run,
    release_for_retry,
    set_progress,
    still_owned_and_wanted,
)
from common.orm import Dataset, utcnow
from common.settings import Settings
from common.storage import Storage, job_key
from core.errors import Cancelled, InvalidSpec, TaqError
from core.pipeline import STAGE_SHARES, JobHooks, JobInputs, JobOutputs, overall_progress, run_job
from core.spec import JobSpec
from core.types import Profile
from worker.disk import check_work_disk
from worker.errors import STOP_REQUESTED, TRANSIENT_ERRORS, LostOwnership, WorkerStopping
from worker.resources import PeakMemory

log = logging.getLogger("taq.worker")


def pick_device(settings: Settings) -> str:
    """This worker's device: its class's (TAQ_WORKER_CLASSES), else TAQ_WORKER_DEVICE; `auto`
    is CUDA when available."""
    import torch

    device = settings.own_worker_class().device
    if device in ("cuda", "cpu"):
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


class JobStore:
    """`core.pipeline.ArtifactStore` over the object store, keys relative to ``jobs/{job_id}/``."""

    def __init__(self, storage: Storage, job_id: str) -> None:
        self.storage, self.job_id = storage, job_id

    def key(self, rel: str) -> str:
        return job_key(self.job_id, *rel.split("/"))

    def exists(self, key: str) -> bool:
        return self.storage.exists(self.key(key))

    def get_bytes(self, key: str) -> bytes:
        return self.storage.get_bytes(self.key(key))

    def put_bytes(self, key: str, data: bytes) -> Any:
        return self.storage.put_bytes(self.key(key), data)

    def put_file(self, key: str, path: Path, *, handover: bool = False) -> Any:
        return self.storage.put_file(self.key(key), path, handover=handover)

    def delete_prefix(self, prefix: str) -> int:
        return self.storage.delete_prefix(job_key(self.job_id, *prefix.rstrip("/").split("/")) + "/")


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

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class WorkerHooks(JobHooks):
    """core's JobHooks backed by the database (see the module docstring)."""

    def __init__(self, settings: Settings, storage: Storage, claim: Claim, beat: Heartbeat, device: str) -> None:
        self.settings, self.storage, self.claim, self.beat, self.device = settings, storage, claim, beat, device
        self.job_id = claim.job_id
        self.current: str | None = None
        self.timings: dict[str, float] = {}
        self.memory = PeakMemory()
        self._last_poll = 0.0
        self._cancel = False
        self._last_write = 0.0
        self._last_event = 0.0

    # ---- cancellation and progress ---------------------------------------------------------------
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

    def progress(self, stage: str, fraction: float, message: str) -> None:
        """DB progress at most once a second, an event every few seconds."""
        stage = stage if stage in STAGE_SHARES else (self.current or "score")
        now = time.monotonic()
        if now - self._last_write < 1.0 and fraction < 1.0:
            return
        self._last_write = now
        event = None
        if now - self._last_event >= self.settings.progress_event_seconds:
            self._last_event = now
            event = ("progress", message or f"{stage} {100 * fraction:.0f}%")
        with session_scope(self.settings) as session:
            if not set_progress(
                session,
                self.job_id,
                self.claim.token,
                stage=self.current,
                progress=overall_progress(stage, fraction),
                event=event,
            ):
                self.beat.lost.set()

    @contextmanager
    def stage(self, name: str, *, skipped: bool, reason: str) -> Iterator[None]:
        self.current = name
        started = utcnow()
        t0 = time.monotonic()
        message = f"{name}: skipped ({reason})" if skipped else f"{name} started"
        with session_scope(self.settings) as session:
            if not set_progress(
                session,
                self.job_id,
                self.claim.token,
                stage=name,
                progress=overall_progress(name, 0.0),
                event=("stage", message),
            ):
                raise LostOwnership(self.job_id)
        log.info("stage", extra={"stage": name, "skipped": skipped, "reason": reason or None})
        outcome = "failed"
        self.memory.start(name)
        try:
            yield
            outcome = "skipped" if skipped else "ok"
        except Cancelled:
            outcome = "cancelled"
            raise
        finally:
            self.memory.stop(name)
            self.timings[name] = round(time.monotonic() - t0, 3)
            try:
                with session_scope(self.settings) as session:
                    record_stage_run(
                        session, self.job_id, name, self.claim.attempt, started, outcome=outcome, skipped=skipped
                    )
            except Exception as exc:
                log.warning("could not record stage run", extra={"error": repr(exc)})

    # ---- outputs ----------------------------------------------------------------------------------
    def profile_ready(self, profile: Profile) -> None:
        from worker.publish import store_profile_rows

        store_profile_rows(self.settings, self.job_id, profile)

    def exported(self, tag: str, files: list[tuple[str, Path]]) -> dict[str, Any]:
        from worker.publish import directory_digests

        return directory_digests(self.job_id, files)

    def publish(self, outputs: JobOutputs) -> dict[str, Any]:
        from worker.publish import publish

        return publish(self, outputs)


def _dataset_rows(settings: Settings, storage: Storage, claim: Claim, dataset_id: str) -> list:
    from core.data import parse_jsonl

    with session_scope(settings) as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None or dataset.tenant != claim.tenant:
            raise InvalidSpec(f"dataset '{dataset_id}' no longer exists")
        key = dataset.storage_key
    return parse_jsonl(storage.get_bytes(key))


def job_inputs(settings: Settings, storage: Storage, claim: Claim, device: str) -> JobInputs:
    """The job's rows (inline or a dataset), eval rows (a dataset, or a seeded holdout of the
    calibration rows), a reused profile, the model source and this worker's limits."""
    from common.model_registry import resolve_model
    from core.data import split_rows

    spec = JobSpec.model_validate(claim.spec)
    rows: list = []
    if spec.calibration is not None:
        rows = list(spec.calibration)
    elif spec.calibration_dataset_id is not None:
        rows = _dataset_rows(settings, storage, claim, spec.calibration_dataset_id)
    eval_rows: list = []
    if spec.eval_dataset_id is not None:
        eval_rows = _dataset_rows(settings, storage, claim, spec.eval_dataset_id)
    elif spec.eval_fraction is not None and rows:
        split = split_rows(rows, spec.eval_fraction, spec.seed)
        rows, eval_rows = split.calibration, split.evaluation
    reused = None
    if spec.profile_from_job_id is not None:
        key = job_key(spec.profile_from_job_id, "artifacts", "profile.json")
        if not storage.exists(key):
            raise InvalidSpec(f"job '{spec.profile_from_job_id}' has no stored profile to reuse")
        reused = Profile.from_dict(json.loads(storage.get_bytes(key))).without_bits()
        if reused.model and reused.model != spec.model:
            raise InvalidSpec(
                f"the profile of job '{spec.profile_from_job_id}' is for model '{reused.model}', not '{spec.model}'"
            )
    return JobInputs(
        spec=spec,
        source=resolve_model(settings, spec.model),
        rows=rows,
        eval_rows=eval_rows,
        reused_profile=reused,
        device=device,
        memory_limit_bytes=settings.own_worker_class().memory_bytes,
        activation_ram_bytes=settings.activation_ram_bytes,
        work_dir=settings.data_dir / "work",
        batch_tokens=None,
    )


def run_claimed(settings: Settings, storage: Storage, claim: Claim) -> str:
    """Run a claimed job to a final state. Returns ``succeeded|failed|cancelled|lost|retry|interrupted``."""
    import torch

    job_id = claim.job_id
    device = pick_device(settings)
    with Heartbeat(settings, claim) as beat:
        hooks = WorkerHooks(settings, storage, claim, beat, device)
        try:
            torch.manual_seed(int(claim.spec.get("seed", 0)))
            inputs, store = job_inputs(settings, storage, claim, device), JobStore(storage, job_id)
            check_work_disk(inputs, store)  # insufficient_disk before anything is written
            run_job(inputs, store, hooks)
            log.info("job succeeded", extra={"timings": hooks.timings})
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

                    enqueue_job(settings, job_id, claim.worker_class)
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
                _fail(
                    settings,
                    claim,
                    "transient_error",
                    f"infrastructure error after {claim.attempt} attempts: {type(exc).__name__}",
                )
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
            # the exception text may hold server paths and internals: it stays in the log above
            _fail(
                settings,
                claim,
                "internal_error",
                f"internal error in the worker ({type(exc).__name__}); the incident was logged with the job id",
            )
            return "failed"


def _fail(settings: Settings, claim: Claim, code: str, message: str, details: Any = None) -> None:
    from common.redact import redact_paths, redact_text
    from worker.publish import jsonable

    try:
        with session_scope(settings) as session:  # what the job resource shows: no server paths
            finish_job(
                session,
                claim.job_id,
                claim.token,
                JobStatus.failed,
                error_code=code,
                error_message=redact_text(message),
                error_details=redact_paths(jsonable(details)),
            )
    except Exception:
        log.exception("could not record the failure; the reaper will requeue the job")
