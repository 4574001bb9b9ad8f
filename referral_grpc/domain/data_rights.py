"""Data rights: a user's export of everything held about them, and the erasure of their personal data."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

import peewee as pw

from ..store.database import write_transaction
from ..store.models import (
    AuditEvent,
    ClientSignal,
    EmailOutbox,
    EmailVerificationToken,
    LedgerEntry,
    PasswordResetToken,
    ReferralCode,
    User,
)
from . import audit
from .auth import end_sessions
from .errors import InvalidArgument
from .events import USER_DELETED, NewEvent, append_events
from .passwords import PasswordHasher
from .ports import Clock, CodeCache, Rule, Throttle
from .tokens import invalid_token
from .validation import check_password_input

# What an erased account's address becomes: unique, and in a domain that can never receive mail (RFC 2606).
PSEUDONYM_DOMAIN = "deleted.invalid"


def pseudonym(user_id: int) -> str:
    return f"deleted-user-{user_id}@{PSEUDONYM_DOMAIN}"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


class DataRights:
    def __init__(
        self,
        db: pw.Database,
        clock: Clock,
        hasher: PasswordHasher,
        cache: CodeCache,
        throttle: Throttle,
        password_rule: Rule,
    ) -> None:
        self._db = db
        self._clock = clock
        self._hasher = hasher
        self._cache = cache
        self._throttle = throttle
        # Login's rule and counter: a stolen access token must not become a password-guessing oracle.
        self._password_rule = password_rule

    def export(self, user_id: int) -> dict[str, Any]:
        """Every row about the user, as plain JSON values."""
        user = User.get_or_none(User.id == user_id)
        if user is None:
            raise invalid_token()
        referrer = User.get_or_none(User.id == user.referrer_id) if user.referrer_id else None
        return {
            "account": {
                "user_id": user.id,
                "email": user.email,
                "created_at": _iso(user.created_at),
                "email_status": user.email_status,
                "email_verified_at": _iso(user.email_verified_at),
                "blocked_at": _iso(user.blocked_at),
            },
            "codes": [
                {
                    "code": c.code,
                    "active": c.is_active,
                    "created_at": _iso(c.created_at),
                    "expires_at": _iso(c.expires_at),
                    "deactivated_at": _iso(c.deactivated_at),
                }
                for c in ReferralCode.select().where(ReferralCode.user == user.id).order_by(ReferralCode.id)
            ],
            # Only the referrer's id: their address is their personal data, not the caller's.
            "referrer": None if referrer is None else {"user_id": referrer.id},
            "referrals": [
                {"user_id": r.id, "registered_at": _iso(r.created_at)}
                for r in User.select(User.id, User.created_at)
                .where(User.referrer == user.id)
                .order_by(User.id)
            ],
            "ledger": [
                {
                    "id": e.id,
                    "kind": e.kind,
                    "amount_minor": e.amount_minor,
                    "currency": e.currency,
                    "referral_user_id": e.referral_user_id,
                    "available_at": _iso(e.available_at),
                    "created_at": _iso(e.created_at),
                }
                for e in LedgerEntry.select().where(LedgerEntry.user == user.id).order_by(LedgerEntry.id)
            ],
            "security_events": [
                {"action": a.action, "actor": a.actor, "at": _iso(a.created_at), "request_id": a.request_id}
                for a in AuditEvent.select()
                .where(AuditEvent.target == f"user:{user.id}")
                .order_by(AuditEvent.seq)
            ],
            # The service asks for no consents: signing up is the only agreement it records.
            "consents": [],
        }

    def erase(self, user_id: int, current_password: str) -> None:
        """Pseudonymise the account at once; links and ledger entries stay, so others' data stays whole."""
        check_password_input(current_password, "current_password")
        user = User.get_or_none(User.id == user_id)
        if user is None:
            raise invalid_token()
        self._throttle.hit(self._password_rule, user.email_key)
        if not self._hasher.verify(current_password, user.password_hash):
            raise InvalidArgument.for_field(
                "current_password", "does not match the current password", "WRONG_PASSWORD"
            )
        self._throttle.clear(self._password_rule, user.email_key)
        now = self._clock.now()
        alias = pseudonym(user.id)
        # A hash of a password nobody knows: the account can never be signed into again.
        unusable = self._hasher.hash(secrets.token_urlsafe(32))
        with write_transaction(self._db):
            User.update(
                email=alias,
                email_key=alias,
                password_hash=unusable,
                email_status="erased",
            ).where(User.id == user.id).execute()
            end_sessions(user.id, now)
            ReferralCode.update(is_active=False, deactivated_at=now).where(
                (ReferralCode.user == user.id) & (ReferralCode.is_active == True)  # noqa: E712
            ).execute()
            ClientSignal.delete().where(ClientSignal.user == user.id).execute()
            PasswordResetToken.delete().where(PasswordResetToken.user == user.id).execute()
            EmailVerificationToken.delete().where(EmailVerificationToken.user == user.id).execute()
            # Queued and sent mail named the address; the rows stay for delivery accounting.
            EmailOutbox.update(recipient=alias, payload="{}").where(
                EmailOutbox.recipient == user.email
            ).execute()
            # The erasure itself, without the address (the audit log is never rewritten).
            audit.append(self._db, now, "user.erase", f"user:{user.id}", actor=f"user:{user.id}")
            # The id only, after the audit row (one lock order for every transaction).
            append_events(self._db, [NewEvent(USER_DELETED, {"user_id": user.id})], now)
        self._cache.invalidate(user.email_key)
