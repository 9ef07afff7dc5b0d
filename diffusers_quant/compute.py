"""compute=fp8 | int8: quantized Linears whose matmul runs in the quantized precision (W8A8).

Weight-only layers dequantize their weight on every call and run a bf16 matmul. With a compute mode, a
quanto layer whose weight is float8 e4m3 (``quanto:qfloat8``, fp8 files) or int8 (``quanto:qint8``) with one
scale per output row keeps that weight and quantizes its input per token on the fly (absmax / 448 for
e4m3, / 127 for int8), then runs ``torch._scaled_mm`` (fp8 tensor cores) or ``torch._int_mm`` (int8),
the two row scales applied to the result. Eager on CUDA the quantization is one hand-written Triton kernel
(``kernels.quantize_rows``: one read of the activations, one write of the codes; the torch ops it replaces
were five kernels, and a compiled function's per-call host cost made eager steps slower than bf16); inside a
compiled model the same ops are traced into its graph.

bitsandbytes' int8 layers (``bnb:int8``) and NNCF's symmetric int8 ones (``nncf:int8_sym``) run compute=int8
too: their codes are int8 rows with one scale each (``SCB / 127``; NNCF's float16 scale). The layer stays the
library's (quanto's ``QLinear``, bitsandbytes' ``Linear8bitLt``, ``NNCFLinear``: its class is a subclass of it
with only ``forward`` changed), so save, LoRA and dequantize work as before; ``disable_compute`` puts the
class back. The pure-torch reference (the same quantization, dequantized, matmul in float32) runs everywhere;
the environment variable ``DIFFUSERS_QUANT_REFERENCE=1`` forces it.
"""

from __future__ import annotations

import functools
import importlib
import threading

import torch

from . import kernels
from .backends.base import layer_class_name
from .errors import QuantError
from .fused import reference_forced, tracing  # one switch forces every reference path
from .spec import COMPUTES

FP8_MAX = 448.0
INT8_MAX = 127.0


