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
