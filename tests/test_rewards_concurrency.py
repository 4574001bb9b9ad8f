"""Races the rewards must win on PostgreSQL: retried and competing events, redemptions, idempotency keys."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from support import FakeClock
from support.api import rich_error
from support.rewards import RewardsApi, running_rewards

from referral_grpc.app import App
from referral_grpc.domain.errors import AlreadyExists
from referral_grpc.domain.programs import Reward
from referral_grpc.domain.rewards import EventInput, RewardService
from referral_grpc.domain.tokens import PageTokens
from referral_grpc.gen import referral_service_pb2 as ref_pb
from referral_grpc.infra.outbox import SqlOutbox
from referral_grpc.request_context import DeadlineExceeded, request_deadline
from referral_grpc.store.models import EmailOutbox, LedgerEntry, Referral, User

COPIES = 50
REDEMPTIONS = 20


@pytest.fixture
def rw(pg_url: str, clock: FakeClock) -> Iterator[RewardsApi]:
    with running_rewards(pg_url, clock, grpc_max_workers=COPIES) as api:
        yield api


@pytest.fixture
def plain(pg_url: str, clock: FakeClock) -> Iterator[RewardsApi]:
    """As `rw`, with statements sent as SQL (not EXECUTE of a prepared one), for the hooks that read them."""
    with running_rewards(pg_url, clock, grpc_max_workers=COPIES, db_prepare_statements=False) as api:
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


def referrer_of(user_id: int) -> int:
    referrer: int = Referral.get_by_id(user_id).referrer_id
    return referrer


def another_process(app: App) -> RewardService:
    """The rewards of another server process on the same database: it knows nothing of this one's sends."""
    return RewardService(
        db=app.db,
        clock=app.clock,
        outbox=SqlOutbox(),
        dispatcher=app.dispatcher,
        page_tokens=PageTokens(app.settings.jwt_secret, purpose="ledger-page-token-v1"),
    )


def purchase(user_id: int, event_id: str, amount_minor: int = 10_000) -> EventInput:
    """The event RewardsApi.event sends, as the domain takes it."""
    return EventInput(event_id, "purchase", "USD", amount_minor=amount_minor, user_id=user_id)


def test_copies_of_one_qualifying_event_sent_to_several_processes_credit_once(rw: RewardsApi) -> None:
    """A process answers a copy of an event it is recording from that recording; between processes
    the database decides: five processes' worth of copies still credit once."""
    rw.set_program()
    referrer, newcomer = rw.pair()
    app = rw.api.app
    services = [app.rewards, *(another_process(app) for _ in range(4))]

    def send(i: int) -> Any:
        try:
            return services[i % len(services)].record_event(purchase(newcomer, "order-43"))
        finally:
            app.release_connection()

    results = race(send, COPIES)
    assert Counter(r.duplicate for r in results) == {True: COPIES - 1, False: 1}
    assert {tuple(sorted(e.id for e in r.rewards)) for r in results} == {
        tuple(sorted(e.id for e in LedgerEntry.select()))
    }
    assert (credits("referrer_reward"), credits("referee_reward"), reward_emails()) == (1, 1, 1)
    assert rw.balance(referrer) == (0, 500, 500)


@dataclass
class Held:
    """What a send did while the first send of its event_id was held after its first read."""

    first: Any = None
    answer: Any = None
    # Whether the send was still running when the first was let go.
    waited: bool = False
    statements: list[str] = field(default_factory=list)


def while_first_is_held(
    rw: RewardsApi, newcomer: int, event_id: str, send: Callable[[], Any], fail_first: bool = False
) -> Held:
    """Send the event over gRPC; right after its read of the user and the recorded event (before it
    writes anything), hold it there and call `send` on another thread for a second, then let the first
    go on (or fail, with `fail_first`) and wait for both."""
    app, held = rw.api.app, Held()
    statements: list[tuple[int, str]] = []
    worker: list[threading.Thread] = []

    def second() -> None:
        try:
            held.answer = send()
        except Exception as error:
            held.answer = error
        finally:
            app.release_connection()

    def hook(query: Any) -> None:
        statements.append((threading.get_ident(), query.sql))
        if not worker and query.sql.lstrip().startswith("SELECT") and '"reward_events" ev' in query.sql:
            worker.append(threading.Thread(target=second))
            worker[0].start()
            worker[0].join(1.0)
            held.waited = worker[0].is_alive()
            if fail_first:
                raise RuntimeError("the first send fails after its read")

    app.db.query_hooks.append(hook)
    try:
        try:
            held.first = rw.event(newcomer, event_id=event_id)
        except grpc.RpcError as error:
            held.first = error
        worker[0].join(10)
    finally:
        app.db.query_hooks.clear()
    held.statements = [sql for thread, sql in statements if thread == worker[0].ident]
    return held


