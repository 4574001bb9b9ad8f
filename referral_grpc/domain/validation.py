"""Input rules shared by every use case: emails, passwords, codes, lengths."""

from __future__ import annotations

import unicodedata

from email_validator import EmailNotValidError, validate_email

from .errors import FieldViolation, InvalidArgument

MAX_EMAIL_LENGTH = 254
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 128
MAX_TOKEN_LENGTH = 128
MAX_PAGE_TOKEN_LENGTH = 512
MAX_CODE_INPUT_LENGTH = 32


def _has_control_characters(value: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") for ch in value)


def normalize_email(raw: str, field: str = "email") -> tuple[str, str]:
    """Validate an address and return (normalised email, lower-cased key used for uniqueness).

    email-validator does the RFC work (no DNS lookups: deliverability is Hunter's job).
    """
    value = raw.strip()
    if not value:
        raise InvalidArgument.for_field(field, "is required", "EMAIL_REQUIRED")
    if len(value) > MAX_EMAIL_LENGTH:
        raise InvalidArgument.for_field(field, f"must be at most {MAX_EMAIL_LENGTH} characters", "EMAIL_INVALID")
    if _has_control_characters(value):
        raise InvalidArgument.for_field(field, "must not contain control characters", "EMAIL_INVALID")
    try:
        result = validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        raise InvalidArgument.for_field(field, str(exc), "EMAIL_INVALID") from None
    normalized = result.normalized
    return normalized, normalized.lower()


def check_password(password: str, field: str) -> None:
    """Length rules only (NIST SP 800-63B): no composition rules, any Unicode."""
    length = len(password)
    if length < MIN_PASSWORD_LENGTH:
        raise InvalidArgument.for_field(
            field, f"must be at least {MIN_PASSWORD_LENGTH} characters", "PASSWORD_TOO_SHORT"
        )
    if length > MAX_PASSWORD_LENGTH:
        raise InvalidArgument.for_field(
            field, f"must be at most {MAX_PASSWORD_LENGTH} characters", "PASSWORD_TOO_LONG"
        )
    if "\x00" in password:
        raise InvalidArgument.for_field(field, "must not contain NUL characters", "PASSWORD_INVALID")


def check_length(value: str, field: str, maximum: int) -> None:
    if len(value) > maximum:
        raise InvalidArgument(
            "FIELD_TOO_LONG",
            f"invalid {field}: must be at most {maximum} characters",
            [FieldViolation(field, f"must be at most {maximum} characters")],
        )


def require(value: str, field: str) -> None:
    if not value:
        raise InvalidArgument.for_field(field, "is required", "FIELD_REQUIRED")
