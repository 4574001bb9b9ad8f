"""The code cache against the real Redis and in process: freshness, TTLs, races, and Redis outages."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import selectors
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import pytest
import redis
from support import FakeClock, closed_port, make_settings

from referral_grpc.domain.ports import CachedCode, CacheRead
from referral_grpc.infra.batches import DelayedDrain
from referral_grpc.infra.breaker import CircuitBreaker
from referral_grpc.infra.cache import (
    GENERATION_TTL_SECONDS,
    InProcessCodeCache,
    InstrumentedCodeCache,
    RedisCodeCache,
    encode_entry,
    make_code_cache,
)
from referral_grpc.infra.near_cache import NearCache
from referral_grpc.infra.redis_client import fail_fast_redis, run_command
from referral_grpc.settings import Settings

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
EMAIL = "ada@example.com"
CACHE_TTL = 300
RESET_AFTER = 5.0


class FlakyRedis:
    """A loopback TCP endpoint before the real Redis: forwards, hangs up at once, or never answers."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.mode = "forward"
        self.accepted = 0
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.02)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept_loop, daemon=True)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def set_mode(self, mode: str) -> None:
        """Switch behaviour; an outage also cuts the connections the client already holds in its pool."""
        self.mode = mode
        if mode != "forward":
            with self._lock:
                for sock in self._sockets:
                    with contextlib.suppress(OSError):  # already closed by its pump
                        sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        for thread in list(self._threads):
            thread.join(timeout=2)
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            with self._lock:
                self._sockets.append(conn)
            if self.mode == "refuse":
                conn.close()
            elif self.mode == "forward":
                upstream = socket.create_connection(self._target)
                with self._lock:
                    self._sockets.append(upstream)
                thread = threading.Thread(target=self._pump, args=(conn, upstream), daemon=True)
                self._threads.append(thread)
                thread.start()
            # "blackhole": keep the connection open and never read or write.

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        peer = {client: upstream, upstream: client}
        with selectors.DefaultSelector() as selector:
            selector.register(client, selectors.EVENT_READ)
            selector.register(upstream, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.02):
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = source.recv(65536)
                        if data:
                            peer[source].sendall(data)
                            continue
                    except OSError:
                        pass
                    client.close()
                    upstream.close()
                    return


@pytest.fixture
def redis_settings(redis_url: str, key_prefix: str) -> Settings:
    return make_settings(redis_url=redis_url, redis_key_prefix=key_prefix, cache_ttl_seconds=CACHE_TTL)


def redis_cache(settings: Settings, clock: FakeClock, *, background: bool = False) -> RedisCodeCache:
    """Fills applied before `fill` returns, unless `background` (as the service runs it)."""
    breaker = CircuitBreaker(failure_threshold=3, reset_after=RESET_AFTER, monotonic=clock.monotonic)
    return RedisCodeCache.from_settings(settings, breaker=breaker, fill_in_background=background)


def fill(cache: InstrumentedCodeCache, email_key: str, generation: str | None, value: CachedCode) -> None:
    """A fill that has been applied (or refused) when this returns, whichever mode the cache is in."""
    cache.fill(email_key, generation, value, NOW)
    if isinstance(cache, RedisCodeCache):
        assert cache.settle()


@pytest.fixture(params=["redis", "redis_background_fills", "redis_without_near_cache", "in_process"])
def cache(
    request: pytest.FixtureRequest, redis_settings: Settings, clock: FakeClock
) -> Iterator[InstrumentedCodeCache]:
    built: InstrumentedCodeCache
    if request.param == "redis":
        built = redis_cache(redis_settings, clock)
    elif request.param == "redis_background_fills":
        built = redis_cache(redis_settings, clock, background=True)
    elif request.param == "redis_without_near_cache":
        built = redis_cache(dataclasses.replace(redis_settings, near_cache_entries=0), clock)
    else:
        built = InProcessCodeCache(CACHE_TTL, monotonic=clock.monotonic)
    yield built
    built.close()


@pytest.fixture
def flaky_redis(redis_url: str) -> Iterator[FlakyRedis]:
    target = urlsplit(redis_url)
    proxy = FlakyRedis((target.hostname or "127.0.0.1", target.port or 6379))
    yield proxy
    proxy.close()


def code(name: str = "ABCD2345", valid_for: timedelta = timedelta(days=30)) -> CachedCode:
    return CachedCode(code=name, expires_at=NOW + valid_for, owner_verified=True)


