"""Conversions between protobuf messages and domain values."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime

import grpc
from google.protobuf import timestamp_pb2

from ..domain.auth import IssuedTokens
from ..domain.errors import InvalidArgument
from ..domain.fraud import ClientInfo
from ..domain.verification import Resent, Verified
from ..gen import auth_service_pb2

# google.protobuf.Timestamp's own range: 0001-01-01 to 9999-12-31.
_MIN_SECONDS = -62135596800
_MAX_SECONDS = 253402300799


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    """Seconds and nanos from the epoch, computed here: Timestamp.FromDatetime costs several times more
    (range checks, calendar.timegm), and a list page converts two per row."""
    converted = timestamp_pb2.Timestamp()
    set_timestamp(converted, value)
    return converted


def set_timestamp(target: timestamp_pb2.Timestamp, value: datetime) -> None:
    """`timestamp(value)` written into a message's own Timestamp field: nothing built only to be copied."""
    if value.tzinfo is None:
        value = value.astimezone(UTC)  # a naive time is local time, as FromDatetime took it
    delta = value - _EPOCH
    target.seconds = delta.days * 86_400 + delta.seconds
    target.nanos = delta.microseconds * 1000


def to_datetime(ts: timestamp_pb2.Timestamp, field: str) -> datetime:
    if not _MIN_SECONDS <= ts.seconds <= _MAX_SECONDS or not 0 <= ts.nanos < 1_000_000_000:
        raise InvalidArgument.for_field(field, "is not a valid timestamp", "TIMESTAMP_INVALID")
    return ts.ToDatetime(tzinfo=UTC)


def auth_tokens(tokens: IssuedTokens) -> auth_service_pb2.AuthTokens:
    return auth_service_pb2.AuthTokens(
        user_id=tokens.user_id,
        access_token=tokens.access_token,
        token_type="Bearer",  # noqa: S106 - the OAuth token type, not a secret
        expires_in=tokens.expires_in,
        refresh_token=tokens.refresh_token,
        refresh_expires_in=tokens.refresh_expires_in,
    )


def metadata_value(context: grpc.ServicerContext, key: str) -> str:
    """A text metadata entry (an HTTP header through Envoy), or "" when absent."""
    for name, value in context.invocation_metadata() or ():
        if name == key and isinstance(value, str):
            return value
    return ""


def client_info(context: grpc.ServicerContext) -> ClientInfo:
    """The client's address and optional device id, for fraud checks.

    Envoy (use_remote_address, no trusted hops) appends the peer it saw to x-forwarded-for, so only
    the last entry is trustworthy; a direct gRPC caller is the channel's peer itself.
    """
    forwarded = metadata_value(context, "x-forwarded-for")
    if forwarded:
        address = forwarded.rsplit(",", 1)[-1].strip()
    else:
        # "ipv4:127.0.0.1:5555" / "ipv6:[::1]:5555": the host, without the port.
        peer = context.peer() or ""
        address = peer.partition(":")[2].rpartition(":")[0].strip("[]")
    # A local process (a script, a developer's curl, the tests) says nothing about who the client
    # is: every such call would otherwise share one address and trip the address signals.
    if _is_loopback(address):
        address = ""
    return ClientInfo(address=address, device_id=metadata_value(context, "x-device-id").strip())


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def verified(result: Verified) -> auth_service_pb2.VerifyEmailResponse:
    return auth_service_pb2.VerifyEmailResponse(
        user_id=result.user_id, email_verified_at=timestamp(result.email_verified_at)
    )


def resent(result: Resent) -> auth_service_pb2.ResendVerificationEmailResponse:
    response = auth_service_pb2.ResendVerificationEmailResponse(email_sent=result.email_sent)
    if result.email_verified_at is not None:
        response.email_verified_at.CopyFrom(timestamp(result.email_verified_at))
    return response
