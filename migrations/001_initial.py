"""Initial schema: users, referral codes, password-reset and refresh tokens, the email outbox.

The models are frozen here on purpose: later changes to referral_grpc/models.py need a new
migration, and tests/test_migrations.py fails until the two agree.
"""

import peewee as pw


class TimestampTZ(pw.Field):
    field_type = "TIMESTAMPTZ"


def migrate(migrator, database, fake=False, **kwargs):
    class Base(pw.Model):
        class Meta:
            legacy_table_names = False

    @migrator.create_model
    class User(Base):
        id = pw.BigAutoField()
        email = pw.CharField(max_length=254)
        email_key = pw.CharField(max_length=254, unique=True)
        password_hash = pw.CharField(max_length=128)
        token_version = pw.IntegerField(default=0)
        referrer = pw.ForeignKeyField("self", null=True, on_delete="SET NULL", index=False)
        created_at = TimestampTZ()
        email_status = pw.CharField(max_length=20, default="unchecked")
        email_checked_at = TimestampTZ(null=True)
        email_recheck = pw.BooleanField(default=False)

        class Meta:
            table_name = "users"
            indexes = ((("referrer", "created_at", "id"), False),)

    @migrator.create_model
    class ReferralCode(Base):
        id = pw.BigAutoField()
        user = pw.ForeignKeyField(User, on_delete="CASCADE", index=False)
        code = pw.CharField(max_length=16, unique=True)
        created_at = TimestampTZ()
        expires_at = TimestampTZ()
        is_active = pw.BooleanField(default=True)
        deactivated_at = TimestampTZ(null=True)

        class Meta:
            table_name = "referral_codes"

    # At most one active code per user, enforced by the database (PostgreSQL and SQLite).
    ReferralCode.add_index(
        ReferralCode.index(ReferralCode.user, unique=True, name="referral_codes_one_active_per_user").where(
            ReferralCode.is_active == True  # noqa: E712
        )
    )
    ReferralCode.add_index(ReferralCode.index(ReferralCode.user, ReferralCode.created_at))

    @migrator.create_model
    class PasswordResetToken(Base):
        id = pw.BigAutoField()
        user = pw.ForeignKeyField(User, on_delete="CASCADE")
        token_hash = pw.CharField(max_length=64, unique=True)
        created_at = TimestampTZ()
        expires_at = TimestampTZ()
        used_at = TimestampTZ(null=True)

        class Meta:
            table_name = "password_reset_tokens"

    @migrator.create_model
    class RefreshToken(Base):
        id = pw.BigAutoField()
        user = pw.ForeignKeyField(User, on_delete="CASCADE")
        family = pw.CharField(max_length=32, index=True)
        token_hash = pw.CharField(max_length=64, unique=True)
        created_at = TimestampTZ()
        expires_at = TimestampTZ()
        rotated_at = TimestampTZ(null=True)
        revoked_at = TimestampTZ(null=True)

        class Meta:
            table_name = "refresh_tokens"

    @migrator.create_model
    class EmailOutbox(Base):
        id = pw.BigAutoField()
        kind = pw.CharField(max_length=32)
        recipient = pw.CharField(max_length=254)
        payload = pw.TextField()
        status = pw.CharField(max_length=16, default="pending")
        attempts = pw.IntegerField(default=0)
        created_at = TimestampTZ()
        enqueued_at = TimestampTZ(null=True)
        sent_at = TimestampTZ(null=True)
        last_error = pw.TextField(null=True)

        class Meta:
            table_name = "email_outbox"
            indexes = ((("status", "created_at"), False),)


def rollback(migrator, database, fake=False, **kwargs):
    for table in ("email_outbox", "refresh_tokens", "password_reset_tokens", "referral_codes", "users"):
        migrator.remove_model(table, cascade=True)
