"""Input rules shared by every use case: emails, passwords, codes, lengths."""

from __future__ import annotations

import re
import unicodedata
from functools import cache, lru_cache
from importlib import resources

import email_validator
from email_validator import EmailNotValidError
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES

# From its module: mypy (follow_imports=skip) takes the package's `validate_email` for the submodule.
from email_validator.validate_email import validate_email

from .errors import FieldViolation, InvalidArgument

MAX_EMAIL_LENGTH = 254
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 128
MAX_TOKEN_LENGTH = 128
MAX_PAGE_TOKEN_LENGTH = 512
MAX_CODE_INPUT_LENGTH = 32

# Only what copy-paste commonly adds around an address: any other control character is refused, not
# stripped (str.strip() would silently drop \x1c-\x1f and friends).
_SURROUNDING_WHITESPACE = " \t\r\n"


def has_control_characters(value: str) -> bool:
    if value.isascii() and value.isprintable():
        # Printable ASCII is U+0020..U+007E: none of those categories.
        return False
    return any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") for ch in value)


@cache
def _common_passwords() -> frozenset[str]:
    """The shipped list (data/common-passwords.txt, see its NOTICE): lower-case, 8 to 128 characters."""
    text = (
        resources.files("referral_grpc.domain")
        .joinpath("data/common-passwords.txt")
        .read_text(encoding="utf-8")
    )
    return frozenset(line for line in text.splitlines() if line)


def is_common_password(password: str) -> bool:
    """Case-insensitive; NFKC first, so full-width or ligature look-alikes of a listed password match too."""
    return unicodedata.normalize("NFKC", password).strip().lower() in _common_passwords()


def normalize_email(raw: str, field: str = "email") -> tuple[str, str]:
    """Validate an address and return (normalised email, lower-cased key used for uniqueness).

    email-validator does the RFC work (no DNS lookups: deliverability is Hunter's job).
    """
    # The documented bound is on the field as sent, surrounding spaces included.
    if len(raw) > MAX_EMAIL_LENGTH:
        raise InvalidArgument.for_field(
            field, f"must be at most {MAX_EMAIL_LENGTH} characters", "EMAIL_INVALID"
        )
    value = raw.strip(_SURROUNDING_WHITESPACE)
    if not value:
        raise InvalidArgument.for_field(field, "is required", "EMAIL_REQUIRED")
    if len(value) > MAX_EMAIL_LENGTH:
        raise InvalidArgument.for_field(
            field, f"must be at most {MAX_EMAIL_LENGTH} characters", "EMAIL_INVALID"
        )
    if has_control_characters(value):
        raise InvalidArgument.for_field(field, "must not contain control characters", "EMAIL_INVALID")
    normalized, problem = _validate_email(value)
    if problem:
        raise InvalidArgument.for_field(field, problem, "EMAIL_INVALID")
    return normalized, normalized.lower()


# The addresses nearly everyone has: ASCII, a dot-atom local part of letters, digits and _ + -, a domain
# of plain labels ending in an alphabetic top-level domain, no "--" (Punycode's mark) anywhere in it.
_PLAIN_EMAIL = re.compile(
    r"([A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*)@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63})"
)
_ROLE_MAILBOXES = frozenset(CASE_INSENSITIVE_MAILBOX_NAMES)


def _plain_email(value: str) -> str | None:
    """email-validator's normal form of a plain address (see _PLAIN_EMAIL), known without running it:
    the address with its domain lower-cased, and its local part too for the role mailboxes RFC 2142
    makes case-insensitive (postmaster, ...). None for anything else, and for the special-use domains
    email-validator refuses: it decides those. tests/test_validation.py checks the two agree."""
    match = _PLAIN_EMAIL.fullmatch(value) if len(value) <= MAX_EMAIL_LENGTH else None
    if match is None:
        return None
    local, domain = match.groups()
    domain = domain.lower()
    if "--" in domain or len(domain) > 253:
        return None
    for special in email_validator.SPECIAL_USE_DOMAIN_NAMES:
        if domain == special or domain.endswith("." + special):
            return None
    if local.lower() in _ROLE_MAILBOXES:
        local = local.lower()
    return f"{local}@{domain}"


