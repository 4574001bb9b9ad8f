"""Default deny for every RPC in the descriptors, the rejection matrix for access tokens, API-key scopes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib
import json
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import jwt
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import TEST_JWT_SECRET, FakeClock
from support.api import Api, bearer, rich_error

import referral_grpc.gen
from referral_grpc.api.policy import api_key_methods, policy_for, public_methods
from referral_grpc.domain.apikeys import INVALID_KEY_MESSAGE, SCOPES
from referral_grpc.domain.tokens import INVALID_TOKEN_MESSAGE
from referral_grpc.gen import auth_service_pb2 as auth_pb
from referral_grpc.store.models import User

PASSWORD = "correct horse battery"
pytestmark = [pytest.mark.databases("sqlite"), pytest.mark.api_settings(reset_request_min_seconds=0)]

# The RPCs of our services that answer without an access token. Adding one here is a security
# decision: it must also be declared `public` in the RPC's policy option (proto); the test below
# checks the two agree.
PUBLIC_RPCS = {
    "/referral.v1.AuthService/Register",
    "/referral.v1.AuthService/Login",
    "/referral.v1.AuthService/RefreshToken",
    "/referral.v1.AuthService/RequestPasswordReset",
    "/referral.v1.AuthService/ResetPassword",
    "/referral.v1.AuthService/VerifyEmail",
    "/referral.v1.ReferralService/GetReferralCodeByEmail",
}


def all_methods() -> dict[str, MethodDescriptor]:
    """Every RPC of every service in the generated code, by its gRPC path: new ones included."""
    methods = {}
    for module_info in pkgutil.iter_modules(referral_grpc.gen.__path__):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"referral_grpc.gen.{module_info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                methods[f"/{service.full_name}/{method.name}"] = method
    return methods


# The RPCs that backends call with an API key, and the scopes each needs. Like PUBLIC_RPCS, a
# security decision: the test below checks it against the policy options in the proto.
KEY_RPCS = {
    "/referral.v1.RewardService/RecordEvent": {"events:write"},
    "/referral.v1.RewardService/GetBalance": {"rewards:read"},
    "/referral.v1.RewardService/ListLedgerEntries": {"rewards:read"},
    "/referral.v1.RewardService/RedeemRewards": {"rewards:redeem"},
    # Administration: never a user's token.
    "/referral.v1.AdminService/GetUser": {"admin:read"},
    "/referral.v1.AdminService/GetProgram": {"admin:read"},
    "/referral.v1.AdminService/ListAuditEvents": {"admin:read"},
    "/referral.v1.AdminService/BlockUser": {"admin:write"},
    "/referral.v1.AdminService/UnblockUser": {"admin:write"},
    "/referral.v1.AdminService/AdjustBalance": {"admin:write"},
    "/referral.v1.AdminService/UpdateProgram": {"admin:write"},
    "/referral.v1.AdminService/ListReferralsForReview": {"admin:read"},
    "/referral.v1.AdminService/DecideReferral": {"admin:write"},
    "/referral.v1.EventService/ListEvents": {"events:read"},
    "/referral.v1.EventService/WatchEvents": {"events:read"},
    "/referral.v1.WebhookService/CreateWebhookEndpoint": {"webhooks:manage"},
    "/referral.v1.WebhookService/ListWebhookEndpoints": {"webhooks:manage"},
    "/referral.v1.WebhookService/GetWebhookEndpoint": {"webhooks:manage"},
    "/referral.v1.WebhookService/DeleteWebhookEndpoint": {"webhooks:manage"},
    "/referral.v1.WebhookService/RotateWebhookSecret": {"webhooks:manage"},
    "/referral.v1.WebhookService/ListWebhookDeliveries": {"webhooks:manage"},
    "/referral.v1.WebhookService/RedeliverEvents": {"webhooks:manage"},
    "/referral.v1.WebhookService/EnableWebhookEndpoint": {"webhooks:manage"},
}
# Of those, the ones a user's own access token may call instead.
KEY_OR_USER_RPCS = {"/referral.v1.RewardService/GetBalance", "/referral.v1.RewardService/ListLedgerEntries"}

METHODS = all_methods()
PROTECTED = sorted(path for path in METHODS if path not in PUBLIC_RPCS)
# Every RPC a user's access token opens.
USER_RPCS = sorted(path for path in PROTECTED if path not in KEY_RPCS or path in KEY_OR_USER_RPCS)


def call(api: Api, path: str, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.StatusCode:
    """Call any RPC with an empty request over the real channel; return the status code."""
    method = METHODS[path]
    request = message_factory.GetMessageClass(method.input_type)()
    response_class = message_factory.GetMessageClass(method.output_type)
    kinds = {
        (False, False): api.channel.unary_unary,
        (False, True): api.channel.unary_stream,
        (True, False): api.channel.stream_unary,
        (True, True): api.channel.stream_stream,
    }
    stub = kinds[(method.client_streaming, method.server_streaming)](
        path,
        request_serializer=type(request).SerializeToString,
        response_deserializer=response_class.FromString,
    )
    argument = iter([request]) if method.client_streaming else request
    policy = policy_for(path)
    sent_key = any(key == "x-api-key" for key, _ in metadata)
    key_answers = policy.takes_api_key and (sent_key or not policy.user_token_allowed)
    try:
        result = stub(argument, metadata=metadata, timeout=10)
        if method.server_streaming:
            list(result)
    except grpc.RpcError as err:
        failure = rich_error(err)
        if failure.code == grpc.StatusCode.UNAUTHENTICATED:
            # One answer for every kind of rejection: which check failed is for the log only.
            expected = (
                (INVALID_KEY_MESSAGE, "API_KEY_INVALID")
                if key_answers
                else (
                    INVALID_TOKEN_MESSAGE,
                    "INVALID_TOKEN",
                )
            )
            assert (failure.message, failure.reason) == expected, path
        return failure.code
    return grpc.StatusCode.OK


# --- default deny ------------------------------------------------------------------------------


def test_the_allowlist_is_exactly_the_servers_public_methods() -> None:
    services = {path.split("/")[1] for path in METHODS}
    assert {"referral.v1.AuthService", "referral.v1.ReferralService"} <= services
    ours = {path for path in public_methods() if path.split("/")[1] in services}
    assert ours == PUBLIC_RPCS
    assert set(METHODS) >= PUBLIC_RPCS


def test_every_rpc_without_credentials_is_unauthenticated_unless_allowlisted(api: Api) -> None:
    answers = {path: call(api, path) for path in METHODS}
    assert {path for path, code in answers.items() if code != grpc.StatusCode.UNAUTHENTICATED} == PUBLIC_RPCS
    # Public RPCs fail on the empty request's content, not on a missing token.
    assert {answers[path] for path in PUBLIC_RPCS} == {grpc.StatusCode.INVALID_ARGUMENT}


def test_health_check_is_public(api: Api) -> None:
    assert "/grpc.health.v1.Health/Check" in public_methods()
    response = health_pb2_grpc.HealthStub(api.channel).Check(health_pb2.HealthCheckRequest())
    assert response.status == health_pb2.HealthCheckResponse.SERVING


# --- the access-token rejection matrix ---------------------------------------------------------


@dataclass
class Victim:
    api: Api
    clock: FakeClock
    email: str
    tokens: auth_pb.AuthTokens

    @property
    def claims(self) -> dict[str, Any]:
        return dict(jwt.decode(self.tokens.access_token, options={"verify_signature": False}))


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def hand_made(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A JWT built by hand, for headers PyJWT would not produce; HMAC-SHA256 signed when `key` is given."""
    signing_input = b64(json.dumps(header).encode()) + b"." + b64(json.dumps(claims).encode())
    signature = b64(hmac.new(key, signing_input, hashlib.sha256).digest()) if key else b""
    return (signing_input + b"." + signature).decode()


