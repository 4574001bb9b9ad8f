"""Per-account throttles (failed logins, reset requests), shared in Redis, never failing open.

The policy (OWASP ASVS 5.0 V6.3 and NIST SP 800-63B 5.2.2, which limit *consecutive* failed attempts):

* A counter belongs to a rule and an account key: the canonical (lower-cased) email, whether or not an
  account has it, so a throttled unknown email looks exactly like a throttled registered one.
* Fixed windows: a window opens at the first counted attempt and lasts the rule's `window` seconds. Its
  first `limit` attempts go through; every later one fails with ResourceExhausted("TOO_MANY_ATTEMPTS")
  whose retry_after is the time left in the window. Refused attempts do not extend the window, so a
  legitimate user is never locked out for longer than one window however hard the account is attacked.
* Logins count the attempt *before* the password is checked: parallel guesses cannot overrun the limit,
  and while throttled even the right password is refused (a correct guess is no oracle). A successful
  login clears the counter, so what is limited is consecutive failures: an attacker without the password
  gets at most `limit` guesses per window, plus `limit - 1` more after each successful login of the owner.
  Two exits the attacker cannot block (referral_grpc/domain/auth.py): a completed password reset clears the
  count, and a login that presents a live refresh token of the account is counted on a rule of its own,
  keyed by the token's family, which strangers cannot spend.
* Reset requests count every call.
* Time comes from the injected Clock (tests move a FakeClock instead of sleeping).

Storage. With REDIS_URL the counts live in Redis, shared by every server process. Each process also
remembers, per key, the last count Redis gave it and the attempts Redis could not count; an attempt's
count is Redis's answer plus those missed attempts. So when Redis is down or slow (socket timeouts of
REDIS_SOCKET_TIMEOUT, no retries, then a circuit breaker that skips it) a process goes on counting from
where Redis last was, and the attempts made during the outage still count once Redis is back: the
throttle never fails open. (During an outage N server processes count separately: at most N x limit.)
Without REDIS_URL every attempt is a "missed" one: the counts are the process's own. The in-memory map
keeps THROTTLE_MAX_LOCAL_KEYS accounts per rule; beyond that the windows that end soonest go first.

Redis key layout (`{prefix}` is REDIS_KEY_PREFIX; every key expires with its window):

  {prefix}throttle:{rule}:{sha256(account key)[:32]}   hash {s: window start (epoch ms), n: attempts}
                                                        PEXPIRE = the rule's window, set when it opens.

Emails are hashed in key names: the throttle needs no address in Redis.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

import redis

from ..domain.errors import ResourceExhausted
from ..domain.ports import Clock, Rule
from ..settings import Settings
from .breaker import CircuitBreaker
from .redis_client import fail_fast_redis

log = logging.getLogger(__name__)

THROTTLED_REASON = "TOO_MANY_ATTEMPTS"
THROTTLED_MESSAGE = "too many attempts for this account; retry later"
KEY = "{prefix}throttle:{rule}:{digest}"

# Atomic "count one attempt": opens a new window when there is none or the old one has ended by `now`
# (the caller's clock, not Redis's, so every process and test agrees on the time).
_HIT_SCRIPT = """
local start = redis.call('HGET', KEYS[1], 's')
if start and tonumber(start) + tonumber(ARGV[2]) > tonumber(ARGV[1]) then
  return {redis.call('HINCRBY', KEYS[1], 'n', 1), tonumber(start)}
