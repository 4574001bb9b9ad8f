"""Races the database must win: one active code per user, one account per email, single-use tokens."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from support import FakeClock
from support.api import Api, bearer, expect_error, in_days

from referral_grpc.domain.events import CODE_CREATED
from referral_grpc.gen import auth_service_pb2 as auth_pb
from referral_grpc.gen import referral_service_pb2 as ref_pb
from referral_grpc.server import BLOCKING_NICENESS
from referral_grpc.store.models import Event, PasswordResetToken, ReferralCode, RefreshToken, User

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
    assert all(c.deactivated_at is not None for c in ReferralCode.select() if not c.is_active)
    # Each create, whichever way it went (one statement, or a transaction when it met another's
    # lock), appended its event once, naming its own code.
    issued = [json.loads(e.payload)["code"] for e in Event.select().where(Event.type == CODE_CREATED)]
    assert sorted(issued) == sorted(c.code for c in ReferralCode.select())
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


def test_parallel_refreshes_of_one_token_never_answer_ok_with_a_dead_token(api: Api) -> None:
    """One exchange wins; the others, inside the grace window, get the winner's token, which still works.

    Before: the losers revoked the family, winner's new token included, after the winner had been told OK.
    """
    tokens = api.register("refresher@example.com")
    request = auth_pb.RefreshTokenRequest(refresh_token=tokens.refresh_token)
    results = race(lambda _: api.auth.RefreshToken(request), n=10)
    errors = [r for r in results if isinstance(r, grpc.RpcError)]
    assert errors == []
    assert len({r.refresh_token for r in results}) == 1
    live = RefreshToken.select().where(RefreshToken.revoked_at.is_null() & RefreshToken.rotated_at.is_null())
    assert live.count() == 1
    for result in results:
        api.referrals.ListReferrals(ref_pb.ListReferralsRequest(), metadata=bearer(result.access_token))
    assert api.auth.RefreshToken(auth_pb.RefreshTokenRequest(refresh_token=results[0].refresh_token))


def test_parallel_replays_after_the_grace_window_revoke_the_family(api: Api, clock: FakeClock) -> None:
    tokens = api.register("replayed@example.com")
    request = auth_pb.RefreshTokenRequest(refresh_token=tokens.refresh_token)
    rotated = api.auth.RefreshToken(request)
    clock.advance(seconds=11)
    results = race(lambda _: api.auth.RefreshToken(request), n=10)
    assert {r.code() for r in results if isinstance(r, grpc.RpcError)} == {grpc.StatusCode.UNAUTHENTICATED}
    assert all(isinstance(r, grpc.RpcError) for r in results)
    err = expect_error(
        api.auth.RefreshToken, auth_pb.RefreshTokenRequest(refresh_token=rotated.refresh_token)
    )
    assert err.code == grpc.StatusCode.UNAUTHENTICATED


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


def test_parallel_reset_requests_leave_one_live_link(api: Api) -> None:
    api.register("asker@example.com")
    request = auth_pb.RequestPasswordResetRequest(email="asker@example.com")
    results = race(lambda _: api.auth.RequestPasswordReset(request), n=3)  # the per-account limit
    assert not [r for r in results if isinstance(r, grpc.RpcError)]
    assert PasswordResetToken.select().count() == 3
    assert PasswordResetToken.select().where(PasswordResetToken.used_at.is_null()).count() == 1


def test_password_hashing_runs_at_a_lower_priority_than_the_other_rpcs(api: Api) -> None:
    api.register("nice@example.com")  # a blocking RPC (bcrypt): the blocking pool
    lookup = ref_pb.GetReferralCodeByEmailRequest(email="nobody@example.com")
    assert expect_error(api.referrals.GetReferralCodeByEmail, lookup).code == grpc.StatusCode.NOT_FOUND

    def nice(thread: threading.Thread) -> int:
        assert thread.native_id is not None
        return os.getpriority(os.PRIO_PROCESS, thread.native_id)

    base = os.getpriority(os.PRIO_PROCESS, threading.main_thread().native_id or 0)
    blocking = [nice(t) for t in threading.enumerate() if t.name.startswith("rpc-blocking")]
    main_pool = [nice(t) for t in threading.enumerate() if t.name.startswith("rpc_")]
    assert blocking and main_pool
    assert set(blocking) == {min(19, base + BLOCKING_NICENESS)}
    assert set(main_pool) == {base}
