"""optimum-quanto: qint8, qint4, qint2, qfloat8 weights, on CPU and CUDA.

Uses quanto's own ``QLinear`` (the maintained API) rather than diffusers' deprecated ``QuantoConfig``.
Each layer is quantized on its own, so a full-precision copy of the model never coexists with the
quantized one. Within a layer, blocks of rows are moved to the device and quantized into the final
buffers: the full-precision layer is never whole on the device and quanto's full-size temporaries stay
a few MB. The result equals ``QLinear.freeze()`` bit for bit (tests check it).

2- and 4-bit weights keep quanto's portable layout, dequantized on the fly for cuBLAS (on CUDA in one fused
kernel, ``fused.py``: :func:`fused_linear`), even where quanto would repack int4 for tinygemm: tinygemm is a matrix-vector kernel, 13x slower than dequantize + matmul
at a diffusion transformer's 4,608 tokens (H100, one 3072 x 12288 Linear: 11.8 ms against 0.95 ms, bf16
0.46 ms). float8 weights likewise stay unrepacked: Marlin takes 1.10 ms there, dequantize + matmul 0.84 ms
(``benchmarks/probe_quanto_kernels.py``, results under ``benchmarks/results/nvidia-h100``).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from .base import Backend

if TYPE_CHECKING:
    import torch

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
    saved_markers = (".weight._data._data", ".weight._data")  # 2/4-bit data is packed one level deeper
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
        self,
        linear: torch.nn.Linear,
        spec: Spec,
        compute_dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> torch.nn.Module:
        import torch

        self.require()
        from optimum import quanto

        qtype = getattr(quanto, _QTYPE_NAMES[spec.qtype])
        layer = quanto.QLinear.from_module(linear, weights=qtype, activations=None)  # shares linear's tensors
        device = torch.device(device) if device is not None else linear.weight.device
        with torch.no_grad():
            qweight = quantize_in_row_blocks(
                layer.weight, qtype, layer.optimizer, layer.weight_group_size, device=device
            )
        layer.weight = torch.nn.Parameter(qweight, requires_grad=False)
        # The rest (bias, activation scales) is small: move it whole.
        for module_tensors in (layer._parameters, layer._buffers):
            for name, tensor in module_tensors.items():
                if name != "weight" and tensor is not None and tensor.device != device:
                    moved = tensor.detach().to(device)
                    module_tensors[name] = (
                        torch.nn.Parameter(moved, False) if name in layer._parameters else moved
                    )
        layer.requires_grad_(False)
        return layer

    # --- the model contract: quanto's own layout and config, as diffusers and transformers save it ---

    def native_method(self, module):
        return "quanto"

    def native_config(self, layers: list, skip: list[str], library: str, compute_dtype):
        qtypes = {_library_weights(m.weight.qtype.name) for m in layers}
        if len(qtypes) != 1 or None in qtypes:
            return None  # the libraries' config has one weights dtype per model, float8 meaning e4m3fn
        weights = qtypes.pop()
        if library == "transformers":
            return None  # transformers 5 cannot load a saved quanto model: ours is refused by name instead
        import warnings

        from diffusers import QuantoConfig

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # diffusers deprecates QuantoConfig for 1.0
            return QuantoConfig(weights_dtype=weights, modules_to_not_convert=skip)

    def layer_from_state(self, tensors, config, dtype, compute_dtype, device):
        import torch

        self.require()
        from optimum import quanto

        qtype = _saved_qtype(tensors)
        layer = quanto.QLinear(
            config["in_features"],
            config["out_features"],
            bias="bias" in tensors,
            weights=getattr(quanto, qtype),
            device="meta",
            dtype=tensors["bias"].dtype if "bias" in tensors else dtype,
        )
        # scales follow the load's dtype, as quanto's own reload into a QLinear of that dtype does
        cpu = {
            k: v.to("cpu", dtype) if k in ("weight._scale", "weight._shift") else v.to("cpu")
            for k, v in tensors.items()
        }
        result = layer.load_state_dict(cpu, strict=False, assign=True)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"missing {result.missing_keys}, unexpected {result.unexpected_keys}")
        layer.weight = torch.nn.Parameter(as_portable(layer.weight.data), requires_grad=False)
        layer.requires_grad_(False)
        return layer.to(device)

    def dequantize_weight(self, module: torch.nn.Module) -> torch.Tensor:
        import torch

        return module.weight.data.dequantize().to(torch.float32)

    def spec_of(self, module: torch.nn.Module) -> Spec:
        from ..spec import Spec

        name = module.weight.qtype.name
        # float8 of either kind re-quantizes (on a LoRA fuse) to quanto's qfloat8 (e4m3)
        return Spec.create(self.name, "qfloat8" if name.startswith("qfloat8") else name)


def _library_weights(qtype_name: str) -> str | None:
    """quanto's qtype name as the libraries' ``weights`` option names it ("qint8" -> "int8")."""
    return {"qint8": "int8", "qint4": "int4", "qint2": "int2", "qfloat8_e4m3fn": "float8"}.get(qtype_name)


def _saved_qtype(tensors: dict[str, torch.Tensor]) -> str:
    """quanto's qtype from a saved layer's tensors: packed data means 2 or 4 bits (from the packing
    ratio), else the data's dtype."""
    import torch

    if "weight._data._data" in tensors:
        rows = tensors["weight._data._data"].shape[0]
        groups = tensors["weight._scale"].shape[0]
        # packed rows = ceil(rows * groups / (8 // bits)); scale has one row per group
        ratio = groups / rows
        return "qint2" if ratio > 2.5 else "qint4"
    data = tensors["weight._data"]
    if data.dtype == torch.float8_e5m2:
        return "qfloat8_e5m2"
    return "qfloat8" if data.dtype.is_floating_point else "qint8"


