"""Cache of active codes by email: Redis with generation-guarded fills, or a bounded in-process map."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Protocol

import redis

from referral_grpc.domain.ports import CachedCode, CacheRead, CodeCache
from referral_grpc.infra.batches import DelayedDrain
from referral_grpc.infra.breaker import CircuitBreaker
from referral_grpc.infra.near_cache import NearCache
from referral_grpc.infra.redis_client import fail_fast_redis, run_command
from referral_grpc.settings import Settings

log = logging.getLogger(__name__)

# Redis key layout (every key has a TTL; `{prefix}` is REDIS_KEY_PREFIX, default "referral:"):
#
#   {prefix}code:{email_key}     "CODE|2026-05-01T12:00:00+00:00|verified": the public code, its expiry and
#                                whether its owner's email is verified ("unverified" if not), nothing else.
#                                TTL = min(CACHE_TTL_SECONDS, time left until the code expires).
#   {prefix}codegen:{email_key}  integer generation, INCRed by every invalidation (a missing key reads as
#                                "0"). TTL = GENERATION_TTL_SECONDS, refreshed by every invalidation.
#
# `email_key` is the canonical (lower-cased) email. A fill is a compare-and-set: it writes the code key
# only if the generation key still holds the value read before the database lookup, so a slow reader
# cannot put back a code that an invalidation has already replaced.
CODE_KEY = "{prefix}code:{email_key}"
GENERATION_KEY = "{prefix}codegen:{email_key}"
# Must outlast the slowest read-then-fill (a lookup's deadline, seconds): if a generation key expired in
# between, the reader's token could match again ("0") and a stale fill would be accepted.
GENERATION_TTL_SECONDS = 24 * 3600
DEFAULT_MAX_ENTRIES = 10_000
# Invalidations that could not reach Redis, replayed (per process) before the next operation that can.
MAX_PENDING_INVALIDATIONS = 10_000

# Fills, any number per call: for each (generation, entry) key pair and (generation read, entry, TTL ms)
# argument triple, the entry is written only if the generation key still holds the value read.
_FILL_SCRIPT = """
for i = 1, #KEYS, 2 do
  local j = (i - 1) / 2 * 3
  local current = redis.call('GET', KEYS[i]) or '0'
  if current == ARGV[j + 1] then
    redis.call('SET', KEYS[i + 1], ARGV[j + 2], 'PX', ARGV[j + 3])
  end
end
return 1
"""

# Invalidation: for each (generation, entry) key pair, the generation moves on and the entry goes,
# all in one step (a script runs atomically), so a reader sees either the old entry with the old
# generation or neither. One command, where MULTI/INCR/EXPIRE/DEL/EXEC cost the client five.
_INVALIDATE_SCRIPT = """
for i = 1, #KEYS, 2 do
  redis.call('INCR', KEYS[i])
  redis.call('EXPIRE', KEYS[i], ARGV[1])
  redis.call('DEL', KEYS[i + 1])
end
return 1
"""

_UNAVAILABLE = CacheRead(value=None, generation=None)


class InstrumentedCodeCache(CodeCache, Protocol):
    """A CodeCache that also reports counters for metrics and can release its connections."""

    def stats(self) -> dict[str, int]:
        """Counters since start: hits, misses (incl. skipped reads), errors, bypassed (breaker open)."""
        ...

    def close(self) -> None: ...


def entry_ttl_ms(value: CachedCode, now: datetime, ttl_seconds: int) -> int:
    """Milliseconds an entry may live: the configured TTL cut to the code's remaining life (<= 0: skip)."""
    left_ms = (value.expires_at - now) // timedelta(milliseconds=1)
    return min(ttl_seconds * 1000, left_ms)


_OWNER_STATES = {"verified": True, "unverified": False}


def encode_entry(value: CachedCode) -> str:
    owner = "verified" if value.owner_verified else "unverified"
    return f"{value.code}|{value.expires_at.astimezone(UTC).isoformat()}|{owner}"


def decode_entry(raw: str) -> CachedCode | None:
    """The cached code, or None for a value this version cannot read (then it is a miss and gets refilled).

    An entry without the owner's state (written before email verification existed) is such a value:
    it must not pass for a verified owner's code.
    """
    code, _, rest = raw.partition("|")
    expires, _, owner = rest.partition("|")
    try:
        expires_at = datetime.fromisoformat(expires)
    except ValueError:
        return None
    if not code or expires_at.tzinfo is None or owner not in _OWNER_STATES:
        return None
    return CachedCode(code=code, expires_at=expires_at, owner_verified=_OWNER_STATES[owner])


