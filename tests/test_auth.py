"""Who is calling: API tokens decide the tenant; without tokens, x-tenant (development mode)."""

import pytest

from service.store.auth import Auth, store_auth
from service.store.errors import PermissionDenied, Unauthenticated


def test_a_tenant_token_decides_the_tenant_and_x_tenant_is_ignored():
    auth = Auth({"tok-a": "alpha", "svc": "*"})
    assert auth.tenant({"authorization": "Bearer tok-a"}) == "alpha"
    assert auth.tenant({"authorization": "Bearer tok-a", "x-tenant": "beta"}) == "alpha"
    assert auth.tenant({"authorization": "Bearer svc", "x-tenant": "beta"}) == "beta"  # our services name it
    for metadata in ({}, {"x-tenant": "alpha"}, {"authorization": "tok-a"}, {"authorization": "Bearer nope"}):
        with pytest.raises(Unauthenticated):
            auth.tenant(metadata)


def test_without_tokens_the_tenant_is_x_tenant():
    auth = Auth()
    assert auth.tenant({}) == "default" and auth.tenant({"x-tenant": "beta"}) == "beta"
    with pytest.raises(PermissionDenied, match="x-tenant"):
        auth.tenant({"x-tenant": "no spaces allowed"})


def test_the_store_accepts_only_service_tokens():
    auth = store_auth(["svc", "", "svc-next"])
    assert set(auth.tokens) == {"svc", "svc-next"} and set(auth.tokens.values()) == {"*"}
    with pytest.raises(ValueError, match="service token"):
        store_auth([""])
    assert store_auth([], allow_unauthenticated=True).tokens == {}
