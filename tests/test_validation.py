"""The input rules' shortcuts agree with what they shortcut: email-validator, and Unicode's categories."""

from __future__ import annotations

import unicodedata

import email_validator
from email_validator import EmailNotValidError
from email_validator.validate_email import validate_email
from hypothesis import example, given, settings
from hypothesis import strategies as st

from referral_grpc.domain.validation import (
    _PLAIN_EMAIL,
    _plain_email,
    _validate_email,
    has_control_characters,
)


def _reference(value: str) -> tuple[str, str]:
    """What email-validator itself says (the service's settings: no DNS)."""
    try:
        return validate_email(value, check_deliverability=False).normalized, ""
    except EmailNotValidError as exc:
        return "", str(exc)


# Addresses shaped like the shortcut's and every near miss of it: odd characters, dots in odd places,
# numeric or one-letter TLDs, Punycode and "--", role mailboxes in any case, special-use domains.
_LOCAL_CHARS = "abcXYZ019_+-.!#$%&'*/=?^`{|}~\"é "
_LABEL_CHARS = "abzAZ09-_é"
_locals = st.one_of(
    st.text(_LOCAL_CHARS, min_size=0, max_size=12),
    st.sampled_from(["postmaster", "PostMaster", "INFO", "Support", "www", "abuse", "noc", "x"]),
)
_labels = st.one_of(
    st.text(_LABEL_CHARS, min_size=0, max_size=8),
    st.sampled_from(["xn--bcher-kva", "ab--cd", "a-b", "-ab", "ab-", "1", "a" * 63, "a" * 64]),
)
_tlds = st.one_of(
    st.sampled_from(
        ["com", "ORG", "io", "c", "123", "c0m", "test", "local", "localhost", "invalid", "onion", "arpa"]
    ),
    st.sampled_from(["alt", "home.arpa", "example", "internal", "xn--p1ai", "x" * 63, "x" * 64]),
    st.text(_LABEL_CHARS, min_size=0, max_size=6),
)


@st.composite
def _addresses(draw: st.DrawFn) -> str:
    labels = draw(st.lists(_labels, min_size=0, max_size=3))
    domain = ".".join([*labels, draw(_tlds)])
    return f"{draw(_locals)}@{domain}"


@settings(max_examples=1500, deadline=None)
# Whatever the shortcut's own pattern matches (so most examples take it), near misses, and any text.
@given(st.one_of(st.from_regex(_PLAIN_EMAIL, fullmatch=True), _addresses(), st.text(max_size=30)))
@example("Alice.Smith+tag@Example.COM")
@example("POSTMASTER@example.com")
@example("user@mail.local")
@example("user@a.test")
@example("user@xn--bcher-kva.example")
@example("user@ab--cd.example")
@example("a..b@example.com")
@example(".a@example.com")
@example("user@example.c")
@example("user@example.123")
@example(f"user@{'a' * 64}.com")
@example(f"{'a' * 70}@example.com")
@example(f"{'a.' * 120}a@{'b' * 20}.com")
def test_the_plain_address_shortcut_gives_what_email_validator_gives(value: str) -> None:
    plain = _plain_email(value)
    if plain is not None:
        assert _reference(value) == (plain, "")
    # And the memoised function the service calls, shortcut or not, answers exactly as email-validator.
    assert _validate_email.__wrapped__(value) == _reference(value)


def test_the_shortcut_takes_the_common_addresses_and_leaves_the_rest() -> None:
    assert _plain_email("Alice.Smith+tag@Mail.Example.COM") == "Alice.Smith+tag@mail.example.com"
    assert _plain_email("PostMaster@Example.com") == "postmaster@example.com"
    for special in email_validator.SPECIAL_USE_DOMAIN_NAMES:
        assert _plain_email(f"user@mail.{special}") is None
    assert _plain_email("user@xn--bcher-kva.example") is None
    assert _plain_email("josé@example.com") is None


@given(st.text(max_size=20))
@example("plain text")
@example("tab\there")
@example("\x7f")
@example("zero\u200bwidth")
def test_the_printable_ascii_shortcut_agrees_with_the_categories(value: str) -> None:
    reference = any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") for ch in value)
    assert has_control_characters(value) == reference
