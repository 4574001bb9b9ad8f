"""A client of Envoy's admin port: readiness, the bound listener port, the backends' health."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from .envoy_config import CLUSTER, LISTENER
from .processes import START_TIMEOUT, StackError


def _get(url: str, timeout: float = 1.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback admin URL
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


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
        if listener["name"] == LISTENER:
            return int(listener["local_address"]["socket_address"]["port_value"])
    raise StackError("envoy has no api listener")


def envoy_backend_health(admin_url: str) -> dict[str, str]:
    """host:port -> health flags of every backend endpoint ("healthy", "/failed_active_hc", ...)."""
    _, body = _get(f"{admin_url}/clusters")
    health = {}
    for line in body.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == CLUSTER and parts[2] == "health_flags":
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