def counts(cache: InstrumentedCodeCache) -> dict[str, int]:
    """The counters every cache reports (the near cache's own hits are checked where they matter)."""
    return {name: cache.stats()[name] for name in ("hits", "misses", "errors", "bypassed")}


def timed_get(cache: InstrumentedCodeCache) -> tuple[CacheRead, float]:
    started = time.perf_counter()
    read = cache.get(EMAIL, NOW)
    return read, time.perf_counter() - started


# Semantics shared by both implementations.


def test_miss_then_fill_then_hit(cache: InstrumentedCodeCache) -> None:
    first = cache.get(EMAIL, NOW)
    assert first.value is None
    assert first.generation == "0"

    fill(cache, EMAIL, first.generation, code())

    assert cache.get(EMAIL, NOW) == CacheRead(value=code(), generation="0")
    assert cache.get("someone-else@example.com", NOW).value is None
    assert counts(cache) == {"hits": 1, "misses": 2, "errors": 0, "bypassed": 0}


def test_invalidate_makes_the_next_get_a_miss(cache: InstrumentedCodeCache) -> None:
    fill(cache, EMAIL, cache.get(EMAIL, NOW).generation, code("OLD22222"))

    cache.invalidate(EMAIL)

    after = cache.get(EMAIL, NOW)
    assert after.value is None
    assert after.generation not in (None, "0")
    fill(cache, EMAIL, after.generation, code("NEW33333"))
    assert cache.get(EMAIL, NOW).value == code("NEW33333")


def test_slow_reader_cannot_write_back_a_value_older_than_an_invalidation(
    cache: InstrumentedCodeCache,
) -> None:
    slow_reader = cache.get(EMAIL, NOW)
    cache.invalidate(EMAIL)  # a rotation commits while the slow reader is in the database

    fill(cache, EMAIL, slow_reader.generation, code("OLD22222"))

    assert cache.get(EMAIL, NOW).value is None


def test_fill_without_generation_is_skipped(cache: InstrumentedCodeCache) -> None:
    fill(cache, EMAIL, None, code())

    assert cache.get(EMAIL, NOW).value is None


def test_entry_is_a_miss_once_its_code_has_expired(cache: InstrumentedCodeCache) -> None:
    read = cache.get(EMAIL, NOW)
    fill(cache, EMAIL, read.generation, code(valid_for=timedelta(hours=1)))

    assert cache.get(EMAIL, NOW + timedelta(minutes=59)).value == code(valid_for=timedelta(hours=1))
    assert cache.get(EMAIL, NOW + timedelta(hours=1)).value is None
    assert cache.get(EMAIL, NOW + timedelta(hours=2)).value is None


def test_code_with_no_time_left_is_not_stored(cache: InstrumentedCodeCache) -> None:
    read = cache.get(EMAIL, NOW)

    fill(cache, EMAIL, read.generation, code(valid_for=timedelta(0)))
    fill(cache, EMAIL, read.generation, code(valid_for=timedelta(microseconds=500)))

    # Asked with an earlier `now`, a stored entry would still be a hit.
    assert cache.get(EMAIL, NOW - timedelta(days=1)).value is None


def race_readers_and_writers(
    reader_cache: InstrumentedCodeCache,
    writer_cache: InstrumentedCodeCache,
    *,
    writers: int = 2,
    rounds: int = 150,
    pause: float = 0.0005,
) -> tuple[int, int]:
    """6 readers (cache-aside: get, else read the "database" slowly and fill) against `writers` writers,
    each invalidating `rounds` times, `pause` seconds apart (the last version written: writers * rounds).

    Every read that hits must be at least as new as the last invalidation that had returned when the
    read began. Returns (hits served, fills that were stale when made: the race really happened).
    """
    lock = threading.Lock()
    database = {"version": 0}
    invalidated = {"version": 0}  # the newest version whose invalidate() has returned
    writers_done = threading.Event()

    def writer(rounds: int) -> None:
        for _ in range(rounds):
            with lock:
                database["version"] += 1
                version = database["version"]
            time.sleep(random.choice((0, 0.0002)))
            writer_cache.invalidate(EMAIL)
            with lock:
                invalidated["version"] = max(invalidated["version"], version)
            time.sleep(pause)

    def reader() -> tuple[int, int]:
        served = stale_fills_possible = 0
        while not writers_done.is_set():
            with lock:
                must_see = invalidated["version"]
            read = reader_cache.get(EMAIL, NOW)
            if read.value is not None:
                assert int(read.value.code.removeprefix("V")) >= must_see
                served += 1
                time.sleep(0.0001)  # requests arrive spaced out, not in a GIL-holding loop
                continue
            with lock:
                version = database["version"]
            time.sleep(random.uniform(0, 0.001))  # a slow reader widens the race window
            with lock:
                stale_fills_possible += database["version"] > version
            reader_cache.fill(EMAIL, read.generation, code(f"V{version}"), NOW)
        return served, stale_fills_possible

    with ThreadPoolExecutor(max_workers=8) as pool:
        readers = [pool.submit(reader) for _ in range(6)]
        writing = [pool.submit(writer, rounds) for _ in range(writers)]
        for future in writing:
            future.result()
        writers_done.set()
        counts = [future.result() for future in readers]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def test_racing_readers_and_writers_never_serve_a_code_older_than_the_last_invalidation(
    cache: InstrumentedCodeCache,
) -> None:
    served, stale_fills_attempted = race_readers_and_writers(cache, cache, writers=2, rounds=150)

    final = cache.get(EMAIL, NOW).value
    assert final is None or final.code == "V300"
    assert served > 0
    assert cache.stats()["hits"] > 0
    assert stale_fills_attempted > 0  # the race was really exercised


