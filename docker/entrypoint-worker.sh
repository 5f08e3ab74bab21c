#!/bin/sh
# One Celery worker on its class's queue `quantize.<class>` (`--class NAME`, from TAQ_WORKER_CLASSES):
# one job at a time on the class's device. SIGTERM makes it hand its running job back to the queue
# before exiting (give it a stop grace period).
set -eu
exec taq worker "$@"