def test_a_copy_sent_while_its_first_is_recorded_waits_for_it_and_is_answered_without_a_statement(
    plain: RewardsApi,
) -> None:
    plain.set_program()
    _, newcomer = plain.pair()
    rewards = plain.api.app.rewards
    held = while_first_is_held(
        plain, newcomer, "order-44", lambda: rewards.record_event(purchase(newcomer, "order-44"))
    )
    assert held.waited, "the copy finished before the first it should wait for"
    assert not held.first.duplicate and len(held.first.rewards) == 2
    assert held.answer.duplicate and held.answer.referral_state == "qualified"
    assert sorted(e.id for e in held.answer.rewards) == sorted(e.id for e in held.first.rewards)
    assert held.statements == []
    assert (credits("referrer_reward"), credits("referee_reward"), reward_emails()) == (1, 1, 1)
    # Later retries read what was recorded, and agree.
    assert plain.event(newcomer, event_id="order-44").duplicate


def test_a_copy_whose_first_send_fails_records_the_event_itself(plain: RewardsApi) -> None:
    plain.set_program()
    _, newcomer = plain.pair()
    rewards = plain.api.app.rewards
    held = while_first_is_held(
        plain,
        newcomer,
        "order-45",
        lambda: rewards.record_event(purchase(newcomer, "order-45")),
        fail_first=True,
    )
    assert held.waited
    assert isinstance(held.first, grpc.RpcError) and held.first.code() == grpc.StatusCode.INTERNAL
    assert not held.answer.duplicate and len(held.answer.rewards) == 2
    assert held.statements, "the copy recorded the event through the database"
    assert (credits("referrer_reward"), credits("referee_reward"), reward_emails()) == (1, 1, 1)


def test_another_event_under_an_event_id_being_recorded_is_refused_as_a_conflict(plain: RewardsApi) -> None:
    plain.set_program()
    _, newcomer = plain.pair()
    rewards = plain.api.app.rewards
    other = purchase(newcomer, "order-46", amount_minor=1)
    held = while_first_is_held(plain, newcomer, "order-46", lambda: rewards.record_event(other))
    assert held.waited
    assert isinstance(held.answer, AlreadyExists) and held.answer.reason == "EVENT_ID_CONFLICT"
    assert not held.first.duplicate and len(held.first.rewards) == 2
    assert held.statements == []


def test_a_send_naming_another_user_under_an_event_id_being_recorded_is_answered_by_the_database(
    plain: RewardsApi,
) -> None:
    """Not answered from the first send's result: once that is recorded, the database tells the
    other user's send that the event_id is taken, as it would any later send."""
    plain.set_program()
    _, newcomer = plain.pair()
    _, other = plain.pair()
    rewards = plain.api.app.rewards
    held = while_first_is_held(
        plain, newcomer, "order-48", lambda: rewards.record_event(purchase(other, "order-48"))
    )
    assert held.waited
    assert not held.first.duplicate and {e.user_id for e in held.first.rewards} == {
        newcomer,
        referrer_of(newcomer),
    }
    assert isinstance(held.answer, AlreadyExists) and held.answer.reason == "EVENT_ID_CONFLICT"
    assert held.statements, "the other user's send read the recorded event"
    assert not LedgerEntry.select().where(LedgerEntry.user == other).exists()


def test_a_copy_naming_the_user_by_email_where_the_first_used_the_id_is_answered_by_the_database(
    plain: RewardsApi,
) -> None:
    """The same user and content, named the other way: a duplicate all the same, read from the database."""
    plain.set_program()
    _, newcomer = plain.pair()
    email = User.get_by_id(newcomer).email
    by_email = EventInput("order-49", "purchase", "USD", amount_minor=10_000, email=email)
    held = while_first_is_held(
        plain, newcomer, "order-49", lambda: plain.api.app.rewards.record_event(by_email)
    )
    assert held.waited and held.statements
    assert held.answer.duplicate and not held.first.duplicate
    assert sorted(e.id for e in held.answer.rewards) == sorted(e.id for e in held.first.rewards)


def test_a_copy_waits_for_its_first_send_no_longer_than_its_own_deadline(plain: RewardsApi) -> None:
    plain.set_program()
    _, newcomer = plain.pair()
    rewards = plain.api.app.rewards
    waited: list[float] = []

    def send() -> Any:
        started = time.monotonic()
        try:
            with request_deadline(0.2):
                return rewards.record_event(purchase(newcomer, "order-47"))
        finally:
            waited.append(time.monotonic() - started)

    held = while_first_is_held(plain, newcomer, "order-47", send)
    assert isinstance(held.answer, DeadlineExceeded)
    assert 0.2 <= waited[0] < 1.0 and not held.waited
    assert held.statements == []
    assert not held.first.duplicate and len(held.first.rewards) == 2


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
