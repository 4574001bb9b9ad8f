"""The gRPC API end to end on a real server and channel, on PostgreSQL and on SQLite."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support import TEST_JWT_SECRET, FakeClock
from support.api import Api, bearer, expect_error, in_days, ts

from referral_grpc.api.errors import send_headers_with_the_answer
from referral_grpc.api.interceptors import current_principal, current_signed_principal
from referral_grpc.api.policy import POLICIES
from referral_grpc.domain.codes import ALPHABET, CODE_LENGTH
from referral_grpc.domain.errors import Unauthenticated
from referral_grpc.gen import auth_service_pb2 as auth_pb
from referral_grpc.gen import referral_service_pb2 as ref_pb
from referral_grpc.request_context import Principal, SignedPrincipal, caller
from referral_grpc.store.models import PasswordResetToken, Referral, ReferralCode, RefreshToken, User

PASSWORD = "correct horse battery"


def login(api: Api, email: str, password: str = PASSWORD) -> auth_pb.AuthTokens:
    return api.auth.Login(auth_pb.LoginRequest(email=email, password=password))


def create_code(api: Api, token: str, clock: FakeClock, days: float = 30) -> ref_pb.ReferralCode:
    request = ref_pb.CreateReferralCodeRequest(expires_at=in_days(clock, days))
    return api.referrals.CreateReferralCode(request, metadata=bearer(token))


def lookup(api: Api, email: str) -> ref_pb.GetReferralCodeByEmailResponse:
    return api.referrals.GetReferralCodeByEmail(ref_pb.GetReferralCodeByEmailRequest(email=email))


# --- registration and login ------------------------------------------------------------------


def test_register_returns_tokens_and_stores_a_bcrypt_hash(api: Api) -> None:
    tokens = api.register("Alice@Example.COM")
    assert tokens.user_id > 0
    assert tokens.token_type == "Bearer"
    assert tokens.expires_in == 900
    assert tokens.refresh_token and tokens.refresh_expires_in == 30 * 86400
    claims = jwt.decode(tokens.access_token, TEST_JWT_SECRET, algorithms=["HS256"], audience="referral-api")
    assert claims["sub"] == str(tokens.user_id)
    assert claims["iss"] == "referral-grpc"
    assert claims["exp"] - claims["iat"] == 900
    user = User.get_by_id(tokens.user_id)
    # email-validator lower-cases the domain; the key used for uniqueness is all lower case.
    assert user.email == "Alice@example.com"
    assert user.email_key == "alice@example.com"
    assert user.password_hash.startswith("$2b$04$")
    assert PASSWORD not in user.password_hash
    welcome = api.outbox("welcome")
    assert [row.recipient for row in welcome] == ["Alice@example.com"]


def test_email_is_unique_case_insensitively(api: Api) -> None:
    api.register("bob@example.com")
    err = expect_error(api.register, "BOB@Example.com")
    assert err.code == grpc.StatusCode.ALREADY_EXISTS
    assert err.reason == "EMAIL_TAKEN"
    assert User.select().count() == 1


def test_login_accepts_any_case_and_hides_which_part_was_wrong(api: Api) -> None:
    registered = api.register("carol@example.com")
    assert login(api, "CAROL@example.com").user_id == registered.user_id
    wrong_password = expect_error(login, api, "carol@example.com", "not the password")
    unknown_email = expect_error(login, api, "nobody@example.com", PASSWORD)
    for err in (wrong_password, unknown_email):
        assert err.code == grpc.StatusCode.UNAUTHENTICATED
        assert err.reason == "INVALID_CREDENTIALS"
    assert wrong_password.message == unknown_email.message


@pytest.mark.parametrize(
    ("email", "password", "field"),
    [
        ("not-an-email", PASSWORD, "email"),
        ("", PASSWORD, "email"),
        ("a\x00b@example.com", PASSWORD, "email"),
        ("x" * 250 + "@example.com", PASSWORD, "email"),
        ("dave@example.com", "short", "password"),
        ("dave@example.com", "p" * 129, "password"),
    ],
)
def test_register_rejects_bad_input_with_field_violations(
    api: Api, email: str, password: str, field: str
) -> None:
    err = expect_error(api.register, email, password)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.fields
    assert err.reason
    assert User.select().count() == 0


def test_long_passwords_are_not_truncated_at_72_bytes(api: Api) -> None:
    long_password = "é" * 40 + "A"  # 81 bytes in UTF-8
    api.register("erin@example.com", long_password)
    assert login(api, "erin@example.com", long_password).user_id
    # Same first 72 bytes, different tail: bcrypt alone would accept it.
    err = expect_error(login, api, "erin@example.com", "é" * 40 + "B")
    assert err.code == grpc.StatusCode.UNAUTHENTICATED


def test_unicode_passphrases_are_accepted(api: Api) -> None:
    passphrase = "пароль из нескольких слов 🔑 and more"
    api.register("frank@example.com", passphrase)
    assert login(api, "frank@example.com", passphrase).access_token


# --- access tokens ---------------------------------------------------------------------------


def _forge(claims: dict[str, object], key: str = TEST_JWT_SECRET, alg: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=alg)


def test_bad_access_tokens_are_unauthenticated(api: Api, clock: FakeClock) -> None:
    tokens = api.register("gina@example.com")
    good = jwt.decode(tokens.access_token, options={"verify_signature": False})
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "typ": "JWT"}).encode()).rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(good).encode()).rstrip(b"=")
    bad_tokens = {
        "missing": None,
        "malformed": "not.a.jwt",
        "forged": _forge(good, key="another-key-that-is-long-enough-32b!"),
        "alg none": (header + b"." + body + b".").decode(),
        "wrong audience": _forge({**good, "aud": "someone-else"}),
        "wrong issuer": _forge({**good, "iss": "someone-else"}),
        "no exp": _forge({k: v for k, v in good.items() if k != "exp"}),
        "no sub": _forge({k: v for k, v in good.items() if k != "sub"}),
        "future nbf": _forge({**good, "nbf": good["iat"] + 3600}),
        "not an access token": _forge({**good, "typ": "refresh"}),
        "refresh token as bearer": tokens.refresh_token,
    }
    request = ref_pb.ListReferralsRequest()
    for name, token in bad_tokens.items():
        metadata = bearer(token) if token else ()
        err = expect_error(api.referrals.ListReferrals, request, metadata=metadata)
        assert err.code == grpc.StatusCode.UNAUTHENTICATED, name
        assert err.message == "missing or invalid access token", name
    assert api.referrals.ListReferrals(request, metadata=bearer(tokens.access_token)).referrals == []
    clock.advance(minutes=15, seconds=1)
    err = expect_error(api.referrals.ListReferrals, request, metadata=bearer(tokens.access_token))
    assert err.code == grpc.StatusCode.UNAUTHENTICATED


def test_claims_of_the_wrong_type_are_unauthenticated(api: Api) -> None:
    tokens = api.register("ola@example.com")
    good = jwt.decode(tokens.access_token, options={"verify_signature": False})
    uid = str(tokens.user_id)
    request = ref_pb.ListReferralsRequest()
    # The forgery itself is sound: only the claim under test differs.
    api.referrals.ListReferrals(request, metadata=bearer(_forge(good)))
    arabic_indic = "".join(chr(0x0660 + int(digit)) for digit in uid)
    bad_claims = {
        "exp as the string nan": {"exp": "nan"},
        "exp as a numeric string": {"exp": str(good["exp"])},
        "exp as a float": {"exp": float(good["exp"])},
        "exp as true": {"exp": True},
        "iat as a string": {"iat": str(good["iat"])},
        "nbf as a string": {"nbf": str(good["nbf"])},
        "sub with a space": {"sub": f" {uid}"},
        "sub with a plus": {"sub": f"+{uid}"},
        "sub with a leading zero": {"sub": f"0{uid}"},
        "sub in Arabic-Indic digits": {"sub": arabic_indic},
        "sub as a number": {"sub": tokens.user_id},
        "ver as a string": {"ver": "0"},
        "ver as a float": {"ver": 0.9},
        "ver as false": {"ver": False},
    }
    for name, override in bad_claims.items():
        err = expect_error(
            api.referrals.ListReferrals, request, metadata=bearer(_forge({**good, **override}))
        )
        assert err.code == grpc.StatusCode.UNAUTHENTICATED, name


def test_a_deleted_users_id_is_never_given_to_the_next_user(api: Api) -> None:
    """SQLite reused the last id after a delete; the deleted user's token then acted as the newcomer."""
    api.register("first@example.com")
    gone = api.register("gone@example.com")
    User.delete().where(User.id == gone.user_id).execute()
    newcomer = api.register("newcomer@example.com")
    assert newcomer.user_id > gone.user_id
    err = expect_error(
        api.referrals.ListReferrals, ref_pb.ListReferralsRequest(), metadata=bearer(gone.access_token)
    )
    assert err.code == grpc.StatusCode.UNAUTHENTICATED


