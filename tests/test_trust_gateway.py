"""Trust and safety through real Envoy: admin REST paths with templates, data rights, the device header."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from support import TEST_JWT_SECRET
from support.envoy import Envoy, migrate, running_envoy, running_server, server_env

from referral_grpc.devstack.locations import Address

PASSWORD = "correct horse battery"
APIKEY_CREATE = (sys.executable, "-m", "referral_grpc", "apikey", "create")


@pytest.fixture(scope="module")
def env(module_pg_url: str) -> dict[str, str]:
    values = server_env(DATABASE_URL=module_pg_url, JWT_SECRET=TEST_JWT_SECRET)
    migrate(values)
    return values


@pytest.fixture(scope="module")
def backend(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Address]:
    with running_server(env, tmp_path_factory.mktemp("server") / "server.log") as (_, address):
        yield address


@pytest.fixture(scope="module")
def envoy(backend: Address, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Envoy]:
    with running_envoy([backend], tmp_path_factory.mktemp("envoy")) as running:
        yield running


@pytest.fixture(scope="module")
def admin_key(env: dict[str, str]) -> str:
    """Created the way an operator does: `referral-grpc apikey create`, the key alone on the last line."""
    created = subprocess.run(
        [*APIKEY_CREATE, "--name", "ops", "--scope", "admin:read", "--scope", "admin:write"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return created.stdout.strip().splitlines()[-1]


def call(envoy: Envoy, method: str, path: str, *, token: str = "", key: str = "", **kwargs: Any) -> Any:
    headers = dict(kwargs.pop("headers", {}))
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if key:
        headers["x-api-key"] = key
    response = requests.request(method, envoy.url + path, headers=headers, timeout=15, **kwargs)
    assert response.headers["content-type"] == "application/json", (response.status_code, response.text)
    return response


def register(envoy: Envoy, email: str, code: str = "", device: str = "") -> dict[str, Any]:
    body = {"email": email, "password": PASSWORD} | ({"referral_code": code} if code else {})
    headers = {"x-device-id": device} if device else {}
    response = call(envoy, "POST", "/auth/register", json=body, headers=headers)
    assert response.status_code == 200, response.text
    tokens: dict[str, Any] = response.json()
    return tokens


def in_days(days: int) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")


def email(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}@example.com"


def test_admin_rest_paths_and_the_user_token_refused(envoy: Envoy, admin_key: str) -> None:
    address = email("target")
    user = register(envoy, address)
    by_id = call(envoy, "GET", f"/admin/users/{user['user_id']}", key=admin_key).json()
    by_email = call(envoy, "GET", "/admin/users", params={"email": address}, key=admin_key).json()
    assert by_id == by_email and by_id["blocked"] is False
    refused = call(envoy, "GET", f"/admin/users/{user['user_id']}", token=user["access_token"])
    assert refused.status_code == 401
    # A template path has its own 405 route: a method it does not have is answered with Allow.
    wrong = call(envoy, "PUT", f"/admin/users/{user['user_id']}", key=admin_key, json={})
    assert (wrong.status_code, wrong.headers["allow"]) == (405, "GET")
    blocked = call(envoy, "POST", f"/admin/users/{user['user_id']}/block", key=admin_key, json={"note": "x"})
    assert blocked.status_code == 200 and blocked.json()["blocked"] is True
    login = call(envoy, "POST", "/auth/login", json={"email": address, "password": PASSWORD})
    assert login.status_code == 401 and login.json()["details"][0]["reason"] == "ACCOUNT_BLOCKED"
    audit = call(envoy, "GET", "/admin/audit", params={"target": f"user:{user['user_id']}"}, key=admin_key)
    assert [e["action"] for e in audit.json()["events"]] == ["user.block"]


def test_the_device_header_reaches_the_fraud_checks(envoy: Envoy, admin_key: str) -> None:
    referrer_email = email("referrer")
    referrer = register(envoy, referrer_email, device="shared-tablet")
    created = call(
        envoy,
        "POST",
        "/referral/code",
        token=referrer["access_token"],
        json={"expires_at": in_days(30)},
    )
    assert created.status_code == 200, created.text
    newcomer = register(envoy, email("newcomer"), code=created.json()["code"], device="shared-tablet")
    rejected = call(envoy, "GET", "/admin/referrals", params={"state": "reject"}, key=admin_key).json()
    [mine] = [r for r in rejected["referrals"] if r["user_id"] == newcomer["user_id"]]
    assert "self_referral_device" in [r["code"] for r in mine["reasons"]]
    # The values the rules saw are a JSON object, typed (a false or a 0 that was seen is printed), and
    # the deprecated string holds the same values.
    seen = mine["fraud_signals"]
    assert seen["same_device"] is True and seen["same_normalised_email"] is False, seen
    assert seen["referrals_last_hour"] == 1 and seen["referrer_age_hours"] == 0, seen
    assert json.loads(mine["signals"]) == seen


def test_export_and_erase_over_rest(envoy: Envoy) -> None:
    address = email("leaving")
    user = register(envoy, address)
    exported = call(envoy, "GET", "/me/export", token=user["access_token"])
    assert exported.status_code == 200 and exported.json()["data"]["account"]["email"] == address
    wrong = call(envoy, "DELETE", "/me", token=user["access_token"], json={"current_password": "nope"})
    assert wrong.status_code == 400
    erased = call(envoy, "DELETE", "/me", token=user["access_token"], json={"current_password": PASSWORD})
    assert erased.status_code == 200, erased.text
    assert call(envoy, "GET", "/me/export", token=user["access_token"]).status_code == 401
