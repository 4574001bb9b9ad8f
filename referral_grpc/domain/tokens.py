"""Access tokens (HS256 JWT), opaque random tokens, and signed page tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

import jwt

from .errors import InvalidArgument, Unauthenticated
from .ports import Clock

ALGORITHM = "HS256"
TOKEN_TYPE = "access"  # noqa: S105 - a claim value, not a secret
# One message for every rejected token: which check failed is nobody's business but the log's.
INVALID_TOKEN_MESSAGE = "missing or invalid access token"  # noqa: S105
# The only spelling of a user id we issue: ASCII digits, no sign, no leading zero, within BIGINT.
_CANONICAL_ID = re.compile(r"[1-9][0-9]{0,17}")


@dataclass(frozen=True)
class AccessClaims:
    user_id: int
    token_version: int


def invalid_token() -> Unauthenticated:
    return Unauthenticated("INVALID_TOKEN", INVALID_TOKEN_MESSAGE)


def require_token_version(current: int | None, claimed: int) -> None:
    """An access token counts while its user exists (`current`, the user's token_version, is None when
    not) and no password change or sign-out everywhere has moved the version past the token's."""
    if current != claimed:
        raise invalid_token()


def _is_int(value: object) -> bool:
    """A JSON integer: not a float, not a numeric string, and not a bool (which Python counts as an int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def random_token() -> str:
    """256 bits from the OS CSPRNG, URL-safe."""
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """What the database stores for opaque tokens: their SHA-256 (they are random, so no salt is needed)."""
    return hashlib.sha256(token.encode()).hexdigest()


class AccessTokens:
    def __init__(self, secret: str, issuer: str, audience: str, ttl_seconds: int, clock: Clock) -> None:
        self._secret = secret
        self._issuer = issuer
        self._audience = audience
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        # The signature and the static claims of one token string always verify the same way, so
        # the result is kept (successes only: a failure raises, and lru_cache keeps no exceptions).
        # Times are checked on every call below; the token version against the database by the caller.
        self._verified = lru_cache(maxsize=4096)(self._verify)

    def _verify(self, token: str) -> dict[str, Any]:
        claims: dict[str, Any] = jwt.decode(
            token,
            self._secret,
            algorithms=[ALGORITHM],
            audience=self._audience,
            issuer=self._issuer,
            # Times are checked in decode against the injected clock, so tests can move time.
            options={
                "require": ["sub", "iat", "exp", "iss", "aud", "typ", "ver"],
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
            },
        )
        return claims

    def issue(self, user_id: int, token_version: int) -> str:
        now = self._clock.now()
        claims = {
            "sub": str(user_id),
            "ver": token_version,
            "typ": TOKEN_TYPE,
            "iss": self._issuer,
            "aud": self._audience,
            "iat": int(now.timestamp()),
            "nbf": int(now.timestamp()),
            "exp": int((now + timedelta(seconds=self.ttl_seconds)).timestamp()),
            "jti": secrets.token_hex(8),
        }
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def decode(self, token: str) -> AccessClaims:
        """Verify signature, algorithm, issuer, audience, type and times; raise Unauthenticated otherwise."""
        try:
            claims = self._verified(token)
        except jwt.PyJWTError:
            raise invalid_token() from None
        # PyJWT checks none of these types once its own time checks are off: a string `exp` ("nan")
        # would never expire, and int(" 1"), int("+1") or int("\u0661") would all name user 1.
        exp, issued, not_before = claims["exp"], claims["iat"], claims.get("nbf", claims["iat"])
        subject, version = claims["sub"], claims["ver"]
        if not (
            _is_int(exp)
            and _is_int(issued)
            and _is_int(not_before)
            and _is_int(version)
            and version >= 0
            and isinstance(subject, str)
            and _CANONICAL_ID.fullmatch(subject)
        ):
            raise invalid_token()
        now = self._clock.now().timestamp()
        if exp <= now or not_before > now + 5 or claims["typ"] != TOKEN_TYPE:
            raise invalid_token()
        user_id = int(subject)
        return AccessClaims(user_id=user_id, token_version=version)


class SuccessorTokens:
    """The refresh token that replaces another is derived from it: HMAC(key, old token).

    So an exchange that lost a race, or a retry whose answer was lost, can hand out the very token
    the winner got without the database ever holding a token in clear. Without the key the successor
    is as unpredictable as a random token; whoever holds JWT_SECRET can forge access tokens anyway.
    """

    def __init__(self, secret: str) -> None:
        self._key = hmac.new(secret.encode(), b"referral-refresh-successor-v1", hashlib.sha256).digest()

    def successor(self, token: str) -> str:
        digest = hmac.new(self._key, token.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")  # like random_token(): 43 characters


class PageTokens:
    """Opaque keyset cursors: base64url(JSON) + HMAC, bound to the user they were issued to."""

    def __init__(self, secret: str, purpose: str = "referral-page-token-v1") -> None:
        # One key per purpose: a token of one list is never accepted by another.
        self._key = hmac.new(secret.encode(), purpose.encode(), hashlib.sha256).digest()

    def encode(self, owner_id: int, created_at: datetime, row_id: int) -> str:
        body = json.dumps({"o": owner_id, "t": created_at.isoformat(), "i": row_id}, separators=(",", ":"))
        raw = body.encode()
        mac = hmac.new(self._key, raw, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(mac + raw).decode().rstrip("=")

    def decode(self, token: str, owner_id: int) -> tuple[datetime, int]:
        invalid = InvalidArgument.for_field("page_token", "is not a valid page token", "PAGE_TOKEN_INVALID")
        try:
            blob = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            mac, raw = blob[:16], blob[16:]
            if not hmac.compare_digest(mac, hmac.new(self._key, raw, hashlib.sha256).digest()[:16]):
                raise invalid
            data = json.loads(raw)
            if data["o"] != owner_id:
                raise invalid
            created_at = datetime.fromisoformat(data["t"])
            row_id = int(data["i"])
        except (ValueError, KeyError, TypeError):
            raise invalid from None
        if created_at.tzinfo is None:
            raise invalid
        return created_at, row_id
