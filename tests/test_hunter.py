"""HunterVerifier against a real loopback HTTP server: policy, failure modes, timeouts, breaker, re-check.

The trickling tests also run the real server over a real channel: a Hunter that answers one byte at a
time must not hold Register past its cap, nor take the threads Login and reset requests need.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import peewee as pw
import pytest
from support import FakeClock, closed_port, make_settings
from support.api import Api, running_api
from support.hunter import HunterStub

from referral_grpc.domain.ports import EmailVerification, NoEmailVerification
from referral_grpc.gen import auth_service_pb2 as auth_pb
from referral_grpc.infra.breaker import CircuitBreaker
from referral_grpc.infra.hunter import (
    DEFAULT_FAILURE_THRESHOLD,
    ERROR_RESULT,
    MAX_BODY_BYTES,
    HunterVerifier,
    make_email_verifier,
    recheck_user_email,
    users_needing_recheck,
)
from referral_grpc.request_context import request_deadline
from referral_grpc.settings import ConfigError, Settings
from referral_grpc.store.database import init_database
from referral_grpc.store.migrate import run_migrations
from referral_grpc.store.models import User

API_KEY = "stub-hunter-key-7f3a9c41d2"
# The timeout tests use short timeouts to stay fast; everything else keeps the defaults
# (1 s / 2 s), so a loaded machine cannot turn a slow success into a failure.
SHORT_TIMEOUT = 0.3
SHORT_TIMEOUTS = {"hunter_connect_timeout": SHORT_TIMEOUT, "hunter_read_timeout": SHORT_TIMEOUT}
# Loopback plus a busy 2-core machine: generous headroom over the configured timeout.
SLACK = 0.7


@pytest.fixture
def stub() -> Iterator[HunterStub]:
    with HunterStub(api_key=API_KEY) as server:
        yield server


def hunter_settings(url: str, **overrides: object) -> Settings:
    return make_settings(**{"hunter_url": url, "hunter_api_key": API_KEY, **overrides})


@pytest.fixture
def make_verifier(stub: HunterStub) -> Iterator[Callable[..., HunterVerifier]]:
    made: list[HunterVerifier] = []

    def make(breaker: CircuitBreaker | None = None, **overrides: object) -> HunterVerifier:
        verifier = HunterVerifier(hunter_settings(stub.url, **overrides), breaker=breaker)
        made.append(verifier)
        return verifier

    yield make
    for verifier in made:
        verifier.close()


def counted(verifier: HunterVerifier) -> dict[str, int]:
    """The verify() results seen so far, without the zeros."""
    return {result: n for result, n in verifier.results().items() if n}


def timed(verifier: HunterVerifier, email: str) -> tuple[EmailVerification, float]:
    started = time.monotonic()
    result = verifier.verify(email)
    return result, time.monotonic() - started


# --- policy -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "accepted"),
    [
        ("valid", True),
        ("invalid", False),
        ("accept_all", True),
        # The old system turned gmail users away as "webmail": they are real people.
        ("webmail", True),
        ("disposable", False),
        ("unknown", True),
    ],
)
def test_hunter_status_decides_the_signup(
    stub: HunterStub, make_verifier: Callable[..., HunterVerifier], status: str, accepted: bool
) -> None:
    stub.set_answer("someone@gmail.com", status)
    result = make_verifier().verify("someone@gmail.com")
    assert result == EmailVerification(status=status, accepted=accepted, checked=True)
    assert stub.request_count == 1


def test_disposable_is_accepted_when_configured(
    stub: HunterStub, make_verifier: Callable[..., HunterVerifier]
) -> None:
    stub.set_default("disposable")
    result = make_verifier(hunter_reject_disposable="false").verify("x@mailinator.com")
    assert result == EmailVerification(status="disposable", accepted=True, checked=True)


def test_answers_are_per_email(stub: HunterStub, make_verifier: Callable[..., HunterVerifier]) -> None:
    stub.set_default("valid")
    stub.set_answer("bad@example.com", "invalid")
    verifier = make_verifier()
    assert verifier.verify("bad@example.com").accepted is False
    assert verifier.verify("good@example.com").accepted is True


# --- failures: the signup proceeds, the address is re-checked later -------------------------------


@pytest.mark.parametrize(
    ("answer", "counted_as"),
    [
        pytest.param({"http_status": 429}, "http_429", id="429-rate-limited"),
        pytest.param({"http_status": 403}, "error", id="403-forbidden"),
        pytest.param({"http_status": 402}, "error", id="402-no-credits"),
        pytest.param({"http_status": 500}, "5xx", id="500"),
        pytest.param({"http_status": 503, "body": "<html>bad gateway</html>"}, "5xx", id="503-html"),
        pytest.param({"body": b'{"data": {"status": "valid"'}, "error", id="malformed-json"),
        pytest.param({"body": b"\xff\xfe not json"}, "error", id="binary-garbage"),
        pytest.param({"body": b""}, "error", id="empty-body"),
        pytest.param({"body": b'["valid"]'}, "error", id="json-list"),
        pytest.param({"body": b'{"data": null}'}, "error", id="no-data"),
        pytest.param({"body": b'{"data": {"status": 1}}'}, "error", id="status-not-a-string"),
        pytest.param({"status": "mystery"}, "error", id="unknown-status"),
        pytest.param({"body": b" " * (MAX_BODY_BYTES + 1)}, "error", id="oversized-body"),
    ],
)
def test_unusable_answers_give_an_unchecked_pass(
    stub: HunterStub, make_verifier: Callable[..., HunterVerifier], answer: dict[str, object], counted_as: str
) -> None:
    stub.set_default(**answer)  # type: ignore[arg-type]
    verifier = make_verifier()
    result, elapsed = timed(verifier, "user@example.com")
    assert result == ERROR_RESULT == EmailVerification(status="error", accepted=True, checked=False)
    assert stub.request_count == 1
    assert elapsed < SLACK
    assert counted(verifier) == {counted_as: 1}


def test_wrong_api_key_gives_an_unchecked_pass(stub: HunterStub) -> None:
    verifier = HunterVerifier(hunter_settings(stub.url, hunter_api_key="not-the-right-key"))
    assert verifier.verify("user@example.com") == ERROR_RESULT
    assert stub.request_count == 1
    assert counted(verifier) == {"http_401": 1}
    verifier.close()


def test_connection_refused_gives_an_unchecked_pass_at_once() -> None:
    verifier = HunterVerifier(hunter_settings(f"http://127.0.0.1:{closed_port()}"))
    result, elapsed = timed(verifier, "user@example.com")
    assert result == ERROR_RESULT
    assert elapsed < SLACK
    assert counted(verifier) == {"error": 1}
    verifier.close()


def test_slow_answer_is_abandoned_at_the_read_timeout(
    stub: HunterStub, make_verifier: Callable[..., HunterVerifier]
) -> None:
    stub.set_default("valid", delay=5.0)
    result, elapsed = timed(make_verifier(**SHORT_TIMEOUTS), "user@example.com")
    assert result == ERROR_RESULT
    assert SHORT_TIMEOUT <= elapsed < SHORT_TIMEOUT + SLACK
    assert stub.request_count == 1


def test_unanswered_connect_is_abandoned_at_the_connect_timeout() -> None:
    # A listener whose accept queue is full: Linux drops further SYNs, so connect() hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.05)
    verifier = HunterVerifier(
        hunter_settings(f"http://127.0.0.1:{port}", hunter_connect_timeout=SHORT_TIMEOUT)
    )
    try:
        result, elapsed = timed(verifier, "user@example.com")
    finally:
        verifier.close()
        for filler in fillers:
            filler.close()
        listener.close()
    assert result == ERROR_RESULT
    assert SHORT_TIMEOUT <= elapsed < SHORT_TIMEOUT + SLACK


def test_default_timeouts_bound_a_hanging_hunter(stub: HunterStub) -> None:
    settings = make_settings(hunter_url=stub.url, hunter_api_key=API_KEY)
    assert (settings.hunter_connect_timeout, settings.hunter_read_timeout) == (1.0, 2.0)
    stub.set_default("valid", delay=10.0)
    verifier = HunterVerifier(settings)
    result, elapsed = timed(verifier, "user@example.com")
    verifier.close()
    assert result == ERROR_RESULT
    assert 2.0 <= elapsed < 2.0 + SLACK


def test_redirects_are_not_followed_so_the_key_stays_home(
    stub: HunterStub, make_verifier: Callable[..., HunterVerifier]
) -> None:
    with HunterStub() as elsewhere:
        stub.set_default(
            http_status=302, body=b"", headers={"Location": f"{elsewhere.url}/v2/email-verifier"}
        )
        assert make_verifier().verify("user@example.com") == ERROR_RESULT
        assert elsewhere.request_count == 0


def test_verify_never_raises_on_an_unencodable_address(
    stub: HunterStub, make_verifier: Callable[..., HunterVerifier], caplog: pytest.LogCaptureFixture
) -> None:
    verifier = make_verifier()
    with caplog.at_level(logging.ERROR, logger="referral_grpc.infra.hunter"):
        assert verifier.verify("\udc80@example.com") == ERROR_RESULT
    assert "unexpected error" in caplog.text
    assert counted(verifier) == {"error": 1}


# --- what goes over the wire ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "email",
    ["first+tag@example.com", "a&b=c@example.com", "o'neil%20x@example.com", "jöhn.dœ@exämple.com"],
)
def test_email_arrives_intact_and_key_travels_in_a_header(
    stub: HunterStub, make_verifier: Callable[..., HunterVerifier], email: str
) -> None:
    assert make_verifier().verify(email).status == "valid"
    [request] = stub.requests
    assert request.path == "/v2/email-verifier"
    assert request.query == {"email": [email]}
    assert request.headers["x-api-key"] == API_KEY
    assert "api_key" not in request.raw_query
    assert API_KEY not in request.raw_query


def test_plus_is_percent_encoded(stub: HunterStub, make_verifier: Callable[..., HunterVerifier]) -> None:
    make_verifier().verify("first+tag@example.com")
    # A bare "+" would be read back as a space by any form decoder.
    assert stub.requests[0].raw_query == "email=first%2Btag%40example.com"


def test_one_connection_is_kept_alive_per_thread(
    stub: HunterStub, make_verifier: Callable[..., HunterVerifier]
) -> None:
    verifier = make_verifier()
    for n in range(5):
        assert verifier.verify(f"user{n}@example.com").checked
    assert len({request.client for request in stub.requests}) == 1


def test_concurrent_verifications(stub: HunterStub, make_verifier: Callable[..., HunterVerifier]) -> None:
    stub.set_default("webmail", delay=0.02)
    verifier = make_verifier()
    results: list[EmailVerification] = []
    lock = threading.Lock()

    def work(thread: int) -> None:
        for n in range(5):
            result = verifier.verify(f"t{thread}.{n}@gmail.com")
            with lock:
                results.append(result)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [EmailVerification("webmail", True, True)] * 40
    assert stub.request_count == 40
    assert {request.email for request in stub.requests} == {
        f"t{t}.{n}@gmail.com" for t in range(8) for n in range(5)
    }
    assert counted(verifier) == {"ok": 40}


def test_the_key_and_the_address_never_reach_the_logs(
    stub: HunterStub, make_verifier: Callable[..., HunterVerifier], caplog: pytest.LogCaptureFixture
) -> None:
    verifier = make_verifier(**SHORT_TIMEOUTS)
    with caplog.at_level(logging.DEBUG):
        stub.set_answer("ok.person@example.com", "valid")
        stub.set_answer("failing.person@example.com", http_status=500)
        stub.set_answer("slow.person@example.com", delay=2.0)
        verifier.verify("ok.person@example.com")
        verifier.verify("failing.person@example.com")
        verifier.verify("slow.person@example.com")
    # urllib3 logs every request line at DEBUG: the key must not be in it.
    assert any(
        r.name.startswith("urllib3") and "/v2/email-verifier" in r.getMessage() for r in caplog.records
    )
    assert API_KEY not in caplog.text
    warnings = [r for r in caplog.records if r.name == "referral_grpc.infra.hunter"]
    assert len(warnings) == 2
    assert all("example.com" in r.getMessage() and "person" not in r.getMessage() for r in warnings)
    assert API_KEY not in repr(verifier)
    assert API_KEY not in repr(hunter_settings(stub.url))


# --- circuit breaker ------------------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_and_recovers(
    stub: HunterStub,
    make_verifier: Callable[..., HunterVerifier],
    caplog: pytest.LogCaptureFixture,
    clock: FakeClock,
) -> None:
    verifier = make_verifier(
        breaker=CircuitBreaker(failure_threshold=3, reset_after=30.0, monotonic=clock.monotonic)
    )
    caplog.set_level(logging.INFO, logger="referral_grpc.infra.hunter")
    stub.set_default(http_status=500)
    for _ in range(3):
        assert verifier.verify("user@example.com") == ERROR_RESULT
    assert stub.request_count == 3
    assert "3 consecutive failures; calls paused" in caplog.text
    caplog.clear()

    # Open: answered at once, nothing reaches Hunter.
    for _ in range(5):
        result, elapsed = timed(verifier, "user@example.com")
        assert result == ERROR_RESULT
        assert elapsed < 0.05
    assert stub.request_count == 3
    assert counted(verifier) == {"5xx": 3, "breaker_open": 5}
    assert verifier.breaker.is_open

    # Still open just before reset_after.
    clock.advance(seconds=29.9)
    assert verifier.verify("user@example.com") == ERROR_RESULT
    assert stub.request_count == 3

    # After reset_after one probe goes through; Hunter is back, so the breaker closes.
    clock.advance(seconds=0.2)
    stub.set_default("valid")
    assert verifier.verify("user@example.com") == EmailVerification("valid", True, True)
    assert stub.request_count == 4
    assert verifier.verify("other@example.com").status == "valid"
    assert stub.request_count == 5
    assert counted(verifier) == {"ok": 2, "5xx": 3, "breaker_open": 6}
    assert not verifier.breaker.is_open
    # Open and short-circuited calls log nothing each; recovery is said once.
    assert [r.getMessage() for r in caplog.records] == ["hunter: answering again; calls resumed"]


def test_failed_probe_opens_the_breaker_again(
    stub: HunterStub, make_verifier: Callable[..., HunterVerifier], clock: FakeClock
) -> None:
    verifier = make_verifier(
        breaker=CircuitBreaker(failure_threshold=2, reset_after=10.0, monotonic=clock.monotonic)
    )
    stub.set_default(http_status=429)
    verifier.verify("a@example.com")
    verifier.verify("a@example.com")
    clock.advance(seconds=10.0)
    assert verifier.verify("a@example.com") == ERROR_RESULT
    assert stub.request_count == 3
    # One failed probe is enough to re-open, for another full reset_after.
    assert verifier.verify("a@example.com") == ERROR_RESULT
    clock.advance(seconds=9.0)
    assert verifier.verify("a@example.com") == ERROR_RESULT
    assert stub.request_count == 3


def test_success_resets_the_failure_count(
    stub: HunterStub, make_verifier: Callable[..., HunterVerifier]
) -> None:
    verifier = make_verifier(breaker=CircuitBreaker(failure_threshold=3, reset_after=30.0))
    stub.set_answer("down@example.com", http_status=503)
    for _ in range(4):
        verifier.verify("down@example.com")
        verifier.verify("down@example.com")
        assert verifier.verify("up@example.com").checked
    assert stub.request_count == 12
    assert not verifier.breaker.is_open


@pytest.mark.parametrize("code", [202, 400, 451])
def test_no_verdict_for_one_address_does_not_trip_the_breaker(
    stub: HunterStub, make_verifier: Callable[..., HunterVerifier], code: int, clock: FakeClock
) -> None:
    breaker = CircuitBreaker(failure_threshold=2, reset_after=10.0, monotonic=clock.monotonic)
    verifier = make_verifier(breaker=breaker)
    stub.set_default(http_status=code)
    for _ in range(4):
        assert verifier.verify("slow.domain@example.com") == ERROR_RESULT
    assert stub.request_count == 4
    assert not breaker.is_open

    # Nor does it leave a half-open breaker stuck waiting for a verdict on its probe.
    stub.set_default(http_status=500)
    verifier.verify("a@example.com")
    verifier.verify("a@example.com")
    assert breaker.is_open
    clock.advance(seconds=10.0)
    stub.set_default(http_status=code)
    verifier.verify("a@example.com")
    assert not breaker.is_open
    assert stub.request_count == 7


def test_default_breaker_opens_after_the_default_threshold(
    stub: HunterStub, make_verifier: Callable[..., HunterVerifier]
) -> None:
    stub.set_default(http_status=500)
    verifier = make_verifier()
    for _ in range(DEFAULT_FAILURE_THRESHOLD + 3):
        verifier.verify("user@example.com")
    assert stub.request_count == DEFAULT_FAILURE_THRESHOLD
    assert verifier.breaker.is_open


# --- a Hunter that trickles: one byte at a time, each well within the read timeout ----------------

TOTAL = 0.5
# Each byte comes long before the 2 s read timeout: only a cap on the whole call ends the answer.
DRIP = 0.2


@pytest.mark.parametrize("trickle_headers", [False, True], ids=["body", "headers"])
def test_a_trickling_answer_is_cut_at_the_total_timeout(
    stub: HunterStub, make_verifier: Callable[..., HunterVerifier], trickle_headers: bool
) -> None:
    stub.set_default("valid", trickle=DRIP, trickle_headers=trickle_headers)
    verifier = make_verifier(hunter_total_timeout_seconds=TOTAL)
    result, elapsed = timed(verifier, "user@example.com")
    assert result == ERROR_RESULT
    assert TOTAL <= elapsed < TOTAL + SLACK
    assert counted(verifier) == {"timeout": 1}
    # The connection was closed, not left open with Hunter still talking into it.
    wait_for(lambda: len(stub.hangups) == 1)
    assert stub.hangups[0] < TOTAL + SLACK


def test_the_total_timeout_setting() -> None:
    assert Settings.from_env({}).hunter_total_timeout_seconds == 3.0
    assert Settings.from_env({"HUNTER_TOTAL_TIMEOUT_SECONDS": "1.5"}).hunter_total_timeout_seconds == 1.5
    for bad in ("0", "-1", "61", "soon"):
        with pytest.raises(ConfigError, match="HUNTER_TOTAL_TIMEOUT_SECONDS"):
            Settings.from_env({"HUNTER_TOTAL_TIMEOUT_SECONDS": bad})


def test_the_breaker_opens_after_repeated_timeouts(
    stub: HunterStub, make_verifier: Callable[..., HunterVerifier]
) -> None:
    breaker = CircuitBreaker(failure_threshold=2, reset_after=30.0, monotonic=FakeClock().monotonic)
    verifier = make_verifier(breaker=breaker, hunter_total_timeout_seconds=TOTAL)
    stub.set_default("valid", trickle=DRIP)
    verifier.verify("a@example.com")
    verifier.verify("b@example.com")
    assert breaker.is_open
    result, elapsed = timed(verifier, "c@example.com")
    assert result == ERROR_RESULT
    assert elapsed < 0.05
    assert stub.request_count == 2
    assert counted(verifier) == {"timeout": 2, "breaker_open": 1}


def test_the_request_deadline_bounds_the_call_without_charging_the_breaker(
    stub: HunterStub, make_verifier: Callable[..., HunterVerifier]
) -> None:
    breaker = CircuitBreaker(failure_threshold=2, reset_after=30.0, monotonic=FakeClock().monotonic)
    # HUNTER_TOTAL_TIMEOUT_SECONDS keeps its default, 3 s: the deadline is the tighter bound.
    verifier = make_verifier(breaker=breaker)
    stub.set_default("valid", trickle=DRIP)
    for _ in range(3):
        with request_deadline(1.0):
            result, elapsed = timed(verifier, "user@example.com")
        # Half of the time left: the signup keeps the rest to hash and commit.
        assert result == ERROR_RESULT
        assert 0.5 <= elapsed < 0.5 + SLACK
    # Clients in a hurry are no evidence against Hunter.
    assert not breaker.is_open
    assert counted(verifier) == {"timeout": 3}


def test_hunters_own_read_timeout_within_a_request_deadline_charges_the_breaker(
    stub: HunterStub, make_verifier: Callable[..., HunterVerifier]
) -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_after=30.0, monotonic=FakeClock().monotonic)
    verifier = make_verifier(breaker=breaker, **SHORT_TIMEOUTS)
    stub.set_default("valid", delay=5.0)
    # Hunter may take 2 s of this request, but its own read timeout ends the call first.
    with request_deadline(4.0):
        result, elapsed = timed(verifier, "user@example.com")
    assert result == ERROR_RESULT
    assert elapsed < SHORT_TIMEOUT + SLACK
    assert breaker.is_open


def test_no_call_when_the_request_has_no_time_left(
    stub: HunterStub, make_verifier: Callable[..., HunterVerifier]
) -> None:
    verifier = make_verifier()
    with request_deadline(0):
        result, elapsed = timed(verifier, "user@example.com")
    assert result == ERROR_RESULT
    assert elapsed < 0.05
    assert stub.request_count == 0
    assert counted(verifier) == {"timeout": 1}


def test_calls_beyond_the_concurrency_bound_proceed_at_once(
    stub: HunterStub, make_verifier: Callable[..., HunterVerifier]
) -> None:
    # One slot: half of two blocking threads.
    verifier = make_verifier(grpc_blocking_workers=2, hunter_total_timeout_seconds=2.0)
    stub.set_default("valid", trickle=DRIP)
    with futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(verifier.verify, "slow@example.com")
        wait_for(lambda: stub.in_flight == 1)
        result, elapsed = timed(verifier, "other@example.com")
        assert result == ERROR_RESULT
        assert elapsed < 0.05
        assert stub.request_count == 1
        assert slow.result() == ERROR_RESULT
    assert counted(verifier) == {"busy": 1, "timeout": 1}
    # The slot is free again.
    stub.set_default("valid")
    assert verifier.verify("later@example.com").checked


def test_close_cuts_the_calls_in_flight(stub: HunterStub) -> None:
    verifier = HunterVerifier(hunter_settings(stub.url, hunter_total_timeout_seconds=30.0))
    stub.set_default("valid", trickle=DRIP)
    with futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(timed, verifier, "user@example.com")
        wait_for(lambda: stub.in_flight == 1)
        verifier.close()
        result, elapsed = call.result(timeout=SLACK)
    assert result == ERROR_RESULT
    assert elapsed < 1.0 + SLACK


# --- switched off without a key -------------------------------------------------------------------


def test_without_a_key_verification_is_off_and_said_once(
    stub: HunterStub, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="referral_grpc.infra.hunter"):
        verifier = make_email_verifier(make_settings(hunter_url=stub.url))
        results = [verifier.verify(f"user{n}@example.com") for n in range(3)]
    assert isinstance(verifier, NoEmailVerification)
    assert results == [EmailVerification(status="unchecked", accepted=True, checked=False)] * 3
    assert stub.request_count == 0
    [record] = caplog.records
    assert record.levelno == logging.INFO
    assert "disabled" in record.getMessage()


def test_with_a_key_verification_is_on(stub: HunterStub, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="referral_grpc.infra.hunter"):
        verifier = make_email_verifier(hunter_settings(stub.url))
    assert isinstance(verifier, HunterVerifier)
    assert verifier.verify("user@example.com").checked
    assert API_KEY not in caplog.text
    verifier.close()


def test_hunter_verifier_refuses_to_run_without_a_key() -> None:
    with pytest.raises(ValueError, match="HUNTER_API_KEY"):
        HunterVerifier(make_settings())


# --- re-check -------------------------------------------------------------------------------------


@pytest.fixture
def db(database_url: str) -> Iterator[pw.Database]:
    database = init_database(make_settings(database_url=database_url))
    run_migrations(database)
    yield database
    if hasattr(database, "close_all"):
        database.close_all()
    else:
        database.close()


SIGNUP = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def make_user(email: str, *, recheck: bool) -> int:
    user = User.create(
        email=email,
        email_key=email.lower(),
        password_hash="not-a-real-hash",
        created_at=SIGNUP,
        email_status="error" if recheck else "valid",
        email_recheck=recheck,
    )
    return int(user.id)


@pytest.mark.usefixtures("db")
def test_recheck_stores_the_verdict_or_keeps_the_mark(
    stub: HunterStub, make_verifier: Callable[..., HunterVerifier]
) -> None:
    ok = make_user("ok@example.com", recheck=True)
    bad = make_user("bad@example.com", recheck=True)
    down = make_user("down@example.com", recheck=True)
    settled = make_user("settled@example.com", recheck=False)
    stub.set_answer("bad@example.com", "invalid")
    stub.set_answer("down@example.com", http_status=503)
    verifier = make_verifier()
    now = SIGNUP + timedelta(hours=1)

    assert users_needing_recheck(10) == [ok, bad, down]
    assert users_needing_recheck(2) == [ok, bad]

    assert recheck_user_email(ok, verifier, now) == "valid"
    assert recheck_user_email(bad, verifier, now) == "invalid"
    assert recheck_user_email(down, verifier, now) == "error"
    # Nothing to do: no Hunter call for a settled user or a missing one.
    assert recheck_user_email(settled, verifier, now) is None
    assert recheck_user_email(999_999, verifier, now) is None
    assert stub.request_count == 3

    rows = {u.id: (u.email_status, u.email_checked_at, u.email_recheck) for u in User.select()}
    assert rows[ok] == ("valid", now, False)
    assert rows[bad] == ("invalid", now, False)
    assert rows[down] == ("error", None, True)
    assert rows[settled] == ("valid", None, False)
    assert users_needing_recheck(10) == [down]

    # Hunter is back: the remaining user is settled too.
    stub.set_answer("down@example.com", "accept_all")
    assert recheck_user_email(down, verifier, now + timedelta(hours=1)) == "accept_all"
    assert users_needing_recheck(10) == []


@pytest.mark.usefixtures("db")
def test_recheck_with_verification_off_keeps_the_mark() -> None:
    user_id = make_user("someone@example.com", recheck=True)
    assert recheck_user_email(user_id, NoEmailVerification(), SIGNUP) == "unchecked"
    user = User.get_by_id(user_id)
    assert (user.email_status, user.email_checked_at, user.email_recheck) == ("error", None, True)


class EmailChangingVerifier:
    """Answers `valid`, but the user's address changes while Hunter is being asked."""

    def __init__(self, user_id: int) -> None:
        self.user_id = user_id

    def verify(self, email: str) -> EmailVerification:
        User.update(email="new@example.com", email_key="new@example.com").where(
            User.id == self.user_id
        ).execute()
        return EmailVerification(status="valid", accepted=True, checked=True)


