"""The referral program's rules: validated, stored as a new version on every change, read by the rewards."""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any

import peewee as pw

from ..store.database import Prepared, write_transaction
from ..store.models import Program, database
from . import audit
from .currencies import is_currency
from .errors import FieldViolation, InvalidArgument
from .events import PROGRAM_UPDATED, NewEvent, append_events
from .fraud import FraudRules, validate_fraud_rules
from .ports import Clock

MAX_EVENT_TYPE_LENGTH = 64
EVENT_TYPE = re.compile(rf"^[a-z0-9][a-z0-9_.-]{{0,{MAX_EVENT_TYPE_LENGTH - 1}}}$")
# `refund` reverses rewards: it can never be what earns them.
REFUND = "refund"
# Bounds that keep every product of amounts and basis points far inside a signed 64-bit integer.
MAX_AMOUNT_MINOR = 10**15
MAX_BPS = 10_000
MAX_DAYS = 3650


@dataclass(frozen=True)
class Reward:
    """A fixed amount, or `bps` basis points of the event amount capped at `cap_minor` (0 = no cap)."""

    fixed_minor: int = 0
    bps: int = 0
    cap_minor: int = 0

    def amount_for(self, event_amount_minor: int) -> int:
        if self.fixed_minor:
            return self.fixed_minor
        # Integer arithmetic, rounded down: never a float near money.
        amount = event_amount_minor * self.bps // 10_000
        return min(amount, self.cap_minor) if self.cap_minor else amount


@dataclass(frozen=True)
class ProgramRules:
    """One version of the rules (`version` 0 until stored)."""

    currency: str
    event_types: tuple[str, ...] = ("purchase",)
    min_amount_minor: int = 0
    attribution_days: int = 30
    referrer: Reward = field(default_factory=Reward)
    referee: Reward = field(default_factory=Reward)
    hold_days: int = 14
    max_rewarded_referrals: int = 0
    fraud: FraudRules = field(default_factory=FraudRules)
    version: int = 0
    created_at: datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        """The rules as `program show` prints them."""
        out = asdict(self)
        out["event_types"] = list(self.event_types)
        out["fraud"] = self.fraud.as_dict()
        out["created_at"] = self.created_at.isoformat() if self.created_at else None
        return out


def validate(rules: ProgramRules) -> ProgramRules:
    """Every violation at once, as field violations named after the `program set` options."""
    violations: list[FieldViolation] = []

    def bad(name: str, description: str) -> None:
        violations.append(FieldViolation(name, description))

    if not is_currency(rules.currency):
        bad("currency", "must be an ISO 4217 code such as USD")
    if not rules.event_types:
        bad("event_types", "must name at least one event type")
    for event_type in rules.event_types:
        if not EVENT_TYPE.fullmatch(event_type):
            bad("event_types", f"{event_type!r} is not an event type (lower-case letters, digits, _ . -)")
        elif event_type == REFUND:
            bad("event_types", "refund reverses rewards and cannot qualify")
    if not 0 <= rules.min_amount_minor <= MAX_AMOUNT_MINOR:
        bad("min_amount_minor", f"must be between 0 and {MAX_AMOUNT_MINOR}")
    if not 1 <= rules.attribution_days <= MAX_DAYS:
        bad("attribution_days", f"must be between 1 and {MAX_DAYS}")
    if not 0 <= rules.hold_days <= MAX_DAYS:
        bad("hold_days", f"must be between 0 and {MAX_DAYS}")
    if rules.max_rewarded_referrals < 0:
        bad("max_rewarded_referrals", "must not be negative (0 means no cap)")
    for who, reward in (("referrer", rules.referrer), ("referee", rules.referee)):
        if reward.fixed_minor and reward.bps:
            bad(f"{who}_reward", "is either a fixed amount (minor) or basis points (bps), not both")
        if not 0 <= reward.fixed_minor <= MAX_AMOUNT_MINOR:
            bad(f"{who}_reward_minor", f"must be between 0 and {MAX_AMOUNT_MINOR}")
        if not 0 <= reward.bps <= MAX_BPS:
            bad(f"{who}_reward_bps", f"must be between 0 and {MAX_BPS}")
        if not 0 <= reward.cap_minor <= MAX_AMOUNT_MINOR:
            bad(f"{who}_reward_cap_minor", f"must be between 0 and {MAX_AMOUNT_MINOR}")
        if reward.cap_minor and not reward.bps:
            bad(f"{who}_reward_cap_minor", "caps a percentage reward: give it with --" + who + "-reward-bps")
    violations.extend(validate_fraud_rules(rules.fraud))
    if violations:
        raise InvalidArgument(
            "INVALID_ARGUMENT",
            f"invalid program: {violations[0].field} {violations[0].description}",
            violations,
        )
    return rules


