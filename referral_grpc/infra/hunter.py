"""Email verification through Hunter's Email Verifier API, failing open behind a circuit breaker."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import requests
import requests.adapters
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.response import HTTPResponse

from ..domain.ports import EmailVerification, EmailVerifier, NoEmailVerification
from ..request_context import time_remaining
from ..settings import Settings
from ..store.models import User
from .breaker import CircuitBreaker

log = logging.getLogger(__name__)

KNOWN_STATUSES = frozenset({"valid", "invalid", "accept_all", "webmail", "disposable", "unknown"})
# Hunter looked at the address but has no verdict yet (202: still running; 400/422: it refused
# this address; 451: personal-data restriction). Hunter itself is healthy, so the breaker is not
# charged, but the address still needs a later re-check.
_NO_VERDICT_CODES = frozenset({202, 400, 422, 451})
# A Hunter answer is about 1 KiB; anything far larger is not Hunter and is not read to the end.
MAX_BODY_BYTES = 64 * 1024
DEFAULT_FAILURE_THRESHOLD = 5
DEFAULT_RESET_AFTER = 30.0
# Within a request, Hunter gets at most this share of the time left: a signup that waited on a slow
# Hunter still has time to hash the password and commit (unverified) before its own deadline.
DEADLINE_SHARE = 0.5

# What became of each verify() call, one count each: the `result` label of the metric.
RESULTS = ("ok", "no_verdict", "timeout", "http_401", "http_429", "5xx", "error", "breaker_open", "busy")

ERROR_RESULT = EmailVerification(status="error", accepted=True, checked=False)


class _NoVerdict(Exception):
    """Hunter answered, but not with a verdict; `charge_breaker` says whether Hunter is at fault."""

    def __init__(self, reason: str, result: str = "error", *, charge_breaker: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.result = result
        self.charge_breaker = charge_breaker


def _http_result(code: int) -> str:
    if code in _NO_VERDICT_CODES:
        return "no_verdict"
    if code in (401, 429):
        return f"http_{code}"
    return "5xx" if 500 <= code <= 599 else "error"


def verdict(status: str, *, reject_disposable: bool) -> EmailVerification:
    """The signup policy for one of Hunter's statuses.

    Only addresses Hunter knows to be undeliverable are refused. webmail (gmail and friends),
    accept_all and unknown are real, common addresses: refusing them turned away real users.
    """
    rejected = status == "invalid" or (status == "disposable" and reject_disposable)
    return EmailVerification(status=status, accepted=not rejected, checked=True)


# --- a deadline for the whole exchange ------------------------------------------------------------


class _Exchange:
    """One call to Hunter: its deadline, its socket once the request is sent, and whether it was cut."""

    def __init__(self, watchdog: _Watchdog, deadline: float) -> None:
        self.watchdog = watchdog
        self.deadline = deadline
        self.sock: socket.socket | None = None
        self.expired = False

    def cut(self) -> None:
        self.expired = True
        if self.sock is not None:
            with contextlib.suppress(OSError):
                # Wakes the read blocked on this socket at once (close() would not), and the
                # connection is dropped rather than reused.
                self.sock.shutdown(socket.SHUT_RDWR)


# The exchange the current thread is running, for the connection classes below.
_current = threading.local()


class _Watchdog:
    """Cuts every exchange still running at its deadline, from one daemon thread.

    requests' timeouts apply to each socket operation, so an answer that trickles in a byte at a
    time never trips them. Shutting the socket down ends the exchange wherever it stands (status
    line, headers or body), and the server thread that made the call returns.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        # Every exchange running, from its start: close() must cut one whose request is still being
        # sent too, not only those already waiting for the answer.
        self._active: set[_Exchange] = set()
        self._watched: set[_Exchange] = set()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def exchange(self, deadline: float) -> Iterator[_Exchange]:
        exchange = _Exchange(self, deadline)
        with self._cond:
            self._active.add(exchange)
        _current.exchange = exchange
        try:
            yield exchange
        finally:
            _current.exchange = None
            with self._cond:
                self._active.discard(exchange)
                self._watched.discard(exchange)

    def watch(self, exchange: _Exchange, sock: socket.socket) -> None:
        with self._cond:
            exchange.sock = sock
            # Past its deadline already, or cut by close() before its request was sent.
            if exchange.expired or exchange.deadline <= time.monotonic():
                exchange.cut()
                return
            self._watched.add(exchange)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hunter-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()

    def close(self) -> None:
        """Cut the exchanges in flight and stop the thread (a later exchange starts a new one)."""
        with self._cond:
            thread, self._thread = self._thread, None
            for exchange in self._active:
                exchange.cut()
            self._watched.clear()
            self._cond.notify_all()
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        me = threading.current_thread()
        with self._cond:
            while self._thread is me:
                now = time.monotonic()
                for exchange in [e for e in self._watched if e.deadline <= now]:
                    self._watched.discard(exchange)
                    exchange.cut()
                next_deadline = min((e.deadline for e in self._watched), default=None)
                self._cond.wait(None if next_deadline is None else next_deadline - now)


