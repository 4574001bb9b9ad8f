"""`make run`: migrations, the server processes, the email worker and Envoy in the foreground."""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

from ..settings import Settings
from .envoy_config import local_envoy_config, server_addresses
from .envoy_process import Envoy
from .locations import Address
from .processes import Child, StackError, python_child, start_server


def child_env(settings: Settings, **overrides: str) -> dict[str, str]:
    """The environment of a child: ours, plus what every process of the stack must share."""
    env = dict(os.environ)
    if settings.jwt_secret_generated:
        # A development secret made up at start: every server process must sign with the same one.
        env["JWT_SECRET"] = settings.jwt_secret
    # A development receiver runs on this machine; an explicit setting still wins.
    env.setdefault("WEBHOOK_ALLOW_PRIVATE_NETWORKS", "true")
    env.update(overrides)
    return env


class _Stop:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name = ""

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        self.event.set()


def _stop_all(envoy: Envoy | None, servers: Sequence[Child], worker: Child | None, grace: float) -> None:
    """Envoy first (no new requests), then servers (drain in-flight RPCs), then the worker."""
    if envoy is not None:
        envoy.stop(timeout=5)
    for server in servers:
        server.send(signal.SIGTERM)
    for server in servers:
        server.wait(grace + 5)
    if worker is not None:
        # The worker finishes its running tasks on SIGTERM; SIGINT would interrupt them.
        worker.stop(signal.SIGTERM, timeout=grace + 5)


def _print_urls(settings: Settings, envoy: Envoy, servers: Sequence[Address]) -> None:
    direct = ", ".join(f"{host}:{port}" for host, port in servers)
    lines = [
        "",
        "referral stack is up:",
        f"  REST          {envoy.url}  (e.g. POST {envoy.url}/auth/register)",
        f"  API docs      {envoy.url}/docs  (OpenAPI: {envoy.url}/openapi.json)",
        f"  gRPC          127.0.0.1:{envoy.port} through Envoy, or directly {direct}",
        f"  Envoy admin   {envoy.admin_url}",
        f"  database      {settings.database.location}",
        "Ctrl-C stops everything.",
        "",
    ]
    print("\n".join(lines), flush=True)


def _iter_children(envoy: Envoy | None, servers: Sequence[Child], worker: Child | None) -> Iterator[Child]:
    yield from servers
    if worker is not None:
        yield worker
    if envoy is not None:
        yield envoy.child


def _ports_to_bind(settings: Settings) -> list[tuple[str, str, int]]:
    """(setting, host, port) of every fixed port the stack listens on (0 picks a free one: never taken)."""
    wanted = [
        ("ENVOY_PORT", "127.0.0.1", settings.envoy_port),
        ("ENVOY_ADMIN_PORT", "127.0.0.1", settings.envoy_admin_port),
    ]
    for index, (host, port) in enumerate(server_addresses(settings)):
        wanted.append(("GRPC_PORT", host, port))
        if settings.metrics_port:
            wanted.append(("METRICS_PORT", settings.grpc_host, settings.metrics_port + index))
    return [(name, host, port) for name, host, port in wanted if port]


def _port_taken(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR ignores connections in TIME_WAIT, never a listening socket.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def taken_ports(settings: Settings) -> list[str]:
    """A line for each port of the stack that something else already listens on."""
    return [
        f"  {host}:{port} ({name}) is already in use"
        for name, host, port in _ports_to_bind(settings)
        if _port_taken(host, port)
    ]


def run_stack(settings: Settings) -> int:
    """Run migrations, the server processes, the worker and Envoy until Ctrl-C/SIGTERM or a child dies."""
    taken = taken_ports(settings)
    if taken:
        # Checked before anything starts: a second stack would otherwise fail half-way, or (with
        # SO_REUSEPORT) share the first one's ports with another JWT key.
        print(
            "make run: not starting, these ports are taken (another `make run`?):\n"
            + "\n".join(taken)
            + "\nStop the other process or choose free ports, e.g. GRPC_PORT=50061 ENVOY_PORT=8081 "
            "ENVOY_ADMIN_PORT=9902 make run",
            file=sys.stderr,
        )
        return 1
    settings.ensure_local_dirs()
    stop = _Stop()
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    env = child_env(settings)
    migrate = python_child("migrate", "migrate", env)
    if migrate.wait(timeout=300) != 0:
        print("migrations failed: not starting the stack", file=sys.stderr)
        return 1
    if stop.event.is_set():
        return 0

    envoy: Envoy | None = None
    servers: list[Child] = []
    worker: Child | None = None
    workdir = tempfile.TemporaryDirectory(prefix="referral-envoy-")
    try:
        addresses = []
        for index, (host, port) in enumerate(server_addresses(settings)):
            overrides = {"GRPC_HOST": host, "GRPC_PORT": str(port)}
            if settings.metrics_port:
                overrides["METRICS_PORT"] = str(settings.metrics_port + index)
            name = "server" if settings.server_processes == 1 else f"server-{index + 1}"
            server, address = start_server(child_env(settings, **overrides), name=name)
            servers.append(server)
            addresses.append(address)
        worker = python_child("worker", "worker", env)
        envoy = Envoy(
            local_envoy_config(settings, addresses),
            Path(workdir.name),
            concurrency=settings.envoy_concurrency or None,
        )
        envoy.wait_ready()
        envoy.wait_backend_healthy()
        _print_urls(settings, envoy, addresses)
        return _supervise(stop, list(_iter_children(envoy, servers, worker)))
    except StackError as error:
        print(f"the stack failed to start: {error}", file=sys.stderr)
        return 1
    finally:
        _stop_all(envoy, servers, worker, settings.grpc_grace_seconds)
        workdir.cleanup()


def _supervise(stop: _Stop, children: Sequence[Child]) -> int:
    """Until a signal (exit 0) or the death of any child (exit 1)."""
    while not stop.event.wait(0.5):
        dead = [child for child in children if child.poll() is not None]
        if dead:
            for child in dead:
                print(f"{child.name} exited with code {child.poll()}: stopping the stack", file=sys.stderr)
            return 1
    print(f"\n{stop.signal_name}: stopping the stack", flush=True)
    return 0
