import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from . import rpc_policy_pb2 as _rpc_policy_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Event(_message.Message):
    __slots__ = ("id", "cursor", "type", "occurred_at", "user_registered", "user_password_changed", "code_created", "code_deleted", "referral_created", "referral_qualified", "referral_reversed", "referral_rejected", "reward_credited", "reward_reversed", "reward_redeemed", "user_blocked", "user_unblocked", "balance_adjusted", "program_updated", "referral_approved", "user_deleted")
    ID_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    USER_REGISTERED_FIELD_NUMBER: _ClassVar[int]
    USER_PASSWORD_CHANGED_FIELD_NUMBER: _ClassVar[int]
    CODE_CREATED_FIELD_NUMBER: _ClassVar[int]
    CODE_DELETED_FIELD_NUMBER: _ClassVar[int]
    REFERRAL_CREATED_FIELD_NUMBER: _ClassVar[int]
    REFERRAL_QUALIFIED_FIELD_NUMBER: _ClassVar[int]
    REFERRAL_REVERSED_FIELD_NUMBER: _ClassVar[int]
    REFERRAL_REJECTED_FIELD_NUMBER: _ClassVar[int]
    REWARD_CREDITED_FIELD_NUMBER: _ClassVar[int]
    REWARD_REVERSED_FIELD_NUMBER: _ClassVar[int]
    REWARD_REDEEMED_FIELD_NUMBER: _ClassVar[int]
    USER_BLOCKED_FIELD_NUMBER: _ClassVar[int]
    USER_UNBLOCKED_FIELD_NUMBER: _ClassVar[int]
    BALANCE_ADJUSTED_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_UPDATED_FIELD_NUMBER: _ClassVar[int]
    REFERRAL_APPROVED_FIELD_NUMBER: _ClassVar[int]
    USER_DELETED_FIELD_NUMBER: _ClassVar[int]
    id: str
    cursor: int
    type: str
    occurred_at: _timestamp_pb2.Timestamp
    user_registered: UserRegistered
    user_password_changed: UserPasswordChanged
    code_created: CodeCreated
    code_deleted: CodeDeleted
    referral_created: ReferralCreated
    referral_qualified: ReferralQualified
    referral_reversed: ReferralReversed
    referral_rejected: ReferralRejected
    reward_credited: RewardCredited
    reward_reversed: RewardReversed
    reward_redeemed: RewardRedeemed
    user_blocked: UserBlocked
    user_unblocked: UserUnblocked
    balance_adjusted: BalanceAdjusted
    program_updated: ProgramUpdated
    referral_approved: ReferralApproved
    user_deleted: UserDeleted
    def __init__(self, id: _Optional[str] = ..., cursor: _Optional[int] = ..., type: _Optional[str] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., user_registered: _Optional[_Union[UserRegistered, _Mapping]] = ..., user_password_changed: _Optional[_Union[UserPasswordChanged, _Mapping]] = ..., code_created: _Optional[_Union[CodeCreated, _Mapping]] = ..., code_deleted: _Optional[_Union[CodeDeleted, _Mapping]] = ..., referral_created: _Optional[_Union[ReferralCreated, _Mapping]] = ..., referral_qualified: _Optional[_Union[ReferralQualified, _Mapping]] = ..., referral_reversed: _Optional[_Union[ReferralReversed, _Mapping]] = ..., referral_rejected: _Optional[_Union[ReferralRejected, _Mapping]] = ..., reward_credited: _Optional[_Union[RewardCredited, _Mapping]] = ..., reward_reversed: _Optional[_Union[RewardReversed, _Mapping]] = ..., reward_redeemed: _Optional[_Union[RewardRedeemed, _Mapping]] = ..., user_blocked: _Optional[_Union[UserBlocked, _Mapping]] = ..., user_unblocked: _Optional[_Union[UserUnblocked, _Mapping]] = ..., balance_adjusted: _Optional[_Union[BalanceAdjusted, _Mapping]] = ..., program_updated: _Optional[_Union[ProgramUpdated, _Mapping]] = ..., referral_approved: _Optional[_Union[ReferralApproved, _Mapping]] = ..., user_deleted: _Optional[_Union[UserDeleted, _Mapping]] = ...) -> None: ...

