"""optimum-quanto: qint8, qint4, qint2, qfloat8 weights, on CPU and CUDA.

Uses quanto's own ``QLinear`` (the maintained API) rather than diffusers' deprecated ``QuantoConfig``.
Each layer is quantized and frozen on its own, so a full-precision copy of the model never coexists
with the quantized one. Within a layer, weights are quantized in blocks of rows written into the final
buffers: quanto's own ``freeze()`` makes several full-size temporaries of the largest layer (2.4x the
resident model at peak for qint4 on an H100), blocks keep them to a few MB.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .base import Backend

if TYPE_CHECKING:
    from ..spec import Spec

_QTYPE_NAMES = {"qint8": "qint8", "qint4": "qint4", "qint2": "qint2", "qfloat8": "qfloat8"}
_BITS = {"qint8": 8, "qint4": 4, "qint2": 2, "qfloat8": 8}
# quanto groups 2/4-bit weights by 128 along the input dimension.
_GROUP = 128


class QuantoBackend(Backend):
    name = "quanto"
    module = "optimum.quanto"
    extra = "quanto"
    qtypes = ("qint8", "qint4", "qint2", "qfloat8")
    layer_types = ("QLinear",)
    aliases = {"int8": "qint8", "int4": "qint4", "int2": "qint2", "float8": "qfloat8", "fp8": "qfloat8"}

    def is_available(self) -> bool:
        import importlib.util

        return importlib.util.find_spec("optimum") is not None and super().is_available()

    def bytes_per_param(self, spec: Spec) -> float:
        bits = _BITS[spec.qtype]
        if bits == 8:
            return 1.0
        # packed data + a bf16 scale and shift per group of 128
        return bits / 8 + 4.0 / _GROUP

    def can_quantize(self, linear: torch.nn.Linear, spec: Spec) -> bool:
        # Grouped 2/4-bit weights need whole groups along the input features.
        return _BITS[spec.qtype] == 8 or linear.in_features % _GROUP == 0

    def quantize_linear(
        self, linear: torch.nn.Linear, spec: Spec, compute_dtype: torch.dtype
    ) -> torch.nn.Module:
        self.require()
        from optimum import quanto

        qtype = getattr(quanto, _QTYPE_NAMES[spec.qtype])
        layer = quanto.QLinear.from_module(linear, weights=qtype, activations=None)
        with torch.no_grad():
            qweight = quantize_in_row_blocks(layer.weight, qtype, layer.optimizer, layer.weight_group_size)
        layer.weight = torch.nn.Parameter(qweight, requires_grad=False)
        layer.requires_grad_(False)
        return layer


# Elements quantized per block: quanto's intermediates then stay a few MB whatever the layer size.
_BLOCK_ELEMENTS = 1 << 20


def quantize_in_row_blocks(
    weight, qtype, optimizer, group_size: int | None, block_elements: int = _BLOCK_ELEMENTS
):
    """What ``QLinear.freeze()`` stores for ``weight``, computed over blocks of output rows.

    Scales (and shifts) are per row, or per group of ``group_size`` inputs within a row, so each block's
    result equals the matching rows of the whole-weight result (a test checks it bit for bit).
    """
    from optimum.quanto.tensor.weights import WeightQBitsTensor, WeightQBytesTensor, quantize_weight

    rows, cols = weight.shape
    # A multiple of 64 rows: tinygemm packs int4 weights in tiles of output rows (8 on CUDA, 64 on CPU).
    block = max(64, block_elements // max(1, cols) // 64 * 64)
    if rows <= block or rows % 16:
        return _quantize_whole(weight, qtype, optimizer, group_size, quantize_weight)
    if qtype.bits == 8:
        data = torch.empty(weight.shape, dtype=qtype.dtype, device=weight.device)
        scale = torch.empty((rows, 1), dtype=weight.dtype, device=weight.device)
        for i in range(0, rows, block):
            part = weight[i : i + block]
            q = quantize_weight(
                part, qtype=qtype, axis=0, scale=optimizer(part, qtype=qtype, axis=0), optimized=False
            )
            data[i : i + block] = q._data
            scale[i : i + block] = q._scale
        return WeightQBytesTensor.create(qtype, 0, weight.size(), weight.stride(), data, scale)
    packed = _tinygemm_in_row_blocks(weight, qtype, optimizer, group_size, block, quantize_weight)
    if packed is not None:
        return packed
    # Portable packing (quanto's create() then picks a kernel layout for the whole layer).
    groups = cols // group_size
    data = torch.empty((rows * groups, group_size), dtype=torch.uint8, device=weight.device)
    scale = torch.empty((rows * groups, 1), dtype=weight.dtype, device=weight.device)
    shift = torch.empty_like(scale)
    for i in range(0, rows, block):
        q = _quantize_bits(
            weight[i : i + block], qtype, optimizer, group_size, quantize_weight, optimized=False
        )
        span = slice(i * groups, (i + block) * groups)
        data[span] = q._data.unpack()
        scale[span] = q._scale
        shift[span] = q._shift
    return WeightQBitsTensor.create(qtype, 0, group_size, weight.size(), weight.stride(), data, scale, shift)


def _quantize_whole(weight, qtype, optimizer, group_size, quantize_weight):
    if qtype.bits == 8:
        return quantize_weight(weight, qtype=qtype, axis=0, scale=optimizer(weight, qtype=qtype, axis=0))
    return _quantize_bits(weight, qtype, optimizer, group_size, quantize_weight, optimized=True)


def _quantize_bits(weight, qtype, optimizer, group_size, quantize_weight, *, optimized: bool):
    scale, shift = optimizer(weight, qtype=qtype, axis=0, group_size=group_size)
    return quantize_weight(
        weight, qtype=qtype, axis=0, scale=scale, shift=shift, group_size=group_size, optimized=optimized
    )


def _tinygemm_in_row_blocks(weight, qtype, optimizer, group_size, block, quantize_weight):
    """The tinygemm layout (bf16 int4 on CPU and CUDA) block by block, or None if quanto picks another.

    Tinygemm tiles rows independently (8 per tile on CUDA, 64 on CPU), so the packed blocks stack along
    their first dimension and the (groups, rows, 2) scale-and-shift blocks along their second."""
    from optimum.quanto.tensor.weights.tinygemm import TinyGemmWeightQBitsTensor
    from optimum.quanto.tensor.weights.tinygemm.packed import TinyGemmPackedTensor

    rows = weight.shape[0]
    packed = scale_shift = None
    parts = []
    for i in range(0, rows, block):
        q = _quantize_bits(
            weight[i : i + block], qtype, optimizer, group_size, quantize_weight, optimized=True
        )
        if type(q) is not TinyGemmWeightQBitsTensor:
            return None
        data = q._data._data
        n = weight[i : i + block].shape[0]
        if packed is None:
            if (data.shape[0] * rows) % n:
                return None
            packed = torch.empty(
                (data.shape[0] * rows // n, *data.shape[1:]), dtype=data.dtype, device=data.device
            )
        start = data.shape[0] * i // n
        packed[start : start + data.shape[0]] = data
        parts.append(q._scale_shift)
        del q
    scale_shift = torch.cat(parts, dim=1)
    return TinyGemmWeightQBitsTensor(
        qtype,
        0,
        group_size,
        weight.size(),
        weight.stride(),
        TinyGemmPackedTensor(packed, weight.size(), weight.stride()),
        scale_shift,
    )
