"""Content addresses of compressed caches: the same document + model + press + codec + tenant gives
the same id on any replica, in any process (no ``hash()``, no pickling).

id = SHA-256 over::

    b"kvcompose/cache-id" | u32 FORMAT_VERSION | u32 SELECTION_REVISION
    | field* (each: u32 byte length, UTF-8 bytes): model id, model revision, tokenizer digest,
      canonical press spec (JSON, sorted keys, no spaces), storage codec, tenant
    | u32 token count | token ids as little-endian uint32
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.cache.codec import FORMAT_VERSION

_DOMAIN = b"kvcompose/cache-id"
# Bumped when a press keeps other tokens for the same spec, so that caches stored by the old
# selection are never served as the new one's (they expire unused). 2: KVCompose scores inside the
# model's window (contexts longer than half of it lost needles with revision 1). The store hashes
# it, the engines select: they ship in one image and are upgraded together.
SELECTION_REVISION = 2


@dataclass(frozen=True)
class CacheKey:
    """Everything that makes two compressed caches interchangeable, except the tokens."""

    model_id: str
    model_revision: str
    tokenizer_digest: str
    press: dict
    codec: str
    tenant: str = ""

    def cache_id(self, token_ids: Sequence[int]) -> str:
        h = hashlib.sha256(_DOMAIN + struct.pack("<II", FORMAT_VERSION, SELECTION_REVISION))
        press = json.dumps(self.press, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        for text in (self.model_id, self.model_revision, self.tokenizer_digest, press, self.codec, self.tenant):
            raw = text.encode()
            h.update(struct.pack("<I", len(raw)) + raw)
        tokens = np.asarray(token_ids, dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**32):
            raise ValueError("token ids must fit in uint32")
        h.update(struct.pack("<I", tokens.size) + tokens.astype("<u4").tobytes())
        return h.hexdigest()
