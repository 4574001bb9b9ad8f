import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from . import reward_service_pb2 as _reward_service_pb2
from . import rpc_policy_pb2 as _rpc_policy_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReviewDecision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REVIEW_DECISION_UNSPECIFIED: _ClassVar[ReviewDecision]
    APPROVE: _ClassVar[ReviewDecision]
    REJECT: _ClassVar[ReviewDecision]
REVIEW_DECISION_UNSPECIFIED: ReviewDecision
APPROVE: ReviewDecision
REJECT: ReviewDecision

class GetUserRequest(_message.Message):
    __slots__ = ("user_id", "email")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    EMAIL_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    email: str
    def __init__(self, user_id: _Optional[int] = ..., email: _Optional[str] = ...) -> None: ...

class AdminUser(_message.Message):
    __slots__ = ("user_id", "email", "created_at", "email_status", "email_verified", "blocked", "blocked_at", "referrer_user_id", "codes", "referrals_by_state", "balances", "recent_security_events")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    EMAIL_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EMAIL_STATUS_FIELD_NUMBER: _ClassVar[int]
    EMAIL_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_AT_FIELD_NUMBER: _ClassVar[int]
    REFERRER_USER_ID_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    REFERRALS_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    BALANCES_FIELD_NUMBER: _ClassVar[int]
    RECENT_SECURITY_EVENTS_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    email: str
    created_at: _timestamp_pb2.Timestamp
    email_status: str
    email_verified: bool
    blocked: bool
    blocked_at: _timestamp_pb2.Timestamp
    referrer_user_id: int
    codes: _containers.RepeatedCompositeFieldContainer[AdminCode]
    referrals_by_state: _containers.RepeatedCompositeFieldContainer[StateCount]
    balances: _containers.RepeatedCompositeFieldContainer[_reward_service_pb2.Balance]
    recent_security_events: _containers.RepeatedCompositeFieldContainer[AuditEvent]
    def __init__(self, user_id: _Optional[int] = ..., email: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., email_status: _Optional[str] = ..., email_verified: _Optional[bool] = ..., blocked: _Optional[bool] = ..., blocked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., referrer_user_id: _Optional[int] = ..., codes: _Optional[_Iterable[_Union[AdminCode, _Mapping]]] = ..., referrals_by_state: _Optional[_Iterable[_Union[StateCount, _Mapping]]] = ..., balances: _Optional[_Iterable[_Union[_reward_service_pb2.Balance, _Mapping]]] = ..., recent_security_events: _Optional[_Iterable[_Union[AuditEvent, _Mapping]]] = ...) -> None: ...

