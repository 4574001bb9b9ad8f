"""Webhook delivery: the relay claims due deliveries, the worker POSTs them signed (Standard Webhooks).

At least once, by the same lease pattern as the email outbox: a claimed delivery is due again after
OUTBOX_LEASE, so a worker killed mid-delivery leaves it to the next one; the event id is the
`webhook-id` of every attempt, so receivers drop duplicates. Redirects are never followed, and the
address a URL resolves to is checked when the connection is made, not only when the URL was given.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import SplitResult, urlsplit

import peewee as pw
from google.protobuf import json_format

from ..gen import event_service_pb2
from ..settings import Settings
from ..store.database import is_postgres, joined_instances, row_reader, run_sql, whole_row
from ..store.models import Event, WebhookAttempt, WebhookDelivery, WebhookEndpoint, database

log = logging.getLogger(__name__)

RESPONSE_BODY_LIMIT = 1024
USER_AGENT = "referral-grpc-webhooks/1"
# Cloud metadata services outside the link-local and private ranges already refused.
_METADATA = frozenset({ipaddress.ip_address("fd00:ec2::254"), ipaddress.ip_address("100.100.100.200")})


class RefusedAddress(Exception):
    """The URL's host resolves to an address deliveries may not go to."""


def forbidden_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or ip in _METADATA
    )


