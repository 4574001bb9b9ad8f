"""Settings: declared once, production refuses weak secrets and debug, names a setting but never its value."""

from __future__ import annotations

import base64
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support import make_settings
from support.api import running_api

from referral_grpc import settings as settings_module
from referral_grpc.settings import ConfigError, Settings
from referral_grpc.store.database import DatabaseProbe, make_database

STRONG = secrets.token_urlsafe(48)
STRONG_PEPPER = secrets.token_urlsafe(48)


def production(**overrides: str) -> dict[str, str]:
    env = {"ENVIRONMENT": "production", "JWT_SECRET": STRONG, "PASSWORD_PEPPER": STRONG_PEPPER}
    env.update(overrides)
    return {key: value for key, value in env.items() if value != "<unset>"}


def test_a_strong_production_configuration_starts() -> None:
    settings = Settings.from_env(production())
    assert settings.production
    assert settings.log_format == "json"  # structured logs by default in production
    assert not settings.jwt_secret_generated


# The values are distinctive so that "never echoed" is a meaningful check.
WEAK_SECRETS = [
    pytest.param("<unset>", "JWT_SECRET", id="missing"),
    pytest.param("Kq9-short-Zx7", "JWT_SECRET", id="short"),
    pytest.param("change-me-please-" + "Qw3rTy" * 5, "JWT_SECRET", id="placeholder"),
    pytest.param("ab" * 24, "JWT_SECRET", id="low-variety"),
]


@pytest.mark.parametrize(("value", "name"), WEAK_SECRETS)
def test_production_refuses_a_weak_jwt_secret_without_echoing_it(value: str, name: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(production(JWT_SECRET=value))
    assert name in str(refused.value)
    if value != "<unset>":
        assert value not in str(refused.value)


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"DEBUG": "true"}, "DEBUG"),
        ({"PASSWORD_PEPPER": "<unset>"}, "PASSWORD_PEPPER"),
        ({"PASSWORD_PEPPER": "your-pepper-goes-here-" + "Zx8" * 6}, "PASSWORD_PEPPER"),
        ({"BCRYPT_ROUNDS": "8"}, "BCRYPT_ROUNDS"),
    ],
)
def test_production_refuses_debug_and_weak_options(overrides: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(production(**overrides))
    assert name in str(refused.value)
    for value in overrides.values():
        if value not in ("<unset>", "true", "8"):
            assert value not in str(refused.value)


def test_development_generates_a_key_but_still_refuses_a_short_one() -> None:
    assert Settings.from_env({}).jwt_secret_generated
    with pytest.raises(ConfigError, match="JWT_SECRET"):
        Settings.from_env({"JWT_SECRET": "Kq9-short-Zx7"})


def test_invalid_values_are_named_not_echoed() -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"GRPC_PORT": "p4ss-w0rd-by-mistake"})
    assert "GRPC_PORT" in str(refused.value)
    assert "p4ss-w0rd-by-mistake" not in str(refused.value)


def test_secrets_stay_out_of_repr() -> None:
    settings = Settings.from_env(production(SMTP_PASSWORD="smtp-Pw-91x", HUNTER_API_KEY="hunter-Key-77q"))
    text = repr(settings)
    for secret in (STRONG, STRONG_PEPPER, "smtp-Pw-91x", "hunter-Key-77q"):
        assert secret not in text


def test_operations_settings() -> None:
    defaults = Settings.from_env({})
    assert (defaults.shutdown_drain_seconds, defaults.health_probe_interval, defaults.metrics_port) == (
        2.0,
        1.0,
        0,
    )
    tuned = Settings.from_env(
        {"SHUTDOWN_DRAIN_SECONDS": "0.5", "HEALTH_PROBE_INTERVAL": "0", "METRICS_PORT": "9464"}
    )
    assert (tuned.shutdown_drain_seconds, tuned.health_probe_interval, tuned.metrics_port) == (0.5, 0.0, 9464)
    with pytest.raises(ConfigError, match="HEALTH_PROBE_TIMEOUT"):
        Settings.from_env({"HEALTH_PROBE_TIMEOUT": "0"})


