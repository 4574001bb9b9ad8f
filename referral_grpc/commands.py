"""The operator's subcommands `apikey`, `program` and `audit`: thin parsing around the domain's services."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .domain.apikeys import SCOPES, ApiKeyService
from .domain.audit import verify_chain
from .domain.errors import DomainError, InvalidArgument
from .domain.fraud import FraudRules
from .domain.ports import SystemClock
from .domain.programs import ProgramRules, ProgramService, Reward
from .settings import Settings
from .store.database import init_database


def add_parsers(commands: Any) -> None:
    """Add `apikey`, `program` and `audit` to the top-level subparsers."""
    apikey = commands.add_parser("apikey", help="create, list and revoke the API keys of backends")
    apikey_commands = apikey.add_subparsers(dest="action", required=True)
    create = apikey_commands.add_parser(
        "create", help="create a key; it is printed once, alone on the last line of the output"
    )
    create.add_argument(
        "--name", required=True, help="a unique name, e.g. the backend's (at most 64 characters)"
    )
    create.add_argument(
        "--scope", action="append", default=[], required=True, help=f"repeat for each: {', '.join(SCOPES)}"
    )
    apikey_commands.add_parser(
        "list", help="name, prefix, scopes, created, last used, revoked: never the key"
    )
    revoke = apikey_commands.add_parser(
        "revoke", help="revoke a key by name; once this returns (about 1 s), no server accepts it"
    )
    revoke.add_argument("name")

    program = commands.add_parser("program", help="set (as a new version) and show the referral program")
    program_commands = program.add_subparsers(dest="action", required=True)
    program_set = program_commands.add_parser(
        "set", help="append a new version of the rules; options left out take their defaults"
    )
    program_set.add_argument("--event-types", default="purchase", help="comma-separated (default: purchase)")
    program_set.add_argument("--min-amount-minor", type=int, default=0)
    program_set.add_argument("--currency", required=True, help="ISO 4217, e.g. USD")
    program_set.add_argument("--attribution-days", type=int, default=30)
    for who in ("referrer", "referee"):
        program_set.add_argument(f"--{who}-reward-minor", type=int, default=0, help="a fixed reward")
        program_set.add_argument(
            f"--{who}-reward-bps", type=int, default=0, help="or basis points of the amount"
        )
        program_set.add_argument(f"--{who}-reward-cap-minor", type=int, default=0, help="caps the bps reward")
    program_set.add_argument("--hold-days", type=int, default=14)
    program_set.add_argument("--max-rewarded-referrals", type=int, default=0, help="per referrer; 0 = no cap")
    program_commands.add_parser("show", help="print the rules in force as JSON")

    audit = commands.add_parser("audit", help="check the audit log")
    audit_commands = audit.add_subparsers(dest="action", required=True)
    audit_commands.add_parser(
        "verify",
        help="walk the hash chain: exit 0 when whole, else name the first row changed, deleted or reordered",
    )


def run(settings: Settings, args: argparse.Namespace) -> int:
    db = init_database(settings)
    clock = SystemClock()
    try:
        if args.command == "apikey":
            return _apikey(ApiKeyService(db, clock), args)
        if args.command == "audit":
            return _audit_verify()
        return _program(ProgramService(db, clock), args)
    except DomainError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if isinstance(exc, InvalidArgument):
            for violation in exc.field_violations[1:]:
                print(f"error: {violation.field} {violation.description}", file=sys.stderr)
        return 1
    finally:
        db.close()


def _apikey(keys: ApiKeyService, args: argparse.Namespace) -> int:
    if args.action == "create":
        created = keys.create(args.name, args.scope)
        print(f"created API key {created.view.name!r} ({created.view.prefix}...) with scopes:")
        print(" ".join(created.view.scopes))
        print("the key is shown once, on the next line; keep it secret:")
        print(created.key)
        return 0
    if args.action == "revoke":
        revoked = keys.revoke(args.name)
        print(f"revoked API key {revoked.name!r} ({revoked.prefix}...)")
        return 0
    rows = [("NAME", "PREFIX", "SCOPES", "CREATED", "LAST USED", "REVOKED")]
    for view in keys.list():
        rows.append(
            (
                view.name,
                view.prefix,
                ",".join(view.scopes),
                view.created_at.isoformat(timespec="seconds"),
                view.last_used_at.isoformat(timespec="seconds") if view.last_used_at else "-",
                view.revoked_at.isoformat(timespec="seconds") if view.revoked_at else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _audit_verify() -> int:
    result = verify_chain()
    if result.broken is not None:
        print(f"audit log broken: {result.broken.describe()}", file=sys.stderr)
        print(f"{result.rows} rows verified before it")
        return 1
    # The head hash, written down elsewhere, also reveals rows cut from the end of the chain.
    print(f"audit log intact: {result.rows} rows, head {result.head_hash}")
    return 0


def _program(programs: ProgramService, args: argparse.Namespace) -> int:
    if args.action == "set":
        current = programs.current()
        rules = programs.set(
            ProgramRules(
                # The fraud rules are set through AdminService.UpdateProgram; a new version keeps them.
                fraud=current.fraud if current is not None else FraudRules(),
                currency=args.currency.strip().upper(),
                event_types=tuple(t.strip() for t in args.event_types.split(",") if t.strip()),
                min_amount_minor=args.min_amount_minor,
                attribution_days=args.attribution_days,
                referrer=Reward(
                    args.referrer_reward_minor, args.referrer_reward_bps, args.referrer_reward_cap_minor
                ),
                referee=Reward(
                    args.referee_reward_minor, args.referee_reward_bps, args.referee_reward_cap_minor
                ),
                hold_days=args.hold_days,
                max_rewarded_referrals=args.max_rewarded_referrals,
            )
        )
        print(json.dumps(rules.as_dict(), indent=2))
        return 0
    current = programs.current()
    if current is None:
        print("no program is set: events are recorded and nothing is credited", file=sys.stderr)
        return 1
    print(json.dumps(current.as_dict(), indent=2))
    return 0
