"""Tenant limits shared through Redis (``service/serve/shared_limits.py``): two API processes on one
real Redis hold a tenant to one share, not two; a killed process's slots come back within its lease;
a Redis that does not answer leaves each process its local limits (fail open, logged)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid

import grpc
import pytest
from store_helpers import SHARED_REDIS, free_port

from service.config import StoreConfig, TenantLimits
from service.serve import admission as admission_module
from service.serve.admission import admission_for
from service.serve.messages import ApiError

RATE, SECONDS = 20, 3.0
# An API process: ready, then (given a start time on stdin) checks one tenant's rate as fast as it can
# for SECONDS, or holds ``hold`` decodes until killed; prints what it got.
PROGRAM = """
import asyncio, json, sys, time
from service.config import StoreConfig, TenantLimits
from service.serve.admission import admission_for
from service.serve.messages import ApiError
url, prefix, limits, seconds, hold = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), *sys.argv[4:6]
seconds, hold = float(seconds), int(hold)

async def main():
    admission = admission_for(TenantLimits(**limits), StoreConfig(redis_url=url, key_prefix=prefix))
    print("ready", flush=True)
    start = float(sys.stdin.readline())
    if hold:
        held = [admission.hold("metered", "decodes") for _ in range(hold)]  # referenced: held till killed
        for h in held:
            await h.__aenter__()
        print("held", flush=True)
        await asyncio.sleep(3600)
    admitted = refused = 0
    await asyncio.sleep(max(0.0, start - time.time()))
    while time.time() < start + seconds:
        try:
            await admission.check_rate("metered")
            admitted += 1
        except ApiError:
            refused += 1
        await asyncio.sleep(0.002)
    print(json.dumps({"admitted": admitted, "refused": refused}), flush=True)

asyncio.run(main())
"""


def api_process(prefix: str, limits: dict, hold: int = 0) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", PROGRAM, SHARED_REDIS, prefix, json.dumps(limits), str(SECONDS),
                          str(hold)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def run_together(limits: dict, prefix: str) -> list[dict]:
    processes = [api_process(prefix, limits) for _ in range(2)]
    start = time.time() + 0.3
    for p in processes:
        p.stdin.write(f"{start}\n")
        p.stdin.flush()
    return [json.loads(p.communicate(timeout=30)[0].strip().splitlines()[-1]) for p in processes]


def test_two_processes_hold_a_tenant_to_one_rate_not_two():
    limits = {"requests_per_s": RATE, "burst": 5}  # a bucket a busy 2-core machine's scheduling cannot overflow
    expected = RATE * SECONDS + 5
    shared = run_together({**limits, "cluster_wide": True}, f"kvc-test-{uuid.uuid4().hex[:8]}")
    admitted = sum(r["admitted"] for r in shared)
    assert all(r["admitted"] > 0 and r["refused"] > 0 for r in shared), shared  # both took part, both were held
    assert abs(admitted - expected) <= 0.1 * expected, (admitted, expected, shared)
    # the control: each process on its own lets the tenant have its whole share, twice in all
    alone = sum(r["admitted"] for r in run_together({**limits, "cluster_wide": False}, "unused"))
    print(f"{RATE} requests/s for {SECONDS:g} s: {admitted} admitted across 2 processes ({expected:g} expected), "
          f"{alone} with per-process limits")
    assert alone >= 1.6 * expected, (alone, expected)


def test_a_killed_process_s_slots_come_back_within_its_lease():
    prefix, lease_s = f"kvc-test-{uuid.uuid4().hex[:8]}", 1.0
    limits = TenantLimits(max_decodes=2, lease_s=lease_s)
    holder = api_process(prefix, {"max_decodes": 2, "lease_s": lease_s}, hold=2)
    holder.stdin.write("0\n")
    holder.stdin.flush()
    assert holder.stdout.readline().strip() == "held"

    async def go() -> float:
        admission = admission_for(limits, StoreConfig(redis_url=SHARED_REDIS, key_prefix=prefix))
        await asyncio.sleep(3 * lease_s)  # renewed: still held after three leases
        with pytest.raises(ApiError) as e:
            async with admission.hold("metered", "decodes"):
                pass
        assert e.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 decodes in flight across all replicas" in str(e.value) and "retry in" in str(e.value)
        os.kill(holder.pid, signal.SIGKILL)
        killed = time.monotonic()
        while True:
            try:
                async with admission.hold("metered", "decodes"), admission.hold("metered", "decodes"):
                    return time.monotonic() - killed
            except ApiError:
                await asyncio.sleep(0.05)
                assert time.monotonic() - killed < 5 * lease_s, "the dead process's slots never came back"

    try:
        back_after = asyncio.run(go())
    finally:
        holder.kill()
        holder.wait()
    assert back_after <= lease_s + 0.5, back_after


@pytest.mark.parametrize("target", ["single", "cluster"])
def test_shared_limits_on_one_redis_and_on_a_cluster(target, request):
    url = SHARED_REDIS if target == "single" else request.getfixturevalue("redis_cluster").url
    config = StoreConfig(redis_url=url, redis_cluster=target == "cluster",
                         key_prefix=f"kvc-test-{uuid.uuid4().hex[:8]}")
    limits = TenantLimits(requests_per_s=1, burst=2, max_prefills=1)

    async def go():
        a, b = admission_for(limits, config), admission_for(limits, config)  # two processes' worth
        await a.check_rate("acme")
        await b.check_rate("acme")
        with pytest.raises(ApiError) as e:
            await a.check_rate("acme")
        assert "across all replicas" in str(e.value) and e.value.retry_after_s > 0
        await b.check_rate("other")  # tenants have their own shares
        async with a.hold("acme", "prefills"):
            with pytest.raises(ApiError, match="1 prefills in flight across all replicas"):
                async with b.hold("acme", "prefills"):
                    pass
        await asyncio.sleep(0.1)  # the release is sent off the caller's path
        async with b.hold("acme", "prefills"):
            pass

    asyncio.run(go())


def test_an_unreachable_redis_leaves_each_process_its_local_limits(caplog, monkeypatch):
    monkeypatch.setattr(admission_module, "SHARED_TIMEOUT_S", 0.2)
    config = StoreConfig(redis_url=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    admission = admission_for(TenantLimits(requests_per_s=1, burst=2, max_decodes=1), config)

    async def go():
        await admission.check_rate("acme")
        started = time.monotonic()
        await admission.check_rate("acme")  # local, without asking Redis again
        assert time.monotonic() - started < 0.05
        with pytest.raises(ApiError, match="requests/s in this process"):
            await admission.check_rate("acme")
        async with admission.hold("acme", "decodes"):
            with pytest.raises(ApiError, match="1 decodes in flight in this process"):
                async with admission.hold("acme", "decodes"):
                    pass

    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        asyncio.run(go())
    assert sum("Redis did not answer" in r.getMessage() for r in caplog.records) == 1  # once per outage
