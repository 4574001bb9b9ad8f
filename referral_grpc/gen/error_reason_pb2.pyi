from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    INVALID_ARGUMENT: _ClassVar[ErrorReason]
    FIELD_REQUIRED: _ClassVar[ErrorReason]
    FIELD_TOO_LONG: _ClassVar[ErrorReason]
    FIELD_INVALID: _ClassVar[ErrorReason]
    TIMESTAMP_INVALID: _ClassVar[ErrorReason]
    EMAIL_INVALID: _ClassVar[ErrorReason]
    EMAIL_REQUIRED: _ClassVar[ErrorReason]
    EMAIL_UNDELIVERABLE: _ClassVar[ErrorReason]
    EMAIL_TAKEN: _ClassVar[ErrorReason]
    PASSWORD_INVALID: _ClassVar[ErrorReason]
    PASSWORD_TOO_SHORT: _ClassVar[ErrorReason]
    PASSWORD_TOO_LONG: _ClassVar[ErrorReason]
    PASSWORD_TOO_COMMON: _ClassVar[ErrorReason]
    WRONG_PASSWORD: _ClassVar[ErrorReason]
    INVALID_CREDENTIALS: _ClassVar[ErrorReason]
    INVALID_TOKEN: _ClassVar[ErrorReason]
    INVALID_REFRESH_TOKEN: _ClassVar[ErrorReason]
    RESET_TOKEN_INVALID: _ClassVar[ErrorReason]
    VERIFICATION_TOKEN_INVALID: _ClassVar[ErrorReason]
    REFERRAL_CODE_INVALID: _ClassVar[ErrorReason]
    REFERRAL_CODE_UNKNOWN: _ClassVar[ErrorReason]
    REFERRAL_CODE_EXPIRED: _ClassVar[ErrorReason]
    REFERRAL_CODE_NOT_FOUND: _ClassVar[ErrorReason]
    EXPIRY_IN_PAST: _ClassVar[ErrorReason]
    EXPIRY_TOO_FAR: _ClassVar[ErrorReason]
    PAGE_TOKEN_INVALID: _ClassVar[ErrorReason]
    PAGE_SIZE_NEGATIVE: _ClassVar[ErrorReason]
    USER_NOT_FOUND: _ClassVar[ErrorReason]
    CONCURRENT_UPDATE: _ClassVar[ErrorReason]
    TOO_MANY_ATTEMPTS: _ClassVar[ErrorReason]
    DATABASE_BUSY: _ClassVar[ErrorReason]
    DATABASE_UNAVAILABLE: _ClassVar[ErrorReason]
    DEADLINE_EXCEEDED: _ClassVar[ErrorReason]
ERROR_REASON_UNSPECIFIED: ErrorReason
INVALID_ARGUMENT: ErrorReason
FIELD_REQUIRED: ErrorReason
FIELD_TOO_LONG: ErrorReason
FIELD_INVALID: ErrorReason
TIMESTAMP_INVALID: ErrorReason
EMAIL_INVALID: ErrorReason
EMAIL_REQUIRED: ErrorReason
EMAIL_UNDELIVERABLE: ErrorReason
EMAIL_TAKEN: ErrorReason
PASSWORD_INVALID: ErrorReason
PASSWORD_TOO_SHORT: ErrorReason
PASSWORD_TOO_LONG: ErrorReason
PASSWORD_TOO_COMMON: ErrorReason
WRONG_PASSWORD: ErrorReason
INVALID_CREDENTIALS: ErrorReason
INVALID_TOKEN: ErrorReason
INVALID_REFRESH_TOKEN: ErrorReason
RESET_TOKEN_INVALID: ErrorReason
VERIFICATION_TOKEN_INVALID: ErrorReason
REFERRAL_CODE_INVALID: ErrorReason
REFERRAL_CODE_UNKNOWN: ErrorReason
REFERRAL_CODE_EXPIRED: ErrorReason
REFERRAL_CODE_NOT_FOUND: ErrorReason
EXPIRY_IN_PAST: ErrorReason
EXPIRY_TOO_FAR: ErrorReason
PAGE_TOKEN_INVALID: ErrorReason
PAGE_SIZE_NEGATIVE: ErrorReason
USER_NOT_FOUND: ErrorReason
CONCURRENT_UPDATE: ErrorReason
TOO_MANY_ATTEMPTS: ErrorReason
DATABASE_BUSY: ErrorReason
DATABASE_UNAVAILABLE: ErrorReason
DEADLINE_EXCEEDED: ErrorReason
