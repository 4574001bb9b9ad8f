"""Helpers for the rewards tests: a server with a RewardService stub, API keys, programs and events."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from referral_grpc.domain.programs import ProgramRules, Reward
from referral_grpc.gen import referral_service_pb2 as ref_pb
from referral_grpc.gen import reward_service_pb2 as rw_pb
from referral_grpc.gen import reward_service_pb2_grpc
from support import FakeClock, make_settings
from support.api import Api, bearer, in_days, running_api, ts

ALL_REWARD_SCOPES = ("events:write", "rewards:read", "rewards:redeem")
_event_ids = (f"evt-{n}" for n in itertools.count())
_emails = (f"member{n}@example.com" for n in itertools.count())


def new_event_id() -> str:
    return next(_event_ids)


def new_email() -> str:
    return next(_emails)


@dataclass
class RewardsApi:
    api: Api
    clock: FakeClock
    rewards: reward_service_pb2_grpc.RewardServiceStub
    key: str

    @property
    def auth(self) -> tuple[tuple[str, str]]:
        return (("x-api-key", self.key),)

    def new_key(self, *scopes: str, name: str = "") -> str:
        name = name or f"key-{new_event_id()}"
        return self.api.app.api_keys.create(name, scopes).key

    def set_program(self, **overrides: Any) -> ProgramRules:
        values: dict[str, Any] = {
            "currency": "USD",
            "event_types": ("purchase",),
            "referrer": Reward(fixed_minor=500),
            "referee": Reward(bps=1000, cap_minor=2000),
            "hold_days": 14,
        }
        values.update(overrides)
        return self.api.app.programs.set(ProgramRules(**values))

    def person(self, code: str = "") -> tuple[int, str, str]:
        """Register someone (with `code` if given): (user id, email, access token)."""
        email = new_email()
        tokens = self.api.register(email, code=code)
        return tokens.user_id, email, tokens.access_token

    def code_of(self, access_token: str) -> str:
        created = self.api.referrals.CreateReferralCode(
            ref_pb.CreateReferralCodeRequest(expires_at=in_days(self.clock, 30)),
            metadata=bearer(access_token),
        )
        return str(created.code)

    def pair(self) -> tuple[int, int]:
        """A referrer and the newcomer who registered with their code: (referrer id, newcomer id)."""
        referrer, _, token = self.person()
        newcomer, _, _ = self.person(self.code_of(token))
        return referrer, newcomer

    def event(
        self,
        user_id: int,
        amount_minor: int = 10_000,
        type: str = "purchase",
        currency: str = "USD",
        event_id: str = "",
        refunds: str = "",
        occurred_at: datetime | None = None,
        key: str = "",
        timeout: float | None = None,
    ) -> Any:
        request = rw_pb.RecordEventRequest(
            event_id=event_id or new_event_id(),
            user_id=user_id,
            type=type,
            amount_minor=amount_minor,
            currency=currency,
            refunds_event_id=refunds,
        )
        if occurred_at is not None:
            request.occurred_at.CopyFrom(ts(occurred_at))
        return self.rewards.RecordEvent(request, metadata=(("x-api-key", key or self.key),), timeout=timeout)

    def balance(self, user_id: int, currency: str = "USD") -> tuple[int, int, int]:
        """(available, pending, lifetime earned) in `currency`, zeros when the user has no entries."""
        response = self.rewards.GetBalance(rw_pb.GetBalanceRequest(user_id=user_id), metadata=self.auth)
        for balance in response.balances:
            if balance.currency == currency:
                return balance.available_minor, balance.pending_minor, balance.lifetime_earned_minor
        return 0, 0, 0

    def redeem(self, user_id: int, amount_minor: int, idempotency_key: str, currency: str = "USD") -> Any:
        return self.rewards.RedeemRewards(
            rw_pb.RedeemRewardsRequest(user_id=user_id, amount_minor=amount_minor, currency=currency),
            metadata=(*self.auth, ("idempotency-key", idempotency_key)),
        )


@contextmanager
def running_rewards(database_url: str, clock: FakeClock, **settings: Any) -> Iterator[RewardsApi]:
    values: dict[str, Any] = {"database_url": database_url, "reset_request_min_seconds": 0, **settings}
    with running_api(make_settings(**values), clock=clock) as api:
        stub = reward_service_pb2_grpc.RewardServiceStub(api.channel)
        key = api.app.api_keys.create(f"backend-{new_event_id()}", ALL_REWARD_SCOPES).key
        yield RewardsApi(api, clock, stub, key)
