"""Administration: looking users up, blocking and unblocking them, and paging through the audit log."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import peewee as pw

from ..store.database import write_transaction
from ..store.models import AuditEvent, Referral, ReferralCode, User
from . import audit
from .auth import end_sessions
from .errors import InvalidArgument, NotFound
from .events import USER_BLOCKED, USER_UNBLOCKED, NewEvent, append_events
from .fraud import DECISIONS, REVIEW, Reason, reasons_of
from .ports import Clock, CodeCache
from .rewards import MAX_NOTE_LENGTH, BalanceView, RewardService
from .tokens import PageTokens
from .validation import MAX_PAGE_TOKEN_LENGTH, check_length, check_no_nul, normalize_email

DEFAULT_AUDIT_PAGE = 50
MAX_AUDIT_PAGE = 200
RECENT_SECURITY_EVENTS = 20


@dataclass(frozen=True)
class CodeInfo:
    code: str
    active: bool
    created_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class UserProfile:
    user_id: int
    email: str
    created_at: datetime
    email_status: str
    email_verified: bool
    blocked_at: datetime | None
    referrer_user_id: int | None
    codes: list[CodeInfo]
    referrals_by_state: dict[str, int]
    balances: list[BalanceView]
    recent_security_events: list[audit.AuditView]


@dataclass(frozen=True)
class AuditPage:
    events: list[audit.AuditView]
    next_page_token: str


@dataclass(frozen=True)
class ReviewView:
    user_id: int
    referrer_user_id: int
    state: str
    decision: str
    reasons: list[Reason]
    rules_version: int
    signals: dict[str, Any]
    partial: bool
    created_at: datetime
    review_outcome: str
    review_note: str
    reviewed_at: datetime | None


@dataclass(frozen=True)
class ReviewPage:
    referrals: list[ReviewView]
    next_page_token: str


def review_view(row: Referral) -> ReviewView:
    return ReviewView(
        user_id=row.referee_id,
        referrer_user_id=row.referrer_id,
        state=row.state,
        decision=row.fraud_decision or "",
        reasons=reasons_of(row),
        rules_version=row.fraud_rules_version or 0,
        signals=json.loads(row.fraud_signals or "{}"),
        partial=row.fraud_partial,
        created_at=row.created_at,
        review_outcome=row.review_outcome or "",
        review_note=row.review_note or "",
        reviewed_at=row.reviewed_at,
    )


def _user_not_found() -> NotFound:
    return NotFound("USER_NOT_FOUND", "no user has this id or email", {"field": "user_id"})


def _check_note(note: str) -> str:
    # The documented bound is on the note as sent, surrounding spaces included.
    check_length(note, "note", MAX_NOTE_LENGTH)
    check_no_nul(note, "note")
    return note.strip()


class Administration:
    def __init__(
        self, db: pw.Database, clock: Clock, cache: CodeCache, rewards: RewardService, page_tokens: PageTokens
    ) -> None:
        self._db = db
        self._clock = clock
        self._cache = cache
        self._rewards = rewards
        self._pages = page_tokens

    def get_user(self, user_id: int, email: str = "") -> UserProfile:
        # Checked whenever given, even beside an id: what the contract states of it holds for every call.
        email_key = normalize_email(email)[1] if email else ""
        if user_id > 0:
            user = User.get_or_none(User.id == user_id)
        elif email:
            user = User.get_or_none(User.email_key == email_key)
        else:
            raise InvalidArgument.for_field("user_id", "is required (or give email)", "FIELD_REQUIRED")
        if user is None:
            raise _user_not_found()
        codes = ReferralCode.select().where(ReferralCode.user == user.id).order_by(ReferralCode.id.desc())
        return UserProfile(
            user_id=user.id,
            email=user.email,
            created_at=user.created_at,
            email_status=user.email_status,
            email_verified=user.email_verified_at is not None,
            blocked_at=user.blocked_at,
            referrer_user_id=user.referrer_id,
            codes=[CodeInfo(c.code, c.is_active, c.created_at, c.expires_at) for c in codes],
            referrals_by_state=self._rewards.referral_stats(user.id).by_state,
            balances=self._rewards.balances(user.id),
            recent_security_events=audit.list_events("", f"user:{user.id}", 0, RECENT_SECURITY_EVENTS),
        )

    def block(self, user_id: int, note: str) -> UserProfile:
        """Lock the user out everywhere at once: tokens, refresh, login, code lookups and rewards."""
        note = _check_note(note)
        now = self._clock.now()
        with write_transaction(self._db):
            user = self._locked_user(user_id)
            if user.blocked_at is None:
                User.update(blocked_at=now).where(User.id == user.id).execute()
                end_sessions(user.id, now)
                audit.append(
                    self._db,
                    now,
                    "user.block",
                    f"user:{user.id}",
                    before={"blocked": False},
                    after={"blocked": True, "note": note},
                )
                # After the audit row: every transaction takes the two locks in one order.
                append_events(self._db, [NewEvent(USER_BLOCKED, {"user_id": user.id})], now)
        # After the commit: a lookup between the two would refill the cache with the old answer.
        self._cache.invalidate(user.email_key)
        return self.get_user(user.id)

    def unblock(self, user_id: int, note: str) -> UserProfile:
        note = _check_note(note)
        now = self._clock.now()
        with write_transaction(self._db):
            user = self._locked_user(user_id)
            if user.blocked_at is not None:
                User.update(blocked_at=None).where(User.id == user.id).execute()
                audit.append(
                    self._db,
                    now,
                    "user.unblock",
                    f"user:{user.id}",
                    before={"blocked": True},
                    after={"blocked": False, "note": note},
                )
                append_events(self._db, [NewEvent(USER_UNBLOCKED, {"user_id": user.id})], now)
        self._cache.invalidate(user.email_key)
        return self.get_user(user.id)

    def list_audit(self, page_size: int, page_token: str, actor: str, target: str) -> AuditPage:
        if page_size < 0:
            raise InvalidArgument.for_field("page_size", "must not be negative", "PAGE_SIZE_NEGATIVE")
        size = min(page_size or DEFAULT_AUDIT_PAGE, MAX_AUDIT_PAGE)
        check_length(page_token, "page_token", MAX_PAGE_TOKEN_LENGTH)
        check_length(actor, "actor", AuditEvent.actor.max_length)
        check_length(target, "target", AuditEvent.target.max_length)
        check_no_nul(actor, "actor")
        check_no_nul(target, "target")
        after_seq = self._pages.decode(page_token, 0)[1] if page_token else 0
        events = audit.list_events(actor, target, after_seq, size + 1)
        next_token = ""
        if len(events) > size:
            events = events[:size]
            next_token = self._pages.encode(0, events[-1].created_at, events[-1].seq)
        return AuditPage(events, next_token)

    def list_review(self, state: str, page_size: int, page_token: str) -> ReviewPage:
        """Referrals by fraud decision, oldest first; "review" lists those still awaiting a decision."""
        state = state.lower() or REVIEW
        if state not in DECISIONS:
            raise InvalidArgument.for_field(
                "state", f"must be one of {', '.join(DECISIONS)}", "FIELD_INVALID"
            )
        if page_size < 0:
            raise InvalidArgument.for_field("page_size", "must not be negative", "PAGE_SIZE_NEGATIVE")
        size = min(page_size or DEFAULT_AUDIT_PAGE, MAX_AUDIT_PAGE)
        check_length(page_token, "page_token", MAX_PAGE_TOKEN_LENGTH)
        query = Referral.select().where(Referral.fraud_decision == state)
        if state == REVIEW:
            query = query.where(Referral.reviewed_at.is_null())
        if page_token:
            after, after_id = self._pages.decode(page_token, 1)
            query = query.where(
                (Referral.created_at > after)
                | ((Referral.created_at == after) & (Referral.referee > after_id))
            )
        rows = list(query.order_by(Referral.created_at, Referral.referee).limit(size + 1))
        next_token = ""
        if len(rows) > size:
            rows = rows[:size]
            next_token = self._pages.encode(1, rows[-1].created_at, rows[-1].referee_id)
        return ReviewPage([review_view(row) for row in rows], next_token)

    def review_of(self, user_id: int) -> ReviewView:
        return review_view(Referral.get_by_id(user_id))

    def _locked_user(self, user_id: int) -> User:
        if user_id <= 0:
            raise InvalidArgument.for_field("user_id", "is required", "FIELD_REQUIRED")
        query = User.select().where(User.id == user_id)
        if not isinstance(self._db, pw.SqliteDatabase):
            query = query.for_update()
        user: User | None = query.first()
        if user is None:
            raise _user_not_found()
        return user
