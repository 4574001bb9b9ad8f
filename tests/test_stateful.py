"""A Hypothesis state machine drives codes and referrals against the real server and checks invariants."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import ClassVar

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
    rule,
    run_state_machine_as_test,
)
from support import FakeClock
from support.api import Api, bearer, expect_error, in_days

from referral_grpc.gen import auth_service_pb2 as auth_pb
from referral_grpc.gen import referral_service_pb2 as ref_pb
from referral_grpc.store.models import EmailOutbox, ReferralCode, User

PASSWORD = "correct horse battery"  # support.api.Api.register's default
# Emails stay unique across examples: the in-process code cache and the throttles outlive a reset.
_emails = (f"user{n}@example.com" for n in itertools.count())


@dataclass
class Issued:
    code: str
    expires_at: datetime
    active: bool = True


@dataclass
class Person:
    email: str
    user_id: int
    access_token: str
    token_issued_at: datetime
    codes: list[Issued] = field(default_factory=list)
    referred: set[int] = field(default_factory=set)

    @property
    def active_code(self) -> Issued | None:
        return next((c for c in self.codes if c.active), None)


class ReferralMachine(RuleBasedStateMachine):
    """The model: who holds which codes, and whom each person referred."""

    api: ClassVar[Api]
    clock: ClassVar[FakeClock]
    people = Bundle("people")

    def __init__(self) -> None:
        super().__init__()
        # A fresh database per example; deleting users cascades to their codes and tokens.
        EmailOutbox.delete().execute()
        User.update(referrer=None).execute()
        User.delete().execute()
        self.everyone: list[Person] = []

    def _now(self) -> datetime:
        return self.clock.now()

    def _register(self, code: str = "") -> Person:
        email = next(_emails)
        tokens = self.api.register(email, code=code)
        person = Person(email, tokens.user_id, tokens.access_token, self._now())
        self.everyone.append(person)
        return person

    def _auth(self, person: Person) -> tuple[tuple[str, str]]:
        """The person's access token, signing in again once the clock has moved past its lifetime."""
        if self._now() - person.token_issued_at >= timedelta(minutes=10):
            person.access_token = self.api.auth.Login(
                auth_pb.LoginRequest(email=person.email, password=PASSWORD)
            ).access_token
            person.token_issued_at = self._now()
        return bearer(person.access_token)

    @initialize(target=people)
    def first_person(self) -> Person:
        return self._register()

    @rule(target=people)
    def register(self) -> Person:
        return self._register()

    @rule(owner=people, days=st.integers(min_value=1, max_value=30))
    def create_or_rotate_code(self, owner: Person, days: int) -> None:
        created = self.api.referrals.CreateReferralCode(
            ref_pb.CreateReferralCodeRequest(expires_at=in_days(self.clock, days)),
            metadata=self._auth(owner),
        )
        for issued in owner.codes:
            issued.active = False
        owner.codes.insert(0, Issued(created.code, self._now() + timedelta(days=days)))

    @rule(owner=people)
    def delete_code(self, owner: Person) -> None:
        active = owner.active_code
        request = ref_pb.DeleteReferralCodeRequest()
        auth = self._auth(owner)
        if active is not None and active.expires_at > self._now():
            self.api.referrals.DeleteReferralCode(request, metadata=auth)
        else:
            err = expect_error(self.api.referrals.DeleteReferralCode, request, metadata=auth)
            assert err.code == grpc.StatusCode.NOT_FOUND
        if active is not None:
            active.active = False

    @rule(target=people, referrer=people, which=st.integers(min_value=0, max_value=3))
    def register_with_code(self, referrer: Person, which: int) -> Person:
        """Present the referrer's current code (which=0) or an older, withdrawn one."""
        if not referrer.codes:
            return self._register()
        issued = referrer.codes[min(which, len(referrer.codes) - 1)]
        if issued.active and issued.expires_at > self._now():
            person = self._register(issued.code)
            referrer.referred.add(person.user_id)
            return person
        email = next(_emails)
        err = expect_error(self.api.register, email, code=issued.code.lower())
        assert err.code == grpc.StatusCode.FAILED_PRECONDITION
        assert not User.select().where(User.email_key == email).exists()
        return self._register()

    @rule(hours=st.integers(min_value=1, max_value=24 * 20))
    def advance_clock(self, hours: int) -> None:
        self.clock.advance(hours=hours)

    @invariant()
    def at_most_one_active_code_per_user(self) -> None:
        offenders = (
            ReferralCode.select(ReferralCode.user, pw.fn.COUNT(ReferralCode.id))
            .where(ReferralCode.is_active == True)  # noqa: E712
            .group_by(ReferralCode.user)
            .having(pw.fn.COUNT(ReferralCode.id) > 1)
        )
        assert list(offenders.tuples()) == []

    @invariant()
    def lookups_return_exactly_the_live_code(self) -> None:
        now = self._now()
        for person in self.everyone:
            active = person.active_code
            request = ref_pb.GetReferralCodeByEmailRequest(email=person.email.upper())
            if active is None or active.expires_at <= now:
                err = expect_error(self.api.referrals.GetReferralCodeByEmail, request)
                assert err.code == grpc.StatusCode.NOT_FOUND, person.email
                continue
            found = self.api.referrals.GetReferralCodeByEmail(request)
            assert found.code == active.code
            live = ReferralCode.select().where(
                (ReferralCode.code == found.code)
                & (ReferralCode.user == person.user_id)
                & (ReferralCode.is_active == True)  # noqa: E712
                & (ReferralCode.expires_at > now)
            )
            assert live.exists()

    @invariant()
    def referral_lists_match_successful_registrations(self) -> None:
        for person in self.everyone:
            listed: list[int] = []
            token = ""
            while True:
                page = self.api.referrals.ListReferrals(
                    ref_pb.ListReferralsRequest(page_size=2, page_token=token),
                    metadata=self._auth(person),
                )
                listed += [r.user_id for r in page.referrals]
                token = page.next_page_token
                if not token:
                    break
            assert len(listed) == len(set(listed)) == len(person.referred)
            assert set(listed) == person.referred


def run_machine(api: Api, clock: FakeClock, examples: int, steps: int) -> None:
    ReferralMachine.api = api
    ReferralMachine.clock = clock
    run_state_machine_as_test(
        ReferralMachine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


# Invariants look every user up after every step: far above the anti-enumeration limit.
MACHINE_SETTINGS = pytest.mark.api_settings(reset_request_min_seconds=0)


@MACHINE_SETTINGS
@pytest.mark.databases("sqlite")
def test_codes_and_referrals_keep_their_invariants_on_sqlite(api: Api, clock: FakeClock) -> None:
    run_machine(api, clock, examples=30, steps=20)


@MACHINE_SETTINGS
@pytest.mark.databases("postgres")
def test_codes_and_referrals_keep_their_invariants_on_postgres(api: Api, clock: FakeClock) -> None:
    run_machine(api, clock, examples=12, steps=20)
