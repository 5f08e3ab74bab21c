#!/bin/sh
# One Celery worker on queue `quantize`: one job at a time, CUDA when available. SIGTERM makes it
# hand its running job back to the queue before exiting (give it a stop grace period).
set -eu
exec taq worker "$@"
