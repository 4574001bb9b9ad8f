"""Peewee models: the tables of the service, bound late to the database through `database`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import peewee as pw

# Bound by referral_grpc.store.database.init_database(); models never know which database they live in.
database = pw.DatabaseProxy()


class UTCDateTimeField(pw.Field):
    """A timezone-aware UTC timestamp: TIMESTAMPTZ on PostgreSQL, sortable ISO-8601 text on SQLite."""

    field_type = "TIMESTAMPTZ"

    def db_value(self, value: datetime | None) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored: pass a timezone-aware UTC datetime")
        value = value.astimezone(UTC)
        if isinstance(self.model._meta.database.obj, pw.SqliteDatabase):
            # Fixed width, so text order is time order.
            return value.strftime("%Y-%m-%d %H:%M:%S.%f+00:00")
        return value

    def python_value(self, value: Any) -> datetime | None:
        if value is None:
            return None
        parsed: datetime = datetime.fromisoformat(value) if isinstance(value, str) else value
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)


class NeverReusedIdField(pw.BigAutoField):
    """BIGSERIAL on PostgreSQL, which never hands out an id twice; on SQLite, INTEGER PRIMARY KEY
    AUTOINCREMENT, because a plain INTEGER PRIMARY KEY gives a deleted last row's id to the next
    insert - and a deleted user's still-valid access token would then name the next user."""

    def ddl(self, ctx: Any) -> Any:
        node = super().ddl(ctx)
        db = self.model._meta.database
        if isinstance(getattr(db, "obj", db), pw.SqliteDatabase):
            return pw.NodeList((node, pw.SQL("AUTOINCREMENT")))
        return node


class BaseModel(pw.Model):
    class Meta:
        database = database
        legacy_table_names = False


class User(BaseModel):
    id = NeverReusedIdField()
    # The address as the user typed it, normalised by email-validator.
    email = pw.CharField(max_length=254)
    # Lower-cased `email`: the UNIQUE constraint on it makes emails unique case-insensitively.
    email_key = pw.CharField(max_length=254, unique=True)
    password_hash = pw.CharField(max_length=128)
    # Bumped on every password change or reset; access tokens carry it, so older ones stop working.
    token_version = pw.IntegerField(default=0)
    referrer = pw.ForeignKeyField("self", null=True, on_delete="SET NULL", backref="referrals", index=False)
    referrer_id: int | None  # peewee's accessor for the raw column, declared for type checkers
    created_at = UTCDateTimeField()
    # Hunter's verdict on the address ("unchecked" when verification is off).
    email_status = pw.CharField(max_length=20, default="unchecked")
    email_checked_at = UTCDateTimeField(null=True)
    # Set when Hunter could not answer at signup: the address is checked again later.
    email_recheck = pw.BooleanField(default=False)
    # When the owner proved they receive mail at `email` (VerifyEmail); NULL until then.
    email_verified_at = UTCDateTimeField(null=True)
    # When this account started counting as a referral of `referrer` for the referrer's rewards: at
    # signup with EMAIL_VERIFICATION=optional; with `required`, once both addresses are verified.
    # NULL while it does not count (or there is no referrer). The rewards feature reads this.
    referral_qualified_at = UTCDateTimeField(null=True)
    # Set while an administrator blocks the account: no login, no refresh, no code, no rewards.
    blocked_at = UTCDateTimeField(null=True)

    class Meta:
        table_name = "users"
        indexes = (
            # Keyset pagination of ListReferrals: newest first, constant cost per page.
            (("referrer", "created_at", "id"), False),
        )


class ReferralCode(BaseModel):
    id = pw.BigAutoField()
    user = pw.ForeignKeyField(User, on_delete="CASCADE", backref="codes", index=False)
    user_id: int
    # Stored upper-case; input is upper-cased before comparison.
    code = pw.CharField(max_length=16, unique=True)
    created_at = UTCDateTimeField()
    expires_at = UTCDateTimeField()
    is_active = pw.BooleanField(default=True)
    deactivated_at = UTCDateTimeField(null=True)

    class Meta:
        table_name = "referral_codes"


