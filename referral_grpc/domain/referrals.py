"""Referral codes (create, rotate, delete, public lookup) and the list of a user's referrals."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import peewee as pw

from ..store.database import is_postgres, write_transaction
from ..store.models import Referral, ReferralCode, User
from .codes import generate_code
from .errors import InvalidArgument, NotFound
from .events import CODE_CREATED, CODE_DELETED, NewEvent, append_events, timestamp
from .ports import CachedCode, Clock, CodeCache
from .tokens import PageTokens
from .validation import MAX_PAGE_TOKEN_LENGTH, check_length, normalize_email

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
# One message for an unknown email, a user without a code and an expired code: no enumeration.
NO_CODE_MESSAGE = "no active referral code for this email"


@dataclass(frozen=True)
class CodeView:
    code: str
    expires_at: datetime
    created_at: datetime


@dataclass(frozen=True)
class ReferralView:
    user_id: int
    email: str
    registered_at: datetime
    # pending, qualified, reversed or rejected (referral_grpc.domain.rewards).
    state: str = "pending"
    qualified_at: datetime | None = None


@dataclass(frozen=True)
class ReferralPage:
    referrals: list[ReferralView]
    next_page_token: str


class ReferralService:
    def __init__(
        self,
        db: pw.Database,
        clock: Clock,
        cache: CodeCache,
        page_tokens: PageTokens,
        max_horizon_days: int,
        verification_required: bool,
    ) -> None:
        self._db = db
        self._clock = clock
        self._cache = cache
        self._pages = page_tokens
        self._horizon = timedelta(days=max_horizon_days)
        self._verification_required = verification_required

    def create_code(self, user_id: int, expires_at: datetime | None) -> CodeView:
        now = self._clock.now()
        if expires_at is None:
            raise InvalidArgument.for_field("expires_at", "is required", "FIELD_REQUIRED")
        if expires_at <= now:
            raise InvalidArgument.for_field("expires_at", "must be in the future", "EXPIRY_IN_PAST")
        if expires_at > now + self._horizon:
            raise InvalidArgument.for_field(
                "expires_at",
                f"must be at most {self._horizon.days} days ahead",
                "EXPIRY_TOO_FAR",
            )
        for _attempt in range(5):
            try:
                with write_transaction(self._db):
                    user = self._lock_user(user_id)
                    # Rotation: the old code goes in the same transaction the new one arrives in.
                    ReferralCode.update(is_active=False, deactivated_at=now).where(
                        (ReferralCode.user == user_id) & (ReferralCode.is_active == True)  # noqa: E712
                    ).execute()
                    row = ReferralCode.create(
                        user=user_id, code=generate_code(), created_at=now, expires_at=expires_at
                    )
                    created = {"user_id": user_id, "code": row.code, "expires_at": timestamp(expires_at)}
                    append_events(self._db, [NewEvent(CODE_CREATED, created)], now)
                break
            except pw.IntegrityError:
                # A code collision (1 in ~1e14) or a concurrent create that slipped past the
                # lock on SQLite: the partial unique index refused it, so try again.
                continue
        else:
            raise RuntimeError("could not create a referral code after 5 attempts")
        self._cache.invalidate(user.email_key)
        return CodeView(code=row.code, expires_at=row.expires_at, created_at=row.created_at)

    def delete_code(self, user_id: int) -> None:
        now = self._clock.now()
        with write_transaction(self._db):
            user = self._lock_user(user_id)
            active = (
                ReferralCode.select()
                .where((ReferralCode.user == user_id) & (ReferralCode.is_active == True))  # noqa: E712
                .first()
            )
            if active is not None:
                ReferralCode.update(is_active=False, deactivated_at=now).where(
                    ReferralCode.id == active.id
                ).execute()
                if active.expires_at > now:
                    deleted = {"user_id": user_id, "code": active.code}
                    append_events(self._db, [NewEvent(CODE_DELETED, deleted)], now)
        self._cache.invalidate(user.email_key)
        # An expired code was not usable anyway: deleting it is deactivation, but nothing was active.
        if active is None or active.expires_at <= now:
            raise NotFound("REFERRAL_CODE_NOT_FOUND", "you have no active referral code")

    def get_code_by_email(self, email: str) -> CachedCode:
        _, email_key = normalize_email(email)
        now = self._clock.now()
        cached = self._cache.get(email_key, now)
        if cached.value is not None:
            # Hidden entries come only from servers running with verification optional (a shared cache).
            if self._hidden(cached.value):
                raise NotFound("REFERRAL_CODE_NOT_FOUND", NO_CODE_MESSAGE)
            return cached.value
        row = (
            ReferralCode.select(
                ReferralCode.code, ReferralCode.expires_at, User.email_verified_at.alias("owner_verified_at")
            )
            .join(User)
            .where(
                (User.email_key == email_key)
                & (ReferralCode.is_active == True)  # noqa: E712
                & (ReferralCode.expires_at > now)
            )
            .objects()
            .first()
        )
        if row is None:
            raise NotFound("REFERRAL_CODE_NOT_FOUND", NO_CODE_MESSAGE)
        value = CachedCode(
            code=row.code, expires_at=row.expires_at, owner_verified=row.owner_verified_at is not None
        )
        if self._hidden(value):
            # Not cached either: this answer costs what a miss costs, so its speed cannot tell them apart.
            raise NotFound("REFERRAL_CODE_NOT_FOUND", NO_CODE_MESSAGE)
        self._cache.fill(email_key, cached.generation, value, now)
        return value

    def _hidden(self, value: CachedCode) -> bool:
        """Whether verification is required and the code's owner has not verified: then it is a miss."""
        return self._verification_required and not value.owner_verified

    def list_referrals(self, user_id: int, page_size: int, page_token: str) -> ReferralPage:
        if page_size < 0:
            raise InvalidArgument.for_field("page_size", "must not be negative", "PAGE_SIZE_NEGATIVE")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        check_length(page_token, "page_token", MAX_PAGE_TOKEN_LENGTH)
        query = (
            User.select(User.id, User.email, User.created_at, Referral.state, Referral.qualified_at)
            # No row yet: no event has concerned the referral, it is pending.
            .join(Referral, pw.JOIN.LEFT_OUTER, on=(Referral.referee == User.id), attr="referral_row")
            .where(User.referrer == user_id)
        )
        if page_token:
            after_time, after_id = self._pages.decode(page_token, user_id)
            # Row-value comparison keeps the (referrer, created_at, id) index usable: same cost on any page.
            query = query.where(
                pw.Tuple(User.created_at, User.id) < pw.Tuple(User.created_at.db_value(after_time), after_id)
            )
        rows = list(query.order_by(User.created_at.desc(), User.id.desc()).limit(size + 1))
        next_token = ""
        if len(rows) > size:
            rows = rows[:size]
            last = rows[-1]
            next_token = self._pages.encode(user_id, last.created_at, last.id)
        return ReferralPage(
            referrals=[_view(r) for r in rows],
            next_page_token=next_token,
        )

    def _lock_user(self, user_id: int) -> User:
        """Serialise code changes per user (SQLite's write lock already does)."""
        query = User.select(User.id, User.email_key).where(User.id == user_id)
        if is_postgres(self._db):
            query = query.for_update()
        user: User | None = query.first()
        if user is None:
            raise NotFound("USER_NOT_FOUND", "the account no longer exists")
        return user


def _view(row: User) -> ReferralView:
    referral: Referral | None = getattr(row, "referral_row", None)
    if referral is None or referral.state is None:
        return ReferralView(user_id=row.id, email=row.email, registered_at=row.created_at)
    return ReferralView(
        user_id=row.id,
        email=row.email,
        registered_at=row.created_at,
        state=referral.state,
        qualified_at=referral.qualified_at,
    )
