"""Races the rewards must win on PostgreSQL: retried and competing events, redemptions, idempotency keys."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from support import FakeClock
from support.api import rich_error
from support.rewards import RewardsApi, running_rewards

from referral_grpc.domain.programs import Reward
from referral_grpc.gen import referral_service_pb2 as ref_pb
from referral_grpc.store.models import EmailOutbox, LedgerEntry, Referral

COPIES = 50
REDEMPTIONS = 20


@pytest.fixture
def rw(pg_url: str, clock: FakeClock) -> Iterator[RewardsApi]:
    with running_rewards(pg_url, clock, grpc_max_workers=COPIES) as api:
        yield api


def race(call: Callable[[int], Any], n: int) -> list[Any]:
    """Run call(i) n times at once (released together by a barrier); each result or its grpc.RpcError."""
    barrier = threading.Barrier(n)

    def attempt(i: int) -> Any:
        barrier.wait()
        try:
            return call(i)
        except grpc.RpcError as err:
            return err

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(attempt, range(n)))


def credits(kind: str) -> int:
    return LedgerEntry.select().where(LedgerEntry.kind == kind).count()


def reward_emails() -> int:
    """The referrer's "reward credited" emails: one per credit, none for the copies that lost."""
    return EmailOutbox.select().where(EmailOutbox.kind == "reward_credited").count()


def test_fifty_copies_of_one_qualifying_event_credit_once(rw: RewardsApi) -> None:
    rw.set_program()
    referrer, newcomer = rw.pair()
    results = race(lambda _: rw.event(newcomer, event_id="order-42"), COPIES)
    errors = [r for r in results if isinstance(r, grpc.RpcError)]
    assert errors == []
    assert Counter(r.duplicate for r in results) == {True: COPIES - 1, False: 1}
    # Every copy answers with the one set of entries.
    assert {tuple(sorted(e.id for e in r.rewards)) for r in results} == {
        tuple(sorted(e.id for e in LedgerEntry.select()))
    }
    assert (credits("referrer_reward"), credits("referee_reward"), reward_emails()) == (1, 1, 1)
    assert rw.balance(referrer) == (0, 500, 500)
    print(
        f"\n{COPIES} concurrent copies: referrer credits {credits('referrer_reward')}, "
        f"newcomer credits {credits('referee_reward')}"
    )


def test_competing_qualifying_events_of_one_newcomer_credit_once(rw: RewardsApi) -> None:
    rw.set_program()
    _, newcomer = rw.pair()
    results = race(lambda i: rw.event(newcomer, event_id=f"order-{i}"), REDEMPTIONS)
    assert [r for r in results if isinstance(r, grpc.RpcError)] == []
    assert sum(1 for r in results if r.rewards) == 1
    assert (credits("referrer_reward"), credits("referee_reward"), reward_emails()) == (1, 1, 1)


def test_competing_first_events_of_a_newcomer_without_a_referral_row_open_it_once(rw: RewardsApi) -> None:
    # A newcomer who registered before rewards existed has no referral row: the first events open it.
    rw.set_program()
    _, newcomer = rw.pair()
    assert Referral.delete().where(Referral.referee == newcomer).execute() == 1
    results = race(lambda i: rw.event(newcomer, event_id=f"first-{i}"), REDEMPTIONS)
    assert [r for r in results if isinstance(r, grpc.RpcError)] == []
    assert sum(1 for r in results if r.rewards) == 1
    assert {r.referral_state for r in results} == {ref_pb.QUALIFIED}
    assert Referral.select().where(Referral.referee == newcomer).count() == 1
    assert (credits("referrer_reward"), credits("referee_reward"), reward_emails()) == (1, 1, 1)


def test_concurrent_refunds_reverse_once(rw: RewardsApi) -> None:
    rw.set_program()
    referrer, newcomer = rw.pair()
    rw.event(newcomer, event_id="order-1")
    results = race(lambda i: rw.event(newcomer, type="refund", refunds="order-1", event_id=f"refund-{i}"), 10)
    assert [r for r in results if isinstance(r, grpc.RpcError)] == []
    assert credits("reversal") == 2
    assert rw.balance(referrer) == (0, 0, 0)


def test_concurrent_redemptions_of_the_whole_balance_never_overdraw(rw: RewardsApi, clock: FakeClock) -> None:
    rw.set_program(hold_days=0, referrer=Reward(fixed_minor=1000))
    referrer, newcomer = rw.pair()
    rw.event(newcomer)
    results = race(lambda i: rw.redeem(referrer, 1000, f"payout-{i}"), REDEMPTIONS)
    ok = [r for r in results if not isinstance(r, grpc.RpcError)]
    failures = [rich_error(r) for r in results if isinstance(r, grpc.RpcError)]
    assert len(ok) == 1 and ok[0].available_minor == 0
    assert {(f.code, f.reason) for f in failures} == {
        (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_BALANCE")
    }
    assert len(failures) == REDEMPTIONS - 1
    assert rw.balance(referrer)[0] == 0
    print(
        f"\n{REDEMPTIONS} concurrent full-balance redemptions: {len(ok)} succeeded, "
        f"{len(failures)} INSUFFICIENT_BALANCE"
    )


def test_concurrent_retries_with_one_idempotency_key_redeem_once(rw: RewardsApi) -> None:
    rw.set_program(hold_days=0, referrer=Reward(fixed_minor=1000))
    referrer, newcomer = rw.pair()
    rw.event(newcomer)
    results = race(lambda _: rw.redeem(referrer, 100, "payout-once"), REDEMPTIONS)
    ok = [r for r in results if not isinstance(r, grpc.RpcError)]
    failures = [rich_error(r) for r in results if isinstance(r, grpc.RpcError)]
    assert ok and {r.entry.id for r in ok} == {ok[0].entry.id}
    assert {(f.code, f.reason) for f in failures} <= {(grpc.StatusCode.ABORTED, "IDEMPOTENCY_KEY_IN_USE")}
    assert credits("redemption") == 1
    # Once the first call finished, every retry gets its response.
    assert rw.redeem(referrer, 100, "payout-once") == ok[0]
    print(
        f"\n{REDEMPTIONS} concurrent calls with one key: {len(ok)} got the response, "
        f"{len(failures)} IDEMPOTENCY_KEY_IN_USE, {credits('redemption')} redemption written"
    )
