"""Helpers for talking to a real server over a real channel, and reading rich error details."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from referral_grpc.app import App, build_app
from referral_grpc.domain.ports import NoDispatch, NoEmailVerification
from referral_grpc.gen import (
    auth_service_pb2 as auth_pb,
)
from referral_grpc.gen import (
    auth_service_pb2_grpc,
    referral_service_pb2_grpc,
)
from referral_grpc.server import Server, create_server
from referral_grpc.settings import Settings
from referral_grpc.store.migrate import run_migrations
from referral_grpc.store.models import EmailOutbox


@dataclass
class Api:
    """A started server plus stubs on a real channel."""

    app: App
    server: Server
    channel: grpc.Channel
    auth: auth_service_pb2_grpc.AuthServiceStub
    referrals: referral_service_pb2_grpc.ReferralServiceStub

    def register(self, email: str, password: str = "correct horse battery", code: str = "") -> Any:
        return self.auth.Register(auth_pb.RegisterRequest(email=email, password=password, referral_code=code))

    def outbox(self, kind: str | None = None) -> list[EmailOutbox]:
        query = EmailOutbox.select().order_by(EmailOutbox.id)
        if kind:
            query = query.where(EmailOutbox.kind == kind)
        return list(query)

    def reset_token_for(self, recipient: str) -> str:
        rows = [row for row in self.outbox("password_reset") if row.recipient == recipient]
        assert rows, f"no reset email queued for {recipient}"
        return str(json.loads(rows[-1].payload)["token"])


@contextmanager
def running_api(settings: Settings, **collaborators: Any) -> Iterator[Api]:
    collaborators.setdefault("verifier", NoEmailVerification())
    collaborators.setdefault("dispatcher", NoDispatch())
    app = build_app(settings, **collaborators)
    run_migrations(app.db)
    server = create_server(app, "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Api(
            app=app,
            server=server,
            channel=channel,
            auth=auth_service_pb2_grpc.AuthServiceStub(channel),
            referrals=referral_service_pb2_grpc.ReferralServiceStub(channel),
        )
    finally:
        channel.close()
        server.stop(0)
        app.event_signal.close()
        app.db.close()


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def ts(value: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def in_days(clock: Any, days: float) -> timestamp_pb2.Timestamp:
    return ts(clock.now() + timedelta(days=days))


@dataclass
class RichError:
    code: grpc.StatusCode
    message: str
    reason: str
    fields: dict[str, str]
    retry_delay: float | None
    # Each field violation's own reason (BadRequest.FieldViolation.reason), by field.
    field_reasons: dict[str, str] = field(default_factory=dict)


def rich_error(err: grpc.RpcError) -> RichError:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    reason, fields, field_reasons, retry = "", {}, {}, None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                fields = {v.field: v.description for v in bad.field_violations}
                field_reasons = {v.field: v.reason for v in bad.field_violations}
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info_r = error_details_pb2.RetryInfo()
                detail.Unpack(info_r)
                retry = info_r.retry_delay.seconds + info_r.retry_delay.nanos / 1e9
    return RichError(
        err.code(),  # type: ignore[attr-defined]
        err.details() or "",  # type: ignore[attr-defined]
        reason,
        fields,
        retry,
        field_reasons,
    )


def expect_error(call: Any, *args: Any, **kwargs: Any) -> RichError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return rich_error(info.value)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]
