"""quanto's 8-bit weight decode as one op of a compiled graph: the hand-written kernel in compiled models.

Traced into a compiled block, quanto's dequantization becomes Inductor's own kernel; as our op (a
``triton_op``, decomposed while AOTAutograd traces it) the graph holds the launch of ``kernels.quanto_bytes``'s
Triton kernel, made by Inductor's generated code, whose output is the eager path's bit for bit. On the H200
(flux-width, compiled × compiled bf16, ``benchmarks/results/nvidia-h200``) qfloat8 ran 1.077-1.088x with it
(session10/run2, run4), 1.066x as an opaque custom op (session9/bench-run5) and 1.062x / 1.156x traced
(session7-bench, session9/bench-run4). 2/4-bit weights stay traced: Inductor's kernel won there (qint4
1.081x traced, 1.162x with the packed-bits kernel as a ``triton_op``, session10/run3; qint2 1.140x traced,
1.203x as an opaque op, session9).
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
