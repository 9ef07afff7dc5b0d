"""The hand-written dequantization kernels alone, and their launch shapes: which tiling feeds the memory best.

Per format, a Flux-width weight (3072 -> 12288, 37.7 M values) decoded to bf16: GPU time of the shipped
configuration (``kernels.py``'s public functions), then of each (elements per program, num_warps) candidate
of the same kernel, as µs and as effective bandwidth (packed bytes read + bf16 bytes written, over the time);
every candidate's output must equal the shipped one's bit for bit. The reference point is a bf16 copy of the
same weight (``copy_``: what the memory allows for the write plus a read of the same size). Prints JSON.

    python benchmarks/probe_decode.py > benchmarks/results/<machine>/probe-decode.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from probe_fused import DEVICE, layer_for, timed_ms  # noqa: E402

from diffusers_quant import kernels  # noqa: E402

SHAPE = (3072, 12288) if DEVICE == "cuda" else (256, 512)  # the CPU run is a smoke run (interpreted Triton)
WARPS = (4, 8) if DEVICE == "cuda" else (4,)
ROWS_TRIED = (32, 64, 128, 256) if DEVICE == "cuda" else (32,)
K_ROWS_TRIED = (4, 8, 16, 32) if DEVICE == "cuda" else (8,)
BLOCKS = (1024, 2048, 4096) if DEVICE == "cuda" else (1024,)


def gpu_us(fn) -> float:
    """Median GPU µs of ``fn`` (probe_fused's timing; on the CPU a smoke run, so no figure)."""
    return timed_ms(fn) * 1e3 if DEVICE == "cuda" else float("nan")


def _row(us: float, moved: int) -> dict:
    return {"us": round(us, 2), "GB_per_s": round(moved / us / 1e3, 1)}


def ggml_cases(fmt: str, layer) -> tuple[dict, int, list]:
    qtype = layer.qtype
    blocks = layer.weight.reshape(-1, layer._type_size)
    shipped = lambda: kernels.ggml(qtype, blocks, torch.bfloat16)  # noqa: E731
    k = kernels._kernels(blocks)
    if qtype in kernels.GGML_TYPES:
        (kind, size), width, kernel, rows_list = kernels.GGML_TYPES[qtype], 32, k.ggml_blocks, ROWS_TRIED
    else:
        (kind, size), width, kernel, rows_list = kernels.K_TYPES[qtype], 256, k.k_blocks, K_ROWS_TRIED
    n = blocks.shape[0]
    halves = blocks.view(torch.float16)
    candidates = []
    for rows in rows_list:
        for warps in WARPS:

            def run(rows=rows, warps=warps):
                out = torch.empty((n, width), dtype=torch.bfloat16, device=blocks.device)
                kernel[(kernels._cdiv(n, rows),)](
                    blocks, halves, out, n, TYPE=kind, TYPE_SIZE=size, ROWS=rows, num_warps=warps
                )
                return out

            candidates.append(({"elements": rows * width, "num_warps": warps}, run))
    return shipped, blocks.numel(), candidates


def grouped_cases(fmt: str, layer) -> tuple:
    """quanto qint8 / qfloat8 and NNCF: the row-wise ``grouped`` kernel with BLOCK columns a program."""
    backend = fmt.split(":")[0]
    if backend == "quanto" and hasattr(layer.weight, "_shift"):
        return quanto_bits_cases(layer)
    if backend == "quanto":
        with torch._C.DisableTorchFunctionSubclass():
            data, scale = layer.weight._data, layer.weight._scale
        shipped = lambda: kernels.quanto_bytes(data, scale)  # noqa: E731
        args = dict(q=data, s=scale, z=scale, groups=1, GROUP_COLS=0, BITS=8, SYM_OFFSET=0, HAS_ZERO=False)
        moved = data.numel() * data.element_size() + scale.numel() * 2
    else:
        weight, scale, zero, bits, rows, cols = layer._pieces()
        shipped = lambda: kernels.nncf(weight, scale, zero, bits, rows, cols, torch.bfloat16)  # noqa: E731
        groups = scale.shape[1]
        half = scale.view(torch.float16)
        args = dict(
            q=weight, s=half, z=half if zero is None else zero, groups=groups,
            GROUP_COLS=0 if groups == 1 else cols // groups, BITS=bits,
            SYM_OFFSET=8 if bits == 4 and zero is None else 0, HAS_ZERO=zero is not None,
        )  # fmt: skip
        moved = weight.numel() * weight.element_size() + scale.numel() * 2
    k = kernels._kernels(args["q"])
    rows, cols = SHAPE[1], SHAPE[0]
    candidates = []
    for block in BLOCKS:
        for warps in WARPS:

            def run(block=block, warps=warps):
                out = torch.empty((rows, cols), dtype=torch.bfloat16, device=args["q"].device)
                k.grouped[(rows, kernels._cdiv(cols, block))](
                    args["q"], args["s"], args["z"], out, cols, args["groups"],
                    GROUP_COLS=args["GROUP_COLS"], BITS=args["BITS"], SYM_OFFSET=args["SYM_OFFSET"],
                    HAS_ZERO=args["HAS_ZERO"], MATH=k.tl.float16 if backend == "nncf" else k.tl.bfloat16,
                    BLOCK=block, num_warps=warps,
                )  # fmt: skip
                return out

            candidates.append(({"elements": block, "num_warps": warps}, run))
    return shipped, moved, candidates


def quanto_bits_cases(layer) -> tuple:
    """quanto qint4 / qint2: the packed-rows kernel with ROWS packed rows a program."""
    with torch._C.DisableTorchFunctionSubclass():
        w = layer.weight
        packed, scale, shift, bits = w._data._data, w._scale, w._shift, w._data.bits
    rows, cols = w.shape
    shipped = lambda: kernels.quanto_bits(packed, scale, shift, bits, rows, cols)  # noqa: E731
    k = kernels._kernels(packed)
    candidates = []
    for prows in ROWS_TRIED:
        for warps in WARPS:

            def run(prows=prows, warps=warps):
                out = torch.empty((rows, cols), dtype=scale.dtype, device=packed.device)
                k.quanto_bits[(kernels._cdiv(packed.shape[0], prows),)](
                    packed, scale, shift, out, packed.shape[0], scale.shape[0],
                    GROUP=packed.shape[1], BITS=bits, INT_SHIFT=not shift.is_floating_point(), ROWS=prows,
                    num_warps=warps,
                )  # fmt: skip
                return out

            candidates.append(({"elements": prows * packed.shape[1] * 8 // bits, "num_warps": warps}, run))
    moved = packed.numel() + (scale.numel() + shift.numel()) * 2
    return shipped, moved, candidates


def main() -> dict:
    torch.manual_seed(0)
    linear = torch.nn.Linear(*SHAPE, dtype=torch.bfloat16, device=DEVICE)
    w = linear.weight.detach()
    copy_to = torch.empty_like(w)
    result: dict = {
        "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "weight": list(w.shape),
        "bf16_copy": _row(gpu_us(lambda: copy_to.copy_(w)), 2 * w.numel() * 2),
    }
    written = w.numel() * 2
    for fmt in sys.argv[1:]:
        layer = layer_for(fmt, linear)
        if fmt.startswith("gguf:"):
            shipped, read, candidates = ggml_cases(fmt, layer)
        else:
            shipped, read, candidates = grouped_cases(fmt, layer)
        want = shipped()
        row = {"shipped": _row(gpu_us(shipped), read + written), "candidates": []}
        for config, run in candidates:
            try:
                got = run()
                equal = torch.equal(got.view(want.shape), want)
                row["candidates"].append({**config, **_row(gpu_us(run), read + written), "equal": equal})
            except Exception as e:  # noqa: BLE001 - a probe: record what a configuration refuses
                row["candidates"].append({**config, "error": f"{type(e).__name__}: {e}"[:200]})
        result[fmt] = row
    return result


if __name__ == "__main__":
    if DEVICE == "cpu":
        kernels.KERNEL_DEVICES.add("cpu")
    print(json.dumps(main(), indent=1))
