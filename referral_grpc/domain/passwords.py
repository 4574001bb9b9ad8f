"""Password hashing: bcrypt over a keyed pre-hash, so nothing is silently cut at bcrypt's 72 bytes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
import unicodedata

import bcrypt


def normalize_password(password: str) -> str:
    """NFKC, as NIST SP 800-63B 5.1.1.2 asks: NFC and NFD typings of a password are one password."""
    return unicodedata.normalize("NFKC", password)


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
        prehashed = self._prehash(normalize_password(password))
        with self._slots:
            return bcrypt.hashpw(prehashed, bcrypt.gensalt(self._rounds)).decode()

    def verify(self, password: str, password_hash: str) -> bool:
        normalized = normalize_password(password)
        if self._check(normalized, password_hash):
            return True
        # Hashes stored before normalisation are of the password as typed. NFKC leaves ASCII (and
        # most keyboard input) unchanged, so only a password that normalisation changes - NFD
        # accents, full-width letters - can have such a hash: it is tried as typed too. The extra
        # bcrypt depends on the input alone, so it reveals nothing about the account.
        return normalized != password and self._check(password, password_hash)

    def _check(self, password: str, password_hash: str) -> bool:
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