@pytest.mark.usefixtures("db")
def test_recheck_does_not_store_a_verdict_on_an_old_address() -> None:
    user_id = make_user("old@example.com", recheck=True)
    recheck_user_email(user_id, EmailChangingVerifier(user_id), SIGNUP)
    user = User.get_by_id(user_id)
    assert (user.email, user.email_status, user.email_recheck) == ("new@example.com", "error", True)


# --- the real server with a trickling Hunter ------------------------------------------------------

# Register, Login or a reset request on loopback with cheap bcrypt: anything slower has been kept waiting.
PROMPT = 1.0
PASSWORD = "correct horse battery"


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    until = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < until, "condition not met in time"
        time.sleep(0.01)


@contextmanager
def api_with_hunter(pg_url: str, stub: HunterStub, **overrides: object) -> Iterator[Api]:
    settings = hunter_settings(stub.url, database_url=pg_url, **overrides)
    verifier = HunterVerifier(settings)
    try:
        with running_api(settings, verifier=verifier) as api:
            yield api
    finally:
        verifier.close()


def timed_call(call: Callable[[], object]) -> float:
    started = time.monotonic()
    call()
    return time.monotonic() - started


def hunter_results(api: Api) -> dict[str, float]:
    registry = api.server.metrics.registry
    values = {
        sample.labels["result"]: sample.value
        for metric in registry.collect()
        if metric.name == "referral_hunter_verifications"
        for sample in metric.samples
    }
    return {result: n for result, n in values.items() if n}


