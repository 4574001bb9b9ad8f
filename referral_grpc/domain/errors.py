"""Domain errors: plain classes with a reason; referral_grpc.api.errors maps them to gRPC statuses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    """Every ErrorInfo.reason the service sends: the enum referral.v1.ErrorReason of the contract.

    The domain imports no protobuf, so the list is repeated here; tests/test_error_reasons.py fails
    when the two differ, and constructing an error with a reason missing here raises ValueError.
    """

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    FIELD_REQUIRED = "FIELD_REQUIRED"
    FIELD_TOO_LONG = "FIELD_TOO_LONG"
    FIELD_INVALID = "FIELD_INVALID"
    TIMESTAMP_INVALID = "TIMESTAMP_INVALID"
    EMAIL_INVALID = "EMAIL_INVALID"
    EMAIL_REQUIRED = "EMAIL_REQUIRED"
    REQUEST_UNDECODABLE = "REQUEST_UNDECODABLE"
    REQUEST_CANCELLED = "REQUEST_CANCELLED"
    SERVER_OVERLOADED = "SERVER_OVERLOADED"
    EMAIL_UNDELIVERABLE = "EMAIL_UNDELIVERABLE"
    EMAIL_TAKEN = "EMAIL_TAKEN"
    PASSWORD_INVALID = "PASSWORD_INVALID"
    PASSWORD_TOO_SHORT = "PASSWORD_TOO_SHORT"
    PASSWORD_TOO_LONG = "PASSWORD_TOO_LONG"
    PASSWORD_TOO_COMMON = "PASSWORD_TOO_COMMON"
    WRONG_PASSWORD = "WRONG_PASSWORD"
    INVALID_CREDENTIALS = "INVALID_CREDENTIALS"
    INVALID_TOKEN = "INVALID_TOKEN"
    INVALID_REFRESH_TOKEN = "INVALID_REFRESH_TOKEN"
    RESET_TOKEN_INVALID = "RESET_TOKEN_INVALID"
    VERIFICATION_TOKEN_INVALID = "VERIFICATION_TOKEN_INVALID"
    REFERRAL_CODE_INVALID = "REFERRAL_CODE_INVALID"
    REFERRAL_CODE_UNKNOWN = "REFERRAL_CODE_UNKNOWN"
    REFERRAL_CODE_EXPIRED = "REFERRAL_CODE_EXPIRED"
    REFERRAL_CODE_NOT_FOUND = "REFERRAL_CODE_NOT_FOUND"
    EXPIRY_IN_PAST = "EXPIRY_IN_PAST"
    EXPIRY_TOO_FAR = "EXPIRY_TOO_FAR"
    PAGE_TOKEN_INVALID = "PAGE_TOKEN_INVALID"
    PAGE_SIZE_NEGATIVE = "PAGE_SIZE_NEGATIVE"
    USER_NOT_FOUND = "USER_NOT_FOUND"
    CONCURRENT_UPDATE = "CONCURRENT_UPDATE"
    TOO_MANY_ATTEMPTS = "TOO_MANY_ATTEMPTS"
    DATABASE_BUSY = "DATABASE_BUSY"
    DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    API_KEY_INVALID = "API_KEY_INVALID"
    API_KEY_SCOPE_MISSING = "API_KEY_SCOPE_MISSING"
    API_KEY_NAME_TAKEN = "API_KEY_NAME_TAKEN"
    API_KEY_NOT_FOUND = "API_KEY_NOT_FOUND"
    SCOPE_UNKNOWN = "SCOPE_UNKNOWN"
    EVENT_ID_CONFLICT = "EVENT_ID_CONFLICT"
    EVENT_NOT_FOUND = "EVENT_NOT_FOUND"
    INSUFFICIENT_BALANCE = "INSUFFICIENT_BALANCE"
    IDEMPOTENCY_KEY_REQUIRED = "IDEMPOTENCY_KEY_REQUIRED"
    IDEMPOTENCY_KEY_INVALID = "IDEMPOTENCY_KEY_INVALID"
    IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
    IDEMPOTENCY_KEY_IN_USE = "IDEMPOTENCY_KEY_IN_USE"
    CURRENCY_INVALID = "CURRENCY_INVALID"
    AMOUNT_INVALID = "AMOUNT_INVALID"
    OCCURRED_AT_IN_FUTURE = "OCCURRED_AT_IN_FUTURE"
    ACCOUNT_BLOCKED = "ACCOUNT_BLOCKED"
    PROGRAM_NOT_SET = "PROGRAM_NOT_SET"
    REFERRAL_NOT_IN_REVIEW = "REFERRAL_NOT_IN_REVIEW"
    REFERRAL_ALREADY_DECIDED = "REFERRAL_ALREADY_DECIDED"
    # Sent by the gateway (Envoy) for errors it makes itself; listed so the contract stays one list.
    MALFORMED_JSON = "MALFORMED_JSON"
    INVALID_QUERY_PARAMETER = "INVALID_QUERY_PARAMETER"
    MALFORMED_REQUEST = "MALFORMED_REQUEST"
    QUERY_PARAMETERS_NOT_ALLOWED = "QUERY_PARAMETERS_NOT_ALLOWED"
    UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
    GRPC_REQUIRES_HTTP2 = "GRPC_REQUIRES_HTTP2"
    UNKNOWN_PATH = "UNKNOWN_PATH"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    HEADERS_TOO_LARGE = "HEADERS_TOO_LARGE"
    RATE_LIMITED = "RATE_LIMITED"
    BACKEND_UNAVAILABLE = "BACKEND_UNAVAILABLE"
    BACKEND_TIMEOUT = "BACKEND_TIMEOUT"
    GATEWAY_ERROR = "GATEWAY_ERROR"
    CURSOR_INVALID = "CURSOR_INVALID"
    EVENT_TYPE_UNKNOWN = "EVENT_TYPE_UNKNOWN"
    PAGE_SIZE_TOO_LARGE = "PAGE_SIZE_TOO_LARGE"
    WEBHOOK_URL_INVALID = "WEBHOOK_URL_INVALID"
    WEBHOOK_ENDPOINT_NOT_FOUND = "WEBHOOK_ENDPOINT_NOT_FOUND"


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field: its JSON/proto name, what is wrong with it, and a reason for it.

    `reason` is an ErrorReason name for this field's fault; empty: the reason of the error it is in.
    """

    field: str
    description: str
    reason: str = ""


