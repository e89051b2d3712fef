"""What the project's Triton kernels share: the float32-accumulating ``dot`` and its constants.

Triton's interpreter (``TRITON_INTERPRET=1``, how CPU tests run the kernels) multiplies bfloat16
operands of ``tl.dot`` as their integer codes (3.9's ``InterpreterBuilder.create_dot``). There they
are widened to float32 first, which is exact (a bfloat16 product fits float32) and is what the GPU's
tensor cores compute with float32 accumulation; compiled kernels take the bfloat16 path.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def dot_options(dtype: torch.dtype) -> dict:
    """The ``dot`` constants of a kernel over ``dtype`` inputs: float32 stays IEEE (no TF32)."""
    return {"PRECISION": "ieee" if dtype == torch.float32 else "tf32", "WIDEN": INTERPRETED and dtype == torch.bfloat16}


def pow2(n: int) -> int:
    """The smallest power of two >= n (block sizes)."""
    return 1 << max(0, n - 1).bit_length()


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    """a @ b accumulated in float32."""
    if WIDEN:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


def probe(device: torch.device) -> None:
    """Compile and run one small kernel on ``device`` and check its result: a JIT, driver or ptxas that
    fails here would fail every kernel. Raises whatever failed, or RuntimeError on a wrong result."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(16, 16, generator=g).to(device=device, dtype=torch.bfloat16)
    b = torch.randn(16, 16, generator=g).to(device=device, dtype=torch.bfloat16)
    out = torch.empty(16, 16, device=device, dtype=torch.float32)
    _probe_kernel[(1,)](a, b, out, N=16, **dot_options(a.dtype))
    want = a.float() @ b.float()
    if not torch.allclose(out, want, rtol=1e-3, atol=1e-3):
        diff = float((out - want).abs().max())
        raise RuntimeError(f"the probe kernel computed a wrong product (max diff {diff:.3g})")


@triton.jit
def _probe_kernel(a_ptr, b_ptr, out_ptr, N: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    at = tl.arange(0, N)[:, None] * N + tl.arange(0, N)[None, :]
    tl.store(out_ptr + at, dot(tl.load(a_ptr + at), tl.load(b_ptr + at), PRECISION, WIDEN))
