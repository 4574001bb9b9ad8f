"""Thin servicers: convert the request, call the domain, convert the result."""

from __future__ import annotations

import grpc

from ..domain.auth import PROOF_FIELD, AuthService
from ..domain.data_rights import DataRights
from ..domain.referrals import ReferralService
from ..domain.rewards import RewardService
from ..domain.verification import EmailVerificationService
from ..gen import auth_service_pb2, auth_service_pb2_grpc, referral_service_pb2, referral_service_pb2_grpc
from . import convert
from .interceptors import current_principal, current_signed_principal
from .rewards import referral_state

pb_auth = auth_service_pb2
pb_ref = referral_service_pb2


class AuthServicer(auth_service_pb2_grpc.AuthServiceServicer):
    def __init__(
        self, auth: AuthService, verification: EmailVerificationService, data_rights: DataRights
    ) -> None:
        self._auth = auth
        self._verification = verification
        self._data_rights = data_rights

    def Register(self, request: pb_auth.RegisterRequest, context: grpc.ServicerContext) -> pb_auth.AuthTokens:
        return convert.auth_tokens(
            self._auth.register(
                request.email, request.password, request.referral_code, convert.client_info(context)
            )
        )

    def Login(self, request: pb_auth.LoginRequest, context: grpc.ServicerContext) -> pb_auth.AuthTokens:
        proof = convert.metadata_value(context, PROOF_FIELD)
        return convert.auth_tokens(
            self._auth.login(request.email, request.password, proof, convert.client_info(context))
        )

    def RefreshToken(
        self, request: pb_auth.RefreshTokenRequest, context: grpc.ServicerContext
    ) -> pb_auth.AuthTokens:
        return convert.auth_tokens(self._auth.refresh(request.refresh_token))

    def Logout(self, request: pb_auth.LogoutRequest, context: grpc.ServicerContext) -> pb_auth.LogoutResponse:
        self._auth.logout(current_principal(), request.refresh_token)
        return pb_auth.LogoutResponse()

    def RequestPasswordReset(
        self, request: pb_auth.RequestPasswordResetRequest, context: grpc.ServicerContext
    ) -> pb_auth.RequestPasswordResetResponse:
        self._auth.request_password_reset(request.email)
        return pb_auth.RequestPasswordResetResponse()

    def ResetPassword(
        self, request: pb_auth.ResetPasswordRequest, context: grpc.ServicerContext
    ) -> pb_auth.ResetPasswordResponse:
        self._auth.reset_password(request.token, request.new_password)
        return pb_auth.ResetPasswordResponse()

    def ChangePassword(
        self, request: pb_auth.ChangePasswordRequest, context: grpc.ServicerContext
    ) -> pb_auth.AuthTokens:
        tokens = self._auth.change_password(
            current_principal(), request.current_password, request.new_password
        )
        return convert.auth_tokens(tokens)

    def VerifyEmail(
        self, request: pb_auth.VerifyEmailRequest, context: grpc.ServicerContext
    ) -> pb_auth.VerifyEmailResponse:
        return convert.verified(self._verification.verify(request.token))

    def ResendVerificationEmail(
        self, request: pb_auth.ResendVerificationEmailRequest, context: grpc.ServicerContext
    ) -> pb_auth.ResendVerificationEmailResponse:
        return convert.resent(self._verification.resend(current_principal()))

    def ExportMyData(
        self, request: pb_auth.ExportMyDataRequest, context: grpc.ServicerContext
    ) -> pb_auth.ExportMyDataResponse:
        response = pb_auth.ExportMyDataResponse()
        response.data.update(self._data_rights.export(current_principal().user_id))
        return response

    def DeleteMyAccount(
        self, request: pb_auth.DeleteMyAccountRequest, context: grpc.ServicerContext
    ) -> pb_auth.DeleteMyAccountResponse:
        self._data_rights.erase(current_principal().user_id, request.current_password)
        return pb_auth.DeleteMyAccountResponse()


class ReferralServicer(referral_service_pb2_grpc.ReferralServiceServicer):
    def __init__(self, referrals: ReferralService, rewards: RewardService) -> None:
        self._referrals = referrals
        self._rewards = rewards

    def CreateReferralCode(
        self, request: pb_ref.CreateReferralCodeRequest, context: grpc.ServicerContext
    ) -> pb_ref.ReferralCode:
        expires_at = (
            convert.to_datetime(request.expires_at, "expires_at") if request.HasField("expires_at") else None
        )
        code = self._referrals.create_code(current_principal().user_id, expires_at)
        return pb_ref.ReferralCode(
            code=code.code,
            expires_at=convert.timestamp(code.expires_at),
            created_at=convert.timestamp(code.created_at),
        )

    def DeleteReferralCode(
        self, request: pb_ref.DeleteReferralCodeRequest, context: grpc.ServicerContext
    ) -> pb_ref.DeleteReferralCodeResponse:
        self._referrals.delete_code(current_principal().user_id)
        return pb_ref.DeleteReferralCodeResponse()

    def GetReferralCodeByEmail(
        self, request: pb_ref.GetReferralCodeByEmailRequest, context: grpc.ServicerContext
    ) -> pb_ref.GetReferralCodeByEmailResponse:
        code = self._referrals.get_code_by_email(request.email)
        return pb_ref.GetReferralCodeByEmailResponse(
            code=code.code, expires_at=convert.timestamp(code.expires_at)
        )

    def ListReferrals(
        self, request: pb_ref.ListReferralsRequest, context: grpc.ServicerContext
    ) -> pb_ref.ListReferralsResponse:
        # The token's version is checked by the page's own read (the RPC's policy).
        caller = current_signed_principal()
        page = self._referrals.list_referrals(
            caller.user_id, caller.token_version, request.page_size, request.page_token
        )
        response = pb_ref.ListReferralsResponse(next_page_token=page.next_page_token)
        # Rows added in place and their times set in place: no message built only to be copied.
        add = response.referrals.add
        for r in page.referrals:
            row = add(user_id=r.user_id, email=r.email, state=referral_state(r.state))
            convert.set_timestamp(row.registered_at, r.registered_at)
            if r.qualified_at:
                convert.set_timestamp(row.qualified_at, r.qualified_at)
        return response

    def GetReferralStats(
        self, request: pb_ref.GetReferralStatsRequest, context: grpc.ServicerContext
    ) -> pb_ref.ReferralStats:
        stats = self._rewards.referral_stats(current_principal().user_id)
        return pb_ref.ReferralStats(
            pending=stats.by_state["pending"],
            qualified=stats.by_state["qualified"],
            reversed=stats.by_state["reversed"],
            rejected=stats.by_state["rejected"],
            earned=[
                pb_ref.EarnedAmount(currency=currency, lifetime_earned_minor=total)
                for currency, total in stats.earned.items()
            ],
        )