def quantize_rows(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (M, K) quantized per row: (codes, float32 scales of shape (M, 1))."""
    top = FP8_MAX if kind == "fp8" else INT8_MAX
    # times the float32 reciprocal, not divided: what CUDA's division by a scalar computes, written out so
    # that the CPU, CUDA and the Triton kernel round the scale alike
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) * (1.0 / top)
    scaled = x.float() / scale
    if kind == "fp8":
        return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale
    return scaled.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def w8a8_reference(x, weight, w_scale, bias, kind: str) -> torch.Tensor:
    """The reference: activations quantized as the kernel does, both sides dequantized, float32 matmul."""
    shape = x.shape
    xq, x_scale = quantize_rows(x.reshape(-1, shape[-1]), kind)
    out = (xq.float() * x_scale) @ (weight.float() * w_scale.float().view(-1, 1)).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*shape[:-1], weight.shape[0])


def _fp8_mm(xq, x_scale, weight, w_scale, bias, dtype) -> torch.Tensor:
    """The fp8 tensor-core matmul of per-token codes ``xq`` (scales ``(M, 1)``) and per-row weight codes
    (scales ``(1, N)``), in ``dtype``."""
    if not xq.is_cuda:
        # torch 2.11's CPU kernel takes only per-tensor scales (an internal assert otherwise; 2.13 takes
        # rows): the unit-scaled product in float32, then the two row scales, as the row-wise epilogue does
        one = torch.ones((), dtype=torch.float32, device=xq.device)
        out = torch._scaled_mm(xq, weight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        out = (out * x_scale * w_scale).to(dtype)
        return out if bias is None else out + bias.to(dtype)
    # the bias is added in the matmul's epilogue (cuBLASLt takes one in the output dtype)
    fused = bias.to(dtype) if bias is not None and dtype in (torch.bfloat16, torch.float16) else None
    # fast accumulation (Hopper's fp8 accumulators, as torchao's inference path uses)
    out = torch._scaled_mm(
        xq,
        weight.t(),
        scale_a=x_scale,
        scale_b=w_scale,
        bias=fused,
        out_dtype=dtype,
        use_fast_accum=True,
    )
    if bias is not None and fused is None:
        out = out + bias.to(out.dtype)
    return out


def w8a8_kernel(x, weight, w_scale, bias, kind: str) -> torch.Tensor:
    """Per-token quantization and the tensor-core matmul: ``torch._scaled_mm`` / ``torch._int_mm``."""
    shape = x.shape
    # row-major rows (cuBLASLt takes no other layout; a permuted view can reach a Linear)
    xq, x_scale = quantize_rows(x.reshape(-1, shape[-1]).contiguous(), kind)
    w_scale = w_scale.float().view(1, -1)
    if kind == "fp8":
        out = _fp8_mm(xq, x_scale, weight, w_scale, bias, x.dtype)
    else:
        out = (torch._int_mm(xq, weight.t()).float() * x_scale * w_scale).to(x.dtype)
        if bias is not None:
            out = out + bias.to(out.dtype)
    return out.reshape(*shape[:-1], weight.shape[0])


@functools.cache
def _compiled_kernel():
    # one graph for every layer shape (a graph per shape would pass dynamo's recompile limit in one model,
    # and the layers past it would run unfused)
    return torch.compile(w8a8_kernel, dynamic=True)


def _kernel_fits(x: torch.Tensor, weight: torch.Tensor, kind: str) -> bool:
    """The shapes and device the kernels take (cuBLASLt wants multiples of 16; _int_mm more than 16 rows)."""
    k, n = weight.shape[1], weight.shape[0]
    if reference_forced() or k % 16 or n % 16 or x.numel() == 0:
        return False
    if kind == "int8":
        return x.numel() // k > 16
    return x.is_cuda or x.device.type == "cpu"


def w8a8_launch(x, weight, w_scale, bias, kind: str) -> torch.Tensor | None:
    """:func:`w8a8_kernel` eager without a compiled call's host cost: the per-token quantization is one
    hand-written kernel (``kernels.quantize_rows``), then the tensor-core matmul, then for int8 one epilogue
    kernel; None where the kernels do not cover the input."""
    shape = x.shape
    parts = kernels.quantize_rows(x.reshape(-1, shape[-1]).contiguous(), kind)
    if parts is None:
        return None
    xq, x_scale = parts
    w_scale = w_scale.float().view(-1)
    if kind == "fp8":
        out = _fp8_mm(xq, x_scale, weight, w_scale.view(1, -1), bias, x.dtype)
    else:
        out = kernels.scale_int_mm(torch._int_mm(xq, weight.t()), x_scale, w_scale, bias, x.dtype)
        if out is None:
            return None
    return out.reshape(*shape[:-1], weight.shape[0])


def w8a8_linear(x, weight, w_scale, bias, kind: str) -> torch.Tensor:
    if not _kernel_fits(x, weight, kind):
        return w8a8_reference(x, weight, w_scale, bias, kind)
    if not tracing(x):
        if kernels.available(x):
            out = w8a8_launch(x, weight, w_scale, bias, kind)
            if out is not None:
                return out
        if x.is_cuda:
            return _compiled_kernel()(x, weight, w_scale, bias, kind)
    return w8a8_kernel(x, weight, w_scale, bias, kind)


def _weight_parts(module) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """The codes, per-row scales and kind of a quanto, bitsandbytes or NNCF layer this can run, else None."""
    name = layer_class_name(module)
    if name == "Linear8bitLt":  # bitsandbytes' int8 rows: codes times SCB / 127 (backends/bnb_int8.py)
        from .backends.bnb_int8 import w8a8_parts

        return w8a8_parts(module)
    if name == "NNCFLinear":  # NNCF's int8_sym rows: codes times a float16 scale each (backends/nncf_ops.py)
        from .backends.nncf_ops import w8a8_parts

        return w8a8_parts(module)
    if name != "QLinear":
        return None  # the library's layer itself, never a wrapper around one (PEFT's LoRA layers reach it)
    weight = getattr(module, "weight", None)
    data, scale = getattr(weight, "_data", None), getattr(weight, "_scale", None)
    if not isinstance(data, torch.Tensor) or not isinstance(scale, torch.Tensor):
        return None
    if data.dim() != 2 or tuple(scale.shape) != (data.shape[0], 1) or getattr(weight, "axis", 0) != 0:
        return None  # grouped (2/4-bit), per-tensor or per-input-channel layouts
    if getattr(module, "activation_qtype", None) is not None:
        return None  # quanto's own static activation quantization
    kind = {torch.float8_e4m3fn: "fp8", torch.int8: "int8"}.get(data.dtype)
    return (data, scale, kind) if kind else None


_SUBCLASSES: dict[type, type] = {}
_SUBCLASS_LOCK = threading.Lock()


# the layer classes a W8A8 class subclasses, by name: (module, class); bitsandbytes' layers are adopted first
_BASES = {
    "QLinear": ("optimum.quanto", "QLinear"),
    "Linear8bitLt": ("diffusers_quant.backends.bnb_int8", "Linear8bitLt"),
    "NNCFLinear": ("diffusers_quant.backends.nncf_ops", "NNCFLinear"),
}


def __getattr__(name: str) -> type:
    # torch.load / pickle in a fresh process look the W8A8 classes up by name before any was made
    where = _BASES.get(name[4:]) if name.startswith("W8A8") else None
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _w8a8_class(getattr(importlib.import_module(where[0]), where[1]))


def _w8a8_class(base: type) -> type:
    """A subclass of the layer's class whose forward is the W8A8 matmul (made once per base class)."""
    with _SUBCLASS_LOCK:
        return _SUBCLASSES[base] if base in _SUBCLASSES else _make_w8a8_class(base)


def _make_w8a8_class(base: type) -> type:
    def forward(self, x):
        parts = _weight_parts(self)
        if parts is None:  # the weight changed layout since (a repack on a move): weight-only again
            return base.forward(self, x)
        data, scale, kind = parts
        return w8a8_linear(x, data, scale, self.bias, kind)

    name = f"W8A8{base.__name__}"
    cls = type(name, (base,), {"forward": forward, "_w8a8_base": base, "__module__": __name__})
    globals()[name] = cls  # importable by name: torch.save / pickle of a switched model work
    _SUBCLASSES[base] = cls
    return cls


def supports_fp8_matmul(device: torch.device | str) -> bool:
    """fp8 tensor cores: NVIDIA Ada / Hopper and later (compute capability 8.9+); CPUs run the kernel too."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type == "cpu"
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


def int8_matmul_pays(device: torch.device | str) -> bool:
    """Whether int8 tensor-core matmuls beat the weight-only bf16 one: NVIDIA Ampere / Ada (compute
    capability 8.x). On Hopper cuBLAS's int8 matmul is not where the chip is fast: compute=int8 took 1.30x
    the bf16 step eager against 1.07x weight-only (``benchmarks/results/nvidia-h200/session7-compute/``)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return (8, 0) <= torch.cuda.get_device_capability(device) < (9, 0)


def enable_compute(model: torch.nn.Module, compute: str, device: torch.device | str = "cpu") -> int:
    """Switch the quantized Linears of ``model`` that ``compute`` can run to the W8A8 forward; returns how
    many. ``auto``: fp8 layers where the device has fp8 matmuls, int8 layers where int8 matmuls pay
    (:func:`int8_matmul_pays`)."""
    if compute not in COMPUTES:
        raise QuantError(f"compute={compute!r}; expected one of {', '.join(COMPUTES)}")
    if compute == "none":
        return 0
    device = torch.device(device)
    count = 0
    for module in model.modules():
        parts = _weight_parts(module)
        if parts is None or hasattr(type(module), "_w8a8_base"):
            continue
        kind = parts[2]
        wanted = compute == kind or (
            compute == "auto"
            and device.type == "cuda"
            and (int8_matmul_pays(device) if kind == "int8" else supports_fp8_matmul(device))
        )
        if wanted:
            if layer_class_name(module) == "Linear8bitLt":
                from .backends.bnb_int8 import adopt

                # bitsandbytes' own class (a plain BitsAndBytesConfig load) becomes ours first, so one W8A8
                # class has the name W8A8Linear8bitLt
                adopt(module)
            module.__class__ = _w8a8_class(type(module))
            count += 1
    return count


def disable_compute(model: torch.nn.Module) -> int:
    """Put every W8A8 layer back to its weight-only forward; returns how many."""
    count = 0
    for module in model.modules():
        base = getattr(type(module), "_w8a8_base", None)
        if base is not None:
            module.__class__ = base
            count += 1
    return count
