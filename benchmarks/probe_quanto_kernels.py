"""One Flux-width Linear at 4,608 tokens on CUDA: quanto's kernels against dequantize + cuBLAS.

Why the quanto backend keeps 2/4-bit weights in quanto's portable layout instead of tinygemm's (see
diffusers_quant/backends/quanto.py). Prints JSON; median of 20 timed calls after 3 warm-up calls each.

    python benchmarks/probe_quanto_kernels.py > benchmarks/results/<machine>/quanto-kernels.json
"""

from __future__ import annotations

import json

import torch
from optimum import quanto
from optimum.quanto.tensor.weights import quantize_weight


def timed_ms(fn, n: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[n // 2]


def probe(in_features: int, out_features: int, tokens: int = 4608) -> dict[str, float]:
    linear = torch.nn.Linear(in_features, out_features, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(tokens, in_features, dtype=torch.bfloat16, device="cuda")
    out = {"bf16": timed_ms(lambda: linear(x))}
    for name in ("qint8", "qfloat8", "qint4", "qint2"):
        layer = quanto.QLinear.from_module(linear, weights=getattr(quanto, name))
        layer.freeze()  # quanto's own choice of layout and kernel
        out[f"{name} {type(layer.weight).__name__}"] = timed_ms(lambda layer=layer: layer(x))
        if name == "qfloat8":
            scale = layer.optimizer(linear.weight, qtype=quanto.qfloat8, axis=0)
            w = quantize_weight(linear.weight.detach(), quanto.qfloat8, 0, scale, optimized=False)
            out[f"qfloat8 {type(w).__name__} (not repacked)"] = timed_ms(
                lambda w=w: torch.nn.functional.linear(x, w, linear.bias)
            )
        if name == "qint4":
            # the portable layout: dequantize, then cuBLAS
            scale, shift = layer.optimizer(linear.weight, qtype=quanto.qint4, axis=0, group_size=128)
            w = quantize_weight(
                linear.weight.detach(), quanto.qint4, 0, scale, shift, group_size=128, optimized=False
            )
            out["qint4 portable (dequantize + matmul)"] = timed_ms(
                lambda w=w: torch.nn.functional.linear(x, w, linear.bias)
            )
    return out


if __name__ == "__main__":
    with torch.no_grad():
        result = {f"{k}x{n} ms": probe(k, n) for k, n in ((3072, 12288), (15360, 3072))}
    result["device"] = torch.cuda.get_device_name()
    print(json.dumps(result, indent=1))
