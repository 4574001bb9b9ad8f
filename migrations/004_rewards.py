"""Rewards: API keys, program versions, recorded events, referral states, the append-only ledger, idempotency.

On PostgreSQL a trigger refuses UPDATE and DELETE on ledger_entries: the ledger is append-only by
construction, not by convention.
"""

import peewee as pw


class TimestampTZ(pw.Field):
    field_type = "TIMESTAMPTZ"


# Run through psycopg2 with parameters: "%%" is a literal "%" (plpgsql's placeholder).
LEDGER_APPEND_ONLY = """
CREATE FUNCTION ledger_entries_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger_entries is append-only: %% refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only();
"""


def migrate(migrator, database, fake=False, **kwargs):
    class Base(pw.Model):
        class Meta:
            legacy_table_names = False

    class User(Base):
        id = pw.BigAutoField()

        class Meta:
            table_name = "users"

    @migrator.create_model
    class ApiKey(Base):
        id = pw.BigAutoField()
        name = pw.CharField(max_length=64, unique=True)
        prefix = pw.CharField(max_length=16)
        key_hash = pw.CharField(max_length=64, unique=True)
        scopes = pw.TextField()
        created_at = TimestampTZ()
        last_used_at = TimestampTZ(null=True)
        revoked_at = TimestampTZ(null=True)

        class Meta:
            table_name = "api_keys"

    @migrator.create_model
    class Program(Base):
        id = pw.BigAutoField()
        created_at = TimestampTZ()
        event_types = pw.TextField()
        currency = pw.CharField(max_length=3)
        min_amount_minor = pw.BigIntegerField()
        attribution_days = pw.IntegerField()
        referrer_reward_minor = pw.BigIntegerField()
        referrer_reward_bps = pw.IntegerField()
        referrer_reward_cap_minor = pw.BigIntegerField()
        referee_reward_minor = pw.BigIntegerField()
        referee_reward_bps = pw.IntegerField()
        referee_reward_cap_minor = pw.BigIntegerField()
        hold_days = pw.IntegerField()
        max_rewarded_referrals = pw.IntegerField()

        class Meta:
            table_name = "programs"

    @migrator.create_model
    class RewardEvent(Base):
        id = pw.BigAutoField()
        event_id = pw.CharField(max_length=128, unique=True)
        content_hash = pw.CharField(max_length=64)
        user = pw.ForeignKeyField(User, on_delete="CASCADE")
        type = pw.CharField(max_length=64)
        amount_minor = pw.BigIntegerField()
        currency = pw.CharField(max_length=3)
        occurred_at = TimestampTZ()
        refunds_event = pw.ForeignKeyField("self", null=True, on_delete="RESTRICT")
        outcome = pw.TextField()
        recorded_at = TimestampTZ()

        class Meta:
            table_name = "reward_events"

    @migrator.create_model
    class Referral(Base):
        referee = pw.ForeignKeyField(User, primary_key=True, on_delete="CASCADE")
        referrer = pw.ForeignKeyField(User, on_delete="CASCADE")
        state = pw.CharField(max_length=16, default="pending")
        program = pw.ForeignKeyField(Program, null=True, on_delete="RESTRICT")
        qualifying_event = pw.ForeignKeyField(RewardEvent, null=True, on_delete="RESTRICT")
        rewarded = pw.BooleanField(default=False)
        qualified_at = TimestampTZ(null=True)
        reversed_at = TimestampTZ(null=True)
        created_at = TimestampTZ()

        class Meta:
            table_name = "referrals"
            indexes = ((("referrer", "state"), False),)

    @migrator.create_model
    class LedgerEntry(Base):
        id = pw.BigAutoField()
        user = pw.ForeignKeyField(User, on_delete="RESTRICT")
        kind = pw.CharField(max_length=24)
        amount_minor = pw.BigIntegerField()
        currency = pw.CharField(max_length=3)
        referral_user = pw.ForeignKeyField(User, null=True, on_delete="RESTRICT", index=False)
        event = pw.ForeignKeyField(RewardEvent, null=True, on_delete="RESTRICT")
        reverses = pw.ForeignKeyField("self", null=True, unique=True, on_delete="RESTRICT")
        available_at = TimestampTZ()
        created_at = TimestampTZ()

        class Meta:
            table_name = "ledger_entries"
            indexes = ((("user", "currency", "available_at"), False),)

    # One reward per referral and beneficiary, whatever the races.
    LedgerEntry.add_index(
        LedgerEntry.index(
            LedgerEntry.referral_user,
            LedgerEntry.kind,
            unique=True,
            name="ledger_entries_one_reward_per_referral",
        ).where(LedgerEntry.kind.in_(("referrer_reward", "referee_reward")))
    )

    @migrator.create_model
    class IdempotencyRecord(Base):
        id = pw.BigAutoField()
        caller = pw.CharField(max_length=64)
        key = pw.CharField(max_length=255)
        method = pw.CharField(max_length=128)
        fingerprint = pw.CharField(max_length=64)
        response = pw.BlobField(null=True)
        created_at = TimestampTZ()
        expires_at = TimestampTZ()

        class Meta:
            table_name = "idempotency_records"
            indexes = ((("caller", "key"), True),)

    if isinstance(migrator.__database__, pw.PostgresqlDatabase):
        migrator.sql(LEDGER_APPEND_ONLY)


def rollback(migrator, database, fake=False, **kwargs):
    if isinstance(migrator.__database__, pw.PostgresqlDatabase):
        migrator.sql("DROP TRIGGER IF EXISTS ledger_entries_append_only ON ledger_entries")
        migrator.sql("DROP FUNCTION IF EXISTS ledger_entries_append_only()")
    for table in (
        "idempotency_records",
        "ledger_entries",
        "referrals",
        "reward_events",
        "programs",
        "api_keys",
    ):
        migrator.remove_model(table, cascade=True)
