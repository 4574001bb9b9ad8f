"""The gateway's edge through a real Envoy and server: CORS, gRPC-Web, request and trace ids, the access
log, browser hardening of the docs, the server's Retry-After, oversized requests."""

from __future__ import annotations

import json
import re
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
import yaml
from support import TEST_JWT_SECRET, make_settings, wait_until
from support.envoy import Envoy, migrate, running_envoy, running_server, server_env

from referral_grpc.devstack.envoy_config import local_envoy_config, page_policy
from referral_grpc.devstack.locations import PROJECT_ROOT, Address
from referral_grpc.gen import auth_service_pb2 as auth_pb
from referral_grpc.gen import auth_service_pb2_grpc, referral_service_pb2_grpc
from referral_grpc.gen import referral_service_pb2 as ref_pb

PASSWORD = "correct horse battery"
APP_ORIGIN = "http://app.example.test:3000"
OTHER_ORIGIN = "http://evil.example.test"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass
class Edge:
    envoy: Envoy
    server_log: Path
    backend: Address

    @property
    def url(self) -> str:
        return self.envoy.url

    def envoy_log(self) -> str:
        return (self.envoy.config_path.parent / "envoy.log").read_text()

    def server_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.server_log.read_text().splitlines():
            # "server   | {...}": the supervisor's prefix, then the JSON log line.
            _, _, entry = line.partition("| ")
            if entry.startswith("{"):
                lines.append(json.loads(entry))
        return lines


