"""Email verification: single-use tokens that prove an account's owner receives mail at its address."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import peewee as pw

from ..request_context import Principal
from ..store.database import is_postgres, write_transaction
from ..store.models import EmailVerificationToken, User
from .errors import InvalidArgument
from .ports import Clock, CodeCache, EmailDispatcher, Outbox, Rule, Throttle
from .tokens import invalid_token, random_token, token_digest
from .validation import MAX_TOKEN_LENGTH, check_token

# Long enough for a signup finished the next day; the last outbox retry comes well before it.
TOKEN_TTL = timedelta(hours=48)


@dataclass(frozen=True)
class Verified:
    user_id: int
    email_verified_at: datetime


@dataclass(frozen=True)
class Resent:
    """`email_sent` is False when the address was already verified (`email_verified_at` says when)."""

    email_sent: bool
    email_verified_at: datetime | None


class EmailVerificationService:
    """Issues and consumes verification tokens; `required` says whether verification gates anything.

    With `required`, an unverified account's code is hidden from the public lookup (see
    ReferralService) and its referrals do not count: `User.referral_qualified_at` is set only once
    both the referrer and the referee have verified. Without it the flag is recorded and shown only.
    """

    def __init__(
        self,
        db: pw.Database,
        clock: Clock,
        outbox: Outbox,
        dispatcher: EmailDispatcher,
        cache: CodeCache,
        throttle: Throttle,
        resend_rule: Rule,
        required: bool,
    ) -> None:
        self._db = db
        self._clock = clock
        self._outbox = outbox
        self._dispatcher = dispatcher
        self._cache = cache
        self._throttle = throttle
        self._resend_rule = resend_rule
        self.required = required

    def issue(self, user_id: int, email: str, now: datetime) -> int:
        """Inside the caller's transaction: a new token, replacing older ones, and its email's outbox id."""
        token = random_token()
        EmailVerificationToken.update(used_at=now).where(
            (EmailVerificationToken.user == user_id) & EmailVerificationToken.used_at.is_null()
        ).execute()
        EmailVerificationToken.create(
            user=user_id, token_hash=token_digest(token), created_at=now, expires_at=now + TOKEN_TTL
        )
        return self._outbox.queue_email(
            "email_verification",
            email,
            {"token": token, "expires_hours": int(TOKEN_TTL.total_seconds()) // 3600},
            now,
        )

    def verify(self, token: str) -> Verified:
        check_token(token, "token", MAX_TOKEN_LENGTH)
        invalid = InvalidArgument.for_field(
            "token", "is invalid, expired or already used", "VERIFICATION_TOKEN_INVALID"
        )
        now = self._clock.now()
        # Read before the transaction: a flood of bad tokens never takes SQLite's write lock.
        row = EmailVerificationToken.get_or_none(EmailVerificationToken.token_hash == token_digest(token))
        if row is None or row.used_at is not None or row.expires_at <= now:
            raise invalid
        with write_transaction(self._db):
            # Single use even under concurrency: only one call can flip used_at.
            consumed = (
                EmailVerificationToken.update(used_at=now)
                .where((EmailVerificationToken.id == row.id) & EmailVerificationToken.used_at.is_null())
                .execute()
            )
            if consumed != 1:
                raise invalid
            user = User.get_by_id(row.user_id)
            # Lock order referrer -> account -> its referrals, the same in every verification, so two
            # accounts of one referral verifying at once wait for each other instead of deadlocking,
            # and the later one sees the earlier one's flag.
            referrer = self._referrer_locked(user.referrer_id)
            User.update(email_verified_at=now).where(
                (User.id == user.id) & User.email_verified_at.is_null()
            ).execute()
            if referrer is not None and referrer.email_verified_at is not None:
                User.update(referral_qualified_at=now).where(
                    (User.id == user.id) & User.referral_qualified_at.is_null()
                ).execute()
            # This account's referrals that were waiting only for it.
            User.update(referral_qualified_at=now).where(
                (User.referrer == user.id)
                & User.referral_qualified_at.is_null()
                & User.email_verified_at.is_null(False)
            ).execute()
            verified_at = User.select(User.email_verified_at).where(User.id == user.id).scalar()
        # After the commit: a lookup that cached the code as unverified must see it at once.
        self._cache.invalidate(user.email_key)
        return Verified(user_id=user.id, email_verified_at=verified_at)

    def resend(self, principal: Principal) -> Resent:
        user = User.get_or_none(User.id == principal.user_id)
        if user is None:
            raise invalid_token()
        # Every call counts, verified or not: the limit is on calls, as for RequestPasswordReset.
        self._throttle.hit(self._resend_rule, user.email_key)
        if user.email_verified_at is not None:
            return Resent(email_sent=False, email_verified_at=user.email_verified_at)
        now = self._clock.now()
        with write_transaction(self._db):
            outbox_id = self.issue(user.id, user.email, now)
        self._dispatcher.dispatch([outbox_id])
        return Resent(email_sent=True, email_verified_at=None)

    def _referrer_locked(self, referrer_id: int | None) -> User | None:
        if referrer_id is None:
            return None
        query = User.select(User.id, User.email_verified_at).where(User.id == referrer_id)
        if is_postgres(self._db):
            # peewee passes a string through as the locking clause; its stubs only know bool.
            query = query.for_update("FOR SHARE")  # type: ignore[arg-type]
        referrer: User | None = query.first()
        return referrer


def referral_eligibility(required: bool) -> Callable[[User], bool]:
    """The rewards' eligibility rule: with verification required, a referral earns only once it counts.

    `User.referral_qualified_at` is set once both the referrer and the referee have verified their
    addresses (at signup when verification is optional).
    """
    if not required:
        return lambda referee: True
    return lambda referee: referee.referral_qualified_at is not None
