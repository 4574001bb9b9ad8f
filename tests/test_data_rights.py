"""Data rights over a real server: the export is complete, and erasure leaves the email in no table."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import peewee as pw
import pytest
from google.protobuf import json_format
from support import FakeClock
from support.api import bearer, expect_error
from support.rewards import RewardsApi, running_rewards

from referral_grpc.domain import audit
from referral_grpc.gen import auth_service_pb2 as auth_pb
from referral_grpc.gen import event_service_pb2 as ev_pb
from referral_grpc.gen import event_service_pb2_grpc
from referral_grpc.gen import referral_service_pb2 as ref_pb
from referral_grpc.store.models import AuditEvent

EMAIL = "Erased.Person@example.com"
PASSWORD = "correct horse battery"


@pytest.fixture
def rw(database_url: str, clock: FakeClock) -> Iterator[RewardsApi]:
    with running_rewards(database_url, clock) as api:
        yield api


def _text_columns(db: pw.Database) -> list[tuple[str, str]]:
    """Every column of every table that can hold text."""
    found = []
    for table in db.get_tables():
        for column in db.get_columns(table):
            kind = column.data_type.lower()
            if any(word in kind for word in ("char", "text", "clob", "json")):
                found.append((table, column.name))
    return found


def _rows_mentioning(db: pw.Database, needle: str) -> list[tuple[str, str]]:
    hits = []
    for table, column in _text_columns(db):
        query = f'SELECT COUNT(*) FROM "{table}" WHERE lower(CAST("{column}" AS TEXT)) LIKE ?'  # noqa: S608
        if not isinstance(db, pw.SqliteDatabase):
            query = query.replace("?", "%s")
        if db.execute_sql(query, (f"%{needle.lower()}%",)).fetchone()[0]:
            hits.append((table, column))
    return hits


def _history(rw: RewardsApi) -> tuple[int, int, int, str, str]:
    """A referrer, the person who later erases their data (referred, referring, earning), their newcomer."""
    rw.set_program()
    referrer, _, referrer_token = rw.person()
    tokens = rw.api.register(EMAIL, PASSWORD, code=rw.code_of(referrer_token))
    code = rw.code_of(tokens.access_token)
    newcomer, _, _ = rw.person(code)
    rw.event(tokens.user_id)  # qualifies their own referral: their referrer earns 500, they earn 1000
    rw.event(newcomer)  # they earn 500 as a referrer
    rw.api.auth.ChangePassword(
        auth_pb.ChangePasswordRequest(current_password=PASSWORD, new_password=PASSWORD + "!"),
        metadata=bearer(tokens.access_token),
    )
    fresh = rw.api.auth.Login(auth_pb.LoginRequest(email=EMAIL, password=PASSWORD + "!"))
    return referrer, int(tokens.user_id), newcomer, str(fresh.access_token), str(referrer_token)


def test_export_holds_everything_about_the_caller(rw: RewardsApi) -> None:
    referrer, user_id, newcomer, token, _ = _history(rw)
    response = rw.api.auth.ExportMyData(auth_pb.ExportMyDataRequest(), metadata=bearer(token))
    data = json_format.MessageToDict(response.data)
    assert set(data) == {"account", "codes", "referrer", "referrals", "ledger", "security_events", "consents"}
    assert data["account"]["email"].lower() == EMAIL.lower() and data["account"]["user_id"] == user_id
    assert [c["active"] for c in data["codes"]] == [True]
    assert data["referrer"] == {"user_id": referrer}
    assert [r["user_id"] for r in data["referrals"]] == [newcomer]
    assert sorted((e["kind"], e["amount_minor"]) for e in data["ledger"]) == [
        ("referee_reward", 1000),
        ("referrer_reward", 500),
    ]
    assert [e["action"] for e in data["security_events"]] == ["fraud.decide", "password.change"]
    assert data["consents"] == []
    anonymous = expect_error(rw.api.auth.ExportMyData, auth_pb.ExportMyDataRequest())
    assert anonymous.code == grpc.StatusCode.UNAUTHENTICATED


def test_erasure_leaves_no_trace_of_the_email_and_others_balances_unchanged(rw: RewardsApi) -> None:
    referrer, user_id, newcomer, token, referrer_token = _history(rw)
    db = rw.api.app.db
    assert _rows_mentioning(db, EMAIL)  # the control: before erasure the address is there
    balances_before = {uid: rw.balance(uid) for uid in (referrer, newcomer, user_id)}
    wrong = expect_error(
        rw.api.auth.DeleteMyAccount,
        auth_pb.DeleteMyAccountRequest(current_password="not my password"),
        metadata=bearer(token),
    )
    assert (wrong.code, wrong.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "WRONG_PASSWORD")

    events = event_service_pb2_grpc.EventServiceStub(rw.api.channel)
    reader = (("x-api-key", rw.new_key("events:read")),)
    cursor = events.ListEvents(ev_pb.ListEventsRequest(page_size=1000), metadata=reader).next_cursor
    rw.api.auth.DeleteMyAccount(
        auth_pb.DeleteMyAccountRequest(current_password=PASSWORD + "!"), metadata=bearer(token)
    )
    # Exactly one event, in the erasure's transaction: the user id, never the address.
    [deleted] = events.ListEvents(ev_pb.ListEventsRequest(after_cursor=cursor), metadata=reader).events
    assert (deleted.type, deleted.WhichOneof("payload"), deleted.user_deleted.user_id) == (
        "user.deleted",
        "user_deleted",
        user_id,
    )

    assert _rows_mentioning(db, EMAIL) == []
    assert _rows_mentioning(db, "erased.person") == []
    # Others' money is untouched, and so is the erased person's ledger (the links stay).
    assert {uid: rw.balance(uid) for uid in (referrer, newcomer, user_id)} == balances_before
    # Tokens revoked, the password no longer opens the account, the code no longer resolves.
    stale = expect_error(rw.api.auth.ExportMyData, auth_pb.ExportMyDataRequest(), metadata=bearer(token))
    assert stale.code == grpc.StatusCode.UNAUTHENTICATED
    login = expect_error(rw.api.auth.Login, auth_pb.LoginRequest(email=EMAIL, password=PASSWORD + "!"))
    assert login.reason == "INVALID_CREDENTIALS"
    lookup = expect_error(
        rw.api.referrals.GetReferralCodeByEmail, ref_pb.GetReferralCodeByEmailRequest(email=EMAIL)
    )
    assert lookup.code == grpc.StatusCode.NOT_FOUND
    # The referrer still sees the referral, as a deleted user.
    listed = rw.api.referrals.ListReferrals(ref_pb.ListReferralsRequest(), metadata=bearer(referrer_token))
    assert [(r.user_id, r.email) for r in listed.referrals] == [
        (user_id, f"deleted-user-{user_id}@deleted.invalid")
    ]
    # The erasure is in the audit log, without the address, and the chain is whole.
    [erased] = AuditEvent.select().where(AuditEvent.action == "user.erase")
    assert (erased.actor, erased.target) == (f"user:{user_id}", f"user:{user_id}")
    assert audit.verify_chain().broken is None
    assert json.dumps([erased.before, erased.after]) == "[null, null]"


def test_erasure_password_guesses_share_the_login_throttle(database_url: str, clock: FakeClock) -> None:
    """A stolen access token must not let anyone guess the password through DeleteMyAccount."""
    with running_rewards(database_url, clock, login_max_failures=3) as rw:
        tokens = rw.api.register(EMAIL, PASSWORD)
        guess = auth_pb.DeleteMyAccountRequest(current_password="not my password")
        for _ in range(3):
            wrong = expect_error(rw.api.auth.DeleteMyAccount, guess, metadata=bearer(tokens.access_token))
            assert wrong.reason == "WRONG_PASSWORD"
        throttled = expect_error(
            rw.api.auth.DeleteMyAccount,
            auth_pb.DeleteMyAccountRequest(current_password=PASSWORD),
            metadata=bearer(tokens.access_token),
        )
        assert throttled.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert throttled.reason == "TOO_MANY_ATTEMPTS" and throttled.retry_delay
        # Nothing was erased, and the account's login counter is the one that ran out.
        login = expect_error(rw.api.auth.Login, auth_pb.LoginRequest(email=EMAIL, password=PASSWORD))
        assert login.reason == "TOO_MANY_ATTEMPTS"
        clock.advance(seconds=901)
        assert rw.api.auth.Login(auth_pb.LoginRequest(email=EMAIL, password=PASSWORD)).access_token