def test_register_with_a_trickling_hunter_succeeds_within_the_cap(pg_url: str, stub: HunterStub) -> None:
    stub.set_default("valid", trickle=1.5)
    with api_with_hunter(pg_url, stub) as api:
        cap = api.app.settings.hunter_total_timeout_seconds
        assert cap == 3.0
        elapsed = timed_call(
            lambda: api.auth.Register(
                auth_pb.RegisterRequest(email="drip@example.com", password=PASSWORD), timeout=20
            )
        )
        assert cap <= elapsed < cap + PROMPT
        user = User.get(User.email_key == "drip@example.com")
        assert (user.email_status, user.email_checked_at, user.email_recheck) == ("error", None, True)
        assert hunter_results(api) == {"timeout": 1}
    assert len(stub.hangups) == 1


def test_repeated_timeouts_open_the_breaker(pg_url: str, stub: HunterStub) -> None:
    stub.set_default("valid", trickle=DRIP)
    with api_with_hunter(pg_url, stub, hunter_total_timeout_seconds=TOTAL) as api:
        for n in range(DEFAULT_FAILURE_THRESHOLD):
            api.register(f"user{n}@example.com")
        registry = api.server.metrics.registry
        assert registry.get_sample_value("referral_hunter_breaker_open") == 1
        # Open: the next signup does not reach Hunter at all.
        elapsed = timed_call(lambda: api.register("after@example.com"))
        assert elapsed < PROMPT
        assert stub.request_count == DEFAULT_FAILURE_THRESHOLD
        assert hunter_results(api) == {"timeout": DEFAULT_FAILURE_THRESHOLD, "breaker_open": 1}
        assert User.select().where(User.email_recheck == True).count() == DEFAULT_FAILURE_THRESHOLD + 1  # noqa: E712