@pytest.mark.parametrize(
    ("overrides", "name", "hidden"),
    [
        ({"JWT_SECRET": "Kq9-short-Zx7"}, "JWT_SECRET", "Kq9-short-Zx7"),
        ({"JWT_SECRET": "change-me-please-" + "Qw3rTy" * 5}, "JWT_SECRET", "Qw3rTy"),
        ({"DEBUG": "1"}, "DEBUG", STRONG),
    ],
    ids=["short-secret", "placeholder-secret", "debug-on"],  # ids never carry a generated secret
)
def test_serve_exits_2_on_bad_production_settings(
    overrides: dict[str, str], name: str, hidden: str, tmp_path: Path
) -> None:
    env = {"PATH": os.environ.get("PATH", ""), **production(**overrides)}
    result = subprocess.run(
        [sys.executable, "-m", "referral_grpc", "serve"],
        env=env,
        cwd=tmp_path,  # a server that did start would create var/ here, not in the checkout
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert name in result.stderr
    assert hidden not in result.stderr + result.stdout
    assert STRONG_PEPPER not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


# --- secret strength (issue 10, item 13) ---------------------------------------------------------

# Each passes the old length-and-variety check; each is refused now. Values are distinctive, so that
# "never echoed" means something.
PATTERNED_SECRETS = [
    pytest.param(secrets.token_hex(16), id="16-byte-hex"),
    pytest.param(secrets.token_hex(24), id="24-byte-hex"),
    pytest.param("abcdefgh" * 4, id="abcdefgh-x4"),
    pytest.param("Kq9xZ7wM" * 8, id="8-chars-x8"),
    pytest.param("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", id="alphabet"),
    pytest.param("".join(secrets.choice("0123456789") for _ in range(80)), id="decimal-digits"),
    pytest.param("Qx!9#mR2&vL8^tB5*nK4(hJ7)gF3%dS6@aP1" + "~wE0", id="not-hex-or-base64"),
    pytest.param(secrets.token_hex(32)[:40] + "example" + secrets.token_hex(8), id="placeholder-word"),
]


@pytest.mark.parametrize("name", ["JWT_SECRET", "PASSWORD_PEPPER"])
@pytest.mark.parametrize("value", PATTERNED_SECRETS)
def test_production_refuses_secrets_without_256_random_bits(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(production(**{name: value}))
    assert str(refused.value).startswith(f"{name} is too weak")
    assert value not in str(refused.value)
    for part in range(0, len(value) - 8, 8):
        assert value[part : part + 8] not in str(refused.value)


@pytest.mark.parametrize(
    "make_key",
    [
        pytest.param(lambda: secrets.token_hex(32), id="hex"),
        pytest.param(lambda: secrets.token_hex(32).upper(), id="upper-hex"),
        pytest.param(lambda: secrets.token_urlsafe(32), id="base64url"),
        pytest.param(lambda: base64.b64encode(os.urandom(32)).decode(), id="base64-padded"),
        pytest.param(lambda: secrets.token_urlsafe(64), id="longer"),
    ],
)
def test_production_accepts_generated_keys_in_each_documented_form(make_key: Callable[[], str]) -> None:
    for _ in range(200):
        settings = Settings.from_env(production(JWT_SECRET=make_key(), PASSWORD_PEPPER=make_key()))
        assert settings.production


def test_production_refuses_a_pepper_equal_to_the_jwt_secret() -> None:
    key = secrets.token_hex(32)
    for pepper in (key, key.upper()):  # the same 32 bytes, however they are spelt
        with pytest.raises(ConfigError) as refused:
            Settings.from_env(production(JWT_SECRET=key, PASSWORD_PEPPER=pepper))
        assert "PASSWORD_PEPPER" in str(refused.value)
        assert key not in str(refused.value).lower()


@pytest.mark.parametrize(
    ("url", "warned"),
    [
        ("postgresql://postgres:postgres@db.internal:5432/referral", True),
        ("postgresql://referral:referral@db.internal/referral", True),
        ("postgres://app:Password@db.internal/referral", True),
        ("postgresql://referral:Vd7-qLx2-Hn4w@db.internal/referral", False),
        ("postgresql://referral@db.internal/referral", False),
    ],
)
def test_production_warns_about_default_database_credentials(
    url: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="referral_grpc.settings"):
        Settings.from_env(production(DATABASE_URL=url))
    warnings = [record.getMessage() for record in caplog.records]
    assert bool(warnings) == warned
    for message in warnings:
        assert "DATABASE_URL" in message
        assert "db.internal" not in message and "Password" not in message


# --- one declaration per setting -----------------------------------------------------------------


def test_every_attribute_but_the_generated_flag_is_a_declared_setting() -> None:
    declared = {name for name, _ in settings_module.declared_settings()}
    attributes = {name for name in Settings.__dataclass_fields__}
    assert attributes - declared == {"jwt_secret_generated"}
    assert {name.upper() for name in declared} >= {"DATABASE_URL", "GRPC_REFLECTION", "DB_POOL_SIZE"}


def test_secret_settings_stay_out_of_repr_by_declaration() -> None:
    secret = {name for name, setting in settings_module.declared_settings() if setting.secret}
    assert secret == {
        "database_url",
        "jwt_secret",
        "password_pepper",
        "redis_url",
        "smtp_password",
        "hunter_api_key",
    }
    text = repr(Settings.from_env(production(DATABASE_URL="postgresql://app:Vd7-qLx2-Hn4w@db/x")))
    assert "Vd7-qLx2-Hn4w" not in text and "database_url" not in text


def test_derived_defaults_follow_the_settings_they_derive_from() -> None:
    defaults = Settings.from_env({})
    assert (defaults.db_pool_size, defaults.smtp_port, defaults.log_format, defaults.grpc_reflection) == (
        20,
        25,
        "text",
        True,
    )
    tuned = Settings.from_env({"GRPC_MAX_WORKERS": "8", "GRPC_BLOCKING_WORKERS": "2", "SMTP_TLS": "ssl"})
    assert (tuned.db_pool_size, tuned.smtp_port) == (10, 465)
    assert Settings.from_env({"SMTP_TLS": "STARTTLS"}).smtp_port == 587
    prod = Settings.from_env(production())
    assert (prod.log_format, prod.grpc_reflection) == ("json", False)
    explicit = Settings.from_env(
        production(
            DB_POOL_SIZE="3", SMTP_TLS="ssl", SMTP_PORT="2465", LOG_FORMAT="text", GRPC_REFLECTION="on"
        )
    )
    assert (explicit.db_pool_size, explicit.smtp_port, explicit.log_format, explicit.grpc_reflection) == (
        3,
        2465,
        "text",
        True,
    )


def test_a_blank_variable_means_the_default() -> None:
    """docker-compose passes `${SMTP_PORT:-}` as an empty string."""
    blank = Settings.from_env({"SMTP_PORT": "", "ACCESS_LOG": " ", "HUNTER_URL": "", "LOG_LEVEL": ""})
    assert (blank.smtp_port, blank.access_log, blank.hunter_url, blank.log_level) == (
        25,
        True,
        "https://api.hunter.io",
        "INFO",
    )


def test_the_readme_table_is_the_declarations(tmp_path: Path) -> None:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    start = text.index(settings_module.README_TABLE_START) + len(settings_module.README_TABLE_START) + 1
    end = text.index(settings_module.README_TABLE_END)
    assert text[start:end] == settings_module.markdown_table(), (
        "README settings table is stale: run `python -m referral_grpc.settings --update-readme README.md`"
    )
    rows = text[start:end].splitlines()[2:]
    assert len(rows) == len(list(settings_module.declared_settings()))

    stale = tmp_path / "README.md"
    stale.write_text(text[:start] + "| old | table |\n" + text[end:])
    assert settings_module.main(["--update-readme", str(stale)]) == 0
    assert stale.read_text() == text


# --- DATABASE_URL, parsed once ------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///:memory:",
        "sqlite://",
        "mysql://root@db/referral",
        "redis://cache:6379/0",
        "var/referral.db",
        "postgresql://app:Vd7-qLx2@db:54x2/referral",
    ],
)
def test_an_unusable_database_url_stops_the_start(url: str) -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL") as refused:
        Settings.from_env({"DATABASE_URL": url})
    assert "Vd7-qLx2" not in str(refused.value) and "54x2" not in str(refused.value)


