"""The K-quant quantizers on one Flux-width weight: the Triton searches against the torch port, side by side.

Per type (Q4_K, Q5_K, Q6_K) a 3072 x 12288 bf16 weight (12288 x 3072 on the CPU smoke run: 256 x 512,
Triton's interpreter) is quantized by ``quantize_rows`` on the device twice: with the search kernels
(``kernels.make_qkx2_quants`` / ``make_qx_quants``) and with ``DIFFUSERS_QUANT_REFERENCE=1`` (the torch
port, every candidate a few torch ops). Reported: seconds, the GPU peak above the weight and its output
(MiB), M values a second, and whether both give the same bytes; the kernel path also at a few rows-per-step
budgets (``cuda_steps``). Prints JSON.

    python benchmarks/probe_kquant.py > benchmarks/results/<machine>/probe-kquant.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from diffusers_quant import kernels  # noqa: E402
from diffusers_quant.backends.gguf import quantize  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (3072, 12288) if DEVICE == "cuda" else (256, 512)
STEPS_TRIED = (16, 4, 1) if DEVICE == "cuda" else (16,)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _run(
    weight: torch.Tensor, qtype: str, reference: bool, cuda_steps: int | None = None
) -> tuple[dict, torch.Tensor]:
    os.environ["DIFFUSERS_QUANT_REFERENCE"] = "1" if reference else "0"
    saved = quantize.QUANTIZERS[qtype]
    if cuda_steps is not None:
        quantize.QUANTIZERS[qtype] = saved._replace(cuda_steps=cuda_steps)
    try:
        quantize_rows = quantize.quantize_rows
        quantize_rows(weight[:8], qtype, DEVICE)  # warm-up: kernel compile, allocator
        _sync()
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        packed = quantize_rows(weight, qtype, DEVICE)
        _sync()
        seconds = time.perf_counter() - start
        peak = (
            (torch.cuda.max_memory_allocated() - base - packed.numel()) / 2**20 if DEVICE == "cuda" else None
        )
    finally:
        quantize.QUANTIZERS[qtype] = saved
        os.environ.pop("DIFFUSERS_QUANT_REFERENCE", None)
    row = {
        "seconds": round(seconds, 4),
        "m_values_per_s": round(weight.numel() / seconds / 1e6, 1),
        "gpu_peak_over_weight_and_output_mib": None if peak is None else round(peak, 1),
        "cuda_steps": cuda_steps or saved.cuda_steps,
    }
    return row, packed


def main() -> None:
    if DEVICE == "cpu":
        kernels.KERNEL_DEVICES.add("cpu")  # the interpreter: a smoke run of the same code
    torch.manual_seed(0)
    weight = (torch.randn(SHAPE) * 0.02).to(torch.bfloat16).to(DEVICE)
    report = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter)",
        "torch": torch.__version__,
        "shape": list(SHAPE),
        "types": {},
    }
    for qtype in ("Q4_K", "Q5_K", "Q6_K"):
        torch_row, want = _run(weight, qtype, reference=True)
        rows = {"torch port": torch_row}
        for steps in STEPS_TRIED:
            row, got = _run(weight, qtype, reference=False, cuda_steps=steps)
            row["same_bytes_as_torch_port"] = bool(torch.equal(got, want))
            row["speedup_over_torch_port"] = round(torch_row["seconds"] / row["seconds"], 1)
            rows[f"kernel, cuda_steps={steps}"] = row
        report["types"][qtype] = rows
        print(json.dumps({qtype: rows}), file=sys.stderr)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