def test_token_of_a_deleted_user_is_rejected(api: Api) -> None:
    tokens = api.register("hank@example.com")
    User.delete().where(User.id == tokens.user_id).execute()
    err = expect_error(
        api.referrals.ListReferrals, ref_pb.ListReferralsRequest(), metadata=bearer(tokens.access_token)
    )
    assert err.code == grpc.StatusCode.UNAUTHENTICATED


# --- password change and reset ---------------------------------------------------------------


def test_change_password_requires_the_current_one_and_revokes_old_tokens(api: Api) -> None:
    tokens = api.register("ivy@example.com")
    change = api.auth.ChangePassword
    wrong = expect_error(
        change,
        auth_pb.ChangePasswordRequest(current_password="wrong password", new_password="a new passphrase"),
        metadata=bearer(tokens.access_token),
    )
    assert wrong.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "current_password" in wrong.fields
    unauthenticated = expect_error(
        change, auth_pb.ChangePasswordRequest(current_password=PASSWORD, new_password="a new passphrase")
    )
    assert unauthenticated.code == grpc.StatusCode.UNAUTHENTICATED

    fresh = change(
        auth_pb.ChangePasswordRequest(current_password=PASSWORD, new_password="a new passphrase"),
        metadata=bearer(tokens.access_token),
    )
    assert fresh.access_token != tokens.access_token
    old = expect_error(
        api.referrals.ListReferrals, ref_pb.ListReferralsRequest(), metadata=bearer(tokens.access_token)
    )
    assert old.code == grpc.StatusCode.UNAUTHENTICATED
    api.referrals.ListReferrals(ref_pb.ListReferralsRequest(), metadata=bearer(fresh.access_token))
    assert expect_error(login, api, "ivy@example.com", PASSWORD).code == grpc.StatusCode.UNAUTHENTICATED
    assert login(api, "ivy@example.com", "a new passphrase").user_id == tokens.user_id
    # The refresh token issued before the change is revoked too.
    refresh = expect_error(
        api.auth.RefreshToken, auth_pb.RefreshTokenRequest(refresh_token=tokens.refresh_token)
    )
    assert refresh.code == grpc.StatusCode.UNAUTHENTICATED
    assert [row.recipient for row in api.outbox("password_changed")] == ["ivy@example.com"]


