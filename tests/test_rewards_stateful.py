"""A Hypothesis state machine over the ledger: sign-ups, events, retries, refunds, redemptions, rules."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar

import grpc
import peewee as pw
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from support import FakeClock
from support.api import bearer, expect_error
from support.rewards import RewardsApi, running_rewards

from referral_grpc.domain.fraud import FraudRules
from referral_grpc.domain.programs import ProgramRules, Reward
from referral_grpc.gen import auth_service_pb2 as auth_pb
from referral_grpc.gen import referral_service_pb2 as ref_pb
from referral_grpc.gen import reward_service_pb2 as rw_pb
from referral_grpc.store.models import LedgerEntry, RewardEvent, User

_event_numbers = itertools.count()
CURRENCIES = ("USD", "EUR")
EXAMPLES_RUN: list[int] = []
# What the runs exercised, printed at the end: a machine that never reverses a reward proves little.
SEEN: Counter[str] = Counter()


@dataclass
class Member:
    user_id: int
    registered_at: datetime
    access_token: str
    token_issued_at: datetime
    referrer: Member | None = None
    code: str = ""
    code_issued_at: datetime = datetime.min
    # The model of the member's own referral: pending, qualified or reversed (None without a referrer).
    state: str | None = None
    rewarded: bool = False
    qualifying_event: str = ""
    # An available reward of theirs was reversed: their available balance may go below zero.
    may_owe: bool = False


@dataclass
class Entry:
    user_id: int
    amount: int
    currency: str
    available_at: datetime
    kind: str
    event_id: str


@dataclass
class Sent:
    event_id: str
    member: Member
    type: str
    amount: int
    currency: str
    refunds: str
    response: Any = None


@dataclass
class Model:
    program: ProgramRules | None = None
    entries: list[Entry] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)


programs = st.builds(
    ProgramRules,
    # The machine refers many newcomers per hour: velocity is recorded (shadow), not held for review.
    fraud=st.just(FraudRules(velocity="shadow")),
    # Mostly the currency and type the events mostly use: qualifying events must be common.
    currency=st.sampled_from(("USD", "USD", "EUR")),
    event_types=st.sampled_from([("purchase",), ("purchase", "subscription_started")]),
    min_amount_minor=st.sampled_from([0, 1000]),
    attribution_days=st.sampled_from([7, 30]),
    referrer=st.one_of(
        st.builds(Reward, fixed_minor=st.sampled_from([0, 500])),
        st.builds(Reward, bps=st.sampled_from([1000, 2500]), cap_minor=st.sampled_from([0, 700])),
    ),
    referee=st.one_of(
        st.builds(Reward, fixed_minor=st.sampled_from([0, 300])),
        st.builds(Reward, bps=st.just(500)),
    ),
    hold_days=st.sampled_from([0, 1, 14, 14]),
    max_rewarded_referrals=st.sampled_from([0, 1, 2]),
)


class RewardsMachine(RuleBasedStateMachine):
    rw: ClassVar[RewardsApi]
    clock: ClassVar[FakeClock]
    members: ClassVar[list[Member]] = []
    people = Bundle("people")

    def __init__(self) -> None:
        super().__init__()
        # The ledger is append-only (on PostgreSQL even for tests): each example has its own members.
        RewardsMachine.members = []
        self.model = Model()
        EXAMPLES_RUN.append(1)

    def _now(self) -> datetime:
        return self.clock.now()

    def _join(self, referrer: Member | None) -> Member:
        user_id, _, token = self.rw.person(referrer.code if referrer else "")
        now = self._now()
        member = Member(user_id, now, token, now, referrer, state="pending" if referrer else None)
        self.members.append(member)
        return member

    @initialize(target=people, program=programs)
    def start(self, program: ProgramRules) -> Member:
        self.model.program = self.rw.api.app.programs.set(program)
        return self._join(None)

    @rule(target=people)
    def register(self) -> Member:
        return self._join(None)

    @rule(target=people, referrer=people)
    def register_with_code(self, referrer: Member) -> Member:
        # Codes live 30 days (support.rewards.code_of): a fresh one once the last is close to expiry.
        if not referrer.code or self._now() - referrer.code_issued_at > timedelta(days=29):
            referrer.code = self.rw.code_of(self._token(referrer))
            referrer.code_issued_at = self._now()
        return self._join(referrer)

    @rule(program=programs)
    def change_rules(self, program: ProgramRules) -> None:
        self.model.program = self.rw.api.app.programs.set(program)

    @rule(hours=st.sampled_from([1, 24, 24 * 7, 24 * 20]))
    def advance_clock(self, hours: int) -> None:
        self.clock.advance(hours=hours)

    @rule(
        member=people,
        amount=st.sampled_from([0, 999, 1000, 4321, 20_000]),
        type=st.sampled_from(["purchase", "purchase", "purchase", "subscription_started", "page_view"]),
        currency=st.sampled_from(("USD", "USD", "EUR")),
    )
    def event(self, member: Member, amount: int, type: str, currency: str) -> None:
        sent = Sent(f"sm-{next(_event_numbers)}", member, type, amount, currency, "")
        expected = self._judge(member, sent)
        sent.response = self.rw.event(member.user_id, amount, type, currency, event_id=sent.event_id)
        reasons = {
            (rw_pb.Beneficiary.Name(s.beneficiary), rw_pb.SkipReason.Name(s.reason))
            for s in sent.response.skipped
        }
        credited = {(e.user_id, e.amount_minor) for e in sent.response.rewards}
        assert (reasons, credited) == expected, (sent, self.model.program)
        SEEN["events"] += 1
        SEEN["events crediting"] += bool(credited)
        self.model.sent.append(sent)

    @rule(member=people, amount=st.sampled_from([1000, 20_000]))
    def purchase(self, member: Member, amount: int) -> None:
        """An event in the program's own type and currency: the common case, so it comes often."""
        assert self.model.program is not None
        self.event(member, amount, "purchase", self.model.program.currency)

    def _judge(self, member: Member, sent: Sent) -> tuple[set[tuple[str, str]], set[tuple[int, int]]]:
        """What the rules say the event does; updates the model as the server should."""
        program = self.model.program
        now = self._now()

        def skip(reason: str) -> tuple[set[tuple[str, str]], set[tuple[int, int]]]:
            return {("REFERRER", reason), ("REFEREE", reason)}, set()

        if member.referrer is None:
            return skip("NO_REFERRER")
        assert program is not None
        if member.state == "reversed":
            return skip("REFERRAL_REVERSED")
        if sent.type not in program.event_types:
            return skip("EVENT_TYPE_NOT_QUALIFYING")
        if sent.currency != program.currency:
            return skip("CURRENCY_NOT_QUALIFYING")
        if sent.amount < program.min_amount_minor:
            return skip("AMOUNT_BELOW_MINIMUM")
        if now > member.registered_at + timedelta(days=program.attribution_days):
            return skip("OUTSIDE_ATTRIBUTION_WINDOW")
        if member.state == "qualified":
            return skip("ALREADY_QUALIFIED")
        member.state = "qualified"
        member.qualifying_event = sent.event_id
        cap = program.max_rewarded_referrals
        rewarded = sum(
            1 for m in self.members if m.referrer is member.referrer and m.state == "qualified" and m.rewarded
        )
        if cap and rewarded >= cap:
            return skip("REFERRER_CAP_REACHED")
        reasons: set[tuple[str, str]] = set()
        credited: set[tuple[int, int]] = set()
        available_at = now + timedelta(days=program.hold_days)
        for who, owner, reward, kind in (
            ("REFERRER", member.referrer, program.referrer, "referrer_reward"),
            ("REFEREE", member, program.referee, "referee_reward"),
        ):
            amount = reward.amount_for(sent.amount)
            if amount:
                credited.add((owner.user_id, amount))
                self.model.entries.append(
                    Entry(owner.user_id, amount, sent.currency, available_at, kind, sent.event_id)
                )
                member.rewarded = True
            else:
                reasons.add((who, "NO_REWARD_CONFIGURED"))
        return reasons, credited

    @precondition(lambda self: bool(self.model.sent))
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        sent = data.draw(st.sampled_from(self.model.sent))
        before = LedgerEntry.select().count()
        again = self.rw.event(
            sent.member.user_id,
            sent.amount,
            sent.type,
            sent.currency,
            event_id=sent.event_id,
            refunds=sent.refunds,
        )
        assert again.duplicate
        assert [e.id for e in again.rewards] == [e.id for e in sent.response.rewards]
        assert LedgerEntry.select().count() == before
        changed = expect_error(
            self.rw.event,
            sent.member.user_id,
            sent.amount + 1,
            sent.type,
            sent.currency,
            event_id=sent.event_id,
            refunds=sent.refunds,
        )
        assert changed.reason == "EVENT_ID_CONFLICT"

    @precondition(lambda self: any(s.type != "refund" for s in self.model.sent))
    @rule(data=st.data())
    def refund(self, data: st.DataObject) -> None:
        self._refund(data.draw(st.sampled_from([s for s in self.model.sent if s.type != "refund"])))

    @precondition(lambda self: any(s.response.rewards and s.type != "refund" for s in self.model.sent))
    @rule(data=st.data())
    def refund_a_rewarded_event(self, data: st.DataObject) -> None:
        """Most events credit nothing: refunds that reverse rewards need a rule of their own."""
        self._refund(
            data.draw(
                st.sampled_from([s for s in self.model.sent if s.response.rewards and s.type != "refund"])
            )
        )

    def _refund(self, target: Sent) -> None:
        member = target.member
        sent = Sent(
            f"sm-{next(_event_numbers)}", member, "refund", target.amount, target.currency, target.event_id
        )
        now = self._now()
        reversed_entries = [
            e for e in self.model.entries if e.event_id == target.event_id and e.kind.endswith("_reward")
        ]
        already = any(s.refunds == target.event_id for s in self.model.sent)
        expected: set[tuple[int, int]] = set()
        if not already:
            for reward in reversed_entries:
                expected.add((reward.user_id, -reward.amount))
                self.model.entries.append(
                    Entry(
                        reward.user_id,
                        -reward.amount,
                        reward.currency,
                        max(reward.available_at, now),
                        "reversal",
                        sent.event_id,
                    )
                )
                if reward.available_at <= now:
                    owner = next(m for m in self.members if m.user_id == reward.user_id)
                    owner.may_owe = True
                SEEN[
                    "available rewards reversed" if reward.available_at <= now else "pending rewards reversed"
                ] += 1
            if member.qualifying_event == target.event_id and member.state == "qualified":
                member.state = "reversed"
        sent.response = self.rw.event(
            member.user_id,
            target.amount,
            "refund",
            target.currency,
            event_id=sent.event_id,
            refunds=target.event_id,
        )
        assert {(e.user_id, e.amount_minor) for e in sent.response.rewards} == expected
        assert sent.response.duplicate == already
        SEEN["refunds"] += 1
        self.model.sent.append(sent)

    @rule(member=people, share=st.sampled_from([1, 2, 4]), currency=st.sampled_from(CURRENCIES))
    def redeem(self, member: Member, share: int, currency: str) -> None:
        available, _ = self._balance(member, currency)
        amount = max(1, available // share) if available > 0 else 1
        key = f"sm-redeem-{next(_event_numbers)}"
        if amount <= available:
            done = self.rw.redeem(member.user_id, amount, key, currency)
            assert done.available_minor == available - amount
            self.model.entries.append(Entry(member.user_id, -amount, currency, self._now(), "redemption", ""))
        else:
            error = expect_error(self.rw.redeem, member.user_id, amount, key, currency)
            assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_BALANCE")

    def _balance(self, member: Member, currency: str) -> tuple[int, int]:
        now = self._now()
        mine = [e for e in self.model.entries if e.user_id == member.user_id and e.currency == currency]
        return (
            sum(e.amount for e in mine if e.available_at <= now),
            sum(e.amount for e in mine if e.available_at > now),
        )

    @invariant()
    def balances_equal_the_model(self) -> None:
        for member in self.members:
            for currency in CURRENCIES:
                available, pending = self._balance(member, currency)
                assert self.rw.balance(member.user_id, currency)[:2] == (available, pending), member
                assert available >= 0 or member.may_owe, member

    @invariant()
    def referral_states_equal_the_model(self) -> None:
        for member in self.members:
            if member.referrer is None:
                continue
            listed = self.rw.api.referrals.ListReferrals(
                ref_pb.ListReferralsRequest(page_size=100), metadata=bearer(self._token(member.referrer))
            )
            [mine] = [r for r in listed.referrals if r.user_id == member.user_id]
            assert ref_pb.ReferralState.Name(mine.state).lower() == member.state

    def _token(self, member: Member) -> str:
        """The member's access token, signing in again once the clock has moved past its lifetime."""
        if self._now() - member.token_issued_at >= timedelta(minutes=10):
            email = User.get_by_id(member.user_id).email
            member.access_token = self.rw.api.auth.Login(
                auth_pb.LoginRequest(email=email, password="correct horse battery")
            ).access_token
            member.token_issued_at = self._now()
        return member.access_token

    @invariant()
    def no_referral_is_rewarded_twice(self) -> None:
        twice = (
            LedgerEntry.select(LedgerEntry.referral_user, LedgerEntry.kind)
            .where(LedgerEntry.kind.in_(("referrer_reward", "referee_reward")))
            .group_by(LedgerEntry.referral_user, LedgerEntry.kind)
            .having(pw.fn.COUNT(LedgerEntry.id) > 1)
        )
        assert list(twice.tuples()) == []
        reversed_twice = (
            LedgerEntry.select(LedgerEntry.reverses)
            .where(LedgerEntry.reverses.is_null(False))
            .group_by(LedgerEntry.reverses)
            .having(pw.fn.COUNT(LedgerEntry.id) > 1)
        )
        assert list(reversed_twice.tuples()) == []

    @invariant()
    def every_entry_traces_to_its_event(self) -> None:
        for entry in LedgerEntry.select().where(LedgerEntry.kind != "redemption"):
            event = RewardEvent.get_by_id(entry.event_id)
            assert event.user_id in (entry.referral_user_id, entry.user_id)
            if entry.kind == "reversal":
                reward = LedgerEntry.get_by_id(entry.reverses_id)
                assert (
                    reward.amount_minor == -entry.amount_minor and event.refunds_event_id == reward.event_id
                )
            else:
                assert event.type != "refund" and entry.referral_user_id == event.user_id


def run_machine(rw: RewardsApi, clock: FakeClock, examples: int, steps: int) -> int:
    RewardsMachine.rw = rw
    RewardsMachine.clock = clock
    EXAMPLES_RUN.clear()
    SEEN.clear()
    run_state_machine_as_test(
        RewardsMachine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    print(f"\nrewards state machine: {len(EXAMPLES_RUN)} examples of up to {steps} steps; {dict(SEEN)}")
    return len(EXAMPLES_RUN)


@pytest.fixture
def sqlite_rw(sqlite_url: str, clock: FakeClock) -> Iterator[RewardsApi]:
    with running_rewards(sqlite_url, clock) as rw:
        yield rw


def test_the_ledger_keeps_its_invariants_on_sqlite(sqlite_rw: RewardsApi, clock: FakeClock) -> None:
    assert run_machine(sqlite_rw, clock, examples=60, steps=25) >= 60


def test_the_ledger_keeps_its_invariants_on_postgres(pg_url: str, clock: FakeClock) -> None:
    with running_rewards(pg_url, clock) as rw:
        assert run_machine(rw, clock, examples=20, steps=25) >= 20
