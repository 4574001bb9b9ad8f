"""The stack under test: a bench database, server processes and Envoy on free ports, RSS sampling."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import grpc
import psycopg2
import redis
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from referral_grpc.devstack.envoy_admin import wait_envoy_backends_healthy, wait_envoy_ready
from referral_grpc.devstack.envoy_config import dump_envoy_config, render_envoy_config
from referral_grpc.devstack.envoy_process import envoy_command
from referral_grpc.devstack.locations import PROJECT_ROOT, Address

PG_SERVER_URL = os.environ.get("BENCH_PG_SERVER_URL", "postgresql://postgres@127.0.0.1:5432")
BENCH_DATABASE = os.environ.get("BENCH_DATABASE", "referral_bench")
BENCH_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
# Two benches on one machine (two checkouts) must not share these: set both per checkout.
BENCH_KEY_PREFIX = os.environ.get("BENCH_KEY_PREFIX", "bench:")
# A bench-only direct_response route: what Envoy alone costs (the proxy ceiling).
NOOP_PATH = "/bench/noop"
HEALTH_SERVICE = "grpc.health.v1.Health"
START_TIMEOUT = 60.0


# A run's directory (its logs and request files) under var/bench/<kind>/: a full `make bench` leaves
# 0.5-1 GB there, mostly the access logs. The newest few of each kind are kept for a look afterwards.
KEPT_RUNS = 3
_RUN_NAME = re.compile(r"\d{8}T\d{6}")


def new_workdir(kind: str) -> Path:
    """A new directory for this run, named by the UTC time, under var/bench/`kind`/; of that kind's
    earlier runs only the newest KEPT_RUNS - 1 are kept (anything else there, such as bench.ab's
    worktrees, is left alone)."""
    parent = PROJECT_ROOT / "var" / "bench" / kind
    parent.mkdir(parents=True, exist_ok=True)
    earlier = sorted(path for path in parent.iterdir() if path.is_dir() and _RUN_NAME.fullmatch(path.name))
    for old in earlier[: max(0, len(earlier) - (KEPT_RUNS - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    workdir = parent / datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    workdir.mkdir(exist_ok=True)
    return workdir


def _admin_pg(url: str) -> Any:
    conn = psycopg2.connect(f"{url}/postgres")
    conn.autocommit = True
    return conn


def recreate_database(server_url: str = PG_SERVER_URL, name: str = BENCH_DATABASE) -> str:
    """Drop and create the bench database (never the tests' or `make run`'s); return its URL."""
    conn = _admin_pg(server_url)
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return f"{server_url}/{name}"


def flush_redis_prefix(client: redis.Redis, prefix: str = BENCH_KEY_PREFIX) -> int:
    """Delete every key under the bench prefix (cold cache); other prefixes are left alone."""
    deleted = 0
    batch: list[str] = []
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += int(client.unlink(*batch))
            batch = []
    if batch:
        deleted += int(client.unlink(*batch))
    return deleted


def count_redis_keys(client: redis.Redis, pattern: str) -> int:
    return sum(1 for _ in client.scan_iter(match=pattern, count=1000))


def bench_descriptor_set(path: Path) -> Path:
    """gateway/referral.pb plus grpc.health.v1, so the health check is reachable as transcoded REST."""
    files = descriptor_pb2.FileDescriptorSet.FromString(
        (PROJECT_ROOT / "gateway" / "referral.pb").read_bytes()
    )
    health = descriptor_pb2.FileDescriptorProto()
    health_pb2.DESCRIPTOR.CopyToProto(health)
    files.file.append(health)
    path.write_bytes(files.SerializeToString())
    return path


def bench_envoy_config(backends: Sequence[Address], descriptor: Path) -> dict[str, Any]:
    """gateway/envoy.yaml on free ports, plus two bench-only ceilings changed structurally.

    - a direct_response route at NOOP_PATH (Envoy alone, no upstream): the proxy ceiling;
    - the transcoder also maps grpc.health.v1.Health (auto_mapping: POST /grpc.health.v1.Health/Check):
      the cheapest transcoded RPC, the REST RPC ceiling.
    Everything else (access log, transcoder options, retries, health checks) is the production file.
    """
    # Per-client rate limits off: every bench client is 127.0.0.1, and the limits are not what is measured.
    config = render_envoy_config(
        listen=("127.0.0.1", 0),
        admin=("127.0.0.1", 0),
        backends=backends,
        files_root=PROJECT_ROOT,
        rate_limits=False,
    )
    listener = config["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    no_transcoder = next(r["typed_per_filter_config"] for r in routes if "typed_per_filter_config" in r)
    routes.insert(
        0,
        {
            "match": {"path": NOOP_PATH},
            "direct_response": {"status": 200, "body": {"inline_string": "{}"}},
            "typed_per_filter_config": no_transcoder,
        },
    )
    for http_filter in manager["http_filters"]:
        if http_filter["name"] == "envoy.filters.http.grpc_json_transcoder":
            transcoder = http_filter["typed_config"]
            transcoder["proto_descriptor"] = str(descriptor)
            transcoder["services"] = [*transcoder["services"], HEALTH_SERVICE]
            transcoder["auto_mapping"] = True
    return config


class BenchEnvoy:
    """Envoy with its stdout (the access log) going straight to a file: no Python pump in the way."""

    def __init__(self, config: dict[str, Any], workdir: Path, concurrency: int | None) -> None:
        self.config_path = workdir / "envoy.yaml"
        self.config_path.write_text(
            dump_envoy_config(config, "# Rendered by bench from gateway/envoy.yaml.\n")
        )
        self.access_log = workdir / "envoy-access.log"
        self._admin_path = workdir / "envoy-admin-address"
        self._admin_path.unlink(missing_ok=True)
        args = envoy_command(self.config_path, self._admin_path, "warning", concurrency)
        self._log: IO[bytes] = self.access_log.open("ab")
        self._stderr: IO[bytes] = (workdir / "envoy-stderr.log").open("ab")
        self.process = subprocess.Popen(  # noqa: S603 - Envoy from our venv, fixed arguments
            args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._stderr, cwd=PROJECT_ROOT
        )
        self.admin_url = ""
        self.port = 0

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        self.admin_url, self.port = wait_envoy_ready(self._admin_path, self.process.poll, timeout)

    def wait_backends_healthy(self, expected: int, timeout: float = START_TIMEOUT) -> None:
        wait_envoy_backends_healthy(self.admin_url, timeout, expected)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        self._stderr.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Servers:
    """N `python -m referral_grpc serve` processes, each on its own port, output straight to a file.

    Separate ports, one Envoy endpoint each (as `make run` does): grpc sets SO_REUSEPORT, but a shared
    port balances connections, and Envoy keeps few long-lived HTTP/2 connections upstream.
    """

    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    addresses: list[Address] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_serving(address: Address, process: subprocess.Popen[bytes], timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"{address[0]}:{address[1]}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}; see servers.log")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"server on {address} did not serve in time")


def start_servers(
    env: dict[str, str], count: int, log: IO[bytes], servers: Servers | None = None, cwd: Path | None = None
) -> Servers:
    """Start `count` more server processes (into `servers` if given) and wait until each serves.

    `cwd` is the checkout whose code they run (`python -m` imports from the working directory first)."""
    servers = servers or Servers()
    try:
        for _ in range(count):
            address = ("127.0.0.1", free_port())
            process = subprocess.Popen(
                [sys.executable, "-m", "referral_grpc", "serve"],
                env={**env, "GRPC_HOST": address[0], "GRPC_PORT": str(address[1])},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,
                cwd=cwd,
            )
            servers.processes.append(process)
            servers.addresses.append(address)
            _wait_serving(address, process)
    except BaseException:
        servers.stop()
        raise
    return servers


def production_env(database_url: str) -> dict[str, str]:
    """What ships: ENVIRONMENT=production with PostgreSQL and Redis and nothing else changed (the access
    log, log format and pools at their defaults), generated secrets, on the bench's database and prefix."""
    return {
        **os.environ,
        "ENVIRONMENT": "production",
        "DATABASE_URL": database_url,
        "REDIS_URL": BENCH_REDIS_URL,
        "REDIS_KEY_PREFIX": BENCH_KEY_PREFIX,
        "JWT_SECRET": secrets.token_hex(32),
        "PASSWORD_PEPPER": secrets.token_hex(32),
        "GRPC_HOST": "127.0.0.1",
    }


