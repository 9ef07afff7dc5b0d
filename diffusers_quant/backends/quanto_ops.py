"""quanto's weight decodes as opaque ops of a compiled graph, so compiled models run the hand-written kernels.

Traced into a compiled block, quanto's dequantization becomes Inductor's own kernel, which ran the compiled
flux-width model at 1.14-1.16x compiled bf16 for qint2 / qfloat8 on the H200
(``benchmarks/results/nvidia-h200/session9/bench-run4``); GGUF's traced decode did the same until its
kernel went into the graph as one op (``backends/gguf/nn.py``: 1.15 -> 1.09x for q4_1). Each op here
launches ``kernels.py``'s kernel (or, where it declines a layout, the reference decode), with a fake that
gives the result's shape and dtype to the tracer.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..fused import fused_backends, reference_forced


@torch.library.custom_op("diffusers_quant::quanto_bytes_weight", mutates_args=())
def bytes_weight(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """An 8-bit weight (int8 / float8 codes ``[rows, cols]``, one scale a row): ``scale * q``."""
    out = kernels.quanto_bytes(data, scale)
    if out is None:
        from .quanto import _bytes_weight

        out = _bytes_weight(data, scale)
    return out


@bytes_weight.register_fake
def _(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return data.new_empty(data.shape, dtype=scale.dtype)


@torch.library.custom_op("diffusers_quant::quanto_bits_weight", mutates_args=())
def bits_weight(
    packed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, bits: int, rows: int, cols: int
) -> torch.Tensor:
    """A packed 2/4-bit weight, as ``quanto._bits_weight`` decodes it."""
    out = kernels.quanto_bits(packed, scale, shift, bits, rows, cols)
    if out is None:
        from .quanto import _bits_weight

        out = _bits_weight(packed, scale, shift, bits, rows, cols)
    return out


@bits_weight.register_fake
def _(packed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, bits: int, rows: int, cols: int):
    return packed.new_empty((rows, cols), dtype=scale.dtype)


@torch.compiler.assume_constant_result
def kernel_in_graph(device_type: str) -> bool:
    """Whether a compiled graph decodes quanto weights on ``device_type`` with these ops (asked once per
    trace): a kernel device with Triton, quanto fused (``DIFFUSERS_QUANT_FUSED``), the reference not forced."""
    if device_type not in kernels.KERNEL_DEVICES:
        return False
    return "quanto" in fused_backends() and not reference_forced() and kernels.have_triton(device_type)