class AdminCode(_message.Message):
    __slots__ = ("code", "active", "created_at", "expires_at")
    CODE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    code: str
    active: bool
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, code: _Optional[str] = ..., active: _Optional[bool] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class StateCount(_message.Message):
    __slots__ = ("state", "count")
    STATE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    state: str
    count: int
    def __init__(self, state: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class BlockUserRequest(_message.Message):
    __slots__ = ("user_id", "note")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    note: str
    def __init__(self, user_id: _Optional[int] = ..., note: _Optional[str] = ...) -> None: ...

class UnblockUserRequest(_message.Message):
    __slots__ = ("user_id", "note")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    note: str
    def __init__(self, user_id: _Optional[int] = ..., note: _Optional[str] = ...) -> None: ...

class AdjustBalanceRequest(_message.Message):
    __slots__ = ("user_id", "amount_minor", "currency", "reason")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    amount_minor: int
    currency: str
    reason: str
    def __init__(self, user_id: _Optional[int] = ..., amount_minor: _Optional[int] = ..., currency: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class GetProgramRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UpdateProgramRequest(_message.Message):
    __slots__ = ("program",)
    PROGRAM_FIELD_NUMBER: _ClassVar[int]
    program: Program
    def __init__(self, program: _Optional[_Union[Program, _Mapping]] = ...) -> None: ...

class Program(_message.Message):
    __slots__ = ("version", "created_at", "currency", "event_types", "min_amount_minor", "attribution_days", "referrer_reward_minor", "referrer_reward_bps", "referrer_reward_cap_minor", "referee_reward_minor", "referee_reward_bps", "referee_reward_cap_minor", "hold_days", "max_rewarded_referrals", "fraud")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPES_FIELD_NUMBER: _ClassVar[int]
    MIN_AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_DAYS_FIELD_NUMBER: _ClassVar[int]
    REFERRER_REWARD_MINOR_FIELD_NUMBER: _ClassVar[int]
    REFERRER_REWARD_BPS_FIELD_NUMBER: _ClassVar[int]
    REFERRER_REWARD_CAP_MINOR_FIELD_NUMBER: _ClassVar[int]
    REFEREE_REWARD_MINOR_FIELD_NUMBER: _ClassVar[int]
    REFEREE_REWARD_BPS_FIELD_NUMBER: _ClassVar[int]
    REFEREE_REWARD_CAP_MINOR_FIELD_NUMBER: _ClassVar[int]
    HOLD_DAYS_FIELD_NUMBER: _ClassVar[int]
    MAX_REWARDED_REFERRALS_FIELD_NUMBER: _ClassVar[int]
    FRAUD_FIELD_NUMBER: _ClassVar[int]
    version: int
    created_at: _timestamp_pb2.Timestamp
    currency: str
    event_types: _containers.RepeatedScalarFieldContainer[str]
    min_amount_minor: int
    attribution_days: int
    referrer_reward_minor: int
    referrer_reward_bps: int
    referrer_reward_cap_minor: int
    referee_reward_minor: int
    referee_reward_bps: int
    referee_reward_cap_minor: int
    hold_days: int
    max_rewarded_referrals: int
    fraud: FraudRules
    def __init__(self, version: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., currency: _Optional[str] = ..., event_types: _Optional[_Iterable[str]] = ..., min_amount_minor: _Optional[int] = ..., attribution_days: _Optional[int] = ..., referrer_reward_minor: _Optional[int] = ..., referrer_reward_bps: _Optional[int] = ..., referrer_reward_cap_minor: _Optional[int] = ..., referee_reward_minor: _Optional[int] = ..., referee_reward_bps: _Optional[int] = ..., referee_reward_cap_minor: _Optional[int] = ..., hold_days: _Optional[int] = ..., max_rewarded_referrals: _Optional[int] = ..., fraud: _Optional[_Union[FraudRules, _Mapping]] = ...) -> None: ...

class FraudRules(_message.Message):
    __slots__ = ("self_referral", "shared_address_allowance", "recent_login_days", "disposable", "velocity", "referrals_per_hour", "referrals_per_day", "registrations_per_address_per_day", "young_referrer", "young_referrer_hours")
    SELF_REFERRAL_FIELD_NUMBER: _ClassVar[int]
    SHARED_ADDRESS_ALLOWANCE_FIELD_NUMBER: _ClassVar[int]
    RECENT_LOGIN_DAYS_FIELD_NUMBER: _ClassVar[int]
    DISPOSABLE_FIELD_NUMBER: _ClassVar[int]
    VELOCITY_FIELD_NUMBER: _ClassVar[int]
    REFERRALS_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    REFERRALS_PER_DAY_FIELD_NUMBER: _ClassVar[int]
    REGISTRATIONS_PER_ADDRESS_PER_DAY_FIELD_NUMBER: _ClassVar[int]
    YOUNG_REFERRER_FIELD_NUMBER: _ClassVar[int]
    YOUNG_REFERRER_HOURS_FIELD_NUMBER: _ClassVar[int]
    self_referral: str
    shared_address_allowance: int
    recent_login_days: int
    disposable: str
    velocity: str
    referrals_per_hour: int
    referrals_per_day: int
    registrations_per_address_per_day: int
    young_referrer: str
    young_referrer_hours: int
    def __init__(self, self_referral: _Optional[str] = ..., shared_address_allowance: _Optional[int] = ..., recent_login_days: _Optional[int] = ..., disposable: _Optional[str] = ..., velocity: _Optional[str] = ..., referrals_per_hour: _Optional[int] = ..., referrals_per_day: _Optional[int] = ..., registrations_per_address_per_day: _Optional[int] = ..., young_referrer: _Optional[str] = ..., young_referrer_hours: _Optional[int] = ...) -> None: ...

class ListReferralsForReviewRequest(_message.Message):
    __slots__ = ("state", "page_size", "page_token")
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    state: str
    page_size: int
    page_token: str
    def __init__(self, state: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListReferralsForReviewResponse(_message.Message):
    __slots__ = ("referrals", "next_page_token")
    REFERRALS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    referrals: _containers.RepeatedCompositeFieldContainer[ReviewedReferral]
    next_page_token: str
    def __init__(self, referrals: _Optional[_Iterable[_Union[ReviewedReferral, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DecideReferralRequest(_message.Message):
    __slots__ = ("user_id", "decision", "note")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    decision: ReviewDecision
    note: str
    def __init__(self, user_id: _Optional[int] = ..., decision: _Optional[_Union[ReviewDecision, str]] = ..., note: _Optional[str] = ...) -> None: ...

class ReviewedReferral(_message.Message):
    __slots__ = ("user_id", "referrer_user_id", "state", "decision", "reasons", "rules_version", "signals", "partial", "created_at", "review_outcome", "review_note", "reviewed_at", "fraud_signals")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    REFERRER_USER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    RULES_VERSION_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REVIEW_OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REVIEW_NOTE_FIELD_NUMBER: _ClassVar[int]
    REVIEWED_AT_FIELD_NUMBER: _ClassVar[int]
    FRAUD_SIGNALS_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    referrer_user_id: int
    state: str
    decision: str
    reasons: _containers.RepeatedCompositeFieldContainer[FraudReason]
    rules_version: int
    signals: str
    partial: bool
    created_at: _timestamp_pb2.Timestamp
    review_outcome: str
    review_note: str
    reviewed_at: _timestamp_pb2.Timestamp
    fraud_signals: FraudSignals
    def __init__(self, user_id: _Optional[int] = ..., referrer_user_id: _Optional[int] = ..., state: _Optional[str] = ..., decision: _Optional[str] = ..., reasons: _Optional[_Iterable[_Union[FraudReason, _Mapping]]] = ..., rules_version: _Optional[int] = ..., signals: _Optional[str] = ..., partial: _Optional[bool] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., review_outcome: _Optional[str] = ..., review_note: _Optional[str] = ..., reviewed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., fraud_signals: _Optional[_Union[FraudSignals, _Mapping]] = ...) -> None: ...

class FraudSignals(_message.Message):
    __slots__ = ("same_normalised_email", "same_device", "shared_address_count", "disposable_domain_listed", "verifier_status", "referrals_last_hour", "referrals_last_day", "registrations_from_address_day", "referrer_age_hours")
    SAME_NORMALISED_EMAIL_FIELD_NUMBER: _ClassVar[int]
    SAME_DEVICE_FIELD_NUMBER: _ClassVar[int]
    SHARED_ADDRESS_COUNT_FIELD_NUMBER: _ClassVar[int]
    DISPOSABLE_DOMAIN_LISTED_FIELD_NUMBER: _ClassVar[int]
    VERIFIER_STATUS_FIELD_NUMBER: _ClassVar[int]
    REFERRALS_LAST_HOUR_FIELD_NUMBER: _ClassVar[int]
    REFERRALS_LAST_DAY_FIELD_NUMBER: _ClassVar[int]
    REGISTRATIONS_FROM_ADDRESS_DAY_FIELD_NUMBER: _ClassVar[int]
    REFERRER_AGE_HOURS_FIELD_NUMBER: _ClassVar[int]
    same_normalised_email: bool
    same_device: bool
    shared_address_count: int
    disposable_domain_listed: bool
    verifier_status: str
    referrals_last_hour: int
    referrals_last_day: int
    registrations_from_address_day: int
    referrer_age_hours: int
    def __init__(self, same_normalised_email: _Optional[bool] = ..., same_device: _Optional[bool] = ..., shared_address_count: _Optional[int] = ..., disposable_domain_listed: _Optional[bool] = ..., verifier_status: _Optional[str] = ..., referrals_last_hour: _Optional[int] = ..., referrals_last_day: _Optional[int] = ..., registrations_from_address_day: _Optional[int] = ..., referrer_age_hours: _Optional[int] = ...) -> None: ...

class FraudReason(_message.Message):
    __slots__ = ("code", "message", "enforced")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ENFORCED_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    enforced: bool
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., enforced: _Optional[bool] = ...) -> None: ...

class ListAuditEventsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "actor", "target")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    actor: str
    target: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., actor: _Optional[str] = ..., target: _Optional[str] = ...) -> None: ...

class ListAuditEventsResponse(_message.Message):
    __slots__ = ("events", "next_page_token")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[AuditEvent]
    next_page_token: str
    def __init__(self, events: _Optional[_Iterable[_Union[AuditEvent, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("seq", "created_at", "actor", "action", "target", "before", "after", "request_id")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    seq: int
    created_at: _timestamp_pb2.Timestamp
    actor: str
    action: str
    target: str
    before: str
    after: str
    request_id: str
    def __init__(self, seq: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., action: _Optional[str] = ..., target: _Optional[str] = ..., before: _Optional[str] = ..., after: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...
