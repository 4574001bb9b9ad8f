"""Referral code format: CSPRNG-generated, from an alphabet without look-alike characters."""

from __future__ import annotations

import secrets

from .errors import InvalidArgument
from .validation import MAX_CODE_INPUT_LENGTH

# No 0/O, 1/I/L: codes are read aloud and typed from screenshots.
ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
CODE_LENGTH = 10  # 31^10 ~ 8e14: guessing a live code is hopeless.


def generate_code() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(CODE_LENGTH))


def normalize_code(raw: str, field: str = "referral_code") -> str:
    """Upper-case and check a code typed by a user; raises InvalidArgument for malformed input."""
    value = raw.strip().upper()
    # The documented bound is on the field as sent, surrounding spaces included.
    if len(raw) > MAX_CODE_INPUT_LENGTH:
        raise InvalidArgument.for_field(
            field, f"must be at most {MAX_CODE_INPUT_LENGTH} characters", "REFERRAL_CODE_INVALID"
        )
    if len(value) != CODE_LENGTH or any(ch not in ALPHABET for ch in value):
        raise InvalidArgument.for_field(field, "is not a valid referral code", "REFERRAL_CODE_UNKNOWN")
    return value
