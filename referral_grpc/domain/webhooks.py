"""Webhook endpoints: creation with a signing secret, rotation with overlap, attempts, redelivery."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import peewee as pw

from ..store.database import write_transaction
from ..store.models import Event, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from .errors import FieldViolation, InvalidArgument, NotFound
from .events import EVENT_ID_LENGTH, EVENT_TYPES, MAX_CURSOR
from .ports import Clock
from .validation import check_length, check_printable, has_control_characters

SECRET_PREFIX = "whsec_"  # noqa: S105 - the Standard Webhooks prefix, not a secret
MAX_URL_LENGTH = 2048
MAX_DESCRIPTION_LENGTH = 256
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
ENABLED, DISABLED = "enabled", "disabled"
PENDING, DELIVERED = "pending", "delivered"

# What is wrong with a URL as a webhook target ("" when nothing): scheme, host, resolved addresses.
UrlCheck = Callable[[str], str]


def new_secret() -> str:
    """A Standard Webhooks secret: "whsec_" and the base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class EndpointView:
    id: int
    url: str
    event_types: tuple[str, ...]
    description: str
    status: str
    consecutive_failures: int
    last_success_at: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class AttemptView:
    event_id: str
    attempt: int
    http_status: int
    error: str
    latency_ms: int
    response_body: str
    attempted_at: datetime


def _view(row: WebhookEndpoint) -> EndpointView:
    return EndpointView(
        id=row.id,
        url=row.url,
        event_types=tuple(row.event_types.split()),
        description=row.description,
        status=row.status,
        consecutive_failures=row.consecutive_failures,
        last_success_at=row.last_success_at,
        created_at=row.created_at,
    )