# Redis specifics: key layout, TTLs, generation keys.


def test_entry_ttl_never_outlives_the_code(
    redis_settings: Settings, clock: FakeClock, redis_client: redis.Redis, key_prefix: str
) -> None:
    cache = redis_cache(redis_settings, clock)
    try:
        cache.fill("soon@example.com", "0", code(valid_for=timedelta(seconds=10)), NOW)
        cache.fill("later@example.com", "0", code(valid_for=timedelta(days=30)), NOW)
    finally:
        cache.close()

    assert 9_000 < redis_client.pttl(f"{key_prefix}code:soon@example.com") <= 10_000
    later_ttl = redis_client.pttl(f"{key_prefix}code:later@example.com")
    assert (CACHE_TTL - 1) * 1000 < later_ttl <= CACHE_TTL * 1000


def test_key_layout_holds_only_public_data_and_every_key_has_a_ttl(
    redis_settings: Settings, clock: FakeClock, redis_client: redis.Redis, key_prefix: str
) -> None:
    cache = redis_cache(redis_settings, clock)
    try:
        cache.invalidate(EMAIL)
        cache.fill(EMAIL, cache.get(EMAIL, NOW).generation, code(), NOW)
    finally:
        cache.close()

    keys = sorted(key.decode() for key in redis_client.scan_iter(match=f"{key_prefix}*"))
    assert keys == [f"{key_prefix}code:{EMAIL}", f"{key_prefix}codegen:{EMAIL}"]
    assert redis_client.get(f"{key_prefix}code:{EMAIL}") == b"ABCD2345|2026-05-31T12:00:00+00:00|verified"
    assert redis_client.get(f"{key_prefix}codegen:{EMAIL}") == b"1"
    assert 0 < redis_client.ttl(f"{key_prefix}codegen:{EMAIL}") <= GENERATION_TTL_SECONDS
    assert all(redis_client.pttl(key) > 0 for key in keys)


def test_expired_entry_still_held_by_redis_is_a_miss(
    redis_settings: Settings, clock: FakeClock, redis_client: redis.Redis, key_prefix: str
) -> None:
    cache = redis_cache(redis_settings, clock)
    try:
        cache.fill(EMAIL, "0", code(valid_for=timedelta(hours=1)), NOW)

        later = cache.get(EMAIL, NOW + timedelta(hours=2))
    finally:
        cache.close()

    assert later == CacheRead(value=None, generation="0")
    assert redis_client.exists(f"{key_prefix}code:{EMAIL}") == 1


def test_missing_generation_key_reads_as_zero(
    redis_settings: Settings, clock: FakeClock, redis_client: redis.Redis, key_prefix: str
) -> None:
    cache = redis_cache(redis_settings, clock)
    try:
        cache.invalidate(EMAIL)
        before_expiry = cache.get(EMAIL, NOW)
        redis_client.delete(f"{key_prefix}codegen:{EMAIL}")  # as if its TTL had run out

        after_expiry = cache.get(EMAIL, NOW)
        cache.fill(EMAIL, before_expiry.generation, code("OLD22222"), NOW)
        stale_refused = cache.get(EMAIL, NOW).value
        cache.fill(EMAIL, after_expiry.generation, code("NEW33333"), NOW)
        refilled = cache.get(EMAIL, NOW).value
    finally:
        cache.close()

    assert before_expiry.generation == "1"
    assert after_expiry.generation == "0"
    assert stale_refused is None
    assert refilled == code("NEW33333")


