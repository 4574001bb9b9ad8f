"""Command line of the service: serve, worker, migrate (`make run` is `python -m referral_grpc.devstack`)."""

from __future__ import annotations

import argparse
import logging
import sys

from .settings import ConfigError, Settings

log = logging.getLogger("referral_grpc")


def _configure_logging(settings: Settings) -> None:
    from .infra.logs import configure_logging

    configure_logging(settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="referral-grpc", description=__doc__)
    parser.add_argument(
        "command",
        choices=("serve", "worker", "migrate"),
        help="serve: the gRPC server; worker: the email queue consumer; migrate: apply migrations",
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        # The message names the setting, never its value.
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings)

    if args.command == "migrate":
        from .store.database import init_database
        from .store.migrate import run_migrations

        settings.ensure_local_dirs()
        applied = run_migrations(init_database(settings))
        log.info("migrations applied: %s", ", ".join(applied) or "none pending")
        return 0
    if args.command == "serve":
        from .app import build_app
        from .server import ListenError, serve

        try:
            return serve(build_app(settings))
        except ListenError as exc:
            log.error("%s", exc)
            return 1
    from .infra.tasks import run_worker

    run_worker(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
