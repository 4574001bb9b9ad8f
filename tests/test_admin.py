"""AdminService over a real server and channel: users, blocks, adjustments, the program, the audit log."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from support import FakeClock
from support.api import bearer, expect_error
from support.rewards import RewardsApi, running_rewards

from referral_grpc.domain.fraud import FraudRules
from referral_grpc.gen import admin_service_pb2 as adm_pb
from referral_grpc.gen import admin_service_pb2_grpc, event_service_pb2_grpc
from referral_grpc.gen import auth_service_pb2 as auth_pb
from referral_grpc.gen import event_service_pb2 as ev_pb
from referral_grpc.gen import referral_service_pb2 as ref_pb
from referral_grpc.store.models import AuditEvent, LedgerEntry

Metadata = tuple[tuple[str, str], ...]


class Admin:
    def __init__(self, rw: RewardsApi) -> None:
        self.rw = rw
        self.stub = admin_service_pb2_grpc.AdminServiceStub(rw.api.channel)
        self.read: Metadata = (("x-api-key", rw.api.app.api_keys.create("support", ["admin:read"]).key),)
        self.write: Metadata = (
            ("x-api-key", rw.api.app.api_keys.create("ops", ["admin:read", "admin:write"]).key),
        )

    def once(self, key: Metadata | None = None) -> Metadata:
        """The write key with a fresh Idempotency-Key: AdjustBalance requires one."""
        return (*(key or self.write), ("idempotency-key", uuid.uuid4().hex))


@pytest.fixture
def admin(database_url: str, clock: FakeClock) -> Iterator[Admin]:
    with running_rewards(database_url, clock) as rw:
        yield Admin(rw)


def test_get_user_by_id_and_by_email(admin: Admin) -> None:
    rw = admin.rw
    rw.set_program()
    referrer, newcomer = rw.pair()
    rw.event(newcomer)
    by_id = admin.stub.GetUser(adm_pb.GetUserRequest(user_id=referrer), metadata=admin.read)
    email = by_id.email
    by_email = admin.stub.GetUser(adm_pb.GetUserRequest(email=email.upper()), metadata=admin.read)
    assert by_id == by_email
    assert len(by_id.codes) == 1 and by_id.codes[0].active
    assert {c.state: c.count for c in by_id.referrals_by_state}["qualified"] == 1
    assert [(b.currency, b.pending_minor) for b in by_id.balances] == [("USD", 500)]
    assert not by_id.blocked and by_id.referrer_user_id == 0
    newcomer_view = admin.stub.GetUser(adm_pb.GetUserRequest(user_id=newcomer), metadata=admin.read)
    assert newcomer_view.referrer_user_id == referrer
    for request in (adm_pb.GetUserRequest(user_id=10_000), adm_pb.GetUserRequest(email="nobody@example.com")):
        missing = expect_error(admin.stub.GetUser, request, metadata=admin.read)
        assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")


def test_a_blocked_user_is_locked_out_everywhere_and_earns_nothing(admin: Admin) -> None:
    rw = admin.rw
    rw.set_program()
    tokens = rw.api.register("mallory@example.com")
    code = rw.code_of(tokens.access_token)
    blocked = admin.stub.BlockUser(
        adm_pb.BlockUserRequest(user_id=tokens.user_id, note="farming"), metadata=admin.write
    )
    assert blocked.blocked and blocked.HasField("blocked_at")

    login = expect_error(
        rw.api.auth.Login, auth_pb.LoginRequest(email="mallory@example.com", password="correct horse battery")
    )
    assert (login.code, login.reason) == (grpc.StatusCode.UNAUTHENTICATED, "ACCOUNT_BLOCKED")
    wrong = expect_error(
        rw.api.auth.Login, auth_pb.LoginRequest(email="mallory@example.com", password="nope")
    )
    assert wrong.reason == "INVALID_CREDENTIALS"  # the block is revealed only to the password's holder
    refresh = expect_error(
        rw.api.auth.RefreshToken, auth_pb.RefreshTokenRequest(refresh_token=tokens.refresh_token)
    )
    assert refresh.code == grpc.StatusCode.UNAUTHENTICATED
    old_token = expect_error(
        rw.api.referrals.GetReferralStats,
        ref_pb.GetReferralStatsRequest(),
        metadata=bearer(tokens.access_token),
    )
    assert (old_token.code, old_token.reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN")
    lookup = expect_error(
        rw.api.referrals.GetReferralCodeByEmail,
        ref_pb.GetReferralCodeByEmailRequest(email="mallory@example.com"),
    )
    assert (lookup.code, lookup.reason) == (grpc.StatusCode.NOT_FOUND, "REFERRAL_CODE_NOT_FOUND")
    signup = expect_error(rw.api.register, "friend@example.com", code=code)
    assert (signup.code, signup.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REFERRAL_CODE_UNKNOWN")

    # A referral made before the block earns nothing while the referrer is blocked.
    admin.stub.UnblockUser(adm_pb.UnblockUserRequest(user_id=tokens.user_id), metadata=admin.write)
    friend = rw.api.register("friend@example.com", code=code)
    admin.stub.BlockUser(adm_pb.BlockUserRequest(user_id=tokens.user_id), metadata=admin.write)
    recorded = rw.event(friend.user_id)
    assert not recorded.rewards
    assert LedgerEntry.select().count() == 0

    unblocked = admin.stub.UnblockUser(
        adm_pb.UnblockUserRequest(user_id=tokens.user_id, note="appeal granted"), metadata=admin.write
    )
    assert not unblocked.blocked
    rw.api.auth.Login(auth_pb.LoginRequest(email="mallory@example.com", password="correct horse battery"))
    assert (
        rw.api.referrals.GetReferralCodeByEmail(
            ref_pb.GetReferralCodeByEmailRequest(email="mallory@example.com")
        ).code
        == code
    )
    rows = list(
        AuditEvent.select().where(AuditEvent.target == f"user:{tokens.user_id}").order_by(AuditEvent.seq)
    )
    assert [(r.actor, r.action) for r in rows] == [
        ("key:ops", "user.block"),
        ("key:ops", "user.unblock"),
        ("key:ops", "user.block"),
        ("key:ops", "user.unblock"),
    ]
    assert json.loads(rows[0].after) == {"blocked": True, "note": "farming"}
    assert [e.action for e in unblocked.recent_security_events][:2] == ["user.unblock", "user.block"]


def test_adjust_balance_is_a_signed_ledger_entry_with_a_reason(admin: Admin) -> None:
    rw = admin.rw
    user_id, _, _ = rw.person()
    credit = admin.stub.AdjustBalance(
        adm_pb.AdjustBalanceRequest(user_id=user_id, amount_minor=700, currency="usd", reason="goodwill"),
        metadata=admin.once(),
    )
    admin.stub.AdjustBalance(
        adm_pb.AdjustBalanceRequest(user_id=user_id, amount_minor=-200, currency="USD", reason="correction"),
        metadata=admin.once(),
    )
    assert (credit.amount_minor, credit.currency) == (700, "USD")
    assert rw.balance(user_id)[0] == 500
    bad = expect_error(
        admin.stub.AdjustBalance,
        adm_pb.AdjustBalanceRequest(user_id=user_id, amount_minor=0, currency="XXQ"),
        metadata=admin.once(),
    )
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(bad.fields) == {"amount_minor", "currency", "reason"}
    missing = expect_error(
        admin.stub.AdjustBalance,
        adm_pb.AdjustBalanceRequest(user_id=9999, amount_minor=1, currency="USD", reason="x"),
        metadata=admin.once(),
    )
    assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")
    denied = expect_error(
        admin.stub.AdjustBalance,
        adm_pb.AdjustBalanceRequest(user_id=user_id, amount_minor=1, currency="USD", reason="x"),
        metadata=admin.once(admin.read),
    )
    assert (denied.code, denied.reason) == (grpc.StatusCode.PERMISSION_DENIED, "API_KEY_SCOPE_MISSING")
    [first, second] = (
        AuditEvent.select().where(AuditEvent.action == "balance.adjust").order_by(AuditEvent.seq)
    )
    assert (
        json.loads(first.after)["reason"] == "goodwill" and json.loads(second.after)["amount_minor"] == -200
    )


def test_a_retried_adjustment_adjusts_once(admin: Admin) -> None:
    """AdjustBalance requires an Idempotency-Key: the same key and request is the first answer again (one
    ledger entry, one audit row), the same key with another request is refused, no key is refused."""
    rw = admin.rw
    user_id, _, _ = rw.person()
    request = adm_pb.AdjustBalanceRequest(
        user_id=user_id, amount_minor=700, currency="USD", reason="goodwill"
    )
    key = admin.once()
    first = admin.stub.AdjustBalance(request, metadata=key)
    retried = admin.stub.AdjustBalance(request, metadata=key)
    assert retried == first
    entries = LedgerEntry.select().where((LedgerEntry.user == user_id) & (LedgerEntry.kind == "adjustment"))
    assert [(e.id, e.amount_minor) for e in entries] == [(first.id, 700)]
    assert rw.balance(user_id)[0] == 700
    adjusted = (AuditEvent.action == "balance.adjust") & (AuditEvent.target == f"user:{user_id}")
    assert AuditEvent.select().where(adjusted).count() == 1
    request.amount_minor = 7000
    reused = expect_error(admin.stub.AdjustBalance, request, metadata=key)
    assert (reused.code, reused.reason) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    keyless = expect_error(admin.stub.AdjustBalance, request, metadata=admin.write)
    assert (keyless.code, keyless.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "IDEMPOTENCY_KEY_REQUIRED")
    assert rw.balance(user_id)[0] == 700


def test_an_update_to_the_rules_in_force_stores_no_new_version(admin: Admin) -> None:
    """UpdateProgram is safe to retry: the same rules again are the version in force, not a new one."""
    rules = adm_pb.Program(
        currency="USD", event_types=["purchase"], attribution_days=30, referrer_reward_minor=300
    )
    updates = AuditEvent.select().where(AuditEvent.action == "program.update")
    first = admin.stub.UpdateProgram(adm_pb.UpdateProgramRequest(program=rules), metadata=admin.write)
    stored = updates.count()
    again = admin.stub.UpdateProgram(adm_pb.UpdateProgramRequest(program=rules), metadata=admin.write)
    assert again == first
    assert updates.count() == stored
    rules.hold_days = 3
    changed = admin.stub.UpdateProgram(adm_pb.UpdateProgramRequest(program=rules), metadata=admin.write)
    assert changed.version == first.version + 1


def test_program_versions_through_the_admin_api(admin: Admin) -> None:
    none = expect_error(admin.stub.GetProgram, adm_pb.GetProgramRequest(), metadata=admin.read)
    assert (none.code, none.reason) == (grpc.StatusCode.NOT_FOUND, "PROGRAM_NOT_SET")
    rules = adm_pb.Program(
        currency="EUR", event_types=["purchase"], attribution_days=30, referrer_reward_minor=300, hold_days=7
    )
    first = admin.stub.UpdateProgram(adm_pb.UpdateProgramRequest(program=rules), metadata=admin.write)
    rules.hold_days = 1
    second = admin.stub.UpdateProgram(adm_pb.UpdateProgramRequest(program=rules), metadata=admin.write)
    assert second.version > first.version
    assert admin.stub.GetProgram(adm_pb.GetProgramRequest(), metadata=admin.read) == second
    rules.attribution_days, rules.referrer_reward_bps = 0, 20_000
    bad = expect_error(
        admin.stub.UpdateProgram, adm_pb.UpdateProgramRequest(program=rules), metadata=admin.write
    )
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {"attribution_days", "referrer_reward_bps", "referrer_reward"} <= set(bad.fields)
    [row] = (
        AuditEvent.select()
        .where(AuditEvent.action == "program.update")
        .order_by(AuditEvent.seq.desc())
        .limit(1)
    )
    assert (row.actor, json.loads(row.before)["hold_days"], json.loads(row.after)["hold_days"]) == (
        "key:ops",
        7,
        1,
    )


def test_audit_events_page_and_filter(admin: Admin) -> None:
    rw = admin.rw
    users = [rw.person()[0] for _ in range(3)]
    for user_id in users:
        for amount in (1, 2):
            admin.stub.AdjustBalance(
                adm_pb.AdjustBalanceRequest(user_id=user_id, amount_minor=amount, currency="USD", reason="r"),
                metadata=admin.once(),
            )
    seen: list[int] = []
    token = ""
    while True:
        page = admin.stub.ListAuditEvents(
            adm_pb.ListAuditEventsRequest(page_size=4, page_token=token, actor="key:ops"), metadata=admin.read
        )
        seen += [e.seq for e in page.events]
        assert all(e.actor == "key:ops" for e in page.events)
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 6 and seen == sorted(seen, reverse=True)
    one = admin.stub.ListAuditEvents(
        adm_pb.ListAuditEventsRequest(target=f"user:{users[1]}"), metadata=admin.read
    )
    assert [(e.action, json.loads(e.after)["amount_minor"]) for e in one.events] == [
        ("balance.adjust", 2),
        ("balance.adjust", 1),
    ]
    assert all(e.request_id not in ("", "-") for e in one.events)
    forged = expect_error(
        admin.stub.ListAuditEvents, adm_pb.ListAuditEventsRequest(page_token="abc"), metadata=admin.read
    )
    assert forged.reason == "PAGE_TOKEN_INVALID"


class Log:
    """The event log as a consumer reads it: ListEvents over gRPC with an `events:read` key."""

    def __init__(self, rw: RewardsApi) -> None:
        self.stub = event_service_pb2_grpc.EventServiceStub(rw.api.channel)
        self.auth = (("x-api-key", rw.new_key("events:read")),)
        self.cursor = 0
        self.new()

    def new(self) -> list[tuple[str, dict[str, Any]]]:
        """(type, payload as JSON) of every event since the last call."""
        page = self.stub.ListEvents(
            ev_pb.ListEventsRequest(after_cursor=self.cursor, page_size=1000), metadata=self.auth
        )
        self.cursor = page.next_cursor
        return [
            (
                e.type,
                json_format.MessageToDict(
                    getattr(e, e.WhichOneof("payload")), preserving_proto_field_name=True
                ),
            )
            for e in page.events
        ]


def test_each_admin_action_is_its_event(admin: Admin) -> None:
    """Issue 13: decisions and admin actions are events, each written with the change it describes."""
    rw = admin.rw
    log = Log(rw)
    user_id, _, _ = rw.person()
    assert [t for t, _ in log.new()] == ["user.registered"]
    block = adm_pb.BlockUserRequest(user_id=user_id, note="farming")
    admin.stub.BlockUser(block, metadata=admin.write)
    assert log.new() == [("user.blocked", {"user_id": str(user_id)})]
    admin.stub.BlockUser(block, metadata=admin.write)  # a retry changes nothing, so tells nothing
    assert log.new() == []
    admin.stub.UnblockUser(adm_pb.UnblockUserRequest(user_id=user_id), metadata=admin.write)
    assert log.new() == [("user.unblocked", {"user_id": str(user_id)})]

    adjust = adm_pb.AdjustBalanceRequest(user_id=user_id, amount_minor=-200, currency="USD", reason="fix")
    key = admin.once()
    entry = admin.stub.AdjustBalance(adjust, metadata=key)
    admin.stub.AdjustBalance(adjust, metadata=key)  # the retry of a lost answer
    assert log.new() == [
        (
            "balance.adjusted",
            {
                "user_id": str(user_id),
                "ledger_entry_id": str(entry.id),
                "amount_minor": "-200",
                "currency": "USD",
            },
        )
    ]

    # Every referral held for review (velocity with a threshold of 0), so there is one to decide.
    rules = adm_pb.Program(
        currency="USD",
        event_types=["purchase"],
        attribution_days=30,
        fraud=adm_pb.FraudRules(**(FraudRules().as_dict() | {"velocity": "review", "referrals_per_hour": 0})),
    )
    program = admin.stub.UpdateProgram(adm_pb.UpdateProgramRequest(program=rules), metadata=admin.write)
    admin.stub.UpdateProgram(adm_pb.UpdateProgramRequest(program=rules), metadata=admin.write)
    assert log.new() == [("program.updated", {"version": str(program.version)})]

    referrer, approved = rw.pair()
    rejected = rw.pair()[1]
    log.new()  # their registrations and codes
    decide = adm_pb.DecideReferralRequest(user_id=approved, decision=adm_pb.APPROVE)
    admin.stub.DecideReferral(decide, metadata=admin.write)
    assert log.new() == [
        ("referral.approved", {"referee_user_id": str(approved), "referrer_user_id": str(referrer)})
    ]
    again = expect_error(admin.stub.DecideReferral, decide, metadata=admin.write)
    assert again.reason == "REFERRAL_ALREADY_DECIDED" and log.new() == []
    admin.stub.DecideReferral(
        adm_pb.DecideReferralRequest(user_id=rejected, decision=adm_pb.REJECT), metadata=admin.write
    )
    [(kind, payload)] = log.new()
    assert (kind, payload["referee_user_id"], payload["reason"]) == (
        "referral.rejected",
        str(rejected),
        "rejected_on_review",
    )
