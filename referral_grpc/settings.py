"""Settings: the only module that reads the environment; each setting is declared once, on its field."""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import functools
import itertools
import logging
import os
import re
import secrets
import string
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

from playhouse.db_url import parse as parse_db_url

log = logging.getLogger(__name__)

# RFC 7518 section 3.2: an HS256 key must be at least 256 bits.
MIN_SECRET_BYTES = 32

README_TABLE_START = (
    "<!-- settings-table:start (python -m referral_grpc.settings --update-readme README.md) -->"
)
README_TABLE_END = "<!-- settings-table:end -->"

# What a browser sends as Origin: scheme, host and port, no path.
_ORIGIN = re.compile(r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:]+\](:[0-9]{1,5})?")
# A web app's development server on this machine, which `make run` lets call the API.
DEV_CORS_ORIGINS = "http://localhost:3000,http://127.0.0.1:3000"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

Kind = Literal["bool", "int", "float", "text", "url", "choice"]


class ConfigError(ValueError):
    """A setting is missing or invalid. The message names the setting, never its value."""


@dataclass(frozen=True)
class Derived:
    """A default computed from other settings (`doc` says how, for the README)."""

    doc: str
    compute: Callable[[Mapping[str, Any]], Any]


@dataclass(frozen=True)
class Setting:
    """How one environment variable (the field's name in capitals) becomes one attribute of Settings."""

    kind: Kind
    default: Any
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    # Kept out of repr() (so out of every log line) and shown as such in the README.
    secret: bool = False
    # Surrounding spaces are part of the value (passwords and keys), not a copy-paste accident.
    verbatim: bool = False
    # How the README states a default that is not a plain value.
    default_doc: str = ""

    def read(self, env: Mapping[str, str], name: str, default: Any) -> Any:
        """The value of `name` in `env`; missing or blank means `default`."""
        raw = env.get(name)
        if raw is None or raw.strip() == "":
            return default
        value = raw if self.verbatim else raw.strip()
        if self.kind == "bool":
            if value.lower() in _TRUE:
                return True
            if value.lower() in _FALSE:
                return False
            raise ConfigError(f"{name} must be true or false")
        if self.kind in ("int", "float"):
            try:
                number: float = int(value) if self.kind == "int" else float(value)
            except ValueError:
                raise ConfigError(
                    f"{name} must be {'an integer' if self.kind == 'int' else 'a number'}"
                ) from None
            assert self.minimum is not None and self.maximum is not None
            # `not a <= x <= b` also refuses NaN.
            if not self.minimum <= number <= self.maximum:
                raise ConfigError(f"{name} must be between {_plain(self.minimum)} and {_plain(self.maximum)}")
            return number
        if self.kind == "choice":
            for choice in self.choices:
                if value.lower() == choice.lower():
                    return choice
            raise ConfigError(f"{name} must be one of {', '.join(self.choices)}")
        if self.kind == "url":
            return value.rstrip("/")
        return value

    def describe_values(self) -> str:
        if self.kind == "bool":
            return "`true` / `false`"
        if self.kind in ("int", "float"):
            kind = "integer" if self.kind == "int" else "number"
            return f"{kind} {_plain(self.minimum)} to {_plain(self.maximum)}"
        if self.kind == "choice":
            return ", ".join(f"`{choice}`" for choice in self.choices)
        return ("secret " if self.secret else "") + ("URL" if self.kind == "url" else "text")

    def describe_default(self) -> str:
        if self.default_doc:
            return self.default_doc
        if isinstance(self.default, Derived):
            return self.default.doc
        if self.kind == "bool":
            return f"`{str(self.default).lower()}`"
        if self.kind in ("int", "float"):
            return f"`{_plain(self.default)}`"
        return f"`{self.default}`" if self.default else "empty"


def _plain(number: float | None) -> str:
    """2 rather than 2.0, 3600000 rather than 3.6e+06."""
    return str(int(number)) if number is not None and number == int(number) else str(number)


def _declare(setting: Setting) -> Any:
    return field(repr=not setting.secret, metadata={"setting": setting})


def boolean(default: bool | Derived, doc: str) -> Any:
    return _declare(Setting("bool", default, doc))


def integer(default: int | Derived, doc: str, *, minimum: int, maximum: int, default_doc: str = "") -> Any:
    return _declare(Setting("int", default, doc, minimum, maximum, default_doc=default_doc))