def as_portable(weight: torch.Tensor) -> torch.Tensor:
    """A quanto weight in the portable subclass (moves keep its layout); quanto's own tensor is converted
    back to its unoptimized form first."""
    from optimum.quanto.tensor.weights import WeightQBitsTensor

    if isinstance(weight, WeightQBitsTensor):
        if type(weight) is not WeightQBitsTensor and not type(weight).__name__.startswith("Portable"):
            weight = weight.weight_qbits_tensor()
        return portable_class(4)(
            weight.qtype,
            weight.axis,
            weight._group_size,
            weight.size(),
            weight.stride(),
            weight._data,
            weight._scale,
            weight._shift,
        )
    if type(weight).__name__ != "WeightQBytesTensor" and hasattr(weight, "weight_qbytes_tensor"):
        weight = weight.weight_qbytes_tensor()
    return portable_class(8)(
        weight.qtype, weight.axis, weight.size(), weight.stride(), weight._data, weight._scale, None
    )


def _bytes_weight(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """An 8-bit weight (int8 or float8 codes, one scale per row), as quanto's ``qbytes_mm`` dequantizes it."""
    return scale * data.to(scale.dtype)


# float8 e4m3 codes as the top of bfloat16 bit patterns: sign to bit 15, exponent and mantissa to bits 10-4
# (an int8 shifted left by 4 sign-extends; the mask clears bits 14-11); the exponent bias then differs by 120.
_E4M3_TO_BF16_MASK = 0x87F0 - 0x10000
_E4M3_BIAS_GAP = 2.0**120


def _cpu_bytes_weight(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """:func:`_bytes_weight` on the CPU, bit for bit: float8 codes decoded by integer ops (torch's CPU
    float8 -> bfloat16 cast is scalar: 4.6x slower on a 512 x 128 weight, 2.8x on 3072 x 3072 here). A code
    times 2**-120 is the bfloat16 whose bits it fills, subnormal codes included; the exact product with the
    scale is rounded once, as the cast and multiply round it. NaN codes (quanto never writes them) would
    read as 480."""
    import torch

    if data.dtype != torch.float8_e4m3fn:
        return _bytes_weight(data, scale)
    bits = (data.view(torch.int8).to(torch.int16) << 4) & _E4M3_TO_BF16_MASK
    raw = bits.view(torch.bfloat16)
    if scale.dtype == torch.bfloat16:
        return raw * (scale.float() * _E4M3_BIAS_GAP).to(torch.bfloat16)  # a power of two: exact
    return (raw * (scale.float() * _E4M3_BIAS_GAP)).to(scale.dtype)


def _eager_cpu_bytes_weight(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The eager CPU path of an 8-bit weight: the C kernel where it is built (``cpu_kernels.py``), else
    :func:`_cpu_bytes_weight`; both bit for bit :func:`_bytes_weight`."""
    from .. import cpu_kernels

    out = cpu_kernels.quanto_bytes(data, scale)
    return _cpu_bytes_weight(data, scale) if out is None else out


def _eager_cpu_bits_weight(packed, scale, shift, bits: int, rows: int, cols: int) -> torch.Tensor:
    """The eager CPU path of a 2/4-bit weight: the C kernel where it is built, else :func:`_bits_weight`."""
    from .. import cpu_kernels

    out = cpu_kernels.quanto_bits(packed, scale, shift, bits, rows, cols)
    return _bits_weight(packed, scale, shift, bits, rows, cols) if out is None else out


def _bits_weight(
    packed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, bits: int, rows: int, cols: int
) -> torch.Tensor:
    """A 2/4-bit weight grouped along the input (axis 0, ``scale`` one per group), as quanto's unpack and
    ``QBitsDequantizer`` compute it: each bit field of the packed bytes is one block of grouped rows."""
    import torch

    fields = [(packed & (2 ** (bits * (i + 1)) - 1)) >> (bits * i) for i in range(8 // bits)]
    data = torch.cat(fields)[: scale.shape[0]]
    if shift.is_floating_point():
        weight = scale * data - shift
    else:
        weight = scale * (data.to(torch.int8) - shift.to(torch.int8))
    return weight.reshape(rows, cols)


@functools.cache
def _fused_weights():
    from .. import kernels
    from ..fused import fused

    return (
        fused(_bytes_weight, kernels.quanto_bytes, "quanto 8-bit"),
        fused(_bits_weight, kernels.quanto_bits, "quanto 2/4-bit"),
    )


def fused_linear(input, weight, bias=None):
    """``F.linear`` of a portable quanto weight dequantized by this package, or None where quanto's own path
    should run (the backend switched off or the reference forced, a device other than the CPU without the
    fused kernels, quanto's activation quantization, mixed dtypes).

    Where the fused kernels run (CUDA) the dequantization is one kernel (``fused.py``); inside a compiled
    region an 8-bit weight's kernel is one op of the region's graph (a ``triton_op``, ``quanto_ops.py``; a 2/4-bit
    weight's decode is traced into the graph, and Inductor writes its kernel; quanto's own ops ran
    1.2-1.5x compiled bf16 on the H200: compile traces with fake tensors, which therefore take this path
    too); on the CPU it is the same pure-torch dequantization and one matmul,
    without quanto's per-call dispatch and, for int8, its int8 weight-only kernel: a matrix-vector kernel
    that took 5.3x the bf16 matmul at 288 tokens here (373 against 70 us, a 128 x 512 layer; 11x at
    3072 x 3072). With the reference forced an int8 weight quanto would send to that kernel with an
    ``in_features`` it overruns (:func:`_overruns_int8_kernel`) still takes the dequantization."""
    import torch

    from ..fused import fast_path, tracing

    if (type(input) is not torch.Tensor and not tracing(input)) or weight.axis != 0:
        return None
    if getattr(weight, "activation_qtype", None) is not None or input.dtype != weight._scale.dtype:
        return None
    if bias is not None and bias.dtype != input.dtype:
        return None  # quanto adds such a bias after the matmul, promoting the output: leave it that
    path = fast_path(input, "quanto")
    if path == "fused":
        fused_bytes, fused_bits = _fused_weights()
        bytes_weight, bits_weight = fused_bytes.fast, fused_bits.fast
    elif path == "cpu":
        bytes_weight, bits_weight = _eager_cpu_bytes_weight, _eager_cpu_bits_weight
    elif path == "traced":
        from ..fused import kernel_in_graph
        from . import quanto_ops

        # 8-bit: the kernel in the graph (a triton_op); 2/4-bit (and off a kernel device) the decode traced
        # into the graph, where Inductor writes its kernel (quanto_ops.py says which was faster)
        in_graph = kernel_in_graph(input.device.type, "quanto")
        bytes_weight = quanto_ops.bytes_weight if in_graph else _bytes_weight
        bits_weight = _bits_weight
    elif _overruns_int8_kernel(input, weight):
        bytes_weight, bits_weight = _bytes_weight, _bits_weight
    else:
        return None
    with torch._C.DisableTorchFunctionSubclass():
        data = weight._data
        if hasattr(weight, "_shift"):
            if type(data).__name__ != "PackedTensor":
                return None
            rows, cols = weight.shape
            dense = bits_weight(data._data, weight._scale, weight._shift, data.bits, rows, cols)
        else:
            dense = bytes_weight(data, weight._scale)
        return torch.nn.functional.linear(input, dense, bias)


def _overruns_int8_kernel(input, weight) -> bool:
    """Whether quanto 0.2.7's CPU matmul would send ``input`` to torch's int8 weight-only kernel with an
    ``in_features`` that kernel reads past: quanto takes it for bfloat16 inputs whenever ``in_features`` is
    divisible by 4, and torch 2.13's CPU kernel segfaulted unless it is a multiple of 16 (4, 8, 12, 20, 36 and
    40 crashed on this AVX-512 machine)."""
    import torch

    k = input.shape[-1]
    return (
        input.device.type == "cpu"
        and input.dtype == torch.bfloat16
        and not hasattr(weight, "_shift")
        and weight.qtype.dtype == torch.int8
        and k % 4 == 0
        and k % 16 != 0
    )


# Elements quantized per block: quanto's intermediates then stay a few MB whatever the layer size.
_BLOCK_ELEMENTS = 1 << 20


def quantize_in_row_blocks(
    weight: torch.Tensor,
    qtype,
    optimizer,
    group_size: int | None,
    block_elements: int = _BLOCK_ELEMENTS,
    device: torch.device | None = None,
) -> torch.Tensor:
    """quanto's quantized ``weight`` on ``device`` (default: the weight's), computed over blocks of rows.

    Scales (and shifts) are per row, or per group of ``group_size`` inputs within a row, so each block's
    result equals the matching rows of the whole-weight result. All types keep quanto's portable layout
    (see the module doc for why not its GPU kernels' layouts).
    """
    import torch
    from optimum.quanto.tensor.weights import quantize_weight

    device = torch.device(device) if device is not None else weight.device
    rows, cols = weight.shape
    block = max(1, block_elements // max(1, cols))
    blocks = [slice(i, min(i + block, rows)) for i in range(0, rows, block)]
    if qtype.bits == 8:
        data = torch.empty(weight.shape, dtype=qtype.dtype, device=device)
        scale = torch.empty((rows, 1), dtype=weight.dtype, device=device)
        for span in blocks:
            part = weight[span].to(device)
            q = quantize_weight(
                part, qtype=qtype, axis=0, scale=optimizer(part, qtype=qtype, axis=0), optimized=False
            )
            data[span] = q._data
            scale[span] = q._scale
        # Not create(): it repacks float8 for Marlin on recent GPUs, whose matmul is slower here than
        # dequantize + cuBLAS (see the module doc) and whose repacking triples the layer's GPU peak.
        return portable_class(8)(qtype, 0, weight.size(), weight.stride(), data, scale, None)
    # quanto leaves rows of at most 128 inputs ungrouped (group_size None): one group per row.
    width = group_size or cols
    groups = cols // width
    scale = torch.empty((rows * groups, 1), dtype=weight.dtype, device=device)
    shift = torch.empty_like(scale)
    packed = _BlockPacker(rows * groups, width, qtype.bits, device)
    for span in blocks:
        part = weight[span].to(device)
        part_scale, part_shift = optimizer(part, qtype=qtype, axis=0, group_size=group_size)
        grouped = slice(span.start * groups, span.stop * groups)
        scale[grouped] = part_scale
        shift[grouped] = part_shift
        # quanto's own quantizer (what quantize_weight runs), packed straight into the final buffer
        packed.add(
            grouped.start,
            torch.ops.quanto.quantize_affine(part, qtype.bits, 0, group_size, part_scale, part_shift),
        )
    data = packed.tensor()
    return portable_class(qtype.bits)(
        qtype, 0, group_size, weight.size(), weight.stride(), data, scale, shift
    )


class _BlockPacker:
    """quanto's ``PackedTensor`` for ``(rows, width)`` uint8 values, filled one block of rows at a time.

    quanto packs ``8 // bits`` values per byte by stacking quarters (or halves) of the rows: packed row ``i``
    holds rows ``i``, ``i + n``, ``i + 2n``... (``n`` = packed row count) at increasing bit offsets. A block
    is OR-ed into the rows it maps to, so the unpacked values of the whole layer never exist at once.
    """

    def __init__(self, rows: int, width: int, bits: int, device: torch.device):
        import torch

        self.rows, self.width, self.bits = rows, width, bits
        self.per_byte = 8 // bits
        self.packed_rows = -(-rows // self.per_byte)
        self.data = torch.zeros((self.packed_rows, width), dtype=torch.uint8, device=device)

    def add(self, start: int, values: torch.Tensor) -> None:
        stop = start + values.shape[0]
        for k in range(self.per_byte):
            lo, hi = max(start, k * self.packed_rows), min(stop, (k + 1) * self.packed_rows)
            if lo < hi:
                target = self.data[lo - k * self.packed_rows : hi - k * self.packed_rows]
                target |= values[lo - start : hi - start] << (self.bits * k)

    def tensor(self):
        from optimum.quanto.tensor.packed import PackedTensor

        return PackedTensor(self.data, self.bits, (self.rows, self.width), (self.width, 1))


@functools.cache
def portable_class(bits: int = 4) -> type:
    """A quanto weight tensor (``WeightQBitsTensor`` for 2/4 bits, ``WeightQBytesTensor`` for 8) that keeps
    its portable layout when moved between devices.

    quanto repacks on every move to the CPU or a CUDA device (int4 for tinygemm, float8 for Marlin; see the
    module doc for why both are slow here); this subclass moves its inner tensors as they are. Saved, it is
    quanto's ordinary tensor.
    """
    from optimum.quanto.tensor.weights import WeightQBitsTensor, WeightQBytesTensor

    if bits == 8:

        def rebuild_bytes(cls, t, inner):
            return cls(
                t.qtype, t.axis, t.size(), t.stride(), inner["_data"], inner["_scale"], t.activation_qtype
            )

        return _portable_subclass(WeightQBytesTensor, rebuild_bytes, "weight_qbytes_tensor")

    def rebuild_bits(cls, t, inner):
        return cls(
            t.qtype,
            t.axis,
            t._group_size,
            t.size(),
            t.stride(),
            inner["_data"],
            inner["_scale"],
            inner["_shift"],
        )

    return _portable_subclass(WeightQBitsTensor, rebuild_bits, "weight_qbits_tensor")


def _portable_subclass(base: type, rebuild, to_base: str) -> type:
    """``base`` with device moves that keep the inner tensors' layout; ``rebuild(cls, t, inner)`` makes a
    ``cls`` from ``t``'s metadata and new inner tensors, ``to_base`` names quanto's convert-back method."""

    import torch

    class Portable(base):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.linear:
                out = fused_linear(*args, **(kwargs or {}))
                if out is not None:
                    return out
            return super().__torch_function__(func, types, args, kwargs)

        @staticmethod
        def __tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride):
            t = base.__tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride)
            return rebuild(Portable, t, inner_tensors)

        @classmethod
        def __torch_dispatch__(cls, op, types, args, kwargs=None):
            if op.overloadpacket not in (torch.ops.aten._to_copy, torch.ops.aten.to):
                return super().__torch_dispatch__(op, types, args, kwargs)
            t, kwargs = args[0], dict(kwargs or {})
            if kwargs.pop("dtype", t.dtype) != t.dtype:
                raise ValueError("the dtype of a quantized quanto weight cannot be changed")
            device = kwargs.pop("device", t.device)
            names, _ = t.__tensor_flatten__()
            return rebuild(cls, t, {n: op(getattr(t, n), device=device, **kwargs) for n in names})

    def as_base(self):
        names, _ = self.__tensor_flatten__()
        return rebuild(base, self, {n: getattr(self, n) for n in names})

    setattr(Portable, to_base, as_base)
    Portable.__name__ = Portable.__qualname__ = f"Portable{base.__name__}"
    return Portable