def test_trickled_registers_cannot_starve_login_and_reset(pg_url: str, stub: HunterStub) -> None:
    # Four blocking threads, so two Hunter slots: more signups than slots, and as many as threads.
    signups, slots = 8, 2
    with api_with_hunter(pg_url, stub, grpc_blocking_workers=4) as api:
        api.register("known@example.com")
        stub.set_default("valid", trickle=1.5)
        with futures.ThreadPoolExecutor(signups) as pool:
            registers = [
                pool.submit(
                    timed_call,
                    lambda n=n: api.auth.Register(
                        auth_pb.RegisterRequest(email=f"new{n}@example.com", password=PASSWORD), timeout=20
                    ),
                )
                for n in range(signups)
            ]
            wait_for(lambda: stub.in_flight >= slots)
            login = timed_call(
                lambda: api.auth.Login(
                    auth_pb.LoginRequest(email="known@example.com", password=PASSWORD), timeout=10
                )
            )
            reset = timed_call(
                lambda: api.auth.RequestPasswordReset(
                    auth_pb.RequestPasswordResetRequest(email="known@example.com"), timeout=10
                )
            )
            # Still trickling: the answers above did not wait for the Hunter calls to end.
            assert stub.in_flight == slots
            durations = [register.result() for register in registers]
        assert login < PROMPT
        assert reset < PROMPT
        assert max(durations) < api.app.settings.hunter_total_timeout_seconds + PROMPT
        assert stub.max_in_flight == slots
        results = hunter_results(api)
        assert results["busy"] >= signups - slots
        assert results["ok"] == 1
        assert sum(results.values()) == signups + 1
        new_users = User.select().where(User.email_key.startswith("new"))
        assert sorted((u.email_key, u.email_recheck) for u in new_users) == [
            (f"new{n}@example.com", True) for n in range(signups)
        ]


