"""The task queue: a Huey instance with the service's tasks registered on it, and the worker that runs them.

Run it with `python -m referral_grpc worker` (`run_worker(settings)`): Huey's consumer plus the outbox
relay. `huey_consumer referral_grpc.infra.tasks.huey -g TERM` also runs the tasks, but without the relay,
so emails whose enqueue failed or whose task was lost would wait for a worker that has one.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import redis
from huey import Huey, RedisHuey, SqliteHuey
from huey.api import TaskWrapper
from huey.consumer import Consumer
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from ..domain.ports import Clock, EmailDispatcher, EmailVerifier, SystemClock
from ..settings import Settings
from ..store.database import init_database
from ..store.models import database
from .breaker import CircuitBreaker
from .mailer import Mailer, make_mailer
from .outbox import BackgroundDispatcher, DeliveryConfig, HueyDispatcher, deliver, relay_pending
from .webhooks import Sender, WebhookConfig, claim_due, deliver_batch

log = logging.getLogger(__name__)

# Tasks are addressed by these names (Huey prefixes the module), never by the Python objects:
# an instance built in the gRPC server enqueues what the worker's instance runs.
DELIVER_EMAIL = "deliver_email"
RECHECK_EMAIL = "recheck_email"
DELIVER_WEBHOOK = "deliver_webhook"

_RELAY_BATCH = 100
# Most webhook deliveries one task sends: fewer queue round trips per delivery, while a batch stays
# short next to the lease even when each attempt waits out WEBHOOK_TIMEOUT.
_WEBHOOK_TASK_BATCH = 10
_RECHECK_BATCH = 100


def create_huey(settings: Settings, *, enqueue_only: bool = False) -> Huey:
    """RedisHuey when REDIS_URL is set; otherwise SqliteHuey in HUEY_SQLITE_PATH (the embedded setup).

    The queue's name comes from REDIS_KEY_PREFIX, so deployments sharing a Redis keep separate queues.
    `enqueue_only` is the gRPC server's instance: it only pushes, so a Redis that hangs or is gone
    costs it REDIS_SOCKET_TIMEOUT once, with no retry.
    """
    name = f"{settings.redis_key_prefix}tasks"
    if settings.redis_url:
        if enqueue_only:
            timeout = settings.redis_socket_timeout
            pool = redis.ConnectionPool.from_url(
                settings.redis_url,
                socket_connect_timeout=timeout,
                socket_timeout=timeout,
                retry=Retry(NoBackoff(), 0),
            )
        else:
            pool = redis.ConnectionPool.from_url(
                settings.redis_url,
                # The consumer's blocking pop waits 1 s for a task: reads must be allowed longer.
                socket_connect_timeout=1.0,
                socket_timeout=5.0,
                retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=2),
            )
        # Results are never read: storing them would only fill Redis.
        return RedisHuey(name, results=False, utc=True, connection_pool=pool)
    settings.ensure_local_dirs()
    return SqliteHuey(name, results=False, utc=True, filename=settings.huey_sqlite_path)


class Tasks:
    """The service's tasks registered on one Huey instance, bound to the settings and clock they run with."""

    def __init__(self, huey: Huey, settings: Settings, clock: Clock) -> None:
        self.huey = huey
        self.settings = settings
        self.clock = clock
        self.delivery_config = DeliveryConfig.from_settings(settings)
        self._mailer: Mailer | None = None
        self._verifier: EmailVerifier | None = None
        self._lock = threading.Lock()
        self.deliver_email: TaskWrapper = huey.task(name=DELIVER_EMAIL)(self._deliver_email)
        self.recheck_email: TaskWrapper = huey.task(name=RECHECK_EMAIL)(self._recheck_email)
        self.webhook_config = WebhookConfig.from_settings(settings)
        self.webhook_sender = Sender(self.webhook_config.timeout, self.webhook_config.allow_private)
        self.deliver_webhook: TaskWrapper = huey.task(name=DELIVER_WEBHOOK)(self._deliver_webhook)
        # For `huey_consumer`, which knows nothing of run_worker: bind the models in each worker thread.
        huey.on_startup(name="bind_database")(self._ensure_database)

    def enqueue_delivery(self, outbox_id: int, delay: float | None = None) -> None:
        """Queue `deliver_email(outbox_id)`, after `delay` seconds if given; raises when the queue is down."""
        self.huey.enqueue(self.deliver_email.s(outbox_id, delay=delay))

    def enqueue_deliveries(self, outbox_ids: Sequence[int]) -> None:
        """Queue one `deliver_email` task that sends these rows in turn; raises when the queue is down."""
        self.huey.enqueue(self.deliver_email.s(list(outbox_ids)))

    def enqueue_webhooks(self, delivery_ids: list[int]) -> None:
        self.huey.enqueue(self.deliver_webhook.s(delivery_ids))

    def _deliver_webhook(self, delivery_ids: list[int] | int) -> None:
        # A failure is recorded with its next attempt's time; the relay enqueues it when due.
        # (A single id is what a worker before batching enqueued.)
        ids = [delivery_ids] if isinstance(delivery_ids, int) else delivery_ids
        with database.connection_context():
            deliver_batch(ids, self.webhook_config, self.clock.now, self.webhook_sender.post)

    def enqueue_recheck(self, user_id: int) -> None:
        self.huey.enqueue(self.recheck_email.s(user_id))

    @property
    def mailer(self) -> Mailer:
        with self._lock:
            if self._mailer is None:
                self._mailer = make_mailer(self.settings)
            return self._mailer

    def _ensure_database(self) -> None:
        with self._lock:
            if database.obj is None:
                init_database(self.settings)

    def _deliver_email(self, outbox_ids: list[int] | int) -> None:
        # A single id: a retry, or what a server before batching enqueued.
        ids = [outbox_ids] if isinstance(outbox_ids, int) else outbox_ids
        for outbox_id in ids:
            try:
                self._deliver_one(outbox_id)
            except Exception:
                # The others still go out; this row stays pending and the relay enqueues it after the lease.
                log.exception("Delivering email %d failed, the outbox relay will retry it", outbox_id)

    def _deliver_one(self, outbox_id: int) -> None:
        with database.connection_context():
            result = deliver(outbox_id, mailer=self.mailer, config=self.delivery_config, clock=self.clock)
        # Scheduled only now, after the attempt committed: a retry must not run ahead of its own record.
        if result.retry_in is not None:
            try:
                self.enqueue_delivery(outbox_id, delay=result.retry_in)
            except Exception as exc:
                log.warning("Could not schedule the retry of email %d, the relay will: %s", outbox_id, exc)

    def _recheck_email(self, user_id: int) -> None:
        # Imported here: the verifier and its HTTP client are only needed when a re-check runs.
        from . import hunter

        with self._lock:
            if self._verifier is None:
                self._verifier = hunter.make_email_verifier(self.settings)
            verifier = self._verifier
        with database.connection_context():
            status = hunter.recheck_user_email(user_id, verifier, self.clock.now())
        if status is not None:
            log.info("Email of user %d re-checked: %s", user_id, status)