class DomainError(Exception):
    """Base of every error the domain raises on purpose.

    `reason` is an UPPER_SNAKE identifier clients can switch on; `message` is safe to show
    to the caller and never contains secrets.
    """

    def __init__(self, reason: str, message: str, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        # Reason(...) refuses a reason the contract does not list.
        self.reason = Reason(reason)
        self.message = message
        # Dynamic values a client may need (the field, a limit): ErrorInfo.metadata.
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(DomainError):
    def __init__(
        self,
        reason: str,
        message: str,
        field_violations: Sequence[FieldViolation] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        violations = tuple(field_violations)
        # The first field at fault, for clients that read ErrorInfo alone.
        extra = {"field": violations[0].field} if violations else {}
        super().__init__(reason, message, {**extra, **(metadata or {})})
        self.field_violations = violations

    @classmethod
    def for_field(
        cls,
        field: str,
        description: str,
        reason: str = "INVALID_ARGUMENT",
        metadata: Mapping[str, str] | None = None,
    ) -> InvalidArgument:
        return cls(reason, f"invalid {field}: {description}", [FieldViolation(field, description)], metadata)

    @classmethod
    def of(cls, violations: Sequence[FieldViolation]) -> InvalidArgument:
        """Every violation at once; the error's reason and message are the first one's."""
        first = violations[0]
        reason = first.reason or "INVALID_ARGUMENT"
        return cls(reason, f"invalid {first.field}: {first.description}", violations)


class NotFound(DomainError):
    pass


class AlreadyExists(DomainError):
    pass


class FailedPrecondition(DomainError):
    pass


class Aborted(DomainError):
    """A concurrent operation holds what this one needs; retrying later is safe."""


class Unauthenticated(DomainError):
    pass


class PermissionDenied(DomainError):
    pass


class ResourceExhausted(DomainError):
    def __init__(self, reason: str, message: str, retry_after: float) -> None:
        super().__init__(reason, message, {"retry_after_seconds": str(max(0, round(retry_after)))})
        self.retry_after = retry_after


class Unavailable(DomainError):
    pass


class DeadlineExceeded(DomainError):
    pass
