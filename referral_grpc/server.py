"""create_server: gRPC server with servicers, health, reflection, interceptors, metrics, graceful stop."""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .api.admin import AdminServicer
from .api.admission import Admission, CountingExecutor, InFlight
from .api.errors import send_headers_with_the_answer
from .api.events import EventServicer
from .api.idempotency import IdempotencyStore
from .api.interceptors import ApiInterceptor
from .api.policy import SERVICES
from .api.rewards import RewardServicer
from .api.servicers import AuthServicer, ReferralServicer
from .api.webhooks import WebhookServicer
from .app import App
from .gen import (
    admin_service_pb2_grpc,
    auth_service_pb2_grpc,
    event_service_pb2_grpc,
    referral_service_pb2_grpc,
    reward_service_pb2_grpc,
    webhook_service_pb2_grpc,
)
from .infra.logs import AccessLog
from .infra.metrics import Metrics, MetricsServer
from .store.database import DatabaseProbe

log = logging.getLogger(__name__)

SERVICE_NAMES = tuple(service.full_name for service in SERVICES)
# Request metadata a server process accepts: every header of a request that passed Envoy fits.
MAX_METADATA_BYTES = 32 * 1024
# Added to the nice value of the threads that run the RPCs marked blocking (bcrypt, Hunter calls).
BLOCKING_NICENESS = 10
# How long a stopping server waits for its last emails to reach the queue (a hung queue costs one
# REDIS_SOCKET_TIMEOUT, then its breaker skips it).
EMAIL_FLUSH_SECONDS = 5.0


class DatabaseHealth:
    """Probes the database every `interval` seconds and reports each change of its answer.

    Each probe runs on a thread of its own and counts as failed after `timeout`, so a database that
    stops answering (not just refusing) is noticed too. A probe still stuck is not started again.
    """

    def __init__(
        self, probe: DatabaseProbe, interval: float, timeout: float, on_change: Callable[[bool], None]
    ) -> None:
        self._probe = probe
        self._interval = interval
        self._timeout = timeout
        self._on_change = on_change
        self._stopping = threading.Event()
        self._loop = threading.Thread(target=self._run, name="db-health", daemon=True)
        self._stuck: threading.Thread | None = None
        self.healthy: bool | None = None

    def start(self) -> None:
        """Probe once before returning (so a server with its database down starts NOT_SERVING), then loop."""
        self.check()
        self._loop.start()

    def check(self) -> bool:
        healthy = self._probe_once()
        if healthy != self.healthy:
            if self.healthy is not None or not healthy:
                log.warning(
                    "database %s", "reachable again" if healthy else "unreachable: reporting NOT_SERVING"
                )
            self.healthy = healthy
            self._on_change(healthy)
        return healthy

    def _probe_once(self) -> bool:
        if self._stuck is not None and self._stuck.is_alive():
            return False
        outcome: list[bool] = []

        def run() -> None:
            try:
                self._probe.check()
                outcome.append(True)
            except Exception as exc:
                log.debug("database probe failed: %s", type(exc).__name__)

        worker = threading.Thread(target=run, name="db-probe", daemon=True)
        worker.start()
        worker.join(self._timeout)
        if worker.is_alive():
            self._stuck = worker
            return False
        self._stuck = None
        return bool(outcome)

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            self.check()

    def stop(self) -> None:
        self._stopping.set()
        if self._loop.is_alive():
            self._loop.join()
        if self._stuck is None or not self._stuck.is_alive():
            self._probe.close()


class Server:
    """A running gRPC server, its health servicer, metrics and database health probe."""

    def __init__(
        self,
        grpc_server: grpc.Server,
        health_servicer: health.HealthServicer,
        port: int,
        metrics: Metrics | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.grpc_server = grpc_server
        self.admission = admission
        self.health = health_servicer
        self.port = port
        self.metrics = metrics or Metrics()
        self.database_health: DatabaseHealth | None = None
        self._lock = threading.Lock()
        self._shutting_down = False

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, status)

    def _database_changed(self, healthy: bool) -> None:
        self.metrics.database_up.set(1 if healthy else 0)
        self.set_serving(healthy)  # ignored by the health servicer once shutdown began

    def begin_shutdown(self) -> None:
        """Report NOT_SERVING for good (balancers stop sending new RPCs) while still serving."""
        with self._lock:
            if self._shutting_down:
                return
            self._shutting_down = True
        self.health.enter_graceful_shutdown()
        if self.database_health is not None:
            self.database_health.stop()

    def stop(self, grace: float) -> None:
        """NOT_SERVING first; then new RPCs are refused and in-flight ones get `grace` seconds to finish."""
        self.begin_shutdown()
        self.grpc_server.stop(grace).wait()


class ListenError(RuntimeError):
    """The server cannot listen on its address."""


