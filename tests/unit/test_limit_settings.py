"""Where the API keeps its rate limit and stream caps (TAQ_LIMITS_REDIS_URL): in-process on the
embedded default, the broker's Redis when it is one, another Redis, or in-process on request."""

from __future__ import annotations

import pytest

from api.ratelimit import RateLimiter
from api.shared_limits import SharedRateLimiter, SharedStreamSlots, build_limits
from api.sse import StreamSlots
from common.settings import Settings

pytestmark = pytest.mark.unit


def test_settings_choose_where_the_limits_live(tmp_path):
    redis_broker = "redis://:secret@broker:6379/0"
    assert Settings(data_dir=tmp_path).limits_redis is None  # embedded: in-process
    assert Settings(data_dir=tmp_path, broker_url=redis_broker).limits_redis == redis_broker
    assert Settings(data_dir=tmp_path, broker_url=redis_broker, limits_redis_url="local").limits_redis is None
    own = "rediss://limits:6380/2"
    assert Settings(data_dir=tmp_path, broker_url=redis_broker, limits_redis_url=own).limits_redis == own
    with pytest.raises(ValueError, match="TAQ_LIMITS_REDIS_URL"):
        Settings(data_dir=tmp_path, limits_redis_url="memcached://x")
    rate, streams = build_limits(Settings(data_dir=tmp_path))
    assert isinstance(rate, RateLimiter) and isinstance(streams, StreamSlots)
    rate, streams = build_limits(Settings(data_dir=tmp_path, broker_url=redis_broker))  # connects to nothing yet
    assert isinstance(rate, SharedRateLimiter) and isinstance(streams, SharedStreamSlots)
    streams.close()
