"""Accounts: registration, login, refresh tokens, password change and two-step reset."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import peewee as pw

from ..request_context import Principal, SignedPrincipal
from ..store.database import is_postgres, run_sql, write_transaction
from ..store.models import PENDING, REJECTED, PasswordResetToken, Referral, ReferralCode, RefreshToken, User
from . import audit
from .codes import normalize_code
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, Unauthenticated
from .events import (
    REFERRAL_CREATED,
    REFERRAL_REJECTED,
    USER_PASSWORD_CHANGED,
    USER_REGISTERED,
    NewEvent,
    append_events,
)
from .fraud import REJECT, ClientInfo, FraudChecker, SignalHasher, stored_fields
from .passwords import PasswordHasher
from .ports import Clock, EmailDispatcher, EmailVerifier, Outbox, Rule, Throttle
from .programs import current_fraud_rules
from .tokens import (
    AccessTokens,
    SuccessorTokens,
    invalid_token,
    random_token,
    require_token_version,
    token_digest,
)
from .validation import (
    MAX_CODE_INPUT_LENGTH,
    MAX_TOKEN_LENGTH,
    check_length,
    check_password,
    check_password_input,
    check_printable,
    check_token,
    normalize_email,
)
from .verification import EmailVerificationService

log = logging.getLogger(__name__)

INVALID_CREDENTIALS = "invalid email or password"
ACCOUNT_BLOCKED = "this account is blocked; contact support"
# The first key of the per-referrer advisory locks (the second is the referrer's id).
_REFERRER_LOCK_SPACE = 0x5EF3
INVALID_REFRESH = "invalid or expired refresh token"
# Where Login's optional proof comes from: request metadata, an HTTP header through Envoy.
PROOF_FIELD = "x-refresh-token"


def token_version_sql(db: pw.Database) -> str:
    """The read behind every user token's check: the user's current token_version (no row: user gone).
    Hand-written: building the query cost more Python than the primary-key read itself."""
    return f'SELECT token_version FROM "{User._meta.table_name}" WHERE id = {db.param}'  # noqa: S608


@dataclass(frozen=True)
class Limits:
    """The per-account throttle rules the accounts service applies."""

    login: Rule
    # Logins that present a live refresh token of the account, counted per token family: guessers
    # without one cannot use up this allowance, so they cannot lock the owner out.
    proven_login: Rule
    reset: Rule


@dataclass(frozen=True)
class IssuedTokens:
    user_id: int
    access_token: str
    expires_in: int
    refresh_token: str
    refresh_expires_in: int


def end_sessions(user_id: int, now: datetime) -> None:
    """Inside a write transaction: every access and refresh token of the user stops working."""
    User.update(token_version=User.token_version + 1).where(User.id == user_id).execute()
    RefreshToken.update(revoked_at=now).where(
        (RefreshToken.user == user_id) & RefreshToken.revoked_at.is_null()
    ).execute()


def mask_email(email: str) -> str:
    """a***@example.com: enough for a referrer to recognise a friend, not to harvest addresses."""
    local, _, domain = email.partition("@")
    return f"{local[:1]}***@{domain}"


class AuthService:
    def __init__(
        self,
        db: pw.Database,
        clock: Clock,
        hasher: PasswordHasher,
        access_tokens: AccessTokens,
        successor_tokens: SuccessorTokens,
        refresh_token_ttl: int,
        refresh_reuse_grace: float,
        reset_token_ttl: int,
        verifier: EmailVerifier,
        outbox: Outbox,
        dispatcher: EmailDispatcher,
        throttle: Throttle,
        limits: Limits,
        reset_request_min_seconds: float,
        email_verification: EmailVerificationService,
        fraud: FraudChecker,
        signals: SignalHasher,
    ) -> None:
        self._db = db
        self._token_version_sql = token_version_sql(db)
        self._clock = clock
        self._hasher = hasher
        self._access = access_tokens
        self._successors = successor_tokens
        self._refresh_ttl = refresh_token_ttl
        self._refresh_grace = timedelta(seconds=refresh_reuse_grace)
        self._reset_ttl = reset_token_ttl
        self._verifier = verifier
        self._outbox = outbox
        self._dispatcher = dispatcher
        self._throttle = throttle
        self._limits = limits
        self._reset_min_seconds = reset_request_min_seconds
        self._email_verification = email_verification
        self._fraud = fraud
        self._signals = signals

    # --- sign-in -------------------------------------------------------------------------

    def register(
        self, email: str, password: str, referral_code: str = "", client: ClientInfo | None = None
    ) -> IssuedTokens:
        email, email_key = normalize_email(email)
        check_password(password, "password")
        # Before normalize_code strips: "\x1f" alone must not silently become "no code".
        check_printable(referral_code, "referral_code", "REFERRAL_CODE_INVALID")
        check_length(referral_code, "referral_code", MAX_CODE_INPUT_LENGTH)
        code = normalize_code(referral_code) if referral_code.strip() else None
        now = self._clock.now()
        if User.select().where(User.email_key == email_key).exists():
            raise AlreadyExists("EMAIL_TAKEN", "an account with this email already exists")
        if code is not None:
            self._usable_code(code, now)  # fail fast, before paying for Hunter and bcrypt

        verification = self._verifier.verify(email)
        if not verification.accepted:
            raise InvalidArgument.for_field(
                "email", "this address cannot receive email", "EMAIL_UNDELIVERABLE"
            )
        password_hash = self._hasher.hash(password)

        outbox_ids: list[int] = []
        try:
            with write_transaction(self._db):
                referrer_id: int | None = None
                if code is not None:
                    # Re-checked under a share lock: a concurrent delete or rotation waits for us.
                    referrer_id = self._usable_code(code, now, lock=True).user_id
                user = User.create(
                    email=email,
                    email_key=email_key,
                    password_hash=password_hash,
                    referrer=referrer_id,
                    created_at=now,
                    email_status=verification.status,
                    email_checked_at=now if verification.checked else None,
                    email_recheck=not verification.checked and verification.status != "unchecked",
                    # Required verification: counts once both addresses are verified (VerifyEmail).
                    referral_qualified_at=(
                        now if referrer_id is not None and not self._email_verification.required else None
                    ),
                )
                outbox_ids.append(self._outbox.queue_email("welcome", email, {}, now))
                outbox_ids.append(self._email_verification.issue(user.id, email, now))
                rejection = ""
                if referrer_id is not None:
                    referrer = User.get_by_id(referrer_id)
                    # Judged before this signup's own signal is kept, which would count against it.
                    rejection = self._judge_referral(user, referrer, client, now)
                self._signals.record(user.id, "registration", client, now)
                if referrer_id is not None:
                    outbox_ids.append(
                        self._outbox.queue_email(
                            "referral_joined",
                            referrer.email,
                            {"referee_email_masked": mask_email(email)},
                            now,
                        )
                    )
                refresh = self._new_refresh_token(user.id, uuid.uuid4().hex, now)
                registered = {"user_id": user.id, "referrer_user_id": referrer_id or 0}
                events = [NewEvent(USER_REGISTERED, registered)]
                if referrer_id is not None:
                    referral = {"referee_user_id": user.id, "referrer_user_id": referrer_id, "code": code}
                    events.append(NewEvent(REFERRAL_CREATED, referral))
                if rejection:
                    rejected = {
                        "referee_user_id": user.id,
                        "referrer_user_id": referrer_id,
                        "reason": rejection,
                    }
                    events.append(NewEvent(REFERRAL_REJECTED, rejected))
                # After the audit row of the fraud decision: every transaction takes the audit lock
                # before the event log's, so the two global locks cannot deadlock.
                append_events(self._db, events, now)
        except pw.IntegrityError:
            # The unique index on email_key decides between concurrent registrations.
            raise AlreadyExists("EMAIL_TAKEN", "an account with this email already exists") from None
        self._dispatcher.dispatch(outbox_ids)
        return self._tokens(user, refresh)

    def login(
        self, email: str, password: str, proof: str = "", client: ClientInfo | None = None
    ) -> IssuedTokens:
        """Sign in. `proof` is optional: a live refresh token of the same account (see Limits)."""
        _, email_key = normalize_email(email)
        check_password_input(password, "password")
        if proof:
            check_token(proof, PROOF_FIELD, MAX_TOKEN_LENGTH)
        # Read first: when the database is down the attempt fails before it is counted, so an
        # outage cannot lock accounts. Counted before the password is checked (see
        # referral_grpc/infra/throttle.py): parallel guesses cannot overrun the limit, and a throttled
        # account refuses even the right password - unless the client proves it holds a session.
        user = User.get_or_none(User.email_key == email_key)
        family = self._live_family(user, proof) if proof else None
        rule, key = (self._limits.proven_login, family) if family else (self._limits.login, email_key)
        self._throttle.hit(rule, key)
        if user is None:
            self._hasher.verify_dummy(password)
            raise Unauthenticated("INVALID_CREDENTIALS", INVALID_CREDENTIALS)
        if not self._hasher.verify(password, user.password_hash):
            raise Unauthenticated("INVALID_CREDENTIALS", INVALID_CREDENTIALS)
        # Only after the password: a guesser learns nothing about the account's state.
        if user.blocked_at is not None:
            raise Unauthenticated("ACCOUNT_BLOCKED", ACCOUNT_BLOCKED)
        self._throttle.clear(rule, key)
        if family:
            # The owner is back: whatever anonymous guessers ran up stops counting against them.
            self._throttle.clear(self._limits.login, email_key)
        now = self._clock.now()
        with write_transaction(self._db):
            refresh = self._new_refresh_token(user.id, uuid.uuid4().hex, now)
            self._signals.record(user.id, "login", client, now)
        return self._tokens(user, refresh)

    def refresh(self, refresh_token: str) -> IssuedTokens:
        """Exchange a refresh token for a new pair; the old one is rotated out.

        Exactly one exchange claims a token (a conditional update). Another one within
        REFRESH_REUSE_GRACE_SECONDS - a concurrent duplicate, or a retry after a lost response - gets
        the winner's refresh token again (it is derived from the old one, see SuccessorTokens) while
        it is still live, so every success hands out a token that works and a family never has two
        live tokens. Any other return of a rotated token is theft or replay: the family is revoked.
        """
        check_token(refresh_token, "refresh_token", MAX_TOKEN_LENGTH)
        now = self._clock.now()
        successor = self._successors.successor(refresh_token)
        with write_transaction(self._db):
            row = RefreshToken.get_or_none(RefreshToken.token_hash == token_digest(refresh_token))
            if row is None or row.revoked_at is not None or row.expires_at <= now:
                raise Unauthenticated("INVALID_REFRESH_TOKEN", INVALID_REFRESH)
            claimed = (
                RefreshToken.update(rotated_at=now)
                .where((RefreshToken.id == row.id) & RefreshToken.rotated_at.is_null())
                .execute()
            )
            user = User.get_or_none(User.id == row.user_id)
            if user is None:
                raise Unauthenticated("INVALID_REFRESH_TOKEN", INVALID_REFRESH)
            if user.blocked_at is not None:
                # Blocking revokes every refresh token; this catches an exchange racing the block.
                raise Unauthenticated("ACCOUNT_BLOCKED", ACCOUNT_BLOCKED)
            if claimed == 1:
                self._store_refresh_token(user.id, row.family, successor, now)
                return self._tokens(user, successor)
            # A concurrent winner has committed by now: PostgreSQL made our update wait for its row
            # lock, SQLite serialises write transactions. So these reads see its rotation and token.
            rotated_at = RefreshToken.get_by_id(row.id).rotated_at
            live = RefreshToken.get_or_none(
                (RefreshToken.token_hash == token_digest(successor))
                & RefreshToken.rotated_at.is_null()
                & RefreshToken.revoked_at.is_null()
                & (RefreshToken.expires_at > now)
            )
            if live is not None and rotated_at is not None and now - rotated_at <= self._refresh_grace:
                return self._tokens(user, successor, expires_at=live.expires_at)
            RefreshToken.update(revoked_at=now).where(
                (RefreshToken.family == row.family) & RefreshToken.revoked_at.is_null()
            ).execute()
        log.warning("refresh token reuse detected; token family revoked", extra={"user_id": row.user_id})
        raise Unauthenticated("INVALID_REFRESH_TOKEN", INVALID_REFRESH)

    def logout(self, principal: Principal, refresh_token: str) -> None:
        check_token(refresh_token, "refresh_token", MAX_TOKEN_LENGTH)
        now = self._clock.now()
        with write_transaction(self._db):
            row = RefreshToken.get_or_none(
                (RefreshToken.token_hash == token_digest(refresh_token))
                & (RefreshToken.user == principal.user_id)
            )
            # Idempotent, and silent about tokens that are not the caller's.
            if row is not None:
                RefreshToken.update(revoked_at=now).where(
                    (RefreshToken.family == row.family) & RefreshToken.revoked_at.is_null()
                ).execute()

    def authenticate(self, access_token: str) -> Principal:
        """Check an access token, including that the user exists and the token predates no password change."""
        claims = self._access.decode(access_token)
        # Every authenticated RPC runs this read, except those whose policy folds it into their own.
        row = run_sql(self._db, self._token_version_sql, (claims.user_id,)).fetchone()
        require_token_version(None if row is None else row[0], claims.token_version)
        return Principal(user_id=claims.user_id)

    def signed(self, access_token: str) -> SignedPrincipal:
        """Check an access token's signature, claims and times, not its version: for an RPC whose own
        first read compares the version with the user's row (`require_token_version`)."""
        claims = self._access.decode(access_token)
        return SignedPrincipal(user_id=claims.user_id, token_version=claims.token_version)

    # --- passwords -----------------------------------------------------------------------

    def change_password(self, principal: Principal, current_password: str, new_password: str) -> IssuedTokens:
        check_password_input(current_password, "current_password")
        check_password(new_password, "new_password")
        user = User.get_or_none(User.id == principal.user_id)
        if user is None:
            raise invalid_token()
        # A stolen access token must not become a password-guessing oracle: same counter as Login.
        self._throttle.hit(self._limits.login, user.email_key)
        if not self._hasher.verify(current_password, user.password_hash):
            raise InvalidArgument.for_field(
                "current_password", "does not match the current password", "WRONG_PASSWORD"
            )
        self._throttle.clear(self._limits.login, user.email_key)
        new_hash = self._hasher.hash(new_password)
        now = self._clock.now()
        with write_transaction(self._db):
            updated = (
                User.update(password_hash=new_hash, token_version=User.token_version + 1)
                # Guards against a concurrent change: only the version we checked may be replaced.
                .where((User.id == user.id) & (User.token_version == user.token_version))
                .execute()
            )
            if updated != 1:
                raise FailedPrecondition("CONCURRENT_UPDATE", "the password was changed concurrently; retry")
            self._revoke_sessions(user.id, now)
            outbox_id = self._outbox.queue_email("password_changed", user.email, {}, now)
            refresh = self._new_refresh_token(user.id, uuid.uuid4().hex, now)
            # Last in the transaction (the audit row, then the event: every transaction takes the two
            # global locks in this order), so they are held only until the commit that follows.
            audit.append(self._db, now, "password.change", f"user:{user.id}", actor=f"user:{user.id}")
            changed = {"user_id": user.id, "via": "change"}
            append_events(self._db, [NewEvent(USER_PASSWORD_CHANGED, changed)], now)
        self._dispatcher.dispatch([outbox_id])
        return self._tokens(User.get_by_id(user.id), refresh)

    def request_password_reset(self, email: str) -> None:
        """Queue a reset email when the address has an account; the caller cannot tell which happened.

        Same answer, same throttle and the same minimum duration either way: an unknown email returns
        after one SELECT while a known one writes a token and an outbox row, so both are padded to
        RESET_REQUEST_MIN_SECONDS.
        """
        _, email_key = normalize_email(email)
        self._throttle.hit(self._limits.reset, email_key)
        started = self._clock.monotonic()
        try:
            self._issue_reset_token(email_key)
        finally:
            elapsed = self._clock.monotonic() - started
            if elapsed < self._reset_min_seconds:
                self._clock.sleep(self._reset_min_seconds - elapsed)
            elif self._reset_min_seconds > 0:
                log.warning(
                    "RequestPasswordReset took %.0f ms, over RESET_REQUEST_MIN_SECONDS: "
                    "its latency may tell registered emails apart",
                    elapsed * 1000,
                )

    def _issue_reset_token(self, email_key: str) -> None:
        now = self._clock.now()
        user = User.get_or_none(User.email_key == email_key)
        if user is None:
            return
        token = random_token()
        with write_transaction(self._db):
            if is_postgres(self._db):
                # Serialises concurrent requests for one account, so exactly one link stays live.
                User.select(User.id).where(User.id == user.id).for_update().execute()
            # Only the newest link works: the ones it replaces die unused (marked used, never usable).
            PasswordResetToken.update(used_at=now).where(
                (PasswordResetToken.user == user.id) & PasswordResetToken.used_at.is_null()
            ).execute()
            PasswordResetToken.create(
                user=user.id,
                token_hash=token_digest(token),
                created_at=now,
                expires_at=now + timedelta(seconds=self._reset_ttl),
            )
            outbox_id = self._outbox.queue_email(
                "password_reset",
                user.email,
                {"token": token, "expires_minutes": self._reset_ttl // 60},
                now,
            )
        self._dispatcher.dispatch([outbox_id])

    def reset_password(self, token: str, new_password: str) -> None:
        check_token(token, "token", MAX_TOKEN_LENGTH)
        check_password(new_password, "new_password")
        invalid = InvalidArgument.for_field(
            "token", "is invalid, expired or already used", "RESET_TOKEN_INVALID"
        )
        now = self._clock.now()
        row = PasswordResetToken.get_or_none(PasswordResetToken.token_hash == token_digest(token))
        if row is None or row.used_at is not None or row.expires_at <= now:
            raise invalid
        new_hash = self._hasher.hash(new_password)
        with write_transaction(self._db):
            # Single use even under concurrency: only one confirm can flip used_at.
            consumed = (
                PasswordResetToken.update(used_at=now)
                .where((PasswordResetToken.id == row.id) & PasswordResetToken.used_at.is_null())
                .execute()
            )
            if consumed != 1:
                raise invalid
            # Any other outstanding reset link dies with this one.
            PasswordResetToken.update(used_at=now).where(
                (PasswordResetToken.user == row.user_id) & PasswordResetToken.used_at.is_null()
            ).execute()
            User.update(password_hash=new_hash, token_version=User.token_version + 1).where(
                User.id == row.user_id
            ).execute()
            self._revoke_sessions(row.user_id, now)
            user = User.get_by_id(row.user_id)
            outbox_id = self._outbox.queue_email("password_changed", user.email, {}, now)
            # The holder of the emailed link acts as the account's owner.
            audit.append(self._db, now, "password.reset", f"user:{user.id}", actor=f"user:{user.id}")
            changed = {"user_id": user.id, "via": "reset"}
            append_events(self._db, [NewEvent(USER_PASSWORD_CHANGED, changed)], now)
        # Proof of the mailbox ends a lockout: the owner can sign in with the new password at once.
        self._throttle.clear(self._limits.login, user.email_key)
        self._dispatcher.dispatch([outbox_id])

    # --- helpers -------------------------------------------------------------------------

    def _judge_referral(
        self, newcomer: User, referrer: User, client: ClientInfo | None, now: datetime
    ) -> str:
        """The fraud decision on a new referral, stored on it and audited; the newcomer is told nothing.

        Returns the first enforced reason of a rejection, or "" when the referral was not rejected.
        """
        if is_postgres(self._db):
            # One referrer's signups are judged one at a time, so the velocity counts are exact.
            self._db.execute_sql(  # type: ignore[no-untyped-call]
                "SELECT pg_advisory_xact_lock(%s, %s)", (_REFERRER_LOCK_SPACE, referrer.id % 2**31)
            )
        rules, version = current_fraud_rules()
        decision = self._fraud.evaluate(
            newcomer.email, newcomer.email_status, referrer, client, rules, version, now
        )
        Referral.create(
            referee=newcomer.id,
            referrer=referrer.id,
            state=REJECTED if decision.decision == REJECT else PENDING,
            created_at=now,
            **stored_fields(decision),
        )
        audit.append(
            self._db,
            now,
            "fraud.decide",
            f"user:{newcomer.id}",
            actor=audit.SYSTEM,
            after={
                "decision": decision.decision,
                "reasons": [r.code for r in decision.reasons if r.enforced],
                "shadow": [r.code for r in decision.reasons if not r.enforced],
                "rules_version": version,
                "partial": decision.partial,
            },
        )
        if decision.decision != REJECT:
            return ""
        return next((r.code for r in decision.reasons if r.enforced), "rejected")

    def _usable_code(self, code: str, now: datetime, lock: bool = False) -> ReferralCode:
        query = ReferralCode.select().where(ReferralCode.code == code)
        if lock and is_postgres(self._db):
            # peewee passes a string through as the locking clause; its stubs only know bool.
            query = query.for_update("FOR SHARE")  # type: ignore[arg-type]
        row: ReferralCode | None = query.first()
        # A blocked owner's code is unknown, as if it did not exist.
        if row is None or User.select(User.blocked_at).where(User.id == row.user_id).scalar() is not None:
            raise InvalidArgument.for_field(
                "referral_code", "is not a valid referral code", "REFERRAL_CODE_UNKNOWN"
            )
        if not row.is_active or row.expires_at <= now:
            raise FailedPrecondition(
                "REFERRAL_CODE_EXPIRED", "this referral code has expired or was withdrawn"
            )
        return row

    def _new_refresh_token(self, user_id: int, family: str, now: datetime) -> str:
        token = random_token()
        self._store_refresh_token(user_id, family, token, now)
        return token

    def _store_refresh_token(self, user_id: int, family: str, token: str, now: datetime) -> None:
        RefreshToken.create(
            user=user_id,
            family=family,
            token_hash=token_digest(token),
            created_at=now,
            expires_at=now + timedelta(seconds=self._refresh_ttl),
        )

    def _live_family(self, user: User | None, token: str) -> str | None:
        """The family of `token` if it is a refresh token of `user` that could still be exchanged.

        Looked up whether or not the email has an account: the same query either way.
        """
        row = RefreshToken.get_or_none(RefreshToken.token_hash == token_digest(token))
        if row is None or user is None or row.user_id != user.id:
            return None
        if row.revoked_at or row.rotated_at or row.expires_at <= self._clock.now():
            return None
        return str(row.family)

    def _revoke_sessions(self, user_id: int, now: datetime) -> None:
        RefreshToken.update(revoked_at=now).where(
            (RefreshToken.user == user_id) & RefreshToken.revoked_at.is_null()
        ).execute()

    def _tokens(self, user: User, refresh_token: str, expires_at: datetime | None = None) -> IssuedTokens:
        """The pair to return; `expires_at` is the refresh token's, when it was not issued just now."""
        refresh_expires_in = (
            self._refresh_ttl if expires_at is None else int((expires_at - self._clock.now()).total_seconds())
        )
        return IssuedTokens(
            user_id=user.id,
            access_token=self._access.issue(user.id, user.token_version),
            expires_in=self._access.ttl_seconds,
            refresh_token=refresh_token,
            refresh_expires_in=refresh_expires_in,
        )