def _watch_current_exchange(sock: socket.socket | None) -> None:
    exchange: _Exchange | None = getattr(_current, "exchange", None)
    if exchange is not None and sock is not None:
        exchange.watchdog.watch(exchange, sock)


class _WatchedHTTPConnection(HTTPConnection):
    # urllib3 narrows http.client's return type the same way (and silences mypy the same way).
    def getresponse(self) -> HTTPResponse:  # type: ignore[override]
        # The request is sent: from the status line to the last body byte, the deadline holds.
        _watch_current_exchange(self.sock)
        return super().getresponse()


class _WatchedHTTPSConnection(HTTPSConnection):
    def getresponse(self) -> HTTPResponse:  # type: ignore[override]
        _watch_current_exchange(self.sock)
        return super().getresponse()


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _WatchedAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter, with connections that put each answer under the current exchange's deadline."""

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        # urllib3 keeps the pool classes per PoolManager so that they can be replaced like this.
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


# --- the verifier ---------------------------------------------------------------------------------


class HunterVerifier:
    """EmailVerifier backed by `GET {hunter_url}/v2/email-verifier`; `verify()` never raises.

    Whenever Hunter cannot give a verdict (down, slow, rate-limited, out of credits, odd
    answer), the result is `ERROR_RESULT`: the signup proceeds and the address is re-checked
    later. Once connected, a call never takes longer than HUNTER_TOTAL_TIMEOUT_SECONDS, nor more
    than half the time left in the request (connecting is bounded by the smaller of that and
    HUNTER_CONNECT_TIMEOUT per address; name resolution by the system's resolver). At most half the
    server's blocking threads wait on Hunter at once, and a call finding them all busy proceeds at
    once, unverified. Consecutive failures, timeouts included, open the breaker, and then
    `verify()` answers at once without network I/O until the breaker lets a probe through again.
    """

    def __init__(self, settings: Settings, *, breaker: CircuitBreaker | None = None) -> None:
        if not settings.hunter_api_key:
            raise ValueError("HunterVerifier needs HUNTER_API_KEY; use make_email_verifier()")
        self._endpoint = f"{settings.hunter_url.rstrip('/')}/v2/email-verifier"
        # The key travels in a header, never in the query string, so it stays out of access
        # logs, proxy logs and exception messages (which quote the URL).
        self._api_key = settings.hunter_api_key
        self._connect_timeout = settings.hunter_connect_timeout
        self._read_timeout = settings.hunter_read_timeout
        self._total_timeout = settings.hunter_total_timeout_seconds
        self._reject_disposable = settings.hunter_reject_disposable
        self.breaker = breaker or CircuitBreaker(
            failure_threshold=DEFAULT_FAILURE_THRESHOLD, reset_after=DEFAULT_RESET_AFTER
        )
        # Register runs on the blocking pool with Login and the reset RPCs: a slow Hunter may hold
        # half of its threads, never all of them.
        self._slots = threading.BoundedSemaphore(max(1, settings.grpc_blocking_workers // 2))
        self._watchdog = _Watchdog()
        # requests.Session is not documented as thread-safe: each server thread gets its own,
        # and keeps its connection to Hunter alive between signups.
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._results = dict.fromkeys(RESULTS, 0)

    def __repr__(self) -> str:
        return f"HunterVerifier(endpoint={self._endpoint!r})"

    def verify(self, email: str) -> EmailVerification:
        budget, hunter_bound = self._budget()
        if budget <= 0:
            # The caller has stopped waiting: asking Hunter now is wasted.
            self._count("timeout")
            return ERROR_RESULT
        # Non-blocking: a signup waiting for a slot would hold its server thread just the same.
        if not self._slots.acquire(blocking=False):
            self._count("busy")
            return ERROR_RESULT
        try:
            return self._verify_in_slot(email, budget, hunter_bound)
        finally:
            self._slots.release()

    def results(self) -> dict[str, int]:
        """How many verify() calls ended in each of RESULTS since the start."""
        with self._lock:
            return dict(self._results)

    def close(self) -> None:
        """Cut the calls in flight and close every thread's connections to Hunter."""
        self._watchdog.close()
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    def _budget(self) -> tuple[float, bool]:
        """Seconds this call may take, and whether that is Hunter's own cap (not the caller's deadline)."""
        remaining = time_remaining()
        if remaining is None or remaining * DEADLINE_SHARE >= self._total_timeout:
            return self._total_timeout, True
        return remaining * DEADLINE_SHARE, False

    def _verify_in_slot(self, email: str, budget: float, hunter_bound: bool) -> EmailVerification:
        # After the slot: a half-open breaker's probe must always reach Hunter and report back.
        if not self.breaker.allow():
            self._count("breaker_open")
            return ERROR_RESULT
        # Every path below reports to the breaker exactly once: a half-open breaker that is
        # never told the probe's outcome would stay open for good.
        with self._watchdog.exchange(time.monotonic() + budget) as exchange:
            try:
                status = self._fetch_status(email, budget)
            except Exception as exc:
                if exchange.expired or isinstance(exc, requests.Timeout):
                    # Hunter's own limits charge the breaker; the caller's short deadline says
                    # nothing about Hunter, or impatient clients could switch verification off.
                    own_limit = hunter_bound or time.monotonic() < exchange.deadline
                    self._failed(
                        email, "timeout", f"no answer within {budget:.1f} s", charge_breaker=own_limit
                    )
                elif isinstance(exc, _NoVerdict):
                    self._failed(email, exc.result, exc.reason, charge_breaker=exc.charge_breaker)
                elif isinstance(exc, requests.RequestException):
                    # Only the class name: the message quotes the URL, and so the address.
                    self._failed(email, "error", type(exc).__name__)
                else:
                    log.exception("hunter: unexpected error; signup proceeds, address marked for re-check")
                    self._failed(email, "error", "unexpected error", logged=True)
                return ERROR_RESULT
        self._succeeded()
        self._count("ok")
        return verdict(status, reject_disposable=self._reject_disposable)

    def _count(self, result: str) -> None:
        with self._lock:
            self._results[result] += 1

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            # Settings is the only reader of the environment: no proxies, CA bundles or .netrc
            # credentials picked up from it behind our back.
            session.trust_env = False
            session.headers.update({"X-API-KEY": self._api_key, "Accept": "application/json"})
            adapter = _WatchedAdapter()
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def _fetch_status(self, email: str, budget: float) -> str:
        timeout = (min(self._connect_timeout, budget), min(self._read_timeout, budget))
        # No redirects: a redirect to another host would carry the X-API-KEY header along.
        with self._session().get(
            self._endpoint, params={"email": email}, timeout=timeout, allow_redirects=False, stream=True
        ) as response:
            code = response.status_code
            if code != 200:
                raise _NoVerdict(
                    f"HTTP {code}", _http_result(code), charge_breaker=code not in _NO_VERDICT_CODES
                )
            body = bytearray()
            for chunk in response.iter_content(chunk_size=16 * 1024):
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise _NoVerdict("oversized response")
        return _status_from_body(bytes(body))

    def _succeeded(self) -> None:
        was_open = self.breaker.is_open
        self.breaker.record_success()
        if was_open:
            log.info("hunter: answering again; calls resumed")

    def _failed(
        self, email: str, result: str, reason: str, *, charge_breaker: bool = True, logged: bool = False
    ) -> None:
        if charge_breaker:
            was_open = self.breaker.is_open
            self.breaker.record_failure()
            if not was_open and self.breaker.is_open:
                # Once per outage: while open, verify() is silent and only counts.
                log.warning(
                    "hunter: %d consecutive failures; calls paused, re-tried every %.0f s",
                    self.breaker.failure_threshold,
                    self.breaker.reset_after,
                )
        else:
            self._succeeded()
        self._count(result)
        if not logged:
            # The domain is enough to investigate; the full address is personal data.
            log.warning(
                "hunter: no verdict for an address at %s (%s); signup proceeds, address marked for re-check",
                email.rpartition("@")[2],
                reason,
            )


def _status_from_body(body: bytes) -> str:
    try:
        document: Any = json.loads(body)
    except ValueError:
        raise _NoVerdict("malformed JSON") from None
    data = document.get("data") if isinstance(document, dict) else None
    status = data.get("status") if isinstance(data, dict) else None
    if not isinstance(status, str) or status not in KNOWN_STATUSES:
        raise _NoVerdict("unexpected response")
    return status


def make_email_verifier(settings: Settings, *, breaker: CircuitBreaker | None = None) -> EmailVerifier:
    """HunterVerifier when HUNTER_API_KEY is set; otherwise verification is off, said once at INFO."""
    if not settings.hunter_api_key:
        log.info(
            "Email verification is disabled (HUNTER_API_KEY is not set): every valid address is accepted"
        )
        return NoEmailVerification()
    log.info("Email verification through Hunter at %s", urlsplit(settings.hunter_url).hostname)
    return HunterVerifier(settings, breaker=breaker)


def recheck_user_email(user_id: int, verifier: EmailVerifier, now: datetime) -> str | None:
    """Verify a user's address again and store the verdict when there is one.

    Returns None when there is nothing to do (no such user, or not marked for re-check);
    otherwise the verifier's status. A checked answer is stored with `email_checked_at=now`
    and clears `email_recheck`; without one ("error", "unchecked") the row stays marked.
    """
    user = User.get_or_none(User.id == user_id)
    if user is None or not user.email_recheck:
        return None
    # No transaction is held open across the network call to Hunter.
    result = verifier.verify(user.email)
    if result.checked:
        (
            User.update(email_status=result.status, email_checked_at=now, email_recheck=False)
            # Unchanged address: a verdict on an old address must not be stored for a new one.
            .where((User.id == user_id) & (User.email == user.email))
            .execute()
        )
    return result.status


def users_needing_recheck(limit: int) -> list[int]:
    """Ids of users whose address is marked for re-check, oldest first."""
    query = User.select(User.id).where(User.email_recheck == True).order_by(User.id).limit(limit)  # noqa: E712
    return [user.id for user in query]
