"""The rate limit and the event-stream caps shared by every API replica through Redis
(``Settings.limits_redis``: ``TAQ_LIMITS_REDIS_URL``, by default the broker's Redis).

* **Rate limit**: one token bucket per API key, a Redis hash updated by one Lua script, so two
  replicas answering the same key at once cannot both take its last token. The script reads
  Redis's clock, not the replicas' (theirs may differ). A bucket expires once it would be full.
* **Stream caps**: an open stream holds a lease, a member of two sorted sets (its tenant's and
  everyone's) scored by the lease's expiry. One script drops the expired leases, counts and adds
  the new one atomically. The stream renews its lease every third of ``TAQ_STREAM_LEASE_SECONDS``
  while it is open and removes it when it ends, so the slots of a replica that died with streams
  open come back within the lease.
* **Redis unreachable** (refused, a timeout of ``REDIS_TIMEOUT_SECONDS``, an error): the call is
  answered by the in-process limiter (api/ratelimit.py, api/sse.py: each replica then counts only
  its own callers, as without Redis) and the warning ``limits fall back to this process`` is
  logged once; Redis is tried again after ``RETRY_SECONDS``, and ``limits shared through Redis
  again`` is logged when it answers. The limiter never turns a Redis failure into a 500.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import threading
import time
from typing import Any

import redis
import redis.asyncio
from redis.exceptions import RedisError

from api.ratelimit import RateLimiter, bucket_key, rate_limited
from api.sse import Slot, StreamSlots, too_many_streams
from common.redact import redact_url
from common.settings import Settings

log = logging.getLogger("taq.api.limits")

#: connect and read timeout of one limiter call (a request waits at most this long for Redis)
REDIS_TIMEOUT_SECONDS = 0.5
#: after a failure, calls use the in-process limiter for this long before Redis is tried again
RETRY_SECONDS = 5.0
REDIS_ERRORS = (RedisError, OSError)

# KEYS[1]: the bucket; ARGV: per_second, burst, ttl_ms. Returns {1 taken | 0 refused, tokens left}
TOKEN_BUCKET = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(state[1]), tonumber(state[2])
if tokens == nil or at == nil then
  tokens, at = burst, now
end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local taken = 0
if tokens >= 1 then
  tokens = tokens - 1
  taken = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {taken, tostring(tokens)}
"""

# KEYS[1]: everyone's leases, KEYS[2]: the tenant's; ARGV: lease id, per_tenant, total, lease_ms.
# Returns 0 (leased), 1 (the tenant is at its cap) or 2 (the service is)
ACQUIRE_LEASE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then
  return 1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 2
