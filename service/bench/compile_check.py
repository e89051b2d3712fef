"""``kvcompose bench gpu --compile-only``: every Triton kernel we ship, compiled for real chips, no GPU needed.

Triton's interpreter (how CPU tests run the kernels) tolerates what the compiler rejects: block
shapes, ``tl.dot`` sizes, dtype mixes, register and shared-memory limits. Here each kernel is
compiled ahead of time to a cubin for sm_80 (A100) and sm_90 (H100/H200), exactly as its JIT would
compile it at run time: the project's own launch wrappers are called on small CPU tensors with the
kernel launch intercepted, and Triton's binder turns the launch's arguments into the signature and
specialisation it would compile. Shapes: head dim 64 and 128; GQA 32:8, 16:8 and 9:3; bfloat16 and
float16; Gemma 2's soft-capping on and off. ``ptxas -v`` then gives registers, spills and shared
memory, checked against the chip's limits.

``variants`` reuses the same interception to count the compiled variants a set of document lengths
would produce (lengths are not specialised: one variant serves every length).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

CHIPS = {  # compute capability -> (name, opt-in shared memory per block in bytes)
    80: ("sm_80 (A100)", 163 * 1024),
    90: ("sm_90 (H100/H200)", 227 * 1024),
}
MAX_REGISTERS = 255  # per thread, every chip since sm_35
REGISTERS_PER_BLOCK = 65536
GQA = ((32, 8), (16, 8), (9, 3))
HEAD_DIMS = (64, 128)
DTYPES = (torch.bfloat16, torch.float16)
SOFTCAPS = (None, 50.0)


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the wrapper made it: what Triton's binder turns into a compile."""

    label: str
    kernel: object  # a JITFunction (or, under the interpreter, the InterpretedFunction standing for one)
    args: tuple
    kwargs: dict


@dataclass(frozen=True)
class Result:
    kernel: str
    chip: str
    shapes: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    seconds: float
    problem: str = ""

    def line(self) -> str:
        verdict = f"FAIL {self.problem}" if self.problem else "ok"
        return (f"{self.kernel:<32} {self.chip:<18} regs {self.registers:>3}  spills {self.spill_bytes:>4} B  "
                f"smem {self.shared_bytes:>6} B  {self.seconds:5.1f}s  {verdict}  [{self.shapes}]")


def kernels() -> list:
    from service.engine import ragged_attention, triton_ops
    from service.engine.presses import fused_scoring

    return [fused_scoring._lse_kernel, fused_scoring._score_kernel, ragged_attention._append_kernel,
            ragged_attention._attend_kernel, ragged_attention._merge_kernel, triton_ops._probe_kernel]


@contextlib.contextmanager
def intercepted() -> Iterator[list[Launch]]:
    """Every launch of our kernels inside the block is recorded instead of run."""
    launches: list[Launch] = []
    label = [""]

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            launches.append(Launch(label[0], kernel, args, kwargs))
        return run

    patched = kernels()
    for k in patched:
        k.run = recorder(k)
    try:
        yield launches
    finally:
        for k in patched:
            del k.run  # back to the class's run


def shape_launches(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, softcap: float | None,
                   tokens: int = 300, batch: int = 3) -> list[Launch]:
    """The launches of one model shape: the scorer's two kernels (causal and not, max and mean) and the
    batched attention's three (a decode step and a question prefill), as the wrappers make them for
    ``tokens`` context tokens."""
    from service.engine import ragged_attention
    from service.engine.presses import fused_scoring

    cpu = torch.device("cpu")  # never computed on: only the launches' arguments are read
    g = torch.Generator(device=cpu).manual_seed(0)
    q = torch.randn(heads, 40, head_dim, generator=g, device=cpu).to(dtype)
    keys = torch.randn(kv_heads, tokens + 40, head_dim, generator=g, device=cpu).to(dtype)
    bufs = [torch.zeros(1, kv_heads, tokens + 8 * r, head_dim, dtype=dtype, device=cpu) for r in range(batch)]
    hidden = [torch.zeros(b.shape[:3], dtype=torch.bool, device=cpu) for b in bufs]
    rows = ragged_attention.RaggedRows(ragged_attention.table(bufs, bufs, hidden),
                                       torch.full((batch,), tokens - 1, device=cpu), kv_heads, n_splits=5)
    new = torch.zeros(batch, kv_heads, 1, head_dim, dtype=dtype, device=cpu)
    with intercepted() as launches:
        fused_scoring.task_attention(q, keys, tokens, 0.1, "max", softcap=softcap)
        fused_scoring.task_attention(q, keys, tokens, 0.1, "mean", causal=False, softcap=softcap)
        ragged_attention.append(rows, new, new)
        ragged_attention.attend(torch.zeros(batch, heads, 1, head_dim, dtype=dtype, device=cpu), rows, 0.1, softcap)
        views = [b[:, :, :tokens] for b in bufs]  # a question prefill: 40 queries, query tiles of 64 rows
        ragged_attention.attend_views(torch.zeros(batch, heads, 40, head_dim, dtype=dtype, device=cpu), views, views,
                                      [h[0, :, : tokens - 40] for h in hidden], 0.1, softcap)
    return launches


