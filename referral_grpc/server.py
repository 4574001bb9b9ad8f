"""create_server: the grpc server with servicers, health, reflection, interceptors and graceful stop."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .api.interceptors import ApiInterceptor
from .api.servicers import AuthServicer, ReferralServicer
from .app import App
from .gen import auth_service_pb2, auth_service_pb2_grpc, referral_service_pb2, referral_service_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    auth_service_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name,
    referral_service_pb2.DESCRIPTOR.services_by_name["ReferralService"].full_name,
)


class Server:
    """A running gRPC server and its health servicer."""

    def __init__(self, grpc_server: grpc.Server, health_servicer: health.HealthServicer, port: int) -> None:
        self.grpc_server = grpc_server
        self.health = health_servicer
        self.port = port

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, status)

    def stop(self, grace: float) -> None:
        """Graceful stop: report NOT_SERVING first so balancers drain us, then let in-flight RPCs finish."""
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()


def create_server(app: App, address: str | None = None) -> Server:
    """Build and start the server on `address` (default from settings; port 0 picks a free port)."""
    settings = app.settings
    address = address or f"{settings.grpc_host}:{settings.grpc_port}"
    max_bytes = settings.grpc_max_message_bytes
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.grpc_max_workers, thread_name_prefix="rpc"),
        interceptors=[ApiInterceptor(app.auth.authenticate, app.release_connection)],
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            # Several server processes may share one port (SERVER_PROCESSES > 1).
            ("grpc.so_reuseport", 1),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.http2.max_pings_without_data", 0),
        ],
        # Beyond this many RPCs in flight, new ones get RESOURCE_EXHAUSTED instead of queueing forever.
        maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
    )
    auth_service_pb2_grpc.add_AuthServiceServicer_to_server(AuthServicer(app.auth), server)
    referral_service_pb2_grpc.add_ReferralServiceServicer_to_server(ReferralServicer(app.referrals), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    port = server.add_insecure_port(address)
    server.start()
    running = Server(server, health_servicer, port)
    running.set_serving(True)
    return running


def serve(app: App) -> int:
    """Run until SIGINT/SIGTERM, then stop gracefully."""
    server = create_server(app)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: draining", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("serving gRPC on %s:%d", app.settings.grpc_host, server.port)
    stopping.wait()
    server.stop(app.settings.grpc_grace_seconds)
    log.info("stopped")
    return 0
