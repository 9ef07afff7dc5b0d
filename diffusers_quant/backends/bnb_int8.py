"""bitsandbytes int8 layers, weight-only: the int8 weight dequantized on each call, then one matmul.

In inference bitsandbytes' ``Linear8bitLt`` runs LLM.int8: every call casts its input to float16, finds the
outlier columns, quantizes the rest per token to int8, runs the int8 matmul and the outliers' float16 one and
dequantizes the sum; on the H200 that took 2.2x the bf16 step eager and 3.4x compiled (its ops break the
graph), 2.1x on a 2-core CPU. bitsandbytes has a second int8 forward, ``MatMul8bitFp`` (the one it runs on
CPUs in training): the weight dequantized, ``q * (SCB * (1 / 127))`` rounded once to the input's dtype, then
``F.linear``. The layers here run that one, bit for bit (``tests/backends/test_bnb_int8.py``): LLM.int8's
result without the activation quantization, so nearer the full-precision layer (on a 1024 -> 3072 layer here,
rel-L2 vs bf16 5.0e-3 against LLM.int8's 9.1e-3), at the cost of the other 8-bit backends. On CUDA the
dequantization is one hand-written kernel (``kernels.bnb_int8``), on the CPU one C kernel
(``cpu_kernels.bnb_int8``), and inside a compiled model the kernel is one op of the graph (a ``triton_op``).

The layer's class is a subclass of bitsandbytes' own, with its name, that changes only ``forward``: PEFT's
bnb LoRA layers, saving, dequantizing and the libraries' bnb paths see bitsandbytes' layer. With
``DIFFUSERS_QUANT_FUSED`` not naming ``bnb``, or ``DIFFUSERS_QUANT_REFERENCE=1``, the forward is
bitsandbytes' own (LLM.int8) again.
"""

from __future__ import annotations

import functools

import bitsandbytes as bnb
import torch

from .. import cpu_kernels, kernels
from ..fused import fast_path, fused, kernel_in_graph

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def int8_weight(data: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The reference: bitsandbytes' int8 weight in ``dtype`` as ``MatMul8bitFp`` dequantizes it (the code
    times the float32 ``SCB * (1 / 127)``, rounded once)."""
    return (data.to(torch.float32) * (scb.float() * kernels.BNB_INT8_STEP).unsqueeze(1)).to(dtype)


def _eager_cpu_weight(data: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = cpu_kernels.bnb_int8(data, scb, dtype)
    return int8_weight(data, scb, dtype) if out is None else out


@functools.cache
def _fused_weight():
    return fused(int8_weight, kernels.bnb_int8, "bnb int8")


@torch.library.triton_op("diffusers_quant::bnb_int8_weight", mutates_args=())
def graph_weight(data: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`int8_weight` as one op of a compiled graph: Inductor's code launches ``kernels.bnb_int8``'s
    kernel (as for quanto's 8-bit weights, ``quanto_ops.py``); off CUDA the decode is traced."""
    out = kernels.bnb_int8(data, scb, dtype)
    return int8_weight(data, scb, dtype) if out is None else out


def _codes(layer: bnb.nn.Linear8bitLt) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The layer's int8 weight ``[out, in]`` and float32 row absmax (SCB), or None while it holds float
    weights (``has_fp16_weights``, or not quantized yet)."""
    weight, state = layer.weight, layer.state
    if state.has_fp16_weights or weight.dtype != torch.int8 or weight.dim() != 2:
        return None
    scb = weight.SCB if weight.SCB is not None else state.SCB
    return None if scb is None else (weight, scb)


def w8a8_parts(layer: bnb.nn.Linear8bitLt) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """compute=int8 (``compute.py``): the int8 codes, their per-row steps ``SCB * (1 / 127)`` as a float32
    ``[out, 1]`` (the scale ``int8_weight`` multiplies by) and ``"int8"``, or None (PEFT's LoRA wrapper,
    named Linear8bitLt too, is not bitsandbytes' layer: its forward adds the LoRA)."""
    if not isinstance(layer, bnb.nn.Linear8bitLt):
        return None
    codes = _codes(layer)
    if codes is None:
        return None
    weight, scb = codes
    return weight.data, (scb.float() * kernels.BNB_INT8_STEP).unsqueeze(1), "int8"


def weight_only_linear(layer: bnb.nn.Linear8bitLt, x: torch.Tensor) -> torch.Tensor | None:
    """``F.linear`` of ``x`` and ``layer``'s dequantized int8 weight, or None where bitsandbytes' own forward
    runs: the backend not fused or the reference forced (``fused.fast_path``), a device without a fast path,
    a layer still holding float weights, an input that is not a float tensor."""
    codes = _codes(layer)
    if codes is None or x.dtype not in _FLOATS or x.shape[-1] != codes[0].shape[1]:
        return None
    weight, scb = codes
    path = fast_path(x, "bnb")
    if path == "fused":
        decode = _fused_weight().fast
    elif path == "cpu":
        decode = _eager_cpu_weight
    elif path == "traced":
        decode = graph_weight if kernel_in_graph(x.device.type, "bnb") else int8_weight
    else:
        return None
    bias = layer.bias
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)  # bitsandbytes casts its bias to the input's dtype too
    return torch.nn.functional.linear(x, decode(weight.data, scb, x.dtype), bias)


class Linear8bitLt(bnb.nn.Linear8bitLt):
    """bitsandbytes' int8 layer, whose forward is weight-only where :func:`weight_only_linear` runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = weight_only_linear(self, x)
        return super().forward(x) if out is None else out

    def _apply(self, fn, recurse=True):
        # A move (module.to / .cuda / .cpu) swaps the weight's .data in place, so the Int8Params keeps the CB /
        # SCB of before: bitsandbytes' Int8Params.to moves them on a copy that torch drops. A layer quantized
        # on the CPU and moved to CUDA kept a CPU SCB (and CB) beside a CUDA weight; move them with it.
        # The state (after bitsandbytes' own forward) is moved only by its Linear8bitLt.to, not by .cuda().
        result = super()._apply(fn, recurse)
        weight = self.weight
        if isinstance(weight, bnb.nn.Int8Params) and weight.dtype == torch.int8:
            for holder in (weight, self.state):
                if holder.CB is not None and holder.CB.device != weight.device:
                    holder.CB = weight.data
                if holder.SCB is not None and holder.SCB.device != weight.device:
                    holder.SCB = holder.SCB.to(weight.device)
        return result


def adopt(module: torch.nn.Module) -> None:
    """Give a bitsandbytes int8 layer the weight-only forward (only its class changes)."""
    if type(module) is bnb.nn.Linear8bitLt:
        module.__class__ = Linear8bitLt
