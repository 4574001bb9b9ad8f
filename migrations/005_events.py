"""Events: the log every state change appends to in its own transaction, read by cursor (the id)."""

import peewee as pw


class TimestampTZ(pw.Field):
    field_type = "TIMESTAMPTZ"


def migrate(migrator, database, fake=False, **kwargs):
    class Base(pw.Model):
        class Meta:
            legacy_table_names = False

    @migrator.create_model
    class Event(Base):
        id = pw.BigAutoField()
        event_id = pw.CharField(max_length=40, unique=True)
        type = pw.CharField(max_length=48)
        occurred_at = TimestampTZ()
        payload = pw.TextField()

        class Meta:
            table_name = "events"
            indexes = ((("type", "id"), False),)


def rollback(migrator, database, fake=False, **kwargs):
    migrator.remove_model("events", cascade=True)
