"""Data-free, per-Linear NNCF weight compression.

``nncf.compress_weights`` on a whole PyTorch model needs an example input for tracing and installs its
decompressors in a hook storage at the model root, which breaks accelerate device maps and offloading.
Here each ``nn.Linear`` is replaced by an :class:`NNCFLinear` that owns its packed weight, scale and zero
point, so a layer and its decompression state always sit on the same device.

The quantization math is NNCF's own: scales, zero points and integer weights come from
``nncf.quantization.algorithms.weight_compression.weight_lowering.compress_weight`` run on an
``nncf.Tensor`` wrapping the torch weight (no dataset, no tracing, no NNCFNetwork). Storage layout and
decompression replicate ``nncf.torch.quantization.layers.INT{8,4}{Asymmetric,Symmetric}WeightsDecompressor``
bit for bit: float16 scale, ``(q - zero_point) * scale`` evaluated in float16, int4 values packed two per
byte with element ``2k`` in the low nibble. NNCF's classes are not held directly because their float16
scale is a floating buffer that ``Module.to(dtype)`` and dtype-casting loaders silently rewrite, their int4
packer rejects an odd number of zero points, and buffers are not offloaded by accelerate's ``cpu_offload``
(diffusers' sequential offload), so the packed weight would stay on the GPU.

nncf is imported lazily: only :func:`compress_linear` needs it. Restoring and running a saved layer
(:meth:`NNCFLinear.empty` + ``load_state_dict``) works without nncf installed.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from .. import cpu_kernels, kernels
from ..fused import fast_path, fused, tracing

__all__ = [
    "NNCF_QTYPES",
    "NNCFLinear",
    "bytes_per_param",
    "compress_linear",
    "packed_nbytes",
    "resolve_group_size",
]

logger = logging.getLogger(__name__)

NNCF_QTYPES = ("int8", "int8_sym", "int4", "int4_sym")

# qtype -> nncf.CompressWeightsMode member name
_NNCF_MODES = {"int8": "INT8_ASYM", "int8_sym": "INT8_SYM", "int4": "INT4_ASYM", "int4_sym": "INT4_SYM"}
_BITS = {"int8": 8, "int8_sym": 8, "int4": 4, "int4_sym": 4}
# NNCF's default backup mode (BackupMode.INT8_ASYM) for layers no int4 group size fits.
_BACKUP_QTYPE = "int8"


def _check_qtype(qtype: str) -> None:
    if qtype not in NNCF_QTYPES:
        raise ValueError(f"Unknown NNCF qtype {qtype!r}; expected one of {NNCF_QTYPES}")


def _is_asym(qtype: str) -> bool:
    return not qtype.endswith("_sym")


def resolve_group_size(
    in_features: int, qtype: str, group_size: int = 64, *, min_adjusted_group_size: int = 32
) -> tuple[str, int]:
    """Return the ``(qtype, group_size)`` actually used for a Linear with ``in_features`` inputs.

    Mirrors NNCF's ``GroupSizeFallbackMode.ADJUST`` (nncf 3.x ``WeightCompression._handle_adjust_group_size_fallback``):

    * int8 / int8_sym are always per output channel; ``group_size`` is ignored and ``-1`` is returned.
    * int4 / int4_sym with ``group_size == -1``: per output channel (one group spanning ``in_features``).
    * int4 / int4_sym with ``in_features % group_size == 0``: ``group_size`` as given.
    * otherwise the group size becomes the largest power of two dividing ``in_features``
      (``in_features & -in_features``) if that is ``>= min_adjusted_group_size`` (NNCF's default 32);
    * if even that fails, the layer falls back to NNCF's backup precision, asymmetric per-channel int8:
      ``("int8", -1)``.

    Examples with ``group_size=64``: 3072 -> 64, 96 -> 32, 80 -> int8 per channel (16 < 32), 40 -> int8.
    """
    _check_qtype(qtype)
    if group_size == 0 or group_size < -1:
        raise ValueError(f"group_size must be a positive integer or -1, got {group_size}")
    if _BITS[qtype] == 8 or group_size == -1:
        return qtype, -1
    if in_features % group_size == 0:
        return qtype, group_size
    adjusted = in_features & -in_features
    if adjusted >= min_adjusted_group_size:
        return qtype, adjusted
    return _BACKUP_QTYPE, -1


def bytes_per_param(qtype: str, group_size: int = 64, in_features: int | None = None) -> float:
    """Storage bytes per weight element of a compressed Linear, for memory planning.

    Counts the packed weight, the float16 scales and the zero points (asymmetric modes); the bias is not
    included. int8 modes are per output channel, so their per-row overhead (3 bytes asymmetric, 2 symmetric)
    is only added when ``in_features`` is given. For int4, ``group_size=-1`` (per channel) needs
    ``in_features``; when ``in_features`` is given the same fallback as :func:`compress_linear` is applied
    (see :func:`resolve_group_size`). One padding nibble for odd element counts is ignored.
    """
    _check_qtype(qtype)
    if in_features is not None:
        qtype, group_size = resolve_group_size(in_features, qtype, group_size)
    bits = _BITS[qtype]
    if bits == 8 or group_size == -1:
        if in_features is None:
            if bits == 4:
                raise ValueError("per-channel int4 (group_size=-1) needs in_features")
            return 1.0
        group = in_features
    else:
        group = group_size
    zero_point_bytes = (bits / 8) if _is_asym(qtype) else 0.0
    return bits / 8 + (2.0 + zero_point_bytes) / group


def _pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """Pack uint8 values in [0, 15] into a flat uint8 tensor, two per byte.

    Same layout as NNCF's ``pack_uint4`` (element 2k -> low nibble, 2k+1 -> high nibble, row-major over the
    flattened tensor); an odd count gets one zero padding nibble, which NNCF's packer cannot handle.
    """
    flat = values.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.reshape(-1, 2)
    return torch.bitwise_and(pairs[:, 0], 15) | (pairs[:, 1] << 4)


def _unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`_pack_nibbles`: flat uint8 values in [0, 15], padding dropped."""
    values = torch.stack((torch.bitwise_and(packed, 15), torch.bitwise_right_shift(packed, 4)), dim=-1)
    return values.reshape(-1)[:numel]


