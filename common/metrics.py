"""Prometheus metrics read from the database at scrape time (so the API reports what every
worker did): jobs by status, stage durations, failures by code, queue depth and live workers
per worker class."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from sqlalchemy import func, select

from common.db import session_scope
from common.fleet import live_workers_by_class, queue_depth_by_class
from common.job_status import JobStatus
from common.orm import Job, StageRun
from common.settings import Settings


class DatabaseCollector:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        with session_scope(self.settings) as session:
            by_status = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            failures = session.execute(
                select(Job.error_code, func.count()).where(Job.status == JobStatus.failed).group_by(Job.error_code)
            ).all()
            stages = session.execute(
                select(StageRun.stage, func.count(), func.sum(StageRun.duration_s))
                .where(StageRun.skipped.is_(False), StageRun.duration_s.is_not(None))
                .group_by(StageRun.stage)
            ).all()
            skipped = session.execute(
                select(StageRun.stage, func.count()).where(StageRun.skipped.is_(True)).group_by(StageRun.stage)
            ).all()
            depth = queue_depth_by_class(session, self.settings)
            alive = live_workers_by_class(session, self.settings)
        jobs = GaugeMetricFamily("taq_jobs", "Jobs by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], by_status.get(status, 0))
        yield jobs
        failed = CounterMetricFamily("taq_job_failures", "Failed jobs by error code", labels=["code"])
        for code, n in failures:
            failed.add_metric([code or "unknown"], n)
        yield failed
        durations = SummaryMetricFamily("taq_stage_duration_seconds", "Time spent per pipeline stage", labels=["stage"])
        for stage, n, total in stages:
            durations.add_metric([stage], count_value=n, sum_value=float(total or 0.0))
        yield durations
        skips = CounterMetricFamily(
            "taq_stage_skipped", "Stages skipped on resume (output already stored)", labels=["stage"]
        )
        for stage, n in skipped:
            skips.add_metric([stage], n)
        yield skips
        queued = GaugeMetricFamily("taq_queue_depth", "Queued jobs per worker class", labels=["worker_class"])
        for name, n in depth.items():
            queued.add_metric([name], n)
        yield queued
        workers = GaugeMetricFamily(
            "taq_live_workers", "Workers heart-beating, per worker class", labels=["worker_class"]
        )
        for name, n in alive.items():
            workers.add_metric([name], n)
        yield workers


def render_metrics(settings: Settings, extra: CollectorRegistry | None = None) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(settings))
    body = generate_latest(registry)
    if extra is not None:
        body += generate_latest(extra)
    return body
