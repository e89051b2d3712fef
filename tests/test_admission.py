"""Per-tenant admission in one process (``service/serve/admission.py``, no Redis: what a decode worker
without a Redis URL does, and every process while Redis does not answer): the token bucket, the caps
on prefills and decodes in flight, per-tenant overrides, and the retry hint a refusal carries. The
limits shared through Redis: ``test_shared_limits.py``."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from service.config import TenantLimits
from service.serve.admission import Admission
from service.serve.messages import ApiError


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_admits_its_burst_then_its_rate_and_says_when_to_retry():
    clock = Clock()
    admission = Admission(TenantLimits(requests_per_s=2, burst=3), clock)

    async def go():
        for _ in range(3):
            await admission.check_rate("acme")
        with pytest.raises(ApiError) as e:
            await admission.check_rate("acme")
        assert e.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert e.value.retry_after_s == pytest.approx(0.5) and "requests_per_s" in str(e.value)
        assert e.value.trailing_metadata() == (("retry-after-ms", "500"),)
        await admission.check_rate("other")  # tenants have their own buckets
        clock.now += 0.5
        await admission.check_rate("acme")  # one more token after 1 / rate
        with pytest.raises(ApiError):
            await admission.check_rate("acme")

    asyncio.run(go())


def test_caps_on_prefills_and_decodes_release_however_the_call_ends():
    admission = Admission(TenantLimits(max_prefills=1, max_decodes=2))

    async def go():
        async with admission.hold("acme", "decodes"), admission.hold("acme", "decodes"):
            with pytest.raises(ApiError) as e:
                async with admission.hold("acme", "decodes"):
                    pass
            assert "2 decodes in flight" in str(e.value) and e.value.retry_after_s > 0
            async with admission.hold("beta", "decodes"), admission.hold("acme", "prefills"):
                pass  # another tenant, another kind
        with pytest.raises(RuntimeError):
            async with admission.hold("acme", "prefills"):
                raise RuntimeError("the prefill failed")
        assert admission.inflight("acme", "prefills") == admission.inflight("acme", "decodes") == 0

    asyncio.run(go())


def test_per_tenant_overrides_and_defaults_on():
    limits = TenantLimits(max_decodes=1, tenants={"big": {"max_decodes": 3}, "free": {"max_decodes": 0}})
    admission = Admission(limits)

    async def go():
        async with admission.hold("big", "decodes"), admission.hold("big", "decodes"), \
                admission.hold("big", "decodes"):
            pass
        async with admission.hold("free", "decodes"), admission.hold("free", "decodes"):
            pass  # 0 = unlimited
        default = Admission(TenantLimits())  # secure by default: limits even when none are configured
        async with contextlib.AsyncExitStack() as held:
            for _ in range(64):
                await held.enter_async_context(default.hold("anyone", "decodes"))
            with pytest.raises(ApiError, match=r"tenant_limits.max_decodes = 64"):
                await held.enter_async_context(default.hold("anyone", "decodes"))
        for _ in range(200):
            await default.check_rate("anyone")
        with pytest.raises(ApiError, match="100 requests/s"):
            await default.check_rate("anyone")  # the default burst spent

    asyncio.run(go())


@pytest.mark.parametrize("bad, message", [
    ({"max_decodes": -1}, "max_decodes must be >= 0"),
    ({"tenants": {"x": {"max_decode": 2}}}, "unknown limit"),
    ({"tenants": {"x": 3}}, "must map limit names"),
])
def test_bad_limits_are_refused_naming_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        TenantLimits(**bad)