def test_undecodable_entry_is_a_miss_and_gets_replaced(
    redis_settings: Settings, clock: FakeClock, redis_client: redis.Redis, key_prefix: str
) -> None:
    redis_client.set(f"{key_prefix}code:{EMAIL}", "garbage-from-another-version", ex=60)
    cache = redis_cache(redis_settings, clock)
    try:
        read = cache.get(EMAIL, NOW)
        cache.fill(EMAIL, read.generation, code(), NOW)
        refilled = cache.get(EMAIL, NOW).value
    finally:
        cache.close()

    assert read == CacheRead(value=None, generation="0")
    assert refilled == code()


# The near cache: each process's copy of its recent hits, dropped when Redis reports a change.


def key_of(prefix: str, email: str = EMAIL) -> str:
    return f"{prefix}code:{email}"


def near_of(cache: RedisCodeCache) -> NearCache:
    assert cache.near is not None
    return cache.near


def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def two_processes(
    redis_settings: Settings, clock: FakeClock
) -> Iterator[tuple[RedisCodeCache, RedisCodeCache]]:
    """Two caches on one Redis namespace, as two server processes hold them."""
    first, second = redis_cache(redis_settings, clock), redis_cache(redis_settings, clock)
    yield first, second
    first.close()
    second.close()


def held_in_near_cache(cache: RedisCodeCache) -> CacheRead:
    """Read until the value comes from the near cache (the first read after a fill goes to Redis)."""
    before = cache.stats()["near_hits"]
    for _ in range(3):
        read = cache.get(EMAIL, NOW)
        if cache.stats()["near_hits"] > before:
            return read
    raise AssertionError("the near cache never served the entry")


def test_repeat_hits_are_served_by_the_near_cache_without_redis(
    redis_settings: Settings, clock: FakeClock, redis_client: redis.Redis
) -> None:
    cache = redis_cache(redis_settings, clock)
    try:
        cache.fill(EMAIL, cache.get(EMAIL, NOW).generation, code(), NOW)
        assert cache.get(EMAIL, NOW).value == code()  # from Redis; kept
        commands_before = redis_client.info("stats")["total_commands_processed"]
        reads = [cache.get(EMAIL, NOW) for _ in range(50)]
        commands_after = redis_client.info("stats")["total_commands_processed"]
    finally:
        cache.close()

    assert reads == [CacheRead(value=code(), generation="0")] * 50
    assert cache.stats()["near_hits"] == 50
    # Only this test's INFO and whatever else shares the Redis ran meanwhile, not 50 reads.
    assert commands_after - commands_before < 50


def test_a_change_made_by_another_process_is_seen_by_the_very_next_read(
    two_processes: tuple[RedisCodeCache, RedisCodeCache],
) -> None:
    reader, writer = two_processes
    stale = 0
    for round_number in range(100):
        expected = code(f"V{round_number}")
        writer.fill(EMAIL, writer.get(EMAIL, NOW).generation, expected, NOW)
        assert held_in_near_cache(reader).value == expected
        writer.invalidate(EMAIL)  # returns once Redis changed: a request after it must not see the old code
        stale += reader.get(EMAIL, NOW).value is not None
    assert stale == 0


def test_a_change_made_directly_in_redis_is_seen_too(
    redis_settings: Settings, clock: FakeClock, redis_client: redis.Redis, key_prefix: str
) -> None:
    cache = redis_cache(redis_settings, clock)
    try:
        cache.fill(EMAIL, cache.get(EMAIL, NOW).generation, code("OLD22222"), NOW)
        held_in_near_cache(cache)
        redis_client.set(key_of(key_prefix), "NEW33333|2026-06-01T12:00:00+00:00|verified", px=60_000)
        replaced = cache.get(EMAIL, NOW)
        held_in_near_cache(cache)
        redis_client.delete(key_of(key_prefix))
        deleted = cache.get(EMAIL, NOW)
    finally:
        cache.close()

    assert replaced.value is not None and replaced.value.code == "NEW33333"
    assert deleted.value is None