class UserRegistered(_message.Message):
    __slots__ = ("user_id", "referrer_user_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    REFERRER_USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    referrer_user_id: int
    def __init__(self, user_id: _Optional[int] = ..., referrer_user_id: _Optional[int] = ...) -> None: ...

class UserPasswordChanged(_message.Message):
    __slots__ = ("user_id", "via")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    VIA_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    via: str
    def __init__(self, user_id: _Optional[int] = ..., via: _Optional[str] = ...) -> None: ...

class CodeCreated(_message.Message):
    __slots__ = ("user_id", "code", "expires_at")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    code: str
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, user_id: _Optional[int] = ..., code: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CodeDeleted(_message.Message):
    __slots__ = ("user_id", "code")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    code: str
    def __init__(self, user_id: _Optional[int] = ..., code: _Optional[str] = ...) -> None: ...

class ReferralCreated(_message.Message):
    __slots__ = ("referee_user_id", "referrer_user_id", "code")
    REFEREE_USER_ID_FIELD_NUMBER: _ClassVar[int]
    REFERRER_USER_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    referee_user_id: int
    referrer_user_id: int
    code: str
    def __init__(self, referee_user_id: _Optional[int] = ..., referrer_user_id: _Optional[int] = ..., code: _Optional[str] = ...) -> None: ...

class ReferralQualified(_message.Message):
    __slots__ = ("referee_user_id", "referrer_user_id", "qualifying_event_id", "program_version")
    REFEREE_USER_ID_FIELD_NUMBER: _ClassVar[int]
    REFERRER_USER_ID_FIELD_NUMBER: _ClassVar[int]
    QUALIFYING_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_VERSION_FIELD_NUMBER: _ClassVar[int]
    referee_user_id: int
    referrer_user_id: int
    qualifying_event_id: str
    program_version: int
    def __init__(self, referee_user_id: _Optional[int] = ..., referrer_user_id: _Optional[int] = ..., qualifying_event_id: _Optional[str] = ..., program_version: _Optional[int] = ...) -> None: ...

class ReferralReversed(_message.Message):
    __slots__ = ("referee_user_id", "referrer_user_id", "refund_event_id")
    REFEREE_USER_ID_FIELD_NUMBER: _ClassVar[int]
    REFERRER_USER_ID_FIELD_NUMBER: _ClassVar[int]
    REFUND_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    referee_user_id: int
    referrer_user_id: int
    refund_event_id: str
    def __init__(self, referee_user_id: _Optional[int] = ..., referrer_user_id: _Optional[int] = ..., refund_event_id: _Optional[str] = ...) -> None: ...

class ReferralRejected(_message.Message):
    __slots__ = ("referee_user_id", "referrer_user_id", "reason")
    REFEREE_USER_ID_FIELD_NUMBER: _ClassVar[int]
    REFERRER_USER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    referee_user_id: int
    referrer_user_id: int
    reason: str
    def __init__(self, referee_user_id: _Optional[int] = ..., referrer_user_id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class RewardCredited(_message.Message):
    __slots__ = ("user_id", "ledger_entry_id", "kind", "amount_minor", "currency", "referee_user_id", "available_at")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    LEDGER_ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    REFEREE_USER_ID_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_AT_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    ledger_entry_id: int
    kind: str
    amount_minor: int
    currency: str
    referee_user_id: int
    available_at: _timestamp_pb2.Timestamp
    def __init__(self, user_id: _Optional[int] = ..., ledger_entry_id: _Optional[int] = ..., kind: _Optional[str] = ..., amount_minor: _Optional[int] = ..., currency: _Optional[str] = ..., referee_user_id: _Optional[int] = ..., available_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RewardReversed(_message.Message):
    __slots__ = ("user_id", "ledger_entry_id", "reversed_ledger_entry_id", "amount_minor", "currency")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    LEDGER_ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    REVERSED_LEDGER_ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    ledger_entry_id: int
    reversed_ledger_entry_id: int
    amount_minor: int
    currency: str
    def __init__(self, user_id: _Optional[int] = ..., ledger_entry_id: _Optional[int] = ..., reversed_ledger_entry_id: _Optional[int] = ..., amount_minor: _Optional[int] = ..., currency: _Optional[str] = ...) -> None: ...

class RewardRedeemed(_message.Message):
    __slots__ = ("user_id", "ledger_entry_id", "amount_minor", "currency")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    LEDGER_ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    ledger_entry_id: int
    amount_minor: int
    currency: str
    def __init__(self, user_id: _Optional[int] = ..., ledger_entry_id: _Optional[int] = ..., amount_minor: _Optional[int] = ..., currency: _Optional[str] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("after_cursor", "types")
    AFTER_CURSOR_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    after_cursor: int
    types: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, after_cursor: _Optional[int] = ..., types: _Optional[_Iterable[str]] = ...) -> None: ...

class ListEventsRequest(_message.Message):
    __slots__ = ("after_cursor", "types", "page_size")
    AFTER_CURSOR_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    after_cursor: int
    types: _containers.RepeatedScalarFieldContainer[str]
    page_size: int
    def __init__(self, after_cursor: _Optional[int] = ..., types: _Optional[_Iterable[str]] = ..., page_size: _Optional[int] = ...) -> None: ...

class ListEventsResponse(_message.Message):
    __slots__ = ("events", "next_cursor")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    next_cursor: int
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., next_cursor: _Optional[int] = ...) -> None: ...

class UserBlocked(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    def __init__(self, user_id: _Optional[int] = ...) -> None: ...

class UserUnblocked(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    def __init__(self, user_id: _Optional[int] = ...) -> None: ...

class BalanceAdjusted(_message.Message):
    __slots__ = ("user_id", "ledger_entry_id", "amount_minor", "currency")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    LEDGER_ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    ledger_entry_id: int
    amount_minor: int
    currency: str
    def __init__(self, user_id: _Optional[int] = ..., ledger_entry_id: _Optional[int] = ..., amount_minor: _Optional[int] = ..., currency: _Optional[str] = ...) -> None: ...

class ProgramUpdated(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class ReferralApproved(_message.Message):
    __slots__ = ("referee_user_id", "referrer_user_id")
    REFEREE_USER_ID_FIELD_NUMBER: _ClassVar[int]
    REFERRER_USER_ID_FIELD_NUMBER: _ClassVar[int]
    referee_user_id: int
    referrer_user_id: int
    def __init__(self, referee_user_id: _Optional[int] = ..., referrer_user_id: _Optional[int] = ...) -> None: ...

class UserDeleted(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    def __init__(self, user_id: _Optional[int] = ...) -> None: ...
