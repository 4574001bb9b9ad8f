"""Abuse resistance: per-account throttles, reset timing, common passwords, input bounds, no 500s."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import socket
import statistics
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import bcrypt
import grpc
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import FakeClock, closed_port, make_settings
from support.api import Api, bearer, expect_error, running_api

from referral_grpc.domain.errors import ResourceExhausted
from referral_grpc.domain.validation import (
    MAX_CODE_INPUT_LENGTH,
    MAX_EMAIL_LENGTH,
    MAX_PAGE_TOKEN_LENGTH,
    MAX_PASSWORD_LENGTH,
    MAX_TOKEN_LENGTH,
)
from referral_grpc.gen import auth_service_pb2 as auth_pb
from referral_grpc.gen import referral_service_pb2 as ref_pb
from referral_grpc.infra.breaker import CircuitBreaker
from referral_grpc.infra.throttle import THROTTLED_REASON, Rule, Throttle
from referral_grpc.store.models import ALL_MODELS, PasswordResetToken, User

PASSWORD = "correct horse battery"
FULLWIDTH_ILOVEYOU = "".join(chr(ord(ch) + 0xFEE0) for ch in "iloveyou")  # NFKC folds it back
COMMON_PASSWORDS = Path(__file__).parents[1] / "referral_grpc" / "domain" / "data" / "common-passwords.txt"
# The `api` fixture's server: SQLite unless a test says otherwise, and no reset padding (only the
# reset timing tests measure it).
pytestmark = [pytest.mark.databases("sqlite"), pytest.mark.api_settings(reset_request_min_seconds=0)]


def login(api: Api, email: str, password: str = PASSWORD) -> auth_pb.AuthTokens:
    tokens: auth_pb.AuthTokens = api.auth.Login(auth_pb.LoginRequest(email=email, password=password))
    return tokens


def request_reset(api: Api, email: str) -> auth_pb.RequestPasswordResetResponse:
    response: auth_pb.RequestPasswordResetResponse = api.auth.RequestPasswordReset(
        auth_pb.RequestPasswordResetRequest(email=email)
    )
    return response


def lookup(api: Api, email: str) -> ref_pb.GetReferralCodeByEmailResponse:
    found: ref_pb.GetReferralCodeByEmailResponse = api.referrals.GetReferralCodeByEmail(
        ref_pb.GetReferralCodeByEmailRequest(email=email)
    )
    return found


def row_counts() -> dict[str, int]:
    return {model.__name__: model.select().count() for model in ALL_MODELS}


# --- failed logins ---------------------------------------------------------------------------


def test_failed_logins_are_throttled_per_account_and_alike_for_unknown_emails(
    api: Api, clock: FakeClock
) -> None:
    api.register("victim@example.com")
    api.register("bystander@example.com")
    throttled = []
    for email in ("victim@example.com", "nobody@example.com"):
        for _ in range(5):
            assert expect_error(login, api, email, "wrong guess!").code == grpc.StatusCode.UNAUTHENTICATED
        # The sixth attempt is refused before the password is looked at: even the right one.
        throttled.append(expect_error(login, api, email, PASSWORD))
    for err in throttled:
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.reason == THROTTLED_REASON
        assert err.retry_delay == 900
    assert throttled[0].message == throttled[1].message
    # The counter is the account's, whatever the letter case; other accounts are untouched.
    assert expect_error(login, api, "VICTIM@Example.com").code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert login(api, "bystander@example.com").user_id

    clock.advance(minutes=10)
    assert expect_error(login, api, "victim@example.com").retry_delay == 300
    clock.advance(minutes=5)
    assert login(api, "victim@example.com").user_id


def test_a_successful_login_clears_the_failure_count(api: Api) -> None:
    """The policy limits consecutive failures (NIST SP 800-63B 5.2.2)."""
    api.register("typo@example.com")
    for _ in range(2):
        for _ in range(4):
            expect_error(login, api, "typo@example.com", "fat fingers")
        assert login(api, "typo@example.com").user_id
    for _ in range(5):
        expect_error(login, api, "typo@example.com", "fat fingers")
    assert expect_error(login, api, "typo@example.com").code == grpc.StatusCode.RESOURCE_EXHAUSTED


def lock_out(api: Api, email: str) -> None:
    """What anyone who knows the address can do: five wrong guesses, and the right password is refused."""
    for _ in range(5):
        assert expect_error(login, api, email, "wrong guess!").code == grpc.StatusCode.UNAUTHENTICATED
    assert expect_error(login, api, email).code == grpc.StatusCode.RESOURCE_EXHAUSTED


def login_with_proof(api: Api, email: str, proof: str, password: str = PASSWORD) -> auth_pb.AuthTokens:
    tokens: auth_pb.AuthTokens = api.auth.Login(
        auth_pb.LoginRequest(email=email, password=password), metadata=(("x-refresh-token", proof),)
    )
    return tokens


def test_a_completed_password_reset_ends_a_lockout(api: Api) -> None:
    api.register("locked@example.com")
    lock_out(api, "locked@example.com")
    request_reset(api, "locked@example.com")
    token = api.reset_token_for("locked@example.com")
    api.auth.ResetPassword(auth_pb.ResetPasswordRequest(token=token, new_password="a fresh passphrase"))
    assert login(api, "locked@example.com", "a fresh passphrase").user_id


def test_a_client_holding_a_live_session_signs_in_through_a_lockout(api: Api) -> None:
    registered = api.register("owner@example.com")
    session = api.auth.RefreshToken(auth_pb.RefreshTokenRequest(refresh_token=registered.refresh_token))
    signed_out = login(api, "owner@example.com")
    api.auth.Logout(
        auth_pb.LogoutRequest(refresh_token=signed_out.refresh_token),
        metadata=bearer(signed_out.access_token),
    )
    other = api.register("other@example.com")
    lock_out(api, "owner@example.com")
    # Proofs that prove nothing: a rotated or revoked token, another account's, a made-up one.
    for proof in (registered.refresh_token, signed_out.refresh_token, other.refresh_token, "made-up"):
        refused = expect_error(login_with_proof, api, "owner@example.com", proof)
        assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The owner's device still holds a live refresh token: the right password goes through.
    assert login_with_proof(api, "owner@example.com", session.refresh_token).user_id == session.user_id
    # And the anonymous count is gone with it.
    assert login(api, "owner@example.com").user_id == session.user_id


def test_guesses_with_a_stolen_session_are_still_throttled(api: Api) -> None:
    """A proof moves the count to the token's family, it does not switch counting off."""
    stolen = api.register("robbed@example.com").refresh_token
    for _ in range(5):
        wrong = expect_error(login_with_proof, api, "robbed@example.com", stolen, "wrong guess!")
        assert wrong.code == grpc.StatusCode.UNAUTHENTICATED
    refused = expect_error(login_with_proof, api, "robbed@example.com", stolen)
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Rotating the token keeps its family and so its count.
    rotated = api.auth.RefreshToken(auth_pb.RefreshTokenRequest(refresh_token=stolen)).refresh_token
    assert expect_error(login_with_proof, api, "robbed@example.com", rotated).code == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    # Anonymous logins were never counted: the owner without a token is not locked out by the thief.
    assert login(api, "robbed@example.com").user_id


