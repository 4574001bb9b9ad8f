"""The AdminService servicer: thin; the API key's scopes were checked by the interceptor."""

from __future__ import annotations

import json
from typing import Any

import grpc

from ..domain.admin import Administration, ReviewView, UserProfile
from ..domain.audit import AuditView
from ..domain.errors import InvalidArgument, NotFound
from ..domain.fraud import FraudRules
from ..domain.programs import ProgramRules, ProgramService, Reward
from ..domain.rewards import RewardService
from ..gen import admin_service_pb2, admin_service_pb2_grpc, reward_service_pb2
from . import convert
from .rewards import ledger_entry

pb = admin_service_pb2


def audit_event(view: AuditView) -> pb.AuditEvent:
    return pb.AuditEvent(
        seq=view.seq,
        created_at=convert.timestamp(view.created_at),
        actor=view.actor,
        action=view.action,
        target=view.target,
        before=view.before,
        after=view.after,
        request_id=view.request_id,
    )


def admin_user(profile: UserProfile) -> pb.AdminUser:
    out = pb.AdminUser(
        user_id=profile.user_id,
        email=profile.email,
        created_at=convert.timestamp(profile.created_at),
        email_status=profile.email_status,
        email_verified=profile.email_verified,
        blocked=profile.blocked_at is not None,
        referrer_user_id=profile.referrer_user_id or 0,
        codes=[
            pb.AdminCode(
                code=c.code,
                active=c.active,
                created_at=convert.timestamp(c.created_at),
                expires_at=convert.timestamp(c.expires_at),
            )
            for c in profile.codes
        ],
        referrals_by_state=[pb.StateCount(state=s, count=n) for s, n in profile.referrals_by_state.items()],
        balances=[
            reward_service_pb2.Balance(
                currency=b.currency,
                available_minor=b.available_minor,
                pending_minor=b.pending_minor,
                lifetime_earned_minor=b.lifetime_earned_minor,
            )
            for b in profile.balances
        ],
        recent_security_events=[audit_event(e) for e in profile.recent_security_events],
    )
    if profile.blocked_at is not None:
        out.blocked_at.CopyFrom(convert.timestamp(profile.blocked_at))
    return out


def program(rules: ProgramRules) -> pb.Program:
    out = pb.Program(
        version=rules.version,
        currency=rules.currency,
        event_types=list(rules.event_types),
        min_amount_minor=rules.min_amount_minor,
        attribution_days=rules.attribution_days,
        referrer_reward_minor=rules.referrer.fixed_minor,
        referrer_reward_bps=rules.referrer.bps,
        referrer_reward_cap_minor=rules.referrer.cap_minor,
        referee_reward_minor=rules.referee.fixed_minor,
        referee_reward_bps=rules.referee.bps,
        referee_reward_cap_minor=rules.referee.cap_minor,
        hold_days=rules.hold_days,
        max_rewarded_referrals=rules.max_rewarded_referrals,
    )
    if rules.created_at is not None:
        out.created_at.CopyFrom(convert.timestamp(rules.created_at))
    out.fraud.CopyFrom(pb.FraudRules(**rules.fraud.as_dict()))
    return out


_SIGNAL_FIELDS = frozenset(pb.FraudSignals.DESCRIPTOR.fields_by_name)


def reviewed(view: ReviewView) -> pb.ReviewedReferral:
    out = pb.ReviewedReferral(
        user_id=view.user_id,
        referrer_user_id=view.referrer_user_id,
        state=view.state,
        decision=view.decision,
        reasons=[pb.FraudReason(code=r.code, message=r.message, enforced=r.enforced) for r in view.reasons],
        rules_version=view.rules_version,
        signals=json.dumps(view.signals, sort_keys=True),
        # Only the fields this build knows: a value a newer rule stored stays in `signals`.
        fraud_signals=pb.FraudSignals(**{k: v for k, v in view.signals.items() if k in _SIGNAL_FIELDS}),
        partial=view.partial,
        created_at=convert.timestamp(view.created_at),
        review_outcome=view.review_outcome,
        review_note=view.review_note,
    )
    if view.reviewed_at is not None:
        out.reviewed_at.CopyFrom(convert.timestamp(view.reviewed_at))
    return out


