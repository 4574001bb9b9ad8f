"""Typed gRPC client for the referral service: stubs, messages and rich error details.

import grpc
from referral_client import AuthServiceStub, RegisterRequest, error_details
"""

from .errors import ErrorDetails, error_details
from .v1.auth_service_pb2 import (
    AuthTokens,
    ChangePasswordRequest,
    LoginRequest,
    LogoutRequest,
    RefreshTokenRequest,
    RegisterRequest,
    RequestPasswordResetRequest,
    ResetPasswordRequest,
)
from .v1.auth_service_pb2_grpc import AuthServiceStub
from .v1.error_reason_pb2 import ErrorReason
from .v1.referral_service_pb2 import (
    CreateReferralCodeRequest,
    DeleteReferralCodeRequest,
    GetReferralCodeByEmailRequest,
    GetReferralCodeByEmailResponse,
    ListReferralsRequest,
    ListReferralsResponse,
    ReferralCode,
)
from .v1.referral_service_pb2_grpc import ReferralServiceStub

__all__ = [
    "AuthServiceStub",
    "AuthTokens",
    "ChangePasswordRequest",
    "CreateReferralCodeRequest",
    "DeleteReferralCodeRequest",
    "ErrorDetails",
    "ErrorReason",
    "GetReferralCodeByEmailRequest",
    "GetReferralCodeByEmailResponse",
    "ListReferralsRequest",
    "ListReferralsResponse",
    "LoginRequest",
    "LogoutRequest",
    "ReferralCode",
    "ReferralServiceStub",
    "RefreshTokenRequest",
    "RegisterRequest",
    "RequestPasswordResetRequest",
    "ResetPasswordRequest",
    "error_details",
]
