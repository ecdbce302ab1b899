"""Console password hashes: scrypt from the standard library (hashlib.scrypt, OpenSSL's), never a bare
fast hash. A hash reads scrypt$N$r$p$SALT$KEY (config.PASSWORD_HASH_RE); the cost travels with it,
so a hash made with a higher cost later still verifies beside the old ones."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import secrets
from collections.abc import Iterable

from ..config import PASSWORD_HASH_RE

N, R, P = 2**15, 8, 1  # about 50 ms and 32 MiB per check: cheap to log in, dear to guess
KEY_BYTES = 32
MAX_N = 2**20  # a hash asking for more (1 GiB) is refused rather than computed


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    key = _derive(password, salt, N, R, P)
    return f"scrypt${N}${R}${P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, hashed: str) -> bool:
    """True only for the password the hash was made from; False for a hash that is malformed too."""
    match = PASSWORD_HASH_RE.fullmatch(hashed)
    if match is None:
        return False
    n, r, p = (int(x) for x in match.group(1, 2, 3))
    if n < 2 or n & (n - 1) or n > MAX_N or not 1 <= r <= 64 or not 1 <= p <= 16:
        return False
    try:
        salt, key = base64.b64decode(match.group(4), validate=True), base64.b64decode(match.group(5), validate=True)
        return hmac.compare_digest(_derive(password, salt, n, r, p, len(key)), key)
    except ValueError:  # bad base64, or parameters OpenSSL refuses
        return False


def dummy_hash(hashes: Iterable[str]) -> str:
    """A hash no password matches, as dear to check as the dearest of `hashes` (its N, r, p and key
    length; N=32768 without any): checked for an unknown user name, so that a wrong name takes as long
    as a wrong password of the slowest user. Nothing is derived: the salt and key are random."""
    dearest, length = (N, R, P), KEY_BYTES
    for hashed in hashes:
        match = PASSWORD_HASH_RE.fullmatch(hashed)
        if match is None:
            continue
        n, r, p = (int(x) for x in match.group(1, 2, 3))
        if n <= MAX_N and n * r * p > dearest[0] * dearest[1] * dearest[2]:
            dearest = (n, r, p)
            with contextlib.suppress(ValueError):
                length = len(base64.b64decode(match.group(5), validate=True))
    n, r, p = dearest
    return f"scrypt${n}${r}${p}${_b64(secrets.token_bytes(16))}${_b64(secrets.token_bytes(length))}"


def _derive(password: str, salt: bytes, n: int, r: int, p: int, length: int = KEY_BYTES) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + (1 << 20), dklen=length)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
