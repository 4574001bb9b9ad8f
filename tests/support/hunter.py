"""A fake Hunter Email Verifier API: a real HTTP server on loopback, port 0, answers set per test."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

VERIFIER_PATH = "/v2/email-verifier"
_RESULTS = {"valid": "deliverable", "invalid": "undeliverable"}


@dataclass(frozen=True)
class StubAnswer:
    """What the stub answers: a Hunter verdict `status`, or `http_status`/`body` to misbehave.

    `body` (bytes or str) replaces the generated JSON verbatim; `headers` are added to the
    answer (Location, Retry-After); `delay` seconds pass before anything is sent, so a client
    with a shorter read timeout gives up first. With `trickle`, a 200 verdict's status line and
    headers go out at once (one byte at a time too with `trickle_headers`), then its body one byte
    every `trickle` seconds: every read gets a byte within the read timeout, and at 1.5 s a byte
    the answer takes ten minutes.
    """

    status: str = "valid"
    http_status: int = 200
    delay: float = 0.0
    body: bytes | str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    trickle: float = 0.0
    trickle_headers: bool = False


@dataclass(frozen=True)
class StubRequest:
    """One request as the stub received it."""

    path: str
    raw_query: str
    query: dict[str, list[str]]
    # Lower-cased names.
    headers: dict[str, str] = field(repr=False)
    # The client's (host, port): one port across requests means one kept-alive connection.
    client: tuple[str, int]

    @property
    def email(self) -> str | None:
        values = self.query.get("email")
        return values[0] if values else None

    @property
    def api_key(self) -> str | None:
        """The key as Hunter would see it: the X-API-KEY header, else the api_key parameter."""
        header = self.headers.get("x-api-key")
        if header is not None:
            return header
        values = self.query.get("api_key")
        return values[0] if values else None


def hunter_body(email: str, status: str) -> bytes:
    """A 200 body shaped like Hunter's, for `status`."""
    data: dict[str, Any] = {
        "status": status,
        "result": _RESULTS.get(status, "risky"),
        "score": 100 if status == "valid" else 50,
        "email": email,
        "regexp": True,
        "gibberish": False,
        "disposable": status == "disposable",
        "webmail": status == "webmail",
        "mx_records": True,
        "smtp_server": True,
        "smtp_check": status == "valid",
        "accept_all": status == "accept_all",
        "block": False,
        "sources": [],
    }
    return json.dumps({"data": data, "meta": {"params": {"email": email}}}).encode()


def hunter_error_body(code: int) -> bytes:
    """An error body shaped like Hunter's."""
    error = {"id": "stub_error", "code": code, "details": f"stub answered HTTP {code}"}
    return json.dumps({"errors": [error]}).encode()


class HunterStub:
    """The fake Hunter. `start()`, point HUNTER_URL at `url`, set answers, read `requests`.

    Without an answer for the email, the default answer (`set_default`) applies, initially
    `valid`. With `api_key` set, requests carrying another key get 401, as Hunter does.
    `hangups` holds, for each trickled answer the client walked away from, the seconds between
    the request's arrival and the client closing the connection; `max_in_flight` the most
    requests the stub was answering at once.
    """

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self._lock = threading.Lock()
        self._default = StubAnswer()
        self._answers: dict[str, StubAnswer] = {}
        self._requests: list[StubRequest] = []
        self._hangups: list[float] = []
        self._in_flight = 0
        self._max_in_flight = 0
        # Set by stop(): delayed answers end at once instead of holding the shutdown.
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> HunterStub:
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", 0), _handler_for(self))
        # A short poll interval: stop() waits up to one interval for the serving loop.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), name="hunter-stub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HunterStub:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the Hunter stub is not running")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The base URL, as HUNTER_URL expects it (no path)."""
        return f"http://127.0.0.1:{self.port}"

    def set_default(self, status: str = "valid", **answer: Any) -> None:
        """The answer for every email without one of its own (options as `set_answer`)."""
        with self._lock:
            self._default = _answer(status, **answer)

    def set_answer(self, email: str, status: str = "valid", **answer: Any) -> None:
        """The answer for exactly this email (as received, after URL decoding)."""
        with self._lock:
            self._answers[email] = _answer(status, **answer)

    def reset(self) -> None:
        """Forget answers and recorded requests; the default goes back to `valid`."""
        with self._lock:
            self._default = StubAnswer()
            self._answers.clear()
            self._requests.clear()
            self._hangups.clear()
            self._max_in_flight = self._in_flight

    @property
    def requests(self) -> list[StubRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._requests)

    @property
    def hangups(self) -> list[float]:
        with self._lock:
            return list(self._hangups)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def max_in_flight(self) -> int:
        with self._lock:
            return self._max_in_flight

    def _record(self, request: StubRequest) -> StubAnswer:
        with self._lock:
            self._requests.append(request)
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            return self._answers.get(request.email or "", self._default)

    def _done(self, hung_up_after: float | None) -> None:
        with self._lock:
            self._in_flight -= 1
            if hung_up_after is not None:
                self._hangups.append(hung_up_after)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True
    # The default backlog of 5 drops the SYNs of a burst of parallel clients, which then look
    # like connect timeouts.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        # Kept-alive client connections would hold their handler threads, and so this join, open.
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        super().server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out hangs up before the delayed answer: that is the test, not a fault.
        pass


