"""Rewards over a real server and channel: events, rules, refunds, ledger, redemption."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import grpc
import peewee as pw
import pytest
from support import FakeClock
from support.api import bearer, expect_error, in_days
from support.rewards import RewardsApi, new_event_id, running_rewards

from referral_grpc.domain.apikeys import KEY_CACHE_SECONDS, ApiKeyService
from referral_grpc.domain.auth import mask_email
from referral_grpc.domain.errors import Unauthenticated
from referral_grpc.domain.ports import SystemClock
from referral_grpc.domain.programs import Reward
from referral_grpc.gen import auth_service_pb2 as auth_pb
from referral_grpc.gen import referral_service_pb2 as ref_pb
from referral_grpc.gen import reward_service_pb2 as rw_pb
from referral_grpc.store.models import ApiKey, EmailOutbox, Event, LedgerEntry, Referral, RewardEvent, User

Skip = rw_pb.SkippedReward


@pytest.fixture
def rw(database_url: str, clock: FakeClock) -> Iterator[RewardsApi]:
    with running_rewards(database_url, clock) as api:
        yield api


def skipped(response: rw_pb.RecordEventResponse) -> set[tuple[str, str]]:
    return {
        (rw_pb.Beneficiary.Name(s.beneficiary), rw_pb.SkipReason.Name(s.reason)) for s in response.skipped
    }


def both(reason: str) -> set[tuple[str, str]]:
    return {("REFERRER", reason), ("REFEREE", reason)}


def test_a_qualifying_purchase_rewards_both_and_the_hold_releases_them(
    rw: RewardsApi, clock: FakeClock
) -> None:
    rw.set_program()
    referrer, newcomer = rw.pair()
    response = rw.event(newcomer, amount_minor=12_345)
    assert response.referral_state == ref_pb.QUALIFIED
    assert not response.duplicate and not response.skipped
    credited = {(e.user_id, rw_pb.LedgerEntryKind.Name(e.kind), e.amount_minor) for e in response.rewards}
    # 10 % of 123.45 is 12.34 (rounded down, integers only); the referrer's is fixed.
    assert credited == {(referrer, "REFERRER_REWARD", 500), (newcomer, "REFEREE_REWARD", 1234)}
    assert all(e.referral_user_id == newcomer and e.event_id == response.event_id for e in response.rewards)
    assert rw.balance(referrer) == (0, 500, 500)
    assert rw.balance(newcomer) == (0, 1234, 1234)
    clock.advance(days=14)
    assert rw.balance(referrer) == (500, 0, 500)
    assert rw.balance(newcomer) == (1234, 0, 1234)
    # The referrer was told, through the outbox: one email, claimed for the hand-off by its insert.
    [email] = EmailOutbox.select().where(EmailOutbox.kind == "reward_credited")
    referrer_email, newcomer_email = (User.get_by_id(user).email for user in (referrer, newcomer))
    assert email.recipient == referrer_email
    assert json.loads(email.payload) == {
        "amount": "5.00 USD",
        "referee_email_masked": mask_email(newcomer_email),
        # Recorded 14 days ago (the clock has moved since), held for 14 days: available today.
        "available_on": clock.now().date().isoformat(),
    }
    assert (email.status, email.attempts, email.enqueued_at) == ("pending", 0, email.created_at)


def test_the_newcomer_sees_their_reward_with_their_own_token(rw: RewardsApi) -> None:
    rw.set_program()
    _, _, token = rw.person()
    newcomer, _, newcomer_token = rw.person(rw.code_of(token))
    rw.event(newcomer, amount_minor=5_000)
    own = rw.rewards.GetBalance(rw_pb.GetBalanceRequest(), metadata=bearer(newcomer_token))
    assert [(b.currency, b.pending_minor) for b in own.balances] == [("USD", 500)]
    ledger = rw.rewards.ListLedgerEntries(rw_pb.ListLedgerEntriesRequest(), metadata=bearer(newcomer_token))
    assert [(e.kind, e.amount_minor) for e in ledger.entries] == [(rw_pb.REFEREE_REWARD, 500)]
    # A user reads only their own balance.
    other = expect_error(
        rw.rewards.GetBalance, rw_pb.GetBalanceRequest(user_id=newcomer + 1), metadata=bearer(newcomer_token)
    )
    assert (other.code, other.fields.keys()) == (grpc.StatusCode.INVALID_ARGUMENT, {"user_id"})


def test_list_referrals_and_stats_show_the_state(rw: RewardsApi, clock: FakeClock) -> None:
    rw.set_program()
    _, _, token = rw.person()
    code = rw.code_of(token)
    first, _, _ = rw.person(code)
    second, _, _ = rw.person(code)
    clock.advance(minutes=1)
    rw.event(first)
    listed = rw.api.referrals.ListReferrals(ref_pb.ListReferralsRequest(), metadata=bearer(token))
    states = {r.user_id: (r.state, r.HasField("qualified_at")) for r in listed.referrals}
    assert states == {first: (ref_pb.QUALIFIED, True), second: (ref_pb.PENDING, False)}
    stats = rw.api.referrals.GetReferralStats(ref_pb.GetReferralStatsRequest(), metadata=bearer(token))
    assert (stats.pending, stats.qualified, stats.reversed, stats.rejected) == (1, 1, 0, 0)
    assert [(e.currency, e.lifetime_earned_minor) for e in stats.earned] == [("USD", 500)]


def test_the_same_event_is_recorded_once(rw: RewardsApi) -> None:
    rw.set_program()
    referrer, newcomer = rw.pair()
    first = rw.event(newcomer, event_id="order-1")
    again = rw.event(newcomer, event_id="order-1")
    assert again.duplicate and not first.duplicate
    assert [e.id for e in again.rewards] == [e.id for e in first.rewards]
    assert again.referral_state == first.referral_state
    # Named by email instead of id: the same event.
    by_email = rw.rewards.RecordEvent(
        rw_pb.RecordEventRequest(
            event_id="order-1",
            email=User.get_by_id(newcomer).email.upper(),
            type="purchase",
            amount_minor=10_000,
            currency="USD",
        ),
        metadata=rw.auth,
    )
    assert by_email.duplicate
    conflict = expect_error(rw.event, newcomer, event_id="order-1", amount_minor=10_001)
    assert (conflict.code, conflict.reason) == (grpc.StatusCode.ALREADY_EXISTS, "EVENT_ID_CONFLICT")
    assert LedgerEntry.select().count() == 2
    assert rw.balance(referrer)[1] == 500


def test_a_duplicate_of_a_skipped_event_repeats_its_reasons(rw: RewardsApi) -> None:
    _, newcomer = rw.pair()
    first = rw.event(newcomer, event_id="early")
    assert skipped(first) == both("NO_PROGRAM")
    rw.set_program()
    again = rw.event(newcomer, event_id="early")
    assert again.duplicate and skipped(again) == both("NO_PROGRAM")
    assert LedgerEntry.select().count() == 0


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no referrer", "NO_REFERRER"),
        ("not a qualifying type", "EVENT_TYPE_NOT_QUALIFYING"),
        ("another currency", "CURRENCY_NOT_QUALIFYING"),
        ("below the minimum", "AMOUNT_BELOW_MINIMUM"),
        ("after the window", "OUTSIDE_ATTRIBUTION_WINDOW"),
        ("long before registration", "OUTSIDE_ATTRIBUTION_WINDOW"),
        ("a second qualifying event", "ALREADY_QUALIFIED"),
    ],
)
def test_events_that_credit_nothing_say_why(rw: RewardsApi, clock: FakeClock, case: str, reason: str) -> None:
    rw.set_program(min_amount_minor=1000, attribution_days=30)
    _, newcomer = rw.pair()
    loner, _, _ = rw.person()
    registered = clock.now()
    calls = {
        "no referrer": lambda: rw.event(loner),
        "not a qualifying type": lambda: rw.event(newcomer, type="subscription_started"),
        "another currency": lambda: rw.event(newcomer, currency="EUR"),
        "below the minimum": lambda: rw.event(newcomer, amount_minor=999),
        "after the window": lambda: rw.event(
            newcomer, occurred_at=registered + timedelta(days=30, seconds=1)
        ),
        "long before registration": lambda: rw.event(newcomer, occurred_at=registered - timedelta(minutes=6)),
        "a second qualifying event": lambda: (rw.event(newcomer), rw.event(newcomer))[1],
    }
    if case == "after the window":
        clock.advance(days=31)
    before = LedgerEntry.select().count()
    response = calls[case]()
    assert skipped(response) == both(reason)
    assert not response.rewards
    assert LedgerEntry.select().count() == before + (2 if case == "a second qualifying event" else 0)
    assert RewardEvent.select().where(RewardEvent.event_id == response.event_id).exists()


def test_clock_skew_at_registration_and_the_window_edge_count(rw: RewardsApi, clock: FakeClock) -> None:
    rw.set_program(attribution_days=30)
    _, skewed = rw.pair()
    response = rw.event(skewed, occurred_at=clock.now() - timedelta(minutes=4))
    assert response.referral_state == ref_pb.QUALIFIED
    _, late = rw.pair()
    clock.advance(days=30)
    assert rw.event(late, occurred_at=clock.now()).referral_state == ref_pb.QUALIFIED


def test_the_referrer_cap_counts_rewarded_referrals(rw: RewardsApi) -> None:
    rw.set_program(max_rewarded_referrals=1)
    referrer, _, token = rw.person()
    code = rw.code_of(token)
    first, _, _ = rw.person(code)
    second, _, _ = rw.person(code)
    assert not rw.event(first).skipped
    capped = rw.event(second)
    assert skipped(capped) == both("REFERRER_CAP_REACHED")
    assert rw.balance(referrer)[1] == 500


def test_a_program_paying_only_the_newcomer_says_so_for_the_referrer(rw: RewardsApi) -> None:
    rw.set_program(referrer=Reward())
    referrer, newcomer = rw.pair()
    response = rw.event(newcomer)
    assert skipped(response) == {("REFERRER", "NO_REWARD_CONFIGURED")}
    assert rw.balance(referrer) == (0, 0, 0)
    assert EmailOutbox.select().where(EmailOutbox.kind == "reward_credited").count() == 0
    # A retry is told the same: the reward it got and the one it did not.
    again = rw.event(newcomer, event_id=response.event_id)
    assert again.duplicate and skipped(again) == {("REFERRER", "NO_REWARD_CONFIGURED")}
    assert [(e.id, e.amount_minor) for e in again.rewards] == [
        (e.id, e.amount_minor) for e in response.rewards
    ]
    assert again.referral_state == ref_pb.QUALIFIED


def test_each_referral_keeps_the_version_it_was_judged_under(rw: RewardsApi) -> None:
    first_version = rw.set_program()
    _, early = rw.pair()
    rw.event(early)
    rw.set_program(referrer=Reward(fixed_minor=900))
    referrer, late = rw.pair()
    assert [e.amount_minor for e in rw.event(late).rewards if e.user_id == referrer] == [900]
    versions = dict(rw.api.app.db.execute_sql("SELECT referee_id, program_id FROM referrals").fetchall())
    assert versions[early] == first_version.version
    assert versions[late] == first_version.version + 1


def test_a_refund_of_pending_rewards_cancels_them_for_good(rw: RewardsApi, clock: FakeClock) -> None:
    rw.set_program()
    referrer, newcomer = rw.pair()
    rw.event(newcomer, event_id="buy")
    clock.advance(days=3)
    refund = rw.event(newcomer, type="refund", refunds="buy", amount_minor=10_000)
    assert refund.referral_state == ref_pb.REVERSED and not refund.duplicate
    assert sorted(e.amount_minor for e in refund.rewards) == [-1000, -500]
    assert {rw_pb.LedgerEntryKind.Name(e.kind) for e in refund.rewards} == {"REVERSAL"}
    assert rw.balance(referrer) == (0, 0, 0)
    clock.advance(days=30)
    # Never available, not even for a moment after the hold.
    assert rw.balance(referrer) == (0, 0, 0)
    assert rw.balance(newcomer) == (0, 0, 0)
    again = rw.event(newcomer, type="refund", refunds="buy", amount_minor=10_000)
    assert again.duplicate and not again.rewards
    assert skipped(rw.event(newcomer)) == both("REFERRAL_REVERSED")


def test_a_refund_of_available_rewards_leaves_a_debt_later_rewards_pay(
    rw: RewardsApi, clock: FakeClock
) -> None:
    rw.set_program(hold_days=0)
    referrer, _, token = rw.person()
    code = rw.code_of(token)
    first, _, _ = rw.person(code)
    second, _, _ = rw.person(code)
    rw.event(first, event_id="first-buy")
    rw.redeem(referrer, 500, "payout-1")
    rw.event(first, type="refund", refunds="first-buy")
    assert rw.balance(referrer) == (-500, 0, 0)
    rw.event(second)
    assert rw.balance(referrer) == (0, 0, 500)


def test_refund_errors(rw: RewardsApi) -> None:
    _, newcomer = rw.pair()
    unknown = expect_error(rw.event, newcomer, type="refund", refunds="never-sent")
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "EVENT_NOT_FOUND")
    other, _, _ = rw.person()
    rw.event(other, event_id="others")
    foreign = expect_error(rw.event, newcomer, type="refund", refunds="others")
    assert foreign.code == grpc.StatusCode.INVALID_ARGUMENT and "refunds_event_id" in foreign.fields
    assert RewardEvent.select().count() == 1


@pytest.mark.parametrize(
    ("change", "code", "reason", "field"),
    [
        ({"currency": "XYZ"}, grpc.StatusCode.INVALID_ARGUMENT, "CURRENCY_INVALID", "currency"),
        ({"currency": "usd"}, grpc.StatusCode.INVALID_ARGUMENT, "CURRENCY_INVALID", "currency"),
        ({"amount_minor": -1}, grpc.StatusCode.INVALID_ARGUMENT, "AMOUNT_INVALID", "amount_minor"),
        ({"email": "someone@example.com"}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "email"),
        ({"user_id": 0}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "user_id"),
        ({"user_id": 10**9}, grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND", ""),
        ({"event_id": "e" * 129}, grpc.StatusCode.INVALID_ARGUMENT, "FIELD_TOO_LONG", "event_id"),
        ({"event_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, "FIELD_REQUIRED", "event_id"),
        ({"event_id": "a\x1bb"}, grpc.StatusCode.INVALID_ARGUMENT, "FIELD_INVALID", "event_id"),
        ({"event_id": "a\u202eb"}, grpc.StatusCode.INVALID_ARGUMENT, "FIELD_INVALID", "event_id"),
        (
            {"type": "refund", "refunds_event_id": "e" * 129},
            grpc.StatusCode.INVALID_ARGUMENT,
            "FIELD_TOO_LONG",
            "refunds_event_id",
        ),
        ({"type": "Purchase!"}, grpc.StatusCode.INVALID_ARGUMENT, "FIELD_INVALID", "type"),
        ({"future": 6}, grpc.StatusCode.INVALID_ARGUMENT, "OCCURRED_AT_IN_FUTURE", "occurred_at"),
        ({"refunds_event_id": "x"}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "refunds_event_id"),
        ({"type": "refund"}, grpc.StatusCode.INVALID_ARGUMENT, "FIELD_REQUIRED", "refunds_event_id"),
    ],
)
def test_bad_events_write_nothing(
    rw: RewardsApi,
    clock: FakeClock,
    change: dict[str, object],
    code: grpc.StatusCode,
    reason: str,
    field: str,
) -> None:
    rw.set_program()
    _, newcomer = rw.pair()
    values: dict[str, object] = {
        "event_id": new_event_id(),
        "user_id": newcomer,
        "type": "purchase",
        "amount_minor": 100,
        "currency": "USD",
    }
    change = dict(change)
    future = change.pop("future", None)
    values.update(change)
    request = rw_pb.RecordEventRequest(**values)  # type: ignore[arg-type]
    if future is not None:
        request.occurred_at.FromDatetime(clock.now() + timedelta(minutes=int(str(future))))
    error = expect_error(rw.rewards.RecordEvent, request, metadata=rw.auth)
    assert (error.code, error.reason) == (code, reason)
    if field:
        assert field in error.fields
        assert error.field_reasons[field] == reason  # each violation says its own reason
    assert RewardEvent.select().count() == 0
    assert LedgerEntry.select().count() == 0


def test_each_bad_field_of_an_event_has_its_own_reason(rw: RewardsApi) -> None:
    rw.set_program()
    _, newcomer = rw.pair()
    request = rw_pb.RecordEventRequest(user_id=newcomer, type="purchase", amount_minor=100, currency="usd$")
    error = expect_error(rw.rewards.RecordEvent, request, metadata=rw.auth)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "FIELD_REQUIRED")
    assert error.field_reasons == {"event_id": "FIELD_REQUIRED", "currency": "CURRENCY_INVALID"}
    assert RewardEvent.select().count() == 0


def test_event_ids_may_hold_any_character_the_document_allows(rw: RewardsApi) -> None:
    """The contract says "no control characters" (Unicode category C): spaces of any kind are fine."""
    rw.set_program()
    _, newcomer = rw.pair()
    for event_id in ("order 1", "order\u00a01", "commande\u20281", "注文-1"):
        assert rw.event(newcomer, event_id=event_id).event_id == event_id


def test_redemption_spends_available_money_only(rw: RewardsApi, clock: FakeClock) -> None:
    rw.set_program()
    referrer, newcomer = rw.pair()
    rw.event(newcomer)
    pending = expect_error(rw.redeem, referrer, 100, "too-early")
    assert (pending.code, pending.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_BALANCE")
    clock.advance(days=14)
    redeemed = rw.redeem(referrer, 300, "payout-a")
    assert (redeemed.entry.amount_minor, redeemed.available_minor) == (-300, 200)
    assert redeemed.entry.kind == rw_pb.REDEMPTION
    assert rw.balance(referrer) == (200, 0, 500)
    over = expect_error(rw.redeem, referrer, 201, "payout-b")
    assert over.reason == "INSUFFICIENT_BALANCE"
    for amount, reason in ((0, "AMOUNT_INVALID"), (-5, "AMOUNT_INVALID")):
        assert expect_error(rw.redeem, referrer, amount, f"bad-{amount}").reason == reason
    bad_currency = expect_error(rw.redeem, referrer, 1, "bad-currency", currency="EURO")
    assert bad_currency.reason == "CURRENCY_INVALID"


def test_redemption_requires_an_idempotency_key_and_honours_it(rw: RewardsApi, clock: FakeClock) -> None:
    rw.set_program(hold_days=0)
    referrer, newcomer = rw.pair()
    rw.event(newcomer)
    request = rw_pb.RedeemRewardsRequest(user_id=referrer, amount_minor=100, currency="USD")
    missing = expect_error(rw.rewards.RedeemRewards, request, metadata=rw.auth)
    assert (missing.code, missing.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "IDEMPOTENCY_KEY_REQUIRED")
    first = rw.redeem(referrer, 100, "payout-7")
    retry = rw.redeem(referrer, 100, "payout-7")
    assert retry == first
    assert LedgerEntry.select().where(LedgerEntry.kind == "redemption").count() == 1
    reused = expect_error(rw.redeem, referrer, 101, "payout-7")
    assert (reused.code, reused.reason) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    # Keys are per caller: another backend's "payout-7" is its own.
    other = rw.new_key("rewards:redeem")
    rw.rewards.RedeemRewards(request, metadata=(("x-api-key", other), ("idempotency-key", "payout-7")))
    assert LedgerEntry.select().where(LedgerEntry.kind == "redemption").count() == 2
    # A failed call keeps nothing: the same key works once the request can succeed.
    failed = expect_error(rw.redeem, referrer, 10_000, "payout-8")
    assert failed.reason == "INSUFFICIENT_BALANCE"
    assert expect_error(rw.redeem, referrer, 10_000, "payout-8").reason == "INSUFFICIENT_BALANCE"
    bad = expect_error(rw.redeem, referrer, 1, "x" * 256)
    assert bad.reason == "IDEMPOTENCY_KEY_INVALID"


def test_idempotency_keys_expire(database_url: str, clock: FakeClock) -> None:
    with running_rewards(database_url, clock, idempotency_ttl_seconds=60) as rw:
        rw.set_program(hold_days=0)
        referrer, newcomer = rw.pair()
        rw.event(newcomer)
        rw.redeem(referrer, 100, "monthly")
        clock.advance(seconds=61)
        again = rw.redeem(referrer, 100, "monthly")
        assert again.available_minor == 300


def test_register_and_create_code_replay_with_an_idempotency_key(rw: RewardsApi, clock: FakeClock) -> None:
    request = auth_pb.RegisterRequest(email="retry@example.com", password="correct horse battery")
    key = (("idempotency-key", "signup-1"),)
    first = rw.api.auth.Register(request, metadata=key)
    retry = rw.api.auth.Register(request, metadata=key)
    assert retry.user_id == first.user_id and retry.refresh_token == first.refresh_token
    other = auth_pb.RegisterRequest(email="other@example.com", password="correct horse battery")
    reused = expect_error(rw.api.auth.Register, other, metadata=key)
    assert (reused.code, reused.reason) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    # Without a key, a second registration of the email is refused as always.
    assert expect_error(rw.api.auth.Register, request).reason == "EMAIL_TAKEN"
    create = ref_pb.CreateReferralCodeRequest(expires_at=in_days(clock, 5))
    metadata = (*bearer(first.access_token), ("idempotency-key", "code-1"))
    code = rw.api.referrals.CreateReferralCode(create, metadata=metadata)
    assert rw.api.referrals.CreateReferralCode(create, metadata=metadata).code == code.code


def test_ledger_pages(rw: RewardsApi) -> None:
    rw.set_program(hold_days=0, referrer=Reward(fixed_minor=10))
    referrer, _, token = rw.person()
    code = rw.code_of(token)
    for _ in range(5):
        newcomer, _, _ = rw.person(code)
        rw.event(newcomer)
    seen: list[int] = []
    page_token = ""
    while True:
        page = rw.rewards.ListLedgerEntries(
            rw_pb.ListLedgerEntriesRequest(user_id=referrer, page_size=2, page_token=page_token),
            metadata=rw.auth,
        )
        seen += [e.id for e in page.entries]
        page_token = page.next_page_token
        if not page_token:
            break
    assert len(seen) == 5 and seen == sorted(seen, reverse=True)
    # A token of another list (another user's) is refused.
    stolen = rw.rewards.ListLedgerEntries(
        rw_pb.ListLedgerEntriesRequest(user_id=referrer, page_size=2), metadata=rw.auth
    ).next_page_token
    error = expect_error(
        rw.rewards.ListLedgerEntries,
        rw_pb.ListLedgerEntriesRequest(page_token=stolen),
        metadata=bearer(rw.api.register("thief@example.com").access_token),
    )
    assert error.reason == "PAGE_TOKEN_INVALID"


def test_api_keys_are_stored_hashed_and_revocable(rw: RewardsApi) -> None:
    created = rw.api.app.api_keys.create("reader", ["rewards:read"])
    row = ApiKey.get(ApiKey.name == "reader")
    assert created.key.startswith("rk_") and len(created.key) >= 3 + 43
    assert created.key not in (row.key_hash, row.prefix, row.scopes) and created.key.startswith(row.prefix)
    rw.rewards.GetBalance(
        rw_pb.GetBalanceRequest(user_id=rw.person()[0]), metadata=(("x-api-key", created.key),)
    )
    assert ApiKey.get(ApiKey.name == "reader").last_used_at is not None
    rw.api.app.api_keys.revoke("reader")
    revoked = expect_error(
        rw.rewards.GetBalance, rw_pb.GetBalanceRequest(user_id=1), metadata=(("x-api-key", created.key),)
    )
    assert (revoked.code, revoked.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID")


def test_a_process_reads_a_key_once_a_second_and_a_revocation_reaches_it(
    rw: RewardsApi, clock: FakeClock
) -> None:
    """Another process (its own ApiKeyService, the same database) trusts a key it read for a second
    without reading it again; once a revocation elsewhere returns, it refuses the key at once."""
    here = rw.api.app.api_keys
    elsewhere = ApiKeyService(rw.api.app.db, clock)
    key = here.create("reader", ["rewards:read"]).key
    statements: list[str] = []
    rw.api.app.db.query_hooks.append(lambda query: statements.append(query.sql))
    try:
        first = elsewhere.authenticate(key)
        assert statements, "the first call reads the key"
        statements.clear()
        clock.advance(seconds=0.9)
        assert elsewhere.authenticate(key) == first
        assert statements == []
        clock.advance(seconds=0.2)
        assert elsewhere.authenticate(key) == first
        assert len(statements) == 1  # the read again (last_used_at is fresh: no write)
    finally:
        rw.api.app.db.query_hooks.clear()
    here.revoke("reader")
    with pytest.raises(Unauthenticated):
        elsewhere.authenticate(key)
    with pytest.raises(Unauthenticated):
        here.authenticate(key)


def test_a_revocation_returns_when_no_process_accepts_the_key_any_more(rw: RewardsApi) -> None:
    """As above, on the real clock: the revocation itself waits out what other processes hold."""
    here, elsewhere = (ApiKeyService(rw.api.app.db, SystemClock()) for _ in range(2))
    key = here.create("reader", ["rewards:read"]).key
    elsewhere.authenticate(key)
    started = time.monotonic()
    here.revoke("reader")
    assert time.monotonic() - started >= KEY_CACHE_SECONDS
    with pytest.raises(Unauthenticated):
        elsewhere.authenticate(key)


def test_the_ledger_refuses_updates_and_deletes_on_postgres(pg_url: str, clock: FakeClock) -> None:
    with running_rewards(pg_url, clock) as rw:
        _ledger_refuses_changes(rw)


def test_a_first_qualifying_event_is_one_statement_on_postgres(pg_url: str, clock: FakeClock) -> None:
    """Recorded, judged, credited and logged by one statement (not six) that is a transaction of its
    own; a newcomer the referral's row does not let qualify there (held for review) goes step by step
    in a transaction, without trying the statement."""
    with running_rewards(pg_url, clock, db_prepare_statements=False) as rw:
        rw.set_program()
        _, newcomer = rw.pair()
        _, held = rw.pair()
        Referral.update(fraud_decision="review").where(Referral.referee == held).execute()
        db = rw.api.app.db
        statements: list[str] = []
        db.query_hooks.append(lambda query: statements.append(query.sql))
        try:
            paid = rw.event(newcomer)
            in_review = rw.event(held)
        finally:
            db.query_hooks.clear()
    assert len(paid.rewards) == 2 and not in_review.rewards
    assert skipped(in_review) == both("REFERRAL_IN_REVIEW")
    touching = [
        sql
        for sql in statements
        if any(f'"{table}"' in sql for table in ("reward_events", "referrals", "ledger_entries"))
    ]
    writes = [sql for sql in touching if re.match(r"\s*(BEGIN;)?\s*(WITH|INSERT|UPDATE)", sql)]
    tables = ('INSERT INTO "reward_events"', 'INSERT INTO "referrals"', 'INSERT INTO "ledger_entries"')
    # The paid event: one statement writes the event, the referral, both rewards and the log, with
    # no BEGIN before it (so no COMMIT after it either).
    assert all(part in writes[0] for part in (*tables, "INSERT INTO events"))
    assert not writes[0].startswith("BEGIN;")
    # The held one: a transaction (its BEGIN goes with its first statement, never on its own) records
    # the event, reads the referral, marks the event as its qualifying one and keeps the outcome.
    assert writes[1].startswith('BEGIN;INSERT INTO "reward_events"')
    assert 'INSERT INTO "ledger_entries"' not in writes[1]
    assert [re.match(r"\s*\w+", sql).group().strip() for sql in writes[2:]] == ["WITH", "UPDATE", "UPDATE"]
    assert RewardEvent.get(RewardEvent.event_id == in_review.event_id).user_id == held
    assert Referral.get_by_id(held).qualifying_event_id is not None


@pytest.mark.parametrize("deadline", [None, 3.0], ids=["no deadline", "deadline under the statement cap"])
def test_a_referral_qualified_between_the_read_and_the_statement_leaves_nothing_of_it(
    pg_url: str, clock: FakeClock, deadline: float | None
) -> None:
    """The statement runs as a transaction of its own (or, under a deadline shorter than the
    connection's statement cap, in one bounded by it), so when it finds the referral's row no longer
    pending (a competing event qualified it after this one's read) it must fail as a whole: the
    event then goes step by step, is recorded once and told why it earned nothing."""
    with running_rewards(pg_url, clock, db_prepare_statements=False) as rw:
        rw.set_program()
        _, newcomer = rw.pair()
        db = rw.api.app.db
        competing: list[Any] = []
        failed: list[str] = []

        def hook(query: Any) -> None:
            if query.exception is not None:
                failed.append(f"{query.sql} -> {query.exception}")
            # Right after the first event's read, before its statement: the competing event, from
            # another thread (its own connection), recorded and committed in full.
            if (
                not competing
                and query.sql.lstrip().startswith("SELECT")
                and '"reward_events" ev' in query.sql
            ):
                competing.append(None)
                worker = threading.Thread(target=lambda: competing.append(rw.event(newcomer)))
                worker.start()
                worker.join(10)

        db.query_hooks.append(hook)
        try:
            late = rw.event(newcomer, timeout=deadline)
        finally:
            db.query_hooks.clear()
        winner = competing[-1]
        assert len(winner.rewards) == 2
        [aborted] = [f for f in failed if "referral_not_qualifiable" in f]
        assert aborted.startswith("BEGIN;") == (deadline is not None)
        assert late.referral_state == ref_pb.QUALIFIED and not late.rewards
        assert skipped(late) == both("ALREADY_QUALIFIED")
        # A retry is told the same; the ledger, the event log and the outbox hold the winner's only.
        assert skipped(rw.event(newcomer, event_id=late.event_id)) == both("ALREADY_QUALIFIED")
        assert RewardEvent.select().where(RewardEvent.user == newcomer).count() == 2
        assert LedgerEntry.select().count() == 2
        assert Event.select().where(Event.type == "referral.qualified").count() == 1
        assert EmailOutbox.select().where(EmailOutbox.kind == "reward_credited").count() == 1


def _ledger_refuses_changes(rw: RewardsApi) -> None:
    rw.set_program()
    _, newcomer = rw.pair()
    rw.event(newcomer)
    for statement in ("UPDATE ledger_entries SET amount_minor = 1", "DELETE FROM ledger_entries"):
        with pytest.raises(pw.ProgrammingError, match="append-only"), rw.api.app.db.atomic():
            rw.api.app.db.execute_sql(statement)
    assert sorted(LedgerEntry.select(LedgerEntry.amount_minor).tuples()) == [(500,), (1000,)]


def _verify_email_of(rw: RewardsApi, user_id: int) -> None:
    email = User.get_by_id(user_id).email
    [row] = EmailOutbox.select().where(
        (EmailOutbox.kind == "email_verification") & (EmailOutbox.recipient == email)
    )
    rw.api.auth.VerifyEmail(auth_pb.VerifyEmailRequest(token=json.loads(row.payload)["token"]))


def test_with_verification_required_a_referral_earns_once_both_addresses_are_verified(
    database_url: str, clock: FakeClock
) -> None:
    with running_rewards(database_url, clock, email_verification="required") as rw:
        rw.set_program()
        referrer, newcomer = rw.pair()
        unverified = rw.event(newcomer, amount_minor=10_000)
        assert skipped(unverified) == both("REFEREE_NOT_ELIGIBLE") and not unverified.rewards
        assert unverified.referral_state == ref_pb.PENDING
        _verify_email_of(rw, newcomer)
        # The newcomer alone is not enough: the referrer's address must be theirs too.
        assert skipped(rw.event(newcomer, amount_minor=10_000)) == both("REFEREE_NOT_ELIGIBLE")
        _verify_email_of(rw, referrer)
        qualified = rw.event(newcomer, amount_minor=10_000)
        assert qualified.referral_state == ref_pb.QUALIFIED
        assert {e.user_id for e in qualified.rewards} == {referrer, newcomer}
