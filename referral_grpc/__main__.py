"""Command line of the service: serve, worker, migrate, apikey, program, audit (`make run` is in devstack)."""

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
    from .commands import add_parsers

    parser = argparse.ArgumentParser(prog="referral-grpc", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    commands.add_parser("serve", help="the gRPC server")
    commands.add_parser("worker", help="the email queue consumer")
    commands.add_parser("migrate", help="apply migrations")
    add_parsers(commands)
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        # The message names the setting, never its value.
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings)

    if args.command in ("apikey", "program", "audit"):
        from .commands import run as run_command

        settings.ensure_local_dirs()
        return run_command(settings, args)
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
