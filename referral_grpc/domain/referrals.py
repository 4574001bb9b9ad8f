"""Referral codes (create, rotate, delete, public lookup) and the list of a user's referrals."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import peewee as pw

from ..store.database import (
    EVENTS_CHANNEL,
    is_postgres,
    lock_not_available,
    run_sql,
    single_statement_write,
    stored_time,
    write_transaction,
)
from ..store.models import Referral, ReferralCode, User
from .auth import token_version_sql
from .codes import generate_code
from .errors import InvalidArgument, NotFound
from .events import (
    CODE_CREATED,
    CODE_DELETED,
    NOTIFY_APPENDED,
    NewEvent,
    append_events,
    append_values,
    appending_ctes,
    timestamp,
)
from .ports import CachedCode, Clock, CodeCache
from .tokens import PageTokens, require_token_version
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


class ReferralView(NamedTuple):
    """One row of a list page: a NamedTuple, built several times cheaper than a frozen dataclass,
    and a page builds up to a hundred."""

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


class _Statements:
    """The hot paths' SQL, written once per database: building a peewee query cost more Python per call
    (~300 us) than the indexed read it runs. Table and column names come from the models."""

    # Only identifiers from the models and the driver's placeholder go into the text (S608): every
    # value is a bound parameter.
    def __init__(self, db: pw.Database) -> None:
        p = db.param
        users, codes = User._meta.table_name, ReferralCode._meta.table_name
        referrals = Referral._meta.table_name
        # The lookup: one read through the unique email_key index and the one-active-code index.
        self.code_by_email = (
            f'SELECT c.code, c.expires_at, u.email_verified_at FROM "{codes}" c'  # noqa: S608
            f' JOIN "{users}" u ON u.id = c.user_id'
            # A blocked owner's code is a miss like any other.
            f" WHERE u.email_key = {p} AND u.blocked_at IS NULL"
            f" AND c.is_active AND c.expires_at > {p} LIMIT 1"
        )
        # Keyset pagination on the (referrer_id, created_at, id) index: no OFFSET, no COUNT, so a
        # page deep in a million rows costs what the first one does.
        # The referral's state row exists once an event concerned it (none yet: pending).
        # The page comes with its owner's token_version (the caller's access token is checked in the
        # same round trip): no owner, no row; an owner without referrals, one row of NULLs after it.
        page = (
            f'SELECT u.id, u.email, u.created_at, r.state, r.qualified_at FROM "{users}" u'  # noqa: S608
            f' LEFT JOIN "{referrals}" r ON r.referee_id = u.id WHERE u.referrer_id = {p}'
        )
        order = " ORDER BY u.created_at DESC, u.id DESC"
        with_owner = (
            f'SELECT o.token_version, p.* FROM (SELECT token_version FROM "{users}" WHERE id = {p}) o'  # noqa: S608
            " LEFT JOIN ({}) p ON TRUE ORDER BY p.created_at DESC, p.id DESC"
        )
        self.first_page = with_owner.format(page + order + f" LIMIT {p}")
        self.next_page = with_owner.format(
            page + f" AND (u.created_at, u.id) < ({p}, {p})" + order + f" LIMIT {p}"
        )
        self.token_version = token_version_sql(db)
        # Serialises code changes per user (SQLite's write lock already does).
        lock = " FOR UPDATE" if is_postgres(db) else ""
        self.lock_user = f'SELECT email_key FROM "{users}" WHERE id = {p}{lock}'  # noqa: S608
        self.deactivate = (
            f'UPDATE "{codes}" SET is_active = {p}, deactivated_at = {p}'  # noqa: S608
            f" WHERE user_id = {p} AND is_active"
        )
        self.insert_code = (
            f'INSERT INTO "{codes}" (user_id, code, created_at, expires_at, is_active)'  # noqa: S608
            f" VALUES ({p}, {p}, {p}, {p}, {p})"
        )
        # On PostgreSQL the two are one statement (one round trip fewer), the same parameters in
        # the same order. The INSERT reads the UPDATE's count, so the old code is deactivated
        # before the new one meets the one-active-code index (a row this transaction updated no
        # longer counts there).
        self.rotate: str | None = None
        if is_postgres(db):
            self.rotate = (
                f'WITH old AS (UPDATE "{codes}" SET is_active = {p}, deactivated_at = {p}'  # noqa: S608
                f" WHERE user_id = {p} AND is_active RETURNING 1)"
                f' INSERT INTO "{codes}" (user_id, code, created_at, expires_at, is_active)'
                f" SELECT {p}, {p}, {p}, {p}, {p} WHERE (SELECT count(*) FROM old) >= 0"
            )
        # PostgreSQL, and the whole of a CreateReferralCode in one statement (ReferralService.
        # _create_at_once): each CTE runs when the next one reads it, so the user's row is locked
        # first (NOWAIT: the statement fails at once if another change holds it), then the old code
        # deactivated, the new one inserted, and only then the event log's lock taken and the event
        # appended (events.appending_ctes). A gone user: no row, nothing done.
        self.create_at_once: str | None = None
        if is_postgres(db):
            self.create_at_once = (
                f'WITH owner AS (SELECT id, email_key FROM "{users}" WHERE id = {p} FOR UPDATE NOWAIT),'  # noqa: S608
                f' old AS (UPDATE "{codes}" SET is_active = FALSE, deactivated_at = {p}'
                " WHERE user_id = (SELECT id FROM owner) AND is_active RETURNING 1),"
                f' created AS (INSERT INTO "{codes}" (user_id, code, created_at, expires_at, is_active)'
                f" SELECT owner.id, {p}, {p}, {p}, TRUE FROM owner WHERE (SELECT count(*) FROM old) >= 0"
                f" RETURNING 1), {appending_ctes(after='created')}"
                f" SELECT owner.email_key, ({NOTIFY_APPENDED}) FROM owner"
            )


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
        self._sql = _Statements(db)

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
        created = stored_time(now)
        done = self._create_at_once(user_id, created, expires_at, now)
        code, email_key = done or self._create_in_transaction(user_id, created, expires_at, now)
        self._cache.invalidate(email_key)
        return CodeView(code=code, expires_at=expires_at.astimezone(UTC), created_at=now.astimezone(UTC))

    def delete_code(self, user_id: int) -> None:
        now = self._clock.now()
        with write_transaction(self._db):
            email_key = self._lock_user(user_id)
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
        self._cache.invalidate(email_key)
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
        row = run_sql(self._db, self._sql.code_by_email, (email_key, stored_time(now))).fetchone()
        if row is None:
            raise NotFound("REFERRAL_CODE_NOT_FOUND", NO_CODE_MESSAGE)
        code, expires_at, owner_verified_at = row
        value = CachedCode(
            code=code, expires_at=_instant(expires_at), owner_verified=owner_verified_at is not None
        )
        if self._hidden(value):
            # Not cached either: this answer costs what a miss costs, so its speed cannot tell them apart.
            raise NotFound("REFERRAL_CODE_NOT_FOUND", NO_CODE_MESSAGE)
        self._cache.fill(email_key, cached.generation, value, now)
        return value

    def _hidden(self, value: CachedCode) -> bool:
        """Whether verification is required and the code's owner has not verified: then it is a miss."""
        return self._verification_required and not value.owner_verified

    def list_referrals(
        self, user_id: int, token_version: int, page_size: int, page_token: str
    ) -> ReferralPage:
        """A page of the user's referrals, newest first, for an access token of `token_version`: the
        token is refused (UNAUTHENTICATED) unless that is still the user's, as every RPC refuses it."""
        try:
            if page_size < 0:
                raise InvalidArgument.for_field("page_size", "must not be negative", "PAGE_SIZE_NEGATIVE")
            check_length(page_token, "page_token", MAX_PAGE_TOKEN_LENGTH)
            after = self._pages.decode(page_token, user_id) if page_token else None
        except InvalidArgument:
            # A token no longer valid is told so before anything about the request.
            row = run_sql(self._db, self._sql.token_version, (user_id,)).fetchone()
            require_token_version(None if row is None else row[0], token_version)
            raise
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        if after is None:
            cursor = run_sql(self._db, self._sql.first_page, (user_id, user_id, size + 1))
        else:
            after_time, after_id = after
            params = (user_id, user_id, stored_time(after_time), after_id, size + 1)
            cursor = run_sql(self._db, self._sql.next_page, params)
        found = cursor.fetchall()
        require_token_version(found[0][0] if found else None, token_version)
        rows = [
            ReferralView(
                row_id,
                email,
                _instant(created_at),
                state or "pending",
                None if qualified_at is None else _instant(qualified_at),
            )
            for _version, row_id, email, created_at, state, qualified_at in found
            if row_id is not None
        ]
        next_token = ""
        if len(rows) > size:
            rows = rows[:size]
            last = rows[-1]
            next_token = self._pages.encode(user_id, last.registered_at, last.user_id)
        return ReferralPage(referrals=rows, next_page_token=next_token)

    def _create_at_once(
        self, user_id: int, created: datetime, expires_at: datetime, now: datetime
    ) -> tuple[str, str] | None:
        """PostgreSQL: the whole rotation (lock, rotate, event) as one statement, its own transaction.

        (The new code, the user's email key) when it is done; None when it must be done in a
        transaction instead: a deadline tighter than the statement cap, the user's row locked by
        another change (the statement does not wait for it: a call whose client went away meanwhile
        must not commit, which write_transaction checks before its COMMIT), or the new code refused
        by a unique index (a collision, 1 in ~1e14, or a concurrent create that committed after this
        statement's snapshot, whose code that snapshot still sees as not there).
        """
        if self._sql.create_at_once is None or not single_statement_write(self._db):
            return None
        code = generate_code()
        event = _code_created(user_id, code, expires_at)
        values = (user_id, created, code, created, stored_time(expires_at))
        try:
            row = run_sql(
                self._db, self._sql.create_at_once, (*values, *append_values([event], now), EVENTS_CHANNEL)
            ).fetchone()
        except pw.IntegrityError:
            return None
        except pw.OperationalError as failed:
            if lock_not_available(failed):
                return None
            raise
        if row is None:
            raise NotFound("USER_NOT_FOUND", "the account no longer exists")
        return code, str(row[0])

    def _create_in_transaction(
        self, user_id: int, created: datetime, expires_at: datetime, now: datetime
    ) -> tuple[str, str]:
        """The rotation as a transaction of statements (SQLite; on PostgreSQL when _create_at_once
        cannot): (the new code, the user's email key)."""
        for _attempt in range(5):
            code = generate_code()
            try:
                with write_transaction(self._db):
                    email_key = self._lock_user(user_id)
                    # Rotation: the old code goes in the same transaction the new one arrives in.
                    deactivate = (False, created, user_id)
                    insert = (user_id, code, created, stored_time(expires_at), True)
                    if self._sql.rotate is not None:
                        run_sql(self._db, self._sql.rotate, deactivate + insert)
                    else:
                        run_sql(self._db, self._sql.deactivate, deactivate)
                        run_sql(self._db, self._sql.insert_code, insert)
                    append_events(self._db, [_code_created(user_id, code, expires_at)], now)
                return code, email_key
            except pw.IntegrityError:
                # A code collision (1 in ~1e14) or a concurrent create that slipped past the
                # lock on SQLite: the partial unique index refused it, so try again.
                continue
        raise RuntimeError("could not create a referral code after 5 attempts")

    def _lock_user(self, user_id: int) -> str:
        """Serialise code changes per user; the user's email key (for the cache), NotFound if gone."""
        row = run_sql(self._db, self._sql.lock_user, (user_id,)).fetchone()
        if row is None:
            raise NotFound("USER_NOT_FOUND", "the account no longer exists")
        return str(row[0])


def _code_created(user_id: int, code: str, expires_at: datetime) -> NewEvent:
    return NewEvent(CODE_CREATED, {"user_id": user_id, "code": code, "expires_at": timestamp(expires_at)})


def _instant(value: Any) -> datetime:
    """A stored (non-null) time back as an aware UTC datetime, as UTCDateTimeField reads it."""
    parsed = ReferralCode.expires_at.python_value(value)
    assert parsed is not None
    return parsed
