"""Job state transitions on PostgreSQL: atomic claim, ownership, heartbeat, reaper, cancel."""

from __future__ import annotations

from datetime import timedelta

import pytest

from common.db import migrate, session_scope
from common.jobs import cancel_job, submit_job
from common.lifecycle import (
    claim_job,
    finish_job,
    heartbeat,
    reap,
    release_for_retry,
    set_progress,
    still_owned_and_wanted,
)
from common.orm import Job, JobEvent, utcnow
from common.settings import Settings
from common.storage import storage_from_settings
from core.spec import JobSpec

from .conftest import tiny_spec

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def settings(tmp_path_factory, pg_database, tiny_model_root) -> Settings:
    data = tmp_path_factory.mktemp("lifecycle")
    settings = Settings(
        data_dir=data,
        database_url=pg_database(),
        broker_url="filesystem://",
        model_roots=[tiny_model_root],
        stale_after_seconds=30,
        max_attempts=2,
        requeue_queued_after_seconds=60,
    )
    migrate(settings)
    return settings


def new_job(settings, tenant: str = "default") -> str:
    with session_scope(settings) as session:
        return submit_job(
            session, settings, tenant, JobSpec.model_validate(tiny_spec("uniform")), render=lambda job: {"id": job.id}
        ).resource_id


def age(settings, job_id: str, **fields) -> None:
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        for name, seconds in fields.items():
            setattr(job, name, utcnow() - timedelta(seconds=seconds))


def test_claim_is_atomic_and_owned(settings):
    job_id = new_job(settings)
    with session_scope(settings) as session:
        first = claim_job(session, settings, job_id)
        assert first is not None and first.attempt == 1
        assert claim_job(session, settings, job_id) is None  # running, fresh heartbeat
        assert heartbeat(session, job_id, first.token)
        assert not heartbeat(session, job_id, "not-the-token")
        assert still_owned_and_wanted(session, job_id, first.token) == (True, False)
    age(settings, job_id, heartbeat_at=300)
    with session_scope(settings) as session:
        second = claim_job(session, settings, job_id)  # the first worker is presumed dead
        assert second is not None and second.attempt == 2 and second.token != first.token
        # the old owner can no longer write
        assert not set_progress(session, job_id, first.token, stage="score", progress=0.5)
        assert not finish_job(session, job_id, first.token, "succeeded", result={})
        assert set_progress(session, job_id, second.token, stage="score", progress=0.5, event=("stage", "x"))
        assert finish_job(session, job_id, second.token, "failed", error_code="boom", error_message="m")
        job = session.get(Job, job_id)
        assert job.status == "failed" and job.error_code == "boom" and job.finished_at is not None
        assert claim_job(session, settings, job_id) is None  # finished jobs are never claimed again


def test_release_for_retry_requeues(settings):
    job_id = new_job(settings)
    with session_scope(settings) as session:
        claim = claim_job(session, settings, job_id)
        assert release_for_retry(session, job_id, claim.token, "OperationalError")
        assert session.get(Job, job_id).status == "queued"
        assert claim_job(session, settings, job_id).attempt == 2


def test_cancel_running_sets_the_flag_and_blocks_claims(settings):
    job_id = new_job(settings)
    storage = storage_from_settings(settings)
    with session_scope(settings) as session:
        claim = claim_job(session, settings, job_id)
        job = cancel_job(session, storage, "default", job_id)
        assert job.status == "running" and job.cancel_requested
        assert still_owned_and_wanted(session, job_id, claim.token) == (True, True)
    age(settings, job_id, heartbeat_at=300)
    with session_scope(settings) as session:
        assert claim_job(session, settings, job_id) is None


def test_reaper(settings):
    storage = storage_from_settings(settings)
    stale_retry, stale_exhausted, stale_cancel, lost_queued = (new_job(settings) for _ in range(4))
    for job_id in (stale_retry, stale_exhausted, stale_cancel):
        with session_scope(settings) as session:
            claim_job(session, settings, job_id)
    with session_scope(settings) as session:
        session.get(Job, stale_exhausted).attempts = settings.max_attempts
        session.get(Job, stale_cancel).cancel_requested = True
    storage.put_bytes(f"jobs/{stale_cancel}/artifacts/profile.json", b"{}")
    for job_id in (stale_retry, stale_exhausted, stale_cancel):
        age(settings, job_id, heartbeat_at=300)
    age(settings, lost_queued, enqueued_at=3600, created_at=3600)
    sent: list[str] = []
    with session_scope(settings) as session:
        report = reap(session, settings, storage, lambda job_id, _class: sent.append(job_id))
    assert stale_retry in report.requeued and stale_exhausted in report.failed
    assert stale_cancel in report.cancelled and lost_queued in report.reenqueued
    assert set(sent) >= {stale_retry, lost_queued} and stale_exhausted not in sent
    with session_scope(settings) as session:
        assert session.get(Job, stale_retry).status == "queued"
        assert session.get(Job, stale_exhausted).status == "failed"
        assert session.get(Job, stale_exhausted).error_code == "worker_lost"
        assert session.get(Job, stale_cancel).status == "cancelled"
        messages = [e.message for e in session.query(JobEvent).filter_by(job_id=stale_retry)]
        assert any("requeued" in m for m in messages)
    assert storage.list(f"jobs/{stale_cancel}/") == []
    # a second pass finds nothing new (the re-enqueued job's clock was reset)
    with session_scope(settings) as session:
        again = reap(session, settings, storage, lambda job_id, _class: sent.append(job_id))
    assert lost_queued not in again.reenqueued and not again.requeued
