"""The worker's Celery application (``celery -A worker.app worker`` or ``taq worker``).

A leaf: it imports no task module (Celery imports ``worker.tasks`` through ``include`` when the
worker starts) and reads the settings (``TAQ_``) only when Celery first needs its configuration,
so ``taq worker --class NAME`` can set the class before that. The broker is ``TAQ_BROKER_URL``
(Redis in production, kombu's filesystem transport under ``$TAQ_DATA_DIR/broker`` embedded); one
job at a time per process: concurrency 1, prefetch 1, late acks. Importing it connects the
worker's signal handlers (worker/signals.py).
"""

from __future__ import annotations

from celery import Celery

import worker.signals  # noqa: F401  (connects the handlers)
from common.broker import celery_config
from common.settings import get_settings

app = Celery("taq", set_as_current=False, include=["worker.tasks"])
app.add_defaults(lambda: celery_config(get_settings()))