def test_password_reset_is_two_steps_single_use_and_private(api: Api, clock: FakeClock) -> None:
    tokens = api.register("jack@example.com")
    unknown = api.auth.RequestPasswordReset(auth_pb.RequestPasswordResetRequest(email="nobody@example.com"))
    known = api.auth.RequestPasswordReset(auth_pb.RequestPasswordResetRequest(email="JACK@example.com"))
    assert unknown == known == auth_pb.RequestPasswordResetResponse()
    assert [row.recipient for row in api.outbox("password_reset")] == ["jack@example.com"]
    token = api.reset_token_for("jack@example.com")
    # Only the hash is stored.
    assert PasswordResetToken.select().where(PasswordResetToken.token_hash == token).count() == 0
    # Asking for a reset changes nothing until it is confirmed.
    assert login(api, "jack@example.com").user_id == tokens.user_id

    api.auth.ResetPassword(auth_pb.ResetPasswordRequest(token=token, new_password="brand new secret"))
    assert login(api, "jack@example.com", "brand new secret").user_id == tokens.user_id
    assert expect_error(login, api, "jack@example.com").code == grpc.StatusCode.UNAUTHENTICATED
    reused = expect_error(
        api.auth.ResetPassword, auth_pb.ResetPasswordRequest(token=token, new_password="another secret!")
    )
    assert reused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "token" in reused.fields
    old = expect_error(
        api.referrals.ListReferrals, ref_pb.ListReferralsRequest(), metadata=bearer(tokens.access_token)
    )
    assert old.code == grpc.StatusCode.UNAUTHENTICATED

    api.auth.RequestPasswordReset(auth_pb.RequestPasswordResetRequest(email="jack@example.com"))
    late = api.reset_token_for("jack@example.com")
    clock.advance(minutes=30, seconds=1)
    expired = expect_error(
        api.auth.ResetPassword, auth_pb.ResetPasswordRequest(token=late, new_password="too late anyway")
    )
    assert expired.code == grpc.StatusCode.INVALID_ARGUMENT
    assert login(api, "jack@example.com", "brand new secret").user_id == tokens.user_id


