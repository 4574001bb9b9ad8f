"""REST and gRPC through a real Envoy in front of a real server process on PostgreSQL; the stack; compose."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import psycopg2
import pytest
import requests
import yaml
from google.api import annotations_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import HealthServicer
from grpc_status import rpc_status
from jsonschema import Draft202012Validator
from support import TEST_JWT_SECRET, make_settings, wait_until
from support.envoy import (
    Envoy,
    create_api_key,
    migrate,
    running_envoy,
    running_server,
    server_env,
    set_program,
)

from referral_grpc.devstack.envoy_config import docker_envoy_config, render_envoy_config
from referral_grpc.devstack.envoy_process import validate_config_file, validate_gateway
from referral_grpc.devstack.locations import PROJECT_ROOT, Address, envoy_binary
from referral_grpc.domain import errors
from referral_grpc.gen import admin_service_pb2 as admin_pb
from referral_grpc.gen import auth_service_pb2 as auth_pb
from referral_grpc.gen import auth_service_pb2_grpc, referral_service_pb2_grpc
from referral_grpc.gen import event_service_pb2 as event_pb
from referral_grpc.gen import referral_service_pb2 as ref_pb
from referral_grpc.gen import reward_service_pb2 as reward_pb
from referral_grpc.gen import webhook_service_pb2 as webhook_pb

PASSWORD = "correct horse battery"
GATEWAY = PROJECT_ROOT / "gateway"
DOCUMENT: dict[str, Any] = json.loads((GATEWAY / "openapi.json").read_text())
TOKEN_KEYS = {"user_id", "access_token", "token_type", "expires_in", "refresh_token", "refresh_expires_in"}


# --- fixtures and helpers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(module_pg_url: str) -> dict[str, str]:
    values = server_env(DATABASE_URL=module_pg_url, JWT_SECRET=TEST_JWT_SECRET)
    migrate(values)
    return values


@pytest.fixture(scope="module")
def api_key(env: dict[str, str]) -> str:
    """A backend's key with every rewards and admin scope, and a program paying at once (no hold), both set
    up the way an operator does: with the `referral-grpc` commands against the service's database."""
    set_program(
        env,
        "--currency=USD",
        "--referrer-reward-minor=500",
        "--referee-reward-minor=200",
        "--hold-days=0",
    )
    scopes = ("events:write", "rewards:read", "rewards:redeem", "admin:read", "admin:write")
    return create_api_key(env, "gateway-tests", *scopes)


@pytest.fixture(scope="module")
def events_key(env: dict[str, str]) -> str:
    """A backend's key for the event log and webhook endpoints."""
    return create_api_key(env, "gateway-events", "events:read", "webhooks:manage")


@pytest.fixture(scope="module")
def backend(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Address]:
    with running_server(env, tmp_path_factory.mktemp("server") / "server.log") as (_, address):
        yield address


@pytest.fixture(scope="module")
def envoy(backend: Address, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Envoy]:
    with running_envoy([backend], tmp_path_factory.mktemp("envoy")) as running:
        yield running


@dataclass
class Rest:
    """A REST client of the gateway; every answer must be JSON."""

    base: str
    session: requests.Session

    def call(self, method: str, path: str, *, token: str = "", **kwargs: Any) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}))
        if token:
            headers["Authorization"] = f"Bearer {token}"
        response = self.session.request(method, self.base + path, headers=headers, timeout=15, **kwargs)
        assert response.headers["content-type"] == "application/json", (response.status_code, response.text)
        return response

    def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.call(method, path, **kwargs)
        assert response.status_code == 200, response.text
        return response.json()

    def register(self, email: str, password: str = PASSWORD, code: str = "") -> dict[str, Any]:
        body = {"email": email, "password": password} | ({"referral_code": code} if code else {})
        tokens: dict[str, Any] = self.ok("POST", "/auth/register", json=body)
        return tokens


@pytest.fixture(scope="module")
def rest(envoy: Envoy) -> Iterator[Rest]:
    with requests.Session() as session:
        yield Rest(envoy.url, session)


def new_email(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}@example.com"


def in_days(days: int) -> str:
    moment = datetime.now(UTC).replace(microsecond=0) + timedelta(days=days)
    return moment.isoformat().replace("+00:00", "Z")


def parse_time(value: str) -> datetime:
    assert value.endswith("Z"), value
    return datetime.fromisoformat(value)


def validate(schema: dict[str, Any], instance: Any) -> None:
    """Validate against a schema of the OpenAPI document (JSON Schema 2020-12, $refs into components)."""
    root = {**schema, "components": DOCUMENT["components"]}
    Draft202012Validator(root, format_checker=Draft202012Validator.FORMAT_CHECKER).validate(instance)


STATUS_SCHEMA = {"$ref": "#/components/schemas/Status"}


def assert_status(response: requests.Response, http_status: int, grpc_code: int) -> dict[str, Any]:
    """The one error shape: google.rpc.Status JSON with the matching gRPC code."""
    assert response.status_code == http_status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) == {"code", "message", "details"}, body
    assert body["code"] == grpc_code, body
    assert isinstance(body["message"], str) and body["message"]
    validate(STATUS_SCHEMA, body)
    return body


def detail(body: dict[str, Any], kind: str) -> dict[str, Any]:
    found = [d for d in body["details"] if d["@type"] == f"type.googleapis.com/google.rpc.{kind}"]
    assert len(found) == 1, body
    return found[0]


def assert_tokens(tokens: dict[str, Any], user_id: str | None = None) -> None:
    assert set(tokens) == TOKEN_KEYS
    assert re.fullmatch(r"[1-9][0-9]*", tokens["user_id"])
    if user_id is not None:
        assert tokens["user_id"] == user_id
    assert tokens["token_type"] == "Bearer"
    assert tokens["expires_in"] == 900
    assert tokens["refresh_expires_in"] == 30 * 24 * 3600
    assert tokens["access_token"].count(".") == 2
    assert len(tokens["refresh_token"]) >= 32


def reset_token(database: str, email: str, kind: str = "password_reset") -> str:
    with psycopg2.connect(database) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT payload FROM email_outbox WHERE recipient = %s AND kind = %s ORDER BY id DESC LIMIT 1",
            (email, kind),
        )
        row = cur.fetchone()
    conn.close()
    assert row is not None, f"no {kind} email for {email}"
    return str(json.loads(row[0])["token"])


# --- REST happy paths --------------------------------------------------------------------------------


