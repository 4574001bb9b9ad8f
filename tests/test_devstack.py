"""The development stack apart from the runtime: its commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from referral_grpc.devstack.envoy_config import docker_envoy_config
from referral_grpc.devstack.locations import PROJECT_ROOT

GATEWAY = PROJECT_ROOT / "gateway"


def test_docker_config_command_writes_the_committed_file(tmp_path: Path) -> None:
    target = tmp_path / "envoy.docker.yaml"
    subprocess.run(
        [sys.executable, "-m", "referral_grpc.devstack", "docker-config", str(target)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert target.read_text() == docker_envoy_config() == (GATEWAY / "envoy.docker.yaml").read_text()


def test_the_service_command_line_has_no_stack_commands() -> None:
    for command in ("run", "validate-gateway"):
        result = subprocess.run(
            [sys.executable, "-m", "referral_grpc", command], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2 and "invalid choice" in result.stderr, result.stderr
