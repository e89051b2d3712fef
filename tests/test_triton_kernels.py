"""The Triton kernels as a GPU will run them: the batched ragged decode kernel against the per-row
reference in float32, bfloat16 and float16 (Triton's interpreter, on the CPU); one compiled variant
for any document length; the capability check that falls back to torch; and every kernel compiled
ahead of time for sm_80 and sm_90 (``kvcompose bench gpu --compile-only``). conftest sets
TRITON_INTERPRET=1 before Triton loads; compiling runs in subprocesses without it."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from service.engine import attention, triton_ops
from service.engine.attention import decode_attention

ragged_attention = pytest.importorskip("service.engine.ragged_attention")
compile_check = pytest.importorskip("service.bench.compile_check")

ROOT = Path(__file__).resolve().parent.parent
COMPILER_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiling needs the real JIT

# Stated tolerances against the float32 reference on the same (rounded) inputs. float32: summation
# order only. Half types: the output is rounded once to its dtype and the softmax weights are rounded
# to it before the value product (as flash attention does): about 2 ulps of values of size ~1.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
SHAPES = {  # heads, kv heads, head dim, soft cap
    "gqa-4:2-d48": (4, 2, 48, None),
    "gqa-9:3-d64": (9, 3, 64, None),
    "mha-d16": (4, 4, 16, None),
    "gemma2-softcap": (4, 2, 32, 50.0),
}


def rows(heads: int, kv_heads: int, dim: int, dtype: torch.dtype, lengths: list[int], seed: int = 0):
    """Row buffers of different capacities, filled to ``lengths``, with random head-wise evictions."""
    g = torch.Generator().manual_seed(seed)
    keys, values, hidden = [], [], []
    for n in lengths:
        capacity = n + 1 + int(torch.randint(0, 9, (1,), generator=g))
        keys.append(torch.randn(1, kv_heads, capacity, dim, generator=g).to(dtype))
        values.append(torch.randn(1, kv_heads, capacity, dim, generator=g).to(dtype))
        h = torch.ones(1, kv_heads, capacity, dtype=torch.bool)
        h[:, :, :n] = torch.rand(1, kv_heads, n, generator=g) < 0.3
        hidden.append(h)
    query = torch.randn(len(lengths), heads, 1, dim, generator=g).to(dtype)
    new = [torch.randn(len(lengths), kv_heads, 1, dim, generator=g).to(dtype) for _ in range(2)]
    return keys, values, hidden, query, new


@pytest.mark.parametrize("dtype", TOLERANCE, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("splits", [1, 3])
def test_batched_decode_equals_each_row_alone(shape, dtype, splits):
    heads, kv_heads, dim, softcap = SHAPES[shape]
    lengths = [70, 1, 130, 9]  # a one-token row, and rows whose later splits are empty
    keys, values, hidden, query, (k_new, v_new) = rows(heads, kv_heads, dim, dtype, lengths)
    expected_k, expected_v, expected_h = [k.clone() for k in keys], [v.clone() for v in values], \
        [h.clone() for h in hidden]
    batch = ragged_attention.RaggedRows(ragged_attention.table(keys, values, hidden), torch.tensor(lengths),
                                        kv_heads, splits)
    ragged_attention.append(batch, k_new, v_new)
    out = ragged_attention.attend(query, batch, None, softcap)
    assert out.dtype == dtype and out.shape == query.shape
    for r, n in enumerate(lengths):
        expected_k[r][0, :, n], expected_v[r][0, :, n], expected_h[r][0, :, n] = k_new[r, :, 0], v_new[r, :, 0], False
        assert torch.equal(keys[r], expected_k[r]) and torch.equal(values[r], expected_v[r])  # that slot only
        assert torch.equal(hidden[r], expected_h[r])
        ref = decode_attention(query[r : r + 1].float(), keys[r].float(), values[r].float(), hidden[r], None, softcap)
        torch.testing.assert_close(out[r : r + 1].float(), ref, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", TOLERANCE, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", ["gqa-4:2-d48", "gqa-9:3-d64", "gemma2-softcap"])
def test_a_question_prefill_equals_each_row_alone(shape, dtype):
    """A batch's questions (q_len 9, so several query tiles of GQA heads x queries): each row's queries see
    its cache but its evicted slots, and the question causally; rows with and without evictions."""
    heads, kv_heads, dim, softcap = SHAPES[shape]
    q_len, cached = 9, [70, 1, 130]
    keys, values, hidden, _, _ = rows(heads, kv_heads, dim, dtype, [n + q_len for n in cached])
    evicted = [hidden[0][0, :, : cached[0]], None, hidden[2][0, :, : cached[2]]]
    query = torch.randn(len(cached), heads, q_len, dim, generator=torch.Generator().manual_seed(5)).to(dtype)
    views = [k[:, :, : n + q_len] for k, n in zip(keys, cached)]
    value_views = [v[:, :, : n + q_len] for v, n in zip(values, cached)]
    out = ragged_attention.attend_views(query, views, value_views, evicted, None, softcap)
    for r, (k, v, e) in enumerate(zip(views, value_views, evicted)):
        ref = attention._sdpa(query[r : r + 1].float(), k.float(), v.float(), e, 0.0, None, softcap)
        torch.testing.assert_close(out[r : r + 1].float(), ref, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_a_table_refuses_buffers_the_kernel_cannot_address():
    k = torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match="contiguous"):
        ragged_attention.table([k.transpose(2, 3)], [k], [torch.zeros(1, 2, 8, dtype=torch.bool)])
    with pytest.raises(ValueError, match="contiguous"):  # a view that does not start at a head's first slot
        ragged_attention.table([k[:, :, 1:]], [k[:, :, 1:]], [None])
    with pytest.raises(ValueError, match="bool mask"):
        ragged_attention.table([k], [k], [torch.zeros(1, 2, 8)])


def test_any_document_length_uses_the_same_compiled_kernels():
    """Lengths reach the kernels unspecialised: 20 random lengths compile what one length does (the
    two flavours of the scorer's kernels are its causal/mean constants, not lengths)."""
    shape = {"heads": 32, "kv_heads": 8, "head_dim": 128, "dtype": torch.bfloat16, "softcap": None}
    lengths = random.Random(0).sample(range(17, 40000), 20)
    one = compile_check.variants(lengths[:1], **shape)
    assert compile_check.variants(lengths, **shape) == one
    assert set(one) == {"_lse_kernel", "_score_kernel", "_append_kernel", "_attend_kernel", "_merge_kernel"}
    assert max(one.values()) <= 2


def test_the_probe_kernel_runs_and_checks_its_result():
    triton_ops.probe(torch.device("cpu"))  # interpreted here; compiled on a GPU


@pytest.fixture
def fresh_check():
    attention.triton_runs_on.cache_clear()
    yield
    attention.triton_runs_on.cache_clear()


def test_a_gpu_where_triton_fails_uses_the_torch_paths(fresh_check, monkeypatch, caplog):
    """A JIT, driver or ptxas that fails on the node: one log line, then the torch scorer and per-row
    decode attention, never a failed request."""
    calls = []

    def broken(device):
        calls.append(device)
        raise RuntimeError("PTX .version 8.7 does not support .target sm_90a\nmore detail")

    monkeypatch.setattr(triton_ops, "probe", broken)
    cuda = torch.device("cuda", 0)
    with caplog.at_level(logging.WARNING, logger="service.engine.attention"):
        assert not attention.triton_runs_on(cuda)
        assert not attention.triton_runs_on(cuda)  # checked once per process and device
    assert len(calls) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "Triton kernels do not run on cuda:0 (RuntimeError: PTX .version 8.7 does not support .target sm_90a); "
        "using the torch scorer and per-row decode attention"]


