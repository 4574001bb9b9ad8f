"""Envoy's per-client rate limits on the public RPCs: the config, then a real Envoy with small limits."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
from conftest import TEST_JWT_SECRET, create_pg_database, drop_pg_database
from envoy_fixture import Envoy, TokenBucket, migrate, running_envoy, running_server, server_env
from requests.adapters import HTTPAdapter

from referral_grpc.api.policy import public_methods
from referral_grpc.devstack.stack import (
    PROJECT_ROOT,
    RATE_LIMIT_FILTER,
    dump_envoy_config,
    load_envoy_config,
    rate_limited_routes,
    render_envoy_config,
    validate_config_file,
)
from referral_grpc.gen import auth_service_pb2 as auth_pb
from referral_grpc.gen import auth_service_pb2_grpc, referral_service_pb2_grpc, reward_service_pb2
from referral_grpc.gen import referral_service_pb2 as ref_pb

PASSWORD = "correct horse battery"
# What the issue asked for, per client address and route family.
DEFAULT_LIMITS = {
    "public-auth": TokenBucket(burst=10, per_fill=1, fill_interval=3.0),  # 20 per minute
    "password-reset": TokenBucket(burst=5, per_fill=1, fill_interval=6.0),  # 10 per minute
    "code-lookup": TokenBucket(burst=100, per_fill=1, fill_interval=0.1),  # 600 per minute
    "rewards": TokenBucket(burst=200, per_fill=10, fill_interval=0.1),  # 100 per second
}
# Small enough to exhaust in a few calls, slow enough that no token comes back during a test.
TEST_LIMITS = {name: TokenBucket(burst=3, per_fill=3, fill_interval=60.0) for name in DEFAULT_LIMITS}
OUR_SERVICES = ("/referral.v1.AuthService/", "/referral.v1.ReferralService/", "/referral.v1.RewardService/")


def our_methods() -> list[str]:
    """The gRPC path of every RPC of our services, new ones included."""
    return [
        f"/{service.full_name}/{method.name}"
        for module in (auth_pb, ref_pb, reward_service_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]


def _route_for(config: dict[str, Any], grpc_path: str) -> dict[str, Any]:
    """The first route that matches a gRPC request for `grpc_path`, as Envoy picks it."""
    listener = config["static_resources"]["listeners"][0]
    [host] = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"]
    for route in host["routes"]:
        match = route["match"]
        if "path" in match:
            matched = match["path"] == grpc_path
        elif "safe_regex" in match:
            matched = re.fullmatch(match["safe_regex"]["regex"], grpc_path) is not None
        else:
            matched = grpc_path.startswith(match["prefix"])
        if matched:
            return dict(route)
    raise AssertionError(f"no route for {grpc_path}")


# --- the config ----------------------------------------------------------------------------------


def test_exactly_the_public_rpcs_and_the_backends_rpcs_are_limited_per_client() -> None:
    config = load_envoy_config()
    # Public RPCs, and RewardService: a guard against a runaway backend (its keys are not users).
    public = {path for path in public_methods() if path.startswith(OUR_SERVICES)}
    public |= {path for path in our_methods() if path.startswith("/referral.v1.RewardService/")}
    methods = our_methods()
    assert public and public <= set(methods)
    for path in methods:
        route = _route_for(config, path)
        limited = RATE_LIMIT_FILTER in route.get("typed_per_filter_config", {})
        assert limited == (path in public), (path, route["name"])
        assert route["match"]["grpc"] == {}
        assert route["route"]["cluster"] == "referral_grpc"


def test_each_route_family_has_its_per_client_limit_and_a_matching_retry_after() -> None:
    limits = rate_limited_routes(load_envoy_config())
    assert set(limits) == set(DEFAULT_LIMITS)
    for name, limit in limits.items():
        [descriptor] = limit["descriptors"]
        bucket = TokenBucket.from_envoy(descriptor["token_bucket"])
        assert bucket == DEFAULT_LIMITS[name]
        # An empty value: one bucket per client address, not one for everybody.
        assert descriptor["entries"] == [{"key": "masked_remote_address", "value": ""}]
        assert limit["rate_limits"] == [
            {"actions": [{"masked_remote_address": {"v4_prefix_mask_len": 32, "v6_prefix_mask_len": 64}}]}
        ]
        assert limit["always_consume_default_token_bucket"] is False
        assert TokenBucket.from_envoy(limit["token_bucket"]) == bucket
        assert limit["max_dynamic_descriptors"] >= 10000
        for switch in ("filter_enabled", "filter_enforced"):
            assert limit[switch]["default_value"] == {"numerator": 100, "denominator": "HUNDRED"}
        assert limit["rate_limited_as_resource_exhausted"] is True
        headers = {h["header"]["key"]: h["header"]["value"] for h in limit["response_headers_to_add"]}
        assert headers == {"retry-after": str(bucket.retry_after)}


def test_rendering_can_drop_or_replace_the_limits() -> None:
    def render(**options: Any) -> dict[str, Any]:
        return render_envoy_config(
            listen=("127.0.0.1", 0), admin=("127.0.0.1", 0), backends=[("127.0.0.1", 1)], **options
        )

    assert set(rate_limited_routes(render())) == set(DEFAULT_LIMITS)
    unlimited = render(rate_limits=False)
    assert RATE_LIMIT_FILTER not in json.dumps(unlimited)
    assert rate_limited_routes(unlimited) == {}

    small = rate_limited_routes(render(token_buckets={"public-auth": TokenBucket(3, 3, 60.0)}))
    assert small["public-auth"]["token_bucket"] == {
        "max_tokens": 3,
        "tokens_per_fill": 3,
        "fill_interval": "60s",
    }
    assert small["public-auth"]["response_headers_to_add"][0]["header"]["value"] == "60"
    assert TokenBucket.from_envoy(small["code-lookup"]["token_bucket"]) == DEFAULT_LIMITS["code-lookup"]
    # The source file is untouched.
    assert rate_limited_routes(load_envoy_config())["public-auth"]["token_bucket"]["max_tokens"] == 10
    with pytest.raises(ValueError, match="no rate-limited route"):
        render(token_buckets={"login": TokenBucket(1, 1, 1.0)})
    with pytest.raises(ValueError, match="rate_limits off"):
        render(rate_limits=False, token_buckets=TEST_LIMITS)


# --- a real Envoy with small limits --------------------------------------------------------------


class SourceAddressAdapter(HTTPAdapter):
    """Connections from a chosen loopback address: another client, as far as Envoy can tell."""

    def __init__(self, source: str) -> None:
        self._source = (source, 0)  # set first: HTTPAdapter.__init__ builds the pool manager
        super().__init__()

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, source_address=self._source, **kwargs)


@pytest.fixture(scope="module")
def envoy(pg_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Envoy]:
    database = create_pg_database(pg_server_url)
    env = server_env(DATABASE_URL=database, JWT_SECRET=TEST_JWT_SECRET)
    migrate(env)
    workdir: Path = tmp_path_factory.mktemp("ratelimit")
    try:
        with (
            running_server(env, workdir / "server.log") as (_, address),
            running_envoy([address], workdir, rate_limits=True, token_buckets=TEST_LIMITS) as running,
        ):
            yield running
    finally:
        drop_pg_database(database)


def client(source: str) -> requests.Session:
    session = requests.Session()
    session.mount("http://", SourceAddressAdapter(source))
    return session


def login(session: requests.Session, envoy: Envoy, **kwargs: Any) -> requests.Response:
    body = {"email": f"nobody-{uuid.uuid4().hex[:8]}@example.com", "password": PASSWORD}
    return session.post(f"{envoy.url}/auth/login", json=body, timeout=10, **kwargs)


def assert_rate_limited(response: requests.Response) -> None:
    """Envoy's 429: our google.rpc.Status JSON with RetryInfo, Retry-After and x-ratelimit headers."""
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["retry-after"] == "60"
    assert response.headers["x-ratelimit-limit"] == "3"
    assert response.headers["x-ratelimit-remaining"] == "0"
    body = response.json()
    assert set(body) == {"code", "message", "details"} and body["code"] == 8, body
    assert body["message"] == "too many requests from this client address; retry later"
    info, retry = body["details"]
    assert info == {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "RATE_LIMITED",
        "domain": "referral.v1",
        "metadata": {},
    }
    assert retry == {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retry_delay": "60s"}


def test_rest_login_over_the_limit_is_429_for_that_client_only(envoy: Envoy) -> None:
    with client("127.0.0.2") as abuser, client("127.0.0.3") as bystander:
        for remaining in (2, 1, 0):
            allowed = login(abuser, envoy)
            assert allowed.status_code == 401, allowed.text  # the service answered
            assert allowed.headers["x-ratelimit-remaining"] == str(remaining)
        assert_rate_limited(login(abuser, envoy))
        # Register and RefreshToken share the family's bucket.
        register = abuser.post(f"{envoy.url}/auth/register", json={"email": "a@example.com"}, timeout=10)
        assert_rate_limited(register)
        # A forwarded-for header from the client is not trusted: still the same client.
        assert_rate_limited(login(abuser, envoy, headers={"x-forwarded-for": "203.0.113.7"}))
        # Another address has its own bucket, and the abuser's other route families are untouched.
        assert login(bystander, envoy).status_code == 401
        lookup = abuser.get(
            f"{envoy.url}/referral/code/by-email", params={"email": "x@example.com"}, timeout=10
        )
        assert lookup.status_code == 404, lookup.text


def some_email() -> str:
    return f"someone-{uuid.uuid4().hex[:8]}@example.com"


@pytest.mark.parametrize(
    ("source", "method", "path", "body"),
    [
        ("127.0.0.4", "POST", "/auth/reset_password", lambda: {"email": some_email()}),
        (
            "127.0.0.5",
            "POST",
            "/auth/reset_password/confirm",
            lambda: {"token": "x" * 43, "new_password": PASSWORD},
        ),
        ("127.0.0.6", "GET", "/referral/code/by-email", lambda: None),
        ("127.0.0.8", "POST", "/events", lambda: {"event_id": "x"}),
    ],
    ids=["reset-request", "reset-confirm", "code-lookup", "rewards"],
)
def test_every_public_route_family_is_limited(
    envoy: Envoy, source: str, method: str, path: str, body: Callable[[], dict[str, str] | None]
) -> None:
    def call() -> requests.Response:
        params = {"email": some_email()} if method == "GET" else None
        return session.request(method, envoy.url + path, params=params, json=body(), timeout=10)

    with client(source) as session:
        answers = [call() for _ in range(3)]
        assert [r.status_code for r in answers if r.status_code == 429] == [], [r.text for r in answers]
        assert_rate_limited(call())


def test_native_grpc_over_the_limit_is_resource_exhausted_and_shares_the_rest_bucket(envoy: Envoy) -> None:
    """gRPC clients here come from 127.0.0.1 (grpcio cannot choose a source address)."""
    request = auth_pb.LoginRequest(email="nobody@example.com", password=PASSWORD)
    with grpc.insecure_channel(f"127.0.0.1:{envoy.port}") as channel, client("127.0.0.1") as rest:
        auth = auth_service_pb2_grpc.AuthServiceStub(channel)
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as answered:
                auth.Login(request, timeout=10)
            assert answered.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        assert login(rest, envoy).status_code == 401  # the third token, taken through REST
        with pytest.raises(grpc.RpcError) as limited:
            auth.Login(request, timeout=10)
        error: Any = limited.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Envoy's own gRPC answer: no JSON inside grpc-message.
        assert error.details() == "local_rate_limited"
        assert ("retry-after", "60") in tuple(error.trailing_metadata())
        assert_rate_limited(login(rest, envoy))


def test_authenticated_rpcs_are_not_limited_by_envoy(envoy: Envoy) -> None:
    with client("127.0.0.7") as session:
        email = f"owner-{uuid.uuid4().hex[:8]}@example.com"
        registered = session.post(
            f"{envoy.url}/auth/register", json={"email": email, "password": PASSWORD}, timeout=10
        )
        assert registered.status_code == 200, registered.text
        headers = {"Authorization": f"Bearer {registered.json()['access_token']}"}
        for _ in range(10):
            listing = session.get(f"{envoy.url}/referral/referrals", headers=headers, timeout=10)
            assert listing.status_code == 200, listing.text
            assert "x-ratelimit-limit" not in listing.headers
    with grpc.insecure_channel(f"127.0.0.1:{envoy.port}") as channel:
        referrals = referral_service_pb2_grpc.ReferralServiceStub(channel)
        metadata = [("authorization", headers["Authorization"])]
        for _ in range(10):
            referrals.ListReferrals(ref_pb.ListReferralsRequest(), metadata=metadata, timeout=10)


def test_the_rendered_configs_validate(tmp_path: Path) -> None:
    """Small limits and no limits are still valid Envoy configs (validate-gateway checks the others)."""
    for name, options in {"small": {"token_buckets": TEST_LIMITS}, "none": {"rate_limits": False}}.items():
        config = render_envoy_config(
            listen=("127.0.0.1", 0),
            admin=("127.0.0.1", 0),
            backends=[("127.0.0.1", 50051)],
            files_root=PROJECT_ROOT,
            **options,  # type: ignore[arg-type]
        )
        path = tmp_path / f"{name}.yaml"
        path.write_text(dump_envoy_config(config))
        ok, output = validate_config_file(path)
        assert ok, output
