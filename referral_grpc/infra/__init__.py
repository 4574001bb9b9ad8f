"""Adapters to the outside world: Redis cache and throttle, outbox and Huey tasks, Hunter, mail, metrics, logs."""