def test_invalid_login_input_is_rejected_without_counting(api: Api) -> None:
    api.register("careful@example.com")
    for _ in range(10):
        assert expect_error(login, api, "careful@example.com", "").code == grpc.StatusCode.INVALID_ARGUMENT
    assert login(api, "careful@example.com").user_id


def test_change_password_guesses_share_the_login_throttle(api: Api) -> None:
    tokens = api.register("stolen@example.com")
    change = api.auth.ChangePassword
    for _ in range(5):
        wrong = expect_error(
            change,
            auth_pb.ChangePasswordRequest(
                current_password="a guess at it", new_password="a fresh passphrase"
            ),
            metadata=bearer(tokens.access_token),
        )
        assert wrong.reason == "WRONG_PASSWORD"
    refused = expect_error(
        change,
        auth_pb.ChangePasswordRequest(current_password=PASSWORD, new_password="a fresh passphrase"),
        metadata=bearer(tokens.access_token),
    )
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert expect_error(login, api, "stolen@example.com").code == grpc.StatusCode.RESOURCE_EXHAUSTED


# --- password reset requests and lookups ------------------------------------------------------


def test_reset_requests_are_throttled_alike_for_known_and_unknown_emails(api: Api, clock: FakeClock) -> None:
    api.register("forgetful@example.com")
    refusals = []
    for email in ("forgetful@example.com", "stranger@example.com"):
        for _ in range(3):
            assert request_reset(api, email) == auth_pb.RequestPasswordResetResponse()
        refusals.append(expect_error(request_reset, api, email))
    assert [(e.code, e.reason, e.message, e.retry_delay) for e in refusals] == [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, THROTTLED_REASON, refusals[0].message, 3600)
    ] * 2
    # The mailbox got three links, not one per request.
    assert len(api.outbox("password_reset")) == 3
    clock.advance(hours=1)
    request_reset(api, "forgetful@example.com")
    assert len(api.outbox("password_reset")) == 4


