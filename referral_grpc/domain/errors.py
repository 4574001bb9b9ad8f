"""Domain errors: plain classes with a reason; referral_grpc.api.errors maps them to gRPC statuses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field: its JSON/proto name and what is wrong with it."""

    field: str
    description: str


class DomainError(Exception):
    """Base of every error the domain raises on purpose.

    `reason` is an UPPER_SNAKE identifier clients can switch on; `message` is safe to show
    to the caller and never contains secrets.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class InvalidArgument(DomainError):
    def __init__(self, reason: str, message: str, field_violations: Sequence[FieldViolation] = ()) -> None:
        super().__init__(reason, message)
        self.field_violations = tuple(field_violations)

    @classmethod
    def for_field(cls, field: str, description: str, reason: str = "INVALID_ARGUMENT") -> InvalidArgument:
        return cls(reason, f"invalid {field}: {description}", [FieldViolation(field, description)])


class NotFound(DomainError):
    pass


class AlreadyExists(DomainError):
    pass


class FailedPrecondition(DomainError):
    pass


class Unauthenticated(DomainError):
    pass


class PermissionDenied(DomainError):
    pass


class ResourceExhausted(DomainError):
    def __init__(self, reason: str, message: str, retry_after: float) -> None:
        super().__init__(reason, message)
        self.retry_after = retry_after


class Unavailable(DomainError):
    pass


class DeadlineExceeded(DomainError):
    pass
