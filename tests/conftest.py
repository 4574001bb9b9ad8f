"""Shared fixtures: a fresh PostgreSQL database per test session, SQLite files, Redis, settings."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg2
import pytest
import redis

from referral_grpc.settings import Settings

PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# A 256-bit test-only key, generated per run: never a fixed secret in the repo.
TEST_JWT_SECRET = os.urandom(32).hex()


def _admin_connection() -> psycopg2.extensions.connection:
    conn = psycopg2.connect(PG_ADMIN_URL)
    conn.autocommit = True
    return conn


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """postgresql://... without a database name; fixtures append a fresh database."""
    return PG_ADMIN_URL.rsplit("/", 1)[0]


def create_pg_database(pg_server_url: str) -> str:
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


@pytest.fixture
def pg_url(pg_server_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    url = create_pg_database(pg_server_url)
    yield url
    drop_pg_database(url)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'referral.db'}"


@pytest.fixture(params=["postgres", "sqlite"])
def database_url(request: pytest.FixtureRequest, pg_server_url: str, tmp_path: Path) -> Iterator[str]:
    """Runs the test once on PostgreSQL and once on SQLite, each on an empty database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'referral.db'}"
        return
    url = create_pg_database(pg_server_url)
    yield url
    drop_pg_database(url)


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.ping()
    yield client
    client.close()


@pytest.fixture
def key_prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A Redis key namespace private to one test; its keys are deleted afterwards."""
    prefix = f"test:{uuid.uuid4().hex[:10]}:"
    yield prefix
    keys = list(redis_client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        redis_client.delete(*keys)


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
    """A clock tests move by hand instead of sleeping."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime.now(UTC).replace(microsecond=0)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, **delta: float) -> None:
        with self._lock:
            self._now += timedelta(**delta)
