"""Command line of the development stack: run (`make run`), validate-gateway, docker-config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..infra.logs import configure_logging
from ..settings import ConfigError, Settings
from .envoy_config import docker_envoy_config
from .envoy_process import validate_gateway
from .supervisor import run_stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m referral_grpc.devstack", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="migrations + server processes + worker + Envoy in the foreground")
    commands.add_parser("validate-gateway", help="envoy --mode validate on every Envoy config")
    docker = commands.add_parser("docker-config", help="write the docker-compose Envoy config to PATH")
    docker.add_argument("path", type=Path)
    docker.add_argument(
        "--descriptors-from",
        type=Path,
        default=None,
        help="the folder holding gateway/referral.pb (default: the project's)",
    )
    args = parser.parse_args(argv)
    if args.command == "docker-config":
        args.path.write_text(docker_envoy_config(args.descriptors_from))
        return 0
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        # The message names the setting, never its value.
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    if args.command == "run":
        return run_stack(settings)
    return validate_gateway(settings)


if __name__ == "__main__":
    sys.exit(main())
