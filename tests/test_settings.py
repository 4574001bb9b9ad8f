"""Settings: production refuses weak secrets and debug, names the setting but never echoes its value."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from referral_grpc.settings import ConfigError, Settings

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
