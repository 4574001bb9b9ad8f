"""Settings: the only module that reads the environment; everything else gets a frozen Settings."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# Relative paths of the embedded defaults resolve against the working directory,
# which `make run` sets to the project root: var/ is ignored by git.
DEFAULT_DATABASE_URL = "sqlite:///var/referral.db"
DEFAULT_HUEY_SQLITE_PATH = "var/huey.db"
DEFAULT_HUNTER_URL = "https://api.hunter.io"

# RFC 7518 section 3.2: an HS256 key must be at least 256 bits.
MIN_SECRET_BYTES = 32
_PLACEHOLDER_MARKERS = ("change", "secret", "example", "placeholder", "default", "your", "xxx", "todo")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """A setting is missing or invalid. The message names the setting, never its value."""


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false")


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name} must be between {minimum} and {maximum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, minimum: float, maximum: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name} must be between {minimum} and {maximum}")
    return value


def _str(env: Mapping[str, str], name: str, default: str = "") -> str:
    return env.get(name, default).strip()


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _str(env, name, default).lower()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}")
    return value


def _weak_secret(value: str) -> bool:
    lowered = value.lower()
    return (
        len(value.encode()) < MIN_SECRET_BYTES
        or len(set(value)) < 8
        or any(marker in lowered for marker in _PLACEHOLDER_MARKERS)
    )


@dataclass(frozen=True)
class Settings:
    """Every knob of the service. Build it with `Settings.from_env()`."""

    environment: str = "development"
    debug: bool = False

    # May carry a password: kept out of repr() so it never reaches a log line.
    database_url: str = field(default=DEFAULT_DATABASE_URL, repr=False)
    db_pool_size: int = 20
    db_pool_timeout: float = 2.0
    db_statement_timeout_ms: int = 5000

    jwt_secret: str = field(default="", repr=False)
    jwt_secret_generated: bool = False
    jwt_issuer: str = "referral-grpc"
    jwt_audience: str = "referral-api"
    access_token_ttl: int = 900
    refresh_token_ttl: int = 30 * 24 * 3600
    password_pepper: str = field(default="", repr=False)
    bcrypt_rounds: int = 12
    password_hash_concurrency: int = 0

    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    # Threads of the main pool. Few on purpose: measured on 2 cores, cache-hit lookups ran at 3.7k req/s
    # with 4 threads and 1.9k with 16 (idle threads woken per request, GIL hand-offs).
    grpc_max_workers: int = 4
    # Threads for the RPCs that block for long without the GIL (bcrypt, Hunter): their own pool, so a
    # burst of logins cannot occupy the threads cheap RPCs need.
    grpc_blocking_workers: int = 16
    grpc_max_concurrent_rpcs: int = 256
    grpc_max_message_bytes: int = 1024 * 1024
    grpc_grace_seconds: float = 10.0
    server_processes: int = 1

    code_max_horizon_days: int = 365
    # How long the first response to a call with an Idempotency-Key is kept for its retries.
    idempotency_ttl_seconds: int = 24 * 3600
    reset_token_ttl: int = 1800
    public_base_url: str = ""

    redis_url: str = field(default="", repr=False)
    redis_key_prefix: str = "referral:"
    cache_ttl_seconds: int = 300
    redis_socket_timeout: float = 0.1

    huey_sqlite_path: str = DEFAULT_HUEY_SQLITE_PATH
    outbox_relay_interval: float = 2.0
    # A queued delivery owns its outbox row this long; after it the relay enqueues the row again.
    outbox_lease: float = 300.0
    email_max_attempts: int = 10
    # Retry n waits email_retry_base * 2**(n-1) seconds, capped at email_retry_max_delay.
    email_retry_base: float = 4.0
    email_retry_max_delay: float = 3600.0
    worker_threads: int = 2
    hunter_recheck_interval: float = 600.0

    smtp_host: str = ""
    smtp_port: int = 25
    smtp_user: str = ""
    smtp_password: str = field(default="", repr=False)
    smtp_tls: str = "none"
    smtp_timeout: float = 10.0
    mail_from: str = "Referral Service <no-reply@localhost>"

    hunter_url: str = DEFAULT_HUNTER_URL
    hunter_api_key: str = field(default="", repr=False)
    hunter_reject_disposable: bool = True
    hunter_connect_timeout: float = 1.0
    hunter_read_timeout: float = 2.0

    log_level: str = "INFO"
    log_format: str = "text"
    # One INFO line per RPC; Envoy's access log may make it redundant at high request rates.
    access_log: bool = True
    metrics_port: int = 0

    envoy_port: int = 8080
    # Envoy worker threads for `make run` (0: one per core, Envoy's default). One worker proxies tens of
    # thousands of requests a second; on a small machine the cores are better left to the Python servers.
    envoy_concurrency: int = 1
    envoy_admin_port: int = 9901

    # Per-account throttles (referral_grpc/throttle.py): at most N attempts per window of W seconds.
    login_max_failures: int = 5
    login_failure_window: int = 900
    reset_max_requests: int = 3
    reset_request_window: int = 3600
    # Per rule, the in-process counters (used alongside Redis, alone without it) keep this many accounts.
    throttle_max_local_keys: int = 100_000
    # Every accepted RequestPasswordReset lasts at least this long, registered email or not, so its
    # latency does not reveal which; it must exceed the slowest normal known-email path (DB writes).
    reset_request_min_seconds: float = 0.1

    # Operations: on SIGTERM, report NOT_SERVING this long (still serving) so Envoy's health check
    # notices before the listener closes; then in-flight RPCs get GRPC_GRACE_SECONDS.
    shutdown_drain_seconds: float = 2.0
    # Background `SELECT 1` that flips the gRPC health status (0 = off), and how long it may take.
    health_probe_interval: float = 1.0
    health_probe_timeout: float = 1.0

    @property
    def production(self) -> bool:
        return self.environment == "production"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def hash_concurrency(self) -> int:
        """How many bcrypt hashes may run at once: one per core unless configured."""
        return self.password_hash_concurrency or (os.cpu_count() or 1)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        environment = _choice(env, "ENVIRONMENT", "development", ("development", "production"))
        production = environment == "production"
        debug = _bool(env, "DEBUG", False)

        jwt_secret = env.get("JWT_SECRET", "")
        generated = False
        pepper = env.get("PASSWORD_PEPPER", "")
        if production:
            if debug:
                raise ConfigError("DEBUG must be off in production")
            if not jwt_secret:
                raise ConfigError("JWT_SECRET is required in production")
            if _weak_secret(jwt_secret):
                raise ConfigError(
                    f"JWT_SECRET is too weak: use at least {MIN_SECRET_BYTES} random bytes, not a placeholder"
                )
            if not pepper:
                raise ConfigError("PASSWORD_PEPPER is required in production")
            if _weak_secret(pepper):
                raise ConfigError(
                    f"PASSWORD_PEPPER is too weak: use at least {MIN_SECRET_BYTES} random bytes, "
                    "not a placeholder"
                )
        elif not jwt_secret:
            # Development only: tokens simply stop working when the process restarts.
            jwt_secret = secrets.token_urlsafe(48)
            generated = True
        elif len(jwt_secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(f"JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes")

        grpc_max_workers = _int(env, "GRPC_MAX_WORKERS", 4, minimum=1, maximum=1024)
        grpc_blocking_workers = _int(env, "GRPC_BLOCKING_WORKERS", 16, minimum=1, maximum=1024)
        bcrypt_rounds = _int(env, "BCRYPT_ROUNDS", 12, minimum=4, maximum=16)
        if production and bcrypt_rounds < 10:
            raise ConfigError("BCRYPT_ROUNDS must be at least 10 in production")

        smtp_tls = _choice(env, "SMTP_TLS", "none", ("none", "starttls", "ssl"))
        default_smtp_port = {"none": 25, "starttls": 587, "ssl": 465}[smtp_tls]

        return cls(
            environment=environment,
            debug=debug,
            database_url=_str(env, "DATABASE_URL") or DEFAULT_DATABASE_URL,
            # Connections are per thread: one for every thread of both pools.
            db_pool_size=_int(
                env, "DB_POOL_SIZE", grpc_max_workers + grpc_blocking_workers, minimum=1, maximum=2048
            ),
            db_pool_timeout=_float(env, "DB_POOL_TIMEOUT", 2.0, minimum=0.0, maximum=60.0),
            db_statement_timeout_ms=_int(env, "DB_STATEMENT_TIMEOUT_MS", 5000, minimum=0, maximum=3_600_000),
            jwt_secret=jwt_secret,
            jwt_secret_generated=generated,
            jwt_issuer=_str(env, "JWT_ISSUER", "referral-grpc") or "referral-grpc",
            jwt_audience=_str(env, "JWT_AUDIENCE", "referral-api") or "referral-api",
            access_token_ttl=_int(env, "ACCESS_TOKEN_TTL", 900, minimum=30, maximum=86_400),
            refresh_token_ttl=_int(env, "REFRESH_TOKEN_TTL", 30 * 86_400, minimum=60, maximum=365 * 86_400),
            password_pepper=pepper,
            bcrypt_rounds=bcrypt_rounds,
            password_hash_concurrency=_int(env, "PASSWORD_HASH_CONCURRENCY", 0, minimum=0, maximum=256),
            grpc_host=_str(env, "GRPC_HOST", "127.0.0.1") or "127.0.0.1",
            grpc_port=_int(env, "GRPC_PORT", 50051, minimum=0, maximum=65535),
            grpc_max_workers=grpc_max_workers,
            grpc_blocking_workers=grpc_blocking_workers,
            grpc_max_concurrent_rpcs=_int(env, "GRPC_MAX_CONCURRENT_RPCS", 256, minimum=1, maximum=100_000),
            grpc_max_message_bytes=_int(
                env, "GRPC_MAX_MESSAGE_BYTES", 1024 * 1024, minimum=1024, maximum=64 * 1024 * 1024
            ),
            grpc_grace_seconds=_float(env, "GRPC_GRACE_SECONDS", 10.0, minimum=0.0, maximum=300.0),
            server_processes=_int(env, "SERVER_PROCESSES", 1, minimum=1, maximum=64),
            code_max_horizon_days=_int(env, "CODE_MAX_HORIZON_DAYS", 365, minimum=1, maximum=3650),
            idempotency_ttl_seconds=_int(
                env, "IDEMPOTENCY_TTL_SECONDS", 24 * 3600, minimum=60, maximum=30 * 86_400
            ),
            reset_token_ttl=_int(env, "RESET_TOKEN_TTL", 1800, minimum=60, maximum=86_400),
            public_base_url=_str(env, "PUBLIC_BASE_URL").rstrip("/"),
            redis_url=_str(env, "REDIS_URL"),
            redis_key_prefix=_str(env, "REDIS_KEY_PREFIX", "referral:") or "referral:",
            cache_ttl_seconds=_int(env, "CACHE_TTL_SECONDS", 300, minimum=1, maximum=86_400),
            redis_socket_timeout=_float(env, "REDIS_SOCKET_TIMEOUT", 0.1, minimum=0.005, maximum=10.0),
            huey_sqlite_path=_str(env, "HUEY_SQLITE_PATH") or DEFAULT_HUEY_SQLITE_PATH,
            outbox_relay_interval=_float(env, "OUTBOX_RELAY_INTERVAL", 2.0, minimum=0.05, maximum=3600.0),
            outbox_lease=_float(env, "OUTBOX_LEASE", 300.0, minimum=1.0, maximum=86_400.0),
            email_max_attempts=_int(env, "EMAIL_MAX_ATTEMPTS", 10, minimum=1, maximum=100),
            email_retry_base=_float(env, "EMAIL_RETRY_BASE", 4.0, minimum=0.01, maximum=3600.0),
            email_retry_max_delay=_float(
                env, "EMAIL_RETRY_MAX_DELAY", 3600.0, minimum=0.01, maximum=86_400.0
            ),
            worker_threads=_int(env, "WORKER_THREADS", 2, minimum=1, maximum=64),
            hunter_recheck_interval=_float(
                env, "HUNTER_RECHECK_INTERVAL", 600.0, minimum=1.0, maximum=86_400.0
            ),
            smtp_host=_str(env, "SMTP_HOST"),
            smtp_port=_int(env, "SMTP_PORT", default_smtp_port, minimum=1, maximum=65535),
            smtp_user=_str(env, "SMTP_USER"),
            smtp_password=env.get("SMTP_PASSWORD", ""),
            smtp_tls=smtp_tls,
            smtp_timeout=_float(env, "SMTP_TIMEOUT", 10.0, minimum=0.1, maximum=300.0),
            mail_from=_str(env, "MAIL_FROM") or "Referral Service <no-reply@localhost>",
            hunter_url=(_str(env, "HUNTER_URL") or DEFAULT_HUNTER_URL).rstrip("/"),
            hunter_api_key=_str(env, "HUNTER_API_KEY"),
            hunter_reject_disposable=_bool(env, "HUNTER_REJECT_DISPOSABLE", True),
            hunter_connect_timeout=_float(env, "HUNTER_CONNECT_TIMEOUT", 1.0, minimum=0.01, maximum=30.0),
            hunter_read_timeout=_float(env, "HUNTER_READ_TIMEOUT", 2.0, minimum=0.01, maximum=60.0),
            log_level=_choice(env, "LOG_LEVEL", "info", ("debug", "info", "warning", "error")).upper(),
            log_format=_choice(env, "LOG_FORMAT", "json" if production else "text", ("json", "text")),
            access_log=_bool(env, "ACCESS_LOG", True),
            metrics_port=_int(env, "METRICS_PORT", 0, minimum=0, maximum=65535),
            envoy_port=_int(env, "ENVOY_PORT", 8080, minimum=0, maximum=65535),
            envoy_admin_port=_int(env, "ENVOY_ADMIN_PORT", 9901, minimum=0, maximum=65535),
            envoy_concurrency=_int(env, "ENVOY_CONCURRENCY", 1, minimum=0, maximum=256),
            login_max_failures=_int(env, "LOGIN_MAX_FAILURES", 5, minimum=1, maximum=1000),
            login_failure_window=_int(env, "LOGIN_FAILURE_WINDOW", 900, minimum=1, maximum=86_400),
            reset_max_requests=_int(env, "RESET_MAX_REQUESTS", 3, minimum=1, maximum=1000),
            reset_request_window=_int(env, "RESET_REQUEST_WINDOW", 3600, minimum=1, maximum=86_400),
            throttle_max_local_keys=_int(
                env, "THROTTLE_MAX_LOCAL_KEYS", 100_000, minimum=100, maximum=10_000_000
            ),
            reset_request_min_seconds=_float(
                env, "RESET_REQUEST_MIN_SECONDS", 0.1, minimum=0.0, maximum=10.0
            ),
            shutdown_drain_seconds=_float(env, "SHUTDOWN_DRAIN_SECONDS", 2.0, minimum=0.0, maximum=300.0),
            health_probe_interval=_float(env, "HEALTH_PROBE_INTERVAL", 1.0, minimum=0.0, maximum=300.0),
            health_probe_timeout=_float(env, "HEALTH_PROBE_TIMEOUT", 1.0, minimum=0.05, maximum=60.0),
        )

    def ensure_local_dirs(self) -> None:
        """Create the folders of the embedded SQLite files (var/ by default)."""
        paths = [self.huey_sqlite_path]
        if self.is_sqlite:
            paths.append(self.database_url.split(":///", 1)[-1])
        for path in paths:
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