# "At most one active code per user" is the database's job: a partial unique index holds
# under concurrency where check-then-insert does not. Both PostgreSQL and SQLite support it.
ReferralCode.add_index(
    ReferralCode.index(ReferralCode.user, unique=True, name="referral_codes_one_active_per_user").where(
        ReferralCode.is_active == True  # noqa: E712
    )
)
ReferralCode.add_index(ReferralCode.index(ReferralCode.user, ReferralCode.created_at))


class PasswordResetToken(BaseModel):
    id = pw.BigAutoField()
    user = pw.ForeignKeyField(User, on_delete="CASCADE", backref="reset_tokens")
    user_id: int
    # SHA-256 of the token: the token itself is only ever in the email.
    token_hash = pw.CharField(max_length=64, unique=True)
    created_at = UTCDateTimeField()
    expires_at = UTCDateTimeField()
    used_at = UTCDateTimeField(null=True)

    class Meta:
        table_name = "password_reset_tokens"


class EmailVerificationToken(BaseModel):
    id = pw.BigAutoField()
    user = pw.ForeignKeyField(User, on_delete="CASCADE", backref="verification_tokens")
    user_id: int
    # SHA-256 of the token: the token itself is only ever in the email.
    token_hash = pw.CharField(max_length=64, unique=True)
    created_at = UTCDateTimeField()
    expires_at = UTCDateTimeField()
    # Set when the token is used, and when a newer token replaces it: only the newest one works.
    used_at = UTCDateTimeField(null=True)

    class Meta:
        table_name = "email_verification_tokens"


class RefreshToken(BaseModel):
    id = pw.BigAutoField()
    user = pw.ForeignKeyField(User, on_delete="CASCADE", backref="refresh_tokens")
    user_id: int
    # Every rotation stays in its family; reuse of a rotated token revokes the family.
    family = pw.CharField(max_length=32, index=True)
    token_hash = pw.CharField(max_length=64, unique=True)
    created_at = UTCDateTimeField()
    expires_at = UTCDateTimeField()
    rotated_at = UTCDateTimeField(null=True)
    revoked_at = UTCDateTimeField(null=True)

    class Meta:
        table_name = "refresh_tokens"


class EmailOutbox(BaseModel):
    """Emails to send, written in the same transaction as the change that causes them."""

    id = pw.BigAutoField()
    kind = pw.CharField(max_length=32)
    recipient = pw.CharField(max_length=254)
    # JSON template context. Secrets in it (a reset token) are scrubbed once the email is sent.
    payload = pw.TextField()
    status = pw.CharField(max_length=16, default="pending")
    attempts = pw.IntegerField(default=0)
    created_at = UTCDateTimeField()
    enqueued_at = UTCDateTimeField(null=True)
    sent_at = UTCDateTimeField(null=True)
    last_error = pw.TextField(null=True)

    class Meta:
        table_name = "email_outbox"
        indexes = ((("status", "created_at"), False),)


class ApiKey(BaseModel):
    """A backend's credential: only the SHA-256 of the key is kept, and a prefix to recognise it by."""

    id = pw.BigAutoField()
    name = pw.CharField(max_length=64, unique=True)
    # The key's first characters, shown by `apikey list` so an operator can tell keys apart.
    prefix = pw.CharField(max_length=16)
    # Keys carry 256 random bits: a fast hash is enough, no password hashing needed.
    key_hash = pw.CharField(max_length=64, unique=True)
    # Space-separated scope names.
    scopes = pw.TextField()
    created_at = UTCDateTimeField()
    last_used_at = UTCDateTimeField(null=True)
    revoked_at = UTCDateTimeField(null=True)

    class Meta:
        table_name = "api_keys"


