"""How a stored entry's bytes are verified on every read.

An entry records two digests of its bytes: SHA-256 (the uploader's check on Put, and the entry's
content digest) and XXH3-128, which every read verifies, on the store server as chunks stream and
again in the client. XXH3 hashes about 28x faster than SHA-256 here (0.02 vs 0.6 ms per MiB), so
verification costs a fetch almost nothing. A read checksum guards against damage (evicted or
overwritten chunks, a bad disk or network), not forgery: anyone who could forge chunks in Redis
could rewrite the manifest's digest too; Redis's own authentication is that guard. Entries stored
before XXH3-128 was recorded are verified with their SHA-256.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import xxhash


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...


def xxh3_128(data: bytes) -> bytes:
    return xxhash.xxh3_128(data).digest()


def read_check(xxh3: bytes, sha256: bytes) -> tuple[Hasher, bytes]:
    """(a hasher to feed the bytes as they arrive, the digest it must end with)."""
    return (xxhash.xxh3_128(), xxh3) if xxh3 else (hashlib.sha256(), sha256)