def create_tasks(settings: Settings, clock: Clock, *, enqueue_only: bool = False) -> Tasks:
    """The queue of `create_huey` with the service's tasks registered on it."""
    return Tasks(create_huey(settings, enqueue_only=enqueue_only), settings, clock)


def make_dispatcher(settings: Settings, clock: Clock) -> EmailDispatcher:
    """The gRPC server's dispatcher: best-effort hand-off after the commit that can never slow an RPC.

    The request thread only appends the ids to an in-memory queue; a background thread enqueues them
    through a fail-fast client behind a circuit breaker. Whatever it cannot hand over, the relay sends.
    """
    tasks = create_tasks(settings, clock, enqueue_only=True)
    return BackgroundDispatcher(HueyDispatcher(tasks, CircuitBreaker()))


# The signals Huey's consumer takes over when it starts.
_CONSUMER_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Worker:
    """The consumer threads plus the outbox relay: everything the worker process runs."""

    def __init__(self, settings: Settings, clock: Clock, tasks: Tasks | None = None) -> None:
        self.settings = settings
        self.tasks = tasks if tasks is not None else create_tasks(settings, clock)
        self._stop = threading.Event()
        self._relay = threading.Thread(target=self._relay_loop, name="outbox-relay", daemon=True)
        self._consumer: Consumer | None = None

    def _make_consumer(self) -> Consumer:
        consumer: Consumer = self.tasks.huey.create_consumer(
            workers=self.settings.worker_threads,
            # Re-checks are enqueued by the relay loop; no periodic tasks.
            periodic=False,
            # SqliteHuey is polled: an idle worker still looks at least once a second.
            max_delay=1.0,
            scheduler_interval=1,
            # `docker stop`, systemd and Kubernetes stop with SIGTERM: the running delivery finishes
            # (a second SIGTERM forces the exit). SIGINT (Ctrl-C) stops at once; the relay sends
            # what that interrupted after OUTBOX_LEASE.
            graceful_signal="TERM",
        )
        return consumer

    def start(self) -> None:
        """Run in background threads (tests, or a worker embedded in another process's main thread).

        The consumer installs its signal handlers when it starts; an embedded worker gives the host
        process its own back, and is stopped by `stop()`.
        """
        saved = {signum: signal.getsignal(signum) for signum in _CONSUMER_SIGNALS}
        self._consumer = self._make_consumer()
        try:
            self._consumer.start()
        finally:
            for signum, handler in saved.items():
                if handler is not None:
                    signal.signal(signum, handler)
        self._relay.start()

    def stop(self) -> None:
        """Stop taking tasks, let running ones finish, and return when they have."""
        self._stop.set()
        if self._relay.ident is not None:
            self._relay.join()
        if self._consumer is not None:
            self._consumer.stop(graceful=True)
        self.tasks.webhook_sender.close()

    def run(self) -> None:
        """Run in the foreground until SIGTERM (running tasks finish first) or SIGINT (they do not)."""
        consumer = self._make_consumer()
        self._relay.start()
        try:
            consumer.run()
        finally:
            self._stop.set()
            self._relay.join()
            self.tasks.webhook_sender.close()

    def relay_once(self) -> int:
        """Enqueue every pending row that is due (see referral_grpc.infra.outbox); return how many."""
        lease = timedelta(seconds=self.settings.outbox_lease)
        total = 0
        try:
            with database.connection_context():
                while True:
                    count = relay_pending(self.tasks, self.tasks.clock.now(), lease, _RELAY_BATCH)
                    total += count
                    if count < _RELAY_BATCH:
                        break
        except Exception as exc:
            log.warning("Outbox relay pass failed, next in %ss: %s", self.settings.outbox_relay_interval, exc)
        if total:
            log.info("Outbox relay enqueued %d email(s)", total)
        return total + self.relay_webhooks()

    def relay_webhooks(self) -> int:
        """Enqueue every webhook delivery that is due; one not enqueued is due again after its lease."""
        total = 0
        try:
            with database.connection_context():
                while True:
                    groups = claim_due(self.tasks.clock.now(), self.tasks.webhook_config.lease, _RELAY_BATCH)
                    claimed = sum(len(group) for group in groups)
                    # Batches no larger than it takes to keep every consumer thread busy.
                    size = min(_WEBHOOK_TASK_BATCH, -(-claimed // self.settings.worker_threads))
                    for group in groups:
                        for start in range(0, len(group), size):
                            self.tasks.enqueue_webhooks(group[start : start + size])
                    total += claimed
                    if claimed < _RELAY_BATCH:
                        break
        except Exception as exc:
            log.warning(
                "Webhook relay pass failed, next in %ss: %s", self.settings.outbox_relay_interval, exc
            )
        return total

    def enqueue_rechecks(self) -> int:
        """Enqueue a Hunter re-check for users whose address could not be verified at signup."""
        try:
            from . import hunter

            with database.connection_context():
                user_ids = hunter.users_needing_recheck(_RECHECK_BATCH)
            for user_id in user_ids:
                self.tasks.enqueue_recheck(user_id)
        except Exception as exc:
            log.warning("Could not enqueue email re-checks: %s", exc)
            return 0
        return len(user_ids)

    def _relay_loop(self) -> None:
        next_recheck = time.monotonic()
        while not self._stop.is_set():
            self.relay_once()
            if time.monotonic() >= next_recheck:
                self.enqueue_rechecks()
                next_recheck = time.monotonic() + self.settings.hunter_recheck_interval
            self._stop.wait(self.settings.outbox_relay_interval)


def run_worker(settings: Settings) -> None:
    """`python -m referral_grpc worker`: consume the queue in the foreground until SIGTERM or SIGINT."""
    settings.ensure_local_dirs()
    init_database(settings)
    worker = Worker(settings, SystemClock())
    log.info(
        "Worker started: %d thread(s), %s queue, relay every %ss",
        settings.worker_threads,
        "Redis" if settings.redis_url else "SQLite",
        settings.outbox_relay_interval,
    )
    worker.run()
    log.info("Worker stopped")


@functools.cache
def _default_tasks() -> Tasks:
    return create_tasks(Settings.from_env(), SystemClock())


def __getattr__(name: str) -> Any:
    # `huey`, `deliver_email` and `recheck_email` are built on first use, not at import: importing this
    # module (the server does, for make_dispatcher) must not read the environment or create var/huey.db.
    if name == "huey":
        return _default_tasks().huey
    if name in (DELIVER_EMAIL, RECHECK_EMAIL):
        return getattr(_default_tasks(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