def test_register_login_code_lookup_referral_and_listing(rest: Rest, api_key: str) -> None:
    alice = new_email("alice")
    registered = rest.register(alice)
    assert_tokens(registered)
    logged_in = rest.ok("POST", "/auth/login", json={"email": alice.upper(), "password": PASSWORD})
    assert_tokens(logged_in, registered["user_id"])
    token = logged_in["access_token"]

    expires_at = in_days(30)
    code = rest.ok("POST", "/referral/code", token=token, json={"expires_at": expires_at})
    assert set(code) == {"code", "expires_at", "created_at"}
    assert re.fullmatch(r"[A-Z0-9]{10}", code["code"])
    assert code["expires_at"] == expires_at
    assert abs(parse_time(code["created_at"]) - datetime.now(UTC)) < timedelta(minutes=1)

    looked_up = rest.ok("GET", "/referral/code/by-email", params={"email": alice})
    assert looked_up == {"code": code["code"], "expires_at": expires_at}

    # An empty list is [] and an empty token "" (always_print_primitive_fields).
    assert rest.ok("GET", "/referral/referrals", token=token) == {"referrals": [], "next_page_token": ""}

    bob = new_email("bob")
    friend = rest.register(bob, "another long password", code=code["code"].lower())
    assert_tokens(friend)
    assert friend["user_id"] != registered["user_id"]

    listing = rest.ok("GET", "/referral/referrals", token=token)
    assert listing["next_page_token"] == ""
    [referral] = listing["referrals"]
    # qualified_at is a message field: printed only once set. The referral row is written at signup,
    # with its fraud decision: it is pending from the start.
    assert set(referral) == {"user_id", "email", "registered_at", "state"}
    assert referral["state"] == "PENDING"
    assert referral["user_id"] == friend["user_id"]
    assert referral["email"] == bob
    assert referral["state"] == "PENDING"
    assert abs(parse_time(referral["registered_at"]) - datetime.now(UTC)) < timedelta(minutes=1)

    # A backend reports bob's first purchase with its API key: the referral qualifies and pays both.
    purchase = {
        "event_id": f"order-{uuid.uuid4().hex}",
        "email": bob.upper(),
        "type": "purchase",
        "amount_minor": "4200",
        "currency": "USD",
    }
    recorded = rest.ok("POST", "/events", json=purchase, headers={"x-api-key": api_key})
    assert (recorded["duplicate"], recorded["referral_state"]) == (False, "QUALIFIED")
    assert {(e["kind"], e["user_id"], e["amount_minor"]) for e in recorded["rewards"]} == {
        ("REFERRER_REWARD", registered["user_id"], "500"),
        ("REFEREE_REWARD", friend["user_id"], "200"),
    }
    again = rest.ok("POST", "/events", json=purchase, headers={"x-api-key": api_key})
    assert again["duplicate"] is True and again["rewards"] == recorded["rewards"]
    [qualified] = rest.ok("GET", "/referral/referrals", token=token)["referrals"]
    assert qualified["state"] == "QUALIFIED"
    assert abs(parse_time(qualified["qualified_at"]) - datetime.now(UTC)) < timedelta(minutes=1)
    assert rest.ok("GET", "/referral/stats", token=token) == {
        "pending": "0",
        "qualified": "1",
        "reversed": "0",
        "rejected": "0",
        "earned": [{"currency": "USD", "lifetime_earned_minor": "500"}],
    }

    assert rest.ok("DELETE", "/referral/code", token=token) == {}
    assert_status(rest.call("GET", "/referral/code/by-email", params={"email": alice}), 404, 5)


def test_password_change_reset_refresh_and_logout(rest: Rest, module_pg_url: str) -> None:
    email = new_email("carol")
    first = rest.register(email)

    changed = rest.ok(
        "POST",
        "/auth/change_password",
        token=first["access_token"],
        json={"current_password": PASSWORD, "new_password": "a brand new secret"},
    )
    assert_tokens(changed, first["user_id"])
    # Tokens issued before the change stop working.
    assert_status(rest.call("GET", "/referral/referrals", token=first["access_token"]), 401, 16)
    assert_status(rest.call("POST", "/auth/refresh", json={"refresh_token": first["refresh_token"]}), 401, 16)

    assert rest.ok("POST", "/auth/reset_password", json={"email": email}) == {}
    # Same answer for an unknown address.
    assert rest.ok("POST", "/auth/reset_password", json={"email": new_email("nobody")}) == {}
    token = reset_token(module_pg_url, email)
    confirm = {"token": token, "new_password": "reset to this one"}
    assert rest.ok("POST", "/auth/reset_password/confirm", json=confirm) == {}
    # Single use.
    assert_status(rest.call("POST", "/auth/reset_password/confirm", json=confirm), 400, 3)
    assert_status(rest.call("POST", "/auth/login", json={"email": email, "password": PASSWORD}), 401, 16)
    logged_in = rest.ok("POST", "/auth/login", json={"email": email, "password": "reset to this one"})

    refreshed = rest.ok("POST", "/auth/refresh", json={"refresh_token": logged_in["refresh_token"]})
    assert_tokens(refreshed, first["user_id"])
    assert refreshed["refresh_token"] != logged_in["refresh_token"]
    assert rest.ok("GET", "/referral/referrals", token=refreshed["access_token"])["referrals"] == []

    body = {"refresh_token": refreshed["refresh_token"]}
    assert_status(rest.call("POST", "/auth/logout", json=body), 401, 16)
    assert rest.ok("POST", "/auth/logout", token=refreshed["access_token"], json=body) == {}
    assert_status(rest.call("POST", "/auth/refresh", json=body), 401, 16)


def test_the_login_proof_header_reaches_the_server(rest: Rest) -> None:
    """Login's optional proof of a live session travels as the X-Refresh-Token header over REST."""
    body = {"email": new_email("proof"), "password": PASSWORD}
    refused = rest.call("POST", "/auth/login", json=body, headers={"X-Refresh-Token": "t" * 129})
    assert detail(assert_status(refused, 400, 3), "BadRequest")["field_violations"][0]["field"] == (
        "x-refresh-token"
    )


def test_pagination_tokens_round_trip_through_rest(rest: Rest) -> None:
    owner = rest.register(new_email("owner"))
    token = owner["access_token"]
    code = rest.ok("POST", "/referral/code", token=token, json={"expires_at": in_days(10)})["code"]
    emails = [new_email(f"friend{i}") for i in range(5)]
    for email in emails:
        rest.register(email, code=code)

    pages, page_token = [], ""
    while True:
        params: dict[str, str | int] = {"page_size": 2} | ({"page_token": page_token} if page_token else {})
        page = rest.ok("GET", "/referral/referrals", token=token, params=params)
        pages.append([referral["email"] for referral in page["referrals"]])
        page_token = page["next_page_token"]
        if not page_token:
            break
    assert [len(page) for page in pages] == [2, 2, 1]
    assert [email for page in pages for email in page] == emails[::-1]

    bad = assert_status(
        rest.call("GET", "/referral/referrals", token=token, params={"page_token": "x"}), 400, 3
    )
    assert detail(bad, "BadRequest")["field_violations"][0]["field"] == "page_token"