def test_a_lost_invalidation_connection_empties_the_near_cache_until_it_is_back(
    redis_settings: Settings, clock: FakeClock, redis_client: redis.Redis, key_prefix: str
) -> None:
    cache = redis_cache(redis_settings, clock)
    try:
        cache.fill(EMAIL, cache.get(EMAIL, NOW).generation, code("OLD22222"), NOW)
        held_in_near_cache(cache)
        near = near_of(cache)
        killed = near.client_id
        redis_client.client_kill_filter(_id=killed)
        # Changed while nobody listens: the near cache must not serve what it held.
        redis_client.set(key_of(key_prefix), "NEW33333|2026-06-01T12:00:00+00:00|verified", px=60_000)
        after_loss = cache.get(EMAIL, NOW)
        lost = near.client_id is None and near.size() == 0
        wait_for(lambda: near.client_id is not None)
        served_again = held_in_near_cache(cache)
    finally:
        cache.close()

    assert after_loss.value is not None and after_loss.value.code == "NEW33333"
    assert lost
    assert near.client_id != killed
    assert served_again.value is not None and served_again.value.code == "NEW33333"


def test_racing_readers_in_one_process_and_a_writer_in_another_never_see_an_invalidated_code(
    two_processes: tuple[RedisCodeCache, RedisCodeCache],
) -> None:
    reader_cache, writer_cache = two_processes

    # One writer, a change every millisecond: between changes the near cache has time to fill and serve
    # (every change, and every fill, drops what it holds).
    served, stale_fills_attempted = race_readers_and_writers(
        reader_cache, writer_cache, writers=1, rounds=200, pause=0.001
    )

    final = reader_cache.get(EMAIL, NOW).value
    assert final is None or final.code == "V200"
    assert served > 0
    assert reader_cache.stats()["near_hits"] > 0  # the near cache really served during the race
    assert stale_fills_attempted > 0


