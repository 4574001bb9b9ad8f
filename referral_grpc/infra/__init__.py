"""Adapters: Redis cache and throttle, outbox and Huey tasks, Hunter, mail, metrics, logs."""