# --- errors ------------------------------------------------------------------------------------------


def test_service_errors_are_status_json_with_details(rest: Rest) -> None:
    bad = assert_status(
        rest.call("POST", "/auth/register", json={"email": "nope", "password": "short"}), 400, 3
    )
    violations = {v["field"]: v["reason"] for v in detail(bad, "BadRequest")["field_violations"]}
    assert violations["email"] == detail(bad, "ErrorInfo")["reason"] == "EMAIL_INVALID"
    assert detail(bad, "ErrorInfo")["domain"] == "referral.v1"

    missing = assert_status(rest.call("GET", "/referral/referrals"), 401, 16)
    assert detail(missing, "ErrorInfo")["reason"]
    assert_status(rest.call("GET", "/referral/referrals", token="not.a.jwt"), 401, 16)
    assert_status(
        rest.call("GET", "/referral/referrals", headers={"Authorization": "Basic dXNlcjpwdw=="}), 401, 16
    )

    unknown = assert_status(
        rest.call("GET", "/referral/code/by-email", params={"email": new_email("x")}), 404, 5
    )
    assert detail(unknown, "ErrorInfo")["reason"]

    email = new_email("dup")
    rest.register(email)
    taken = assert_status(
        rest.call("POST", "/auth/register", json={"email": email, "password": PASSWORD}), 409, 6
    )
    assert detail(taken, "ErrorInfo")["reason"]

    login = rest.call("POST", "/auth/login", json={"email": email, "password": "wrong password"})
    assert_status(login, 401, 16)

    # Per-account throttle: three reset requests per hour, the fourth is refused with a retry delay.
    for _ in range(3):
        assert rest.ok("POST", "/auth/reset_password", json={"email": email}) == {}
    throttled = assert_status(rest.call("POST", "/auth/reset_password", json={"email": email}), 429, 8)
    assert detail(throttled, "ErrorInfo")["reason"] == "TOO_MANY_ATTEMPTS"
    delay = detail(throttled, "RetryInfo")["retry_delay"]
    assert re.fullmatch(r"[0-9]+(\.[0-9]+)?s", delay) and 0 < float(delay[:-1]) <= 3600


LARGE_BODY = json.dumps({"email": "a@example.com", "password": "x" * 70_000})
JSON = "application/json"
LONG_EMAIL = "a" * 9000 + "@example.com"


