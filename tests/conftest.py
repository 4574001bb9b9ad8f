"""Fixtures only (helpers live in tests/support): databases, Redis, the fake clock, a running API, SMTP."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from support import PG_SERVER_URL, REDIS_URL, FakeClock, create_pg_database, drop_pg_database, make_settings
from support.api import Api, running_api
from support.smtp import SmtpServer

DATABASES = ("postgres", "sqlite")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # `database_url` runs a test once per database; `@pytest.mark.databases("sqlite")` narrows the list.
    if "database_url" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("databases")
        kinds = marker.args if marker else DATABASES
        assert set(kinds) <= set(DATABASES), kinds
        metafunc.parametrize("database_url", kinds, indirect=True)


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """postgresql://... without a database name; fixtures append a fresh database."""
    return PG_SERVER_URL


@pytest.fixture
def pg_url(pg_server_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    url = create_pg_database(pg_server_url)
    yield url
    drop_pg_database(url)


@pytest.fixture(scope="module")
def module_pg_url(pg_server_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database shared by the tests of one module (a server process's)."""
    url = create_pg_database(pg_server_url)
    yield url
    drop_pg_database(url)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'referral.db'}"


@pytest.fixture
def database_url(request: pytest.FixtureRequest, pg_server_url: str, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind the test runs on (see pytest_generate_tests)."""
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


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def api(request: pytest.FixtureRequest, database_url: str, clock: FakeClock) -> Iterator[Api]:
    """A server on a real channel, on an empty database, with the test's clock.

    `@pytest.mark.api_settings(name=value, ...)` sets its settings besides the database.
    """
    marker = request.node.get_closest_marker("api_settings")
    overrides = marker.kwargs if marker else {}
    with running_api(make_settings(database_url=database_url, **overrides), clock=clock) as running:
        yield running


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    """A running SMTP server on a free loopback port, stopped after the test."""
    with SmtpServer() as server:
        yield server
