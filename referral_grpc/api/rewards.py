"""The RewardService servicer: thin, like the others; who the call is about comes from its credentials."""

from __future__ import annotations

import grpc

from ..domain.errors import InvalidArgument
from ..domain.rewards import EntryView, EventInput, RewardService
from ..gen import referral_service_pb2, reward_service_pb2, reward_service_pb2_grpc
from ..request_context import Principal, current_caller
from . import convert

pb = reward_service_pb2

_KINDS = {
    "referrer_reward": pb.REFERRER_REWARD,
    "referee_reward": pb.REFEREE_REWARD,
    "reversal": pb.REVERSAL,
    "redemption": pb.REDEMPTION,
    "adjustment": pb.ADJUSTMENT,
}
_BENEFICIARIES = {"referrer": pb.REFERRER, "referee": pb.REFEREE}


# The contract's names by domain state (pending -> PENDING), read once: a list page converts one per row.
_STATE_NAMES = {
    name.lower(): name
    for name, number in referral_service_pb2.ReferralState.items()
    if number != referral_service_pb2.REFERRAL_STATE_UNSPECIFIED
}
_UNSPECIFIED_STATE = referral_service_pb2.ReferralState.Name(referral_service_pb2.REFERRAL_STATE_UNSPECIFIED)


def referral_state(state: str | None) -> str:
    """The contract's name of a domain state (pending -> PENDING); a state it lacks is an error."""
    if state is None:
        return _UNSPECIFIED_STATE
    try:
        return _STATE_NAMES[state]
    except KeyError:
        raise ValueError(f"{state!r} is not a referral state of the contract") from None


def ledger_entry(entry: EntryView) -> reward_service_pb2.LedgerEntry:
    return pb.LedgerEntry(
        id=entry.id,
        kind=_KINDS[entry.kind],
        amount_minor=entry.amount_minor,
        currency=entry.currency,
        user_id=entry.user_id,
        referral_user_id=entry.referral_user_id or 0,
        event_id=entry.event_id,
        available_at=convert.timestamp(entry.available_at),
        created_at=convert.timestamp(entry.created_at),
    )


def _subject(requested_user_id: int) -> int:
    """The user a read concerns: the token's own, or the one a backend's key names."""
    principal = current_caller()
    if isinstance(principal, Principal):
        if requested_user_id not in (0, principal.user_id):
            raise InvalidArgument.for_field(
                "user_id", "is for API keys; with an access token, leave it unset to read your own"
            )
        return principal.user_id
    return requested_user_id


class RewardServicer(reward_service_pb2_grpc.RewardServiceServicer):
    def __init__(self, rewards: RewardService) -> None:
        self._rewards = rewards

    def RecordEvent(
        self, request: pb.RecordEventRequest, context: grpc.ServicerContext
    ) -> pb.RecordEventResponse:
        occurred_at = (
            convert.to_datetime(request.occurred_at, "occurred_at")
            if request.HasField("occurred_at")
            else None
        )
        result = self._rewards.record_event(
            EventInput(
                event_id=request.event_id,
                type=request.type,
                currency=request.currency,
                amount_minor=request.amount_minor,
                user_id=request.user_id,
                email=request.email,
                occurred_at=occurred_at,
                refunds_event_id=request.refunds_event_id,
            )
        )
        return pb.RecordEventResponse(
            event_id=result.event_id,
            duplicate=result.duplicate,
            referral_state=referral_state(result.referral_state),
            rewards=[ledger_entry(entry) for entry in result.rewards],
            skipped=[
                pb.SkippedReward(
                    beneficiary=_BENEFICIARIES[s.beneficiary],
                    reason=pb.SkipReason.Name(pb.SkipReason.Value(s.reason.upper())),
                )
                for s in result.skipped
            ],
        )

    def GetBalance(
        self, request: pb.GetBalanceRequest, context: grpc.ServicerContext
    ) -> pb.GetBalanceResponse:
        balances = self._rewards.balances(_subject(request.user_id))
        return pb.GetBalanceResponse(
            balances=[
                pb.Balance(
                    currency=b.currency,
                    available_minor=b.available_minor,
                    pending_minor=b.pending_minor,
                    lifetime_earned_minor=b.lifetime_earned_minor,
                )
                for b in balances
            ]
        )

    def ListLedgerEntries(
        self, request: pb.ListLedgerEntriesRequest, context: grpc.ServicerContext
    ) -> pb.ListLedgerEntriesResponse:
        page = self._rewards.list_entries(_subject(request.user_id), request.page_size, request.page_token)
        return pb.ListLedgerEntriesResponse(
            entries=[ledger_entry(entry) for entry in page.entries], next_page_token=page.next_page_token
        )

    def RedeemRewards(
        self, request: pb.RedeemRewardsRequest, context: grpc.ServicerContext
    ) -> pb.RedeemRewardsResponse:
        redemption = self._rewards.redeem(request.user_id, request.amount_minor, request.currency)
        return pb.RedeemRewardsResponse(
            entry=ledger_entry(redemption.entry), available_minor=redemption.available_minor
        )
