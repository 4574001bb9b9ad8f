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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import peewee as pw
from google.protobuf import json_format

from ..gen import event_service_pb2
from ..settings import Settings
from ..store.database import is_postgres
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


def _resolve(host: str, port: int, allow_private: bool) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise RefusedAddress(f"the host does not resolve ({exc})") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not allow_private:
        refused = [a for a in addresses if forbidden_address(a)]
        if refused:
            raise RefusedAddress(
                f"the host resolves to {refused[0]}, a loopback, private or link-local address"
            )
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
            infos = socket.getaddrinfo(parts.hostname, port or 443, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            # DNS may be down for a moment or not yet set up: each delivery checks again anyway.
            return ""
        for info in infos:
            if forbidden_address(str(info[4][0])):
                return f"resolves to {info[4][0]}, a loopback, private or link-local address"
        return ""

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


def post(url: str, headers: dict[str, str], body: bytes, timeout: float, allow_private: bool) -> Answer:
    """One POST, connected to an address checked just now; no redirects (http.client follows none)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = _resolve(host, port, allow_private)
        sock = socket.create_connection((addresses[0], port), timeout=timeout)
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            conn = http.client.HTTPSConnection(host, port, timeout=timeout)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        # The connection uses the socket opened to the checked address, never resolving again.
        conn.sock = sock
        try:
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            text = response.read(RESPONSE_BODY_LIMIT).decode("utf-8", "replace")
            return Answer(response.status, text, "")
        finally:
            conn.close()
    except RefusedAddress as exc:
        return Answer(0, "", f"refused: {exc}")
    except (OSError, http.client.HTTPException) as exc:
        return Answer(0, "", f"{type(exc).__name__}: {exc}"[:500])


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


def claim_due(now: datetime, lease: timedelta, limit: int) -> list[int]:
    """Due deliveries of enabled endpoints, moved a lease ahead so that no other relay claims them."""
    db: pw.Database = database.obj
    with db.atomic():
        query = (
            WebhookDelivery.select(WebhookDelivery.id)
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
        ids = [row.id for row in query]
        if ids:
            WebhookDelivery.update(next_attempt_at=now + lease).where(WebhookDelivery.id.in_(ids)).execute()
    return ids


def deliver(delivery_id: int, config: WebhookConfig, now: Callable[[], datetime]) -> bool:
    """One attempt at one delivery; True when the receiver answered 2xx."""
    delivery = WebhookDelivery.get_or_none(WebhookDelivery.id == delivery_id)
    if delivery is None or delivery.status != "pending":
        return delivery is not None
    endpoint = WebhookEndpoint.get_or_none(WebhookEndpoint.id == delivery.endpoint_id)
    if endpoint is None:
        return False
    if endpoint.status != "enabled":
        # Disabled since the relay claimed it: give the claim back, so the delivery is due as soon as
        # the endpoint is enabled again rather than a whole lease later.
        WebhookDelivery.update(next_attempt_at=now()).where(
            (WebhookDelivery.id == delivery_id) & (WebhookDelivery.status == "pending")
        ).execute()
        return False
    event = Event.get_by_id(delivery.event_id)
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
    answer = post(endpoint.url, headers, body, config.timeout, config.allow_private)
    latency_ms = int((time.perf_counter() - clock) * 1000)
    ok = 200 <= answer.http_status < 300
    _record(delivery, endpoint, answer, ok, latency_ms, config, now())
    return ok


def _record(
    delivery: WebhookDelivery,
    endpoint: WebhookEndpoint,
    answer: Answer,
    ok: bool,
    latency_ms: int,
    config: WebhookConfig,
    at: datetime,
) -> None:
    attempt = delivery.attempts + 1
    with database.obj.atomic():
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
            return
        retry_at = at + timedelta(seconds=config.retry_delay(attempt))
        WebhookDelivery.update(attempts=attempt, next_attempt_at=retry_at).where(
            WebhookDelivery.id == delivery.id
        ).execute()
        failures = WebhookEndpoint.consecutive_failures + 1
        changes: dict[Any, Any] = {WebhookEndpoint.consecutive_failures: failures}
        changes[WebhookEndpoint.status] = pw.Case(
            None, [(failures >= config.disable_after, "disabled")], WebhookEndpoint.status
        )
        WebhookEndpoint.update(changes).where(WebhookEndpoint.id == endpoint.id).execute()
    if answer.error:
        log.info("webhook %s to endpoint %d failed: %s", delivery.id, endpoint.id, answer.error)