def _handler_for(stub: HunterStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; with Nagle on, the client's delayed ACK adds 40 ms.
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            arrived = time.monotonic()
            hung_up_after: float | None = None
            try:
                if not self._answer():
                    hung_up_after = time.monotonic() - arrived
            finally:
                stub._done(hung_up_after)

        def _answer(self) -> bool:
            """Answer the request; False when the client hung up on a trickled answer."""
            parts = urlsplit(self.path)
            request = StubRequest(
                path=parts.path,
                raw_query=parts.query,
                query=parse_qs(parts.query, keep_blank_values=True),
                headers={name.lower(): value for name, value in self.headers.items()},
                client=(self.client_address[0], self.client_address[1]),
            )
            answer = stub._record(request)
            if answer.delay and stub._stopping.wait(answer.delay):
                return True
            if answer.trickle:
                return self._trickle(answer, request.email or "")
            if parts.path != VERIFIER_PATH:
                self._send(404, hunter_error_body(404))
            elif stub.api_key is not None and request.api_key != stub.api_key:
                self._send(401, hunter_error_body(401))
            elif answer.body is not None:
                raw = answer.body.encode() if isinstance(answer.body, str) else answer.body
                self._send(answer.http_status, raw, answer.headers)
            elif answer.http_status != 200:
                self._send(answer.http_status, hunter_error_body(answer.http_status), answer.headers)
            else:
                self._send(200, hunter_body(request.email or "", answer.status), answer.headers)
            return True

        def _trickle(self, answer: StubAnswer, email: str) -> bool:
            body = hunter_body(email, answer.status)
            head = (
                f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            if not answer.trickle_headers:
                self.wfile.write(head)
                head = b""
            for byte in head + body:
                try:
                    self.wfile.write(bytes([byte]))
                except OSError:
                    return False
                if self._peer_closed_within(answer.trickle):
                    return False
                if stub._stopping.is_set():
                    return True
            return True

        def _peer_closed_within(self, seconds: float) -> bool:
            """Wait `seconds`, watching for the client to close its end (readable, nothing to read)."""
            until = time.monotonic() + seconds
            while (left := until - time.monotonic()) > 0 and not stub._stopping.is_set():
                readable, _, _ = select.select([self.connection], [], [], min(left, 0.02))
                if readable:
                    try:
                        return self.connection.recv(1, socket.MSG_PEEK) == b""
                    except OSError:
                        return True
            return False

        def _send(self, code: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def _answer(
    status: str,
    *,
    http_status: int = 200,
    delay: float = 0.0,
    body: bytes | str | None = None,
    headers: Mapping[str, str] | None = None,
    trickle: float = 0.0,
    trickle_headers: bool = False,
) -> StubAnswer:
    """A stub answer; `trickle` sends one body byte every that many seconds (after the headers, or
    with them byte by byte when `trickle_headers`)."""
    return StubAnswer(status, http_status, delay, body, dict(headers or {}), trickle, trickle_headers)