class _Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = {
            "hits": 0,
            "misses": 0,
            "errors": 0,
            "bypassed": 0,
            "near_hits": 0,
            "fills_dropped": 0,
        }

    def bump(self, *names: str) -> None:
        with self._lock:
            for name in names:
                self._values[name] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


# A fill as the script takes it: email key, generation read, encoded entry, TTL in ms.
_Fill = tuple[str, str, str, int]


class RedisCodeCache:
    """The shared cache for every server process, built with `from_settings`.

    No method raises because of Redis: a failed or slow call (socket timeouts of
    REDIS_SOCKET_TIMEOUT, no retries) counts as a miss or a skipped write, and after a few
    failures the circuit breaker skips Redis entirely until a probe succeeds.

    Freshness while Redis is unreachable: an invalidation that fails is remembered and replayed
    before this process uses Redis again, so this process never reads an entry it failed to
    invalidate. Other processes may still read such an entry until the replay or until its TTL
    ends, whichever comes first: CACHE_TTL_SECONDS bounds how stale a code can be served after an
    outage (and never past the code's own expiry). The same bound applies if the pending list
    overflows (MAX_PENDING_INVALIDATIONS) or the process exits before Redis comes back.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        key_prefix: str,
        ttl_seconds: int,
        breaker: CircuitBreaker | None = None,
        near_entries: int = 0,
        fill_in_background: bool = False,
    ) -> None:
        self._client = client
        self._prefix = key_prefix
        self._ttl_seconds = ttl_seconds
        self._breaker = breaker or CircuitBreaker()
        self._fill_script = client.register_script(_FILL_SCRIPT)
        self._invalidate_script = client.register_script(_INVALIDATE_SCRIPT)
        self._counters = _Counters()
        self._lock = threading.Lock()
        # email_key -> sequence number of the failed invalidation; the number lets a replay
        # forget only the failures it has covered, not one that happened while it ran.
        self._pending: dict[str, int] = {}
        self._sequence = itertools.count()
        # A lookup's fill need not delay its answer: one thread applies the fills of the last 20 ms
        # in one script call. On the RPC's own thread a fill cost ~20% of a cold lookup's throughput
        # (A/B, one server behind Envoy, 950 vs 1,180 req/s with no fill at all); applied at once
        # by that thread one at a time it saved nothing; gathered for 20 ms, 930-970 became
        # 1,070-1,200 req/s. Until its fill lands, a lookup of that email reads the database again,
        # as any miss does. The script still compares the generation read before the database read,
        # so a fill an invalidation overtook is refused. Beyond 10,000 queued, fills are dropped.
        self._fills: DelayedDrain[_Fill] | None = None
        if fill_in_background:
            self._fills = DelayedDrain(self._apply_queued_fills, delay=0.02, name="cache-fills", limit=10_000)
        self._near: NearCache | None = None
        if near_entries > 0:
            pool = client.connection_pool
            self._near = NearCache(
                # Its own connection, outside the pool: it stays subscribed. RESP2, where invalidations
                # arrive as ordinary messages on a channel.
                lambda: pool.connection_class(**{**pool.connection_kwargs, "protocol": 2}),
                CODE_KEY.format(prefix=key_prefix, email_key=""),
                max_entries=near_entries,
                ttl_seconds=ttl_seconds,
                may_connect=lambda: not self._breaker.is_open,
            )

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        breaker: CircuitBreaker | None = None,
        fill_in_background: bool = True,
    ) -> RedisCodeCache:
        """The service's cache; `fill_in_background=False` applies each fill before `fill` returns."""
        return cls(
            fail_fast_redis(settings),
            key_prefix=settings.redis_key_prefix,
            ttl_seconds=settings.cache_ttl_seconds,
            breaker=breaker,
            near_entries=settings.near_cache_entries,
            fill_in_background=fill_in_background,
        )

    def code_key(self, email_key: str) -> str:
        return CODE_KEY.format(prefix=self._prefix, email_key=email_key)

    def generation_key(self, email_key: str) -> str:
        return GENERATION_KEY.format(prefix=self._prefix, email_key=email_key)

    def get(self, email_key: str, now: datetime) -> CacheRead:
        token = None
        if self._near is not None:
            held, token = self._near.get(email_key, now)
            if held is not None:
                self._counters.bump("hits", "near_hits")
                return held
        if not self._admit(email_key):
            self._counters.bump("misses")
            return _UNAVAILABLE
        try:
            # One MGET reads the entry and the generation atomically.
            raw, generation = run_command(
                self._client, "MGET", self.code_key(email_key), self.generation_key(email_key)
            )
        except Exception as exc:
            self._failed("get", exc)
            self._counters.bump("misses")
            return _UNAVAILABLE
        self._breaker.record_success()
        value = decode_entry(str(raw)) if raw is not None else None
        if value is None or value.expires_at <= now:
            self._counters.bump("misses")
            return CacheRead(value=None, generation=str(generation or "0"))
        self._counters.bump("hits")
        read = CacheRead(value=value, generation=str(generation or "0"))
        if self._near is not None:
            self._near.put(email_key, read, token)
        return read

    def fill(self, email_key: str, generation: str | None, value: CachedCode, now: datetime) -> None:
        ttl_ms = entry_ttl_ms(value, now, self._ttl_seconds)
        if generation is None or ttl_ms <= 0:
            return
        fill = (email_key, generation, encode_entry(value), ttl_ms)
        if self._fills is None:
            self._apply_fills([fill])
        elif not self._fills.put(fill):
            self._counters.bump("fills_dropped")

    def settle(self, timeout: float = 5.0) -> bool:
        """Wait for fills queued in the background to be applied; whether they were in time."""
        return self._fills is None or self._fills.settle(timeout)

    def _apply_queued_fills(self) -> None:
        assert self._fills is not None
        while batch := self._fills.take(500):
            self._apply_fills(batch)

    def _apply_fills(self, fills: list[_Fill]) -> None:
        """One script call for all of them; none while Redis is unusable or its invalidations are owed."""
        owed = self._admit_keys(fill[0] for fill in fills)
        if owed is None:
            return
        if owed:
            fills = [fill for fill in fills if fill[0] not in owed]
            if not fills:
                return
        keys: list[str] = []
        args: list[str | int] = []
        for email_key, generation, entry, ttl_ms in fills:
            keys += (self.generation_key(email_key), self.code_key(email_key))
            args += (generation, entry, ttl_ms)
        try:
            self._fill_script(keys=keys, args=args)
        except Exception as exc:
            self._failed("fill", exc)
            return
        self._breaker.record_success()

    def invalidate(self, email_key: str) -> None:
        sequence = next(self._sequence)
        if self._near is not None:
            self._near.evict(email_key)
        if not self._admit(None):
            self._remember(email_key, sequence)
            return
        try:
            self._invalidate_keys([email_key])
        except Exception as exc:
            self._failed("invalidate", exc)
            self._remember(email_key, sequence)
            return
        finally:
            # Again after Redis changed: a read of this process that raced the change and kept the
            # old value is dropped now, not when Redis's message arrives.
            if self._near is not None:
                self._near.evict(email_key)
        self._breaker.record_success()
        with self._lock:
            if self._pending.get(email_key, sequence) < sequence:
                del self._pending[email_key]

    def stats(self) -> dict[str, int]:
        return self._counters.snapshot()

    def pending_invalidations(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def near(self) -> NearCache | None:
        """The per-process near cache (NEAR_CACHE_ENTRIES > 0), or None."""
        return self._near

    def close(self) -> None:
        # Fills still queued are applied if Redis answers soon; they are only cache entries.
        self.settle(1.0)
        if self._near is not None:
            self._near.close()
        self._client.close()

    def _invalidate_keys(self, email_keys: list[str]) -> None:
        keys = [
            key
            for email_key in email_keys
            for key in (self.generation_key(email_key), self.code_key(email_key))
        ]
        self._invalidate_script(keys=keys, args=[GENERATION_TTL_SECONDS])

    def _admit(self, email_key: str | None) -> bool:
        """Whether to use Redis now (for `email_key`, if given): not while the breaker is open, failed
        invalidations cannot be replayed, or that key's invalidation is owed again.

        True means the caller must report the outcome to the breaker (it may be the half-open probe).
        """
        owed = self._admit_keys(() if email_key is None else (email_key,))
        return owed is not None and not owed

    def _admit_keys(self, email_keys: Iterable[str]) -> set[str] | None:
        """As `_admit`, for many keys: None if Redis is not to be used at all, else the keys it must not
        be used for (their invalidation failed after the replay started)."""
        if not self._breaker.allow():
            self._counters.bump("bypassed")
            return None
        with self._lock:
            pending = dict(self._pending)
        if pending:
            try:
                self._invalidate_keys(list(pending))
            except Exception as exc:
                self._failed("replay of invalidations", exc)
                return None
            with self._lock:
                for pending_key, sequence in pending.items():
                    if self._pending.get(pending_key) == sequence:
                        del self._pending[pending_key]
            log.info("cache: replayed %d invalidations that failed while Redis was unavailable", len(pending))
        with self._lock:
            owed = {email_key for email_key in email_keys if email_key in self._pending}
        if owed:
            # An invalidation of such a key failed after our replay started: Redis is failing again,
            # and its entry must not be read or refilled until a replay succeeds.
            self._breaker.record_failure()
        return owed

    def _remember(self, email_key: str, sequence: int) -> None:
        with self._lock:
            self._pending.pop(email_key, None)
            if len(self._pending) >= MAX_PENDING_INVALIDATIONS:
                dropped = next(iter(self._pending))
                del self._pending[dropped]
                log.warning("cache: too many failed invalidations; one entry may stay stale until its TTL")
            self._pending[email_key] = sequence

    def _failed(self, operation: str, exc: Exception) -> None:
        self._breaker.record_failure()
        self._counters.bump("errors")
        log.warning(
            "cache: Redis %s failed, serving from the database: %s: %s", operation, type(exc).__name__, exc
        )


class InProcessCodeCache:
    """The embedded-mode cache (no REDIS_URL): the same semantics as Redis, in one process's memory.

    Only correct when a single process serves requests: another process would not see this one's
    invalidations. Entries expire on the injected monotonic clock; both maps are bounded by
    `max_entries` (least recently used entries go first; 0 disables caching).
    """

    def __init__(
        self,
        ttl_seconds: int,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_seconds = ttl_seconds
        self._max_entries = max_entries
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[CachedCode, float]] = OrderedDict()
        self._generations: OrderedDict[str, int] = OrderedDict()
        # Generations come from one counter; a key whose generation was evicted reads as the highest
        # evicted generation, so a reader that saw an older value can never match it again.
        self._last_generation = 0
        self._forgotten_generation = 0
        self._counters = _Counters()

    def get(self, email_key: str, now: datetime) -> CacheRead:
        with self._lock:
            generation = str(self._generations.get(email_key, self._forgotten_generation))
            entry = self._entries.get(email_key)
            if entry is not None and (entry[1] <= self._monotonic() or entry[0].expires_at <= now):
                del self._entries[email_key]
                entry = None
            if entry is not None:
                self._entries.move_to_end(email_key)
        self._counters.bump("misses" if entry is None else "hits")
        return CacheRead(value=None if entry is None else entry[0], generation=generation)

    def fill(self, email_key: str, generation: str | None, value: CachedCode, now: datetime) -> None:
        ttl_ms = entry_ttl_ms(value, now, self._ttl_seconds)
        if generation is None or ttl_ms <= 0 or self._max_entries <= 0:
            return
        with self._lock:
            if str(self._generations.get(email_key, self._forgotten_generation)) != generation:
                return
            self._entries[email_key] = (value, self._monotonic() + ttl_ms / 1000)
            self._entries.move_to_end(email_key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)

    def invalidate(self, email_key: str) -> None:
        with self._lock:
            self._last_generation += 1
            self._generations[email_key] = self._last_generation
            self._generations.move_to_end(email_key)
            self._entries.pop(email_key, None)
            while len(self._generations) > self._max_entries:
                _, evicted = self._generations.popitem(last=False)
                self._forgotten_generation = max(self._forgotten_generation, evicted)

    def stats(self) -> dict[str, int]:
        return self._counters.snapshot()

    def close(self) -> None:
        return None


def make_code_cache(settings: Settings, *, breaker: CircuitBreaker | None = None) -> InstrumentedCodeCache:
    """Redis when REDIS_URL is set, else the in-process cache (off when several processes serve)."""
    if settings.redis_url:
        return RedisCodeCache.from_settings(settings, breaker=breaker)
    if settings.server_processes > 1:
        # Each process would keep its own copy and miss the others' invalidations.
        log.warning("cache: SERVER_PROCESSES > 1 without REDIS_URL: code lookups are not cached")
        return InProcessCodeCache(settings.cache_ttl_seconds, max_entries=0)
    return InProcessCodeCache(settings.cache_ttl_seconds)
