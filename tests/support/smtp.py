"""A real SMTP server on loopback (aiosmtpd) for tests: start, stop, and the messages it really received.

Use the `smtp_server` fixture (tests/conftest.py), or `SmtpServer` directly to stop a server and
start another on the same port (an SMTP outage). Point settings at it with
`make_settings(smtp_host=server.host, smtp_port=server.port)`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


@dataclass(frozen=True)
class ReceivedMessage:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    raw: bytes
    # time.monotonic() when the server accepted it.
    received_at: float
    # The AUTH login of the session, if the client logged in.
    login: str | None

    def part(self, subtype: str) -> str:
        """The decoded text of the text/`subtype` part (plain or html)."""
        body = self.message.get_body(preferencelist=(subtype,))
        assert body is not None and body.get_content_subtype() == subtype, f"no text/{subtype} part"
        return str(body.get_content())


class _PortZeroController(Controller):  # type: ignore[misc]
    # aiosmtpd pokes the server on self.port once started: with port 0 that must be the port
    # the kernel actually chose.
    def _trigger_server(self) -> None:
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class _Handler:
    def __init__(self, owner: SmtpServer) -> None:
        self._owner = owner

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if address in self._owner.reject:
            return "550 5.1.1 Mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self._owner.data_started.set()
        if self._owner.data_delay:
            await asyncio.sleep(self._owner.data_delay)
        raw = bytes(envelope.content)
        parsed = BytesParser(policy=policy.default).parsebytes(raw)
        assert isinstance(parsed, EmailMessage)
        login = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None
        self._owner._record(
            ReceivedMessage(envelope.mail_from, list(envelope.rcpt_tos), parsed, raw, time.monotonic(), login)
        )
        return "250 Message accepted for delivery"


class _Authenticator:
    def __init__(self, credentials: dict[str, str]) -> None:
        self._credentials = credentials

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login, password = auth_data.login.decode(), auth_data.password.decode()
        return AuthResult(success=self._credentials.get(login) == password, auth_data=auth_data)


class SmtpServer:
    """An aiosmtpd server in a background thread, recording every accepted message."""

    host = "127.0.0.1"

    def __init__(
        self,
        port: int = 0,
        *,
        data_delay: float = 0.0,
        reject: Iterable[str] = (),
        credentials: dict[str, str] | None = None,
    ) -> None:
        self.port = port
        # Seconds the server waits before answering DATA: a slow server, to catch a send in flight.
        self.data_delay = data_delay
        # Recipients refused with a permanent 550.
        self.reject = set(reject)
        self.credentials = credentials
        self.data_started = threading.Event()
        self._messages: list[ReceivedMessage] = []
        self._changed = threading.Condition()
        self._controller: _PortZeroController | None = None

    def start(self) -> SmtpServer:
        options: dict[str, Any] = {}
        if self.credentials is not None:
            # Loopback only, in tests: AUTH offered without TLS is what lets us check the login.
            # (Not auth_required: aiosmtpd warns about requiring AUTH without TLS on every connection.)
            options = {"authenticator": _Authenticator(self.credentials), "auth_require_tls": False}
        controller = _PortZeroController(_Handler(self), hostname=self.host, port=self.port, **options)
        controller.start()
        self.port = controller.port
        self._controller = controller
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SmtpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._changed:
            return list(self._messages)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Wait until at least `count` messages have arrived; fail the test if they do not."""
        with self._changed:
            arrived = self._changed.wait_for(lambda: len(self._messages) >= count, timeout)
            assert arrived, f"expected {count} message(s) within {timeout}s, got {len(self._messages)}"
            return list(self._messages)

    def _record(self, message: ReceivedMessage) -> None:
        with self._changed:
            self._messages.append(message)
            self._changed.notify_all()