def test_only_the_newest_reset_link_works(api: Api) -> None:
    api.register("nora@example.com")
    request = auth_pb.RequestPasswordResetRequest(email="nora@example.com")
    api.auth.RequestPasswordReset(request)
    older = api.reset_token_for("nora@example.com")
    api.auth.RequestPasswordReset(request)
    newest = api.reset_token_for("nora@example.com")
    assert newest != older
    stale = expect_error(
        api.auth.ResetPassword, auth_pb.ResetPasswordRequest(token=older, new_password="from the old link")
    )
    assert stale.code == grpc.StatusCode.INVALID_ARGUMENT
    assert stale.reason == "RESET_TOKEN_INVALID"
    assert login(api, "nora@example.com").user_id
    api.auth.ResetPassword(auth_pb.ResetPasswordRequest(token=newest, new_password="from the new link"))
    assert login(api, "nora@example.com", "from the new link").user_id


def test_reset_with_a_bad_new_password_keeps_the_token(api: Api) -> None:
    api.register("kate@example.com")
    api.auth.RequestPasswordReset(auth_pb.RequestPasswordResetRequest(email="kate@example.com"))
    token = api.reset_token_for("kate@example.com")
    err = expect_error(
        api.auth.ResetPassword, auth_pb.ResetPasswordRequest(token=token, new_password="short")
    )
    assert "new_password" in err.fields
    api.auth.ResetPassword(auth_pb.ResetPasswordRequest(token=token, new_password="long enough now"))


# --- refresh tokens --------------------------------------------------------------------------


def test_refresh_rotates_and_reuse_revokes_the_family(api: Api, clock: FakeClock) -> None:
    first = api.register("liam@example.com")
    second = api.auth.RefreshToken(auth_pb.RefreshTokenRequest(refresh_token=first.refresh_token))
    assert second.refresh_token != first.refresh_token
    assert second.user_id == first.user_id
    clock.advance(seconds=11)  # past REFRESH_REUSE_GRACE_SECONDS: a replay, not a retry
    reuse = expect_error(
        api.auth.RefreshToken, auth_pb.RefreshTokenRequest(refresh_token=first.refresh_token)
    )
    assert reuse.code == grpc.StatusCode.UNAUTHENTICATED
    # The thief's replay killed the legitimate holder's newer token too.
    after = expect_error(
        api.auth.RefreshToken, auth_pb.RefreshTokenRequest(refresh_token=second.refresh_token)
    )
    assert after.code == grpc.StatusCode.UNAUTHENTICATED
    assert RefreshToken.select().where(RefreshToken.revoked_at.is_null()).count() == 0


def test_a_retried_refresh_within_the_grace_window_gets_the_winners_token(api: Api, clock: FakeClock) -> None:
    """A client whose answer was lost retries with the old token: it gets a working pair, nobody is
    logged out, and the family still has a single live refresh token."""
    first = api.register("max@example.com")
    request = auth_pb.RefreshTokenRequest(refresh_token=first.refresh_token)
    lost = api.auth.RefreshToken(request)
    clock.advance(seconds=9)
    retried = api.auth.RefreshToken(request)
    assert retried.refresh_token == lost.refresh_token
    assert retried.refresh_expires_in == 30 * 86400 - 9
    api.referrals.ListReferrals(ref_pb.ListReferralsRequest(), metadata=bearer(retried.access_token))
    assert RefreshToken.select().where(RefreshToken.revoked_at.is_null()).count() == 2  # old + live one
    third = api.auth.RefreshToken(auth_pb.RefreshTokenRequest(refresh_token=retried.refresh_token))
    assert third.refresh_token not in (first.refresh_token, lost.refresh_token)
    live = RefreshToken.select().where(RefreshToken.revoked_at.is_null() & RefreshToken.rotated_at.is_null())
    assert live.count() == 1


def test_logout_revokes_the_refresh_token(api: Api) -> None:
    tokens = api.register("mia@example.com")
    api.auth.Logout(
        auth_pb.LogoutRequest(refresh_token=tokens.refresh_token), metadata=bearer(tokens.access_token)
    )
    err = expect_error(api.auth.RefreshToken, auth_pb.RefreshTokenRequest(refresh_token=tokens.refresh_token))
    assert err.code == grpc.StatusCode.UNAUTHENTICATED


# --- referral codes --------------------------------------------------------------------------


