"""One Flux-width Linear on CUDA: each backend's reference forward against its fast paths.

Per layer (3072 -> 12288 at 4,608 tokens, and the 1-token modulation shape 3072 -> 18432): bf16 F.linear, the
backend's reference forward (DIFFUSERS_QUANT_REFERENCE=1), the forward with the dequantization compiled
(fused.py, the hand-written kernels off), the forward with the hand-written Triton kernel (kernels.py) where
it covers the format, and the host time per call of each (no synchronisation: what a host-bound eager step
pays); dynamo's recompile counters after the compiled calls; the top CUDA kernels of the qint4 forward.
Prints JSON; median of 20 timed calls after 3 warm-up calls each.

    python benchmarks/probe_fused.py [FORMAT ...] > benchmarks/results/<machine>/fused-probe.json

FORMAT (e.g. ``gguf:q4_k``) limits the probe to those formats; default all of ``FORMATS``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_quant import fused, kernels  # noqa: E402
from diffusers_quant.backends import get_backend  # noqa: E402
from diffusers_quant.backends.gguf.nn import GGUFLinear  # noqa: E402
from diffusers_quant.spec import Spec  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = (
    "quanto:qint8",
    "quanto:qfloat8",
    "quanto:qint4",
    "nncf:int8",
    "nncf:int4",
    "gguf:q8_0",
    "gguf:q4_0",
    "gguf:q4_1",
    "gguf:q5_0",
    "gguf:q5_1",
    "gguf:q4_k",
    "gguf:q5_k",
    "gguf:q6_k",
)


def timed_ms(fn, n: int = 20) -> float:
    import time

    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        if DEVICE == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
    return sorted(times)[n // 2]


def host_ms(fn, n: int = 50) -> float:
    """Host time per call, without waiting for the GPU (the launch and Python overhead)."""
    import time

    fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    spent = (time.perf_counter() - t) * 1000 / n
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return spent


def _reference(layer, x):
    os.environ[fused.REFERENCE_ENV] = "1"
    try:
        return layer(x)
    finally:
        del os.environ[fused.REFERENCE_ENV]


def layer_for(fmt: str, linear: torch.nn.Linear):
    backend, qtype = fmt.split(":")
    if backend == "gguf":
        return GGUFLinear.from_linear(linear, qtype.upper(), device=DEVICE)
    return get_backend(backend).quantize_linear(linear, Spec.parse(fmt), torch.bfloat16, device=DEVICE)


def probe(in_features: int, out_features: int, tokens: int) -> dict:
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, dtype=torch.bfloat16, device=DEVICE)
    x = torch.randn(1, tokens, in_features, dtype=torch.bfloat16, device=DEVICE)
    result = {"shape": [in_features, out_features, tokens], "bf16": timed_ms(lambda: linear(x))}
    for fmt in sys.argv[1:] or FORMATS:
        layer = layer_for(fmt, linear)
        os.environ[fused.REFERENCE_ENV] = "1"
        reference = timed_ms(lambda layer=layer: layer(x))
        want = layer(x)
        del os.environ[fused.REFERENCE_ENV]
        counters.clear()
        kernels.KERNEL_DEVICES.discard(DEVICE)
        compiled = timed_ms(lambda layer=layer: layer(x))
        compiled_host = host_ms(lambda layer=layer: layer(x))
        got = layer(x)
        kernels.KERNEL_DEVICES.add(DEVICE)
        fast = timed_ms(lambda layer=layer: layer(x))
        fast_host = host_ms(lambda layer=layer: layer(x))
        got_kernel = layer(x)
        err = float((got.float() - want.float()).norm() / want.float().norm())
        err_kernel = float((got_kernel.float() - want.float()).norm() / want.float().norm())
        result[fmt] = {
            "reference_ms": reference,
            "reference_host_ms": host_ms(lambda layer=layer: _reference(layer, x)),
            "compiled_ms": compiled,
            "compiled_host_ms": compiled_host,
            "kernel_ms": fast,
            "kernel_host_ms": fast_host,
            "kernel_over_bf16": fast / result["bf16"],
            "compiled_over_bf16": compiled / result["bf16"],
            "reference_over_bf16": reference / result["bf16"],
            "rel_l2_compiled_vs_reference": err,
            "rel_l2_kernel_vs_reference": err_kernel,
            "recompiles": {k: dict(v) for k, v in counters.items() if k in ("recompiles", "stats", "frames")},
        }
    return result


def top_kernels(fmt: str = "quanto:qint4") -> list:
    linear = torch.nn.Linear(3072, 12288, dtype=torch.bfloat16, device=DEVICE)
    x = torch.randn(1, 4608, 3072, dtype=torch.bfloat16, device=DEVICE)
    layer = layer_for(fmt, linear)
    for _ in range(3):
        layer(x)
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(5):
            layer(x)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:8]
    return [[e.key[:90], round(getattr(e, key, 0) / 5 / 1000, 4), e.count] for e in events]


def dequant_only() -> dict:
    """quanto qint4's dequantization alone (3072 x 12288): eager ops, compiled with dynamic and static shapes."""
    from diffusers_quant.backends import quanto as qb

    linear = torch.nn.Linear(3072, 12288, dtype=torch.bfloat16, device=DEVICE)
    w = layer_for("quanto:qint4", linear).weight
    with torch._C.DisableTorchFunctionSubclass():
        args = (w._data._data, w._scale, w._shift, w._data.bits, *w.shape)
    dyn = torch.compile(qb._bits_weight, dynamic=True, fullgraph=True)
    static = torch.compile(qb._bits_weight, dynamic=False, fullgraph=True)
    return {
        "eager_ms": timed_ms(lambda: qb._bits_weight(*args)),
        "compiled_dynamic_ms": timed_ms(lambda: dyn(*args)),
        "compiled_static_ms": timed_ms(lambda: static(*args)),
        "bytes_moved_MB": (args[0].numel() + 2 * 3072 * 12288) / 1e6,
    }


if __name__ == "__main__":
    small = DEVICE == "cpu"  # a smoke run here; the figures are the GPU's
    os.environ[fused.FUSED_ENV] = "all"
    if small:
        fused.FUSED_DEVICES.add("cpu")
        kernels.KERNEL_DEVICES.add("cpu")  # Triton's interpreter
    shapes = [(256, 512, 64), (256, 768, 1)] if small else [(3072, 12288, 4608), (3072, 18432, 1)]
    out = {"device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", "torch": torch.__version__}
    out["layers"] = [probe(*s) for s in shapes]
    out["top_kernels_quanto_qint4"] = top_kernels()
    if not small:
        out["qint4_dequant_only"] = dequant_only()
    print(json.dumps(out, indent=1))
