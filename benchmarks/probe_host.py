"""Where a quantized Linear's eager call spends host time: the parts, a profile, and a leaner launch.

An eager diffusion step on an H200 runs ~80 quantized Linears in ~28 ms of GPU time; at 0.1-0.15 ms of host
time a call the host comes close to the GPU, and steps then spread between runs (1.04-1.78x bf16 for NNCF
int8). Per format (a 3072 -> 12288 layer at 1 token: little GPU work, so the host is what is timed): host
time per call of the whole forward, of ``F.linear`` alone, of the dequantization wrapper, of the Triton
launch alone, and of the same kernel launched through its compiled handle (``CompiledKernel[grid](...)``,
which skips the JIT's argument binding and cache lookup); then the top functions of a cProfile of the
forward. Prints JSON.

    python benchmarks/probe_host.py > benchmarks/results/<machine>/probe-host.json
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from probe_fused import DEVICE, FORMATS, layer_for  # noqa: E402

from diffusers_quant import fused, kernels  # noqa: E402

SHAPE = (3072, 12288) if DEVICE == "cuda" else (256, 512)  # the CPU run is a smoke run (interpreted Triton)
CALLS = 200 if DEVICE == "cuda" else 5


def host_us(fn, n: int = CALLS) -> float:
    """Median over 5 rounds of the host time per call, the GPU not waited for within a round."""
    for _ in range(5):
        fn()
    rounds = []
    for _ in range(5):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t) * 1e6 / n)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return sorted(rounds)[2]


def profile_top(fn, n: int = CALLS, top: int = 18) -> list:
    for _ in range(5):
        fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    stream = io.StringIO()
    stats = pstats.Stats(prof, stream=stream)
    rows = []
    for (file, line, name), (_cc, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            [
                f"{Path(file).name}:{line}:{name}",
                calls // n,
                round(tottime * 1e6 / n, 2),
                round(cumtime * 1e6 / n, 2),
            ]
        )
    rows.sort(key=lambda r: r[2], reverse=True)
    return rows[:top]


def _launches(fmt: str, layer) -> dict:
    """The wrapper, the bare Triton launch and the compiled-handle launch of the format's kernel."""
    from diffusers_quant.backends.gguf.nn import _fused_decoder

    out: dict = {}
    backend = fmt.split(":")[0]
    if backend != "gguf" or layer.qtype not in kernels.GGML_TYPES:  # the launch parts: 32-element types
        return out
    blocks = layer.weight.reshape(-1, layer._type_size)
    qtype = layer.qtype
    dtype = torch.bfloat16
    decoder = _fused_decoder(qtype)
    out["fused_wrapper_us"] = host_us(lambda: decoder(blocks, dtype))
    out["kernels_ggml_us"] = host_us(lambda: kernels.ggml(qtype, blocks, dtype))
    k = kernels._kernels(blocks)
    kind, size = kernels.GGML_TYPES[qtype]
    n = blocks.shape[0]
    w = torch.empty((n, 32), dtype=dtype, device=blocks.device)
    halves = blocks.view(torch.float16)
    grid = (kernels._cdiv(n, kernels.GGML_ROWS),)
    out["empty_us"] = host_us(lambda: torch.empty((n, 32), dtype=dtype, device=blocks.device))
    out["view_us"] = host_us(lambda: blocks.view(torch.float16))
    out["jit_launch_us"] = host_us(
        lambda: k.ggml_blocks[grid](blocks, halves, w, n, TYPE=kind, TYPE_SIZE=size, ROWS=kernels.GGML_ROWS)
    )
    if DEVICE != "cuda":
        return out
    compiled = k.ggml_blocks[grid](blocks, halves, w, n, TYPE=kind, TYPE_SIZE=size, ROWS=kernels.GGML_ROWS)
    want = w.clone()
    w.zero_()
    grid3 = (grid[0], 1, 1)  # a compiled handle takes the full 3-D grid
    for args in ((blocks, halves, w, n), (blocks, halves, w, n, kind, size, kernels.GGML_ROWS)):
        try:
            compiled[grid3](*args)
            torch.cuda.synchronize()
            ok = torch.equal(w, want)
            out[f"handle_launch_{len(args)}_args_us"] = host_us(lambda args=args: compiled[grid3](*args))
            out[f"handle_launch_{len(args)}_args_equal"] = ok
        except Exception as e:  # noqa: BLE001 - a probe: record what the launcher refuses
            out[f"handle_launch_{len(args)}_args_error"] = f"{type(e).__name__}: {e}"[:300]
        w.zero_()
    return out


def main() -> dict:
    torch.manual_seed(0)
    linear = torch.nn.Linear(*SHAPE, dtype=torch.bfloat16, device=DEVICE)
    x = torch.randn(1, 1, SHAPE[0], dtype=torch.bfloat16, device=DEVICE)
    result: dict = {
        "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": [*SHAPE, 1],
        "bf16_linear_us": host_us(lambda: linear(x)),
        "bf16_F_linear_us": host_us(lambda: F.linear(x, linear.weight, linear.bias)),
    }
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    with torch.no_grad():
        for fmt in sys.argv[1:] or FORMATS:
            layer = layer_for(fmt, linear)
            # bf16's F.linear timed beside each format: the host's speed drifts within a run (2-3x on the
            # shared GPU machine, session 10), so the ratio is the figure to compare
            bf16 = host_us(lambda: F.linear(x, linear.weight, linear.bias))
            forward = host_us(lambda layer=layer: layer(x))
            row = {
                "forward_us": forward,
                "bf16_F_linear_beside_us": bf16,
                "forward_over_bf16": forward / bf16,
            }
            row.update(_launches(fmt, layer))
            row["profile_top_us_per_call"] = profile_top(lambda layer=layer: layer(x))
            result[fmt] = row
    return result


if __name__ == "__main__":
    import os

    os.environ[fused.FUSED_ENV] = "all"
    if DEVICE == "cpu":  # a smoke run here (Triton's interpreter); the figures are the GPU's
        fused.FUSED_DEVICES.add("cpu")
        kernels.KERNEL_DEVICES.add("cpu")
    print(json.dumps(main(), indent=1))
