"""quanto's 8-bit weight decode as one op of a compiled graph: the hand-written kernel in compiled models.

Traced into a compiled block, quanto's dequantization becomes Inductor's own kernel; as an op, the graph
runs ``kernels.quanto_bytes`` (where it declines a layout, the reference decode), whose output is the eager
path's bit for bit. On the H200 (flux-width, compiled × compiled bf16, ``benchmarks/results/nvidia-h200``)
qfloat8 ran 1.066x with the op (session9/bench-run5) against 1.062x and 1.156x traced in two earlier runs
(session7-bench, session9/bench-run4): no worse, and the same kernel eager and compiled. 2/4-bit weights
stay traced: Inductor's kernel won there (qint2 1.140x traced, 1.203x with the packed-bits kernel as an op).
"""

from __future__ import annotations

import torch

from .. import kernels


@torch.library.triton_op("diffusers_quant::quanto_bytes_weight", mutates_args=())
def bytes_weight(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """An 8-bit weight (int8 / float8 codes ``[rows, cols]``, one scale a row): ``scale * q``. A
    ``triton_op``: in a compiled graph Inductor's code launches the kernel (off CUDA the decode is traced)."""
    out = kernels.quanto_bytes(data, scale)
    if out is None:
        from .quanto import _bytes_weight

        out = _bytes_weight(data, scale)
    return out