def test_a_request_deadline_shorter_than_the_cap_bounds_hunter(pg_url: str, stub: HunterStub) -> None:
    stub.set_default("valid", trickle=1.5)
    with api_with_hunter(pg_url, stub) as api:
        assert api.app.settings.hunter_total_timeout_seconds == 3.0
        elapsed = timed_call(
            lambda: api.auth.Register(
                auth_pb.RegisterRequest(email="hurry@example.com", password=PASSWORD), timeout=2.0
            )
        )
        # Hunter got half of the 2 s; the signup used the rest to finish, unverified.
        assert 1.0 <= elapsed < 2.0
        assert User.get(User.email_key == "hurry@example.com").email_recheck
        wait_for(lambda: len(stub.hangups) == 1)
        assert stub.hangups[0] < 1.0 + SLACK


def test_hunter_401_and_429_are_counted(pg_url: str, stub: HunterStub) -> None:
    with api_with_hunter(pg_url, stub, hunter_api_key="not-the-right-key") as api:
        api.register("first@example.com")
        stub.api_key = None
        stub.set_default(http_status=429)
        api.register("second@example.com")
        api.register("third@example.com")
        registry = api.server.metrics.registry
        sample = "referral_hunter_verifications_total"
        assert registry.get_sample_value(sample, {"result": "http_401"}) == 1
        assert registry.get_sample_value(sample, {"result": "http_429"}) == 2
        assert registry.get_sample_value(sample, {"result": "ok"}) == 0
        assert registry.get_sample_value("referral_hunter_breaker_open") == 0