def number(default: float, doc: str, *, minimum: float, maximum: float) -> Any:
    return _declare(Setting("float", default, doc, minimum, maximum))


def text(
    default: str | Derived, doc: str, *, secret: bool = False, verbatim: bool = False, default_doc: str = ""
) -> Any:
    return _declare(Setting("text", default, doc, secret=secret, verbatim=verbatim, default_doc=default_doc))


def url(default: str, doc: str, *, secret: bool = False) -> Any:
    """A URL; a trailing slash is dropped so paths can be appended."""
    return _declare(Setting("url", default, doc, secret=secret))


def choice(default: str | Derived, doc: str, choices: tuple[str, ...]) -> Any:
    return _declare(Setting("choice", default, doc, choices=choices))


def _in_production(values: Mapping[str, Any]) -> bool:
    return bool(values["environment"] == "production")


@dataclass(frozen=True)
class DatabaseTarget:
    """DATABASE_URL, parsed once: a SQLite file, or a PostgreSQL database and its connection parameters."""

    engine: Literal["sqlite", "postgresql"]
    # The SQLite file, or the PostgreSQL database name.
    database: str
    # PostgreSQL: host, port, user, password and any libpq option given in the query string.
    connect_params: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_sqlite(self) -> bool:
        return self.engine == "sqlite"

    @property
    def location(self) -> str:
        """Where the database is, without credentials (for humans)."""
        if self.is_sqlite:
            return self.database
        return f"{self.connect_params['host']}:{self.connect_params['port']}/{self.database}"


def parse_retry_schedule(value: str) -> tuple[float, ...]:
    """ "5,30,120" -> (5.0, 30.0, 120.0): at least one delay, each between 0 and a day."""
    delays = tuple(float(part) for part in value.split(",") if part.strip())
    if not delays or not all(0 <= delay <= 86_400 for delay in delays):
        raise ValueError("give comma-separated seconds between 0 and 86400, e.g. 5,30,120")
    return delays


