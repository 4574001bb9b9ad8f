"""Email verification: verified and referral-qualified times on users, and the verification tokens.

Accounts that exist when this runs start unverified: nobody has proved they own their address yet.
"""

import peewee as pw


class TimestampTZ(pw.Field):
    field_type = "TIMESTAMPTZ"


def migrate(migrator, database, fake=False, **kwargs):
    migrator.add_fields(
        "users",
        email_verified_at=TimestampTZ(null=True),
        referral_qualified_at=TimestampTZ(null=True),
    )

    class Base(pw.Model):
        class Meta:
            legacy_table_names = False

    @migrator.create_model
    class EmailVerificationToken(Base):
        id = pw.BigAutoField()
        user = pw.ForeignKeyField(migrator.orm["users"], on_delete="CASCADE")
        token_hash = pw.CharField(max_length=64, unique=True)
        created_at = TimestampTZ()
        expires_at = TimestampTZ()
        used_at = TimestampTZ(null=True)

        class Meta:
            table_name = "email_verification_tokens"


def rollback(migrator, database, fake=False, **kwargs):
    migrator.remove_model("email_verification_tokens", cascade=True)
    migrator.remove_fields("users", "email_verified_at", "referral_qualified_at")