class Program(BaseModel):
    """One version of the referral program's rules; `program set` appends a row, the newest is in force."""

    id = pw.BigAutoField()  # the version
    created_at = UTCDateTimeField()
    # Comma-separated event types that qualify.
    event_types = pw.TextField()
    currency = pw.CharField(max_length=3)
    min_amount_minor = pw.BigIntegerField()
    attribution_days = pw.IntegerField()
    # Each reward is either a fixed amount or basis points of the event amount, capped (0 = no cap).
    referrer_reward_minor = pw.BigIntegerField()
    referrer_reward_bps = pw.IntegerField()
    referrer_reward_cap_minor = pw.BigIntegerField()
    referee_reward_minor = pw.BigIntegerField()
    referee_reward_bps = pw.IntegerField()
    referee_reward_cap_minor = pw.BigIntegerField()
    hold_days = pw.IntegerField()
    max_rewarded_referrals = pw.IntegerField()
    # JSON of the fraud rules' modes and thresholds; "" keeps the defaults.
    fraud_rules = pw.TextField(default="")

    class Meta:
        table_name = "programs"


class RewardEvent(BaseModel):
    """An event a backend recorded, once per event_id: the unique constraint decides between retries."""

    id = pw.BigAutoField()
    event_id = pw.CharField(max_length=128, unique=True)
    # SHA-256 of the event's canonical content: a retry must carry the same content.
    content_hash = pw.CharField(max_length=64)
    user = pw.ForeignKeyField(User, on_delete="CASCADE", backref="reward_events")
    user_id: int
    type = pw.CharField(max_length=64)
    amount_minor = pw.BigIntegerField()
    currency = pw.CharField(max_length=3)
    occurred_at = UTCDateTimeField()
    refunds_event = pw.ForeignKeyField("self", null=True, on_delete="RESTRICT", backref="refunds")
    refunds_event_id: int | None
    # The first result as JSON (referral state and skipped rewards), returned again to duplicates.
    outcome = pw.TextField()
    recorded_at = UTCDateTimeField()

    class Meta:
        table_name = "reward_events"


# The values of Referral.state.
PENDING, QUALIFIED, REVERSED, REJECTED = "pending", "qualified", "reversed", "rejected"


class Referral(BaseModel):
    """Where a newcomer's referral stands; written when an event first concerns it (no row = pending)."""

    referee = pw.ForeignKeyField(User, primary_key=True, on_delete="CASCADE", backref="referral")
    referee_id: int
    referrer = pw.ForeignKeyField(User, on_delete="CASCADE", backref="referred")
    referrer_id: int
    state = pw.CharField(max_length=16, default=PENDING)
    # The program version the referral was judged under, and the event that qualified it.
    program = pw.ForeignKeyField(Program, null=True, on_delete="RESTRICT")
    program_id: int | None
    qualifying_event = pw.ForeignKeyField(RewardEvent, null=True, on_delete="RESTRICT")
    qualifying_event_id: int | None
    # Whether qualifying credited anything: the program's cap counts rewarded referrals.
    rewarded = pw.BooleanField(default=False)
    qualified_at = UTCDateTimeField(null=True)
    reversed_at = UTCDateTimeField(null=True)
    created_at = UTCDateTimeField()
    # The fraud decision made at signup: allow, review or reject; NULL for referrals made before it existed.
    fraud_decision = pw.CharField(max_length=8, null=True)
    # JSON: [{"code", "message", "enforced"}], and the signal values the rules saw.
    fraud_reasons = pw.TextField(null=True)
    fraud_signals = pw.TextField(null=True)
    # The program version whose fraud rules decided (0: the defaults, no program set).
    fraud_rules_version = pw.BigIntegerField(null=True)
    # Some signal could not be checked (the email verifier was down): decided on the rest.
    fraud_partial = pw.BooleanField(default=False)
    # An administrator's decision on a referral held for review: approved or rejected.
    review_outcome = pw.CharField(max_length=8, null=True)
    review_note = pw.TextField(null=True)
    reviewed_at = UTCDateTimeField(null=True)

    class Meta:
        table_name = "referrals"
        indexes = (
            (("referrer", "state"), False),
            # The review queue, oldest first.
            (("fraud_decision", "reviewed_at", "created_at"), False),
        )