def parse_database_url(database_url: str) -> DatabaseTarget:
    """`sqlite:///path` or `postgresql://user:password@host:port/name?libpq_option=value`."""
    scheme = database_url.partition("://")[0].lower()
    try:
        params: dict[str, Any] = parse_db_url(database_url, unquote_password=True, unquote_user=True)
    except ValueError:  # a port that is not a number; urllib's message would quote it
        raise ConfigError("DATABASE_URL is not a valid URL") from None
    name = str(params.pop("database") or "")
    if scheme == "sqlite":
        if name == ":memory:":
            # Peewee gives each thread its own connection: an in-memory database would differ per thread.
            raise ConfigError("DATABASE_URL must name a SQLite file, not :memory:")
        return DatabaseTarget("sqlite", name)
    if scheme in ("postgres", "postgresql"):
        params.setdefault("host", "127.0.0.1")
        params.setdefault("port", 5432)
        return DatabaseTarget("postgresql", unquote(name) or "postgres", params)
    raise ConfigError("DATABASE_URL must start with sqlite:///, postgresql:// or postgres://")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every knob of the service. Build it with `Settings.from_env()`; the README's table comes from here."""

    environment: str = choice(
        "development",
        "`production` enforces strong distinct secrets, `DEBUG` off and `BCRYPT_ROUNDS` >= 10, and changes "
        "the defaults marked so; a refusal names the setting, never its value",
        ("development", "production"),
    )
    debug: bool = boolean(False, "refused in production")

    database_url: str = url(
        "sqlite:///var/referral.db",
        "`sqlite:///path` (relative to the working directory) or "
        "`postgresql://user:password@host:5432/name?sslmode=require` (query: libpq options)",
        secret=True,
    )
    db_pool_size: int = integer(
        Derived(
            "`GRPC_MAX_WORKERS + GRPC_BLOCKING_WORKERS`",
            # Connections are per thread: one for every thread of both pools.
            lambda v: v["grpc_max_workers"] + v["grpc_blocking_workers"],
        ),
        "PostgreSQL connections per server process",
        minimum=1,
        maximum=2048,
    )
    db_pool_timeout: float = number(
        2.0, "seconds to wait for a pooled connection before answering UNAVAILABLE", minimum=0, maximum=60
    )
    db_statement_timeout_ms: int = integer(5000, "PostgreSQL statement timeout", minimum=0, maximum=3_600_000)
    db_prepare_statements: bool = boolean(
        True,
        "prepare the hot paths' statements once per PostgreSQL connection (SQL PREPARE); set false behind "
        "a pooler in transaction mode such as PgBouncer's, where a session's statements do not follow it",
    )

    jwt_secret: str = text(
        "",
        "HS256 key. Production: at least 32 random bytes as hex (64+ digits) or base64/base64url "
        "(43+ characters), e.g. `openssl rand -hex 32`, with no repeated or sequential pattern; "
        "elsewhere at least 32 bytes",
        secret=True,
        verbatim=True,
        default_doc="random per process (development only)",
    )
    jwt_issuer: str = text("referral-grpc", "`iss` claim")
    jwt_audience: str = text("referral-api", "`aud` claim")
    access_token_ttl: int = integer(900, "access token lifetime, seconds", minimum=30, maximum=86_400)
    refresh_token_ttl: int = integer(
        30 * 86_400, "refresh token lifetime, seconds (30 days)", minimum=60, maximum=365 * 86_400
    )
    refresh_reuse_grace_seconds: float = number(
        10.0,
        "a rotated refresh token presented again this soon gets the same new token (a concurrent duplicate "
        "or a retry after a lost answer) instead of revoking the session",
        minimum=0.0,
        maximum=60.0,
    )
    password_pepper: str = text(
        "",
        "HMAC key of the password pre-hash; required in production, same rules as `JWT_SECRET` and "
        "different from it. Changing it invalidates every stored password",
        secret=True,
        verbatim=True,
    )
    bcrypt_rounds: int = integer(12, "bcrypt cost (at least 10 in production)", minimum=4, maximum=16)
    password_hash_concurrency: int = integer(
        0,
        "bcrypt hashes allowed at once per process",
        minimum=0,
        maximum=256,
        default_doc="`0` (one per CPU)",
    )

    grpc_host: str = text("127.0.0.1", "where the gRPC server listens")
    grpc_port: int = integer(50051, "gRPC port (0 picks a free one)", minimum=0, maximum=65535)
    # Few on purpose: measured on 2 cores, cache-hit lookups ran at 3.7k req/s with 4 threads and 1.9k
    # with 16 (idle threads woken per request, GIL hand-offs).
    grpc_max_workers: int = integer(
        4, "threads of the main pool per process (few on purpose, see Performance)", minimum=1, maximum=1024
    )
    # Their own pool too: a stream holds its thread for as long as its caller stays.
    grpc_max_streams: int = integer(
        16,
        "open streams (WatchEvents, reflection) per process, each on a thread of its own pool; one more "
        "is refused with RESOURCE_EXHAUSTED (`SERVER_OVERLOADED`)",
        minimum=1,
        maximum=1024,
    )
    # Their own pool, so a burst of logins cannot occupy the threads cheap RPCs need.
    grpc_blocking_workers: int = integer(
        16, "threads for the RPCs that hash passwords or call Hunter", minimum=1, maximum=1024
    )
    grpc_max_concurrent_rpcs: int = integer(
        256, "beyond this, RPCs are shed with RESOURCE_EXHAUSTED", minimum=1, maximum=100_000
    )
    grpc_max_message_bytes: int = integer(
        1024 * 1024, "largest request or response", minimum=1024, maximum=64 * 1024 * 1024
    )
    grpc_grace_seconds: float = number(
        10.0, "in-flight RPCs get this long to finish on SIGTERM", minimum=0, maximum=300
    )
    grpc_reflection: bool = boolean(
        Derived("`true` (`false` in production)", lambda v: not _in_production(v)),
        "gRPC server reflection (what grpcurl's `list` uses); health checks answer either way",
    )
    grpc_reuse_port: bool = boolean(
        False,
        "let other processes bind `GRPC_PORT` too (SO_REUSEPORT), for replacing a server on the same port; "
        "off, a taken port fails the start",
    )
    server_processes: int = integer(
        1,
        "server processes `make run` starts, on consecutive ports from `GRPC_PORT`, each an Envoy endpoint",
        minimum=1,
        maximum=64,
    )

    idempotency_ttl_seconds: int = integer(
        24 * 3600,
        "how long the first response to a call with an `Idempotency-Key` is kept for its retries, seconds",
        minimum=60,
        maximum=30 * 86_400,
    )
    code_max_horizon_days: int = integer(365, "how far ahead a code may expire", minimum=1, maximum=3650)
    reset_token_ttl: int = integer(1800, "password-reset token lifetime, seconds", minimum=60, maximum=86_400)
    public_base_url: str = url(
        "",
        "when set, reset and verification emails carry links under it "
        "(`/reset-password?token=...`, `/verify-email?token=...`)",
    )
    email_verification: str = choice(
        Derived(
            "`optional` (`required` in production)", lambda v: "required" if _in_production(v) else "optional"
        ),
        "`required`: the public lookup hides unverified owners' codes and their referrals do not count; "
        "`optional`: the verified flag is recorded and shown only",
        ("required", "optional"),
    )

    redis_url: str = url(
        "",
        "`redis://host:6379/0`: code cache, throttling counters and the Huey queue; empty: in-process "
        "cache and counters, SQLite queue",
        secret=True,
    )
    redis_key_prefix: str = text("referral:", "namespace of every Redis key")
    cache_ttl_seconds: int = integer(
        300, "upper bound of a cached code's lifetime", minimum=1, maximum=86_400
    )
    near_cache_entries: int = integer(
        10_000,
        "codes each server process keeps from its recent Redis hits, dropped at once when Redis reports "
        "a change (client-side caching); 0: every lookup reads Redis",
        minimum=0,
        maximum=1_000_000,
    )
    redis_socket_timeout: float = number(
        0.1, "seconds; Redis slower than this is bypassed", minimum=0.005, maximum=10
    )

    huey_sqlite_path: str = text("var/huey.db", "queue storage when `REDIS_URL` is empty")
    outbox_relay_interval: float = number(
        2.0, "seconds between the worker's outbox sweeps", minimum=0.05, maximum=3600
    )
    outbox_lease: float = number(
        300.0, "seconds a queued delivery owns its row before the relay retries it", minimum=1, maximum=86_400
    )
    email_max_attempts: int = integer(
        10, "SMTP attempts before an email is marked failed", minimum=1, maximum=100
    )
    email_retry_base: float = number(
        4.0,
        "retry n waits `EMAIL_RETRY_BASE * 2**(n-1)` seconds, at most `EMAIL_RETRY_MAX_DELAY`",
        minimum=0.01,
        maximum=3600,
    )
    email_retry_max_delay: float = number(
        3600.0, "longest wait between SMTP retries, seconds", minimum=0.01, maximum=86_400
    )
    # Deliveries mostly wait (on webhook receivers, on the SMTP server): threads overlap the waits.
    worker_threads: int = integer(8, "worker consumer threads", minimum=1, maximum=64)
    webhook_retry_schedule: str = text(
        "5,30,120,600,1800,3600,7200,14400,28800,43200",
        "comma-separated seconds before each webhook retry (each with up to 20 % jitter); the last repeats",
    )
    webhook_timeout: float = number(10.0, "seconds a webhook receiver has to answer", minimum=0.1, maximum=60)
    webhook_disable_after_failures: int = integer(
        20,
        "consecutive failed webhook attempts that disable an endpoint (its events wait for re-enabling)",
        minimum=1,
        maximum=10_000,
    )
    webhook_allow_private_networks: bool = boolean(
        False, "deliver webhooks to loopback, private, link-local and metadata addresses (tests, `make run`)"
    )
    webhook_secret_overlap_hours: int = integer(
        24,
        "hours a rotated webhook secret still signs deliveries, next to the new one",
        minimum=0,
        maximum=720,
    )
    hunter_recheck_interval: float = number(
        600.0, "seconds between re-checks of addresses Hunter could not verify", minimum=1, maximum=86_400
    )

    smtp_host: str = text("", "outgoing mail server; without it, emails are written to the worker's log")
    smtp_port: int = integer(
        Derived(
            "`25` (`587` with `starttls`, `465` with `ssl`)",
            lambda v: {"none": 25, "starttls": 587, "ssl": 465}[v["smtp_tls"]],
        ),
        "SMTP port",
        minimum=1,
        maximum=65535,
    )
    smtp_user: str = text("", "SMTP login")
    smtp_password: str = text("", "SMTP password", secret=True, verbatim=True)
    smtp_tls: str = choice("none", "SMTP transport security", ("none", "starttls", "ssl"))
    smtp_timeout: float = number(10.0, "seconds per SMTP operation", minimum=0.1, maximum=300)
    mail_from: str = text("Referral Service <no-reply@localhost>", "sender of every email")

    hunter_url: str = url("https://api.hunter.io", "Hunter's API base URL")
    hunter_api_key: str = text("", "enables Hunter email verification on signup", secret=True)
    hunter_reject_disposable: bool = boolean(True, "refuse disposable addresses too")
    hunter_connect_timeout: float = number(1.0, "seconds to connect to Hunter", minimum=0.01, maximum=30)
    hunter_read_timeout: float = number(2.0, "seconds per read from Hunter", minimum=0.01, maximum=60)
    hunter_total_timeout_seconds: float = number(
        3.0,
        "seconds for the whole Hunter call however slowly it answers (at most half the request's time left); "
        "past it the signup proceeds unverified and is re-checked later",
        minimum=0.05,
        maximum=60,
    )

    log_level: str = choice("INFO", "logging threshold", ("DEBUG", "INFO", "WARNING", "ERROR"))
    log_format: str = choice(
        Derived("`text` (`json` in production)", lambda v: "json" if _in_production(v) else "text"),
        "`json`: one object per line",
        ("json", "text"),
    )
    # On by default: an RPC only queues the line's fields, formatted and written in batches
    # (infra.logs.AccessLog), about 2% of a cached lookup's throughput where the ordinary logging path
    # cost a third; Envoy's access log has each request with its id as well.
    access_log: bool = boolean(True, "one INFO line per RPC (method, code, duration, request id)")
    metrics_port: int = integer(
        0, "Prometheus metrics (`/metrics`) on this port, on `GRPC_HOST` (0: off)", minimum=0, maximum=65535
    )

    envoy_port: int = integer(8080, "where `make run` puts Envoy", minimum=0, maximum=65535)
    # One worker proxies tens of thousands of requests a second; on a small machine the cores are
    # better left to the Python servers.
    envoy_concurrency: int = integer(
        1, "Envoy worker threads in `make run` (0: one per core)", minimum=0, maximum=256
    )
    envoy_admin_port: int = integer(9901, "Envoy's admin port in `make run`", minimum=0, maximum=65535)
    # Rendered into Envoy's CORS policy (referral_grpc/devstack/envoy_config.py).
    cors_allowed_origins: str = text(
        Derived(
            f"empty (`{DEV_CORS_ORIGINS}` in development)",
            lambda v: "" if _in_production(v) else DEV_CORS_ORIGINS,
        ),
        "browser origins allowed to call the API through Envoy (REST and gRPC-Web), comma-separated "
        "`scheme://host[:port]`, or `*` for any; empty: none",
    )
    # Envoy's per-client token buckets on the public routes (gateway/envoy.yaml), rendered from these.
    rate_limits: bool = boolean(
        True, "Envoy's per-client rate limits on the public routes (off: behind a gateway that limits)"
    )
    rate_limit_auth_per_minute: int = integer(
        20, "Register, Login, RefreshToken per client address per minute", minimum=1, maximum=1200
    )
    rate_limit_auth_burst: int = integer(
        10,
        "Register, Login, RefreshToken a client address may make at once before the per-minute rate applies",
        minimum=1,
        maximum=100_000,
    )
    rate_limit_reset_per_minute: int = integer(
        10,
        "RequestPasswordReset, ResetPassword, VerifyEmail per client address per minute",
        minimum=1,
        maximum=1200,
    )
    rate_limit_reset_burst: int = integer(
        5,
        "reset and verification calls a client address may make at once before the per-minute rate applies",
        minimum=1,
        maximum=100_000,
    )
    rate_limit_lookup_per_minute: int = integer(
        600, "GetReferralCodeByEmail per client address per minute", minimum=1, maximum=1200
    )
    rate_limit_lookup_burst: int = integer(
        100,
        "code lookups a client address may make at once before the per-minute rate applies",
        minimum=1,
        maximum=100_000,
    )

    login_max_failures: int = integer(
        5, "consecutive failed logins allowed per account per window", minimum=1, maximum=1000
    )
    login_failure_window: int = integer(
        900, "the window of `LOGIN_MAX_FAILURES`, seconds", minimum=1, maximum=86_400
    )
    reset_max_requests: int = integer(
        3, "password-reset requests per account per window", minimum=1, maximum=1000
    )
    reset_request_window: int = integer(
        3600, "the window of `RESET_MAX_REQUESTS`, seconds", minimum=1, maximum=86_400
    )
    # The in-process counters are used alongside Redis, and alone without it.
    throttle_max_local_keys: int = integer(
        100_000, "accounts tracked in memory per throttle rule", minimum=100, maximum=10_000_000
    )
    # It must exceed the slowest normal known-email path (DB writes), or the latency tells which is which.
    signal_retention_days: int = integer(
        30,
        "days the keyed hashes of client addresses and device ids are kept for fraud checks",
        minimum=1,
        maximum=3650,
    )
    reset_request_min_seconds: float = number(
        0.1, "every reset request takes at least this long, known email or not", minimum=0, maximum=10
    )

    # Envoy's health check must notice before the listener closes.
    shutdown_drain_seconds: float = number(
        2.0,
        "on SIGTERM, seconds of NOT_SERVING (still serving) before the stop begins",
        minimum=0,
        maximum=300,
    )
    health_probe_interval: float = number(
        1.0, "seconds between the database probes behind the health status (0: off)", minimum=0, maximum=300
    )
    health_probe_timeout: float = number(1.0, "a slower probe counts as failed", minimum=0.05, maximum=60)

    # Not read from the environment: whether from_env made up the development JWT secret.
    jwt_secret_generated: bool = False

    @property
    def production(self) -> bool:
        return self.environment == "production"

    @property
    def cors_origins(self) -> tuple[str, ...]:
        """CORS_ALLOWED_ORIGINS as a list (from_env has checked each)."""
        return _origins(self.cors_allowed_origins)

    @functools.cached_property
    def database(self) -> DatabaseTarget:
        """DATABASE_URL parsed (once per Settings; from_env has already checked it)."""
        return parse_database_url(self.database_url)

    @property
    def is_sqlite(self) -> bool:
        return self.database.is_sqlite

    @property
    def webhook_retry_delays(self) -> tuple[float, ...]:
        """WEBHOOK_RETRY_SCHEDULE as seconds (checked by from_env)."""
        return parse_retry_schedule(self.webhook_retry_schedule)

    @property
    def hash_concurrency(self) -> int:
        """How many bcrypt hashes may run at once: one per core unless configured."""
        return self.password_hash_concurrency or (os.cpu_count() or 1)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        # Plain defaults first: derived ones read them.
        for derived in (False, True):
            for name, setting in declared_settings():
                if isinstance(setting.default, Derived) == derived:
                    default = setting.default.compute(values) if derived else setting.default
                    values[name] = setting.read(env, name.upper(), default)
        _check_secrets(values)
        _check_origins(values["cors_allowed_origins"])
        if _in_production(values):
            if values["debug"]:
                raise ConfigError("DEBUG must be off in production")
            if values["bcrypt_rounds"] < 10:
                raise ConfigError("BCRYPT_ROUNDS must be at least 10 in production")
        try:
            parse_retry_schedule(values["webhook_retry_schedule"])
        except ValueError as exc:
            raise ConfigError(f"WEBHOOK_RETRY_SCHEDULE: {exc}") from None
        settings = cls(**values)
        database = settings.database  # a bad DATABASE_URL stops the start, not the first query
        if settings.production and _default_credentials(database):
            log.warning("DATABASE_URL uses a default database password: give the database role a random one")
        return settings

    def ensure_local_dirs(self) -> None:
        """Create the folders of the embedded SQLite files this configuration uses, and no others."""
        paths = []
        if self.database.is_sqlite:
            paths.append(self.database.database)
        if not self.redis_url:
            paths.append(self.huey_sqlite_path)
        for path in paths:
            Path(path).parent.mkdir(parents=True, exist_ok=True)