def test_a_redis_that_refuses_client_tracking_leaves_the_near_cache_off_and_says_so(
    redis_settings: Settings,
    clock: FakeClock,
    redis_client: redis.Redis,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    user = f"no-tracking-{uuid.uuid4().hex[:8]}"
    redis_client.acl_setuser(
        user, enabled=True, nopass=True, keys=["*"], channels=["*"], commands=["+@all", "-client|tracking"]
    )
    parts = urlsplit(redis_url)
    url = f"redis://{user}@{parts.hostname}:{parts.port or 6379}{parts.path}"
    cache = redis_cache(dataclasses.replace(redis_settings, redis_url=url), clock)
    try:
        cache.fill(EMAIL, cache.get(EMAIL, NOW).generation, code(), NOW)
        reads = [cache.get(EMAIL, NOW) for _ in range(5)]
    finally:
        cache.close()
        redis_client.acl_deluser(user)

    assert all(read.value == code() for read in reads)
    assert cache.stats()["near_hits"] == 0
    assert near_of(cache).client_id is None
    said = [r.getMessage() for r in caplog.records if "client tracking" in r.getMessage()]
    assert len(said) == 1
    assert said[0].startswith("near cache: off, Redis refused client tracking: ")
    assert "no permissions" in said[0].lower()


def test_near_cache_is_off_when_configured_so(redis_settings: Settings, clock: FakeClock) -> None:
    cache = redis_cache(dataclasses.replace(redis_settings, near_cache_entries=0), clock)
    try:
        cache.fill(EMAIL, cache.get(EMAIL, NOW).generation, code(), NOW)
        reads = [cache.get(EMAIL, NOW) for _ in range(5)]
    finally:
        cache.close()

    assert cache.near is None
    assert all(read.value == code() for read in reads)
    assert cache.stats()["near_hits"] == 0


# Redis down or slow: fail fast, never raise, recover by itself.


def test_closed_port_fails_fast_then_breaker_skips_redis(key_prefix: str, clock: FakeClock) -> None:
    settings = make_settings(redis_url=f"redis://127.0.0.1:{closed_port()}/0", redis_key_prefix=key_prefix)
    cache = redis_cache(settings, clock)
    try:
        first, first_seconds = timed_get(cache)
        failing = [timed_get(cache) for _ in range(2)]
        cache.fill(EMAIL, "0", code(), NOW)
        cache.invalidate(EMAIL)
        open_reads = [timed_get(cache) for _ in range(200)]
    finally:
        cache.close()

    assert first == CacheRead(value=None, generation=None)
    assert first_seconds < 0.5
    assert all(read == first and seconds < 0.5 for read, seconds in failing)
    assert all(read == first for read, _ in open_reads)
    # No network I/O: well under a millisecond each (the bound on the slowest allows a busy machine).
    assert statistics.median(seconds for _, seconds in open_reads) < 0.001
    assert max(seconds for _, seconds in open_reads) < 0.05
    assert counts(cache) == {"hits": 0, "misses": 203, "errors": 3, "bypassed": 202}


def test_a_command_cut_off_by_the_timeout_never_leaves_its_reply_for_the_next(
    key_prefix: str, redis_url: str, redis_client: redis.Redis
) -> None:
    """run_command (the lookup's MGET) drops a connection whose reply is still due; an error reply
    keeps it. Else the next call on that connection would read the late reply as its own."""
    client = fail_fast_redis(make_settings(redis_url=redis_url, redis_socket_timeout=0.1))
    try:
        redis_client.set(f"{key_prefix}k", "value")
        with pytest.raises(redis.TimeoutError):
            run_command(client, "BLPOP", f"{key_prefix}empty", "0.3")  # answers nil after 0.3 s
        time.sleep(0.4)  # the late nil has arrived by now, on the connection that asked
        assert run_command(client, "GET", f"{key_prefix}k") == "value"
        with pytest.raises(redis.ResponseError):
            run_command(client, "INCR", f"{key_prefix}k")  # not an integer
        assert run_command(client, "MGET", f"{key_prefix}k", f"{key_prefix}none") == ["value", None]
        assert len(client.connection_pool._available_connections) == 1  # the one after the timeout, kept
    finally:
        client.close()


def test_unresponsive_redis_fails_within_the_socket_timeout_then_breaker_stops_connecting(
    key_prefix: str, clock: FakeClock, flaky_redis: FlakyRedis
) -> None:
    flaky_redis.set_mode("blackhole")
    settings = make_settings(redis_url=flaky_redis.url, redis_key_prefix=key_prefix, redis_socket_timeout=0.1)
    cache = redis_cache(settings, clock)
    try:
        failing = [timed_get(cache) for _ in range(3)]
        connections_when_opened = flaky_redis.accepted
        cache.invalidate(EMAIL)
        open_reads = [timed_get(cache) for _ in range(200)]
        time.sleep(0.05)  # let any connection attempt reach the accept loop
    finally:
        cache.close()

    assert all(read == CacheRead(value=None, generation=None) for read, _ in failing + open_reads)
    assert all(0.05 < seconds < 0.5 for _, seconds in failing)
    # No network I/O: well under a millisecond each (the bound on the slowest allows a busy machine).
    assert statistics.median(seconds for _, seconds in open_reads) < 0.001
    assert max(seconds for _, seconds in open_reads) < 0.05
    assert connections_when_opened >= 1
    assert flaky_redis.accepted == connections_when_opened
    assert cache.stats()["errors"] == 3


def test_breaker_probes_again_after_its_reset_interval_and_recovers(
    key_prefix: str, clock: FakeClock, flaky_redis: FlakyRedis
) -> None:
    settings = make_settings(redis_url=flaky_redis.url, redis_key_prefix=key_prefix)
    cache = redis_cache(settings, clock)
    try:
        flaky_redis.set_mode("refuse")
        down = [cache.get(EMAIL, NOW) for _ in range(3)]
        flaky_redis.set_mode("forward")
        still_open = cache.get(EMAIL, NOW)
        clock.advance(seconds=RESET_AFTER)
        probe = cache.get(EMAIL, NOW)
        cache.fill(EMAIL, probe.generation, code(), NOW)
        recovered = cache.get(EMAIL, NOW)
    finally:
        cache.close()

    assert down == [CacheRead(value=None, generation=None)] * 3
    assert still_open == CacheRead(value=None, generation=None)
    assert probe == CacheRead(value=None, generation="0")
    assert recovered == CacheRead(value=code(), generation="0")


def test_invalidation_lost_to_an_outage_is_replayed_before_the_next_read(
    key_prefix: str, clock: FakeClock, flaky_redis: FlakyRedis, redis_client: redis.Redis
) -> None:
    settings = make_settings(redis_url=flaky_redis.url, redis_key_prefix=key_prefix)
    cache = redis_cache(settings, clock)
    try:
        cache.fill(EMAIL, cache.get(EMAIL, NOW).generation, code("OLD22222"), NOW)
        flaky_redis.set_mode("refuse")
        cache.invalidate(EMAIL)  # the rotation committed, but Redis is unreachable
        during = [cache.get(EMAIL, NOW) for _ in range(3)]  # the breaker opens
        cache.invalidate(EMAIL)  # skipped without I/O while open, remembered
        flaky_redis.set_mode("forward")
        clock.advance(seconds=RESET_AFTER)

        after = cache.get(EMAIL, NOW)
        pending_after = cache.pending_invalidations()
    finally:
        cache.close()

    assert during == [CacheRead(value=None, generation=None)] * 3
    assert after == CacheRead(value=None, generation="1")
    assert pending_after == 0
    assert redis_client.exists(f"{key_prefix}code:{EMAIL}") == 0


def test_a_key_whose_invalidation_failed_during_the_replay_is_not_read_until_replayed_again(
    key_prefix: str, clock: FakeClock, flaky_redis: FlakyRedis, redis_client: redis.Redis
) -> None:
    settings = make_settings(redis_url=flaky_redis.url, redis_key_prefix=key_prefix, near_cache_entries=0)
    client = fail_fast_redis(settings)
    breaker = CircuitBreaker(failure_threshold=3, reset_after=RESET_AFTER, monotonic=clock.monotonic)
    cache = RedisCodeCache(client, key_prefix=key_prefix, ttl_seconds=CACHE_TTL, breaker=breaker)
    replayed = threading.Event()
    evalsha = client.evalsha

    def during_the_replay(*args: object, **kwargs: object) -> object:
        # The replay's script call (redis-py's, not ours): once it is done, another thread rotates
        # the code while the replay, the half-open probe, is still in flight (so that invalidation is
        # remembered, not sent), and another process fills the old code under the current generation.
        result = evalsha(*args, **kwargs)
        if not replayed.is_set():
            replayed.set()
            rotation = threading.Thread(target=cache.invalidate, args=(EMAIL,))
            rotation.start()
            rotation.join()
            redis_client.set(key_of(key_prefix), encode_entry(code("OLD22222")), px=60_000)
        return result

    try:
        cache.fill(EMAIL, cache.get(EMAIL, NOW).generation, code("OLD22222"), NOW)
        flaky_redis.set_mode("refuse")
        cache.invalidate(EMAIL)
        for _ in range(3):
            cache.get(EMAIL, NOW)  # the breaker opens
        flaky_redis.set_mode("forward")
        clock.advance(seconds=RESET_AFTER)
        client.evalsha = during_the_replay  # type: ignore[method-assign]

        during = cache.get(EMAIL, NOW)  # replays, then finds this key's invalidation owed again
        owed = cache.pending_invalidations()
        clock.advance(seconds=RESET_AFTER)
        after = cache.get(EMAIL, NOW)  # the next probe replays it
    finally:
        cache.close()

    assert replayed.is_set()
    assert during == CacheRead(value=None, generation=None)
    assert owed == 1
    assert after == CacheRead(value=None, generation="2")
    assert redis_client.exists(key_of(key_prefix)) == 0


# In-process specifics: monotonic TTL, bounded size, factory.


def test_background_fills_from_many_threads_all_land_in_few_script_calls(
    redis_settings: Settings, clock: FakeClock, redis_client: redis.Redis, key_prefix: str
) -> None:
    cache = redis_cache(dataclasses.replace(redis_settings, near_cache_entries=0), clock, background=True)
    emails = [f"user{n}@example.com" for n in range(2000)]
    calls_before = _script_calls(redis_client)
    try:
        reads = {email: cache.get(email, NOW) for email in emails}

        def fill_some(part: list[str]) -> None:
            for email in part:
                cache.fill(email, reads[email].generation, code(f"C{emails.index(email)}"), NOW)

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(fill_some, [emails[n::8] for n in range(8)]))
        assert cache.settle()
        script_calls = _script_calls(redis_client) - calls_before
        values = {email: cache.get(email, NOW).value for email in emails}
    finally:
        cache.close()

    assert values == {email: code(f"C{n}") for n, email in enumerate(emails)}
    assert 1 <= script_calls < len(emails) // 4  # batched: far fewer calls than fills
    assert cache.stats()["fills_dropped"] == 0
    assert redis_client.pttl(f"{key_prefix}code:{emails[0]}") > 0


