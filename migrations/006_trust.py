"""Trust and safety: the hash-chained audit log, blocked accounts, fraud decisions, hashed client signals.

On PostgreSQL a trigger refuses UPDATE, DELETE and TRUNCATE on audit_events: no RPC or job can
rewrite history; only someone who can disable the trigger can, and `audit verify` then finds it.
"""

import peewee as pw


class TimestampTZ(pw.Field):
    field_type = "TIMESTAMPTZ"


# Run through psycopg2 with parameters: "%%" is a literal "%" (plpgsql's placeholder).
AUDIT_APPEND_ONLY = """
CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only: %% refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();
"""


def migrate(migrator, database, fake=False, **kwargs):
    class Base(pw.Model):
        class Meta:
            legacy_table_names = False

    @migrator.create_model
    class AuditEvent(Base):
        id = pw.BigAutoField()
        seq = pw.BigIntegerField(unique=True)
        created_at = TimestampTZ()
        actor = pw.CharField(max_length=128)
        action = pw.CharField(max_length=64)
        target = pw.CharField(max_length=128)
        before = pw.TextField(null=True)
        after = pw.TextField(null=True)
        request_id = pw.CharField(max_length=128)
        prev_hash = pw.CharField(max_length=64)
        hash = pw.CharField(max_length=64)

        class Meta:
            table_name = "audit_events"
            indexes = (
                (("actor", "seq"), False),
                (("target", "seq"), False),
            )

    if isinstance(migrator.__database__, pw.PostgresqlDatabase):
        migrator.sql(AUDIT_APPEND_ONLY)

    migrator.add_fields("users", blocked_at=TimestampTZ(null=True))
    migrator.add_fields(
        "referrals",
        fraud_decision=pw.CharField(max_length=8, null=True),
        fraud_reasons=pw.TextField(null=True),
        fraud_signals=pw.TextField(null=True),
        fraud_rules_version=pw.BigIntegerField(null=True),
        fraud_partial=pw.BooleanField(default=False),
        review_outcome=pw.CharField(max_length=8, null=True),
        review_note=pw.TextField(null=True),
        reviewed_at=TimestampTZ(null=True),
    )
    migrator.add_index("referrals", "fraud_decision", "reviewed_at", "created_at")
    migrator.add_fields("programs", fraud_rules=pw.TextField(default=""))

    class User(Base):
        id = pw.BigAutoField()

        class Meta:
            table_name = "users"

    @migrator.create_model
    class ClientSignal(Base):
        id = pw.BigAutoField()
        user = pw.ForeignKeyField(User, on_delete="CASCADE")
        kind = pw.CharField(max_length=16)
        address_hash = pw.CharField(max_length=64, null=True, index=True)
        device_hash = pw.CharField(max_length=64, null=True, index=True)
        created_at = TimestampTZ()
        expires_at = TimestampTZ(index=True)

        class Meta:
            table_name = "client_signals"


def rollback(migrator, database, fake=False, **kwargs):
    migrator.remove_model("client_signals", cascade=True)
    migrator.remove_fields("programs", "fraud_rules")
    migrator.drop_index("referrals", "fraud_decision", "reviewed_at", "created_at")
    migrator.remove_fields(
        "referrals",
        "fraud_decision",
        "fraud_reasons",
        "fraud_signals",
        "fraud_rules_version",
        "fraud_partial",
        "review_outcome",
        "review_note",
        "reviewed_at",
    )
    migrator.remove_fields("users", "blocked_at")
    if isinstance(migrator.__database__, pw.PostgresqlDatabase):
        migrator.sql("DROP TRIGGER IF EXISTS audit_events_no_truncate ON audit_events")
        migrator.sql("DROP TRIGGER IF EXISTS audit_events_append_only ON audit_events")
        migrator.sql("DROP FUNCTION IF EXISTS audit_events_append_only()")
    migrator.remove_model("audit_events", cascade=True)