end
local expiry = now + tonumber(ARGV[4])
redis.call('ZADD', KEYS[1], expiry, ARGV[1])
redis.call('ZADD', KEYS[2], expiry, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 0
"""

# the same keys; ARGV: lease id, lease_ms. Sets the lease's expiry (back, if it had expired)
RENEW_LEASE = """
local clock = redis.call('TIME')
local expiry = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000) + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], expiry, ARGV[1])
redis.call('ZADD', KEYS[2], expiry, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""


class LimitsRedis:
    """The limiter's Redis: connections (a blocking client for the streams, which call it on
    worker threads; an asyncio one per event loop for the rate limit, checked on the loop) and
    whether to use it now."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url, self.prefix = url, prefix
        self._options: dict[str, Any] = {
            "socket_connect_timeout": REDIS_TIMEOUT_SECONDS,
            "socket_timeout": REDIS_TIMEOUT_SECONDS,
        }
        self._blocking: redis.Redis | None = None
        self._async: tuple[asyncio.AbstractEventLoop, redis.asyncio.Redis] | None = None
        self._down_until: float | None = None
        self._lock = threading.Lock()

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @property
    def blocking(self) -> redis.Redis:
        with self._lock:
            if self._blocking is None:
                self._blocking = redis.Redis.from_url(self.url, **self._options)
            return self._blocking

    @property
    def on_loop(self) -> redis.asyncio.Redis:
        """The asyncio client of the running event loop (its connections belong to that loop)."""
        loop = asyncio.get_running_loop()
        if self._async is None or self._async[0] is not loop:
            self._async = (loop, redis.asyncio.Redis.from_url(self.url, **self._options))
        return self._async[1]

    def usable(self) -> bool:
        """False for RETRY_SECONDS after a failure: the in-process limiter answers meanwhile."""
        down_until = self._down_until
        return down_until is None or time.monotonic() >= down_until

    def failed(self, limit: str, exc: BaseException) -> None:
        with self._lock:
            first = self._down_until is None
            self._down_until = time.monotonic() + RETRY_SECONDS
        if first:
            log.warning(
                "limits fall back to this process: Redis unreachable",
                extra={
                    "limit": limit,
                    "redis": redact_url(self.url),
                    "error": repr(exc),
                    "retry_seconds": RETRY_SECONDS,
                },
            )

    def answered(self) -> None:
        if self._down_until is None:
            return
        with self._lock:
            recovered, self._down_until = self._down_until is not None, None
        if recovered:
            log.info("limits shared through Redis again", extra={"redis": redact_url(self.url)})

    async def aclose(self) -> None:
        if self._async is not None and self._async[0] is asyncio.get_running_loop():
            await self._async[1].aclose()
        self._async = None

    def close(self) -> None:
        with self._lock:
            if self._blocking is not None:
                self._blocking.close()
                self._blocking = None


class SharedRateLimiter:
    """`api.ratelimit.RateLimiter`'s buckets in Redis (see the module docstring)."""

    def __init__(self, shared: LimitsRedis, local: RateLimiter) -> None:
        self.shared, self.local = shared, local
        self.per_second, self.burst = local.per_second, local.burst
        # a bucket untouched this long is full again: the same as none
        self._ttl_ms = math.ceil(self.burst / self.per_second * 1000) + 1000 if self.per_second > 0 else 0
        self._script_of: tuple[redis.asyncio.Redis, Any] | None = None  # (the loop's client, its script)

    async def hit(self, authorization: str | None, tenant: str) -> None:
        """Take one token for the caller's key; raise TooManyRequests when there is none."""
        if self.per_second <= 0:
            return
        key = bucket_key(authorization, tenant)
        if self.shared.usable():
            try:
                taken, tokens = await self._script()(
                    keys=[self.shared.key("rate", key)], args=[self.per_second, self.burst, self._ttl_ms]
                )
            except REDIS_ERRORS as exc:
                self.shared.failed("rate limit", exc)
            else:
                self.shared.answered()
                if not int(taken):
                    raise rate_limited(self.per_second, self.burst, float(tokens))
                return
        self.local.take(key)

    def _script(self) -> Any:
        client = self.shared.on_loop
        if self._script_of is None or self._script_of[0] is not client:
            self._script_of = (client, client.register_script(TOKEN_BUCKET))
        return self._script_of[1]

    async def aclose(self) -> None:
        await self.shared.aclose()


class SharedStreamSlots:
    """`api.sse.StreamSlots` counted in Redis with leases (see the module docstring)."""

    def __init__(self, settings: Settings, shared: LimitsRedis, local: StreamSlots) -> None:
        self.shared, self.local = shared, local
        self.per_tenant, self.total = settings.max_streams_per_tenant, settings.max_streams
        self.lease_seconds = settings.stream_lease_seconds
        self.lease_ms = math.ceil(self.lease_seconds * 1000)
        self._acquire = shared.blocking.register_script(ACQUIRE_LEASE)
        self._renew = shared.blocking.register_script(RENEW_LEASE)

    def keys(self, tenant: str) -> list[str]:
        # one hash tag: both sets live in the same slot of a Redis Cluster, as a script needs
        return [self.shared.key("{streams}", "all"), self.shared.key("{streams}", "tenant", tenant)]

    def acquire(self, tenant: str) -> Slot:
        """A slot for one more stream of `tenant`, or 429 too_many_streams. Blocking: called from
        the (sync) route, on a worker thread."""
        if self.shared.usable():
            keys, lease = self.keys(tenant), secrets.token_hex(12)
            try:
                over = int(self._acquire(keys=keys, args=[lease, self.per_tenant, self.total, self.lease_ms]))
            except REDIS_ERRORS as exc:
                self.shared.failed("stream caps", exc)
            else:
                self.shared.answered()
                if over:
                    raise too_many_streams(over == 1, self.per_tenant, self.total)
                return LeasedSlot(self, keys, lease)
        return self.local.acquire(tenant)

    def renew(self, keys: list[str], lease: str) -> None:
        try:
            self._renew(keys=keys, args=[lease, self.lease_ms])
        except REDIS_ERRORS as exc:  # the lease may lapse: the stream goes on uncounted
            self.shared.failed("stream caps", exc)
        else:
            self.shared.answered()

    def drop(self, keys: list[str], lease: str) -> None:
        try:
            with self.shared.blocking.pipeline() as pipe:
                for key in keys:
                    pipe.zrem(key, lease)
                pipe.execute()
        except REDIS_ERRORS as exc:  # the lease expires by itself
            self.shared.failed("stream caps", exc)

    def close(self) -> None:
        self.shared.close()


class LeasedSlot:
    """A stream's lease (`api.sse.Slot`): renewed every third of the lease, removed at the end."""

    def __init__(self, slots: SharedStreamSlots, keys: list[str], lease: str) -> None:
        self._slots, self._keys, self.lease, self._held = slots, keys, lease, True
        self.refresh_seconds: float | None = slots.lease_seconds / 3

    def refresh(self) -> None:
        if self._held:
            self._slots.renew(self._keys, self.lease)

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots.drop(self._keys, self.lease)


def build_limits(settings: Settings) -> tuple[RateLimiter | SharedRateLimiter, StreamSlots | SharedStreamSlots]:
    """The API's rate limiter and stream slots: shared through Redis when the settings name one
    (``Settings.limits_redis``), else this process's."""
    rate = RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
    streams = StreamSlots(settings)
    url = settings.limits_redis
    if url is None:
        return rate, streams
    shared = LimitsRedis(url, settings.limits_key_prefix)
    log.info("rate limit and stream caps shared through Redis", extra={"redis": redact_url(url)})
    return SharedRateLimiter(shared, rate), SharedStreamSlots(settings, shared, streams)