def test_create_rotate_lookup_and_delete_a_code(api: Api, clock: FakeClock) -> None:
    owner = api.register("nina@example.com")
    first = create_code(api, owner.access_token, clock)
    assert len(first.code) == CODE_LENGTH and set(first.code) <= set(ALPHABET)
    assert first.expires_at.ToDatetime() == (clock.now() + timedelta(days=30)).replace(tzinfo=None)
    assert first.created_at.ToDatetime() == clock.now().replace(tzinfo=None)
    assert lookup(api, "NINA@example.com").code == first.code

    second = create_code(api, owner.access_token, clock, days=60)
    assert second.code != first.code
    assert lookup(api, "nina@example.com").code == second.code
    rows = {row.code: row.is_active for row in ReferralCode.select()}
    assert rows == {first.code: False, second.code: True}

    api.referrals.DeleteReferralCode(ref_pb.DeleteReferralCodeRequest(), metadata=bearer(owner.access_token))
    assert ReferralCode.select().where(ReferralCode.is_active == True).count() == 0  # noqa: E712
    gone = expect_error(lookup, api, "nina@example.com")
    assert gone.code == grpc.StatusCode.NOT_FOUND
    again = expect_error(
        api.referrals.DeleteReferralCode,
        ref_pb.DeleteReferralCodeRequest(),
        metadata=bearer(owner.access_token),
    )
    assert again.code == grpc.StatusCode.NOT_FOUND


def test_lookup_is_not_found_alike_for_unknown_missing_and_expired(api: Api, clock: FakeClock) -> None:
    no_code = api.register("omar@example.com")
    expiring = api.register("pia@example.com")
    assert no_code.user_id
    create_code(api, expiring.access_token, clock, days=1)
    assert lookup(api, "pia@example.com").code
    clock.advance(days=1)
    errors = [
        expect_error(lookup, api, email)
        for email in ("nobody@example.com", "omar@example.com", "pia@example.com")
    ]
    assert {e.code for e in errors} == {grpc.StatusCode.NOT_FOUND}
    assert len({e.message for e in errors}) == 1
    assert len({e.reason for e in errors}) == 1
    bad = expect_error(lookup, api, "not an email")
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and "email" in bad.fields


@pytest.mark.parametrize(
    ("days", "reason"), [(-1, "EXPIRY_IN_PAST"), (0, "EXPIRY_IN_PAST"), (366, "EXPIRY_TOO_FAR")]
)
def test_code_expiry_must_be_in_the_future_within_the_horizon(
    api: Api, clock: FakeClock, days: int, reason: str
) -> None:
    owner = api.register("quinn@example.com")
    err = expect_error(create_code, api, owner.access_token, clock, days)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.reason == reason
    assert "expires_at" in err.fields
    assert ReferralCode.select().count() == 0


def test_code_expiry_is_required_and_sane(api: Api, clock: FakeClock) -> None:
    owner = api.register("rita@example.com")
    missing = expect_error(
        api.referrals.CreateReferralCode,
        ref_pb.CreateReferralCodeRequest(),
        metadata=bearer(owner.access_token),
    )
    assert missing.code == grpc.StatusCode.INVALID_ARGUMENT and "expires_at" in missing.fields
    absurd = ref_pb.CreateReferralCodeRequest()
    absurd.expires_at.seconds = 2**62
    huge = expect_error(api.referrals.CreateReferralCode, absurd, metadata=bearer(owner.access_token))
    assert huge.code == grpc.StatusCode.INVALID_ARGUMENT


def test_register_with_a_code_links_the_referrer(api: Api, clock: FakeClock) -> None:
    owner = api.register("sam@example.com")
    code = create_code(api, owner.access_token, clock).code
    friend = api.register("tom@example.com", code=code.lower())
    assert User.get_by_id(friend.user_id).referrer_id == owner.user_id
    joined = api.outbox("referral_joined")
    assert [row.recipient for row in joined] == ["sam@example.com"]
    assert "tom@example.com" not in joined[0].payload  # masked


def test_register_with_unknown_or_expired_code_creates_nobody(api: Api, clock: FakeClock) -> None:
    owner = api.register("uma@example.com")
    unknown = expect_error(api.register, "vic@example.com", PASSWORD, "ABCDEFGHJK")
    assert unknown.code == grpc.StatusCode.INVALID_ARGUMENT and "referral_code" in unknown.fields
    malformed = expect_error(api.register, "vic@example.com", PASSWORD, "nope!")
    assert malformed.code == grpc.StatusCode.INVALID_ARGUMENT and "referral_code" in malformed.fields
    code = create_code(api, owner.access_token, clock, days=1).code
    clock.advance(days=2)
    expired = expect_error(api.register, "vic@example.com", PASSWORD, code)
    assert expired.code == grpc.StatusCode.FAILED_PRECONDITION
    owner = login(api, "uma@example.com")
    fresh = create_code(api, owner.access_token, clock).code
    api.referrals.DeleteReferralCode(ref_pb.DeleteReferralCodeRequest(), metadata=bearer(owner.access_token))
    withdrawn = expect_error(api.register, "vic@example.com", PASSWORD, fresh)
    assert withdrawn.code == grpc.StatusCode.FAILED_PRECONDITION
    assert User.select().count() == 1