def _script_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval"))


def test_a_background_fill_overtaken_by_an_invalidation_is_refused(
    redis_settings: Settings, clock: FakeClock
) -> None:
    cache = redis_cache(redis_settings, clock, background=True)
    try:
        read = cache.get(EMAIL, NOW)
        cache.invalidate(EMAIL)  # before the queued fill runs: the generation it carries is old
        cache.fill(EMAIL, read.generation, code("OLD22222"), NOW)
        assert cache.settle()
        stale = cache.get(EMAIL, NOW)
        cache.fill(EMAIL, stale.generation, code("NEW33333"), NOW)
        assert cache.settle()
        fresh = cache.get(EMAIL, NOW).value
    finally:
        cache.close()

    assert stale.value is None
    assert fresh == code("NEW33333")


def test_a_delayed_drain_refuses_items_past_its_limit_and_loses_none_it_took() -> None:
    """The queue behind background fills (and access lines): bounded, drained by its own thread."""
    drained: list[list[int]] = []
    release = threading.Event()

    def slow_drain() -> None:
        release.wait(5)
        while batch := queue.take(4):
            drained.append(batch)

    queue: DelayedDrain[int] = DelayedDrain(slow_drain, delay=0.01, name="test-drain", limit=10)
    try:
        accepted = [queue.put(n) for n in range(30)]
        settled_while_stuck = queue.settle(0.05)
        release.set()
        settled = queue.settle()
        late = queue.put(99)
        settled_again = queue.settle()
    finally:
        release.set()

    assert accepted == [True] * 10 + [False] * 20  # the drain only takes once it is released
    assert not settled_while_stuck
    assert settled and late and settled_again
    assert [n for batch in drained for n in batch] == [*range(10), 99]
    assert max(len(batch) for batch in drained) <= 4