def forge(claims: dict[str, Any], key: str = TEST_JWT_SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=algorithm)


def without(claims: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in claims.items() if k != name}


def now(v: Victim) -> int:
    return int(v.clock.now().timestamp())


def reset_token(v: Victim) -> str:
    v.api.auth.RequestPasswordReset(auth_pb.RequestPasswordResetRequest(email=v.email))
    return v.api.reset_token_for(v.email)


def deleted_users_token(v: Victim) -> str:
    User.delete().where(User.id == v.tokens.user_id).execute()
    return v.tokens.access_token


def token_before_password_change(v: Victim) -> str:
    v.api.auth.ChangePassword(
        auth_pb.ChangePasswordRequest(current_password=PASSWORD, new_password="a changed passphrase"),
        metadata=bearer(v.tokens.access_token),
    )
    return v.tokens.access_token


def token_before_password_reset(v: Victim) -> str:
    token = reset_token(v)
    v.api.auth.ResetPassword(auth_pb.ResetPasswordRequest(token=token, new_password="a reset passphrase"))
    return v.tokens.access_token


Metadata = tuple[tuple[str, str], ...]
# name -> the metadata to present, built from a freshly registered user.
REJECTED: dict[str, Callable[[Victim], Metadata]] = {
    "no authorization header": lambda v: (),
    "empty bearer": lambda v: (("authorization", "Bearer "),),
    "another scheme": lambda v: (("authorization", f"Basic {v.tokens.access_token}"),),
    "not a JWT": lambda v: bearer("not.a.jwt"),
    "alg none": lambda v: bearer(hand_made({"alg": "none", "typ": "JWT"}, v.claims, None)),
    "alg HS512 with our key": lambda v: bearer(forge(v.claims, algorithm="HS512")),
    "RS256 header, HMAC signature": lambda v: bearer(
        hand_made({"alg": "RS256", "typ": "JWT"}, v.claims, TEST_JWT_SECRET.encode())
    ),
    "bad signature": lambda v: bearer(forge(v.claims, key="another-key-that-is-at-least-32-bytes")),
    "missing exp": lambda v: bearer(forge(without(v.claims, "exp"))),
    "past exp": lambda v: bearer(forge({**v.claims, "exp": now(v) - 1})),
    "exp is now": lambda v: bearer(forge({**v.claims, "exp": now(v)})),
    "future nbf": lambda v: bearer(forge({**v.claims, "nbf": now(v) + 3600})),
    "wrong iss": lambda v: bearer(forge({**v.claims, "iss": "someone-else"})),
    "wrong aud": lambda v: bearer(forge({**v.claims, "aud": "another-api"})),
    "missing sub": lambda v: bearer(forge(without(v.claims, "sub"))),
    "sub not a user id": lambda v: bearer(forge({**v.claims, "sub": "admin"})),
    "another token type": lambda v: bearer(forge({**v.claims, "typ": "refresh"})),
    "refresh token as access token": lambda v: bearer(v.tokens.refresh_token),
    "reset token as access token": lambda v: bearer(reset_token(v)),
    "token of a deleted user": lambda v: bearer(deleted_users_token(v)),
    "token from before a password change": lambda v: bearer(token_before_password_change(v)),
    "token from before a password reset": lambda v: bearer(token_before_password_reset(v)),
}