# --- listing referrals -----------------------------------------------------------------------


def test_list_referrals_pages_newest_first_only_mine(api: Api, clock: FakeClock) -> None:
    owner = api.register("walt@example.com")
    other = api.register("xena@example.com")
    code = create_code(api, owner.access_token, clock).code
    other_code = create_code(api, other.access_token, clock).code
    emails = []
    for i in range(5):
        clock.advance(seconds=1)
        emails.append(f"friend{i}@example.com")
        api.register(emails[-1], code=code)
    api.register("stranger@example.com", code=other_code)

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = api.referrals.ListReferrals(
            ref_pb.ListReferralsRequest(page_size=2, page_token=token), metadata=bearer(owner.access_token)
        )
        pages += 1
        assert len(page.referrals) <= 2
        seen += [r.email for r in page.referrals]
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == list(reversed(emails))
    first = api.referrals.ListReferrals(ref_pb.ListReferralsRequest(), metadata=bearer(owner.access_token))
    assert first.referrals[0].registered_at.ToDatetime() == clock.now().replace(tzinfo=None) - timedelta(
        seconds=0
    )


def register_referrals(api: Api, clock: FakeClock, owner: auth_pb.AuthTokens, emails: list[str]) -> None:
    """Newcomers who register with the owner's new code, one second apart."""
    code = create_code(api, owner.access_token, clock).code
    for email in emails:
        clock.advance(seconds=1)
        api.register(email, code=code)


def test_listed_times_keep_their_microseconds_and_pages_split_one_instant_exactly(
    api: Api, clock: FakeClock
) -> None:
    owner = api.register("tia@example.com")
    emails = [f"tie{i}@example.com" for i in range(7)]
    register_referrals(api, clock, owner, emails)
    one_instant = datetime(2026, 11, 29, 16, 10, 0, 1, tzinfo=UTC)
    # Stored straight into the rows: times no clock here gives, and three rows at one instant (the
    # page token's time must then be exact to the microsecond, or a page repeats or skips a row).
    registered = [
        datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        one_instant,
        one_instant,
        one_instant,
        datetime(2038, 1, 19, 3, 14, 8, 500_000, tzinfo=UTC),
        datetime(2026, 11, 29, 16, 10, 0, 999_999, tzinfo=UTC),
        datetime(2001, 9, 9, 1, 46, 40, tzinfo=UTC),
    ]
    qualified = datetime(2027, 2, 28, 23, 59, 59, 123_457, tzinfo=UTC)
    ids = {}
    for email, at in zip(emails, registered, strict=True):
        user = User.get(User.email == email)
        ids[email] = user.id
        User.update(created_at=at).where(User.id == user.id).execute()
    upsert = {Referral.state: "qualified", Referral.qualified_at: qualified}
    Referral.insert(
        referee=ids[emails[2]],
        referrer=User.get(User.email == "tia@example.com").id,
        state="qualified",
        qualified_at=qualified,
        created_at=registered[2],
    ).on_conflict(conflict_target=[Referral.referee], update=upsert).execute()

    seen = []
    token = ""
    while True:
        page = api.referrals.ListReferrals(
            ref_pb.ListReferralsRequest(page_size=1, page_token=token), metadata=bearer(owner.access_token)
        )
        for r in page.referrals:
            qualified_us = r.qualified_at.ToMicroseconds() if r.HasField("qualified_at") else None
            seen.append((r.email, r.registered_at.ToMicroseconds(), qualified_us))
        token = page.next_page_token
        if not token:
            break

    def micros(at: datetime) -> int:
        return (at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)

    newest_first = sorted(
        emails, key=lambda email: (registered[emails.index(email)], ids[email]), reverse=True
    )
    assert seen == [
        (email, micros(registered[emails.index(email)]), micros(qualified) if email == emails[2] else None)
        for email in newest_first
    ]


