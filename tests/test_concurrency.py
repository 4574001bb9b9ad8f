"""Races the database must win: one active code per user, one account per email, single-use tokens."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from support import FakeClock
from support.api import Api, bearer, in_days

from referral_grpc.gen import auth_service_pb2 as auth_pb
from referral_grpc.gen import referral_service_pb2 as ref_pb
from referral_grpc.store.models import ReferralCode, User

PARALLEL = 20
pytestmark = [pytest.mark.databases("postgres"), pytest.mark.api_settings(grpc_max_workers=PARALLEL)]


def race(call: Callable[[int], Any], n: int = PARALLEL) -> list[Any]:
    """Run call(i) n times at once; return each result or the grpc.RpcError it raised."""

    def attempt(i: int) -> Any:
        try:
            return call(i)
        except grpc.RpcError as err:
            return err

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(attempt, range(n)))


def test_parallel_creates_leave_exactly_one_active_code(api: Api, clock: FakeClock) -> None:
    owner = api.register("racer@example.com")
    request = ref_pb.CreateReferralCodeRequest(expires_at=in_days(clock, 10))
    results = race(lambda _: api.referrals.CreateReferralCode(request, metadata=bearer(owner.access_token)))
    errors = [r for r in results if isinstance(r, grpc.RpcError)]
    assert errors == []
    active = list(ReferralCode.select().where(ReferralCode.is_active == True))  # noqa: E712
    assert len(active) == 1
    assert ReferralCode.select().count() == PARALLEL
    lookup = api.referrals.GetReferralCodeByEmail(
        ref_pb.GetReferralCodeByEmailRequest(email="racer@example.com")
    )
    assert lookup.code == active[0].code


def test_parallel_registrations_of_one_email_make_one_account(api: Api) -> None:
    results = race(lambda i: api.register("Same@Example.com" if i % 2 else "same@example.com"), n=10)
    ok = [r for r in results if not isinstance(r, grpc.RpcError)]
    errors = [r for r in results if isinstance(r, grpc.RpcError)]
    assert len(ok) == 1
    assert {e.code() for e in errors} == {grpc.StatusCode.ALREADY_EXISTS}
    assert User.select().count() == 1


def test_a_refresh_token_is_exchanged_once(api: Api) -> None:
    tokens = api.register("refresher@example.com")
    request = auth_pb.RefreshTokenRequest(refresh_token=tokens.refresh_token)
    results = race(lambda _: api.auth.RefreshToken(request), n=10)
    ok = [r for r in results if not isinstance(r, grpc.RpcError)]
    assert len(ok) <= 1
    assert all(r.code() == grpc.StatusCode.UNAUTHENTICATED for r in results if isinstance(r, grpc.RpcError))


def test_a_reset_token_is_consumed_once(api: Api) -> None:
    api.register("resetter@example.com")
    api.auth.RequestPasswordReset(auth_pb.RequestPasswordResetRequest(email="resetter@example.com"))
    token = api.reset_token_for("resetter@example.com")
    results = race(
        lambda i: api.auth.ResetPassword(
            auth_pb.ResetPasswordRequest(token=token, new_password=f"new password {i}")
        ),
        n=10,
    )
    ok = [i for i, r in enumerate(results) if not isinstance(r, grpc.RpcError)]
    assert len(ok) == 1
    winner = f"new password {ok[0]}"
    assert api.auth.Login(auth_pb.LoginRequest(email="resetter@example.com", password=winner)).user_id