@pytest.fixture
def victim(api: Api, clock: FakeClock) -> Victim:
    email = "victim@example.com"
    return Victim(api, clock, email, api.register(email, PASSWORD))


@pytest.mark.parametrize("case", list(REJECTED))
def test_rejected_access_tokens(victim: Victim, case: str) -> None:
    metadata = REJECTED[case](victim)
    for path in PROTECTED:
        assert call(victim.api, path, metadata) == grpc.StatusCode.UNAUTHENTICATED, path


def test_a_valid_access_token_passes_every_user_rpc(victim: Victim) -> None:
    """The matrix's control: the same calls with the genuine token get past authentication."""
    for path in USER_RPCS:
        assert (
            call(victim.api, path, bearer(victim.tokens.access_token)) != grpc.StatusCode.UNAUTHENTICATED
        ), path


# --- API keys and their scopes -----------------------------------------------------------------


def test_the_key_rpcs_and_their_scopes_are_exactly_the_declared_ones() -> None:
    declared = {path: set(scopes) for path, scopes in api_key_methods().items()}
    assert declared == KEY_RPCS
    assert {path for path in KEY_RPCS if policy_for(path).user_token_allowed} == KEY_OR_USER_RPCS
    # Every scope an RPC names is one `apikey create` accepts.
    assert set().union(*KEY_RPCS.values()) <= set(SCOPES)


def key_with(api: Api, *scopes: str) -> Metadata:
    created = api.app.api_keys.create(f"key-{len(api.app.api_keys.list())}", scopes)
    return (("x-api-key", created.key),)


@pytest.mark.parametrize(
    "case",
    ["no key", "empty key", "unknown key", "not a key at all", "revoked key", "key as bearer", "user token"],
)
def test_every_key_rpc_refuses_what_is_not_a_valid_key(victim: Victim, case: str) -> None:
    api = victim.api
    valid = key_with(api, *SCOPES)
    revoked = key_with(api, *SCOPES)
    api.app.api_keys.revoke(api.app.api_keys.list()[-1].name)
    presented: dict[str, Metadata] = {
        "no key": (),
        "empty key": (("x-api-key", ""),),
        "unknown key": (("x-api-key", "rk_" + "A" * 43),),
        "not a key at all": (("x-api-key", victim.tokens.access_token),),
        "revoked key": revoked,
        "key as bearer": bearer(valid[0][1]),
        "user token": bearer(victim.tokens.access_token),
    }
    for path in KEY_RPCS:
        if case == "user token" and path in KEY_OR_USER_RPCS:
            continue
        assert call(api, path, presented[case]) == grpc.StatusCode.UNAUTHENTICATED, path


def test_a_key_never_works_as_a_user_token(victim: Victim) -> None:
    key = key_with(victim.api, *SCOPES)[0][1]
    for path in USER_RPCS:
        assert call(victim.api, path, bearer(key)) == grpc.StatusCode.UNAUTHENTICATED, path
    user_only = [path for path in USER_RPCS if path not in KEY_RPCS]
    assert user_only
    for path in user_only:
        # Sent as a key, to an RPC that takes none: no credentials at all.
        assert call(victim.api, path, (("x-api-key", key),)) == grpc.StatusCode.UNAUTHENTICATED, path


def test_a_key_without_the_scope_is_forbidden_and_with_it_passes(victim: Victim) -> None:
    api = victim.api
    for path, needed in KEY_RPCS.items():
        others = [scope for scope in SCOPES if scope not in needed]
        with pytest.raises(grpc.RpcError) as denied:
            stub_call(api, path, key_with(api, *others))
        failure = rich_error(denied.value)
        assert (failure.code, failure.reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "API_KEY_SCOPE_MISSING",
        ), path
        passed = call(api, path, key_with(api, *needed))
        assert passed not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), path


def stub_call(api: Api, path: str, metadata: Metadata) -> Any:
    method = METHODS[path]
    request = message_factory.GetMessageClass(method.input_type)()
    response_class = message_factory.GetMessageClass(method.output_type)
    stub = api.channel.unary_unary(
        path,
        request_serializer=type(request).SerializeToString,
        response_deserializer=response_class.FromString,
    )
    return stub(request, metadata=metadata, timeout=10)
