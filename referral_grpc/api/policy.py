"""Per-RPC policy (public, blocking, quiet, key scopes, idempotency) from the (referral.v1.policy) option."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor

from ..gen import (
    admin_service_pb2,
    auth_service_pb2,
    event_service_pb2,
    referral_service_pb2,
    reward_service_pb2,
    rpc_policy_pb2,
    webhook_service_pb2,
)

# Our services: their policy is declared next to each RPC in proto/referral/v1.
SERVICES: tuple[descriptor.ServiceDescriptor, ...] = (
    auth_service_pb2.DESCRIPTOR.services_by_name["AuthService"],
    referral_service_pb2.DESCRIPTOR.services_by_name["ReferralService"],
    reward_service_pb2.DESCRIPTOR.services_by_name["RewardService"],
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"],
    event_service_pb2.DESCRIPTOR.services_by_name["EventService"],
    webhook_service_pb2.DESCRIPTOR.services_by_name["WebhookService"],
)


@dataclass(frozen=True)
class Policy:
    """How the server treats one RPC; the default is private (a user's token), non-blocking, logged at INFO.

    With `api_key_scopes` the RPC takes an API key with those scopes instead of a user's token, or
    either of them with `user_token_allowed`. `idempotency` is "", "optional" or "required".
    """

    public: bool = False
    blocking: bool = False
    quiet: bool = False
    api_key_scopes: frozenset[str] = frozenset()
    user_token_allowed: bool = False
    idempotency: str = ""
    # The handler compares the access token's version with the user's row in its own first read
    # (current_signed_principal): the interceptor checks the token's signature and times only.
    token_version_in_handler: bool = False

    @property
    def takes_api_key(self) -> bool:
        return bool(self.api_key_scopes)


# Services that are not ours carry no option: health and reflection are public by design (load balancers
# and grpcurl call them without credentials); balancers check health every second, so it is quiet.
_FOREIGN: Mapping[str, Policy] = {
    "/grpc.health.v1.Health/Check": Policy(public=True, quiet=True),
    "/grpc.health.v1.Health/Watch": Policy(public=True),
    "/grpc.health.v1.Health/List": Policy(public=True),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Policy(public=True),
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": Policy(public=True),
}


def method_path(method: descriptor.MethodDescriptor) -> str:
    """The gRPC path of a method, as interceptors see it: /package.Service/Method."""
    return f"/{method.containing_service.full_name}/{method.name}"


def _declared(method: descriptor.MethodDescriptor) -> Policy:
    options = method.GetOptions()
    # The generated extension carries no precise type for the stubs: read it as the message it is.
    extension: Any = rpc_policy_pb2.policy
    if not options.HasExtension(extension):
        return Policy()
    declared: rpc_policy_pb2.RpcPolicy = options.Extensions[extension]
    return Policy(
        public=declared.public,
        blocking=declared.blocking,
        quiet=declared.quiet,
        api_key_scopes=frozenset(declared.api_key_scopes),
        user_token_allowed=declared.user_token_allowed,
        idempotency=_IDEMPOTENCY[declared.idempotency],
        token_version_in_handler=declared.token_version_in_handler,
    )


_IDEMPOTENCY: Mapping[int, str] = {
    rpc_policy_pb2.IDEMPOTENCY_UNSPECIFIED: "",
    rpc_policy_pb2.IDEMPOTENCY_OPTIONAL: "optional",
    rpc_policy_pb2.IDEMPOTENCY_REQUIRED: "required",
}


def _our_methods() -> Iterator[descriptor.MethodDescriptor]:
    for service in SERVICES:
        yield from service.methods


POLICIES: Mapping[str, Policy] = {
    **_FOREIGN,
    **{method_path(method): _declared(method) for method in _our_methods()},
}


def policy_for(method: str) -> Policy:
    """The policy of a method path; an unknown method is private (default deny)."""
    return POLICIES.get(method, Policy())


def public_methods() -> frozenset[str]:
    return frozenset(path for path, policy in POLICIES.items() if policy.public)


def api_key_methods() -> Mapping[str, frozenset[str]]:
    """The RPCs that take an API key, with the scopes each needs."""
    return {path: policy.api_key_scopes for path, policy in POLICIES.items() if policy.takes_api_key}
