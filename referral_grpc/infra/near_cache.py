"""A per-process copy of recent Redis cache hits, kept coherent by Redis's own invalidation messages.

Redis client-side caching (CLIENT TRACKING, broadcasting mode, RESP2 redirection to the same
connection): Redis sends this process the name of every key under `{prefix}code:` that changes
(written, deleted, expired, evicted or flushed, by any client, an operator's redis-cli included) on
one subscribed connection. Every read of the near cache first applies what has already arrived on
that connection (a non-blocking poll of its socket), so a change another process made before this
lookup began is seen: Redis queues the message to every subscriber before it answers the writer,
and the writer answers its own caller only after that.

While the connection is down (not yet made, Redis unreachable, a missed heartbeat) the near cache
holds nothing and serves nothing: a change it could have missed is never served. A background
thread sends a heartbeat every `heartbeat` seconds and reconnects; a connection that does not answer
within two heartbeats counts as lost.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from typing import Any

import redis

from referral_grpc.domain.ports import CachedCode, CacheRead

log = logging.getLogger(__name__)

INVALIDATION_CHANNEL = "__redis__:invalidate"
HEARTBEAT_SECONDS = 0.5

# A fill racing an invalidation: the reader's token, taken before its Redis read, is refused once any
# invalidation arrived after it (see `token` and `put`).
Token = int


class NearCache:
    """Recent hits of the shared cache, bounded (least recently used go first) and at most `ttl_seconds` old.

    `connect` returns a new, unconnected redis-py connection speaking RESP2; `tracked_prefix` is the
    Redis key prefix of the entries (the part before the email key). No connection is attempted while
    `may_connect()` is false (the shared cache's circuit breaker is open).
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        tracked_prefix: str,
        *,
        max_entries: int,
        ttl_seconds: float,
        heartbeat: float = HEARTBEAT_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
        may_connect: Callable[[], bool] = lambda: True,
    ) -> None:
        self._connect = connect
        self._may_connect = may_connect
        self._prefix = tracked_prefix
        self._max_entries = max_entries
        self._ttl_seconds = ttl_seconds
        self._heartbeat = heartbeat
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[CachedCode, str, float]] = OrderedDict()
        self._connection: Any = None
        # Moves on with every invalidation applied and every connection made or lost.
        self._epoch = 0
        self._ping_sent_at: float | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self._was_connected = False
        # Redis's id of the subscribed connection (what CLIENT LIST shows), None while there is none.
        self.client_id: int | None = None

    @property
    def connected(self) -> bool:
        return self._connection is not None

    def get(self, email_key: str, now: datetime) -> tuple[CacheRead | None, Token | None]:
        """The held entry (None if not held) and a token for a later `put` (None: do not put)."""
        if not self._started:
            self._start()
        with self._lock:
            if self._connection is None:
                return None, None
            self._drain()
            if self._connection is None:
                return None, None
            entry = self._entries.get(email_key)
            if entry is not None:
                value, generation, deadline = entry
                if deadline > self._monotonic() and value.expires_at > now:
                    self._entries.move_to_end(email_key)
                    return CacheRead(value=value, generation=generation), None
                del self._entries[email_key]
            return None, self._epoch

    def put(self, email_key: str, read: CacheRead, token: Token | None) -> None:
        """Keep a value just read from Redis, unless an invalidation arrived since `token` was taken."""
        if token is None or read.value is None or read.generation is None:
            return
        with self._lock:
            if self._connection is None or token != self._epoch:
                return
            self._entries[email_key] = (read.value, read.generation, self._monotonic() + self._ttl_seconds)
            self._entries.move_to_end(email_key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)

    def evict(self, email_key: str) -> None:
        """Forget one entry now (this process's own invalidation; Redis's message follows)."""
        with self._lock:
            self._entries.pop(email_key, None)
            self._epoch += 1

    def size(self) -> int:
        with self._lock:
            return len(self._entries)

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join()
        with self._lock:
            self._lose("closed")

    # Under self._lock from here on, except _start, _run and _open.

    def _drain(self) -> None:
        """Apply every message already received, without waiting; a failure drops the connection."""
        connection = self._connection
        try:
            while connection.can_read(timeout=0):
                self._apply(connection.read_response())
        except Exception as exc:
            self._lose(f"{type(exc).__name__}: {exc}")

    def _apply(self, message: Any) -> None:
        if not isinstance(message, list) or not message:
            return
        kind = message[0]
        if kind == "pong":
            self._ping_sent_at = None
        elif kind == "message" and len(message) == 3 and message[1] == INVALIDATION_CHANNEL:
            self._epoch += 1
            keys = message[2]
            if keys is None:  # FLUSHDB / FLUSHALL
                self._entries.clear()
                return
            for key in keys:
                if isinstance(key, str) and key.startswith(self._prefix):
                    self._entries.pop(key[len(self._prefix) :], None)

    def _lose(self, reason: str) -> None:
        connection, self._connection = self._connection, None
        self.client_id = None
        self._entries.clear()
        self._epoch += 1
        self._ping_sent_at = None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.disconnect()
            if not self._stopping.is_set():
                log.warning("near cache: invalidation connection lost (%s); serving from Redis", reason)

    def _start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        self._reconnect()
        self._thread = threading.Thread(target=self._run, name="near-cache", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(self._heartbeat):
            if self._connection is None:
                self._reconnect()
                continue
            with self._lock:
                if self._connection is None:
                    continue
                self._drain()
                if self._connection is None:
                    continue
                now = self._monotonic()
                if self._ping_sent_at is not None:
                    if now - self._ping_sent_at > 2 * self._heartbeat:
                        self._lose("no answer to the heartbeat")
                    continue
                try:
                    self._connection.send_command("PING")
                except Exception as exc:
                    self._lose(f"{type(exc).__name__}: {exc}")
                    continue
                self._ping_sent_at = now

    def _reconnect(self) -> None:
        if not self._may_connect():
            return
        try:
            connection, client_id = self._open()
        except redis.ResponseError as exc:
            # A Redis that refuses CLIENT TRACKING (an old version, an ACL): it will not change its mind.
            log.warning("near cache: off, Redis refused client tracking: %s", exc)
            self._stopping.set()
            return
        except Exception as exc:
            log.debug("near cache: cannot subscribe yet: %s: %s", type(exc).__name__, exc)
            return
        with self._lock:
            if self._stopping.is_set():
                connection.disconnect()
                return
            # Whatever was held before could have missed a change while nothing was listening.
            self._entries.clear()
            self._epoch += 1
            self._connection = connection
            self.client_id = client_id
            if self._was_connected:
                log.info("near cache: invalidation connection restored")
            self._was_connected = True

    def _open(self) -> tuple[Any, int]:
        """A connection that receives an invalidation for every change of a tracked key, and its id."""
        connection = self._connect()
        try:
            connection.connect()
            connection.send_command("CLIENT", "ID")
            client_id = int(connection.read_response())
            connection.send_command(
                "CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST", "PREFIX", self._prefix
            )
            connection.read_response()  # OK, or a ResponseError raised here
            connection.send_command("SUBSCRIBE", INVALIDATION_CHANNEL)
            connection.read_response()
        except BaseException:
            connection.disconnect()
            raise
        return connection, client_id
