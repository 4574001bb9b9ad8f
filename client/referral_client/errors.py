"""Rich error details of a failed call: google.rpc ErrorInfo, BadRequest and RetryInfo, as plain data."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class ErrorDetails:
    """What the service said about a failed call.

    `reason` is one of referral.v1.ErrorReason (empty when the call failed before reaching the
    service, e.g. a connection refused); `metadata` carries its dynamic values (`field`, `limit`,
    `retry_after_seconds`); `field_violations` maps each invalid request field to what is wrong.
    """

    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    field_violations: dict[str, str] = field(default_factory=dict)
    retry_delay_seconds: float | None = None


def error_details(error: grpc.RpcError) -> ErrorDetails:
    """Read the details of `error`, as raised by a stub of this package."""
    if not isinstance(error, grpc.Call):  # what the stubs raise is both an RpcError and a Call
        return ErrorDetails(code=grpc.StatusCode.UNKNOWN, message=str(error))
    call = error
    details = ErrorDetails(code=call.code(), message=call.details() or "")
    status = _status(call)
    if status is None:
        return details
    reason, domain, metadata, violations, retry = "", "", {}, {}, None
    for packed in status.details:
        if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            packed.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            packed.Unpack(bad)
            violations = {v.field: v.description for v in bad.field_violations}
        elif packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info_retry = error_details_pb2.RetryInfo()
            packed.Unpack(info_retry)
            retry = info_retry.retry_delay.seconds + info_retry.retry_delay.nanos / 1e9
    return ErrorDetails(details.code, details.message, reason, domain, metadata, violations, retry)


def _status(call: grpc.Call) -> status_pb2.Status | None:
    for key, value in call.trailing_metadata() or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None