def all_launches() -> list[Launch]:
    from service.engine import triton_ops

    out = []
    for heads, kv_heads in GQA:
        for dim in HEAD_DIMS:
            for dtype in DTYPES:
                for cap in SOFTCAPS:
                    label = f"{heads}:{kv_heads} d{dim} {str(dtype)[6:]}{' softcap' if cap else ''}"
                    out += [Launch(label, x.kernel, x.args, x.kwargs)
                            for x in shape_launches(heads, kv_heads, dim, dtype, cap)]
    with intercepted() as probe:
        with contextlib.suppress(Exception):  # the probe checks a result it never got
            triton_ops.probe(torch.device("cpu"))
    return out + [Launch("probe", p.kernel, p.args, p.kwargs) for p in probe]


def as_jit(kernel):
    """The JITFunction Triton would compile (the interpreter wraps the same function)."""
    from triton.runtime.jit import JITFunction

    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)


def specialised(launch: Launch, capability: int) -> tuple[str, Callable[[], object]]:
    """(the JIT's cache key for this launch on this chip, a function that compiles it)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = as_jit(launch.kernel)
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    kwargs = {"debug": False, **launch.kwargs}
    bound, spec, options = create_function_from_signature(jit.signature, jit.params, backend)(*launch.args, **kwargs)
    key = f"{jit.fn.__name__}:{spec}:{sorted(options.items())}"

    def build():
        opts, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, spec, options)
        return triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target, options=opts.__dict__)
    return key, build


def resources(compiled, capability: int) -> tuple[int, int]:
    """(registers per thread, spill bytes) from ``ptxas -v`` on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([get_ptxas(capability).path, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(capability)}", ptx, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True).stderr
    registers = max((int(n) for n in re.findall(r"Used (\d+) registers", log)), default=0)
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


def check(launch: Launch, capability: int, build: Callable[[], object]) -> Result:
    chip, shared_limit = CHIPS[capability]
    name = as_jit(launch.kernel).fn.__name__
    start = time.perf_counter()
    try:
        compiled = build()
        registers, spills = resources(compiled, capability)
    except Exception as e:  # noqa: BLE001 - a kernel that does not compile is this check's finding
        return Result(name, chip, launch.label, 0, 0, 0, time.perf_counter() - start,
                      f"does not compile: {type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}")
    shared, warps = compiled.metadata.shared, compiled.metadata.num_warps
    threads = warps * 32
    problems = [p for p, bad in (
        (f"{registers} registers > {MAX_REGISTERS}", registers > MAX_REGISTERS),
        (f"{registers} x {threads} threads > {REGISTERS_PER_BLOCK}", registers * threads > REGISTERS_PER_BLOCK),
        (f"{shared} B shared memory > {shared_limit}", shared > shared_limit),
        (f"{spills} B of register spills", spills > 0)) if bad]
    return Result(name, chip, launch.label, registers, spills, shared, time.perf_counter() - start, "; ".join(problems))


def compile_all(capabilities: tuple[int, ...] = tuple(CHIPS), echo: Callable[[str], None] = print) -> list[Result]:
    """Every distinct (kernel, specialisation) of every shape, compiled for each chip; one line each."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 makes Triton interpret kernels, not compile them: unset it")
    results = []
    for capability in capabilities:
        seen: dict[str, Launch] = {}
        for launch in all_launches():
            key, build = specialised(launch, capability)
            if key not in seen:
                seen[key] = launch
                results.append(check(launch, capability, build))
                echo(results[-1].line())
    return results


def variants(lengths: list[int], capability: int = 90, **shape) -> dict[str, int]:
    """How many compiled variants of each kernel a set of document lengths would produce."""
    keys: dict[str, set[str]] = {}
    for n in lengths:
        for launch in shape_launches(tokens=n, **shape):
            key, _ = specialised(launch, capability)
            keys.setdefault(key.split(":")[0], set()).add(key)
    return {name: len(k) for name, k in keys.items()}
