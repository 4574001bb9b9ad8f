"""Events: the log every state change appends to in its own transaction, and webhook endpoints and deliveries."""

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

    @migrator.create_model
    class WebhookEndpoint(Base):
        id = pw.BigAutoField()
        url = pw.TextField()
        event_types = pw.TextField()
        description = pw.CharField(max_length=256)
        secret = pw.CharField(max_length=64)
        previous_secret = pw.CharField(max_length=64, null=True)
        previous_secret_expires_at = TimestampTZ(null=True)
        status = pw.CharField(max_length=16, default="enabled")
        consecutive_failures = pw.IntegerField(default=0)
        last_success_at = TimestampTZ(null=True)
        created_at = TimestampTZ()

        class Meta:
            table_name = "webhook_endpoints"

    @migrator.create_model
    class WebhookDelivery(Base):
        id = pw.BigAutoField()
        endpoint = pw.ForeignKeyField(WebhookEndpoint, on_delete="CASCADE", index=False)
        event = pw.ForeignKeyField(Event, on_delete="CASCADE")
        status = pw.CharField(max_length=16, default="pending")
        attempts = pw.IntegerField(default=0)
        next_attempt_at = TimestampTZ()
        created_at = TimestampTZ()
        delivered_at = TimestampTZ(null=True)

        class Meta:
            table_name = "webhook_deliveries"
            indexes = (
                (("endpoint", "event"), True),
                (("status", "next_attempt_at"), False),
            )

    @migrator.create_model
    class WebhookAttempt(Base):
        id = pw.BigAutoField()
        delivery = pw.ForeignKeyField(WebhookDelivery, on_delete="CASCADE")
        attempt = pw.IntegerField()
        http_status = pw.IntegerField()
        error = pw.TextField()
        latency_ms = pw.IntegerField()
        response_body = pw.TextField()
        attempted_at = TimestampTZ()

        class Meta:
            table_name = "webhook_attempts"


def rollback(migrator, database, fake=False, **kwargs):
    for table in ("webhook_attempts", "webhook_deliveries", "webhook_endpoints", "events"):
        migrator.remove_model(table, cascade=True)
