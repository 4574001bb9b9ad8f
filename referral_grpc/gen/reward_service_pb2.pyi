import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from . import referral_service_pb2 as _referral_service_pb2
from . import rpc_policy_pb2 as _rpc_policy_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LedgerEntryKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEDGER_ENTRY_KIND_UNSPECIFIED: _ClassVar[LedgerEntryKind]
    REFERRER_REWARD: _ClassVar[LedgerEntryKind]
    REFEREE_REWARD: _ClassVar[LedgerEntryKind]
    REVERSAL: _ClassVar[LedgerEntryKind]
    REDEMPTION: _ClassVar[LedgerEntryKind]
    ADJUSTMENT: _ClassVar[LedgerEntryKind]

class Beneficiary(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BENEFICIARY_UNSPECIFIED: _ClassVar[Beneficiary]
    REFERRER: _ClassVar[Beneficiary]
    REFEREE: _ClassVar[Beneficiary]

class SkipReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SKIP_REASON_UNSPECIFIED: _ClassVar[SkipReason]
    NO_PROGRAM: _ClassVar[SkipReason]
    NO_REFERRER: _ClassVar[SkipReason]
    EVENT_TYPE_NOT_QUALIFYING: _ClassVar[SkipReason]
    CURRENCY_NOT_QUALIFYING: _ClassVar[SkipReason]
    AMOUNT_BELOW_MINIMUM: _ClassVar[SkipReason]
    OUTSIDE_ATTRIBUTION_WINDOW: _ClassVar[SkipReason]
    ALREADY_QUALIFIED: _ClassVar[SkipReason]
    REFERRER_CAP_REACHED: _ClassVar[SkipReason]
    NO_REWARD_CONFIGURED: _ClassVar[SkipReason]
    REFERRAL_REVERSED: _ClassVar[SkipReason]
    REFERRAL_REJECTED: _ClassVar[SkipReason]
    REFEREE_NOT_ELIGIBLE: _ClassVar[SkipReason]
    REFERRAL_IN_REVIEW: _ClassVar[SkipReason]
LEDGER_ENTRY_KIND_UNSPECIFIED: LedgerEntryKind
REFERRER_REWARD: LedgerEntryKind
REFEREE_REWARD: LedgerEntryKind
REVERSAL: LedgerEntryKind
REDEMPTION: LedgerEntryKind
ADJUSTMENT: LedgerEntryKind
BENEFICIARY_UNSPECIFIED: Beneficiary
REFERRER: Beneficiary
REFEREE: Beneficiary
SKIP_REASON_UNSPECIFIED: SkipReason
NO_PROGRAM: SkipReason
NO_REFERRER: SkipReason
EVENT_TYPE_NOT_QUALIFYING: SkipReason
CURRENCY_NOT_QUALIFYING: SkipReason
AMOUNT_BELOW_MINIMUM: SkipReason
OUTSIDE_ATTRIBUTION_WINDOW: SkipReason
ALREADY_QUALIFIED: SkipReason
REFERRER_CAP_REACHED: SkipReason
NO_REWARD_CONFIGURED: SkipReason
REFERRAL_REVERSED: SkipReason
REFERRAL_REJECTED: SkipReason
REFEREE_NOT_ELIGIBLE: SkipReason
REFERRAL_IN_REVIEW: SkipReason

class RecordEventRequest(_message.Message):
    __slots__ = ("event_id", "user_id", "email", "type", "amount_minor", "currency", "occurred_at", "refunds_event_id")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    EMAIL_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    REFUNDS_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    user_id: int
    email: str
    type: str
    amount_minor: int
    currency: str
    occurred_at: _timestamp_pb2.Timestamp
    refunds_event_id: str
    def __init__(self, event_id: _Optional[str] = ..., user_id: _Optional[int] = ..., email: _Optional[str] = ..., type: _Optional[str] = ..., amount_minor: _Optional[int] = ..., currency: _Optional[str] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., refunds_event_id: _Optional[str] = ...) -> None: ...

class RecordEventResponse(_message.Message):
    __slots__ = ("event_id", "duplicate", "referral_state", "rewards", "skipped")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    REFERRAL_STATE_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    duplicate: bool
    referral_state: _referral_service_pb2.ReferralState
    rewards: _containers.RepeatedCompositeFieldContainer[LedgerEntry]
    skipped: _containers.RepeatedCompositeFieldContainer[SkippedReward]
    def __init__(self, event_id: _Optional[str] = ..., duplicate: _Optional[bool] = ..., referral_state: _Optional[_Union[_referral_service_pb2.ReferralState, str]] = ..., rewards: _Optional[_Iterable[_Union[LedgerEntry, _Mapping]]] = ..., skipped: _Optional[_Iterable[_Union[SkippedReward, _Mapping]]] = ...) -> None: ...

class SkippedReward(_message.Message):
    __slots__ = ("beneficiary", "reason")
    BENEFICIARY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    beneficiary: Beneficiary
    reason: SkipReason
    def __init__(self, beneficiary: _Optional[_Union[Beneficiary, str]] = ..., reason: _Optional[_Union[SkipReason, str]] = ...) -> None: ...

class LedgerEntry(_message.Message):
    __slots__ = ("id", "kind", "amount_minor", "currency", "user_id", "referral_user_id", "event_id", "available_at", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    REFERRAL_USER_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: int
    kind: LedgerEntryKind
    amount_minor: int
    currency: str
    user_id: int
    referral_user_id: int
    event_id: str
    available_at: _timestamp_pb2.Timestamp
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[int] = ..., kind: _Optional[_Union[LedgerEntryKind, str]] = ..., amount_minor: _Optional[int] = ..., currency: _Optional[str] = ..., user_id: _Optional[int] = ..., referral_user_id: _Optional[int] = ..., event_id: _Optional[str] = ..., available_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetBalanceRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    def __init__(self, user_id: _Optional[int] = ...) -> None: ...

class GetBalanceResponse(_message.Message):
    __slots__ = ("balances",)
    BALANCES_FIELD_NUMBER: _ClassVar[int]
    balances: _containers.RepeatedCompositeFieldContainer[Balance]
    def __init__(self, balances: _Optional[_Iterable[_Union[Balance, _Mapping]]] = ...) -> None: ...

class Balance(_message.Message):
    __slots__ = ("currency", "available_minor", "pending_minor", "lifetime_earned_minor")
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_MINOR_FIELD_NUMBER: _ClassVar[int]
    PENDING_MINOR_FIELD_NUMBER: _ClassVar[int]
    LIFETIME_EARNED_MINOR_FIELD_NUMBER: _ClassVar[int]
    currency: str
    available_minor: int
    pending_minor: int
    lifetime_earned_minor: int
    def __init__(self, currency: _Optional[str] = ..., available_minor: _Optional[int] = ..., pending_minor: _Optional[int] = ..., lifetime_earned_minor: _Optional[int] = ...) -> None: ...

class ListLedgerEntriesRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "user_id")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    user_id: int
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., user_id: _Optional[int] = ...) -> None: ...

class ListLedgerEntriesResponse(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[LedgerEntry]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[LedgerEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RedeemRewardsRequest(_message.Message):
    __slots__ = ("user_id", "amount_minor", "currency")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    amount_minor: int
    currency: str
    def __init__(self, user_id: _Optional[int] = ..., amount_minor: _Optional[int] = ..., currency: _Optional[str] = ...) -> None: ...

class RedeemRewardsResponse(_message.Message):
    __slots__ = ("entry", "available_minor")
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_MINOR_FIELD_NUMBER: _ClassVar[int]
    entry: LedgerEntry
    available_minor: int
    def __init__(self, entry: _Optional[_Union[LedgerEntry, _Mapping]] = ..., available_minor: _Optional[int] = ...) -> None: ...