def test_database_url_parts_are_decoded_and_query_options_reach_postgresql(pg_url: str) -> None:
    user_and_host = pg_url.split("://", 1)[1].split("/", 1)[0]
    host = user_and_host.split("@")[-1]
    # %2D is "-": percent-encoding is decoded; the query string carries libpq options.
    url = f"postgresql://post%67res@{host}/{pg_url.rsplit('/', 1)[1]}?application_name=referral%2Dsettings"
    settings = make_settings(database_url=url)
    assert settings.database.connect_params["user"] == "postgres"
    db = make_database(settings)
    try:
        name = db.execute_sql("SHOW application_name").fetchone()[0]
        zone = db.execute_sql("SHOW timezone").fetchone()[0]
    finally:
        db.close()
    assert (name, zone) == ("referral-settings", "UTC")
    probe = DatabaseProbe(settings, timeout=2)
    probe.check()
    probe.close()


def test_a_relative_sqlite_path_is_used_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({"DATABASE_URL": "sqlite:///data/referral.db", "REDIS_URL": "redis://x"})
    settings.ensure_local_dirs()
    db = make_database(settings)
    db.connect()
    db.close()
    DatabaseProbe(settings, timeout=1).check()
    assert (tmp_path / "data" / "referral.db").is_file()
    assert settings.database.location == "data/referral.db"


