"""Every error reason the server can send is listed in the contract (referral.v1.ErrorReason)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

from referral_grpc.api.errors import code_for, to_status
from referral_grpc.domain import errors
from referral_grpc.gen import error_reason_pb2

PACKAGE = Path(__file__).resolve().parents[1] / "referral_grpc"
# The runtime layers that raise errors; settings and the dev stack name environment variables instead.
RAISING_LAYERS = ("api", "domain", "infra", "store")
CONTRACT = set(error_reason_pb2.ErrorReason.DESCRIPTOR.values_by_name) - {"ERROR_REASON_UNSPECIFIED"}


def _upper_snake_literals(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.isupper()
        and "_" in node.value
        and node.value.replace("_", "").isalnum()
    }


def test_the_domain_reasons_are_exactly_the_contracts() -> None:
    assert {reason.value for reason in errors.Reason} == CONTRACT


def test_every_reason_in_the_code_is_listed_in_the_contract() -> None:
    files = [path for layer in RAISING_LAYERS for path in (PACKAGE / layer).rglob("*.py")]
    files.append(PACKAGE / "request_context.py")
    assert len(files) > 20
    found = {literal: path for path in files for literal in _upper_snake_literals(path)}
    unlisted = {literal: str(path.relative_to(PACKAGE)) for literal, path in found.items()}
    unlisted = {k: v for k, v in unlisted.items() if k not in CONTRACT}
    assert unlisted == {}
    # The scan sees the reasons raised through helpers and defaults too.
    assert {"FIELD_INVALID", "TOO_MANY_ATTEMPTS", "DEADLINE_EXCEEDED", "DATABASE_BUSY"} <= set(found)


def test_an_unlisted_reason_cannot_be_raised() -> None:
    with pytest.raises(ValueError, match="NOT_IN_THE_CONTRACT"):
        errors.NotFound("NOT_IN_THE_CONTRACT", "nothing")


def test_error_info_carries_the_field_and_the_limit() -> None:
    error = errors.InvalidArgument(
        "FIELD_TOO_LONG",
        "invalid email: too long",
        [errors.FieldViolation("email", "must be at most 254 characters")],
        {"limit": "254"},
    )
    status = to_status(error)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    infos = [d for d in _details(status) if isinstance(d, error_details_pb2.ErrorInfo)]
    assert [(i.reason, dict(i.metadata)) for i in infos] == [
        ("FIELD_TOO_LONG", {"field": "email", "limit": "254"})
    ]


def test_each_field_violation_carries_its_own_reason_or_the_errors() -> None:
    error = errors.InvalidArgument.of(
        [
            errors.FieldViolation("url", "is required", "FIELD_REQUIRED"),
            errors.FieldViolation("event_types[0]", "'x' is not an event type", "EVENT_TYPE_UNKNOWN"),
        ]
    )
    assert (error.reason, str(error)) == ("FIELD_REQUIRED", "invalid url: is required")
    [info, bad] = _details(to_status(error))
    assert isinstance(info, error_details_pb2.ErrorInfo) and isinstance(bad, error_details_pb2.BadRequest)
    assert info.reason == "FIELD_REQUIRED"
    assert [(v.field, v.reason) for v in bad.field_violations] == [
        ("url", "FIELD_REQUIRED"),
        ("event_types[0]", "EVENT_TYPE_UNKNOWN"),
    ]
    # A violation raised without a reason of its own is the error's.
    plain = errors.InvalidArgument("FIELD_TOO_LONG", "too long", [errors.FieldViolation("email", "too long")])
    [_, bad] = _details(to_status(plain))
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert [(v.field, v.reason) for v in bad.field_violations] == [("email", "FIELD_TOO_LONG")]


def test_error_info_carries_the_retry_delay() -> None:
    status = to_status(errors.ResourceExhausted("TOO_MANY_ATTEMPTS", "slow down", retry_after=42))
    infos = [d for d in _details(status) if isinstance(d, error_details_pb2.ErrorInfo)]
    assert dict(infos[0].metadata) == {"retry_after_seconds": "42"}


def _details(status: grpc.Status) -> list[object]:
    from google.rpc import status_pb2

    parsed = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    out: list[object] = []
    for any_detail in parsed.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
            if any_detail.Is(kind.DESCRIPTOR):
                message = kind()
                any_detail.Unpack(message)
                out.append(message)
    return out


def test_the_openapi_document_lists_every_reason() -> None:
    import json

    document = json.loads((PACKAGE.parent / "gateway" / "openapi.json").read_text(encoding="utf-8"))
    schema = document["components"]["schemas"]["ErrorReason"]
    assert set(schema["enum"]) == CONTRACT
    assert all(schema["x-enum-descriptions"][reason] for reason in CONTRACT)
    assert document["components"]["schemas"]["ErrorInfo"]["properties"]["reason"] == {
        "$ref": "#/components/schemas/ErrorReason"
    }


def test_every_reason_the_gateway_sends_is_listed_in_the_contract() -> None:
    """Envoy's own errors (local_reply_config, gateway/gateway.lua) use reasons of the contract too."""
    gateway = PACKAGE.parent / "gateway"
    config = (gateway / "envoy.yaml").read_text(encoding="utf-8")
    script = (gateway / "gateway.lua").read_text(encoding="utf-8")
    reasons = set(re.findall(r"reason: ([A-Z][A-Z0-9_]+)", config))
    reasons |= set(re.findall(r'refuse\(handle, \d+, \d+, "([A-Z][A-Z0-9_]+)"', script))
    assert {"MALFORMED_JSON", "UNKNOWN_PATH", "RATE_LIMITED", "QUERY_PARAMETERS_NOT_ALLOWED"} <= reasons
    assert reasons <= CONTRACT, reasons - CONTRACT


def test_a_plain_error_status_is_built_once_and_never_served_for_another_error() -> None:
    # Plain errors (no field violations, no retry delay) share one built status per (code, reason,
    # message, metadata): each of those must still decide what the caller gets.
    variants = [
        errors.NotFound("REFERRAL_CODE_NOT_FOUND", "no active code"),
        errors.NotFound("REFERRAL_CODE_NOT_FOUND", "another message"),
        errors.NotFound("USER_NOT_FOUND", "no active code"),
        errors.NotFound("USER_NOT_FOUND", "no active code", {"field": "email"}),
        errors.NotFound("USER_NOT_FOUND", "no active code", {"field": "user_id"}),
        errors.FailedPrecondition("USER_NOT_FOUND", "no active code", {"field": "user_id"}),
    ]
    seen = set()
    for error in variants * 2:
        status = to_status(error)
        assert status.code == code_for(error)
        assert status.details == error.message
        (info,) = _details(status)
        assert isinstance(info, error_details_pb2.ErrorInfo)
        assert (info.reason, info.domain, dict(info.metadata)) == (
            error.reason,
            "referral.v1",
            error.metadata,
        )
        seen.add(id(status))
    assert to_status(variants[0]) is to_status(errors.NotFound("REFERRAL_CODE_NOT_FOUND", "no active code"))
    assert len(seen) == len(variants)
