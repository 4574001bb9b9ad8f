"""Fraud decisions at signup: signals with thresholds and modes; every decision explained and stored."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from disposable_email_domains import blocklist as DISPOSABLE_DOMAINS

from ..store.models import ClientSignal, Referral, User
from .errors import FieldViolation

ALLOW, REVIEW, REJECT = "allow", "review", "reject"
DECISIONS = (ALLOW, REVIEW, REJECT)
# A signal's mode: enforce its action, record it only (shadow), or skip it.
MODES = ("reject", "review", "shadow", "off")
_SEVERITY = {ALLOW: 0, REVIEW: 1, REJECT: 2}
MAX_THRESHOLD = 1_000_000
MAX_DEVICE_ID_LENGTH = 128

# Providers that deliver "name+anything@" to "name@"; at Gmail dots in the name do not count either.
_GMAIL = frozenset({"gmail.com", "googlemail.com"})
_PLUS_IGNORED = frozenset(
    {
        *_GMAIL,
        "outlook.com",
        "hotmail.com",
        "live.com",
        "icloud.com",
        "me.com",
        "fastmail.com",
        "proton.me",
        "protonmail.com",
    }
)


def normalised_address(email: str) -> str:
    """The mailbox an address really reaches: case folded, +tags and Gmail's dots dropped where ignored."""
    local, _, domain = email.strip().lower().rpartition("@")
    if domain in _PLUS_IGNORED:
        local = local.split("+", 1)[0]
    if domain in _GMAIL:
        local, domain = local.replace(".", ""), "gmail.com"
    return f"{local}@{domain}"


def is_disposable_domain(email: str) -> bool:
    return email.rpartition("@")[2].lower() in DISPOSABLE_DOMAINS


@dataclass(frozen=True)
class FraudRules:
    """Each signal's mode and thresholds; a new deployment starts with these values."""

    self_referral: str = "reject"
    # Referrals from the referrer's own client address allowed before it counts (an office, a family).
    shared_address_allowance: int = 1
    # How far back the referrer's logins count for the same address or device.
    recent_login_days: int = 30
    disposable: str = "reject"
    velocity: str = "review"
    referrals_per_hour: int = 5
    referrals_per_day: int = 20
    registrations_per_address_per_day: int = 5
    young_referrer: str = "shadow"
    young_referrer_hours: int = 24

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, text: str) -> FraudRules:
        return cls(**json.loads(text)) if text else cls()


def validate_fraud_rules(rules: FraudRules) -> list[FieldViolation]:
    violations = []
    for name, value in rules.as_dict().items():
        if isinstance(value, str):
            if value not in MODES:
                violations.append(FieldViolation(f"fraud.{name}", f"must be one of {', '.join(MODES)}"))
        elif not 0 <= value <= MAX_THRESHOLD:
            violations.append(FieldViolation(f"fraud.{name}", f"must be between 0 and {MAX_THRESHOLD}"))
    return violations


@dataclass(frozen=True)
class ClientInfo:
    """Where a call came from: the client address Envoy saw, and the optional x-device-id header."""

    address: str = ""
    device_id: str = ""


@dataclass(frozen=True)
class Reason:
    code: str
    message: str
    # False in shadow mode: recorded, not acted on.
    enforced: bool


@dataclass(frozen=True)
class Decision:
    decision: str
    reasons: list[Reason]
    signals: dict[str, Any]
    rules_version: int
    partial: bool = False


class SignalHasher:
    """Keyed hashes of client addresses and device ids: comparable, never reversible without the key."""

    def __init__(self, secret: str, retention: timedelta) -> None:
        self._key = hmac.new(secret.encode(), b"client-signal-v1", hashlib.sha256).digest()
        self.retention = retention

    def digest(self, value: str) -> str | None:
        return hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest() if value else None

    def record(self, user_id: int, kind: str, client: ClientInfo | None, now: datetime) -> None:
        """Inside a write transaction: keep this signal, and forget the expired ones."""
        ClientSignal.delete().where(ClientSignal.expires_at <= now).execute()
        if client is None or not (client.address or client.device_id):
            return
        ClientSignal.create(
            user=user_id,
            kind=kind,
            address_hash=self.digest(client.address),
            device_hash=self.digest(client.device_id[:MAX_DEVICE_ID_LENGTH]),
            created_at=now,
            expires_at=now + self.retention,
        )


class FraudChecker:
    def __init__(self, hasher: SignalHasher) -> None:
        self._hasher = hasher

    def evaluate(
        self,
        email: str,
        email_status: str,
        referrer: User,
        client: ClientInfo | None,
        rules: FraudRules,
        rules_version: int,
        now: datetime,
    ) -> Decision:
        """Judge a newcomer who used `referrer`'s code; their user row exists, their signal not yet."""
        client = client or ClientInfo()
        address = self._hasher.digest(client.address)
        device = self._hasher.digest(client.device_id[:MAX_DEVICE_ID_LENGTH])
        fired: list[tuple[str, str, str]] = []  # (mode, code, message)
        signals: dict[str, Any] = {}
        partial = False

        if rules.self_referral != "off":
            same_email = normalised_address(email) == normalised_address(referrer.email)
            recent = ClientSignal.select().where(
                (ClientSignal.user == referrer.id)
                & (ClientSignal.created_at > now - timedelta(days=rules.recent_login_days))
                & (ClientSignal.expires_at > now)
            )
            same_device = device is not None and recent.where(ClientSignal.device_hash == device).exists()
            shared = 0
            if address is not None and recent.where(ClientSignal.address_hash == address).exists():
                # Earlier newcomers of this referrer from this same address, plus this one.
                shared = 1 + (
                    ClientSignal.select()
                    .join(User)
                    .where(
                        (User.referrer == referrer.id)
                        & (ClientSignal.kind == "registration")
                        & (ClientSignal.address_hash == address)
                    )
                    .count()
                )
            signals.update(
                same_normalised_email=same_email, same_device=same_device, shared_address_count=shared
            )
            if same_email:
                fired.append(
                    (
                        rules.self_referral,
                        "self_referral_email",
                        "the newcomer's address reaches the referrer's mailbox",
                    )
                )
            if same_device:
                fired.append(
                    (
                        rules.self_referral,
                        "self_referral_device",
                        "the newcomer uses a device the referrer used",
                    )
                )
            if shared > rules.shared_address_allowance:
                fired.append(
                    (
                        rules.self_referral,
                        "self_referral_address",
                        f"{shared} newcomers came from the referrer's own client address "
                        f"(more than {rules.shared_address_allowance})",
                    )
                )

        if rules.disposable != "off":
            listed = is_disposable_domain(email)
            # "error": the verifier could not answer, so its flag is unknown and the decision partial.
            partial = email_status == "error"
            flagged = email_status == "disposable"
            signals.update(disposable_domain_listed=listed, verifier_status=email_status)
            if listed or flagged:
                source = "the disposable-domain list" if listed else "the email verifier"
                fired.append(
                    (rules.disposable, "disposable_email", f"the address is a disposable mailbox ({source})")
                )

        if rules.velocity != "off":
            # The newcomer's own row exists already (same transaction): it is counted once.
            referred = User.select().where(User.referrer == referrer.id)
            last_hour = referred.where(User.created_at > now - timedelta(hours=1)).count()
            last_day = referred.where(User.created_at > now - timedelta(days=1)).count()
            from_address = 0
            if address is not None:
                from_address = (
                    ClientSignal.select()
                    .where(
                        (ClientSignal.kind == "registration")
                        & (ClientSignal.address_hash == address)
                        & (ClientSignal.created_at > now - timedelta(days=1))
                    )
                    .count()
                    + 1
                )
            signals.update(
                referrals_last_hour=last_hour,
                referrals_last_day=last_day,
                registrations_from_address_day=from_address,
            )
            if last_hour > rules.referrals_per_hour:
                fired.append(
                    (
                        rules.velocity,
                        "velocity_referrer_hour",
                        f"{last_hour} referrals for this referrer in an hour "
                        f"(more than {rules.referrals_per_hour})",
                    )
                )
            elif last_day > rules.referrals_per_day:
                fired.append(
                    (
                        rules.velocity,
                        "velocity_referrer_day",
                        f"{last_day} referrals for this referrer in a day "
                        f"(more than {rules.referrals_per_day})",
                    )
                )
            if from_address > rules.registrations_per_address_per_day:
                fired.append(
                    (
                        rules.velocity,
                        "velocity_address_day",
                        f"{from_address} registrations from one client address in a day "
                        f"(more than {rules.registrations_per_address_per_day})",
                    )
                )

        if rules.young_referrer != "off":
            age_hours = int((now - referrer.created_at).total_seconds() // 3600)
            signals["referrer_age_hours"] = age_hours
            if age_hours < rules.young_referrer_hours:
                fired.append(
                    (
                        rules.young_referrer,
                        "young_referrer",
                        f"the referrer's account is {age_hours} hours old "
                        f"(under {rules.young_referrer_hours})",
                    )
                )

        decision = ALLOW
        reasons = []
        for mode, code, message in fired:
            enforced = mode in (REJECT, REVIEW)
            reasons.append(Reason(code, message, enforced))
            if enforced and _SEVERITY[mode] > _SEVERITY[decision]:
                decision = mode
        return Decision(decision, reasons, signals, rules_version, partial)


def stored_fields(decision: Decision) -> dict[str, Any]:
    """The Referral columns that keep a decision."""
    return {
        "fraud_decision": decision.decision,
        "fraud_reasons": json.dumps([asdict(r) for r in decision.reasons]),
        "fraud_signals": json.dumps(decision.signals, sort_keys=True),
        "fraud_rules_version": decision.rules_version,
        "fraud_partial": decision.partial,
    }


def reasons_of(referral: Referral) -> list[Reason]:
    return [Reason(**r) for r in json.loads(referral.fraud_reasons or "[]")]