def test_list_referrals_rejects_bad_paging(api: Api, clock: FakeClock) -> None:
    owner = api.register("yuri@example.com")
    other = api.register("zoe@example.com")
    register_referrals(api, clock, owner, [f"r{i}@example.com" for i in range(3)])
    page = api.referrals.ListReferrals(
        ref_pb.ListReferralsRequest(page_size=1), metadata=bearer(owner.access_token)
    )
    token = page.next_page_token
    assert token
    negative = expect_error(
        api.referrals.ListReferrals,
        ref_pb.ListReferralsRequest(page_size=-1),
        metadata=bearer(owner.access_token),
    )
    assert negative.code == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in negative.fields
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    for bad in (tampered, "garbage", "x" * 600):
        err = expect_error(
            api.referrals.ListReferrals,
            ref_pb.ListReferralsRequest(page_token=bad),
            metadata=bearer(owner.access_token),
        )
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in err.fields
    # Someone else's cursor is not valid for me.
    stolen = expect_error(
        api.referrals.ListReferrals,
        ref_pb.ListReferralsRequest(page_token=token),
        metadata=bearer(other.access_token),
    )
    assert stolen.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_page_and_the_check_of_its_callers_token_are_one_read(api: Api, clock: FakeClock) -> None:
    """ListReferrals compares the access token's version with the user's row in the page's own
    statement; a token a password change revoked is refused all the same, and before anything about
    the request (a bad page_size or page_token), as every RPC refuses it."""
    owner = api.register("page@example.com")
    register_referrals(api, clock, owner, [f"page{i}@example.com" for i in range(3)])
    first = api.referrals.ListReferrals(
        ref_pb.ListReferralsRequest(page_size=2), metadata=bearer(owner.access_token)
    )
    db = api.app.db
    statements: list[str] = []
    db.query_hooks.append(lambda query: statements.append(query.sql))
    try:
        rest = api.referrals.ListReferrals(
            ref_pb.ListReferralsRequest(page_token=first.next_page_token), metadata=bearer(owner.access_token)
        )
    finally:
        db.query_hooks.clear()
    assert [r.email for r in rest.referrals] == ["page0@example.com"]
    # One statement (on PostgreSQL, PREPAREd first on a connection that had not run it yet).
    ran = [sql for sql in statements if not sql.startswith("PREPARE ")]
    assert len(ran) == 1 and "token_version" in statements[0], statements

    fresh = api.auth.ChangePassword(
        auth_pb.ChangePasswordRequest(current_password=PASSWORD, new_password="a new passphrase"),
        metadata=bearer(owner.access_token),
    )
    for request in (
        ref_pb.ListReferralsRequest(),
        ref_pb.ListReferralsRequest(page_token=first.next_page_token),
        ref_pb.ListReferralsRequest(page_size=-1),
        ref_pb.ListReferralsRequest(page_token="garbage"),
    ):
        err = expect_error(api.referrals.ListReferrals, request, metadata=bearer(owner.access_token))
        assert err.code == grpc.StatusCode.UNAUTHENTICATED, request
    # The new token reads the same page, and is told about its bad input as before.
    again = api.referrals.ListReferrals(
        ref_pb.ListReferralsRequest(page_size=2), metadata=bearer(fresh.access_token)
    )
    assert [r.email for r in again.referrals] == ["page2@example.com", "page1@example.com"]
    bad = expect_error(
        api.referrals.ListReferrals,
        ref_pb.ListReferralsRequest(page_size=-1),
        metadata=bearer(fresh.access_token),
    )
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in bad.fields
    # A user without referrals: an empty page for a good token, refused for a revoked one.
    loner = api.register("loner@example.com")
    assert (
        api.referrals.ListReferrals(
            ref_pb.ListReferralsRequest(), metadata=bearer(loner.access_token)
        ).referrals
        == []
    )
    api.auth.ChangePassword(
        auth_pb.ChangePasswordRequest(current_password=PASSWORD, new_password="a new passphrase"),
        metadata=bearer(loner.access_token),
    )
    revoked = expect_error(
        api.referrals.ListReferrals, ref_pb.ListReferralsRequest(), metadata=bearer(loner.access_token)
    )
    assert revoked.code == grpc.StatusCode.UNAUTHENTICATED


def test_only_the_rpcs_that_check_the_token_version_themselves_see_a_signed_principal() -> None:
    """A handler reading `current_principal()` under a caller whose token version is still unchecked
    is refused (fail closed); the one RPC whose read checks it reads `current_signed_principal()`."""
    deferred = {path for path, policy in POLICIES.items() if policy.token_version_in_handler}
    assert deferred == {"/referral.v1.ReferralService/ListReferrals"}
    with caller(SignedPrincipal(user_id=7, token_version=0)):
        with pytest.raises(Unauthenticated):
            current_principal()
        assert current_signed_principal().user_id == 7
    with caller(Principal(user_id=7)), pytest.raises(Unauthenticated):
        current_signed_principal()