# --- the throttle's storage: Redis shared, process memory when Redis fails ---------------------


RULE = Rule("test", limit=3, window=60)


def hits_allowed(throttle: Throttle, key: str, attempts: int) -> int:
    allowed = 0
    for _ in range(attempts):
        try:
            throttle.hit(RULE, key)
            allowed += 1
        except ResourceExhausted:
            pass
    return allowed


def redis_throttle(url: str, clock: FakeClock, **overrides: Any) -> Throttle:
    """A throttle built as the server builds it: from settings, with their short Redis timeouts."""
    breaker = overrides.pop("breaker", None)
    return Throttle.from_settings(make_settings(redis_url=url, **overrides), clock, breaker=breaker)


def test_counts_are_shared_through_redis_and_every_key_expires(
    redis_url: str, redis_client: redis.Redis, key_prefix: str
) -> None:
    clock = FakeClock()
    # Two throttles on one Redis: two server processes.
    first, second = (redis_throttle(redis_url, clock, redis_key_prefix=key_prefix) for _ in range(2))
    assert hits_allowed(first, "shared@example.com", 2) == 2
    assert hits_allowed(second, "shared@example.com", 2) == 1
    with pytest.raises(ResourceExhausted):
        first.hit(RULE, "shared@example.com")
    keys = list(redis_client.scan_iter(match=f"{key_prefix}*"))
    assert len(keys) == 1
    assert b"shared" not in keys[0]  # emails are hashed in key names
    assert 0 < redis_client.pttl(keys[0]) <= 60_000
    clock.advance(seconds=60)
    assert hits_allowed(second, "shared@example.com", 1) == 1
    first.close()
    second.close()


def test_a_clear_in_one_process_clears_the_count_for_all(redis_url: str, key_prefix: str) -> None:
    clock = FakeClock()
    first, second = (redis_throttle(redis_url, clock, redis_key_prefix=key_prefix) for _ in range(2))
    assert hits_allowed(second, "roaming@example.com", 2) == 2
    first.clear(RULE, "roaming@example.com")  # a successful login served by the other process
    assert hits_allowed(second, "roaming@example.com", 4) == 3
    first.close()
    second.close()


def test_throttle_keeps_counting_in_memory_when_redis_is_down() -> None:
    throttle = redis_throttle(f"redis://127.0.0.1:{closed_port()}/0", FakeClock())
    started = time.monotonic()
    assert hits_allowed(throttle, "down@example.com", 20) == 3
    assert time.monotonic() - started < 1.0
    throttle.close()