@pytest.fixture(scope="module")
def edge(module_pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    env = server_env(DATABASE_URL=module_pg_url, JWT_SECRET=TEST_JWT_SECRET, LOG_FORMAT="json")
    migrate(env)
    workdir = tmp_path_factory.mktemp("edge")
    with (
        running_server(env, workdir / "server.log") as (_, address),
        running_envoy([address], workdir, cors_origins=[APP_ORIGIN]) as envoy,
    ):
        yield Edge(envoy, workdir / "server.log", address)


def new_email(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}@example.com"


def register(edge: Edge, email: str) -> dict[str, Any]:
    response = requests.post(
        f"{edge.url}/auth/register", json={"email": email, "password": PASSWORD}, timeout=10
    )
    assert response.status_code == 200, response.text
    tokens: dict[str, Any] = response.json()
    return tokens


def header_list(value: str) -> set[str]:
    return {item.strip().lower() for item in value.split(",")}


# --- CORS ----------------------------------------------------------------------------------------


def test_a_preflight_from_an_allowed_origin_is_answered_with_the_policy(edge: Edge) -> None:
    response = requests.options(
        f"{edge.url}/auth/login",
        headers={
            "Origin": APP_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization, x-request-id",
        },
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == APP_ORIGIN
    assert {"post", "get", "delete"} <= header_list(response.headers["access-control-allow-methods"])
    assert {
        "authorization",
        "content-type",
        "x-api-key",
        "idempotency-key",
        "x-request-id",
        "x-refresh-token",
    } <= header_list(response.headers["access-control-allow-headers"])
    assert "access-control-allow-credentials" not in response.headers
    assert int(response.headers["access-control-max-age"]) > 0


def test_answers_to_an_allowed_origin_expose_the_useful_headers_errors_included(edge: Edge) -> None:
    email = new_email("cors")
    answer = requests.post(
        f"{edge.url}/auth/register",
        json={"email": email, "password": PASSWORD},
        headers={"Origin": APP_ORIGIN},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["access-control-allow-origin"] == APP_ORIGIN
    exposed = header_list(answer.headers["access-control-expose-headers"])
    assert {"x-request-id", "retry-after", "x-ratelimit-limit", "x-ratelimit-remaining"} <= exposed
    # An error of the service and one of the gateway itself: a browser app can read both.
    taken = requests.post(
        f"{edge.url}/auth/register",
        json={"email": email, "password": PASSWORD},
        headers={"Origin": APP_ORIGIN},
        timeout=10,
    )
    assert taken.status_code == 409
    assert taken.headers["access-control-allow-origin"] == APP_ORIGIN
    refused = requests.post(
        f"{edge.url}/auth/login?email={email}",
        json={},
        headers={"Origin": APP_ORIGIN},
        timeout=10,
    )
    assert refused.status_code == 400
    assert refused.headers["access-control-allow-origin"] == APP_ORIGIN


def test_another_origin_gets_no_cors_headers_and_no_preflight(edge: Edge) -> None:
    preflight = requests.options(
        f"{edge.url}/auth/login",
        headers={"Origin": OTHER_ORIGIN, "Access-Control-Request-Method": "POST"},
        timeout=10,
    )
    # Answered by the gateway, without the headers a browser needs to go on: the call is refused.
    assert preflight.status_code == 200
    assert "access-control-allow-origin" not in preflight.headers
    answer = requests.get(
        f"{edge.url}/referral/code/by-email",
        params={"email": new_email("nobody")},
        headers={"Origin": OTHER_ORIGIN},
        timeout=10,
    )
    assert answer.status_code == 404
    assert "access-control-allow-origin" not in answer.headers


# --- gRPC-Web ------------------------------------------------------------------------------------


def grpc_web_frames(body: bytes) -> tuple[list[bytes], dict[str, str]]:
    """Messages and trailers of a gRPC-Web response body (5-byte prefix: flags, big-endian length)."""
    messages, trailers, offset = [], {}, 0
    while offset < len(body):
        flags, length = struct.unpack(">BI", body[offset : offset + 5])
        payload = body[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if flags & 0x80:
            for line in payload.decode().split("\r\n"):
                if line:
                    key, _, value = line.partition(":")
                    trailers[key.strip().lower()] = value.strip()
        else:
            messages.append(payload)
    return messages, trailers


def grpc_web_call(edge: Edge, method: str, message: bytes) -> requests.Response:
    return requests.post(
        f"{edge.url}/referral.v1.ReferralService/{method}",
        data=struct.pack(">BI", 0, len(message)) + message,
        headers={
            "content-type": "application/grpc-web+proto",
            "x-grpc-web": "1",
            "Origin": APP_ORIGIN,
        },
        timeout=10,
    )


def test_grpc_web_calls_the_service_on_the_same_port(edge: Edge) -> None:
    email = new_email("web")
    tokens = register(edge, email)
    created = requests.post(
        f"{edge.url}/referral/code",
        json={"expires_at": (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")},
        headers={"Authorization": f"Bearer {tokens['access_token']}"},
        timeout=10,
    )
    assert created.status_code == 200, created.text

    request = ref_pb.GetReferralCodeByEmailRequest(email=email).SerializeToString()
    response = grpc_web_call(edge, "GetReferralCodeByEmail", request)
    assert response.status_code == 200, response.content
    assert response.headers["content-type"].startswith("application/grpc-web")
    assert response.headers["access-control-allow-origin"] == APP_ORIGIN
    [message], trailers = grpc_web_frames(response.content)
    assert trailers["grpc-status"] == "0"
    assert ref_pb.ReferralCode.FromString(message).code == created.json()["code"]

    missing = grpc_web_call(
        edge,
        "GetReferralCodeByEmail",
        ref_pb.GetReferralCodeByEmailRequest(email=new_email("x")).SerializeToString(),
    )
    assert missing.status_code == 200
    _, trailers = grpc_web_frames(missing.content)
    status = trailers.get("grpc-status") or missing.headers["grpc-status"]
    assert status == str(grpc.StatusCode.NOT_FOUND.value[0])


# --- request ids and trace ids -------------------------------------------------------------------


def rpc_lines(edge: Edge, rid: str) -> list[dict[str, Any]]:
    return [line for line in edge.server_lines() if line.get("request_id") == rid and "rpc_method" in line]


def test_a_well_formed_client_request_id_is_kept_end_to_end(edge: Edge) -> None:
    rid = f"client-{uuid.uuid4().hex[:8]}.retry:2_a"
    response = requests.get(
        f"{edge.url}/referral/code/by-email",
        params={"email": new_email("rid")},
        headers={"x-request-id": rid},
        timeout=10,
    )
    assert response.headers["x-request-id"] == rid
    wait_until(lambda: bool(rpc_lines(edge, rid)), 10, "the server's access log line")
    wait_until(lambda: f'"{rid}"' in edge.envoy_log(), 20, "Envoy's access log line")


@pytest.mark.parametrize(
    "sent",
    ["has space", "x" * 129, "semi;colon", 'quote"d', "ünïcode"],
    ids=["space", "too-long", "semicolon", "quote", "non-ascii"],
)
def test_a_malformed_client_request_id_is_replaced_everywhere(edge: Edge, sent: str) -> None:
    response = requests.get(
        f"{edge.url}/referral/code/by-email",
        params={"email": new_email("rid")},
        headers={"x-request-id": sent.encode()},
        timeout=10,
    )
    replaced = response.headers["x-request-id"]
    assert replaced != sent and UUID.fullmatch(replaced), replaced
    # The server logged the id Envoy chose, so both logs name the request alike.
    wait_until(lambda: bool(rpc_lines(edge, replaced)), 10, "the server's access log line")


def test_a_w3c_traceparent_puts_its_trace_id_in_the_server_logs(edge: Edge) -> None:
    trace = uuid.uuid4().hex
    rid = f"trace-{uuid.uuid4().hex[:8]}"
    requests.get(
        f"{edge.url}/referral/code/by-email",
        params={"email": new_email("trace")},
        headers={"traceparent": f"00-{trace}-{uuid.uuid4().hex[:16]}-01", "x-request-id": rid},
        timeout=10,
    )
    wait_until(lambda: bool(rpc_lines(edge, rid)), 10, "the server's access log line")
    assert [line.get("trace_id") for line in rpc_lines(edge, rid)] == [trace]
    # A malformed one is ignored.
    other = f"trace-{uuid.uuid4().hex[:8]}"
    requests.get(
        f"{edge.url}/referral/code/by-email",
        params={"email": new_email("trace")},
        headers={"traceparent": f"00-{trace.upper()}-0000000000000000-01", "x-request-id": other},
        timeout=10,
    )
    wait_until(lambda: bool(rpc_lines(edge, other)), 10, "the server's access log line")
    assert "trace_id" not in rpc_lines(edge, other)[0]


# --- Envoy's access log --------------------------------------------------------------------------


def test_the_access_log_shows_the_clients_method_and_path_and_no_secret(edge: Edge) -> None:
    email = new_email("private.person")
    rid = uuid.uuid4().hex
    requests.get(
        f"{edge.url}/referral/code/by-email",
        params={"email": email},
        headers={"x-request-id": rid},
        timeout=10,
    )
    tokens = register(edge, new_email("pager"))
    page_token = "P" * 60
    requests.get(
        f"{edge.url}/referral/referrals",
        params={"page_size": 5, "page_token": page_token},
        headers={"Authorization": f"Bearer {tokens['access_token']}", "x-request-id": rid + "-page"},
        timeout=10,
    )
    secret = f"s3cret-{uuid.uuid4().hex}"
    requests.post(
        f"{edge.url}/auth/login?email={email}&password={secret}",
        json={},
        headers={"x-request-id": rid + "-login"},
        timeout=10,
    )

    def line(request_id: str) -> str:
        return next((entry for entry in edge.envoy_log().splitlines() if f'"{request_id}"' in entry), "")

    wait_until(lambda: all(line(r) for r in (rid, rid + "-page", rid + "-login")), 20, "Envoy's access log")
    local = email.split("@")[0]
    assert f'"GET /referral/code/by-email?email={local[0]}***@example.com HTTP/1.1" 404' in line(rid)
    assert f'"GET /referral/referrals?page_size=5&page_token={page_token[:8]}... HTTP/1.1" 401' in line(
        rid + "-page"
    ) or f'"GET /referral/referrals?page_size=5&page_token={page_token[:8]}... HTTP/1.1" 400' in line(
        rid + "-page"
    )
    assert '"POST /auth/login?email=' in line(rid + "-login")
    log = edge.envoy_log()
    assert email not in log and local not in log
    assert secret not in log and page_token not in log
    assert tokens["access_token"] not in log


# --- browser hardening of the docs ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/docs", "/swagger"])
def test_the_docs_page_is_hardened_for_browsers(edge: Edge, path: str) -> None:
    page = requests.get(edge.url + path, timeout=10)
    assert page.status_code == 200
    assert "server" not in page.headers
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["x-frame-options"] == "DENY"
    policy = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "object-src 'none'" in policy
    assert "'unsafe-inline'" not in policy.split("script-src")[1].split(";")[0]
    # The page has no inline script (its own code is gateway/docs/docs.js), so the policy allows
    # scripts from the gateway alone: no hash, no 'unsafe-inline'.
    assert re.findall(r"<script>(.*?)</script>", page.text, re.DOTALL) == []
    assert "'sha256-" not in policy and "script-src 'self';" in policy
    assert policy == page_policy(PROJECT_ROOT / "gateway" / "docs" / "index.html")
    # The bearer token typed into the page is not kept across page loads.
    script = requests.get(edge.url + "/docs/docs.js", timeout=10)
    assert "persistAuthorization: false" in script.text
    for asset in ("/docs/swagger-ui/swagger-ui-bundle.js", "/openapi.json", "/healthz"):
        response = requests.get(edge.url + asset, timeout=10)
        assert response.headers["x-content-type-options"] == "nosniff", asset
        assert "server" not in response.headers


# --- the service's own 429 -----------------------------------------------------------------------


def test_the_services_own_429_has_a_retry_after_header_matching_retry_info(edge: Edge) -> None:
    email = new_email("throttled")
    register(edge, email)
    for _ in range(3):
        assert (
            requests.post(f"{edge.url}/auth/reset_password", json={"email": email}, timeout=10).status_code
            == 200
        )
    throttled = requests.post(f"{edge.url}/auth/reset_password", json={"email": email}, timeout=10)
    assert throttled.status_code == 429, throttled.text
    body = throttled.json()
    [info] = [d for d in body["details"] if d["@type"].endswith("ErrorInfo")]
    [retry] = [d for d in body["details"] if d["@type"].endswith("RetryInfo")]
    assert info["reason"] == "TOO_MANY_ATTEMPTS"
    delay = float(retry["retry_delay"].removesuffix("s"))
    assert throttled.headers["retry-after"] == str(max(1, int(-(-delay // 1))))
    assert 0 < int(throttled.headers["retry-after"]) <= 3600
    # And native gRPC callers get it as metadata.
    with grpc.insecure_channel(f"127.0.0.1:{edge.envoy.port}") as channel:
        stub = auth_service_pb2_grpc.AuthServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.RequestPasswordReset(auth_pb.RequestPasswordResetRequest(email=email), timeout=10)
    error: Any = raised.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(error.initial_metadata())["retry-after"] == throttled.headers["retry-after"]


# --- oversized requests --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [8_500, 10_000, 12_000, 14_000, 16_000, 20_000])
def test_headers_over_8_kib_are_always_431(edge: Edge, size: int) -> None:
    for _ in range(3):
        response = requests.get(
            f"{edge.url}/referral/code/by-email",
            params={"email": "a@example.com"},
            headers={"x-padding": "a" * size},
            timeout=10,
        )
        assert response.status_code == 431, response.text
        assert response.json()["details"][0]["reason"] == "HEADERS_TOO_LARGE"


def test_the_server_takes_any_metadata_envoy_lets_through(edge: Edge) -> None:
    """grpc refuses metadata over 8 KiB at random up to 16 KiB: the server's limits are raised and equal."""
    with grpc.insecure_channel(f"{edge.backend[0]}:{edge.backend[1]}") as channel:
        stub = referral_service_pb2_grpc.ReferralServiceStub(channel)
        for size in (9_000, 12_000, 15_000, 20_000):
            for _ in range(5):
                with pytest.raises(grpc.RpcError) as raised:
                    stub.GetReferralCodeByEmail(
                        ref_pb.GetReferralCodeByEmailRequest(email=new_email("big")),
                        metadata=[("x-padding", "a" * size)],
                        timeout=10,
                    )
                assert raised.value.code() == grpc.StatusCode.NOT_FOUND, (size, raised.value)  # type: ignore[attr-defined]


def test_the_server_keeps_only_well_formed_request_ids_too(edge: Edge) -> None:
    """Native gRPC straight to a server process: the same rule as Envoy's."""
    with grpc.insecure_channel(f"{edge.backend[0]}:{edge.backend[1]}") as channel:
        stub = referral_service_pb2_grpc.ReferralServiceStub(channel)
        for sent, kept in [
            ("abc-123_x.y:z", True),
            ("semi;colon", False),
            ("has space", False),
            ("x" * 129, False),
        ]:
            with pytest.raises(grpc.RpcError) as raised:
                stub.GetReferralCodeByEmail(
                    ref_pb.GetReferralCodeByEmailRequest(email=new_email("rid")),
                    metadata=[("x-request-id", sent)],
                    timeout=10,
                )
            error: Any = raised.value
            echoed = dict(error.initial_metadata())["x-request-id"]
            assert (echoed == sent) == kept, (sent, echoed)
            assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", echoed)


def test_make_run_renders_the_cors_origins_setting() -> None:
    def origins(**overrides: object) -> list[dict[str, Any]]:
        config = local_envoy_config(make_settings(**overrides), [("127.0.0.1", 50051)])
        [host] = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
            "route_config"
        ]["virtual_hosts"]
        matchers: list[dict[str, Any]] = host["typed_per_filter_config"]["envoy.filters.http.cors"][
            "allow_origin_string_match"
        ]
        return matchers

    assert origins() == [{"exact": "http://localhost:3000"}, {"exact": "http://127.0.0.1:3000"}]
    assert origins(cors_allowed_origins="https://app.example.com") == [{"exact": "https://app.example.com"}]
    assert origins(cors_allowed_origins="*") == [{"safe_regex": {"regex": ".*"}}]
    docker = yaml.safe_load((PROJECT_ROOT / "gateway" / "envoy.docker.yaml").read_text())
    [host] = docker["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"
    ]["virtual_hosts"]
    assert host["typed_per_filter_config"]["envoy.filters.http.cors"]["allow_origin_string_match"] == []
