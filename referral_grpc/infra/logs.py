"""Logging: text for developers, JSON lines in production, the request id on every line, secrets redacted."""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from datetime import UTC, datetime
from typing import IO, Any

from ..request_context import request_id, trace_id
from ..settings import Settings
from .batches import DelayedDrain

REDACTED = "[redacted]"

# Order matters: whole tokens first, so the email and key=value rules never see half a JWT.
_SECRET_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # A JWT (header.payload.signature, base64url): an access token wherever it appears.
    (re.compile(r"\beyJ[\w-]+\.[\w-]+\.[\w-]*"), REDACTED),
    (re.compile(r"(?i)\b(bearer|basic)\s+[\w\-.~+/=]+"), rf"\1 {REDACTED}"),
    # bcrypt hashes: peewee's query log would show them on every password change.
    (re.compile(r"\$2[abxy]?\$\d{2}\$[./A-Za-z0-9]{53}"), REDACTED),
    # Credentials in URLs: postgresql://user:pass@host, redis://:pass@host, https://u:p@host.
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s:/@]*):[^\s@/]*@"), rf"\1:{REDACTED}@"),
    # key=value (DSNs, query strings, repr) and "key": "value" (JSON, e.g. an outbox payload in the SQL log).
    (
        re.compile(
            r"""(?ix)
            (["']?\b[\w-]*(?:password|passwd|pwd|secret|token|api[_-]?key|apikey|pepper)
            ["']?\s*[:=]\s*)
            (?:"[^"]*"|'[^']*'|[^\s,;&)}\]]+)
            """
        ),
        rf"\1{REDACTED}",
    ),
)
_EMAIL = re.compile(r"\b([A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]*(@|%40)((?:[A-Za-z0-9\-]+\.)+[A-Za-z]{2,})\b")
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "request_id",
    "trace_id",
}