# --- local folders: only what is used (issue 14) ---------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "created"),
    [
        ({}, {"var"}),
        ({"REDIS_URL": "redis://127.0.0.1:6379/0"}, {"var"}),
        ({"DATABASE_URL": "sqlite:///db/referral.db", "REDIS_URL": "redis://127.0.0.1:6379/0"}, {"db"}),
        ({"DATABASE_URL": "postgresql://postgres@127.0.0.1/referral"}, {"var"}),
        (
            {"DATABASE_URL": "postgresql://postgres@127.0.0.1/referral", "REDIS_URL": "redis://127.0.0.1/0"},
            set(),
        ),
    ],
)
def test_ensure_local_dirs_creates_only_the_folders_in_use(
    overrides: dict[str, str], created: set[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Settings.from_env(overrides).ensure_local_dirs()
    assert {path.name for path in tmp_path.iterdir()} == created


# --- reflection (issue 10, item 19) ---------------------------------------------------------------


def _reflected_services(channel: grpc.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    return {service.name for service in responses[0].list_services_response.service}


@pytest.mark.parametrize("environment", ["development", "production"])
def test_reflection_only_where_it_is_on_and_health_everywhere(environment: str, sqlite_url: str) -> None:
    overrides: dict[str, object] = {"database_url": sqlite_url, "environment": environment}
    if environment == "production":
        overrides.update(password_pepper=STRONG_PEPPER, bcrypt_rounds=10)
    with running_api(make_settings(**overrides)) as api:
        health = health_pb2_grpc.HealthStub(api.channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service="referral.v1.AuthService"), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        if environment == "development":
            assert "referral.v1.AuthService" in _reflected_services(api.channel)
        else:
            with pytest.raises(grpc.RpcError) as refused:
                _reflected_services(api.channel)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with running_api(make_settings(**overrides, grpc_reflection="true")) as api:
        assert "referral.v1.ReferralService" in _reflected_services(api.channel)


def test_cors_origins_are_none_in_production_and_the_dev_page_in_development() -> None:
    assert make_settings().cors_origins == ("http://localhost:3000", "http://127.0.0.1:3000")
    assert Settings.from_env(production()).cors_origins == ()
    chosen = make_settings(cors_allowed_origins=" https://app.example.com , http://[::1]:8000/ ,")
    assert chosen.cors_origins == ("https://app.example.com", "http://[::1]:8000")
    assert make_settings(cors_allowed_origins="*").cors_origins == ("*",)


@pytest.mark.parametrize(
    "value", ["app.example.com", "https://app.example.com/path", "ftp://x.example", "https://a.example?x"]
)
def test_a_cors_origin_that_a_browser_cannot_send_stops_the_start(value: str) -> None:
    with pytest.raises(ConfigError, match="CORS_ALLOWED_ORIGINS"):
        make_settings(cors_allowed_origins=value)
