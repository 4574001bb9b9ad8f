"""Typed gRPC client for the referral service: stubs, messages and rich error details.

Every service's stub is here with its most used messages; every message is in `referral_client.v1`.

import grpc
from referral_client import AuthServiceStub, RegisterRequest, error_details
"""

from .errors import ErrorDetails, error_details
from .v1.admin_service_pb2_grpc import AdminServiceStub
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
from .v1.event_service_pb2 import Event, ListEventsRequest, WatchEventsRequest
from .v1.event_service_pb2_grpc import EventServiceStub
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
from .v1.reward_service_pb2 import (
    GetBalanceRequest,
    ListLedgerEntriesRequest,
    RecordEventRequest,
    RecordEventResponse,
    RedeemRewardsRequest,
)
from .v1.reward_service_pb2_grpc import RewardServiceStub
from .v1.webhook_service_pb2 import CreateWebhookEndpointRequest, WebhookEndpoint
from .v1.webhook_service_pb2_grpc import WebhookServiceStub

__all__ = [
    "AdminServiceStub",
    "AuthServiceStub",
    "AuthTokens",
    "ChangePasswordRequest",
    "CreateReferralCodeRequest",
    "CreateWebhookEndpointRequest",
    "DeleteReferralCodeRequest",
    "ErrorDetails",
    "ErrorReason",
    "Event",
    "EventServiceStub",
    "GetBalanceRequest",
    "GetReferralCodeByEmailRequest",
    "GetReferralCodeByEmailResponse",
    "ListEventsRequest",
    "ListLedgerEntriesRequest",
    "ListReferralsRequest",
    "ListReferralsResponse",
    "LoginRequest",
    "LogoutRequest",
    "RecordEventRequest",
    "RecordEventResponse",
    "RedeemRewardsRequest",
    "ReferralCode",
    "ReferralServiceStub",
    "RefreshTokenRequest",
    "RegisterRequest",
    "RequestPasswordResetRequest",
    "ResetPasswordRequest",
    "RewardServiceStub",
    "WatchEventsRequest",
    "WebhookEndpoint",
    "WebhookServiceStub",
    "error_details",
]