class WebhookService:
    def __init__(self, db: pw.Database, clock: Clock, check_url: UrlCheck, secret_overlap: timedelta) -> None:
        self._db = db
        self._clock = clock
        self._check_url = check_url
        self._overlap = secret_overlap

    def create(self, url: str, event_types: Sequence[str], description: str) -> tuple[EndpointView, str]:
        violations: list[FieldViolation] = []
        if not url:
            violations.append(FieldViolation("url", "is required", "FIELD_REQUIRED"))
        elif len(url) > MAX_URL_LENGTH:
            violations.append(
                FieldViolation("url", f"must be at most {MAX_URL_LENGTH} characters", "FIELD_TOO_LONG")
            )
        elif has_control_characters(url):
            # Refused, not cleaned: urlsplit would silently drop tabs and newlines from the URL.
            violations.append(
                FieldViolation("url", "must not contain control characters", "WEBHOOK_URL_INVALID")
            )
        else:
            problem = self._check_url(url)
            if problem:
                violations.append(FieldViolation("url", problem, "WEBHOOK_URL_INVALID"))
        for i, name in enumerate(event_types):
            if name not in EVENT_TYPES:
                violations.append(
                    FieldViolation(
                        f"event_types[{i}]", f"{name!r} is not an event type", "EVENT_TYPE_UNKNOWN"
                    )
                )
        if len(description) > MAX_DESCRIPTION_LENGTH:
            violations.append(
                FieldViolation(
                    "description", f"must be at most {MAX_DESCRIPTION_LENGTH} characters", "FIELD_TOO_LONG"
                )
            )
        elif has_control_characters(description):
            violations.append(
                FieldViolation("description", "must not contain control characters", "FIELD_INVALID")
            )
        if violations:
            raise InvalidArgument.of(violations)
        secret = new_secret()
        with write_transaction(self._db):
            row = WebhookEndpoint.create(
                url=url,
                event_types=" ".join(sorted(set(event_types))),
                description=description,
                secret=secret,
                created_at=self._clock.now(),
            )
        return _view(row), secret

    def endpoints(self) -> list[EndpointView]:
        return [_view(row) for row in WebhookEndpoint.select().order_by(WebhookEndpoint.id)]

    def get(self, endpoint_id: int) -> EndpointView:
        return _view(self._endpoint(endpoint_id))

    def delete(self, endpoint_id: int) -> None:
        with write_transaction(self._db):
            self._endpoint(endpoint_id)
            WebhookEndpoint.delete().where(WebhookEndpoint.id == endpoint_id).execute()

    def rotate_secret(self, endpoint_id: int) -> tuple[str, datetime]:
        now = self._clock.now()
        secret = new_secret()
        expires_at = now + self._overlap
        with write_transaction(self._db):
            row = self._endpoint(endpoint_id)
            WebhookEndpoint.update(
                secret=secret, previous_secret=row.secret, previous_secret_expires_at=expires_at
            ).where(WebhookEndpoint.id == endpoint_id).execute()
        return secret, expires_at

    def attempts(self, endpoint_id: int, page_size: int) -> list[AttemptView]:
        if page_size < 0:
            raise InvalidArgument.for_field("page_size", "must not be negative", "PAGE_SIZE_NEGATIVE")
        if page_size > MAX_PAGE_SIZE:
            raise InvalidArgument.for_field(
                "page_size", f"must be at most {MAX_PAGE_SIZE}", "PAGE_SIZE_TOO_LARGE"
            )
        self._endpoint(endpoint_id)
        rows = (
            WebhookAttempt.select(WebhookAttempt, WebhookDelivery, Event)
            .join(WebhookDelivery)
            .join(Event)
            .where(WebhookDelivery.endpoint == endpoint_id)
            .order_by(WebhookAttempt.id.desc())
            .limit(page_size or DEFAULT_PAGE_SIZE)
        )
        return [
            AttemptView(
                event_id=row.delivery.event.event_id,
                attempt=row.attempt,
                http_status=row.http_status,
                error=row.error,
                latency_ms=row.latency_ms,
                response_body=row.response_body,
                attempted_at=row.attempted_at,
            )
            for row in rows
        ]

    def redeliver(self, endpoint_id: int, after_cursor: int, event_id: str) -> int:
        """Queue events again (one, or all after a cursor) and enable the endpoint; return how many."""
        if not 0 <= after_cursor <= MAX_CURSOR:
            raise InvalidArgument.for_field(
                "after_cursor", "must be 0 or the cursor of an event", "CURSOR_INVALID"
            )
        check_length(event_id, "event_id", EVENT_ID_LENGTH)
        check_printable(event_id, "event_id")
        now = self._clock.now()
        with write_transaction(self._db):
            endpoint = self._endpoint(endpoint_id)
            query = Event.select(Event.id)
            if event_id:
                query = query.where(Event.event_id == event_id)
            else:
                query = query.where(Event.id > after_cursor)
            types = endpoint.event_types.split()
            if types:
                query = query.where(Event.type.in_(types))
            ids = [row.id for row in query]
            if event_id and not ids:
                raise NotFound(
                    "EVENT_NOT_FOUND", "no event this endpoint receives has this id", {"field": "event_id"}
                )
            for chunk in range(0, len(ids), 500):
                batch = [
                    {"endpoint": endpoint_id, "event": i, "next_attempt_at": now, "created_at": now}
                    for i in ids[chunk : chunk + 500]
                ]
                # A delivered row goes back to pending; the event keeps its id, so receivers can dedupe.
                WebhookDelivery.insert_many(batch).on_conflict(
                    conflict_target=[WebhookDelivery.endpoint, WebhookDelivery.event],
                    update={WebhookDelivery.status: PENDING, WebhookDelivery.next_attempt_at: now},
                ).execute()
            WebhookEndpoint.update(status=ENABLED, consecutive_failures=0).where(
                WebhookEndpoint.id == endpoint_id
            ).execute()
        return len(ids)

    def enable(self, endpoint_id: int) -> EndpointView:
        """Enable an endpoint and clear its failure run: the relay then claims its waiting deliveries."""
        with write_transaction(self._db):
            self._endpoint(endpoint_id)
            WebhookEndpoint.update(status=ENABLED, consecutive_failures=0).where(
                WebhookEndpoint.id == endpoint_id
            ).execute()
            return _view(self._endpoint(endpoint_id))

    def _endpoint(self, endpoint_id: int) -> WebhookEndpoint:
        row = WebhookEndpoint.get_or_none(WebhookEndpoint.id == endpoint_id)
        if row is None:
            raise NotFound("WEBHOOK_ENDPOINT_NOT_FOUND", "no webhook endpoint has this id", {"field": "id"})
        return row