def _addresses(host: str, port: int) -> list[str]:
    """The host's addresses, in the resolver's order; socket.gaierror or UnicodeError if it has none."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _first_forbidden(addresses: list[str]) -> str | None:
    return next((address for address in addresses if forbidden_address(address)), None)


def _resolve(host: str, port: int, allow_private: bool) -> list[str]:
    try:
        addresses = _addresses(host, port)
    except (socket.gaierror, UnicodeError) as exc:
        raise RefusedAddress(f"the host does not resolve ({exc})") from None
    if not allow_private and (refused := _first_forbidden(addresses)) is not None:
        raise RefusedAddress(f"the host resolves to {refused}, a loopback, private or link-local address")
    return addresses


def url_checker(settings: Settings) -> Callable[[str], str]:
    """The domain's check of a new endpoint URL: "" when deliveries may go there, else why not."""

    def check(url: str) -> str:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return "is not a valid URL"
        if parts.scheme not in ("https", "http") or not parts.hostname:
            return "must be an absolute http(s) URL"
        if parts.scheme != "https" and settings.production:
            return "must use https"
        if parts.username or parts.password:
            return "must not carry credentials"
        if settings.webhook_allow_private_networks:
            return ""
        try:
            refused = _first_forbidden(_addresses(parts.hostname, port or 443))
        except (socket.gaierror, UnicodeError):
            # DNS may be down for a moment or not yet set up: each delivery checks again anyway.
            return ""
        return "" if refused is None else f"resolves to {refused}, a loopback, private or link-local address"

    return check


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of id.timestamp.body>` with the secret's base64 key (after "whsec_")."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def event_body(event: Event) -> bytes:
    """{"type", "timestamp", "data"}: data is the payload message in Protobuf's JSON mapping."""
    field = event_service_pb2.Event.DESCRIPTOR.fields_by_name[event.type.replace(".", "_")]
    assert field.message_type is not None  # every payload field is a message
    message = getattr(event_service_pb2, field.message_type.name)()
    json_format.ParseDict(json.loads(event.payload), message)
    # As the REST gateway prints messages: proto field names, zeros included (the schema requires them).
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    document = {
        "type": event.type,
        "timestamp": event.occurred_at.isoformat().replace("+00:00", "Z"),
        "data": data,
    }
    return json.dumps(document, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Answer:
    http_status: int
    body: str
    error: str


def _connect(
    parts: SplitResult, timeout: float, allow_private: bool, tls: ssl.SSLContext | None
) -> http.client.HTTPConnection:
    """A connection to an address of the URL's host checked just now, never resolving again."""
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = _resolve(host, port, allow_private)
    sock = socket.create_connection((addresses[0], port), timeout=timeout)
    conn: http.client.HTTPConnection
    try:
        # As HTTPConnection.connect does: it sends the headers and the body apart, and on a kept
        # connection Nagle's algorithm would hold the body for the receiver's delayed ACK (40 ms).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if parts.scheme == "https":
            sock = (tls or ssl.create_default_context()).wrap_socket(sock, server_hostname=host)
            conn = http.client.HTTPSConnection(host, port, timeout=timeout)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
    except BaseException:
        sock.close()
        raise
    conn.sock = sock
    # Once its socket is closed the connection must not open another by itself: that would resolve
    # the host again, unchecked. A request on it then fails with NotConnected instead.
    conn.auto_open = 0
    return conn


def _exchange(
    conn: http.client.HTTPConnection, parts: SplitResult, headers: dict[str, str], body: bytes
) -> tuple[Answer, bool]:
    """Send the POST and read at most RESPONSE_BODY_LIMIT of the answer; whether the connection may
    carry another request (the whole answer was read and neither side asked to close)."""
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    conn.request("POST", path, body=body, headers=headers)
    response = conn.getresponse()
    data = response.read(RESPONSE_BODY_LIMIT)
    text = data.decode("utf-8", "replace")
    reusable = response.isclosed() and not response.will_close and conn.sock is not None
    return Answer(response.status, text, ""), reusable


def _failure(exc: Exception) -> Answer:
    if isinstance(exc, RefusedAddress):
        return Answer(0, "", f"refused: {exc}")
    return Answer(0, "", f"{type(exc).__name__}: {exc}"[:500])


# How a kept connection fails when the receiver has closed it while it was idle.
_STALE = (ConnectionError, http.client.ImproperConnectionState, http.client.NotConnected)


@dataclass
class _Kept:
    conn: http.client.HTTPConnection
    opened_at: float
    used_at: float


class Sender:
    """POSTs over keep-alive connections: per thread, one per endpoint URL, each made to an address
    checked when it was made (as `post` does), so a delivery costs no new TCP (and TLS) handshake.

    An idle connection is dropped after `idle` seconds and any after `lifetime`, so a host that now
    resolves elsewhere is resolved and checked again. A request that fails on a kept connection
    (the receiver closed it meanwhile) is sent once more on a new one: the same webhook-id, so at
    worst a duplicate the receiver drops.
    """

    def __init__(
        self, timeout: float, allow_private: bool, *, idle: float = 30.0, lifetime: float = 300.0
    ) -> None:
        self.timeout = timeout
        self.allow_private = allow_private
        self.idle = idle
        self.lifetime = lifetime
        self._tls = ssl.create_default_context()
        self._local = threading.local()
        # Every thread's connections, for close().
        self._all: list[dict[str, _Kept]] = []
        self._lock = threading.Lock()

    def _kept(self) -> dict[str, _Kept]:
        kept: dict[str, _Kept] | None = getattr(self._local, "kept", None)
        if kept is None:
            kept = self._local.kept = {}
            with self._lock:
                self._all.append(kept)
        return kept

    def close(self) -> None:
        """Close every kept connection; call when no thread sends any more."""
        with self._lock:
            for kept in self._all:
                while kept:
                    kept.popitem()[1].conn.close()

    def _sweep(self, kept: dict[str, _Kept], at: float) -> None:
        for url, entry in list(kept.items()):
            if at - entry.used_at > self.idle or at - entry.opened_at > self.lifetime:
                del kept[url]
                entry.conn.close()

    def post(self, url: str, headers: dict[str, str], body: bytes) -> Answer:
        parts = urlsplit(url)
        kept = self._kept()
        self._sweep(kept, time.monotonic())
        entry = kept.pop(url, None)
        if entry is not None:
            try:
                answer, reusable = _exchange(entry.conn, parts, headers, body)
            except _STALE:
                entry.conn.close()  # closed by the receiver while idle: try a new connection
            except (OSError, http.client.HTTPException) as exc:
                # A timeout or a broken answer: that receiver's failure, not the connection's.
                entry.conn.close()
                return _failure(exc)
            else:
                self._keep_or_close(kept, url, entry, reusable)
                return answer
        try:
            conn = _connect(parts, self.timeout, self.allow_private, self._tls)
        except (RefusedAddress, OSError, http.client.HTTPException) as exc:
            return _failure(exc)
        now = time.monotonic()
        entry = _Kept(conn, now, now)
        try:
            answer, reusable = _exchange(conn, parts, headers, body)
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            return _failure(exc)
        self._keep_or_close(kept, url, entry, reusable)
        return answer

    @staticmethod
    def _keep_or_close(kept: dict[str, _Kept], url: str, entry: _Kept, reusable: bool) -> None:
        if reusable:
            entry.used_at = time.monotonic()
            kept[url] = entry
        else:
            entry.conn.close()


@dataclass(frozen=True)
class WebhookConfig:
    retry_delays: tuple[float, ...]
    timeout: float
    disable_after: int
    allow_private: bool
    lease: timedelta

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookConfig:
        return cls(
            retry_delays=settings.webhook_retry_delays,
            timeout=settings.webhook_timeout,
            disable_after=settings.webhook_disable_after_failures,
            allow_private=settings.webhook_allow_private_networks,
            lease=timedelta(seconds=settings.outbox_lease),
        )

    def retry_delay(self, failed_attempts: int) -> float:
        """The schedule's delay for this retry (the last one repeats), with ±20 % jitter."""
        base = self.retry_delays[min(failed_attempts, len(self.retry_delays)) - 1]
        return base * random.uniform(0.8, 1.2)


def claim_due(now: datetime, lease: timedelta, limit: int) -> list[list[int]]:
    """Due deliveries of enabled endpoints, moved a lease ahead so that no other relay claims them.

    Grouped by endpoint (each group in event order), so a slow or failing receiver holds up only
    its own deliveries when a worker sends a group in one task.
    """
    db: pw.Database = database.obj
    with db.atomic():
        query = (
            WebhookDelivery.select(WebhookDelivery.id, WebhookDelivery.endpoint)
            .join(WebhookEndpoint)
            .where(
                (WebhookDelivery.status == "pending")
                & (WebhookDelivery.next_attempt_at <= now)
                & (WebhookEndpoint.status == "enabled")
            )
            .order_by(WebhookDelivery.event, WebhookDelivery.id)
            .limit(limit)
        )
        if is_postgres(db):
            query = query.for_update(of=WebhookDelivery, skip_locked=True)
        groups: dict[int, list[int]] = {}
        rows: list[tuple[int, int]] = list(query.tuples())  # type: ignore[arg-type]
        for delivery_id, endpoint_id in rows:
            groups.setdefault(endpoint_id, []).append(delivery_id)
        ids = [delivery_id for group in groups.values() for delivery_id in group]
        if ids:
            WebhookDelivery.update(next_attempt_at=now + lease).where(WebhookDelivery.id.in_(ids)).execute()
    return list(groups.values())


Send = Callable[[str, dict[str, str], bytes], Answer]


def deliver_batch(
    delivery_ids: Sequence[int], config: WebhookConfig, now: Callable[[], datetime], send: Send
) -> int:
    """One attempt at each of these claimed deliveries, in order; how many the receivers answered 2xx.

    The deliveries, their endpoints and events are read in one query; each attempt is then recorded
    on its own, right after its answer, so a worker killed mid-batch loses at most the attempt under
    way (due again after its lease). An endpoint disabled before or during the batch gets nothing more
    from it: its deliveries are given back, due at once, for when it is enabled again.
    """
    disabled: set[int] = set()
    given_back: list[int] = []
    delivered = 0
    for delivery in _claimed_deliveries(list(delivery_ids)):
        endpoint: WebhookEndpoint = delivery.endpoint
        if endpoint.id in disabled or endpoint.status != "enabled":
            disabled.add(endpoint.id)
            given_back.append(delivery.id)
            continue
        answer, latency_ms, at = _attempt(delivery, endpoint, delivery.event, send, now)
        ok = 200 <= answer.http_status < 300
        if _record(delivery, endpoint, answer, ok, latency_ms, config, at) != "enabled":
            disabled.add(endpoint.id)
        delivered += ok
    if given_back:
        # Disabled since the relay claimed them: give the claims back, so these are due as soon as
        # the endpoint is enabled again rather than a whole lease later.
        WebhookDelivery.update(next_attempt_at=now()).where(
            WebhookDelivery.id.in_(given_back) & (WebhookDelivery.status == "pending")
        ).execute()
    return delivered


# The batch's read, written by hand (one per task): the three rows side by side, read through
# converters found once, as store.database.Prepared does for a single model.
_BATCH_PARTS = tuple(
    (model, row_reader(model._meta.sorted_fields)) for model in (WebhookDelivery, WebhookEndpoint, Event)
)


def _batch_sql(p: str, count: int) -> str:
    deliveries, endpoints = WebhookDelivery._meta.table_name, WebhookEndpoint._meta.table_name
    return (
        f"SELECT {whole_row(WebhookDelivery, 'd')}, {whole_row(WebhookEndpoint, 'w')},"  # noqa: S608
        f' {whole_row(Event, "e")} FROM "{deliveries}" d JOIN "{endpoints}" w ON w.id = d.endpoint_id'
        f' JOIN "{Event._meta.table_name}" e ON e.id = d.event_id'
        f" WHERE d.id IN ({', '.join([p] * count)}) AND d.status = {p} ORDER BY d.event_id, d.id"
    )


def _claimed_deliveries(ids: list[int]) -> list[WebhookDelivery]:
    """The pending deliveries among `ids`, each with its endpoint and event, in event order."""
    if not ids:
        return []
    db = database.obj
    found = []
    for row in run_sql(db, _batch_sql(db.param, len(ids)), (*ids, "pending")).fetchall():
        delivery, endpoint, event = joined_instances(row, _BATCH_PARTS)
        delivery.endpoint, delivery.event = endpoint, event
        found.append(delivery)
    return found


def _attempt(
    delivery: WebhookDelivery,
    endpoint: WebhookEndpoint,
    event: Event,
    send: Send,
    now: Callable[[], datetime],
) -> tuple[Answer, int, datetime]:
    """The signed POST of one delivery: the answer, its latency in ms and when it came."""
    body = event_body(event)
    started_at = now()
    timestamp = int(started_at.timestamp())
    secrets: Sequence[str] = [endpoint.secret]
    if (
        endpoint.previous_secret
        and endpoint.previous_secret_expires_at
        and endpoint.previous_secret_expires_at > started_at
    ):
        secrets = [endpoint.secret, endpoint.previous_secret]
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": event.event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(s, event.event_id, timestamp, body) for s in secrets),
    }
    clock = time.perf_counter()
    answer = send(endpoint.url, headers, body)
    latency_ms = int((time.perf_counter() - clock) * 1000)
    return answer, latency_ms, now()


# The attempt, the delivery and the endpoint in one statement (data-modifying CTEs): one round trip
# and no BEGIN/COMMIT per delivery. It returns the endpoint's status after the attempt.
_ATTEMPT_CTE = """
WITH attempt AS (
    INSERT INTO webhook_attempts
        (delivery_id, attempt, http_status, error, latency_ms, response_body, attempted_at)
    VALUES (%(delivery)s, %(attempt)s, %(http_status)s, %(error)s, %(latency_ms)s, %(body)s, %(at)s)
)"""
# Both statements start with the same attempt row; only constants are joined here.
_RECORD_SUCCESS_SQL = (
    _ATTEMPT_CTE  # noqa: S608
    + """, delivery AS (
    UPDATE webhook_deliveries SET status = 'delivered', attempts = %(attempt)s, delivered_at = %(at)s
    WHERE id = %(delivery)s
)
UPDATE webhook_endpoints SET consecutive_failures = 0, last_success_at = %(at)s
WHERE id = %(endpoint)s
RETURNING status
"""
)
_RECORD_FAILURE_SQL = (
    _ATTEMPT_CTE  # noqa: S608
    + """, delivery AS (
    UPDATE webhook_deliveries SET attempts = %(attempt)s, next_attempt_at = %(retry_at)s
    WHERE id = %(delivery)s
)
UPDATE webhook_endpoints SET
    consecutive_failures = consecutive_failures + 1,
    status = CASE WHEN consecutive_failures + 1 >= %(disable_after)s THEN 'disabled' ELSE status END
WHERE id = %(endpoint)s
RETURNING status
"""
)


def _record(
    delivery: WebhookDelivery,
    endpoint: WebhookEndpoint,
    answer: Answer,
    ok: bool,
    latency_ms: int,
    config: WebhookConfig,
    at: datetime,
) -> str:
    """Store the attempt and its consequences; the endpoint's status after it ("" if it is gone)."""
    attempt = delivery.attempts + 1
    retry_at = at + timedelta(seconds=config.retry_delay(attempt))
    db: pw.Database = database.obj
    if answer.error:
        log.info("webhook %s to endpoint %d failed: %s", delivery.id, endpoint.id, answer.error)
    if is_postgres(db):
        params = {
            "delivery": delivery.id,
            "attempt": attempt,
            "http_status": answer.http_status,
            "error": answer.error,
            "latency_ms": latency_ms,
            "body": answer.body,
            "at": at,
            "retry_at": retry_at,
            "endpoint": endpoint.id,
            "disable_after": config.disable_after,
        }
        row = run_sql(db, _RECORD_SUCCESS_SQL if ok else _RECORD_FAILURE_SQL, params).fetchone()
        return str(row[0]) if row else ""
    with db.atomic():
        WebhookAttempt.create(
            delivery=delivery.id,
            attempt=attempt,
            http_status=answer.http_status,
            error=answer.error,
            latency_ms=latency_ms,
            response_body=answer.body,
            attempted_at=at,
        )
        if ok:
            WebhookDelivery.update(status="delivered", attempts=attempt, delivered_at=at).where(
                WebhookDelivery.id == delivery.id
            ).execute()
            WebhookEndpoint.update(consecutive_failures=0, last_success_at=at).where(
                WebhookEndpoint.id == endpoint.id
            ).execute()
        else:
            WebhookDelivery.update(attempts=attempt, next_attempt_at=retry_at).where(
                WebhookDelivery.id == delivery.id
            ).execute()
            failures = WebhookEndpoint.consecutive_failures + 1
            changes: dict[Any, Any] = {WebhookEndpoint.consecutive_failures: failures}
            changes[WebhookEndpoint.status] = pw.Case(
                None, [(failures >= config.disable_after, "disabled")], WebhookEndpoint.status
            )
            WebhookEndpoint.update(changes).where(WebhookEndpoint.id == endpoint.id).execute()
        status = WebhookEndpoint.select(WebhookEndpoint.status).where(WebhookEndpoint.id == endpoint.id)
        return str(status.scalar() or "")
