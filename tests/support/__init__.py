"""Test support: settings, a fake clock, throwaway PostgreSQL databases, ports and polling.

Imported as `support` (pyproject's pytest `pythonpath` puts tests/ on sys.path), never through conftest,
so there is exactly one instance of this module and of TEST_JWT_SECRET in a test session.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta

import psycopg2
import pytest

from referral_grpc.settings import Settings

PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
# postgresql://... without a database name; create_pg_database appends a fresh one.
PG_SERVER_URL = PG_ADMIN_URL.rsplit("/", 1)[0]
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# A 256-bit test-only key, generated per run: never a fixed secret in the repo.
TEST_JWT_SECRET = os.urandom(32).hex()


def make_settings(**overrides: object) -> Settings:
    """Settings for tests: fast bcrypt, a per-run JWT secret, everything else from `overrides`."""
    env: Mapping[str, str] = {
        "JWT_SECRET": TEST_JWT_SECRET,
        "BCRYPT_ROUNDS": "4",
        "GRPC_PORT": "0",
        **{key.upper(): str(value) for key, value in overrides.items()},
    }
    return Settings.from_env(env)


class FakeClock:
    """A clock tests move by hand instead of sleeping: wall time, monotonic time and sleeps move together."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime.now(UTC).replace(microsecond=0)
        self._monotonic = 1000.0
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        with self._lock:
            return self._monotonic

    def sleep(self, seconds: float) -> None:
        """Returns at once, with the time moved on by `seconds`."""
        self.advance(seconds=seconds)

    def advance(self, **delta: float) -> None:
        step = timedelta(**delta)
        with self._lock:
            self._now += step
            self._monotonic += step.total_seconds()


def _admin_connection() -> psycopg2.extensions.connection:
    conn = psycopg2.connect(PG_ADMIN_URL)
    conn.autocommit = True
    return conn


def create_pg_database(pg_server_url: str = PG_SERVER_URL) -> str:
    """Create an empty database with a random name; return its URL."""
    name = f"referral_test_{uuid.uuid4().hex[:12]}"
    conn = _admin_connection()
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return f"{pg_server_url}/{name}"


def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    conn = _admin_connection()
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


def closed_port() -> int:
    """A loopback port nothing listens on: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll until `condition()` holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