def test_without_a_cuda_device_the_real_probe_fails_cleanly(fresh_check, caplog):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with caplog.at_level(logging.WARNING, logger="service.engine.attention"):
        assert not attention.triton_runs_on(torch.device("cuda"))
    assert len(caplog.records) == 1 and "Triton kernels do not run on cuda" in caplog.records[0].getMessage()


def test_a_kernel_over_a_chip_limit_is_a_failure():
    """The check can fail: the merge kernel compiled for a chip with no shared memory."""
    script = ("import torch; from service.bench import compile_check as c; "
              "launch = c.shape_launches(9, 3, 64, torch.float16, None)[-1]; c.CHIPS[80] = ('tiny', 0); "
              "print(c.check(launch, 80, c.specialised(launch, 80)[1]).line())")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=COMPILER_ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("_merge_kernel") and "FAIL" in done.stdout and "shared memory > 0" in done.stdout


def test_every_kernel_compiles_for_sm80_and_sm90():
    """The CI check: ``kvcompose bench gpu --compile-only``, with no GPU (and no interpreter)."""
    done = subprocess.run([sys.executable, "-m", "service.cli", "bench", "gpu", "--compile-only"], cwd=ROOT,
                          env=COMPILER_ENV,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if "regs" in line]
    kernels = ("_lse_kernel", "_score_kernel", "_append_kernel", "_attend_kernel", "_merge_kernel", "_probe_kernel")
    for kernel in kernels:
        for chip in ("sm_80", "sm_90"):
            assert any(line.startswith(kernel) and chip in line for line in lines), (kernel, chip)
    assert all(" ok " in line for line in lines)
    assert "every kernel compiles within the chips' limits" in done.stdout
