"""The Redis client for optional, fail-fast uses (code cache, throttle counters)."""

from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..settings import Settings


def fail_fast_redis(settings: Settings) -> redis.Redis:
    """A client that gives up after REDIS_SOCKET_TIMEOUT: callers fall back instead of waiting."""
    timeout = settings.redis_socket_timeout
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # redis-py 8 retries 10 times with backoff by default: seconds per call with Redis down.
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )
