"""Composition root: builds the database, cache, queue, clock, verifier and the domain services."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import peewee as pw

from .domain.admin import Administration
from .domain.apikeys import ApiKeyService
from .domain.auth import AuthService, Limits
from .domain.data_rights import DataRights
from .domain.events import EventLog, EventStream
from .domain.fraud import FraudChecker, SignalHasher
from .domain.passwords import PasswordHasher
from .domain.ports import (
    Clock,
    CodeCache,
    EmailDispatcher,
    EmailVerifier,
    EventSignal,
    Rule,
    SystemClock,
    Throttle,
)
from .domain.programs import ProgramService
from .domain.referrals import ReferralService
from .domain.rewards import RewardService
from .domain.tokens import AccessTokens, PageTokens, SuccessorTokens
from .domain.verification import EmailVerificationService, referral_eligibility
from .domain.webhooks import WebhookService
from .settings import Settings
from .store.database import init_database

log = logging.getLogger(__name__)


@dataclass
class App:
    settings: Settings
    db: pw.Database
    clock: Clock
    cache: CodeCache
    verifier: EmailVerifier
    dispatcher: EmailDispatcher
    auth: AuthService
    referrals: ReferralService
    throttle: Throttle
    email_verification: EmailVerificationService
    api_keys: ApiKeyService
    programs: ProgramService
    rewards: RewardService
    admin: Administration
    data_rights: DataRights
    webhooks: WebhookService
    events: EventLog
    event_signal: EventSignal
    event_stream: EventStream

    def release_connection(self) -> None:
        _release_connection(self.db)


def _release_connection(db: pw.Database) -> None:
    """Return a pooled PostgreSQL connection after each RPC; SQLite keeps its per-thread one."""
    if not isinstance(db, pw.SqliteDatabase) and not db.is_closed():
        db.close()


def build_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    cache: CodeCache | None = None,
    verifier: EmailVerifier | None = None,
    dispatcher: EmailDispatcher | None = None,
    throttle: Throttle | None = None,
) -> App:
    """Wire everything; tests pass their own clock (or any collaborator) instead of the real one."""
    from .infra.cache import make_code_cache
    from .infra.event_signal import make_event_signal
    from .infra.hunter import make_email_verifier
    from .infra.outbox import SqlOutbox
    from .infra.tasks import make_dispatcher
    from .infra.throttle import Throttle as RedisThrottle
    from .infra.webhooks import url_checker

    settings.ensure_local_dirs()
    if settings.jwt_secret_generated:
        log.warning("JWT_SECRET is not set: using a random per-process key (development only)")
    db = init_database(settings)
    clock = clock or SystemClock()
    cache = cache if cache is not None else make_code_cache(settings)
    verifier = verifier if verifier is not None else make_email_verifier(settings)
    dispatcher = dispatcher if dispatcher is not None else make_dispatcher(settings, clock)
    throttle = throttle if throttle is not None else RedisThrottle.from_settings(settings, clock)
    limits = Limits(
        login=Rule("login", settings.login_max_failures, settings.login_failure_window),
        proven_login=Rule("login_proven", settings.login_max_failures, settings.login_failure_window),
        reset=Rule("reset", settings.reset_max_requests, settings.reset_request_window),
    )
    hasher = PasswordHasher(settings.bcrypt_rounds, settings.password_pepper, settings.hash_concurrency)
    access = AccessTokens(
        settings.jwt_secret, settings.jwt_issuer, settings.jwt_audience, settings.access_token_ttl, clock
    )
    verification_required = settings.email_verification == "required"
    outbox = SqlOutbox()
    # A resend emails the account's own address, like a reset request: the same limits, its own counter.
    resend_rule = Rule("verification", settings.reset_max_requests, settings.reset_request_window)
    email_verification = EmailVerificationService(
        db=db,
        clock=clock,
        outbox=outbox,
        dispatcher=dispatcher,
        cache=cache,
        throttle=throttle,
        resend_rule=resend_rule,
        required=verification_required,
    )
    signals = SignalHasher(settings.jwt_secret, timedelta(days=settings.signal_retention_days))
    auth = AuthService(
        db=db,
        clock=clock,
        hasher=hasher,
        access_tokens=access,
        successor_tokens=SuccessorTokens(settings.jwt_secret),
        refresh_token_ttl=settings.refresh_token_ttl,
        refresh_reuse_grace=settings.refresh_reuse_grace_seconds,
        reset_token_ttl=settings.reset_token_ttl,
        verifier=verifier,
        outbox=outbox,
        dispatcher=dispatcher,
        throttle=throttle,
        limits=limits,
        reset_request_min_seconds=settings.reset_request_min_seconds,
        email_verification=email_verification,
        fraud=FraudChecker(signals),
        signals=signals,
    )
    # Lookups by email are rate-limited per client address by Envoy (gateway/envoy.yaml), not per
    # target email here: a per-target limit cannot stop enumeration (each guess is a new email) and
    # would throttle everyone looking up one popular referrer's code.
    referrals = ReferralService(
        db=db,
        clock=clock,
        cache=cache,
        page_tokens=PageTokens(settings.jwt_secret),
        max_horizon_days=settings.code_max_horizon_days,
        verification_required=verification_required,
    )
    rewards = RewardService(
        db=db,
        clock=clock,
        outbox=outbox,
        dispatcher=dispatcher,
        page_tokens=PageTokens(settings.jwt_secret, purpose="ledger-page-token-v1"),
        eligible=referral_eligibility(verification_required),
    )
    events = EventLog(db)
    event_signal = make_event_signal(settings)
    return App(
        settings,
        db,
        clock,
        cache,
        verifier,
        dispatcher,
        auth,
        referrals,
        throttle,
        email_verification=email_verification,
        api_keys=ApiKeyService(db, clock),
        programs=ProgramService(db, clock),
        rewards=rewards,
        admin=Administration(
            db, clock, cache, rewards, PageTokens(settings.jwt_secret, purpose="audit-page-token-v1")
        ),
        data_rights=DataRights(db, clock, hasher, cache, throttle, limits.login),
        webhooks=WebhookService(
            db, clock, url_checker(settings), timedelta(hours=settings.webhook_secret_overlap_hours)
        ),
        events=events,
        event_signal=event_signal,
        event_stream=EventStream(events, event_signal, lambda: _release_connection(db)),
    )
