"""Password hashing: bcrypt over a keyed pre-hash, so nothing is silently cut at bcrypt's 72 bytes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading

import bcrypt


class PasswordHasher:
    """bcrypt(base64(HMAC-SHA256(pepper, password))) - the OWASP answer to bcrypt's 72-byte limit.

    The pepper lives outside the database (PASSWORD_PEPPER), so a leaked table alone is not enough
    to start guessing. `concurrency` caps how many hashes run at once: bcrypt releases the GIL and
    would otherwise take every core and starve cheap RPCs under a login flood.
    """

    def __init__(self, rounds: int, pepper: str, concurrency: int) -> None:
        self._rounds = rounds
        self._pepper = pepper.encode()
        self._slots = threading.BoundedSemaphore(max(1, concurrency))
        # Verified against when the email is unknown, so both login failures cost one bcrypt.
        self._dummy_hash = self.hash("not-a-real-password-only-equalises-timing")

    def _prehash(self, password: str) -> bytes:
        digest = hmac.new(self._pepper, password.encode("utf-8"), hashlib.sha256).digest()
        return base64.b64encode(digest)  # 44 bytes, no NULs: safe bcrypt input

    def hash(self, password: str) -> str:
        prehashed = self._prehash(password)
        with self._slots:
            return bcrypt.hashpw(prehashed, bcrypt.gensalt(self._rounds)).decode()

    def verify(self, password: str, password_hash: str) -> bool:
        prehashed = self._prehash(password)
        try:
            encoded = password_hash.encode()
            with self._slots:
                return bcrypt.checkpw(prehashed, encoded)
        except ValueError:
            return False

    def verify_dummy(self, password: str) -> None:
        """Spend the same time as a real check when there is no account to check against."""
        self.verify(password, self._dummy_hash)