def redact(text: str) -> str:
    """`text` with secrets replaced and emails masked (a***@example.com)."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return _EMAIL.sub(r"\1***\2\3", text)


def _redact_value(value: Any) -> Any:
    return redact(value) if isinstance(value, str) else value


class RedactingFilter(logging.Filter):
    """Renders each record's message, traceback and string extras, then redacts them in place.

    On a handler it covers every logger, including peewee's query log and third-party libraries
    that put API keys in URLs: nothing reaches the formatter unredacted.
    """

    def __init__(self) -> None:
        super().__init__()
        self._formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        record.trace_id = trace_id.get()
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        # The formatter would render exc_info again only when exc_text is empty; it is not now.
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _STANDARD_ATTRS:
                setattr(record, key, _redact_value(value))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; fields passed with `extra=` become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        trace = getattr(record, "trace_id", None)
        if trace:
            entry["trace_id"] = trace
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key not in entry:
                entry[key] = value if isinstance(value, int | float | bool | None) else str(value)
        if record.exc_text:
            entry["exception"] = record.exc_text
        elif record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, ensure_ascii=False)


ACCESS_LOGGER = "referral_grpc.access"

# json.dumps(value, ensure_ascii=False) for a string, without building an encoder per call.
_STRING = json.JSONEncoder(ensure_ascii=False)

# When it was logged (time.time()), level, method, code, duration in seconds, request id, trace id.
AccessFields = tuple[float, int, str, str, float, str, str | None]


# The parts of a line that are the same for every call of one method with one outcome, by (level, method,
# code); and the time's whole second as isoformat() writes it. A batch of lines costs one string
# operation per part that changes: about a third of formatting each line whole (~3.4 us).
_CONSTANT_PARTS: dict[tuple[int, str, str], tuple[str, str]] = {}
_CONSTANT_PARTS_LIMIT = 4096


def _constant_parts(level: int, method: str, code: str) -> tuple[str, str]:
    key = (level, method, code)
    parts = _CONSTANT_PARTS.get(key)
    if parts is None:
        if len(_CONSTANT_PARTS) >= _CONSTANT_PARTS_LIMIT:
            _CONSTANT_PARTS.clear()
        level_name = logging.getLevelName(level)
        head = f'", "level": "{level_name}", "logger": "{ACCESS_LOGGER}", "message": "{method} {code} '
        tail = f', "rpc_method": "{method}", "grpc_code": "{code}", "duration_ms": '
        parts = _CONSTANT_PARTS[key] = (head, tail)
    return parts


def _access_lines(batch: list[AccessFields]) -> str:
    """The lines JsonFormatter would write for these access records, joined: time, level, logger,
    message ("METHOD CODE 1.2ms"), request_id, trace_id when sent, rpc_method, grpc_code, duration_ms."""
    lines = []
    second, second_text = -1, ""
    for at, level, method, code, seconds, request, trace in batch:
        # As datetime.fromtimestamp() rounds: the fraction to the microsecond, half to even; and as
        # isoformat() writes it: no fraction when it is zero.
        fraction, seconds_part = math.modf(at)
        whole, micros = int(seconds_part), round(fraction * 1_000_000)
        if micros >= 1_000_000:
            whole, micros = whole + 1, micros - 1_000_000
        if whole != second:
            second = whole
            second_text = datetime.fromtimestamp(whole, UTC).isoformat()[:19]
        stamp = f"{second_text}.{micros:06d}+00:00" if micros else f"{second_text}+00:00"
        head, tail = _constant_parts(level, method, code)
        ms = seconds * 1000
        # Where JsonFormatter puts it: right after the request id, and only when the caller sent one.
        traced = f', "trace_id": {_STRING.encode(trace)}' if trace else ""
        lines.append(
            f'{{"time": "{stamp}{head}{ms:.1f}ms", "request_id": {_STRING.encode(request)}{traced}'
            f"{tail}{round(ms, 2)!r}}}\n"
        )
    return "".join(lines)


class ServiceHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The one handler `configure_logging` installs; AccessLog hands it the fields of access lines.

    An RPC only queues its line's fields (infra.batches.DelayedDrain); the lines are formatted and
    written in batches: at most `FLUSH_SECONDS` after they were logged (by the queue's thread), at
    once when `MAX_PENDING` are waiting, before any other record (so the order of lines is kept), and
    on `flush()` (which logging calls at exit). Formatting and writing on the RPC's own thread cost
    about a tenth of a cached lookup's throughput on one server process (measured, where a
    micro-benchmark of the same work said 1%); queued, about 4-6%. A process killed outright loses
    at most the last `FLUSH_SECONDS` of access lines.
    """

    FLUSH_SECONDS = 0.1
    MAX_PENDING = 512

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self._queued: DelayedDrain[AccessFields] = DelayedDrain(
            self.flush_access, delay=self.FLUSH_SECONDS, name="log-flush"
        )

    def queue_access(self, fields: AccessFields) -> None:
        """Queue one access line's fields for the next batch; safe from any thread without the lock."""
        self._queued.put(fields)
        if len(self._queued) >= self.MAX_PENDING:
            self.flush_access()

    def flush_access(self) -> None:
        """Write the queued access lines now."""
        with self.lock:  # type: ignore[union-attr]
            self._write_pending()

    def emit(self, record: logging.LogRecord) -> None:
        # Under the handler's lock (Handler.handle takes it): queued access lines go first.
        self._write_pending()
        super().emit(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_pending()
            super().flush()

    def _write_pending(self) -> None:
        """Format and write every queued access line; call with the handler's lock held."""
        fields = self._queued.take()
        if not fields:
            return
        try:
            self.stream.write(_access_lines(fields))
            super().flush()
        except Exception:  # a closed or broken stream must not fail the RPC that logged
            self.handleError(logging.makeLogRecord({"msg": "access log write failed"}))


class AccessLog:
    """One line per RPC (method, code, duration, request id), cheap enough to leave on.

    The ordinary logging path (a LogRecord, the redacting filter's regexes, the JSON formatter) cost
    about a third of a cached lookup's throughput. Every field of this line is ours except the request
    id, which the redacting filter never rewrote either, so with the JSON handler installed the call
    only queues the line's fields; the handler formats them in one step, in the very format
    JsonFormatter gives, with its next batch (ServiceHandler). Any other set-up (text format, extra
    handlers) takes the ordinary path.
    """

    def __init__(self) -> None:
        self._logger = logging.getLogger(ACCESS_LOGGER)
        self._root = logging.getLogger()

    def __call__(self, method: str, code: str, seconds: float, level: int = logging.INFO) -> None:
        if not self._logger.isEnabledFor(level):
            return
        handlers = self._root.handlers
        handler = handlers[0] if len(handlers) == 1 else None
        if (
            isinstance(handler, ServiceHandler)
            and isinstance(handler.formatter, JsonFormatter)
            and handler.level <= level
            and not self._logger.handlers
        ):
            handler.queue_access(
                (time.time(), level, method, code, seconds, request_id.get(), trace_id.get())
            )
            return
        self._logger.log(
            level,
            "%s %s %.1fms",
            method,
            code,
            seconds * 1000,
            extra={"rpc_method": method, "grpc_code": code, "duration_ms": round(seconds * 1000, 2)},
        )


def make_handler(settings: Settings, stream: IO[str] | None = None) -> logging.Handler:
    """The handler `configure_logging` installs: redacting, with the request id, text or JSON."""
    handler = ServiceHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RedactingFilter())
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    return handler


def configure_logging(settings: Settings, stream: IO[str] | None = None) -> None:
    root = logging.getLogger()
    root.handlers[:] = [make_handler(settings, stream)]
    root.setLevel(settings.log_level)
    # peewee logs every query at DEBUG, with parameters: redacted, but too noisy and too close to
    # user data for production logs. Turn it on by hand when debugging a query.
    logging.getLogger("peewee").setLevel(logging.INFO)