@lru_cache(maxsize=16384)
def _validate_email(value: str) -> tuple[str, str]:
    """(normalised address, "") or ("", what is wrong). Memoised: a pure function that costs ~45 us in
    email-validator, on the hot path of every lookup by email; plain addresses are normalised directly."""
    plain = _plain_email(value)
    if plain is not None:
        return plain, ""
    try:
        return validate_email(value, check_deliverability=False).normalized, ""
    except EmailNotValidError as exc:
        return "", str(exc)


# Bidirectional controls are format characters (Cf) that reorder what is shown: a password field or
# a password manager would display something other than what is stored.
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Letters in Unicode's eyes (Lo) that render as nothing.
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0")


def _unusable_in_password(ch: str) -> bool:
    """Controls (CR, LF, ESC, tab...), bidi controls, lone surrogates, and unassigned code points: the
    last because NFKC may normalise them differently once a later Unicode version assigns them."""
    return unicodedata.category(ch) in ("Cc", "Cs", "Cn") or ch in _BIDI_CONTROLS


def _visible(ch: str) -> bool:
    """A letter, digit, punctuation mark or symbol that shows; spaces, marks and format characters do not."""
    return unicodedata.category(ch)[0] in "LNPS" and ch not in _BLANK_LETTERS


def check_password(password: str, field: str) -> None:
    """NIST SP 800-63B: length rules and a common-password blocklist; no composition rules, any Unicode.

    The rules apply to the NFKC form that is hashed (referral_grpc.domain.passwords), so the minimum
    length counts what the user will have to type again, whichever normalisation their keyboard uses.
    """
    if len(password) > MAX_PASSWORD_LENGTH:
        raise InvalidArgument.for_field(
            field, f"must be at most {MAX_PASSWORD_LENGTH} characters", "PASSWORD_TOO_LONG"
        )
    if "\x00" in password:
        raise InvalidArgument.for_field(field, "must not contain NUL characters", "PASSWORD_INVALID")
    if any(_unusable_in_password(ch) for ch in password):
        raise InvalidArgument.for_field(field, "must not contain control characters", "PASSWORD_INVALID")
    normalized = unicodedata.normalize("NFKC", password)
    if len(normalized) < MIN_PASSWORD_LENGTH:
        raise InvalidArgument.for_field(
            field, f"must be at least {MIN_PASSWORD_LENGTH} characters", "PASSWORD_TOO_SHORT"
        )
    if not any(_visible(ch) for ch in normalized):
        raise InvalidArgument.for_field(
            field, "must contain visible characters, not only spaces", "PASSWORD_INVALID"
        )
    if is_common_password(password):
        raise InvalidArgument.for_field(
            field, "is one of the most common passwords: choose another one", "PASSWORD_TOO_COMMON"
        )


def check_password_input(password: str, field: str) -> None:
    """A password to check against a stored one: present and bounded; NUL can never match, so refuse it."""
    require(password, field)
    check_length(password, field, MAX_PASSWORD_LENGTH)
    if "\x00" in password:
        raise InvalidArgument.for_field(field, "must not contain NUL characters", "PASSWORD_INVALID")


def check_length(value: str, field: str, maximum: int) -> None:
    if len(value) > maximum:
        raise InvalidArgument(
            "FIELD_TOO_LONG",
            f"invalid {field}: must be at most {maximum} characters",
            [FieldViolation(field, f"must be at most {maximum} characters")],
            {"limit": str(maximum)},
        )


def require(value: str, field: str) -> None:
    if not value:
        raise InvalidArgument.for_field(field, "is required", "FIELD_REQUIRED")


def check_printable(value: str, field: str, reason: str = "FIELD_INVALID") -> None:
    """Refuse control and format characters (NUL, ESC, bidi overrides...) in identifiers and tokens."""
    if has_control_characters(value):
        raise InvalidArgument.for_field(field, "must not contain control characters", reason)


def check_no_nul(value: str, field: str) -> None:
    """Free text (an administrator's note) may hold any character but NUL, which PostgreSQL cannot store."""
    if "\x00" in value:
        raise InvalidArgument.for_field(field, "must not contain NUL characters", "FIELD_INVALID")


def check_token(value: str, field: str, maximum: int) -> None:
    """An opaque token from us: required, bounded, and printable (ours are URL-safe base64)."""
    require(value, field)
    check_length(value, field, maximum)
    check_printable(value, field)
