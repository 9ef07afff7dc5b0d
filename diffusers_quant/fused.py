"""Fused weight dequantization: the weight-only fast path of every backend's Linear.

A weight-only layer dequantizes its weight on each call and runs one bf16 / fp16 matmul. Written as torch
ops, a dequantization is several kernels (unpack, subtract the zero point, scale, regroup), each reading and
writing the whole weight: 2x the bf16 matmul's time at a diffusion transformer's 4,608 tokens for 4-bit
quanto weights (``benchmarks/results/nvidia-h100/quanto-kernels.json``). On CUDA :func:`fused` runs the same
function compiled (Inductor turns it into one Triton kernel that reads the packed bytes once and writes the
weight once), one graph per layer shape (shapes compiled static: the kernels Inductor writes for symbolic
shapes ran 3x slower on an H200, ``benchmarks/results/nvidia-h200/fused-probe.json``); then the matmul is
cuBLAS's with the bias in its epilogue.

Each call of a compiled function costs the host ~0.1-0.25 ms (guards, wrappers, the launch), which a model
of ~80 Linears turns into host-bound eager steps; so where Triton runs, the common layouts take a
hand-written kernel instead (``kernels.py``: one launch), and the compiled function stays for the rest
(GGUF K-quants, ...). With the kernels every backend's eager step on the H200 came within 1.10x of bf16
(``benchmarks/results/nvidia-h200/kernels.md``), so every backend fuses by default;
``DIFFUSERS_QUANT_FUSED=all | none | <backend>,...`` chooses.

Inside a model that is itself compiled (``compile_repeated_blocks``) the plain function is traced into the
block's graph instead (there fusion costs nothing per call), except where the hand-written kernel beat
Inductor's own on CUDA (GGUF's covered types, quanto's 8-bit weights, bitsandbytes' int8): there the graph
holds that kernel, as a ``triton_op`` launched by Inductor's code (:func:`kernel_in_graph`). Eager on the CPU
a backend may take its own faster pure-torch decode, bit for bit its reference (quanto's float8 codes, NNCF's
float32 steps); elsewhere, or with ``DIFFUSERS_QUANT_REFERENCE=1``, the function runs as it is: the pure-torch
reference the fused kernels are tested against. :func:`fast_path` names which of these a layer takes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TypeVar

import torch

from . import kernels
from .kernels import tracing  # re-exported: the backends ask fused.tracing

REFERENCE_ENV = "DIFFUSERS_QUANT_REFERENCE"
FUSED_ENV = "DIFFUSERS_QUANT_FUSED"
FUSED_BACKENDS = ("bnb", "gguf", "nncf", "quanto")  # bnb: its int8 layers (bnb_int8.py)
# the backends whose eager steps the fused path made faster (see the module doc): all of them
DEFAULT_FUSED = frozenset(FUSED_BACKENDS)
# Devices whose tensors take the compiled kernels (tests add "cpu" to check the compiled graphs here).
FUSED_DEVICES = {"cuda"}

# Graphs per fused function: one per layer shape and dtype (a diffusion transformer has a dozen or two
# shapes); dynamo's default limit of 8 would leave the rest unfused.
RECOMPILE_LIMIT = 64

F = TypeVar("F", bound=Callable)


# Every quantized layer call reads the two settings: straight from os.environ's own dict (its keys and
# values encoded as the platform keeps them) they cost ~0.1 us a read against ~1.8 through the mapping.
_ENVIRON = getattr(os.environ, "_data", None)
_ENV_KEYS = (
    {name: os.environ.encodekey(name) for name in (REFERENCE_ENV, FUSED_ENV)} if _ENVIRON is not None else {}
)


def _setting(name: str) -> str | None:
    if _ENVIRON is None:  # pragma: no cover - an os.environ without its dict
        return os.environ.get(name)
    value = _ENVIRON.get(_ENV_KEYS[name])
    return None if value is None else os.environ.decodevalue(value)


def reference_forced() -> bool:
    return _setting(REFERENCE_ENV) == "1"


@functools.cache
def _have_compiler(device_type: str) -> bool:
    if device_type != "cuda":
        return True  # Inductor's C++ backend
    try:
        from torch.utils._triton import has_triton

        return has_triton()
    except ImportError:  # pragma: no cover - a torch without Triton support
        return False


def fused_backends() -> frozenset[str]:
    """The backends whose layers take the fused path: ``DIFFUSERS_QUANT_FUSED`` or the default."""
    value = (_setting(FUSED_ENV) or "").strip().lower()
    if not value:
        return DEFAULT_FUSED
    if value == "all":
        return frozenset(FUSED_BACKENDS)
    if value in ("none", "0"):
        return frozenset()
    names = frozenset(name.strip() for name in value.split(",") if name.strip())
    unknown = sorted(names - set(FUSED_BACKENDS))
    if unknown:
        from .errors import QuantError

        raise QuantError(
            f"{FUSED_ENV}={value!r}: unknown backend(s) {', '.join(unknown)}; expected all, none, or a comma "
            f"list of {', '.join(FUSED_BACKENDS)}"
        )
    return names


def _compiles_here(t: torch.Tensor) -> bool:
    """On a fused device, with a compiler, not forced off, and not being traced (then the plain ops go into
    the region's graph and fuse with it)."""
    if tracing(t):
        return False
    return t.device.type in FUSED_DEVICES and not reference_forced() and _have_compiler(t.device.type)


def fast_path(t: torch.Tensor, backend: str) -> str | None:
    """The path a ``backend`` layer whose input is ``t`` takes: ``"fused"`` (the kernels or the compiled
    function, on a fused device), ``"traced"`` (inside a compiled region: the plain ops go into the region's
    graph), ``"cpu"`` (eager on the CPU: the backend's own fast CPU path, where it has one), or None for the
    reference (the backend switched off or the reference forced, or another device)."""
    if backend not in fused_backends() or reference_forced():
        return None
    if tracing(t):
        return "traced"
    device = t.device.type
    if device in FUSED_DEVICES and _have_compiler(device):
        return "fused"
    return "cpu" if device == "cpu" else None


@torch.compiler.assume_constant_result
def kernel_in_graph(device_type: str, backend: str) -> bool:
    """Whether a compiled graph runs ``backend``'s hand-written kernel (our ``triton_op``) on ``device_type``
    (asked once per trace, so the environment and Triton lookups stay out of the graph): a kernel device
    with Triton, the backend fused (``DIFFUSERS_QUANT_FUSED``) and the reference not forced."""
    if device_type not in kernels.KERNEL_DEVICES:
        return False
    return backend in fused_backends() and not reference_forced() and kernels.have_triton(device_type)


_RUNNERS: dict[str, Callable] = {}  # every fused function by name, for path_counts


def path_counts() -> dict[str, tuple[int, int]]:
    """``(hand-written kernel calls, compiled-function calls)`` of every fused function so far, by name: a
    benchmark takes the difference across a step to see which path its layers took."""
    return {name: (run.kernel_calls, run.fused_calls) for name, run in _RUNNERS.items()}


def fused(fn: F, kernel: Callable | None = None, name: str | None = None) -> F:
    """``fn`` (tensors in, one tensor out) run fast where its first argument is on a fused device (outside
    compiled regions, unless the reference is forced), else as it is. Fast means ``kernel`` (a hand-written
    Triton kernel with ``fn``'s arguments, ``kernels.py``) where Triton runs and the kernel covers the
    arguments (it returns None where not), else ``fn`` compiled: lazily, one static graph per shape (up to
    ``RECOMPILE_LIMIT``; past it dynamo runs the function as it is). ``name`` (default: ``fn``'s) is the
    key of :func:`path_counts`."""
    compiled = None

    def fast(first, *args, **kwargs):
        nonlocal compiled
        if kernel is not None and kernels.available(first):
            out = kernel(first, *args, **kwargs)
            if out is not None:
                run.kernel_calls += 1
                return out
        if compiled is None:
            compiled = torch.compile(fn, dynamic=False, fullgraph=True)
        run.fused_calls += 1
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return compiled(first, *args, **kwargs)

    @functools.wraps(fn)
    def run(first, *args, **kwargs):
        if not _compiles_here(first):
            return fn(first, *args, **kwargs)
        return fast(first, *args, **kwargs)

    # for a caller whose fast_path(first, ...) said "fused" already: the same, without asking again
    run.fast = fast
    # how often the hand-written kernel / the compiled function ran (tests check which path was taken)
    run.kernel_calls = 0
    run.fused_calls = 0
    _RUNNERS[name or fn.__qualname__] = run
    return run  # type: ignore[return-value]