class Blackhole:
    """A TCP server that accepts connections and never answers: Redis hung, not down."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def test_throttle_keeps_counting_in_memory_when_redis_hangs() -> None:
    hole = Blackhole()
    try:
        throttle = redis_throttle(
            f"redis://127.0.0.1:{hole.port}/0",
            FakeClock(),
            redis_socket_timeout=0.05,
            breaker=CircuitBreaker(3, reset_after=60),
        )
        started = time.monotonic()
        assert hits_allowed(throttle, "hung@example.com", 20) == 3
        # Three timeouts open the breaker; after that Redis is not waited for at all.
        assert time.monotonic() - started < 1.0
        throttle.close()
    finally:
        hole.close()


class SwitchableProxy:
    """A TCP proxy to the real Redis that the test can cut (connections reset) and restore."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.up = True
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            sock.close()

    def cut(self) -> None:
        self.up = False
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.conns.clear()

    def close(self) -> None:
        self.cut()
        self.sock.close()


def test_attempts_counted_during_an_outage_still_count_when_redis_returns(
    redis_url: str, redis_client: redis.Redis, key_prefix: str
) -> None:
    proxy = SwitchableProxy(urlparse(redis_url).port or 6379)
    throttle = redis_throttle(
        f"redis://127.0.0.1:{proxy.port}/0",
        FakeClock(),
        redis_key_prefix=key_prefix,
        redis_socket_timeout=0.5,
        # reset_after=0: every call after a failure probes Redis again at once.
        breaker=CircuitBreaker(1, reset_after=0.0),
    )
    try:
        throttle.hit(RULE, "flappy@example.com")
        proxy.cut()
        throttle.hit(RULE, "flappy@example.com")
        throttle.hit(RULE, "flappy@example.com")
        proxy.up = True
        # Redis has counted 2 attempts (before and after the outage), plus the 2 it missed: 4 > 3.
        with pytest.raises(ResourceExhausted):
            throttle.hit(RULE, "flappy@example.com")
        assert len(list(redis_client.scan_iter(match=f"{key_prefix}*"))) == 1  # Redis is in use again
    finally:
        throttle.close()
        proxy.close()


# --- RequestPasswordReset timing ---------------------------------------------------------------


class SlowDispatch:
    """A dispatcher that takes `seconds` on the fake clock: the extra work of the known-email path."""

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        self.clock = clock
        self.seconds = seconds

    def dispatch(self, outbox_ids: Sequence[int]) -> None:
        self.clock.advance(seconds=self.seconds)

    def flush(self, timeout: float) -> bool:
        return True