def _rules(row: Program) -> ProgramRules:
    return ProgramRules(
        currency=row.currency,
        event_types=tuple(row.event_types.split(",")),
        min_amount_minor=row.min_amount_minor,
        attribution_days=row.attribution_days,
        referrer=Reward(row.referrer_reward_minor, row.referrer_reward_bps, row.referrer_reward_cap_minor),
        referee=Reward(row.referee_reward_minor, row.referee_reward_bps, row.referee_reward_cap_minor),
        hold_days=row.hold_days,
        max_rewarded_referrals=row.max_rewarded_referrals,
        fraud=FraudRules.from_json(row.fraud_rules),
        version=row.id,
        created_at=row.created_at,
    )


# The read of the newest version, compiled once per database: every recorded event and signup runs it.
_NEWEST: weakref.WeakKeyDictionary[pw.Database, Prepared] = weakref.WeakKeyDictionary()


def current_program() -> ProgramRules | None:
    """The rules in force: the newest version, or None when no program was ever set."""
    db = database.obj
    newest = _NEWEST.get(db)
    if newest is None:
        newest = _NEWEST[db] = Prepared(db, Program.select().order_by(Program.id.desc()).limit(pw.SQL("1")))
    return rules_of(newest.first())


def rules_of(row: Program | None) -> ProgramRules | None:
    """The rules of a program row read elsewhere (e.g. joined to another read); None for no row."""
    return None if row is None else _rules(row)


def current_fraud_rules() -> tuple[FraudRules, int]:
    """The fraud rules in force and their program version; the defaults (version 0) before any program."""
    program = current_program()
    return (FraudRules(), 0) if program is None else (program.fraud, program.version)


class ProgramService:
    def __init__(self, db: pw.Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    def set(self, rules: ProgramRules) -> ProgramRules:
        """Append `rules` as the newest version; referrals already judged keep the version they had.

        Rules equal to those in force are not stored again: a retried update (a lost answer) changes
        nothing, and gets the version in force.
        """
        validate(rules)
        wanted = replace(
            rules, event_types=tuple(dict.fromkeys(rules.event_types)), version=0, created_at=None
        )
        now = self._clock.now()
        with write_transaction(self._db):
            before = current_program()
            if before is not None and replace(before, version=0, created_at=None) == wanted:
                return before
            row = Program.create(
                created_at=now,
                event_types=",".join(dict.fromkeys(rules.event_types)),
                currency=rules.currency,
                min_amount_minor=rules.min_amount_minor,
                attribution_days=rules.attribution_days,
                referrer_reward_minor=rules.referrer.fixed_minor,
                referrer_reward_bps=rules.referrer.bps,
                referrer_reward_cap_minor=rules.referrer.cap_minor,
                referee_reward_minor=rules.referee.fixed_minor,
                referee_reward_bps=rules.referee.bps,
                referee_reward_cap_minor=rules.referee.cap_minor,
                hold_days=rules.hold_days,
                max_rewarded_referrals=rules.max_rewarded_referrals,
                fraud_rules=json.dumps(rules.fraud.as_dict(), sort_keys=True),
            )
            stored = _rules(row)
            audit.append(
                self._db,
                now,
                "program.update",
                "program",
                before=None if before is None else before.as_dict(),
                after=stored.as_dict(),
            )
            # After the audit row: every transaction takes the two locks in one order.
            append_events(self._db, [NewEvent(PROGRAM_UPDATED, {"version": stored.version})], now)
        return stored

    def current(self) -> ProgramRules | None:
        return current_program()
