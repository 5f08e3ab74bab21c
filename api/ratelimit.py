"""A token bucket per API key: ``TAQ_RATE_LIMIT_PER_SECOND`` sustained, ``TAQ_RATE_LIMIT_BURST`` at
once. Over it a call answers 429 ``rate_limited`` with Retry-After.

`RateLimiter` keeps the buckets in this process; with Redis (``Settings.limits_redis``) every API
replica shares them through `api.shared_limits.SharedRateLimiter`, which falls back to this one
while Redis is unreachable."""

from __future__ import annotations

import hashlib
import math
import threading
import time

from common.errors import TooManyRequests

#: buckets kept; past this the oldest idle ones are dropped (a full bucket is the same as none)
_MAX_BUCKETS = 10_000


def bucket_key(authorization: str | None, tenant: str) -> str:
    """The bucket of a caller: its key's sha256 (never the key itself), or its tenant when keyless."""
    return hashlib.sha256(authorization.encode()).hexdigest() if authorization else f"tenant:{tenant}"


def rate_limited(per_second: float, burst: int, tokens: float) -> TooManyRequests:
    """The 429 for a bucket holding `tokens` (< 1): Retry-After is when the next token is there."""
    wait = max(1, math.ceil((1.0 - tokens) / per_second))
    return TooManyRequests(
        f"too many requests for this API key: over {per_second:g}/s with bursts of {burst} "
        f"(TAQ_RATE_LIMIT_PER_SECOND, TAQ_RATE_LIMIT_BURST); retry in {wait} s",
        details={"retry_after": wait, "per_second": per_second, "burst": burst},
        code="rate_limited",
    )


class RateLimiter:
    """The buckets of this API process."""

    def __init__(self, per_second: float, burst: int) -> None:
        self.per_second, self.burst = per_second, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    async def hit(self, authorization: str | None, tenant: str) -> None:
        """Take one token for the caller's key; raise TooManyRequests when there is none."""
        if self.per_second > 0:
            self.take(bucket_key(authorization, tenant))

    def take(self, key: str) -> None:
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.per_second)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                raise rate_limited(self.per_second, self.burst, tokens)
            if len(self._buckets) >= _MAX_BUCKETS and key not in self._buckets:
                self._drop_full(now)
            self._buckets[key] = (tokens - 1.0, now)

    def _drop_full(self, now: float) -> None:
        refilled = [
            k for k, (tokens, at) in self._buckets.items() if tokens + (now - at) * self.per_second >= self.burst
        ]
        for k in refilled or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[k]

    async def aclose(self) -> None:
        """Nothing to close (the shared limiter closes its Redis connections)."""