def fraud_rules(message: pb.FraudRules) -> FraudRules:
    """Empty modes keep their defaults; numbers are taken as given once the message is set."""
    defaults = FraudRules()
    values: dict[str, Any] = {
        name: getattr(message, name) or default if isinstance(default, str) else getattr(message, name)
        for name, default in defaults.as_dict().items()
    }
    return FraudRules(**values)


def program_rules(message: pb.Program) -> ProgramRules:
    return ProgramRules(
        fraud=fraud_rules(message.fraud) if message.HasField("fraud") else FraudRules(),
        # Taken as sent (the currency upper-cased): the documented lengths are those of the request.
        currency=message.currency.upper(),
        event_types=tuple(message.event_types),
        min_amount_minor=message.min_amount_minor,
        attribution_days=message.attribution_days,
        referrer=Reward(
            message.referrer_reward_minor, message.referrer_reward_bps, message.referrer_reward_cap_minor
        ),
        referee=Reward(
            message.referee_reward_minor, message.referee_reward_bps, message.referee_reward_cap_minor
        ),
        hold_days=message.hold_days,
        max_rewarded_referrals=message.max_rewarded_referrals,
    )


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(self, admin: Administration, programs: ProgramService, rewards: RewardService) -> None:
        self._admin = admin
        self._programs = programs
        self._rewards = rewards

    def GetUser(self, request: pb.GetUserRequest, context: grpc.ServicerContext) -> pb.AdminUser:
        return admin_user(self._admin.get_user(request.user_id, request.email))

    def BlockUser(self, request: pb.BlockUserRequest, context: grpc.ServicerContext) -> pb.AdminUser:
        return admin_user(self._admin.block(request.user_id, request.note))

    def UnblockUser(self, request: pb.UnblockUserRequest, context: grpc.ServicerContext) -> pb.AdminUser:
        return admin_user(self._admin.unblock(request.user_id, request.note))

    def AdjustBalance(
        self, request: pb.AdjustBalanceRequest, context: grpc.ServicerContext
    ) -> reward_service_pb2.LedgerEntry:
        # Upper-cased, never stripped: the documented 3 characters are the ones sent.
        entry = self._rewards.adjust(
            request.user_id, request.amount_minor, request.currency.upper(), request.reason
        )
        return ledger_entry(entry)

    def GetProgram(self, request: pb.GetProgramRequest, context: grpc.ServicerContext) -> pb.Program:
        current = self._programs.current()
        if current is None:
            raise NotFound("PROGRAM_NOT_SET", "no referral program was ever set")
        return program(current)

    def UpdateProgram(self, request: pb.UpdateProgramRequest, context: grpc.ServicerContext) -> pb.Program:
        if not request.HasField("program"):
            raise InvalidArgument.for_field("program", "is required", "FIELD_REQUIRED")
        return program(self._programs.set(program_rules(request.program)))

    def ListReferralsForReview(
        self, request: pb.ListReferralsForReviewRequest, context: grpc.ServicerContext
    ) -> pb.ListReferralsForReviewResponse:
        page = self._admin.list_review(request.state, request.page_size, request.page_token)
        return pb.ListReferralsForReviewResponse(
            referrals=[reviewed(view) for view in page.referrals], next_page_token=page.next_page_token
        )

    def DecideReferral(
        self, request: pb.DecideReferralRequest, context: grpc.ServicerContext
    ) -> pb.ReviewedReferral:
        if request.decision == pb.REVIEW_DECISION_UNSPECIFIED:
            raise InvalidArgument.for_field("decision", "must be APPROVE or REJECT", "FIELD_REQUIRED")
        self._rewards.decide(request.user_id, request.decision == pb.APPROVE, request.note)
        return reviewed(self._admin.review_of(request.user_id))

    def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: grpc.ServicerContext
    ) -> pb.ListAuditEventsResponse:
        page = self._admin.list_audit(request.page_size, request.page_token, request.actor, request.target)
        return pb.ListAuditEventsResponse(
            events=[audit_event(e) for e in page.events], next_page_token=page.next_page_token
        )
