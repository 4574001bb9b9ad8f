from google.protobuf import descriptor_pb2 as _descriptor_pb2
from . import error_reason_pb2 as _error_reason_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor
POLICY_FIELD_NUMBER: _ClassVar[int]
policy: _descriptor.FieldDescriptor

class RpcPolicy(_message.Message):
    __slots__ = ("public", "blocking", "quiet", "errors")
    PUBLIC_FIELD_NUMBER: _ClassVar[int]
    BLOCKING_FIELD_NUMBER: _ClassVar[int]
    QUIET_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    public: bool
    blocking: bool
    quiet: bool
    errors: _containers.RepeatedScalarFieldContainer[_error_reason_pb2.ErrorReason]
    def __init__(self, public: _Optional[bool] = ..., blocking: _Optional[bool] = ..., quiet: _Optional[bool] = ..., errors: _Optional[_Iterable[_Union[_error_reason_pb2.ErrorReason, str]]] = ...) -> None: ...