class LedgerEntry(BaseModel):
    """Append-only money movements in integer minor units; a PostgreSQL trigger refuses UPDATE and DELETE."""

    id = pw.BigAutoField()
    user = pw.ForeignKeyField(User, on_delete="RESTRICT", backref="ledger")
    user_id: int
    kind = pw.CharField(max_length=24)
    amount_minor = pw.BigIntegerField()
    currency = pw.CharField(max_length=3)
    referral_user = pw.ForeignKeyField(User, null=True, on_delete="RESTRICT", index=False)
    referral_user_id: int | None
    event = pw.ForeignKeyField(RewardEvent, null=True, on_delete="RESTRICT")
    event_id: int | None
    # The reward a reversal undoes: unique, so a reward is reversed at most once.
    reverses = pw.ForeignKeyField("self", null=True, unique=True, on_delete="RESTRICT")
    reverses_id: int | None
    # Pending before this moment, available from it: time alone moves money, no job needed.
    available_at = UTCDateTimeField()
    created_at = UTCDateTimeField()

    class Meta:
        table_name = "ledger_entries"
        indexes = ((("user", "currency", "available_at"), False),)


REWARD_KINDS = ("referrer_reward", "referee_reward")
# One reward per referral and beneficiary, whatever the races: the database decides.
LedgerEntry.add_index(
    LedgerEntry.index(
        LedgerEntry.referral_user,
        LedgerEntry.kind,
        unique=True,
        name="ledger_entries_one_reward_per_referral",
    ).where(LedgerEntry.kind.in_(REWARD_KINDS))
)


class IdempotencyRecord(BaseModel):
    """The first response to a call with an Idempotency-Key, per caller and key, until it expires."""

    id = pw.BigAutoField()
    caller = pw.CharField(max_length=64)
    key = pw.CharField(max_length=255)
    method = pw.CharField(max_length=128)
    # SHA-256 of the method and the request: the same key with another request is refused.
    fingerprint = pw.CharField(max_length=64)
    # The serialized response; NULL while the first call still runs.
    response = pw.BlobField(null=True)
    created_at = UTCDateTimeField()
    expires_at = UTCDateTimeField()

    class Meta:
        table_name = "idempotency_records"
        indexes = ((("caller", "key"), True),)


class ClientSignal(BaseModel):
    """Where a user registered or logged in from, as keyed hashes (never raw), kept until `expires_at`."""

    id = pw.BigAutoField()
    user = pw.ForeignKeyField(User, on_delete="CASCADE", backref="client_signals")
    user_id: int
    # "registration" or "login".
    kind = pw.CharField(max_length=16)
    # HMAC-SHA256 of the client address and of the x-device-id header, with a server key.
    address_hash = pw.CharField(max_length=64, null=True, index=True)
    device_hash = pw.CharField(max_length=64, null=True, index=True)
    created_at = UTCDateTimeField()
    expires_at = UTCDateTimeField(index=True)

    class Meta:
        table_name = "client_signals"


class AuditEvent(BaseModel):
    """One audited action, hash-chained to the one before; a PostgreSQL trigger refuses UPDATE and DELETE."""

    id = pw.BigAutoField()
    # 1, 2, 3... with no gap: appends are serialised, so a missing number is a deleted row.
    seq = pw.BigIntegerField(unique=True)
    created_at = UTCDateTimeField()
    # "key:<name>", "user:<id>", "operator" (the command line) or "system" (fraud decisions).
    actor = pw.CharField(max_length=128)
    action = pw.CharField(max_length=64)
    target = pw.CharField(max_length=128)
    # JSON of the values before and after the change, where the action has them.
    before = pw.TextField(null=True)
    after = pw.TextField(null=True)
    request_id = pw.CharField(max_length=128)
    # SHA-256 over the previous row's hash and this row's canonical content.
    prev_hash = pw.CharField(max_length=64)
    hash = pw.CharField(max_length=64)

    class Meta:
        table_name = "audit_events"
        indexes = (
            (("actor", "seq"), False),
            (("target", "seq"), False),
        )