def test_background_fills_while_redis_is_down_fail_quietly_and_open_the_breaker(
    key_prefix: str, clock: FakeClock
) -> None:
    settings = make_settings(redis_url=f"redis://127.0.0.1:{closed_port()}/0", redis_key_prefix=key_prefix)
    cache = redis_cache(settings, clock, background=True)
    try:
        for n in range(5):
            cache.fill(f"user{n}@example.com", "0", code(), NOW)
            assert cache.settle()
        read = cache.get(EMAIL, NOW)
    finally:
        cache.close()

    assert read == CacheRead(value=None, generation=None)
    assert cache.stats()["errors"] >= 1
    assert cache.stats()["bypassed"] >= 1  # the breaker opened: later fills and the read skipped Redis


def test_in_process_entry_expires_on_the_monotonic_clock(clock: FakeClock) -> None:
    cache = InProcessCodeCache(CACHE_TTL, monotonic=clock.monotonic)
    cache.fill("soon@example.com", "0", code(valid_for=timedelta(seconds=10)), NOW)
    cache.fill("later@example.com", "0", code(valid_for=timedelta(days=30)), NOW)

    clock.advance(seconds=9.9)
    assert cache.get("soon@example.com", NOW).value is not None
    clock.advance(seconds=0.2)
    assert cache.get("soon@example.com", NOW).value is None
    clock.advance(seconds=CACHE_TTL - 10.1 - 0.1)
    assert cache.get("later@example.com", NOW).value is not None
    clock.advance(seconds=0.2)
    assert cache.get("later@example.com", NOW).value is None


def test_in_process_cache_evicts_least_recently_used_entries(clock: FakeClock) -> None:
    cache = InProcessCodeCache(CACHE_TTL, max_entries=2, monotonic=clock.monotonic)
    for name in ("a", "b"):
        cache.fill(f"{name}@example.com", "0", code(), NOW)
    cache.get("a@example.com", NOW)

    cache.fill("c@example.com", "0", code(), NOW)

    assert [cache.get(f"{name}@example.com", NOW).value is not None for name in "abc"] == [True, False, True]


def test_in_process_evicted_generation_still_refuses_a_stale_fill(clock: FakeClock) -> None:
    cache = InProcessCodeCache(CACHE_TTL, max_entries=2, monotonic=clock.monotonic)
    slow_reader = cache.get(EMAIL, NOW)
    cache.invalidate(EMAIL)
    cache.invalidate("b@example.com")
    cache.invalidate("c@example.com")  # pushes EMAIL's generation out of the bounded map

    cache.fill(EMAIL, slow_reader.generation, code("OLD22222"), NOW)

    assert cache.get(EMAIL, NOW).value is None


def test_factory_picks_redis_when_configured(redis_settings: Settings) -> None:
    cache = make_code_cache(redis_settings)
    try:
        assert isinstance(cache, RedisCodeCache)
    finally:
        cache.close()


def test_factory_uses_the_in_process_cache_when_embedded() -> None:
    cache = make_code_cache(make_settings())
    cache.fill(EMAIL, cache.get(EMAIL, NOW).generation, code(), NOW)

    assert isinstance(cache, InProcessCodeCache)
    assert cache.get(EMAIL, NOW).value == code()


def test_factory_does_not_cache_in_process_when_several_processes_serve() -> None:
    cache = make_code_cache(make_settings(server_processes=2))
    cache.fill(EMAIL, cache.get(EMAIL, NOW).generation, code(), NOW)

    assert cache.get(EMAIL, NOW).value is None