ENVOY_ERRORS = [
    ("GET", "/no/such/path", None, "", 404, 5, "UNKNOWN_PATH", "unknown-path"),
    ("GET", "/auth/login", None, "", 405, 12, "METHOD_NOT_ALLOWED", "wrong-method"),
    ("POST", "/auth/login", '{"email": "a@b.c",', JSON, 400, 3, "MALFORMED_JSON", "bad-json"),
    ("POST", "/auth/login", '{"email": 5}', JSON, 400, 3, "MALFORMED_JSON", "wrong-json-type"),
    ("POST", "/referral/code", '{"expires_at": "tomorrow"}', JSON, 400, 3, "MALFORMED_JSON", "bad-timestamp"),
    ("GET", "/referral/referrals?page_size=many", None, "", 400, 3, "INVALID_QUERY_PARAMETER",
     "bad-int-query"),
    ("POST", "/auth/register", LARGE_BODY, JSON, 413, 8, "PAYLOAD_TOO_LARGE", "body-too-large"),
    ("GET", f"/referral/code/by-email?email={LONG_EMAIL}", None, "", 431, 3, "HEADERS_TOO_LARGE",
     "url-too-large"),
    # Credentials never travel in a URL: calls with a body take no query string.
    ("POST", f"/auth/login?email=a@example.com&password={PASSWORD}", "{}", JSON, 400, 3,
     "QUERY_PARAMETERS_NOT_ALLOWED", "login-credentials-in-query"),
    ("POST", "/auth/refresh?refresh_token=abc", "{}", JSON, 400, 3, "QUERY_PARAMETERS_NOT_ALLOWED",
     "refresh-token-in-query"),
    ("POST", "/auth/reset_password/confirm?token=abc&new_password=x", "{}", JSON, 400, 3,
     "QUERY_PARAMETERS_NOT_ALLOWED", "reset-token-in-query"),
    ("POST", f"/auth/register?email=a@example.com&password={PASSWORD}", "", "", 400, 3,
     "QUERY_PARAMETERS_NOT_ALLOWED", "register-in-query"),
    # What a cross-site form can post without a CORS preflight.
    ("POST", "/auth/register", json.dumps({"email": "a@example.com", "password": PASSWORD}), "text/plain",
     415, 3, "UNSUPPORTED_MEDIA_TYPE", "text-plain-body"),
    ("POST", "/auth/login", "email=a%40example.com", "application/x-www-form-urlencoded", 415, 3,
     "UNSUPPORTED_MEDIA_TYPE", "form-body"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "body", "content_type", "http_status", "grpc_code", "reason"),
    [pytest.param(*case[:-1], id=case[-1]) for case in ENVOY_ERRORS],
)
def test_errors_envoy_makes_itself_have_the_same_json_shape_and_a_reason(
    rest: Rest,
    method: str,
    path: str,
    body: str | None,
    content_type: str,
    http_status: int,
    grpc_code: int,
    reason: str,
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = rest.call(method, path, data=body, headers=headers)
    status = assert_status(response, http_status, grpc_code)
    info = detail(status, "ErrorInfo")
    assert (info["reason"], info["domain"]) == (reason, "referral.v1"), status
    assert reason in errors.Reason.__members__
    # The gateway's own words, never Envoy's or the transcoder's (which name proto types and values).
    assert not re.search(
        r"(?i)envoy|upstream|referral\.v1\.|TYPE_|could not find|local_", status["message"]
    ), status
    assert "server" not in response.headers


def test_unknown_fields_in_the_body_and_the_query_are_ignored_alike(rest: Rest) -> None:
    email = new_email("tolerant")
    body = {"email": email, "password": PASSWORD, "favourite_colour": "red"}
    assert_tokens(rest.ok("POST", "/auth/register", json=body))
    missing = rest.call("GET", "/referral/code/by-email", params={"email": email, "colour": "red"})
    assert detail(assert_status(missing, 404, 5), "ErrorInfo")["reason"] == "REFERRAL_CODE_NOT_FOUND"


def test_native_grpc_over_http1_is_400_json_with_a_reason(rest: Rest) -> None:
    """An HTTP/1.1 client sending application/grpc (to a REST or a gRPC path) is told gRPC needs HTTP/2."""
    for path in ("/auth/login", "/referral.v1.AuthService/Login"):
        response = rest.call(
            "POST", path, data=b"\x00\x00\x00\x00\x00", headers={"content-type": "application/grpc"}
        )
        status = assert_status(response, 400, 3)
        assert detail(status, "ErrorInfo")["reason"] == "GRPC_REQUIRES_HTTP2"
        assert "grpc-status" not in response.headers


def test_backend_down_is_503_json_for_rest_and_unavailable_for_grpc(
    env: dict[str, str], tmp_path: Path
) -> None:
    with (
        running_server(env, tmp_path / "server.log") as (server, address),
        running_envoy([address], tmp_path) as envoy,
        requests.Session() as session,
    ):
        rest = Rest(envoy.url, session)
        assert_status(rest.call("GET", "/referral/referrals"), 401, 16)
        assert rest.ok("GET", "/readyz") == {"status": "SERVING"}
        server.stop(timeout=15)
        down = assert_status(rest.call("GET", "/referral/referrals"), 503, 14)
        assert detail(down, "ErrorInfo")["reason"] == "BACKEND_UNAVAILABLE"
        # Readiness follows Envoy's health check of the backends; liveness is Envoy's alone.
        wait_until(lambda: rest.call("GET", "/readyz").status_code == 503, 10, "readyz to fail")
        not_ready = assert_status(rest.call("GET", "/readyz"), 503, 14)
        assert detail(not_ready, "ErrorInfo")["reason"] == "BACKEND_UNAVAILABLE"
        assert rest.ok("GET", "/healthz") == {"status": "SERVING"}
        with grpc.insecure_channel(f"127.0.0.1:{envoy.port}") as channel:
            stub = referral_service_pb2_grpc.ReferralServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.GetReferralCodeByEmail(ref_pb.GetReferralCodeByEmailRequest(email="a@b.c"), timeout=5)
        # Native gRPC keeps Envoy's own answer: no JSON inside grpc-message.
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not raised.value.details().startswith("{")


def test_resource_exhausted_is_429(env: dict[str, str], tmp_path: Path) -> None:
    """The server sheds RPCs beyond GRPC_MAX_CONCURRENT_RPCS with RESOURCE_EXHAUSTED: REST sees 429."""
    limited = {**env, "GRPC_MAX_CONCURRENT_RPCS": "1", "BCRYPT_ROUNDS": "10"}
    with (
        running_server(limited, tmp_path / "server.log") as (_, address),
        running_envoy([address], tmp_path) as envoy,
    ):
        statuses: list[tuple[int, dict[str, Any]]] = []
        retry_after: list[str | None] = []
        for _attempt in range(3):
            barrier = threading.Barrier(8)

            def register(barrier: threading.Barrier = barrier) -> None:
                with requests.Session() as session:
                    barrier.wait()
                    response = Rest(envoy.url, session).call(
                        "POST", "/auth/register", json={"email": new_email("crowd"), "password": PASSWORD}
                    )
                    statuses.append((response.status_code, response.json()))
                    if response.status_code == 429:
                        retry_after.append(response.headers.get("retry-after"))

            threads = [threading.Thread(target=register) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if any(code == 429 for code, _ in statuses):
                break
        shed = [body for code, body in statuses if code == 429]
        assert shed, statuses
        assert shed[0]["code"] == 8 and set(shed[0]) == {"code", "message", "details"}
        # SERVER_OVERLOADED asks for a retry in 1 s: the header says so too.
        assert set(retry_after) == {"1"}, retry_after
        assert {code for code, _ in statuses} <= {200, 429}


# --- native gRPC through the same port ---------------------------------------------------------------


def test_native_grpc_through_the_envoy_port(rest: Rest, envoy: Envoy) -> None:
    email = new_email("grpc")
    tokens = rest.register(email)
    rest.ok("POST", "/referral/code", token=tokens["access_token"], json={"expires_at": in_days(5)})

    target = f"127.0.0.1:{envoy.port}"
    grpcurl = str(Path(sys.executable).parent / "grpcurl")
    listed = subprocess.run(
        [grpcurl, "-plaintext", target, "list"], capture_output=True, text=True, timeout=30
    )
    assert listed.returncode == 0, listed.stderr
    assert {"referral.v1.AuthService", "referral.v1.ReferralService", "grpc.health.v1.Health"} <= set(
        listed.stdout.split()
    )
    called = subprocess.run(
        [grpcurl, "-plaintext", "-d", json.dumps({"email": email}), target,
         "referral.v1.ReferralService/GetReferralCodeByEmail"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert called.returncode == 0, called.stderr
    assert re.fullmatch(r"[A-Z0-9]{10}", json.loads(called.stdout)["code"])

    with grpc.insecure_channel(target) as channel:
        auth = auth_service_pb2_grpc.AuthServiceStub(channel)
        reply = auth.Login(auth_pb.LoginRequest(email=email, password=PASSWORD), timeout=10)
        assert str(reply.user_id) == tokens["user_id"]
        referrals = referral_service_pb2_grpc.ReferralServiceStub(channel)
        page = referrals.ListReferrals(
            ref_pb.ListReferralsRequest(),
            metadata=[("authorization", f"Bearer {reply.access_token}")],
            timeout=10,
        )
        assert list(page.referrals) == []
        with pytest.raises(grpc.RpcError) as raised:
            auth.Register(auth_pb.RegisterRequest(email="nope", password=PASSWORD), timeout=10)
    # Rich error details pass through Envoy untouched.
    status = rpc_status.from_call(raised.value)
    assert status is not None and status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    bad_request = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad_request) for d in status.details)
    assert bad_request.field_violations[0].field == "email"


# --- the OpenAPI document and the docs page ----------------------------------------------------------


def test_openapi_json_is_served_and_equals_the_committed_file(rest: Rest) -> None:
    response = rest.session.get(rest.base + "/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.content == (GATEWAY / "openapi.json").read_bytes()


@pytest.mark.parametrize("path", ["/docs", "/swagger"])
def test_docs_page_and_its_bundled_assets_load(rest: Rest, path: str) -> None:
    page = rest.session.get(rest.base + path, timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script src="/docs/docs.js">' in page.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text), "no CDN: assets are bundled"
    assets = re.findall(r"""(?:src|href)="(/docs/[^"]+)""", page.text)
    expected_types = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
    assert {Path(asset).suffix for asset in assets} == set(expected_types)
    for asset in assets:
        response = rest.session.get(rest.base + asset, timeout=10)
        assert response.status_code == 200, asset
        assert response.headers["content-type"].startswith(expected_types[Path(asset).suffix])
        assert response.content == (GATEWAY / asset.removeprefix("/")).read_bytes()
    assert 'fetch("/openapi.json")' in (GATEWAY / "docs" / "docs.js").read_text()


def _operations() -> dict[str, tuple[str, str, dict[str, Any]]]:
    return {
        op["operationId"]: (verb, path, op)
        for path, item in DOCUMENT["paths"].items()
        for verb, op in item.items()
    }


def test_every_documented_operation_answers_as_documented(
    rest: Rest, module_pg_url: str, api_key: str, events_key: str
) -> None:
    """A valid call of each operation in the document: 200 with a body that validates against its schema;
    and a failing call of each: an error status with the documented error schema."""
    owner_email, friend_email = new_email("spec-owner"), new_email("spec-friend")
    state: dict[str, Any] = {}

    def remember(key: str) -> Callable[[Any], None]:
        return lambda body: state.__setitem__(key, body)

    def token() -> str:
        return str(state["owner"]["access_token"])

    def keep_code(body: dict[str, Any]) -> None:
        state["code"] = body
        state["newcomer"] = rest.register(new_email("spec-newcomer"), code=body["code"])

    def as_backend(**request: Any) -> dict[str, Any]:
        return request | {"headers": {"x-api-key": api_key, **request.get("headers", {})}}

    def on_webhook(suffix: str = "", **request: Any) -> dict[str, Any]:
        """A call about the endpoint created below, with the events and webhooks key."""
        path = f"/webhooks/{state['webhook']['endpoint']['id']}{suffix}"
        return request | {"path": path, "headers": {"x-api-key": events_key, **request.get("headers", {})}}

    credentials = {"email": owner_email, "password": PASSWORD}
    # The program of the `api_key` fixture, with the fraud signals that count per client address only
    # recorded: every signup of this module comes from this machine, so by now velocity would hold the
    # newcomer's referral for review. UpdateProgram then holds every referral (a threshold of 0
    # referrals an hour), so the next one waits in the queue; DecideReferral restores the program.
    program = {
        "currency": "USD",
        "event_types": ["purchase"],
        "attribution_days": 30,
        "referrer_reward_minor": "500",
        "referee_reward_minor": "200",
        "hold_days": 0,
        "fraud": {"self_referral": "shadow", "velocity": "shadow"},
    }
    holding = program | {"fraud": {"self_referral": "shadow", "velocity": "review"}}

    def hold_a_referral(body: dict[str, Any]) -> None:
        referrer = rest.register(new_email("spec-referrer"))
        code = rest.ok(
            "POST", "/referral/code", token=referrer["access_token"], json={"expires_at": in_days(3)}
        )
        state["held"] = rest.register(new_email("spec-held"), code=code["code"])

    def restore_program(body: dict[str, Any]) -> None:
        rest.ok("PUT", "/admin/program", **as_backend(json=program))

    steps: list[tuple[str, Callable[[], dict[str, Any]], Callable[[Any], None] | None]] = [
        ("AuthService_Register", lambda: {"json": credentials}, remember("owner")),
        ("AuthService_Login", lambda: {"json": credentials}, remember("owner")),
        ("AuthService_ResendVerificationEmail", lambda: {"token": token()}, None),
        ("AuthService_VerifyEmail",
         lambda: {"json": {"token": reset_token(module_pg_url, owner_email, "email_verification")}}, None),
        ("ReferralService_CreateReferralCode", lambda: {"token": token(), "json": {"expires_at": in_days(3)}},
         keep_code),
        ("RewardService_RecordEvent", lambda: as_backend(json={
            "event_id": f"spec-{uuid.uuid4().hex}", "user_id": state["newcomer"]["user_id"],
            "type": "purchase", "amount_minor": "1999", "currency": "USD", "occurred_at": in_days(0)}), None),
        ("RewardService_GetBalance", lambda: {"token": token()}, None),
        ("RewardService_ListLedgerEntries",
         lambda: as_backend(params={"user_id": state["owner"]["user_id"], "page_size": 10}), None),
        ("RewardService_RedeemRewards", lambda: as_backend(
            headers={"Idempotency-Key": uuid.uuid4().hex},
            json={"user_id": state["owner"]["user_id"], "amount_minor": "100", "currency": "USD"}), None),
        ("ReferralService_GetReferralStats", lambda: {"token": token()}, None),
        ("ReferralService_GetReferralCodeByEmail", lambda: {"params": {"email": owner_email}}, None),
        ("ReferralService_ListReferrals", lambda: {"token": token(), "params": {"page_size": 10}}, None),
        ("ReferralService_DeleteReferralCode", lambda: {"token": token()}, None),
        ("AuthService_RefreshToken", lambda: {"json": {"refresh_token": state["owner"]["refresh_token"]}},
         remember("owner")),
        ("AuthService_ChangePassword",
         lambda: {"token": token(), "json": {"current_password": PASSWORD, "new_password": "second one"}},
         remember("owner")),
        ("AuthService_RequestPasswordReset", lambda: {"json": {"email": owner_email}}, None),
        ("AuthService_ResetPassword",
         lambda: {"json": {"token": reset_token(module_pg_url, owner_email), "new_password": PASSWORD}},
         None),
        ("AuthService_Logout", lambda: {"json": {"refresh_token": state["friend"]["refresh_token"]},
                                        "token": state["friend"]["access_token"]}, None),
        ("AuthService_ExportMyData", lambda: {"token": state["eraser"]["access_token"]}, None),
        ("AdminService_GetUser",
         lambda: as_backend(path_params={"user_id": state["owner"]["user_id"]}), None),
        ("AdminService_GetUser_1", lambda: as_backend(params={"email": owner_email}), None),
        ("AdminService_BlockUser", lambda: as_backend(
            path_params={"user_id": state["victim"]["user_id"]}, json={"note": "spec"}), None),
        ("AdminService_UnblockUser", lambda: as_backend(
            path_params={"user_id": state["victim"]["user_id"]}, json={}), None),
        ("AdminService_AdjustBalance", lambda: as_backend(
            path_params={"user_id": state["owner"]["user_id"]}, headers={"Idempotency-Key": uuid.uuid4().hex},
            json={"amount_minor": "-50", "currency": "USD", "reason": "spec"}), None),
        ("AdminService_GetProgram", lambda: as_backend(), None),
        ("AdminService_UpdateProgram", lambda: as_backend(json=holding), hold_a_referral),
        ("AdminService_ListReferralsForReview", lambda: as_backend(params={"state": "review"}), None),
        ("AdminService_DecideReferral", lambda: as_backend(
            path_params={"user_id": state["held"]["user_id"]}, json={"decision": "APPROVE", "note": "spec"}),
         restore_program),
        ("AdminService_ListAuditEvents", lambda: as_backend(params={"actor": "key:gateway-tests"}), None),
        ("AuthService_DeleteMyAccount",
         lambda: {"token": state["eraser"]["access_token"], "json": {"current_password": PASSWORD}}, None),
        ("EventService_ListEvents", lambda: {"headers": {"x-api-key": events_key},
                                             "params": {"types": "user.registered", "page_size": 5}}, None),
        ("WebhookService_CreateWebhookEndpoint", lambda: {
            "headers": {"x-api-key": events_key, "Idempotency-Key": uuid.uuid4().hex},
            "json": {"url": "https://hooks.example.com/spec", "event_types": ["reward.credited"]}},
         remember("webhook")),
        ("WebhookService_ListWebhookEndpoints", lambda: {"headers": {"x-api-key": events_key}}, None),
        ("WebhookService_GetWebhookEndpoint", lambda: on_webhook(), None),
        ("WebhookService_RotateWebhookSecret", lambda: on_webhook("/rotate_secret", json={}), None),
        ("WebhookService_ListWebhookDeliveries", lambda: on_webhook("/deliveries"), None),
        ("WebhookService_RedeliverEvents", lambda: on_webhook("/redeliver", json={"after_cursor": "1"}),
         None),
        ("WebhookService_EnableWebhookEndpoint", lambda: on_webhook("/enable"), None),
        ("WebhookService_DeleteWebhookEndpoint", lambda: on_webhook(), None),
    ]  # fmt: skip
    rest.ok("PUT", "/admin/program", **as_backend(json=program))
    state["friend"] = rest.register(friend_email)
    state["victim"] = rest.register(new_email("spec-victim"))
    state["eraser"] = rest.register(new_email("spec-eraser"))
    operations = _operations()
    assert {name for name, _, _ in steps} == set(operations), "every documented operation is exercised"

    for name, make_request, keep in steps:
        verb, path, operation = operations[name]
        request = make_request()
        response = rest.call(
            verb.upper(), request.pop("path", path).format(**request.pop("path_params", {})), **request
        )
        assert response.status_code == 200, (name, response.text)
        validate(operation["responses"]["200"]["content"]["application/json"]["schema"], response.json())
        if keep is not None:
            keep(response.json())

    for name, (verb, path, operation) in operations.items():
        # No token for protected operations, an empty body or missing parameter for public ones.
        concrete = re.sub(r"\{[^}]+\}", "1", path)  # path parameters: a well-formed id
        response = rest.call(verb.upper(), concrete, json={} if "requestBody" in operation else None)
        assert 400 <= response.status_code < 500, (name, response.status_code)
        assert ("security" in operation) == (response.status_code == 401), (name, response.text)
        error_schema = DOCUMENT["components"]["responses"]["Error"]["content"]["application/json"]["schema"]
        validate(error_schema, response.json())


# --- the Envoy configs, `make run`, docker-compose ----------------------------------------------------


def test_every_envoy_config_validates() -> None:
    settings = make_settings(envoy_port=18080, envoy_admin_port=19901, server_processes=3, grpc_port=50100)
    assert validate_gateway(settings) == 0


def test_rendering_changes_addresses_structurally() -> None:
    config = render_envoy_config(
        listen=("127.0.0.1", 1234),
        admin=("127.0.0.1", 5678),
        backends=[("127.0.0.1", 7001), ("127.0.0.1", 7002)],
        files_root=Path("/srv/referral"),
    )
    assert config["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 5678}
    listener = config["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"]["port_value"] == 1234
    [cluster] = config["static_resources"]["clusters"]
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints] == [7001, 7002]
    text = json.dumps(config)
    assert '"proto_descriptor": "/srv/referral/gateway/referral.pb"' in text
    assert '"filename": "/srv/referral/gateway/openapi.json"' in text
    # The source is untouched and the docker variant is what `make generate` wrote.
    assert "1234" not in (GATEWAY / "envoy.yaml").read_text()
    assert (GATEWAY / "envoy.docker.yaml").read_text() == docker_envoy_config()


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class Stack:
    process: subprocess.Popen[str]
    rest_url: str
    output: list[str]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """`python -m referral_grpc.devstack run` with embedded defaults (SQLite, SQLite Huey), two server
    processes, every port picked by the OS, and no JWT_SECRET (the stack makes one up and shares it)."""
    env = {key: value for key, value in os.environ.items() if key != "JWT_SECRET"}
    env.update(
        DATABASE_URL=f"sqlite:///{tmp_path / 'referral.db'}",
        HUEY_SQLITE_PATH=str(tmp_path / "huey.db"),
        BCRYPT_ROUNDS="4",
        GRPC_PORT="0",
        ENVOY_PORT="0",
        ENVOY_ADMIN_PORT="0",
        SERVER_PROCESSES="2",
        GRPC_GRACE_SECONDS="2",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "referral_grpc.devstack", "run"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    up = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if "Ctrl-C stops everything" in line:
                up.set()
        up.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert up.wait(60) and process.poll() is None, "".join(output)
        match = re.search(r"REST\s+(http://127\.0\.0\.1:\d+)", "".join(output))
        assert match, "".join(output)
        yield Stack(process, match.group(1), output)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=5)
        assert process.stdout is not None
        process.stdout.close()


def test_make_run_serves_everything_and_stops_cleanly_on_sigterm(stack: Stack) -> None:
    text = "".join(stack.output)
    for label in ("API docs", "gRPC", "Envoy admin"):
        assert label in text
    children = _children(stack.process.pid)
    assert len(children) == 4  # two servers, the worker, Envoy
    with requests.Session() as session:
        rest = Rest(stack.rest_url, session)
        tokens = rest.register(new_email("stack"))
        # Round-robin over both server processes: both accept the token (one shared dev secret).
        for _ in range(6):
            assert rest.ok("GET", "/referral/referrals", token=tokens["access_token"])["referrals"] == []
        assert session.get(stack.rest_url + "/docs", timeout=10).status_code == 200

    stack.process.send_signal(signal.SIGTERM)
    assert stack.process.wait(timeout=60) == 0, "".join(stack.output)
    assert not [pid for pid in children if _alive(pid)]
    assert "SIGTERM: stopping the stack" in "".join(stack.output)


def test_make_run_exits_non_zero_when_a_child_dies(stack: Stack) -> None:
    children = _children(stack.process.pid)
    os.kill(children[0], signal.SIGKILL)
    assert stack.process.wait(timeout=60) == 1
    assert "exited with code -9: stopping the stack" in "".join(stack.output)
    assert not [pid for pid in children if _alive(pid)]


def test_server_processes_share_nothing_but_envoy(tmp_path: Path, env: dict[str, str]) -> None:
    """SERVER_PROCESSES gives consecutive ports, each its own Envoy endpoint, health-checked on its own."""
    with (
        running_server(env, tmp_path / "a.log", name="a") as (_, first),
        running_server(env, tmp_path / "b.log", name="b") as (second_process, second),
        running_envoy([first, second], tmp_path) as envoy,
    ):
        first_key, second_key = (f"{host}:{port}" for host, port in (first, second))
        assert envoy.backend_health() == {first_key: "healthy", second_key: "healthy"}
        second_process.stop(timeout=15)
        deadline = time.monotonic() + 20
        while envoy.backend_health()[second_key] == "healthy" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert envoy.backend_health()[first_key] == "healthy"
        assert envoy.backend_health()[second_key] != "healthy"
        with requests.Session() as session:
            rest = Rest(envoy.url, session)
            for _ in range(4):
                assert_status(rest.call("GET", "/referral/referrals"), 401, 16)


def test_a_draining_server_leaves_the_rotation_before_it_stops(tmp_path: Path, env: dict[str, str]) -> None:
    """SIGTERM: NOT_SERVING for the default drain (2 s), then stop. Envoy's health check must eject the
    process while it still serves, so requests under way all along see no error at all."""
    default_drain = {key: value for key, value in env.items() if key != "SHUTDOWN_DRAIN_SECONDS"}
    assert make_settings().shutdown_drain_seconds == 2.0
    answers: list[int] = []
    stop = threading.Event()

    def steady_load(url: str) -> None:
        with requests.Session() as session:
            while not stop.is_set():
                answers.append(session.get(url + "/referral/referrals", timeout=10).status_code)

    with (
        running_server(default_drain, tmp_path / "a.log", name="a") as (_, first),
        running_server(default_drain, tmp_path / "b.log", name="b") as (draining, second),
        running_envoy([first, second], tmp_path) as envoy,
    ):
        second_key = f"{second[0]}:{second[1]}"
        load = threading.Thread(target=steady_load, args=(envoy.url,))
        load.start()
        try:
            signalled = time.monotonic()
            draining.send(signal.SIGTERM)
            while envoy.backend_health()[second_key] == "healthy" and time.monotonic() - signalled < 10:
                time.sleep(0.05)
            ejected_after = time.monotonic() - signalled
            still_serving = draining.poll() is None
            flags = envoy.backend_health()[second_key]
            assert draining.wait(timeout=20) == 0
            time.sleep(0.3)  # and a little traffic after it is gone
        finally:
            stop.set()
            load.join()
        retries = requests.get(
            f"{envoy.admin_url}/stats?filter=^cluster.referral_grpc.upstream_rq_retry$", timeout=5
        )
    assert "failed_active_hc" in flags, flags
    # The health check runs every second: ejected within one interval plus one check, which leaves
    # the 2 s drain half a second of margin. (It runs right after Envoy saw the backend healthy, so
    # this is close to the worst phase.)
    assert still_serving and ejected_after < 1.5, ejected_after
    # Every request was served (401: no token), and none needed a retry: nothing was sent to the
    # process once it stopped taking RPCs.
    assert len(answers) > 20 and set(answers) == {401}, sorted(set(answers))
    assert retries.text.strip() == "cluster.referral_grpc.upstream_rq_retry: 0", retries.text


def test_requests_for_a_dead_process_go_to_another_before_the_health_check_notices(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """A crashed process is ejected only after two failed checks (timeouts and refused connections are
    counted); meanwhile a request Envoy cannot connect it to is retried on another process."""
    with (
        running_server(env, tmp_path / "a.log", name="a") as (_, first),
        running_server(env, tmp_path / "b.log", name="b") as (crashed, second),
        running_envoy([first, second], tmp_path) as envoy,
        requests.Session() as session,
    ):
        crashed.stop(signal.SIGKILL, timeout=5)
        time.sleep(0.1)  # Envoy sees its connections close; a request already sent there is not retried
        rest = Rest(envoy.url, session)
        for _ in range(6):  # round robin: half of them are meant for the dead one
            assert_status(rest.call("GET", "/referral/referrals"), 401, 16)
        assert envoy.backend_health()[f"{second[0]}:{second[1]}"] == "healthy"
        retries = session.get(
            f"{envoy.admin_url}/stats?filter=^cluster.referral_grpc.upstream_rq_retry$", timeout=5
        )
    assert int(retries.text.split(":")[1]) >= 1, retries.text


class StoppingProcess(grpc.GenericRpcHandler):
    """A stand-in for a server process whose stop has begun: the first `burst` calls of each method are
    held until all of them have arrived, then answered CANCELLED together, as grpc answers every call
    that reached a process after its stop began (no handler ran); later calls get an empty message.
    Health is answered SERVING, so Envoy routes to it."""

    def __init__(self, burst: int) -> None:
        self.burst = burst
        self.calls: collections.Counter[str] = collections.Counter()
        self._arrived: dict[str, threading.Barrier] = collections.defaultdict(
            lambda: threading.Barrier(burst)
        )
        self._lock = threading.Lock()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            with self._lock:
                self.calls[details.method] += 1
                first = self.calls[details.method] <= self.burst
                arrived = self._arrived[details.method]
            if first:
                arrived.wait(timeout=10)
                context.abort(grpc.StatusCode.CANCELLED, "the server is stopping")
            return b""

        return grpc.unary_unary_rpc_method_handler(handle)  # bytes in and out: any message, empty


@contextmanager
def stopping_process(burst: int) -> Iterator[tuple[StoppingProcess, Address]]:
    server = grpc.server(ThreadPoolExecutor(2 * burst + 4))
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)  # "" is SERVING
    stand_in = StoppingProcess(burst)
    server.add_generic_rpc_handlers((stand_in,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield stand_in, ("127.0.0.1", port)
    finally:
        server.stop(None)


def test_a_read_cancelled_by_a_stopping_process_is_retried_and_a_write_is_not(tmp_path: Path) -> None:
    lookup = "/referral.v1.ReferralService/GetReferralCodeByEmail"
    listing = "/referral.v1.ReferralService/ListReferrals"
    create = "/referral.v1.ReferralService/CreateReferralCode"
    with (
        stopping_process(burst=1) as (stand_in, address),
        running_envoy([address], tmp_path) as envoy,
        grpc.insecure_channel(f"127.0.0.1:{envoy.port}") as channel,
        requests.Session() as session,
    ):
        referrals = referral_service_pb2_grpc.ReferralServiceStub(channel)
        assert referrals.GetReferralCodeByEmail(ref_pb.GetReferralCodeByEmailRequest(email="a@example.com"))
        listed = Rest(envoy.url, session).call("GET", "/referral/referrals")
        assert listed.json() == {"referrals": [], "next_page_token": ""}
        with pytest.raises(grpc.RpcError) as cancelled:
            referrals.CreateReferralCode(ref_pb.CreateReferralCodeRequest())
        assert cancelled.value.code() == grpc.StatusCode.CANCELLED
    # The reads ran twice (the answer is the second's), the write once: it may have done its work.
    assert (stand_in.calls[lookup], stand_in.calls[listing], stand_in.calls[create]) == (2, 2, 1)


def test_a_burst_of_cancelled_reads_is_retried_whole(tmp_path: Path) -> None:
    """A stopping process cancels every call it had not started at once: all of them are retried, not
    only as many as Envoy's default circuit breaker allows in flight (3)."""
    burst = 12
    with (
        stopping_process(burst) as (stand_in, address),
        running_envoy([address], tmp_path) as envoy,
        grpc.insecure_channel(f"127.0.0.1:{envoy.port}") as channel,
        ThreadPoolExecutor(burst) as pool,
    ):
        referrals = referral_service_pb2_grpc.ReferralServiceStub(channel)
        request = ref_pb.GetReferralCodeByEmailRequest(email="a@example.com")
        calls = [pool.submit(referrals.GetReferralCodeByEmail, request, timeout=15) for _ in range(burst)]
        for call in calls:
            call.result()  # raises the RpcError of a call the gateway did not retry
    assert stand_in.calls["/referral.v1.ReferralService/GetReferralCodeByEmail"] == 2 * burst


def test_exactly_the_reads_are_retried_on_cancelled_and_nothing_on_what_a_handler_may_have_done() -> None:
    """Which RPCs the gateway retries when the server answers CANCELLED: the RPCs bound to GET of the
    user-facing services, and health; the API-key services' reads share the rate-limited `rewards`
    route with their writes, so they are retried as writes are (their callers retry, with keys)."""
    config = yaml.safe_load((GATEWAY / "envoy.yaml").read_text())
    [virtual_host] = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]["virtual_hosts"]
    grpc_routes = [r for r in virtual_host["routes"] if "grpc" in r["match"]]

    def route_of(path: str) -> dict[str, Any]:
        for route in grpc_routes:
            match = route["match"]
            if (
                match.get("path") == path
                or ("prefix" in match and path.startswith(match["prefix"]))
                or ("safe_regex" in match and re.fullmatch(match["safe_regex"]["regex"], path))
            ):
                return route
        raise AssertionError(f"no route for {path}")

    methods = [
        (service, method)
        for module in (auth_pb, ref_pb, reward_pb, event_pb, webhook_pb, admin_pb, health_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]
    assert len(methods) > 30
    retried = set()
    for service, method in methods:
        policy = route_of(f"/{service.full_name}/{method.name}")["route"]["retry_policy"]
        conditions = set(policy["retry_on"].split(","))
        assert conditions - {"cancelled"} == {"connect-failure", "refused-stream", "reset-before-request"}
        if "cancelled" in conditions:
            retried.add(f"{service.name}/{method.name}")
    reads = {
        f"{service.name}/{method.name}"
        for service, method in methods
        if service.name in ("ReferralService", "AuthService")
        and method.GetOptions().Extensions[annotations_pb2.http].WhichOneof("pattern") == "get"
    }
    assert reads == {
        "ReferralService/GetReferralCodeByEmail",
        "ReferralService/ListReferrals",
        "ReferralService/GetReferralStats",
        "AuthService/ExportMyData",
    }
    health = {f"Health/{method.name}" for method in health_pb2.DESCRIPTOR.services_by_name["Health"].methods}
    assert retried == reads | health


COMPOSE = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())


def test_docker_compose_services_are_complete_and_hold_no_secrets() -> None:
    services = COMPOSE["services"]
    assert set(services) == {"postgres", "redis", "migrate", "server", "worker", "envoy"}
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if name != "migrate":
            assert service["healthcheck"]["test"][0] == "CMD", name
    assert services["postgres"]["image"] == "postgres:15"
    assert services["redis"]["image"] == "redis:7"
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("server", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert services[name]["build"] == "."
    assert services["envoy"]["depends_on"]["server"]["condition"] == "service_healthy"

    for name in ("migrate", "server", "worker"):
        environment = services[name]["environment"]
        assert environment["ENVIRONMENT"] == "production"
        for secret in ("JWT_SECRET", "PASSWORD_PEPPER"):
            assert environment[secret] == f"${{{secret}:?set {secret}}}", (name, secret)
        assert "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}" in environment["DATABASE_URL"]
    assert (
        services["postgres"]["environment"]["POSTGRES_PASSWORD"]
        == "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
    )
    # Published admin port: loopback only.
    assert "127.0.0.1:9901:9901" in services["envoy"]["ports"]
    # Envoy is healthy when ready: its /readyz on the API port.
    assert "GET /readyz " in services["envoy"]["healthcheck"]["test"][-1]
    assert "/dev/tcp/127.0.0.1/8080" in services["envoy"]["healthcheck"]["test"][-1]


def test_docker_compose_envoy_matches_the_package_and_its_mounted_config_validates() -> None:
    envoy = COMPOSE["services"]["envoy"]
    version = subprocess.run([str(envoy_binary()), "--version"], capture_output=True, text=True, check=True)
    package_version = re.search(r"/(\d+\.\d+\.\d+)/", version.stdout)
    assert package_version
    assert envoy["image"] == f"envoyproxy/envoy:v{package_version.group(1)}"
    for volume in envoy["volumes"]:
        host = volume.split(":")[0]
        assert (PROJECT_ROOT / host).exists(), host
    assert "./gateway:/etc/envoy/gateway:ro" in envoy["volumes"]
    config_arg = envoy["command"][envoy["command"].index("-c") + 1]
    assert envoy["working_dir"] == "/etc/envoy" and config_arg == "gateway/envoy.docker.yaml"
    ok, output = validate_config_file(PROJECT_ROOT / config_arg, cwd=PROJECT_ROOT)
    assert ok, output
    docker = yaml.safe_load((PROJECT_ROOT / config_arg).read_text())
    listen = docker["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listen == {"address": "0.0.0.0", "port_value": 8080}  # noqa: S104 - inside the container
    cluster = docker["static_resources"]["clusters"][0]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "server", "port_value": 50051}


def test_dockerfile_runs_the_project_as_non_root() -> None:
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.MULTILINE)
    assert re.search(r"^RUN pip install \.", dockerfile, re.MULTILINE)
    user = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert user and user[-1].split(":")[0] not in {"root", "0"}
    ignored = (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[1] == "*" and "!referral_grpc/" in ignored and "!migrations/" in ignored


def test_header_names_grpc_cannot_carry_are_dropped_not_a_500(rest: Rest) -> None:
    """HTTP allows "a~b" or "p%" as header names, gRPC metadata does not: the call still gets its answer."""
    headers = {"a~b": "x", "Pgs%": ";?", "x-fine": "kept"}
    assert_status(rest.call("GET", "/referral/referrals", headers=headers), 401, 16)
    response = rest.call("GET", "/referral/code/by-email", params={"email": new_email("h")}, headers=headers)
    assert_status(response, 404, 5)


def test_a_method_the_path_does_not_have_is_405_json_with_allow(rest: Rest) -> None:
    for verb, path, allow in (
        ("GET", "/auth/login", "POST"),
        ("PUT", "/referral/code", "POST, DELETE"),
        ("POST", "/referral/code/by-email", "GET"),
    ):
        response = rest.call(verb, path)
        assert response.status_code == 405, (verb, path, response.text)
        assert response.headers["allow"] == allow
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["code"] == 12