def decompress(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: int,
    rows: int,
    cols: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """An :class:`NNCFLinear`'s ``[rows, cols]`` weight from its stored pieces, as NNCF's decompressors compute
    it: ``(q - zero_point) * scale`` in float16, per output row and group (``scale`` is ``[rows, groups]``)."""
    groups = scale.shape[1]
    shape = (rows, groups, cols // groups)
    if bits == 8:
        values = weight.reshape(shape)
    else:
        values = _unpack_nibbles(weight, rows * cols).reshape(shape)
        if zero_point is None:  # NNCF's unpack_int4: symmetric int4 is stored offset by 8
            values = values.to(torch.int8) - 8
    out = values.to(torch.float16)
    if zero_point is not None:
        if bits == 8:
            zero = zero_point.reshape(rows, 1, 1)
        else:
            zero = _unpack_nibbles(zero_point, rows * groups).reshape(rows, groups, 1)
        out = out - zero.to(torch.float16)
    out = out * scale.view(torch.float16).unsqueeze(-1)
    return out.reshape(rows, cols).to(dtype)


# Elements decompressed at a time on the CPU: each step's float32 block (1 MiB) stays in the core's cache
# (3072 x 3072 int8: 4.1 ms a call, against 7.1 ms with 256 KiB blocks and 5.3 ms with 4 MiB).
_CPU_BLOCK = 1 << 18


def decompress_cpu(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: int,
    rows: int,
    cols: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """:func:`decompress`, bit for bit, in float32 steps over blocks of rows: the CPU's float16 casts are
    scalar (a uint8 -> float16 or float16 -> bfloat16 cast took 4-6x a float32 one on a 512 x 128 weight
    here). Exact because ``q - zero_point`` is a small integer and its product with a float16 scale has at
    most 20 significant bits, which float32 holds: rounding that product to float16 once is what the
    float16 multiply does; float16 -> float32 -> ``dtype`` rounds as float16 -> ``dtype`` does."""
    groups = scale.shape[1]
    out = torch.empty(rows, cols, dtype=dtype, device=weight.device)
    step = rows if bits == 4 and cols % 2 else max(1, _CPU_BLOCK // cols)
    scales = scale.view(torch.float16).float().unsqueeze(-1)
    if zero_point is not None:
        if bits == 8:
            zeros = zero_point.reshape(rows, 1, 1).float()
        else:
            zeros = _unpack_nibbles(zero_point, rows * groups).reshape(rows, groups, 1).float()
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        shape = (stop - start, groups, cols // groups)
        if bits == 8:
            block = weight[start:stop].reshape(shape).float()
        elif cols % 2:  # rows then do not start on a byte: one block, the generic unpack
            block = _unpack_nibbles(weight, rows * cols).reshape(shape).float()
        else:  # each nibble straight into the float32 block (element 2k in the low nibble)
            packed = weight[start * cols // 2 : stop * cols // 2]
            block = torch.empty(shape, dtype=torch.float32, device=weight.device)
            pairs = block.view(-1, 2)
            pairs[:, 0].copy_(torch.bitwise_and(packed, 15))
            pairs[:, 1].copy_(torch.bitwise_right_shift(packed, 4))
            if zero_point is None:
                block.sub_(8.0)  # symmetric int4 is stored offset by 8
        if zero_point is not None:
            block.sub_(zeros[start:stop])
        block.mul_(scales[start:stop])
        half = block.to(torch.float16).reshape(stop - start, cols)
        out[start:stop].copy_(half if dtype == torch.float16 else half.float())
    return out


def decompress_eager_cpu(*pieces) -> torch.Tensor:
    """The eager CPU path: the C kernel in one pass where it is built (``cpu_kernels.py``), else
    :func:`decompress_cpu`; both bit for bit :func:`decompress`."""
    out = cpu_kernels.nncf(*pieces)
    return decompress_cpu(*pieces) if out is None else out


@functools.cache
def _fused_decompress():
    return fused(decompress, kernels.nncf, "nncf")


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class NNCFLinear(nn.Module):
    """A Linear layer whose weight is stored NNCF-compressed and decompressed on every forward.

    State (all ``nn.Parameter`` with ``requires_grad=False`` so accelerate offloads and places them like
    ordinary weights; the compressed pieces are integer-typed so ``Module.to(dtype)`` and dtype-casting
    loaders leave them alone):

    * ``weight``: int8 modes ``[out, in]`` (uint8 asymmetric, int8 symmetric); int4 modes a flat uint8
      tensor of ``ceil(out * in / 2)`` bytes, two 4-bit values per byte (symmetric values stored offset by 8).
    * ``scale``: ``[out, n_groups]`` int16 holding the raw bits of NNCF's float16 scale.
    * ``zero_point`` (asymmetric only): int8 ``[out, 1]`` uint8; int4 flat uint8, two per byte.
    * ``bias``: floating ``[out]`` or ``None``; follows the model dtype.

    ``group_size`` is the effective one: ``-1`` means per output channel (``n_groups == 1``). Use
    :func:`compress_linear` to build one from an ``nn.Linear``, or :meth:`empty` + ``load_state_dict`` to
    restore a saved one.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        qtype: str = "int8",
        group_size: int = -1,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_qtype(qtype)
        if group_size != -1 and (group_size <= 0 or in_features % group_size):
            raise ValueError(f"group_size {group_size} must be -1 or divide in_features={in_features}")
        if _BITS[qtype] == 8 and group_size != -1:
            raise ValueError("int8 modes are per output channel; group_size must be -1")
        self.in_features = in_features
        self.out_features = out_features
        self.qtype = qtype
        self.group_size = group_size
        self.compute_dtype = compute_dtype
        n_groups = 1 if group_size == -1 else in_features // group_size
        asym = _is_asym(qtype)

        if _BITS[qtype] == 8:
            weight = torch.empty(
                out_features, in_features, dtype=torch.uint8 if asym else torch.int8, device=device
            )
            zero_point = torch.empty(out_features, 1, dtype=torch.uint8, device=device) if asym else None
        else:
            weight = torch.empty((out_features * in_features + 1) // 2, dtype=torch.uint8, device=device)
            zero_point = (
                torch.empty((out_features * n_groups + 1) // 2, dtype=torch.uint8, device=device)
                if asym
                else None
            )
        self.weight = _frozen(weight)
        self.scale = _frozen(torch.empty(out_features, n_groups, dtype=torch.int16, device=device))
        self.register_parameter("zero_point", _frozen(zero_point) if zero_point is not None else None)
        bias_param = _frozen(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.register_parameter("bias", bias_param)

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        bias: bool,
        qtype: str,
        group_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "meta",
        compute_dtype: torch.dtype | None = None,
    ) -> NNCFLinear:
        """Uninitialised layer to ``load_state_dict`` a saved one into (no recompression).

        ``group_size`` must be the effective one recorded in :attr:`layer_config`. On the meta device call
        ``load_state_dict(sd, assign=True)``; copying into meta tensors is a no-op.
        """
        return cls(
            in_features,
            out_features,
            bias,
            qtype,
            group_size,
            dtype=dtype,
            device=device,
            compute_dtype=compute_dtype,
        )

    @property
    def layer_config(self) -> dict[str, object]:
        """JSON-serialisable arguments that, with a dtype and device, rebuild this layer via :meth:`empty`."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "qtype": self.qtype,
            "group_size": self.group_size,
        }

    @property
    def n_groups(self) -> int:
        return self.scale.shape[1]

    def _pieces(self) -> tuple:
        return (
            self.weight,
            self.scale,
            self.zero_point,
            _BITS[self.qtype],
            self.out_features,
            self.in_features,
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decompressed ``[out, in]`` weight, computed exactly as NNCF's decompressors do (float16 math)."""
        return decompress(*self._pieces(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        bias = self.bias
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        # on CUDA one fused kernel reads the packed weight (fused.py); eager on the CPU the C kernel (or float32
        # steps); in a compiled region the reference is traced (Inductor fuses it)
        path = fast_path(x, "nncf")
        decode = (
            _fused_decompress().fast
            if path == "fused"
            else decompress_eager_cpu
            if path == "cpu"
            else decompress
        )
        weight = decode(*self._pieces(), dtype)
        if x.dtype == dtype:  # the common case, without two no-op conversions' host time
            return F.linear(x, weight, bias)
        return F.linear(x.to(dtype), weight, bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"qtype={self.qtype}, group_size={self.group_size}"
        )


@torch.library.custom_op("diffusers_quant::nncf_scale_float", mutates_args=())
def scale_float(bits: torch.Tensor) -> torch.Tensor:
    """NNCF's float16 scale (stored as int16 bits) in float32: one op of a compiled graph, not fused into the
    int8 matmul's epilogue, where Inductor's CPU code reads the bits element by element unvectorized (a 512 x
    512 layer at 288 tokens: 514 us against 334 with the scale a float32 input)."""
    return bits.view(torch.float16).float()


@scale_float.register_fake
def _(bits: torch.Tensor) -> torch.Tensor:
    return torch.empty(bits.shape, dtype=torch.float32, device=bits.device)


def w8a8_parts(layer: NNCFLinear) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """compute=int8 (``compute.py``): an ``int8_sym`` layer's codes ``[out, in]``, their float16 row scales as
    float32 ``[out, 1]`` (exact) and ``"int8"``; None for the other modes (a zero point, or 4-bit groups)."""
    weight = layer.weight
    if layer.qtype != "int8_sym" or weight.dtype != torch.int8 or weight.dim() != 2:
        return None
    scale = scale_float(layer.scale) if tracing(weight) else layer.scale.view(torch.float16).float()
    return weight, scale, "int8"


def _nncf_compress(
    weight: torch.Tensor, qtype: str, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """NNCF's own data-free compression of a ``[out, in]`` weight, on the weight's device.

    Returns the integer weight, float32 scale and int32 zero point (``None`` if symmetric) as torch tensors.
    """
    from nncf.parameters import CompressWeightsMode
    from nncf.quantization.algorithms.weight_compression.config import WeightCompressionConfig
    from nncf.quantization.algorithms.weight_compression.weight_lowering import compress_weight
    from nncf.tensor import Tensor

    config = WeightCompressionConfig(mode=CompressWeightsMode[_NNCF_MODES[qtype]], group_size=group_size)
    # Reduction axis 1 = in_features, as nncf.torch.model_graph_manager uses for PTLinearMetatype.
    compressed = compress_weight(Tensor(weight), reduction_axes=(1,), config=config)
    zero_point = compressed.zero_point.data if compressed.zero_point is not None else None
    return compressed.tensor.data, compressed.scale.data, zero_point


# Rows compressed per NNCF call: its float32 intermediates then stay a few MB, whatever the layer,
# so the GPU peak during a load stays close to what the compressed model keeps resident.
_CHUNK_ELEMENTS = 1 << 20


def _row_blocks(weight: torch.Tensor, qtype: str, chunk_elements: int | None = None) -> list[slice]:
    """Blocks of output rows to compress one at a time. An even number of rows keeps each block's packed
    int4 weight and zero points starting on a whole byte."""
    out_features, in_features = weight.shape
    rows = max(2, (chunk_elements or _CHUNK_ELEMENTS) // max(1, in_features) // 2 * 2)
    if _BITS[qtype] == 4 and in_features % 2:
        rows = out_features  # odd rows would split a byte between blocks
    return [slice(i, min(i + rows, out_features)) for i in range(0, out_features, rows)]


def _store_rows(
    layer: NNCFLinear,
    rows: slice,
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
) -> None:
    """Write one block of compressed rows into ``layer``'s buffers (packed int4 lands on whole bytes)."""
    layer.scale[rows] = scale.to(torch.float16).reshape(-1, layer.scale.shape[1]).view(torch.int16)
    if _BITS[layer.qtype] == 8:
        layer.weight[rows] = q.reshape(-1, layer.in_features)
        if zero_point is not None:
            layer.zero_point[rows] = zero_point.to(torch.uint8).reshape(-1, 1)
        return
    # Symmetric int4 is packed offset by 8 (NNCF's pack_int4).
    nibbles = q.to(torch.uint8) if _is_asym(layer.qtype) else (q + 8).to(torch.uint8)
    packed = _pack_nibbles(nibbles)
    start = rows.start * layer.in_features // 2
    layer.weight[start : start + packed.numel()] = packed
    if zero_point is not None:
        packed = _pack_nibbles(zero_point.to(torch.uint8))
        start = rows.start * layer.scale.shape[1] // 2
        layer.zero_point[start : start + packed.numel()] = packed


def compress_linear(
    linear: nn.Linear,
    qtype: str,
    *,
    group_size: int = 64,
    compute_dtype: torch.dtype | None = None,
    min_adjusted_group_size: int = 32,
    device: torch.device | str | None = None,
) -> NNCFLinear:
    """Compress one ``nn.Linear`` with NNCF's weight-lowering math, without a dataset or tracing.

    Runs on the weight's device (a CUDA weight is compressed on CUDA) and returns a new :class:`NNCFLinear`
    on that device; ``linear`` is not modified. The result equals what
    ``nncf.compress_weights(model, mode=..., group_size=..., ratio=1.0, all_layers=True, dataset=...)``
    produces for that layer: same integer weights, float16 scales, zero points and outputs.

    ``qtype``: ``int8`` (asymmetric, per output channel), ``int8_sym``, ``int4`` (asymmetric, grouped),
    ``int4_sym``. ``group_size`` applies to int4 only; ``-1`` means per output channel.

    Group size fallback (NNCF's ``GroupSizeFallbackMode.ADJUST``, see :func:`resolve_group_size`): if
    ``in_features`` is not divisible by ``group_size``, the largest power of two dividing ``in_features`` is
    used when it is ``>= min_adjusted_group_size``; otherwise the layer is compressed to NNCF's backup
    precision, asymmetric per-channel int8. The returned layer's ``qtype`` / ``group_size`` say what was used.

    ``compute_dtype``: dtype the forward decompresses to and multiplies in (input cast to it, output cast
    back); default is the input's dtype.

    ``device``: where the compressed layer goes (default: the weight's device). The weight is moved there
    one block of rows at a time, so a CPU layer compressed for the GPU never sits whole on the GPU.
    """
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"compress_linear expects nn.Linear, got {type(linear).__name__}")
    weight = linear.weight.detach()
    if weight.is_meta:
        raise ValueError("cannot compress a weight on the meta device; materialise it first")
    eff_qtype, eff_group_size = resolve_group_size(
        linear.in_features, qtype, group_size, min_adjusted_group_size=min_adjusted_group_size
    )
    if eff_qtype != qtype or (_BITS[qtype] == 4 and eff_group_size != group_size):
        logger.debug(
            "NNCF %s group_size=%s does not fit in_features=%d; using %s group_size=%d",
            qtype,
            group_size,
            linear.in_features,
            eff_qtype,
            eff_group_size,
        )

    with torch.no_grad():
        bias = linear.bias
        layer = NNCFLinear(
            linear.in_features,
            linear.out_features,
            bias is not None,
            eff_qtype,
            eff_group_size,
            dtype=bias.dtype if bias is not None else weight.dtype,
            device=device if device is not None else weight.device,
            compute_dtype=compute_dtype,
        )
        # Block by block straight into the layer's buffers: no full-size temporary of the largest layer.
        for rows in _row_blocks(weight, eff_qtype):
            block = weight[rows].to(layer.weight.device)
            _store_rows(layer, rows, *_nncf_compress(block, eff_qtype, eff_group_size))
        if bias is not None:
            layer.bias.copy_(bias.detach())
    return layer


def packed_nbytes(module: nn.Module) -> int:
    """Bytes of compressed weight state (packed weight + scales + zero points) of every NNCFLinear in
    ``module`` (itself included). Biases are not counted; they are stored uncompressed.
    """
    total = 0
    for sub in module.modules():
        if isinstance(sub, NNCFLinear):
            for t in (sub.weight, sub.scale, sub.zero_point):
                if t is not None:
                    total += t.numel() * t.element_size()
    return total