def test_reset_request_padding_runs_on_the_injected_clock(
    sqlite_url: str, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Far above what the test may take on the wall clock: only the fake clock can have slept this long.
    floor = 5.0
    slow = SlowDispatch(clock, seconds=2.0)
    overrides = {"reset_request_min_seconds": floor, "reset_max_requests": 1000}
    with running_api(
        make_settings(database_url=sqlite_url, **overrides), clock=clock, dispatcher=slow
    ) as api:
        api.register("registered@example.com")

        def fake_duration(email: str) -> float:
            started = clock.monotonic()
            assert request_reset(api, email) == auth_pb.RequestPasswordResetResponse()
            return clock.monotonic() - started

        # Known: 2 s of work and 3 s of padding; unknown: no work and 5 s of padding.
        assert fake_duration("registered@example.com") == pytest.approx(floor)
        assert fake_duration("unregistered@example.com") == pytest.approx(floor)
        assert "over RESET_REQUEST_MIN_SECONDS" not in caplog.text

        # Work longer than the floor gets no padding on top, and a warning.
        slow.seconds = 7.0
        assert fake_duration("registered@example.com") == pytest.approx(7.0)
        assert "over RESET_REQUEST_MIN_SECONDS" in caplog.text
        assert PasswordResetToken.select().count() == 2


def test_reset_request_timing_does_not_reveal_registered_emails(pg_url: str) -> None:
    floor = 0.04
    overrides = {"reset_request_min_seconds": floor, "reset_max_requests": 1000}
    # The wall-clock latency a client measures: the system clock, as in production.
    with running_api(make_settings(database_url=pg_url, **overrides)) as api:
        api.register("registered@example.com")
        emails = ["registered@example.com", "unregistered@example.com"]
        for email in emails:  # warm-up: connections, statement caches
            request_reset(api, email)
        samples: dict[str, list[float]] = {email: [] for email in emails}
        for _ in range(20):
            for email in emails:
                started = time.perf_counter()
                assert request_reset(api, email) == auth_pb.RequestPasswordResetResponse()
                samples[email].append(time.perf_counter() - started)
        known, unknown = (statistics.median(samples[email]) for email in emails)
        assert PasswordResetToken.select().count() == 21  # the known path really did its writes
    print(f"reset medians: known {known * 1000:.2f} ms, unknown {unknown * 1000:.2f} ms")
    assert known >= floor and unknown >= floor
    assert abs(known - unknown) < 0.002


# --- passwords -------------------------------------------------------------------------------


def test_the_shipped_common_password_list_is_usable() -> None:
    entries = COMMON_PASSWORDS.read_text(encoding="utf-8").splitlines()
    assert len(entries) > 8000
    assert all(8 <= len(p) <= MAX_PASSWORD_LENGTH and p == p.lower() and p.isprintable() for p in entries)
    assert {"password", "iloveyou", "qwertyuiop", "password1"} <= set(entries)


@pytest.mark.parametrize(
    "password", ["password1", "PassWord1", "QWERTYUIOP", FULLWIDTH_ILOVEYOU, " trustno1 "]
)
def test_common_passwords_are_refused_in_any_case(api: Api, password: str) -> None:
    err = expect_error(api.register, "common@example.com", password)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.reason == "PASSWORD_TOO_COMMON"
    assert set(err.fields) == {"password"}
    assert row_counts()["User"] == 0


def test_common_passwords_are_refused_on_change_and_reset(api: Api) -> None:
    tokens = api.register("changer@example.com")
    changed = expect_error(
        api.auth.ChangePassword,
        auth_pb.ChangePasswordRequest(current_password=PASSWORD, new_password="Sunshine1"),
        metadata=bearer(tokens.access_token),
    )
    request_reset(api, "changer@example.com")
    reset = expect_error(
        api.auth.ResetPassword,
        auth_pb.ResetPasswordRequest(
            token=api.reset_token_for("changer@example.com"), new_password="baseball"
        ),
    )
    for err in (changed, reset):
        assert err.reason == "PASSWORD_TOO_COMMON"
        assert set(err.fields) == {"new_password"}
    assert login(api, "changer@example.com").user_id


@pytest.mark.parametrize(
    "passphrase",
    [
        "x" * MAX_PASSWORD_LENGTH,
        "the quick brown fox jumps over the lazy dog, twice, and then naps " + "z" * 62,
        "密码是一句很长的话",
        "🔑🐉🌊🔥 emoji only is fine 🎉",
        "עברית ללא תווי כיוון, right to left",
        "e\u0301e\u0301e\u0301e\u0301 combining accents",
        "a family \U0001f468\u200d\U0001f469\u200d\U0001f467 joined by zero-width joiners",
        "\u0643\u0627\u0631\u200c\u0628\u0631 with a zero-width non-joiner",
    ],
)
def test_long_and_unicode_passphrases_are_accepted(api: Api, passphrase: str) -> None:
    assert len(passphrase) <= MAX_PASSWORD_LENGTH
    api.register("unicode@example.com", passphrase)
    assert login(api, "unicode@example.com", passphrase).user_id


def test_nfc_and_nfd_typings_of_a_password_are_one_password(api: Api) -> None:
    composed = unicodedata.normalize("NFC", "Crème brûlée à la façon de Zoë")
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    api.register("nfc@example.com", composed)
    assert login(api, "nfc@example.com", decomposed).user_id
    api.register("nfd@example.com", decomposed)
    assert login(api, "nfd@example.com", composed).user_id
    # Compatibility forms too: full-width letters are the ASCII ones.
    api.register("ascii@example.com", "plain ascii passphrase")
    fullwidth = "".join(chr(ord(ch) + 0xFEE0) if ch != " " else ch for ch in "plain ascii passphrase")
    assert login(api, "ascii@example.com", fullwidth).user_id


def test_passwords_hashed_before_normalisation_still_work(api: Api) -> None:
    """Hashes written before NFKC are of the password as typed: an NFD typist keeps their account."""
    decomposed = unicodedata.normalize("NFD", "Crème brûlée à la façon de Zoë")
    user_id = api.register("legacy@example.com", "placeholder passphrase").user_id
    pepper = api.app.settings.password_pepper.encode()
    prehash = base64.b64encode(hmac.new(pepper, decomposed.encode(), hashlib.sha256).digest())
    legacy_hash = bcrypt.hashpw(prehash, bcrypt.gensalt(4)).decode()
    User.update(password_hash=legacy_hash).where(User.id == user_id).execute()
    assert login(api, "legacy@example.com", decomposed).user_id == user_id
    assert expect_error(login, api, "legacy@example.com", "Creme brulee a la facon de Zoe").code == (
        grpc.StatusCode.UNAUTHENTICATED
    )


@pytest.mark.parametrize(
    "password",
    [
        " " * 12,
        "\u3000" * 10,  # ideographic spaces
        "\u200b" * 10,  # zero-width spaces
        "\u3164" * 10,  # Hangul fillers: letters that show nothing
        " \u00a0\u2003\u200b\u2060\ufeff\u0301\u0301 ",
        "first line\nsecond line",
        "carriage\rreturn inside",
        "red \x1b[31m escape",
        "tab\tseparated words",
        "hidden \u202e bidi override",
        "isolate \u2066 inside\u2069 here",
        "unassigned \U000e0fff code point",
    ],
)
def test_blank_and_control_character_passwords_are_refused(api: Api, password: str) -> None:
    err = expect_error(api.register, "blank@example.com", password)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.reason == "PASSWORD_INVALID"
    assert set(err.fields) == {"password"}
    assert row_counts()["User"] == 0


# --- length bounds and control characters ------------------------------------------------------


def email_of_length(n: int) -> str:
    """A syntactically valid address of exactly n characters (n >= 70): 64-character local part."""
    domain_len = n - 65
    labels = []
    while domain_len > 67:
        labels.append("b" * 63)
        domain_len -= 64
    labels.append("c" * (domain_len - 4) + ".com")
    address = "a" * 64 + "@" + ".".join(labels)
    assert len(address) == n
    return address


TOKEN = "A" * 43  # the shape of our tokens: 32 random bytes, URL-safe base64


@dataclass(frozen=True)
class Field:
    rpc: str
    field: str
    maximum: int
    build: Callable[[str], Any]
    authenticated: bool = False


FIELDS = [
    Field(
        "Register", "email", MAX_EMAIL_LENGTH, lambda v: auth_pb.RegisterRequest(email=v, password=PASSWORD)
    ),
    Field(
        "Register",
        "password",
        MAX_PASSWORD_LENGTH,
        lambda v: auth_pb.RegisterRequest(email="n@x.io", password=v),
    ),
    Field(
        "Register",
        "referral_code",
        MAX_CODE_INPUT_LENGTH,
        lambda v: auth_pb.RegisterRequest(email="n@x.io", password=PASSWORD, referral_code=v),
    ),
    Field("Login", "email", MAX_EMAIL_LENGTH, lambda v: auth_pb.LoginRequest(email=v, password=PASSWORD)),
    Field(
        "Login", "password", MAX_PASSWORD_LENGTH, lambda v: auth_pb.LoginRequest(email="n@x.io", password=v)
    ),
    Field(
        "RefreshToken",
        "refresh_token",
        MAX_TOKEN_LENGTH,
        lambda v: auth_pb.RefreshTokenRequest(refresh_token=v),
    ),
    Field(
        "Logout", "refresh_token", MAX_TOKEN_LENGTH, lambda v: auth_pb.LogoutRequest(refresh_token=v), True
    ),
    Field(
        "RequestPasswordReset",
        "email",
        MAX_EMAIL_LENGTH,
        lambda v: auth_pb.RequestPasswordResetRequest(email=v),
    ),
    Field(
        "ResetPassword",
        "token",
        MAX_TOKEN_LENGTH,
        lambda v: auth_pb.ResetPasswordRequest(token=v, new_password=PASSWORD),
    ),
    Field(
        "ResetPassword",
        "new_password",
        MAX_PASSWORD_LENGTH,
        lambda v: auth_pb.ResetPasswordRequest(token=TOKEN, new_password=v),
    ),
    Field(
        "ChangePassword",
        "current_password",
        MAX_PASSWORD_LENGTH,
        lambda v: auth_pb.ChangePasswordRequest(current_password=v, new_password="another passphrase"),
        True,
    ),
    Field(
        "ChangePassword",
        "new_password",
        MAX_PASSWORD_LENGTH,
        lambda v: auth_pb.ChangePasswordRequest(current_password=PASSWORD, new_password=v),
        True,
    ),
    Field(
        "GetReferralCodeByEmail",
        "email",
        MAX_EMAIL_LENGTH,
        lambda v: ref_pb.GetReferralCodeByEmailRequest(email=v),
    ),
    Field(
        "ListReferrals",
        "page_token",
        MAX_PAGE_TOKEN_LENGTH,
        lambda v: ref_pb.ListReferralsRequest(page_token=v),
        True,
    ),
]

# Which fields refuse which control characters. A password being set refuses them all, as every
# identifier and token does; one being checked refuses only NUL, which no stored password contains
# (accounts from before the rule may have an ESC in theirs).
CONTROL_CHARACTERS = ["\x00", "\x1b", "\u202e"]
PASSWORD_FIELDS = {"password", "new_password", "current_password"}
NEW_PASSWORDS = {
    ("Register", "password"),
    ("ResetPassword", "new_password"),
    ("ChangePassword", "new_password"),
}


def too_long(field: Field) -> str:
    if field.field == "email":
        return email_of_length(field.maximum + 1)
    return "x" * (field.maximum + 1)


def with_control(field: Field, ch: str) -> str:
    if field.field == "email":
        return f"al{ch}ice@example.com"
    if field.field == "referral_code":
        return f"ABCDE{ch}FGHJ"
    if field.field in PASSWORD_FIELDS:
        return f"a long enough {ch} passphrase"
    return TOKEN[:20] + ch + TOKEN[20:]


def rejected_inputs() -> list[tuple[Field, str, str]]:
    cases = [(f, "max+1", too_long(f)) for f in FIELDS]
    for f in FIELDS:
        for ch in CONTROL_CHARACTERS:
            if f.field not in PASSWORD_FIELDS or (f.rpc, f.field) in NEW_PASSWORDS or ch == "\x00":
                cases.append((f, repr(ch), with_control(f, ch)))
    return cases


def stub_for(api: Api, rpc: str) -> Any:
    return getattr(api.auth, rpc, None) or getattr(api.referrals, rpc)


@pytest.mark.databases("postgres", "sqlite")
def test_every_string_field_is_bounded_and_refuses_control_characters(api: Api) -> None:
    token = api.register("bounds@example.com").access_token
    before = row_counts()
    for field, label, value in rejected_inputs():
        metadata = bearer(token) if field.authenticated else ()
        err = expect_error(stub_for(api, field.rpc), field.build(value), metadata=metadata)
        where = f"{field.rpc}.{field.field} {label}"
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT, where
        assert list(err.fields) == [field.field], where
        assert err.reason, where
        assert row_counts() == before, where


def test_documented_maximum_lengths_are_accepted(api: Api) -> None:
    assert api.register(email_of_length(MAX_EMAIL_LENGTH), "p" * MAX_PASSWORD_LENGTH).user_id
    assert login(api, email_of_length(MAX_EMAIL_LENGTH), "p" * MAX_PASSWORD_LENGTH).user_id
    # A 32-character code is a malformed code, not a too-long field.
    err = expect_error(api.register, "code@example.com", PASSWORD, "A" * MAX_CODE_INPUT_LENGTH)
    assert err.reason == "REFERRAL_CODE_UNKNOWN"
    refresh = expect_error(
        api.auth.RefreshToken, auth_pb.RefreshTokenRequest(refresh_token="t" * MAX_TOKEN_LENGTH)
    )
    assert refresh.code == grpc.StatusCode.UNAUTHENTICATED


def test_no_input_makes_the_server_fail(api: Api) -> None:
    """Arbitrary text in every string field: errors are always ones a client can act on."""
    token = api.register("fuzz@example.com").access_token
    texts = st.one_of(st.text(max_size=40), st.text(min_size=100, max_size=600), st.just("x" * 70_000))
    calls = [
        lambda a, b, c: api.auth.Register(auth_pb.RegisterRequest(email=a, password=b, referral_code=c)),
        lambda a, b, c: api.auth.Login(auth_pb.LoginRequest(email=a, password=b)),
        lambda a, b, c: api.auth.RefreshToken(auth_pb.RefreshTokenRequest(refresh_token=a)),
        lambda a, b, c: api.auth.Logout(auth_pb.LogoutRequest(refresh_token=a), metadata=bearer(token)),
        lambda a, b, c: api.auth.RequestPasswordReset(auth_pb.RequestPasswordResetRequest(email=a)),
        lambda a, b, c: api.auth.ResetPassword(auth_pb.ResetPasswordRequest(token=a, new_password=b)),
        lambda a, b, c: api.auth.ChangePassword(
            auth_pb.ChangePasswordRequest(current_password=a, new_password=b), metadata=bearer(token)
        ),
        lambda a, b, c: api.referrals.GetReferralCodeByEmail(ref_pb.GetReferralCodeByEmailRequest(email=a)),
        lambda a, b, c: api.referrals.ListReferrals(
            ref_pb.ListReferralsRequest(page_token=a, page_size=len(b) - 3), metadata=bearer(token)
        ),
        # Metadata values are printable ASCII by the gRPC spec: the client refuses anything else.
        lambda a, b, c: api.referrals.ListReferrals(
            ref_pb.ListReferralsRequest(),
            metadata=(("authorization", "".join(x for x in b if " " <= x <= "~")),),
        ),
    ]

    @settings(
        max_examples=250,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.sampled_from(range(len(calls))), texts, texts, texts)
    def call_anything(which: int, a: str, b: str, c: str) -> None:
        try:
            calls[which](a, b, c)
        except grpc.RpcError as err:
            assert err.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
                which,
                err.details(),
            )

    call_anything()


def test_length_bounds_count_surrounding_spaces(api: Api) -> None:
    """The documented maximum is on the field as sent: padding cannot smuggle in a longer value."""
    spaced_code = expect_error(api.register, "pad@example.com", "correct horse battery", " " * 33)
    assert spaced_code.code == grpc.StatusCode.INVALID_ARGUMENT and "referral_code" in spaced_code.fields
    longest = "a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 57 + ".com"
    assert len(longest) == 254
    padded = expect_error(api.register, longest + " ", "correct horse battery")
    assert padded.code == grpc.StatusCode.INVALID_ARGUMENT and "email" in padded.fields
    assert User.select().count() == 0
    assert api.register(longest, "correct horse battery").user_id  # the bound itself is fine
