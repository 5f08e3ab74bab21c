"""A job's state, shared by the ORM, the API schema, the CLI and the worker. Only
common/lifecycle.py (and job creation in common/jobs.py) writes it:

    queued → running → succeeded | failed | cancelled      (running → queued on a retry)
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED_STATUSES


#: states a job never leaves
FINISHED_STATUSES: frozenset[JobStatus] = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})
