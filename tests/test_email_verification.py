"""Email verification end to end: the emailed token, VerifyEmail, resends, what EMAIL_VERIFICATION gates."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from support import TEST_JWT_SECRET, FakeClock, make_settings
from support.api import Api, bearer, expect_error, in_days, running_api
from support.smtp import SmtpServer

from referral_grpc.domain.ports import CachedCode, CodeCache, SystemClock
from referral_grpc.gen import auth_service_pb2 as auth_pb
from referral_grpc.gen import referral_service_pb2 as ref_pb
from referral_grpc.infra.cache import InProcessCodeCache, RedisCodeCache, decode_entry, encode_entry
from referral_grpc.infra.tasks import Worker, make_dispatcher
from referral_grpc.settings import ConfigError, Settings
from referral_grpc.store.models import EmailOutbox, EmailVerificationToken, User

BASE_URL = "https://referrals.example.com"
PASSWORD = "correct horse battery"
TOKEN_IN_LINK = re.compile(re.escape(f"{BASE_URL}/verify-email?token=") + r"([A-Za-z0-9_-]+)")


@pytest.fixture
def required(database_url: str, clock: FakeClock) -> Iterator[Api]:
    with running_api(
        make_settings(database_url=database_url, email_verification="required"), clock=clock
    ) as api:
        yield api


@pytest.fixture
def optional(database_url: str, clock: FakeClock) -> Iterator[Api]:
    with running_api(
        make_settings(database_url=database_url, email_verification="optional"), clock=clock
    ) as api:
        yield api


def token_for(api: Api, recipient: str) -> str:
    """The token of the newest verification email queued for `recipient`."""
    rows = [row for row in api.outbox("email_verification") if row.recipient == recipient]
    assert rows, f"no verification email queued for {recipient}"
    return str(json.loads(rows[-1].payload)["token"])


def verify(api: Api, token: str) -> auth_pb.VerifyEmailResponse:
    return api.auth.VerifyEmail(auth_pb.VerifyEmailRequest(token=token))


def resend(api: Api, access_token: str) -> auth_pb.ResendVerificationEmailResponse:
    return api.auth.ResendVerificationEmail(
        auth_pb.ResendVerificationEmailRequest(), metadata=bearer(access_token)
    )


def lookup(api: Api, email: str) -> ref_pb.GetReferralCodeByEmailResponse:
    return api.referrals.GetReferralCodeByEmail(ref_pb.GetReferralCodeByEmailRequest(email=email))


def create_code(api: Api, access_token: str, clock: FakeClock) -> str:
    request = ref_pb.CreateReferralCodeRequest(expires_at=in_days(clock, 30))
    return str(api.referrals.CreateReferralCode(request, metadata=bearer(access_token)).code)


def verified_at(email: str) -> Any:
    return User.get(User.email_key == email.lower()).email_verified_at


def qualified_at(email: str) -> Any:
    return User.get(User.email_key == email.lower()).referral_qualified_at


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


# --- the email and the token -------------------------------------------------------------------


def test_register_emails_a_verification_link_that_verifies_and_the_token_is_scrubbed(
    database_url: str, clock: FakeClock, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    settings = make_settings(
        database_url=database_url,
        huey_sqlite_path=tmp_path / "huey.db",
        smtp_host=smtp_server.host,
        smtp_port=smtp_server.port,
        public_base_url=BASE_URL,
        outbox_relay_interval=0.05,
    )
    # The server hands its emails to the queue as it does in production; the worker sends them.
    with running_api(settings, clock=clock, dispatcher=make_dispatcher(settings, SystemClock())) as api:
        worker = Worker(settings, SystemClock())
        worker.start()
        try:
            tokens = api.register("Vera@Example.com")
            messages = smtp_server.wait_for(2)
            [message] = [m for m in messages if m.message["Subject"] == "Confirm your email address"]
            [outbox_row] = api.outbox("email_verification")
            wait_until(lambda: EmailOutbox.get_by_id(outbox_row.id).status == "sent", 5, "the sent mark")
        finally:
            worker.stop()
        assert message.rcpt_tos == ["Vera@example.com"]
        text_link = TOKEN_IN_LINK.search(message.part("plain"))
        assert text_link is not None
        token = text_link.group(1)
        assert f'href="{BASE_URL}/verify-email?token={token}"' in message.part("html")
        assert "48 hours" in message.part("plain") and "48 hours" in message.part("html")
        # Sent: the token is gone from the outbox, and the database only ever held its digest.
        assert json.loads(EmailOutbox.get_by_id(outbox_row.id).payload) == {"expires_hours": 48}
        assert EmailVerificationToken.select().where(EmailVerificationToken.token_hash == token).count() == 0
        assert verified_at("vera@example.com") is None

        clock.advance(minutes=5)
        response = verify(api, token)
        assert response.user_id == tokens.user_id
        assert response.email_verified_at.ToDatetime(tzinfo=clock.now().tzinfo) == clock.now()
        assert verified_at("vera@example.com") == clock.now()


def test_a_token_works_once(optional: Api, clock: FakeClock) -> None:
    optional.register("once@example.com")
    token = token_for(optional, "once@example.com")
    verify(optional, token)
    first = verified_at("once@example.com")
    clock.advance(minutes=1)
    err = expect_error(verify, optional, token)
    assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "VERIFICATION_TOKEN_INVALID")
    assert err.fields == {"token": "is invalid, expired or already used"}
    assert verified_at("once@example.com") == first


def test_parallel_uses_of_one_token_succeed_once(optional: Api) -> None:
    optional.register("racer@example.com")
    token = token_for(optional, "racer@example.com")

    def attempt(_: int) -> grpc.StatusCode:
        try:
            verify(optional, token)
        except grpc.RpcError as err:
            return err.code()  # type: ignore[attr-defined, no-any-return]
        return grpc.StatusCode.OK

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(attempt, range(8)))
    assert sorted(codes, key=str) == sorted(
        [grpc.StatusCode.OK] + [grpc.StatusCode.INVALID_ARGUMENT] * 7, key=str
    )


def test_a_token_expires_after_48_hours(optional: Api, clock: FakeClock) -> None:
    optional.register("late@example.com")
    optional.register("just-in-time@example.com")
    late, in_time = token_for(optional, "late@example.com"), token_for(optional, "just-in-time@example.com")
    clock.advance(hours=47, minutes=59)
    verify(optional, in_time)
    clock.advance(minutes=1)
    err = expect_error(verify, optional, late)
    assert (err.code, err.reason, list(err.fields)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "VERIFICATION_TOKEN_INVALID",
        ["token"],
    )
    assert verified_at("late@example.com") is None
    assert verified_at("just-in-time@example.com") is not None


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", "FIELD_REQUIRED"),
        ("t" * 129, "FIELD_TOO_LONG"),
        ("tok\x1ben", "FIELD_INVALID"),
        ("never-issued-token", "VERIFICATION_TOKEN_INVALID"),
    ],
)
def test_bad_tokens_are_invalid_argument_with_a_field_violation(
    optional: Api, token: str, reason: str
) -> None:
    err = expect_error(verify, optional, token)
    assert (err.code, err.reason, list(err.fields)) == (grpc.StatusCode.INVALID_ARGUMENT, reason, ["token"])


# --- resending ---------------------------------------------------------------------------------


def test_resend_sends_a_new_token_and_the_older_one_stops_working(optional: Api, clock: FakeClock) -> None:
    tokens = optional.register("again@example.com")
    old = token_for(optional, "again@example.com")
    clock.advance(minutes=10)
    assert resend(optional, tokens.access_token) == auth_pb.ResendVerificationEmailResponse(email_sent=True)
    new = token_for(optional, "again@example.com")
    assert new != old
    assert expect_error(verify, optional, old).reason == "VERIFICATION_TOKEN_INVALID"
    verify(optional, new)
    assert verified_at("again@example.com") == clock.now()


def test_resend_to_a_verified_account_answers_ok_and_sends_nothing(optional: Api, clock: FakeClock) -> None:
    tokens = optional.register("done@example.com")
    verify(optional, token_for(optional, "done@example.com"))
    verified = clock.now()
    clock.advance(minutes=5)
    response = resend(optional, tokens.access_token)
    assert response.email_sent is False
    assert response.email_verified_at.ToDatetime(tzinfo=verified.tzinfo) == verified
    assert len(optional.outbox("email_verification")) == 1


def test_resend_needs_the_callers_access_token(optional: Api) -> None:
    err = expect_error(optional.auth.ResendVerificationEmail, auth_pb.ResendVerificationEmailRequest())
    assert (err.code, err.reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN")


def test_resend_is_throttled_per_account(optional: Api, clock: FakeClock) -> None:
    spammer = optional.register("spammer@example.com")
    bystander = optional.register("bystander@example.com")
    for _ in range(3):
        assert resend(optional, spammer.access_token).email_sent
    err = expect_error(resend, optional, spammer.access_token)
    assert (err.code, err.reason, err.retry_delay) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "TOO_MANY_ATTEMPTS",
        3600,
    )
    # The registration email plus three resends: the refused call queued nothing.
    assert [row.recipient for row in optional.outbox("email_verification")].count("spammer@example.com") == 4
    assert resend(optional, bystander.access_token).email_sent
    clock.advance(hours=1)
    again = optional.auth.Login(auth_pb.LoginRequest(email="spammer@example.com", password=PASSWORD))
    assert resend(optional, again.access_token).email_sent


# --- what EMAIL_VERIFICATION gates -------------------------------------------------------------


def test_required_hides_an_unverified_owners_code_like_a_miss_until_verified(
    required: Api, clock: FakeClock
) -> None:
    owner = required.register("owner@example.com")
    code = create_code(required, owner.access_token, clock)
    hidden = expect_error(lookup, required, "owner@example.com")
    hidden_again = expect_error(lookup, required, "OWNER@example.com")
    # Never cached while hidden: a cache hit would answer faster than a miss and tell them apart.
    assert required.app.cache.get("owner@example.com", clock.now()).value is None
    miss = expect_error(lookup, required, "nobody@example.com")
    for err in (hidden, hidden_again):
        assert (err.code, err.reason, err.message) == (miss.code, miss.reason, miss.message)
    assert miss.code == grpc.StatusCode.NOT_FOUND

    verify(required, token_for(required, "owner@example.com"))
    assert lookup(required, "owner@example.com").code == code
    assert required.app.cache.get("owner@example.com", clock.now()).value is not None


@pytest.mark.parametrize("cache_kind", ["redis", "in-process"])
def test_required_never_serves_a_code_cached_while_verification_was_optional(
    database_url: str,
    clock: FakeClock,
    redis_url: str,
    key_prefix: str,
    redis_client: redis.Redis,
    cache_kind: str,
) -> None:
    """Servers that share one cache and switch from optional to required (a rolling config change)."""
    shared: dict[str, Any] = {}
    options: dict[str, Any] = {"database_url": database_url}
    if cache_kind == "redis":
        options.update(redis_url=redis_url, redis_key_prefix=key_prefix)
    else:
        shared["cache"] = InProcessCodeCache(300)
    with running_api(make_settings(email_verification="optional", **options), clock=clock, **shared) as api:
        owner = api.register("early@example.com")
        code = create_code(api, owner.access_token, clock)
        assert lookup(api, "early@example.com").code == code
        if isinstance(api.app.cache, RedisCodeCache):
            assert api.app.cache.settle()  # its fills are applied in the background
        token = token_for(api, "early@example.com")
    if cache_kind == "redis":
        assert redis_client.get(f"{key_prefix}code:early@example.com") is not None
    else:
        cache: CodeCache = shared["cache"]
        assert cache.get("early@example.com", clock.now()).value is not None

    with running_api(make_settings(email_verification="required", **options), clock=clock, **shared) as api:
        err = expect_error(lookup, api, "early@example.com")
        assert (err.code, err.reason) == (grpc.StatusCode.NOT_FOUND, "REFERRAL_CODE_NOT_FOUND")
        verify(api, token)
        assert lookup(api, "early@example.com").code == code


def test_cached_entries_carry_the_owners_state_and_older_entries_are_misses(clock: FakeClock) -> None:
    for owner_verified in (True, False):
        value = CachedCode(code="ABCD2345", expires_at=clock.now(), owner_verified=owner_verified)
        assert decode_entry(encode_entry(value)) == value
    # Written before verification existed: it says nothing about the owner, so it is refilled.
    assert decode_entry("ABCD2345|2026-05-31T12:00:00+00:00") is None


def test_optional_records_the_flag_and_gates_nothing(optional: Api, clock: FakeClock) -> None:
    owner = optional.register("open@example.com")
    code = create_code(optional, owner.access_token, clock)
    assert lookup(optional, "open@example.com").code == code
    optional.register("friend@example.com", code=code)
    # The referral counts from signup, verified or not.
    assert qualified_at("friend@example.com") == clock.now()
    assert verified_at("open@example.com") is None

    clock.advance(minutes=3)
    verify(optional, token_for(optional, "open@example.com"))
    assert verified_at("open@example.com") == clock.now()
    assert lookup(optional, "open@example.com").code == code


def test_required_counts_a_referral_once_both_addresses_are_verified(required: Api, clock: FakeClock) -> None:
    owner = required.register("referrer@example.com")
    code = create_code(required, owner.access_token, clock)
    required.register("first@example.com", code=code)
    required.register("second@example.com", code=code)
    required.register("loner@example.com")
    assert qualified_at("first@example.com") is None

    clock.advance(minutes=1)
    verify(required, token_for(required, "first@example.com"))
    # The referee alone is not enough: the referrer has not proved their address.
    assert qualified_at("first@example.com") is None

    clock.advance(minutes=1)
    verify(required, token_for(required, "referrer@example.com"))
    assert qualified_at("first@example.com") == clock.now()
    assert qualified_at("second@example.com") is None

    clock.advance(minutes=1)
    verify(required, token_for(required, "second@example.com"))
    verify(required, token_for(required, "loner@example.com"))
    assert qualified_at("second@example.com") == clock.now()
    assert qualified_at("loner@example.com") is None
    assert qualified_at("referrer@example.com") is None


def test_a_referrer_and_referee_verifying_at_once_still_count_the_referral(
    required: Api, clock: FakeClock
) -> None:
    pairs = []
    for i in range(6):
        owner = required.register(f"owner{i}@example.com")
        code = create_code(required, owner.access_token, clock)
        required.register(f"friend{i}@example.com", code=code)
        pairs.append(
            (token_for(required, f"owner{i}@example.com"), token_for(required, f"friend{i}@example.com"))
        )
    tokens = [token for pair in pairs for token in pair]
    with ThreadPoolExecutor(len(tokens)) as pool:
        list(pool.map(lambda token: verify(required, token), tokens))
    # Each side saw the other's flag, whichever committed first; and nobody deadlocked.
    assert [qualified_at(f"friend{i}@example.com") is not None for i in range(6)] == [True] * 6


def test_required_is_the_production_default_and_optional_the_development_one() -> None:
    assert make_settings().email_verification == "optional"
    production = {
        "ENVIRONMENT": "production",
        "JWT_SECRET": TEST_JWT_SECRET,
        "PASSWORD_PEPPER": os.urandom(32).hex(),
    }
    assert Settings.from_env(production).email_verification == "required"
    assert (
        Settings.from_env({**production, "EMAIL_VERIFICATION": "optional"}).email_verification == "optional"
    )
    with pytest.raises(ConfigError, match="EMAIL_VERIFICATION"):
        make_settings(email_verification="sometimes")
