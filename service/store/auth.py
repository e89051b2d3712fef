"""Who is calling: bearer tokens in gRPC metadata map to tenants (configurable; off = dev mode)."""

from __future__ import annotations

from collections.abc import Mapping

from service.store.errors import PermissionDenied, Unauthenticated
from service.store.keys import check_tenant

DEFAULT_TENANT = "default"


SERVICE = "*"  # a token mapped to "*" belongs to our own services: it may act for any tenant via x-tenant


class Auth:
    """tokens: bearer token -> tenant (or "*" for internal services, which name the tenant in
    ``x-tenant``; a tenant's own token ignores ``x-tenant``). With no tokens (development mode), the
    tenant is the ``x-tenant`` metadata (or "default")."""

    def __init__(self, tokens: Mapping[str, str] | None = None):
        self.tokens = dict(tokens or {})

    def tenant(self, metadata: Mapping[str, str]) -> str:
        asked = metadata.get("x-tenant")
        if not self.tokens:
            try:
                return check_tenant(asked or DEFAULT_TENANT)
            except ValueError as e:
                raise PermissionDenied(f"x-tenant: {e}") from None
        header = metadata.get("authorization", "")
        if not header.startswith("Bearer "):
            raise Unauthenticated("missing credentials: send metadata 'authorization: Bearer <token>'")
        tenant = self.tokens.get(header.removeprefix("Bearer ").strip())
        if tenant is None:
            raise Unauthenticated("the bearer token is not valid")
        if tenant == SERVICE:
            try:
                return check_tenant(asked or DEFAULT_TENANT)
            except ValueError as e:
                raise PermissionDenied(f"x-tenant: {e}") from None
        return tenant  # a tenant's token decides its tenant: x-tenant is ignored


def store_auth(service_tokens: list[str], allow_unauthenticated: bool = False) -> Auth:
    """The prefix store's auth: every call needs one of our services' tokens.

    With no token, the store refuses to start unless ``allow_unauthenticated`` (development only):
    whoever reaches an open store can read every cache and plant forged ones.
    """
    tokens = {t: SERVICE for t in service_tokens if t}
    if not tokens and not allow_unauthenticated:
        raise ValueError("the prefix store needs a service token: set KVCOMPOSE_STORE_SERVICE_TOKEN "
                         "(or allow_unauthenticated for local development)")
    return Auth(tokens)
