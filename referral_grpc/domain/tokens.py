"""Access tokens (HS256 JWT), opaque random tokens, and signed page tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import jwt

from .errors import InvalidArgument, Unauthenticated
from .ports import Clock

ALGORITHM = "HS256"
TOKEN_TYPE = "access"  # noqa: S105 - a claim value, not a secret
# One message for every rejected token: which check failed is nobody's business but the log's.
INVALID_TOKEN_MESSAGE = "missing or invalid access token"  # noqa: S105


@dataclass(frozen=True)
class AccessClaims:
    user_id: int
    token_version: int


def invalid_token() -> Unauthenticated:
    return Unauthenticated("INVALID_TOKEN", INVALID_TOKEN_MESSAGE)


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
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                # Times are checked below against the injected clock, so tests can move time.
                options={
                    "require": ["sub", "iat", "exp", "iss", "aud", "typ", "ver"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError:
            raise invalid_token() from None
        now = self._clock.now().timestamp()
        try:
            expired = float(claims["exp"]) <= now
            not_yet = float(claims.get("nbf", claims["iat"])) > now + 5
            user_id = int(claims["sub"])
            version = int(claims["ver"])
        except (TypeError, ValueError):
            raise invalid_token() from None
        if expired or not_yet or claims["typ"] != TOKEN_TYPE or user_id <= 0:
            raise invalid_token()
        return AccessClaims(user_id=user_id, token_version=version)


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
