"""Email verification through Hunter's Email Verifier API, failing open behind a circuit breaker."""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import requests

from ..domain.ports import EmailVerification, EmailVerifier, NoEmailVerification
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

ERROR_RESULT = EmailVerification(status="error", accepted=True, checked=False)


class _NoVerdict(Exception):
    """Hunter answered, but not with a verdict; `charge_breaker` says whether Hunter is at fault."""

    def __init__(self, reason: str, *, charge_breaker: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.charge_breaker = charge_breaker


def verdict(status: str, *, reject_disposable: bool) -> EmailVerification:
    """The signup policy for one of Hunter's statuses.

    Only addresses Hunter knows to be undeliverable are refused. webmail (gmail and friends),
    accept_all and unknown are real, common addresses: refusing them turned away real users.
    """
    rejected = status == "invalid" or (status == "disposable" and reject_disposable)
    return EmailVerification(status=status, accepted=not rejected, checked=True)


class HunterVerifier:
    """EmailVerifier backed by `GET {hunter_url}/v2/email-verifier`; `verify()` never raises.

    Whenever Hunter cannot give a verdict (down, slow, rate-limited, out of credits, odd
    answer), the result is `ERROR_RESULT`: the signup proceeds and the address is re-checked
    later. Consecutive failures open the breaker, and then `verify()` answers at once without
    network I/O until the breaker lets a probe through again.
    """

    def __init__(self, settings: Settings, *, breaker: CircuitBreaker | None = None) -> None:
        if not settings.hunter_api_key:
            raise ValueError("HunterVerifier needs HUNTER_API_KEY; use make_email_verifier()")
        self._endpoint = f"{settings.hunter_url.rstrip('/')}/v2/email-verifier"
        # The key travels in a header, never in the query string, so it stays out of access
        # logs, proxy logs and exception messages (which quote the URL).
        self._api_key = settings.hunter_api_key
        self._timeout = (settings.hunter_connect_timeout, settings.hunter_read_timeout)
        self._reject_disposable = settings.hunter_reject_disposable
        self.breaker = breaker or CircuitBreaker(
            failure_threshold=DEFAULT_FAILURE_THRESHOLD, reset_after=DEFAULT_RESET_AFTER
        )
        # requests.Session is not documented as thread-safe: each server thread gets its own,
        # and keeps its connection to Hunter alive between signups.
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._calls = 0
        self._errors = 0
        self._short_circuited = 0

    def __repr__(self) -> str:
        return f"HunterVerifier(endpoint={self._endpoint!r})"

    def verify(self, email: str) -> EmailVerification:
        if not self.breaker.allow():
            with self._lock:
                self._short_circuited += 1
            return ERROR_RESULT
        with self._lock:
            self._calls += 1
        # Every path below reports to the breaker exactly once: a half-open breaker that is
        # never told the probe's outcome would stay open for good.
        try:
            status = self._fetch_status(email)
        except _NoVerdict as exc:
            self._failed(email, exc.reason, charge_breaker=exc.charge_breaker)
            return ERROR_RESULT
        except requests.Timeout:
            self._failed(email, "timeout")
            return ERROR_RESULT
        except requests.RequestException as exc:
            # Only the class name: the message quotes the URL, and so the address.
            self._failed(email, type(exc).__name__)
            return ERROR_RESULT
        except Exception:
            log.exception("hunter: unexpected error; signup proceeds, address marked for re-check")
            self._failed(email, "unexpected error", logged=True)
            return ERROR_RESULT
        self._succeeded()
        return verdict(status, reject_disposable=self._reject_disposable)

    def stats(self) -> dict[str, int]:
        """Counters for metrics: requests sent, requests without a verdict, breaker skips and state."""
        with self._lock:
            return {
                "calls": self._calls,
                "errors": self._errors,
                "short_circuited": self._short_circuited,
                "breaker_open": int(self.breaker.is_open),
            }

    def close(self) -> None:
        """Close every thread's connections to Hunter."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            # Settings is the only reader of the environment: no proxies, CA bundles or .netrc
            # credentials picked up from it behind our back.
            session.trust_env = False
            session.headers.update({"X-API-KEY": self._api_key, "Accept": "application/json"})
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def _fetch_status(self, email: str) -> str:
        # No redirects: a redirect to another host would carry the X-API-KEY header along.
        with self._session().get(
            self._endpoint, params={"email": email}, timeout=self._timeout, allow_redirects=False, stream=True
        ) as response:
            if response.status_code != 200:
                raise _NoVerdict(
                    f"HTTP {response.status_code}",
                    charge_breaker=response.status_code not in _NO_VERDICT_CODES,
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

    def _failed(self, email: str, reason: str, *, charge_breaker: bool = True, logged: bool = False) -> None:
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
        with self._lock:
            self._errors += 1
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