class Event(BaseModel):
    """The event log: one row per state change, appended in the transaction of the change.

    `id` is the cursor: writers append in commit order (store.database.append_events), so a reader
    that has seen cursor N has seen every event that will ever have a smaller one.
    """

    id = pw.BigAutoField()
    # The public id ("evt_" and 32 hex digits); the webhook-id of every delivery of the event.
    event_id = pw.CharField(max_length=40, unique=True)
    # The dotted name, e.g. "referral.qualified".
    type = pw.CharField(max_length=48)
    occurred_at = UTCDateTimeField()
    # JSON of the type's payload message (referral.v1 event_service.proto), field names as in the proto.
    payload = pw.TextField()

    class Meta:
        table_name = "events"
        indexes = ((("type", "id"), False),)


class WebhookEndpoint(BaseModel):
    """A receiver of signed event deliveries, managed by backends with the webhooks:manage scope."""

    id = pw.BigAutoField()
    url = pw.TextField()
    # Space-separated dotted event types; empty: every type.
    event_types = pw.TextField()
    description = pw.CharField(max_length=256)
    # "whsec_" + base64 of 32 random bytes: needed in clear to sign, so stored as is.
    secret = pw.CharField(max_length=64)
    # The secret before the last rotation; it signs too until previous_secret_expires_at.
    previous_secret = pw.CharField(max_length=64, null=True)
    previous_secret_expires_at = UTCDateTimeField(null=True)
    # "enabled", or "disabled" after WEBHOOK_DISABLE_AFTER_FAILURES consecutive failures.
    status = pw.CharField(max_length=16, default="enabled")
    consecutive_failures = pw.IntegerField(default=0)
    last_success_at = UTCDateTimeField(null=True)
    created_at = UTCDateTimeField()

    class Meta:
        table_name = "webhook_endpoints"


class WebhookDelivery(BaseModel):
    """One event for one endpoint: written with the event, pending until a 2xx answer (at least once)."""

    id = pw.BigAutoField()
    endpoint = pw.ForeignKeyField(WebhookEndpoint, on_delete="CASCADE", index=False)
    endpoint_id: int
    event = pw.ForeignKeyField(Event, on_delete="CASCADE")
    event_id: int
    # "pending" or "delivered".
    status = pw.CharField(max_length=16, default="pending")
    attempts = pw.IntegerField(default=0)
    # When the next attempt is due; moved ahead by a lease while an attempt runs.
    next_attempt_at = UTCDateTimeField()
    created_at = UTCDateTimeField()
    delivered_at = UTCDateTimeField(null=True)

    class Meta:
        table_name = "webhook_deliveries"
        indexes = (
            (("endpoint", "event"), True),
            (("status", "next_attempt_at"), False),
        )


class WebhookAttempt(BaseModel):
    """Every attempt of a delivery, kept for ListWebhookDeliveries."""

    id = pw.BigAutoField()
    delivery = pw.ForeignKeyField(WebhookDelivery, on_delete="CASCADE")
    delivery_id: int
    attempt = pw.IntegerField()
    # The HTTP status, or 0 when there was no answer (see error).
    http_status = pw.IntegerField()
    error = pw.TextField()
    latency_ms = pw.IntegerField()
    # The first 1 KiB of the receiver's answer.
    response_body = pw.TextField()
    attempted_at = UTCDateTimeField()

    class Meta:
        table_name = "webhook_attempts"


ALL_MODELS: tuple[type[BaseModel], ...] = (
    User,
    ReferralCode,
    PasswordResetToken,
    EmailVerificationToken,
    RefreshToken,
    EmailOutbox,
    ApiKey,
    Program,
    RewardEvent,
    Referral,
    LedgerEntry,
    IdempotencyRecord,
    ClientSignal,
    AuditEvent,
    Event,
    WebhookEndpoint,
    WebhookDelivery,
    WebhookAttempt,
)
