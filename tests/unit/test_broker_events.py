"""Flower (docker-compose.yml) shows what Celery's task events say: the worker sends them, and the
API sends "task-sent", on a real broker; the embedded filesystem broker, which nothing monitors,
stays without them (like remote control)."""

from __future__ import annotations

import pytest

from common.broker import make_celery
from common.settings import Settings

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("broker, events", [("redis://127.0.0.1:6379/0", True), ("filesystem://", False)])
def test_task_events_follow_the_broker(tmp_path, broker, events):
    conf = make_celery(Settings(data_dir=tmp_path, broker_url=broker)).conf
    assert conf.worker_send_task_events is events
    assert conf.task_send_sent_event is events
    assert conf.worker_enable_remote_control is events  # Flower's worker pages use remote control too