def run_cli(env: dict[str, str], *args: str) -> str:
    """`python -m referral_grpc ARGS` on the bench database: what an operator would run."""
    result = subprocess.run(  # noqa: S603 - this interpreter, fixed arguments
        [sys.executable, "-m", "referral_grpc", *args],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout


def run_migrations(env: dict[str, str]) -> None:
    subprocess.run(
        [sys.executable, "-m", "referral_grpc", "migrate"],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )


def rss_kib(pid: int) -> int:
    """Resident set size of a process (VmRSS), 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


class RssSampler:
    """Samples the RSS of some processes once a second in a daemon thread."""

    def __init__(self, pids: Sequence[int], interval: float = 1.0) -> None:
        self._pids = list(pids)
        self._interval = interval
        self.samples: list[tuple[float, list[int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        started = time.monotonic()
        while True:
            self.samples.append((time.monotonic() - started, [rss_kib(pid) for pid in self._pids]))
            if self._stop.wait(self._interval):
                return


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3, utime 14 and stime 15 (1-based), so 11 and 12 here.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


@dataclass
class CpuMeter:
    """CPU seconds of each part of the stack, so a scenario's cost can be given per request.

    PostgreSQL is the backends connected to the bench database (the servers' pools), not the whole
    cluster; Redis is the whole server process, shared with anything else using it on this machine.
    """

    database_url: str
    redis_client: redis.Redis
    server_pids: list[int]
    envoy_pid: int = 0

    def _postgres_pids(self) -> list[int]:
        conn = psycopg2.connect(self.database_url)
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid()"
                )
                return [int(row[0]) for row in cur.fetchall()]
        finally:
            conn.close()

    def snapshot(self) -> dict[str, dict[int, float]]:
        redis_pid = int(self.redis_client.info("server")["process_id"])
        parts = {
            "server": self.server_pids,
            "envoy": [self.envoy_pid] if self.envoy_pid else [],
            "postgres": self._postgres_pids(),
            "redis": [redis_pid],
        }
        return {name: {pid: cpu_seconds(pid) for pid in pids} for name, pids in parts.items()}

    @staticmethod
    def used(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict[str, float]:
        """CPU seconds per part between two snapshots; a backend born in between counts from zero."""
        return {
            name: sum(max(0.0, now - before[name].get(pid, 0.0)) for pid, now in pids.items())
            for name, pids in after.items()
        }
