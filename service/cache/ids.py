"""Content addresses of compressed caches: the same document + model + press + codec + tenant gives
the same id on any replica, in any process (no ``hash()``, no pickling).

id = SHA-256 over::

    b"kvcompose/cache-id" | u32 FORMAT_VERSION | u32 selection revision (the engine's, see selection.py)
    | field* (each: u32 byte length, UTF-8 bytes): model id, model revision, tokenizer digest,
      canonical press spec (JSON, sorted keys, no spaces), storage codec, tenant
    | u32 token count | token ids as little-endian uint32
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from service.cache.format import FORMAT_VERSION

_DOMAIN = b"kvcompose/cache-id"


@dataclass(frozen=True)
class CacheKey:
    """Everything that makes two compressed caches interchangeable, except the tokens."""

    model_id: str
    model_revision: str
    tokenizer_digest: str
    press: dict
    codec: str
    tenant: str = ""
    # The engine's ``SELECTION_REVISION``: an input here, so the store (which never imports the engine)
    # gives caches of an older selection other ids.
    selection_revision: int = field(default=0, kw_only=True)

    def __post_init__(self) -> None:
        if not isinstance(self.selection_revision, int) or self.selection_revision < 1:
            raise ValueError(f"selection_revision must be a positive integer (the engine's "
                             f"SELECTION_REVISION), got {self.selection_revision!r}")

    def cache_id(self, token_ids: Sequence[int]) -> str:
        h = hashlib.sha256(_DOMAIN + struct.pack("<II", FORMAT_VERSION, self.selection_revision))
        press = json.dumps(self.press, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        for text in (self.model_id, self.model_revision, self.tokenizer_digest, press, self.codec, self.tenant):
            raw = text.encode()
            h.update(struct.pack("<I", len(raw)) + raw)
        tokens = np.asarray(token_ids, dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**32):
            raise ValueError("token ids must fit in uint32")
        h.update(struct.pack("<I", tokens.size) + tokens.astype("<u4").tobytes())
        return h.hexdigest()