def test_page_size_is_clamped_to_100(api: Api, clock: FakeClock) -> None:
    owner = api.register("abe@example.com")
    now = clock.now()
    User.insert_many(
        [
            {
                "email": f"bulk{i}@example.com",
                "email_key": f"bulk{i}@example.com",
                "password_hash": "x",
                "referrer": owner.user_id,
                "created_at": now - timedelta(seconds=i),
            }
            for i in range(120)
        ]
    ).execute()
    page = api.referrals.ListReferrals(
        ref_pb.ListReferralsRequest(page_size=1000), metadata=bearer(owner.access_token)
    )
    assert len(page.referrals) == 100
    assert page.next_page_token
    default = api.referrals.ListReferrals(ref_pb.ListReferralsRequest(), metadata=bearer(owner.access_token))
    assert len(default.referrals) == 50
    rest = api.referrals.ListReferrals(
        ref_pb.ListReferralsRequest(page_size=100, page_token=page.next_page_token),
        metadata=bearer(owner.access_token),
    )
    assert len(rest.referrals) == 20 and rest.next_page_token == ""


# --- health, reflection, errors --------------------------------------------------------------


def test_health_and_reflection(api: Api) -> None:
    health = health_pb2_grpc.HealthStub(api.channel)
    for service in ("", "referral.v1.AuthService", "referral.v1.ReferralService"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(api.channel)
    responses = list(
        stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"referral.v1.AuthService", "referral.v1.ReferralService", "grpc.health.v1.Health"} <= names


@pytest.mark.api_settings(grpc_reflection=True, grpc_max_workers=2, grpc_max_streams=3)
def test_open_reflection_streams_leave_the_unary_rpcs_their_threads(api: Api) -> None:
    """A reflection client may keep its stream open (holding a thread): it runs on the streams' pool,
    bounded by GRPC_MAX_STREAMS like WatchEvents, never on the unary RPCs' threads."""
    stub = reflection_pb2_grpc.ServerReflectionStub(api.channel)
    done = threading.Event()

    def asks() -> Iterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        done.wait(30)

    streams = [stub.ServerReflectionInfo(asks(), timeout=10) for _ in range(3)]
    try:
        for stream in streams:
            assert next(stream).list_services_response.service
        # More open streams than unary threads, and a unary call still runs at once.
        started = time.monotonic()
        missing = expect_error(
            api.referrals.GetReferralCodeByEmail,
            ref_pb.GetReferralCodeByEmailRequest(email="cy@example.com"),
            timeout=5,
        )
        assert missing.code == grpc.StatusCode.NOT_FOUND and time.monotonic() - started < 2
        # One stream more than the pool is refused at once, in the stream's own shape.
        refused = expect_error(lambda: next(stub.ServerReflectionInfo(asks(), timeout=5)))
        assert (refused.code, refused.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_OVERLOADED")
        assert "GRPC_MAX_STREAMS" in refused.message
    finally:
        done.set()
        for stream in streams:
            stream.cancel()


def test_errors_carry_error_info_with_domain(api: Api) -> None:
    api.register("ben@example.com")
    err = expect_error(api.register, "ben@example.com")
    status = err.reason
    assert status == "EMAIL_TAKEN"


def test_request_id_is_echoed(api: Api) -> None:
    _, call = api.auth.RequestPasswordReset.with_call(
        auth_pb.RequestPasswordResetRequest(email="cy@example.com"), metadata=(("x-request-id", "req-123"),)
    )
    assert ("x-request-id", "req-123") in tuple(call.initial_metadata())


def test_headers_go_out_with_the_answer_on_the_pinned_grpc(api: Api) -> None:
    """The server sends each call's headers in the batch that carries its answer (see api.errors);
    if a grpcio upgrade changed the internals this relies on, it would fall back to a batch of their
    own: still correct, but ~20% slower, so this test says so. Both an answer and an error carry them."""
    assert send_headers_with_the_answer()
    _, call = api.auth.RequestPasswordReset.with_call(
        auth_pb.RequestPasswordResetRequest(email="eve@example.com"), metadata=(("x-request-id", "ok-1"),)
    )
    with pytest.raises(grpc.RpcError) as failed:
        api.referrals.GetReferralCodeByEmail(
            ref_pb.GetReferralCodeByEmailRequest(email="nobody@example.com"),
            metadata=(("x-request-id", "err-1"),),
        )

    assert ("x-request-id", "ok-1") in tuple(call.initial_metadata())
    error: Any = failed.value
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert ("x-request-id", "err-1") in tuple(error.initial_metadata())


def test_timestamps_are_utc(api: Api, clock: FakeClock) -> None:
    owner = api.register("dan@example.com")
    code = create_code(api, owner.access_token, clock, days=2)
    row = ReferralCode.get(ReferralCode.code == code.code)
    assert row.expires_at.utcoffset() == timedelta(0)
    assert row.expires_at == clock.now() + timedelta(days=2)
    assert ts(row.expires_at) == code.expires_at
