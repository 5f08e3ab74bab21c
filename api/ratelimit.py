"""A token bucket per API key (per API process): ``TAQ_RATE_LIMIT_PER_SECOND`` sustained,
``TAQ_RATE_LIMIT_BURST`` at once. Over it a call answers 429 ``rate_limited`` with Retry-After."""

from __future__ import annotations

import hashlib
import math
import threading
import time

from common.errors import TooManyRequests

#: buckets kept; past this the oldest idle ones are dropped (a full bucket is the same as none)
_MAX_BUCKETS = 10_000


class RateLimiter:
    def __init__(self, per_second: float, burst: int) -> None:
        self.per_second, self.burst = per_second, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def hit(self, authorization: str | None, tenant: str) -> None:
        """Take one token for the caller's key; raise TooManyRequests when there is none."""
        if self.per_second <= 0:
            return
        key = hashlib.sha256(authorization.encode()).hexdigest() if authorization else f"tenant:{tenant}"
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.per_second)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                wait = math.ceil((1.0 - tokens) / self.per_second)
                raise TooManyRequests(
                    f"too many requests for this API key: over {self.per_second:g}/s with bursts of {self.burst} "
                    f"(TAQ_RATE_LIMIT_PER_SECOND, TAQ_RATE_LIMIT_BURST); retry in {wait} s",
                    details={"retry_after": wait, "per_second": self.per_second, "burst": self.burst},
                    code="rate_limited",
                )
            if len(self._buckets) >= _MAX_BUCKETS and key not in self._buckets:
                self._drop_full(now)
            self._buckets[key] = (tokens - 1.0, now)

    def _drop_full(self, now: float) -> None:
        refilled = [
            k for k, (tokens, at) in self._buckets.items() if tokens + (now - at) * self.per_second >= self.burst
        ]
        for k in refilled or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[k]