def create_server(app: App, address: str | None = None) -> Server:
    """Build and start the server on `address` (default from settings; port 0 picks a free port)."""
    settings = app.settings
    address = address or f"{settings.grpc_host}:{settings.grpc_port}"
    max_bytes = settings.grpc_max_message_bytes
    # Each call's headers (x-request-id) in the batch that carries its answer, not one of their own.
    if not send_headers_with_the_answer():
        log.warning("grpc internals differ from the pinned version: headers go out in a batch of their own")
    metrics = Metrics(cache=app.cache, verifier=app.verifier, db=app.db, clock=app.clock)
    in_flight = InFlight()
    # Password hashing saturates the CPU by design; at a lower priority it takes what the cheap RPCs
    # leave, so lookups keep their latency while logins run at full throughput.
    blocking_pool = CountingExecutor(
        in_flight, settings.grpc_blocking_workers, "rpc-blocking", niceness=BLOCKING_NICENESS
    )
    # Beyond this many RPCs in flight, new ones get RESOURCE_EXHAUSTED instead of queueing forever.
    admission = Admission(
        in_flight,
        settings.grpc_max_concurrent_rpcs,
        futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rpc-shed"),
    )
    # Streams hold their thread while their caller stays: a pool of their own, bounded.
    stream_pool = CountingExecutor(in_flight, settings.grpc_max_streams, "rpc-stream")
    server = grpc.server(
        CountingExecutor(in_flight, settings.grpc_max_workers, "rpc"),
        interceptors=[
            ApiInterceptor(
                app.auth.authenticate,
                app.auth.signed,
                app.release_connection,
                observe=metrics.rpc.observe,
                abandoned=metrics.rpc.abandon,
                access_log=AccessLog() if settings.access_log else None,
                blocking_pool=blocking_pool,
                admission=admission,
                stream_pool=stream_pool,
                authenticate_key=app.api_keys.authenticate,
                idempotency_store=IdempotencyStore(
                    app.db, app.clock, settings.idempotency_ttl_seconds, settings.jwt_secret
                ),
            )
        ],
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            # Metadata over the soft limit (8 KiB by default) is refused at random up to the hard one,
            # as RESOURCE_EXHAUSTED. Equal limits refuse consistently, and above what Envoy lets through
            # (8 KiB of request headers, plus the few it adds) so that gateway clients get its 431.
            ("grpc.max_metadata_size", MAX_METADATA_BYTES),
            ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
            # Off unless asked for: a second server on a taken port would silently share it.
            ("grpc.so_reuseport", int(settings.grpc_reuse_port)),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.http2.max_pings_without_data", 0),
        ],
    )
    # The generated *_pb2_grpc modules carry no type stubs.
    auth_service_pb2_grpc.add_AuthServiceServicer_to_server(  # type: ignore[no-untyped-call]
        AuthServicer(app.auth, app.email_verification, app.data_rights), server
    )
    referral_service_pb2_grpc.add_ReferralServiceServicer_to_server(  # type: ignore[no-untyped-call]
        ReferralServicer(app.referrals, app.rewards), server
    )
    reward_service_pb2_grpc.add_RewardServiceServicer_to_server(  # type: ignore[no-untyped-call]
        RewardServicer(app.rewards), server
    )
    admin_service_pb2_grpc.add_AdminServiceServicer_to_server(  # type: ignore[no-untyped-call]
        AdminServicer(app.admin, app.programs, app.rewards), server
    )
    event_service_pb2_grpc.add_EventServiceServicer_to_server(  # type: ignore[no-untyped-call]
        EventServicer(app.events, app.event_stream), server
    )
    webhook_service_pb2_grpc.add_WebhookServiceServicer_to_server(  # type: ignore[no-untyped-call]
        WebhookServicer(app.webhooks), server
    )
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.grpc_reflection:
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as error:
        raise ListenError(
            f"cannot listen on {address}: the port is taken (another server?) or the host is not this "
            "machine's; choose another GRPC_PORT"
        ) from error
    server.start()
    running = Server(server, health_servicer, port, metrics, admission)
    running.set_serving(True)
    if settings.health_probe_interval > 0:
        running.database_health = DatabaseHealth(
            DatabaseProbe(settings, settings.health_probe_timeout),
            settings.health_probe_interval,
            settings.health_probe_timeout,
            running._database_changed,
        )
        running.database_health.start()
    return running


def _wait_interruptibly(event: threading.Event, timeout: float | None = None) -> None:
    """Event.wait in short slices.

    The kernel may deliver SIGTERM to any thread (grpc's, bcrypt's); Python runs the handler only
    when the main thread next executes bytecode, which a single unbounded wait never does.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while not event.is_set():
        left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
        if left <= 0:
            return
        event.wait(left)


def serve(app: App) -> int:
    """Run until SIGTERM/SIGINT, then drain: NOT_SERVING, keep serving briefly, stop with a grace period.

    A second signal skips the rest of the drain delay (an impatient operator, or a supervisor
    escalating); the grace period for in-flight RPCs still applies.
    """
    settings = app.settings
    server = create_server(app)
    metrics_http: MetricsServer | None = None
    if settings.metrics_port:
        metrics_http = MetricsServer(server.metrics.registry, settings.grpc_host, settings.metrics_port)
        log.info("serving metrics on http://%s:%d/metrics", settings.grpc_host, metrics_http.port)
    # What is built by now lives as long as the process: kept out of the cyclic collector's sight, a full
    # collection under load walks only what requests leave behind, not every module, descriptor and model.
    gc.collect()
    gc.freeze()
    stopping = threading.Event()
    hurry = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stopping.is_set():
            hurry.set()
            return
        log.info("received %s: draining", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Logged at WARNING so it shows at every LOG_LEVEL: `make run` and the tests wait for this line.
    log.warning("serving gRPC on %s:%d", settings.grpc_host, server.port)
    _wait_interruptibly(stopping)
    server.begin_shutdown()
    # Still serving: Envoy keeps sending until its health check sees NOT_SERVING.
    _wait_interruptibly(hurry, settings.shutdown_drain_seconds)
    log.info("stopping: in-flight RPCs have %.0f s", settings.grpc_grace_seconds)
    server.stop(settings.grpc_grace_seconds)
    if not app.dispatcher.flush(EMAIL_FLUSH_SECONDS):
        log.warning("stopping: emails still being handed to the queue are left for the outbox relay")
    if metrics_http is not None:
        metrics_http.close()
    log.info("stopped")
    return 0
