import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from . import rpc_policy_pb2 as _rpc_policy_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReferralState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REFERRAL_STATE_UNSPECIFIED: _ClassVar[ReferralState]
    PENDING: _ClassVar[ReferralState]
    QUALIFIED: _ClassVar[ReferralState]
    REVERSED: _ClassVar[ReferralState]
    REJECTED: _ClassVar[ReferralState]
REFERRAL_STATE_UNSPECIFIED: ReferralState
PENDING: ReferralState
QUALIFIED: ReferralState
REVERSED: ReferralState
REJECTED: ReferralState

class ReferralCode(_message.Message):
    __slots__ = ("code", "expires_at", "created_at")
    CODE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    code: str
    expires_at: _timestamp_pb2.Timestamp
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, code: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateReferralCodeRequest(_message.Message):
    __slots__ = ("expires_at",)
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class DeleteReferralCodeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeleteReferralCodeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetReferralCodeByEmailRequest(_message.Message):
    __slots__ = ("email",)
    EMAIL_FIELD_NUMBER: _ClassVar[int]
    email: str
    def __init__(self, email: _Optional[str] = ...) -> None: ...

class GetReferralCodeByEmailResponse(_message.Message):
    __slots__ = ("code", "expires_at")
    CODE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    code: str
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, code: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListReferralsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListReferralsResponse(_message.Message):
    __slots__ = ("referrals", "next_page_token")
    REFERRALS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    referrals: _containers.RepeatedCompositeFieldContainer[Referral]
    next_page_token: str
    def __init__(self, referrals: _Optional[_Iterable[_Union[Referral, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Referral(_message.Message):
    __slots__ = ("user_id", "email", "registered_at", "state", "qualified_at")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    EMAIL_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    QUALIFIED_AT_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    email: str
    registered_at: _timestamp_pb2.Timestamp
    state: ReferralState
    qualified_at: _timestamp_pb2.Timestamp
    def __init__(self, user_id: _Optional[int] = ..., email: _Optional[str] = ..., registered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[ReferralState, str]] = ..., qualified_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetReferralStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReferralStats(_message.Message):
    __slots__ = ("pending", "qualified", "reversed", "rejected", "earned")
    PENDING_FIELD_NUMBER: _ClassVar[int]
    QUALIFIED_FIELD_NUMBER: _ClassVar[int]
    REVERSED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    EARNED_FIELD_NUMBER: _ClassVar[int]
    pending: int
    qualified: int
    reversed: int
    rejected: int
    earned: _containers.RepeatedCompositeFieldContainer[EarnedAmount]
    def __init__(self, pending: _Optional[int] = ..., qualified: _Optional[int] = ..., reversed: _Optional[int] = ..., rejected: _Optional[int] = ..., earned: _Optional[_Iterable[_Union[EarnedAmount, _Mapping]]] = ...) -> None: ...

class EarnedAmount(_message.Message):
    __slots__ = ("currency", "lifetime_earned_minor")
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    LIFETIME_EARNED_MINOR_FIELD_NUMBER: _ClassVar[int]
    currency: str
    lifetime_earned_minor: int
    def __init__(self, currency: _Optional[str] = ..., lifetime_earned_minor: _Optional[int] = ...) -> None: ...
