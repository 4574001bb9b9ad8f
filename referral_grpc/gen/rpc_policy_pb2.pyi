from google.protobuf import descriptor_pb2 as _descriptor_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor
POLICY_FIELD_NUMBER: _ClassVar[int]
policy: _descriptor.FieldDescriptor

class RpcPolicy(_message.Message):
    __slots__ = ("public", "blocking", "quiet")
    PUBLIC_FIELD_NUMBER: _ClassVar[int]
    BLOCKING_FIELD_NUMBER: _ClassVar[int]
    QUIET_FIELD_NUMBER: _ClassVar[int]
    public: bool
    blocking: bool
    quiet: bool
    def __init__(self, public: _Optional[bool] = ..., blocking: _Optional[bool] = ..., quiet: _Optional[bool] = ...) -> None: ...