end
redis.call('HSET', KEYS[1], 's', ARGV[1], 'n', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, tonumber(ARGV[1])}
"""


@dataclass(frozen=True)
class _Window:
    attempts: int
    start_ms: int


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _epoch_ms(now: datetime) -> int:
    return int(now.timestamp() * 1000)


class _LocalWindows:
    """One rule's windows in process memory, oldest window first (so also the first to end).

    An entry is [window start, attempts Redis did not count, last count Redis gave].
    """

    def __init__(self, window_ms: int, max_keys: int) -> None:
        self._window_ms = window_ms
        self._max_keys = max_keys
        self._lock = threading.Lock()
        self._windows: OrderedDict[str, list[int]] = OrderedDict()

    def record(self, digest: str, now_ms: int, shared: _Window | None) -> _Window:
        """Record one attempt that Redis counted as `shared`, or could not count (None)."""
        with self._lock:
            self._forget_ended(now_ms)
            entry = self._windows.get(digest)
            if entry is None:
                entry = self._windows[digest] = [now_ms, 0, 0]
                if len(self._windows) > self._max_keys:
                    self._windows.popitem(last=False)
            if shared is None:
                entry[1] += 1
                return _Window(attempts=entry[2] + entry[1], start_ms=entry[0])
            entry[2] = shared.attempts
            return _Window(attempts=shared.attempts + entry[1], start_ms=shared.start_ms)

    def clear(self, digest: str) -> None:
        with self._lock:
            self._windows.pop(digest, None)

    def _forget_ended(self, now_ms: int) -> None:
        while self._windows:
            start_ms = next(iter(self._windows.values()))[0]
            if start_ms + self._window_ms > now_ms:
                return
            self._windows.popitem(last=False)


class Throttle:
    """Counts attempts per rule and account key; `hit` raises ResourceExhausted past the rule's limit.

    `client` is optional: without it the counts are this process's alone (one server process, or
    tests). With it, no method raises because of Redis.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        client: redis.Redis | None = None,
        key_prefix: str = "referral:",
        breaker: CircuitBreaker | None = None,
        max_local_keys: int = 100_000,
    ) -> None:
        self._clock = clock
        self._client = client
        self._prefix = key_prefix
        self._breaker = breaker or CircuitBreaker()
        self._max_local_keys = max_local_keys
        self._hit_script = client.register_script(_HIT_SCRIPT) if client is not None else None
        self._local: dict[Rule, _LocalWindows] = {}
        self._local_lock = threading.Lock()

    @classmethod
    def from_settings(
        cls, settings: Settings, clock: Clock, *, breaker: CircuitBreaker | None = None
    ) -> Throttle:
        client = fail_fast_redis(settings) if settings.redis_url else None
        return cls(
            clock,
            client=client,
            key_prefix=settings.redis_key_prefix,
            breaker=breaker,
            max_local_keys=settings.throttle_max_local_keys,
        )

    def hit(self, rule: Rule, key: str) -> None:
        """Count one attempt for `key`; raise ResourceExhausted when it is over the rule's limit."""
        now_ms = _epoch_ms(self._clock.now())
        digest = _digest(key)
        window_ms = rule.window * 1000
        shared = self._shared_hit(rule, digest, now_ms, window_ms)
        window = self._local_windows(rule).record(digest, now_ms, shared)
        if window.attempts <= rule.limit:
            return
        # Whole seconds, at least one: clients (and HTTP Retry-After through Envoy) expect them.
        retry_after = max(1, math.ceil((window.start_ms + window_ms - now_ms) / 1000))
        log.info("throttled: %s limit reached", rule.name, extra={"throttle_key": digest[:12]})
        raise ResourceExhausted(THROTTLED_REASON, THROTTLED_MESSAGE, retry_after=retry_after)

    def clear(self, rule: Rule, key: str) -> None:
        """Forget `key`'s attempts (a successful login); if Redis cannot be reached its count stays."""
        digest = _digest(key)
        self._local_windows(rule).clear(digest)
        if self._client is None or not self._breaker.allow():
            return
        try:
            self._client.delete(self._key(rule, digest))
        except (redis.RedisError, OSError):
            self._breaker.record_failure()
            return
        self._breaker.record_success()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def _key(self, rule: Rule, digest: str) -> str:
        return KEY.format(prefix=self._prefix, rule=rule.name, digest=digest)

    def _local_windows(self, rule: Rule) -> _LocalWindows:
        with self._local_lock:
            windows = self._local.get(rule)
            if windows is None:
                windows = self._local[rule] = _LocalWindows(rule.window * 1000, self._max_local_keys)
            return windows

    def _shared_hit(self, rule: Rule, digest: str, now_ms: int, window_ms: int) -> _Window | None:
        if self._hit_script is None or not self._breaker.allow():
            return None
        try:
            attempts, start_ms = self._hit_script(keys=[self._key(rule, digest)], args=[now_ms, window_ms])
        except (redis.RedisError, OSError):
            self._breaker.record_failure()
            log.warning("throttle: Redis unavailable, counting %s attempts in this process only", rule.name)
            return None
        self._breaker.record_success()
        return _Window(attempts=int(attempts), start_ms=int(start_ms))
