"""Fraud decisions at signup over a real server: each signal firing and not, shadow mode, review, hashing."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from support import FakeClock, make_settings
from support.api import expect_error, running_api
from support.rewards import ALL_REWARD_SCOPES, RewardsApi

from referral_grpc.domain.fraud import FraudRules, normalised_address
from referral_grpc.domain.ports import EmailVerification
from referral_grpc.gen import admin_service_pb2 as adm_pb
from referral_grpc.gen import admin_service_pb2_grpc, reward_service_pb2_grpc
from referral_grpc.gen import auth_service_pb2 as auth_pb
from referral_grpc.gen import reward_service_pb2 as rw_pb
from referral_grpc.infra.hunter import verdict
from referral_grpc.store.models import AuditEvent, ClientSignal, LedgerEntry, Referral


class StandInVerifier:
    """Hunter's answers by domain, through the adapter's own verdict policy (disposable accepted)."""

    def verify(self, email: str) -> EmailVerification:
        domain = email.rpartition("@")[2]
        if domain == "hunter-down.example":
            return EmailVerification(status="error", accepted=True, checked=False)
        status = "disposable" if domain == "burner.example" else "valid"
        return verdict(status, reject_disposable=False)


class Fraud:
    def __init__(self, rw: RewardsApi) -> None:
        self.rw = rw
        self.admin = admin_service_pb2_grpc.AdminServiceStub(rw.api.channel)
        self.ops = (("x-api-key", rw.api.app.api_keys.create("ops", ["admin:read", "admin:write"]).key),)
        self._n = 0

    def register(self, email: str = "", code: str = "", address: str = "", device: str = "") -> Any:
        self._n += 1
        metadata = []
        if address:
            metadata.append(("x-forwarded-for", address))
        if device:
            metadata.append(("x-device-id", device))
        return self.rw.api.auth.Register(
            auth_pb.RegisterRequest(
                email=email or f"person{self._n}@example.com",
                password="correct horse battery",
                referral_code=code,
            ),
            metadata=tuple(metadata),
        )

    def referrer(self, email: str = "", address: str = "", device: str = "") -> tuple[int, str]:
        tokens = self.register(email, address=address or f"198.51.100.{self._n + 1}", device=device)
        return int(tokens.user_id), self.rw.code_of(tokens.access_token)

    def decision(self, user_id: int) -> tuple[str, str, dict[str, bool]]:
        row = Referral.get_by_id(user_id)
        reasons = {r["code"]: r["enforced"] for r in json.loads(row.fraud_reasons)}
        return row.fraud_decision, row.state, reasons


@pytest.fixture
def fraud(database_url: str, clock: FakeClock) -> Iterator[Fraud]:
    settings = make_settings(database_url=database_url, reset_request_min_seconds=0)
    with running_api(settings, clock=clock, verifier=StandInVerifier()) as api:
        key = api.app.api_keys.create("backend", ALL_REWARD_SCOPES).key
        yield Fraud(RewardsApi(api, clock, reward_service_pb2_grpc.RewardServiceStub(api.channel), key))


def test_addresses_normalise_where_the_provider_ignores_the_difference() -> None:
    assert normalised_address("A.Lice+2@GoogleMail.com") == normalised_address("alice@gmail.com")
    assert normalised_address("alice+shop@outlook.com") == "alice@outlook.com"
    # Elsewhere "+" and dots may be real parts of a name: unchanged but for case.
    assert normalised_address("Al.ice+x@example.com") == "al.ice+x@example.com"


def test_a_legitimate_pair_is_allowed_and_the_young_referrer_only_recorded(fraud: Fraud) -> None:
    _, code = fraud.referrer(address="203.0.113.7")
    newcomer = fraud.register(code=code, address="203.0.113.8", device="phone-b")
    decision, state, reasons = fraud.decision(newcomer.user_id)
    assert (decision, state, reasons) == ("allow", "pending", {"young_referrer": False})
    row = Referral.get_by_id(newcomer.user_id)
    assert row.fraud_rules_version == 0 and not row.fraud_partial
    signals = json.loads(row.fraud_signals)
    assert signals["same_normalised_email"] is False and signals["referrer_age_hours"] == 0


def test_two_people_at_one_office_address_are_allowed_below_the_threshold(fraud: Fraud) -> None:
    _, code = fraud.referrer(address="192.0.2.10")
    colleague = fraud.register(code=code, address="192.0.2.10")
    assert fraud.decision(colleague.user_id)[0] == "allow"
    # The next newcomer from the referrer's own address is one more than the allowance.
    another = fraud.register(code=code, address="192.0.2.10")
    decision, state, reasons = fraud.decision(another.user_id)
    assert (decision, state) == ("reject", "rejected") and reasons["self_referral_address"] is True


@pytest.mark.parametrize(
    ("referrer_email", "newcomer_email"),
    [("alice@gmail.com", "a.lice+2@googlemail.com"), ("Bob@outlook.com", "bob+again@outlook.com")],
)
def test_self_referral_by_normalised_address_is_rejected_and_never_earns(
    fraud: Fraud, referrer_email: str, newcomer_email: str
) -> None:
    fraud.rw.set_program()
    _, code = fraud.referrer(email=referrer_email)
    newcomer = fraud.register(newcomer_email, code=code, address="203.0.113.99")
    assert newcomer.access_token  # the newcomer's signup looks like any other
    decision, state, reasons = fraud.decision(newcomer.user_id)
    assert (decision, state, reasons["self_referral_email"]) == ("reject", "rejected", True)
    recorded = fraud.rw.event(newcomer.user_id)
    assert not recorded.rewards and {s.reason for s in recorded.skipped} == {rw_pb.REFERRAL_REJECTED}
    assert LedgerEntry.select().count() == 0


def test_a_plus_tag_at_an_unknown_provider_is_a_different_person(fraud: Fraud) -> None:
    _, code = fraud.referrer(email="carol@example.com")
    newcomer = fraud.register("carol+x@example.com", code=code, address="203.0.113.50")
    assert fraud.decision(newcomer.user_id)[0] == "allow"


def test_the_referrers_device_from_a_recent_login_is_self_referral(fraud: Fraud) -> None:
    _, code = fraud.referrer(email="dave@example.com", address="198.51.100.200")
    fraud.rw.api.auth.Login(
        auth_pb.LoginRequest(email="dave@example.com", password="correct horse battery"),
        metadata=(("x-device-id", "laptop-1"), ("x-forwarded-for", "198.51.100.201")),
    )
    other_device = fraud.register(code=code, address="203.0.113.1", device="laptop-2")
    same_device = fraud.register(code=code, address="203.0.113.2", device="laptop-1")
    assert fraud.decision(other_device.user_id)[0] == "allow"
    assert fraud.decision(same_device.user_id)[2]["self_referral_device"] is True
    assert fraud.decision(same_device.user_id)[0] == "reject"


@pytest.mark.parametrize("email", ["someone@mailinator.com", "someone@burner.example"])
def test_disposable_mailboxes_by_list_or_by_hunter_are_rejected(fraud: Fraud, email: str) -> None:
    _, code = fraud.referrer()
    newcomer = fraud.register(email, code=code, address="203.0.113.3")
    decision, state, reasons = fraud.decision(newcomer.user_id)
    assert (decision, state, reasons["disposable_email"]) == ("reject", "rejected", True)


def test_hunter_down_gives_a_partial_decision_and_never_blocks_signup(fraud: Fraud) -> None:
    _, code = fraud.referrer()
    newcomer = fraud.register("someone@hunter-down.example", code=code, address="203.0.113.4")
    row = Referral.get_by_id(newcomer.user_id)
    assert (row.fraud_decision, row.fraud_partial) == ("allow", True)


def test_velocity_per_referrer_sends_to_review(fraud: Fraud, clock: FakeClock) -> None:
    _, code = fraud.referrer()
    decisions = [
        fraud.decision(fraud.register(code=code, address=f"203.0.113.{60 + n}").user_id)[0] for n in range(6)
    ]
    assert decisions == ["allow"] * 5 + ["review"]
    clock.advance(hours=2)  # a new hour, same day: 7 of at most 20
    assert fraud.decision(fraud.register(code=code, address="203.0.113.90").user_id)[0] == "allow"


def test_velocity_per_client_address_sends_to_review(fraud: Fraud) -> None:
    codes = [fraud.referrer()[1] for _ in range(6)]
    decisions = [fraud.decision(fraud.register(code=c, address="100.64.0.1").user_id) for c in codes]
    assert [d[0] for d in decisions] == ["allow"] * 5 + ["review"]
    assert decisions[-1][2]["velocity_address_day"] is True


def test_shadow_mode_records_without_enforcing_and_names_the_rules_version(fraud: Fraud) -> None:
    rules = fraud.rw.set_program(fraud=FraudRules(velocity="shadow", referrals_per_hour=1))
    _, code = fraud.referrer()
    fraud.register(code=code, address="203.0.113.20")
    second = fraud.register(code=code, address="203.0.113.21")
    row = Referral.get_by_id(second.user_id)
    assert fraud.decision(second.user_id) == (
        "allow",
        "pending",
        {"velocity_referrer_hour": False, "young_referrer": False},
    )
    assert row.fraud_rules_version == rules.version


def test_review_holds_rewards_until_approved_and_a_rejection_never_pays(fraud: Fraud) -> None:
    rw = fraud.rw
    rw.set_program(fraud=FraudRules(velocity="review", referrals_per_hour=0, disposable="off"))
    referrer, code = fraud.referrer()
    held = fraud.register(code=code, address="203.0.113.30")
    refused = fraud.register(code=code, address="203.0.113.31")
    queue = fraud.admin.ListReferralsForReview(adm_pb.ListReferralsForReviewRequest(), metadata=fraud.ops)
    assert [r.user_id for r in queue.referrals] == [held.user_id, refused.user_id]
    # What the rules saw, typed: the velocity counts of each, and nothing of the rule that was off.
    assert [r.fraud_signals.referrals_last_hour for r in queue.referrals] == [1, 2]
    seen = queue.referrals[1].fraud_signals
    assert seen.HasField("same_normalised_email") and not seen.HasField("verifier_status")
    assert not seen.HasField("disposable_domain_listed")
    assert (
        queue.referrals[0].reasons[0].code == "velocity_referrer_hour"
        and queue.referrals[0].decision == "review"
    )

    for newcomer in (held, refused):
        recorded = rw.event(newcomer.user_id)
        assert not recorded.rewards and {s.reason for s in recorded.skipped} == {rw_pb.REFERRAL_IN_REVIEW}
    assert LedgerEntry.select().count() == 0

    approved = fraud.admin.DecideReferral(
        adm_pb.DecideReferralRequest(user_id=held.user_id, decision=adm_pb.APPROVE, note="known customer"),
        metadata=fraud.ops,
    )
    assert (approved.state, approved.review_outcome) == ("qualified", "approved")
    assert rw.balance(referrer)[1] == 500 and rw.balance(held.user_id)[1] == 1000

    rejected = fraud.admin.DecideReferral(
        adm_pb.DecideReferralRequest(user_id=refused.user_id, decision=adm_pb.REJECT, note="ring"),
        metadata=fraud.ops,
    )
    assert (rejected.state, rejected.review_outcome) == ("rejected", "rejected")
    later = rw.event(refused.user_id)
    assert not later.rewards and {s.reason for s in later.skipped} == {rw_pb.REFERRAL_REJECTED}
    assert rw.balance(refused.user_id) == (0, 0, 0) and rw.balance(referrer)[1] == 500

    again = expect_error(
        fraud.admin.DecideReferral,
        adm_pb.DecideReferralRequest(user_id=held.user_id, decision=adm_pb.REJECT),
        metadata=fraud.ops,
    )
    assert (again.code, again.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "REFERRAL_ALREADY_DECIDED")
    not_held = expect_error(
        fraud.admin.DecideReferral,
        adm_pb.DecideReferralRequest(user_id=referrer, decision=adm_pb.APPROVE),
        metadata=fraud.ops,
    )
    assert (not_held.code, not_held.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "REFERRAL_NOT_IN_REVIEW")
    assert (
        fraud.admin.ListReferralsForReview(
            adm_pb.ListReferralsForReviewRequest(), metadata=fraud.ops
        ).referrals
        == []
    )
    decided = AuditEvent.select().where(AuditEvent.action == "referral.decide").order_by(AuditEvent.seq)
    assert [(r.actor, json.loads(r.after)["outcome"]) for r in decided] == [
        ("key:ops", "approved"),
        ("key:ops", "rejected"),
    ]
    assert AuditEvent.select().where(AuditEvent.action == "fraud.decide").count() == 2


def test_fraud_thresholds_out_of_range_are_field_violations(fraud: Fraud) -> None:
    program = adm_pb.Program(
        currency="USD",
        event_types=["purchase"],
        attribution_days=30,
        fraud=adm_pb.FraudRules(velocity="sometimes", referrals_per_hour=-1),
    )
    bad = expect_error(
        fraud.admin.UpdateProgram, adm_pb.UpdateProgramRequest(program=program), metadata=fraud.ops
    )
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {"fraud.velocity", "fraud.referrals_per_hour"} <= set(bad.fields)
    program.fraud.velocity, program.fraud.referrals_per_hour = "", 3
    stored = fraud.admin.UpdateProgram(adm_pb.UpdateProgramRequest(program=program), metadata=fraud.ops)
    assert (stored.fraud.velocity, stored.fraud.referrals_per_hour, stored.fraud.disposable) == (
        "review",
        3,
        "reject",
    )


def test_client_signals_are_keyed_hashes_that_expire(fraud: Fraud, clock: FakeClock) -> None:
    tokens = fraud.register("erin@example.com", address="203.0.113.77", device="erins-phone")
    [row] = ClientSignal.select().where(ClientSignal.user == tokens.user_id)
    assert row.kind == "registration" and len(row.address_hash) == 64
    stored = " ".join(str(v) for v in ClientSignal.select().tuples().first())
    assert "203.0.113.77" not in stored and "erins-phone" not in stored
    clock.advance(days=31)  # past SIGNAL_RETENTION_DAYS (30)
    fraud.rw.api.auth.Login(
        auth_pb.LoginRequest(email="erin@example.com", password="correct horse battery"),
        metadata=(("x-forwarded-for", "203.0.113.78"),),
    )
    assert [r.kind for r in ClientSignal.select().where(ClientSignal.user == tokens.user_id)] == ["login"]


def test_concurrent_signups_of_one_referrer_are_counted_exactly(pg_url: str, clock: FakeClock) -> None:
    """Without the per-referrer lock, parallel signups all count the same earlier referrals."""
    settings = make_settings(database_url=pg_url, reset_request_min_seconds=0)
    with running_api(settings, clock=clock, verifier=StandInVerifier()) as api:
        key = api.app.api_keys.create("backend", ALL_REWARD_SCOPES).key
        fraud = Fraud(RewardsApi(api, clock, reward_service_pb2_grpc.RewardServiceStub(api.channel), key))
        fraud.rw.set_program(fraud=FraudRules(referrals_per_hour=3))
        _, code = fraud.referrer()
        start = threading.Barrier(8)
        ids: list[int] = []

        def signup(n: int) -> None:
            start.wait()
            ids.append(
                int(fraud.register(f"parallel{n}@example.com", code=code, address=f"203.0.113.{n}").user_id)
            )

        threads = [threading.Thread(target=signup, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        decisions = sorted(fraud.decision(user_id)[0] for user_id in ids)
        assert decisions == ["allow"] * 3 + ["review"] * 5
