from google.protobuf import descriptor_pb2 as _descriptor_pb2
from . import error_reason_pb2 as _error_reason_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Idempotency(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IDEMPOTENCY_UNSPECIFIED: _ClassVar[Idempotency]
    IDEMPOTENCY_OPTIONAL: _ClassVar[Idempotency]
    IDEMPOTENCY_REQUIRED: _ClassVar[Idempotency]
IDEMPOTENCY_UNSPECIFIED: Idempotency
IDEMPOTENCY_OPTIONAL: Idempotency
IDEMPOTENCY_REQUIRED: Idempotency
POLICY_FIELD_NUMBER: _ClassVar[int]
policy: _descriptor.FieldDescriptor

class RpcPolicy(_message.Message):
    __slots__ = ("public", "blocking", "quiet", "api_key_scopes", "user_token_allowed", "idempotency", "errors", "token_version_in_handler")
    PUBLIC_FIELD_NUMBER: _ClassVar[int]
    BLOCKING_FIELD_NUMBER: _ClassVar[int]
    QUIET_FIELD_NUMBER: _ClassVar[int]
    API_KEY_SCOPES_FIELD_NUMBER: _ClassVar[int]
    USER_TOKEN_ALLOWED_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_VERSION_IN_HANDLER_FIELD_NUMBER: _ClassVar[int]
    public: bool
    blocking: bool
    quiet: bool
    api_key_scopes: _containers.RepeatedScalarFieldContainer[str]
    user_token_allowed: bool
    idempotency: Idempotency
    errors: _containers.RepeatedScalarFieldContainer[_error_reason_pb2.ErrorReason]
    token_version_in_handler: bool
    def __init__(self, public: _Optional[bool] = ..., blocking: _Optional[bool] = ..., quiet: _Optional[bool] = ..., api_key_scopes: _Optional[_Iterable[str]] = ..., user_token_allowed: _Optional[bool] = ..., idempotency: _Optional[_Union[Idempotency, str]] = ..., errors: _Optional[_Iterable[_Union[_error_reason_pb2.ErrorReason, str]]] = ..., token_version_in_handler: _Optional[bool] = ...) -> None: ...
