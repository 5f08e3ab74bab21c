"""The rate limit and the stream caps shared by API replicas through the real Redis on 6379
(api/shared_limits.py): two apps (or two limiter objects) on one Redis grant one allowance
together, a stream lease that is not renewed expires, and an unreachable Redis falls back to the
in-process limits with a warning, never a 500. Each test uses its own key prefix."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import signal
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from api.ratelimit import RateLimiter
from api.shared_limits import LimitsRedis, SharedRateLimiter, SharedStreamSlots, build_limits
from api.sse import StreamSlot, StreamSlots
from common.auth import create_key
from common.db import migrate, session_scope
from common.errors import TooManyRequests
from common.settings import Settings

from .conftest import TAQ, Proc, free_port, http, new_tenant, service_env, tiny_spec, wait_for

pytestmark = pytest.mark.integration


def prefix() -> str:
    return f"taq-test:{secrets.token_hex(6)}:"


@pytest.fixture(scope="module")
def base(tmp_path_factory, pg_database, tiny_model_root, redis_url) -> Settings:
    data = tmp_path_factory.mktemp("shared-limits")
    settings = Settings(
        data_dir=data,
        database_url=pg_database(),
        broker_url="filesystem://",
        storage_url=f"file://{data / 'objects'}",
        model_roots=[tiny_model_root],
        auth_cache_seconds=60,
        limits_redis_url=redis_url,
    )
    migrate(settings)
    return settings


def statuses(clients, headers, n: int) -> list[int]:
    """`n` calls, alternating between the clients (replicas)."""
    return [clients[i % len(clients)].get("/v1/jobs", headers=headers).status_code for i in range(n)]


# ---- the rate limit --------------------------------------------------------------------------
def test_two_replicas_together_grant_one_burst(base):
    limited = base.model_copy(
        update={"rate_limit_per_second": 0.01, "rate_limit_burst": 4, "limits_key_prefix": prefix()}
    )
    headers = new_tenant(base)
    with (
        TestClient(create_app(limited), raise_server_exceptions=False) as one,
        TestClient(create_app(limited), raise_server_exceptions=False) as two,
    ):
        assert statuses([one, two], headers, 10) == [200] * 4 + [429] * 6
        over = two.get("/v1/jobs", headers=headers)
        error = over.json()["error"]
        assert error["code"] == "rate_limited" and "TAQ_RATE_LIMIT_BURST" in error["message"]
        assert int(over.headers["retry-after"]) >= 90  # 0.01 token/s: about 100 s to the next one
        assert one.get("/v1/jobs", headers=new_tenant(base)).status_code == 200  # another key, its own bucket
    # the same two replicas keeping their limits in-process grant a burst each
    local = limited.model_copy(update={"limits_redis_url": "local"})
    headers = new_tenant(base)
    with (
        TestClient(create_app(local), raise_server_exceptions=False) as one,
        TestClient(create_app(local), raise_server_exceptions=False) as two,
    ):
        assert statuses([one, two], headers, 10).count(200) == 8


def test_concurrent_hits_on_two_limiters_never_exceed_the_burst(redis_url):
    key_prefix = prefix()  # one Redis, one key space: two replicas
    limiters = [
        SharedRateLimiter(LimitsRedis(redis_url, key_prefix), RateLimiter(per_second=0.01, burst=10)) for _ in range(2)
    ]

    async def hit(limiter: SharedRateLimiter) -> bool:
        try:
            await limiter.hit("Bearer shared-key-0123456789abcdef", "acme")
            return True
        except TooManyRequests as exc:
            assert exc.code == "rate_limited" and exc.details["retry_after"] >= 1
            return False

    async def burst() -> list[bool]:
        try:
            return await asyncio.gather(*(hit(limiters[i % 2]) for i in range(60)))
        finally:
            for limiter in limiters:
                await limiter.aclose()

    # a thread of its own: earlier tests in the same process (the browser tests) can leave an event
    # loop running in the main thread, where asyncio.run refuses to start another
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        granted = pool.submit(asyncio.run, burst()).result()
    assert sum(granted) == 10
    assert limiters[0].shared.usable()  # Redis answered every call: none went to the fallback


# ---- the stream caps -------------------------------------------------------------------------
def stream_slots(settings: Settings, url: str, key_prefix: str) -> SharedStreamSlots:
    return SharedStreamSlots(settings, LimitsRedis(url, key_prefix), StreamSlots(settings))


def test_stream_caps_are_shared_and_a_lease_expires_unless_renewed(tmp_path, redis_url):
    settings = Settings(data_dir=tmp_path, max_streams_per_tenant=2, max_streams=3, stream_lease_seconds=1)
    key_prefix = prefix()
    one, two = stream_slots(settings, redis_url, key_prefix), stream_slots(settings, redis_url, key_prefix)
    try:
        held = [one.acquire("acme"), one.acquire("acme")]
        with pytest.raises(TooManyRequests, match="TAQ_MAX_STREAMS_PER_TENANT=2") as refused:
            two.acquire("acme")  # the other replica sees acme's two streams
        assert refused.value.code == "too_many_streams" and refused.value.details["retry_after"] == 5
        other = two.acquire("globex")
        with pytest.raises(TooManyRequests, match="TAQ_MAX_STREAMS=3"):
            one.acquire("initech")  # three open in all
        other.release()
        initech = one.acquire("initech")
        # acme's first stream stays open and renews its lease; the second's replica died (no renewal)
        renewed_until = time.monotonic() + 1.6
        while time.monotonic() < renewed_until:
            held[0].refresh()
            initech.refresh()
            time.sleep(0.25)
        again = two.acquire("acme")  # the lapsed lease freed one slot, the renewed one holds the other
        with pytest.raises(TooManyRequests, match="TAQ_MAX_STREAMS"):
            two.acquire("acme")
        for slot in (held[0], initech, again):
            slot.release()
        for tenant in ("acme", "acme", "globex"):  # released leases free their slots at once
            one.acquire(tenant)
    finally:
        one.close()
        two.close()


def test_an_app_refuses_a_stream_when_another_replica_holds_the_tenants_slots(base):
    settings = base.model_copy(update={"max_streams_per_tenant": 2, "limits_key_prefix": prefix()})
    tenant = f"t-{secrets.token_hex(4)}"
    with session_scope(base) as session:
        headers = {"Authorization": f"Bearer {create_key(session, tenant).key}"}
    replica = stream_slots(settings, str(settings.limits_redis), settings.limits_key_prefix)
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            job_id = client.post("/v1/jobs", headers=headers, json=tiny_spec("uniform")).json()["id"]
            held = [replica.acquire(tenant), replica.acquire(tenant)]
            over = client.get(f"/v1/jobs/{job_id}/events", headers={**headers, "Accept": "text/event-stream"})
            assert over.status_code == 429 and over.json()["error"]["code"] == "too_many_streams"
            assert over.headers["retry-after"] == "5"
            assert client.get(f"/v1/jobs/{job_id}/events", headers=headers).status_code == 200  # JSON needs no slot
            for slot in held:
                slot.release()
    finally:
        replica.close()


# ---- Redis unreachable -----------------------------------------------------------------------
def test_an_unreachable_redis_falls_back_to_the_process_limits_with_a_warning(base, caplog, tmp_path):
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = base.model_copy(
        update={"limits_redis_url": nowhere, "rate_limit_per_second": 0.01, "rate_limit_burst": 3}
    )
    headers = new_tenant(base)
    with (
        caplog.at_level(logging.WARNING, logger="taq.api.limits"),
        TestClient(create_app(settings), raise_server_exceptions=False) as client,
    ):
        assert statuses([client], headers, 5) == [200, 200, 200, 429, 429]  # the local bucket, never a 500
        assert client.get("/v1/jobs", headers=headers).json()["error"]["code"] == "rate_limited"
    warnings = [r for r in caplog.records if r.getMessage() == "limits fall back to this process: Redis unreachable"]
    assert len(warnings) == 1  # once, not per request
    assert warnings[0].limit == "rate limit" and warnings[0].redis == nowhere and warnings[0].retry_seconds == 5.0

    # the stream caps too: counted in this process while Redis does not answer
    streams = Settings(data_dir=tmp_path, max_streams_per_tenant=1, limits_redis_url=nowhere)
    _, slots = build_limits(streams)
    assert isinstance(slots, SharedStreamSlots)
    try:
        first = slots.acquire("acme")
        assert isinstance(first, StreamSlot)  # the in-process slot
        with pytest.raises(TooManyRequests, match="TAQ_MAX_STREAMS_PER_TENANT=1"):
            slots.acquire("acme")
        first.release()
        slots.acquire("acme").release()
    finally:
        slots.close()


# ---- two real API processes ------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_two_api_processes_share_the_stream_cap(base, tmp_path, redis_url):
    """Streams held open on one `taq api` count on the other; their leases are renewed while they
    stay open (longer than a lease) and removed when they close."""
    env = service_env(
        data_dir=str(base.data_dir),
        database_url=base.database_url,
        storage_url=base.storage_url,
        model_roots=str(base.model_roots[0]),
        limits_redis_url=redis_url,
        limits_key_prefix=prefix(),
        max_streams_per_tenant="2",
        # renewed every 4 s: long enough that two loaded cores (CI shares them with the other
        # services) do not delay a renewal past the lease
        stream_lease_seconds="12",
        sse_poll_seconds="0.2",
        sse_max_seconds="120",
    )
    ports = [free_port(), free_port()]
    apis = [
        Proc([TAQ, "api", "--port", str(port), "--skip-migrate"], env, tmp_path / f"api-{i}.log")
        for i, port in enumerate(ports)
    ]
    headers = new_tenant(base)
    streams: list = []
    try:
        one, two = (http(f"http://127.0.0.1:{port}") for port in ports)
        with one, two:
            for client, proc in ((one, apis[0]), (two, apis[1])):
                wait_for(lambda c=client, p=proc: _ready(c, p), 120, what="taq api")
            job_id = one.post("/v1/jobs", headers=headers, json=tiny_spec("uniform")).json()["id"]
            sse = {**headers, "Accept": "text/event-stream"}
            for _ in range(2):  # the tenant's two slots, both on the first API
                cm = one.stream("GET", f"/v1/jobs/{job_id}/events", headers=sse)
                response = cm.__enter__()
                assert response.status_code == 200
                lines = response.iter_lines()  # kept: a dropped iterator closes the response
                assert next(lines) == "retry: 2000"
                streams.append((cm, lines))
            time.sleep(13)  # past one lease: only renewals keep the slots
            over = two.get(f"/v1/jobs/{job_id}/events", headers=sse)
            assert over.status_code == 429 and over.json()["error"]["code"] == "too_many_streams"
            assert over.headers["retry-after"] == "5"
            for cm, _ in streams:
                cm.__exit__(None, None, None)
            streams = []

            def reopened() -> bool:
                with two.stream("GET", f"/v1/jobs/{job_id}/events", headers=sse) as again:
                    return again.status_code == 200

            # the leases were renewed at most 4 s before the close, so they would lapse 8 s after it at
            # the earliest: a slot back sooner was released by the stream's end
            wait_for(reopened, 7.5, interval=0.2, what="the second API to open a stream once the first closed its own")
    finally:
        for cm, _ in streams:
            cm.__exit__(None, None, None)
        for proc in apis:
            proc.stop(signal.SIGTERM)


def _ready(client, proc) -> bool:
    assert proc.alive(), proc.tail()
    try:
        return client.get("/readyz").status_code == 200
    except httpx.HTTPError:
        return False