def declared_settings() -> Iterator[tuple[str, Setting]]:
    """(attribute name, declaration) of every setting, in declaration order."""
    for each in dataclasses.fields(Settings):
        if "setting" in each.metadata:
            yield each.name, each.metadata["setting"]


# --- secrets ------------------------------------------------------------------------------------

_HEX = frozenset(string.hexdigits)
_BASE64 = frozenset(string.ascii_letters + string.digits + "+/-_")
_PLACEHOLDER_WORDS = ("change", "secret", "example", "placeholder", "default")
_REPEAT_LENGTH = 8


def _key_bytes(value: str) -> bytes | None:
    """The key material of a hex or base64/base64url secret, or None if it is in neither form."""
    if set(value) <= _HEX:
        return bytes.fromhex(value) if len(value) % 2 == 0 else None
    body = value.rstrip("=")
    if set(body) <= _BASE64 and len(value) - len(body) <= 2:
        try:
            return base64.urlsafe_b64decode(body.replace("+", "-").replace("/", "_") + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            return None
    return None


def secret_weakness(value: str) -> str | None:
    """Why `value` is no production key, or None when it is one.

    The form gives the entropy (4 bits per hex digit, 6 per base64 symbol); the other checks refuse
    what a person typed rather than a generator produced. Random keys pass each of them with a
    probability below one in a million (a 64-digit hex key has about 16 distinct digits, a 43-symbol
    base64 key about 31 symbols, and one neighbour in 5 or 20 that is a step of 0 or 1).
    """
    key = _key_bytes(value)
    if key is None or len(key) < MIN_SECRET_BYTES:
        return (
            f"use at least {MIN_SECRET_BYTES} random bytes as hex (64+ digits) or base64 (43+ characters), "
            "e.g. `openssl rand -hex 32`"
        )
    hexadecimal = set(value) <= _HEX
    if len(set(value.lower() if hexadecimal else value)) < (11 if hexadecimal else 17):
        return "too few distinct characters for random bytes"
    seen = set()
    for start in range(len(value) - _REPEAT_LENGTH + 1):
        chunk = value[start : start + _REPEAT_LENGTH]
        if chunk in seen:
            return "it repeats a pattern"
        seen.add(chunk)
    steps = sum(abs(ord(a) - ord(b)) <= 1 for a, b in itertools.pairwise(value))
    if steps * 2 >= len(value) - 1:
        return "it is mostly runs like abcd or 1111"
    if any(word in value or word.upper() in value for word in _PLACEHOLDER_WORDS):
        return "it looks like a placeholder"
    return None


def _check_secrets(values: dict[str, Any]) -> None:
    """Production needs two strong, distinct keys; development makes up a JWT key when none is set."""
    if not _in_production(values):
        if not values["jwt_secret"]:
            # Tokens simply stop working when the process restarts.
            values["jwt_secret"] = secrets.token_urlsafe(48)
            values["jwt_secret_generated"] = True
        elif len(values["jwt_secret"].encode()) < MIN_SECRET_BYTES:
            raise ConfigError(f"JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes")
        return
    for name in ("jwt_secret", "password_pepper"):
        if not values[name]:
            raise ConfigError(f"{name.upper()} is required in production")
        weakness = secret_weakness(values[name])
        if weakness:
            raise ConfigError(f"{name.upper()} is too weak: {weakness}")
    if _key_bytes(values["jwt_secret"]) == _key_bytes(values["password_pepper"]):
        raise ConfigError("PASSWORD_PEPPER must differ from JWT_SECRET")


_DEFAULT_DB_PASSWORDS = frozenset({"postgres", "password", "admin", "root", "secret", "changeme", "123456"})


def _origins(value: str) -> tuple[str, ...]:
    return tuple(origin.strip().rstrip("/") for origin in value.split(",") if origin.strip())


def _check_origins(value: str) -> None:
    for origin in _origins(value):
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise ConfigError("CORS_ALLOWED_ORIGINS must list origins as scheme://host[:port], or *")


def _default_credentials(database: DatabaseTarget) -> bool:
    password = database.connect_params.get("password")
    if not isinstance(password, str):
        return False
    return password.lower() in _DEFAULT_DB_PASSWORDS or password == database.connect_params.get("user")


# --- README -------------------------------------------------------------------------------------


def markdown_table() -> str:
    """The README's settings table, one row per setting."""
    rows = ["| variable | values | default | meaning |", "|---|---|---|---|"]
    for name, setting in declared_settings():
        cells = (f"`{name.upper()}`", setting.describe_values(), setting.describe_default(), setting.doc)
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"


_README_TABLE = re.compile(re.escape(README_TABLE_START) + r"\n.*?" + re.escape(README_TABLE_END), re.DOTALL)


def readme_with_table(readme: str) -> str:
    """`readme` with the text between the settings markers replaced by the current table."""
    if not _README_TABLE.search(readme):
        raise ValueError("the README has no settings table markers")
    table = f"{README_TABLE_START}\n{markdown_table()}{README_TABLE_END}"
    return _README_TABLE.sub(lambda _: table, readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m referral_grpc.settings", description=__doc__)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--markdown", action="store_true", help="print the settings table")
    action.add_argument("--update-readme", metavar="README", type=Path, help="rewrite the table in README")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown_table())
    else:
        args.update_readme.write_text(readme_with_table(args.update_readme.read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
