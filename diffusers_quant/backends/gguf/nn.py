"""Packed GGUF weights in torch: ``GGUFWeight`` (a value object) and ``GGUFLinear`` (a drop-in Linear).

``GGUFLinear`` keeps its weight as the file's packed bytes, a ``uint8`` parameter of shape
``(out_features, bytes_per_row)`` with ``requires_grad=False``.  ``Module.to(dtype)``/``.half()`` only cast
floating tensors and accelerate only casts floating values, so the bytes survive moves between devices and
offload hooks untouched.  Each forward dequantizes on the weight's device and calls ``F.linear``.

The ggml type and logical shape travel in the module's ``_extra_state`` (an int64 tensor, so the state dict
stays tensors-only and safetensors-compatible); loading a state dict reconfigures the module to the saved
type, whatever type it was built with.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ... import cpu_kernels, kernels
from ...fused import fast_path, fused, kernel_in_graph
from .dequant import (
    _COMPUTE_DTYPE_TYPES,
    DEQUANTIZERS,
    PLAIN_QTYPES,
    block_info,
    blocks_nbytes,
    dequantize,
    packed_nbytes,
    qtype_id,
    qtype_name,
)

_STATE_FORMAT = 1


@functools.cache
def _fusable(qtype: str) -> bool:
    """Block-quantized types (plain float / integer tensors have nothing to fuse)."""
    return qtype in DEQUANTIZERS and block_info(qtype)[0] > 1


def _decode(qtype: str, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The blocks of one ggml type decoded to ``dtype`` as the forward does: straight in a 16-bit dtype
    where the type's decoder can (within 16-bit rounding of ``dequantize``'s exact result)."""
    fn = DEQUANTIZERS[qtype]
    if qtype in _COMPUTE_DTYPE_TYPES and dtype in (torch.bfloat16, torch.float16):
        return fn(blocks, dtype)
    return fn(blocks).to(dtype)


@functools.cache
def _fused_decoder(qtype: str):
    """:func:`_decode` for one ggml type, run fast on CUDA (fused.py: the hand-written kernel where it
    covers the type, else compiled, one graph per type). It takes ``[rows, k * type_size]`` bytes (a
    weight's packed rows, or ``[n_blocks, type_size]``) to ``[rows, k * block elements]``."""
    type_size = block_info(qtype)[1]

    def decode(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return _decode(qtype, blocks.reshape(-1, type_size), dtype).reshape(blocks.shape[0], -1)

    # the kernel returns None for the types it does not cover
    return fused(decode, functools.partial(kernels.ggml, qtype), f"gguf {qtype}")


@torch.library.triton_op("diffusers_quant::ggml_decode", mutates_args=())
def ggml_decode(blocks: torch.Tensor, qtype: str, dtype: torch.dtype) -> torch.Tensor:
    """The hand-written kernel's decode (``kernels.ggml``) in a compiled graph: Inductor's own kernel for
    the traced block decode ran 1.4-2.1x a bf16 matmul per layer on the H200, the hand-written one 1.15-1.31x
    (``benchmarks/results/nvidia-h200/session7-probe-gguf.json``). A ``triton_op``: the graph holds the
    kernel's launch itself, made by Inductor's code (as an opaque op its Python cost 64-82 us of host time a
    call, ``session10/run1``); off CUDA the decode is traced as plain ops."""
    out = kernels.ggml(qtype, blocks, dtype)
    return _decode(qtype, blocks, dtype) if out is None else out


def _as_bytes(raw: torch.Tensor) -> torch.Tensor:
    """Packed data as uint8; typed F32/F16/BF16 tensors are reinterpreted, not converted."""
    if raw.dtype == torch.uint8:
        return raw
    return raw.contiguous().view(torch.uint8)


class GGUFWeight:
    """A tensor in GGML storage: packed bytes, ggml type name and logical (torch-order) shape."""

    __slots__ = ("raw", "qtype", "shape")

    def __init__(self, raw: torch.Tensor, qtype: str | int, shape: Sequence[int]):
        self.qtype = qtype_name(qtype)
        self.shape = tuple(int(s) for s in shape)
        raw = _as_bytes(raw)
        expected = blocks_nbytes(math.prod(self.shape), self.qtype)
        if raw.numel() != expected:
            raise ValueError(
                f"{self.qtype} data for shape {self.shape} must be {expected} bytes, got {raw.numel()}"
            )
        self.raw = raw

    @classmethod
    def from_gguf(cls, file: Any, name: str) -> GGUFWeight:
        """Zero-copy weight for tensor ``name`` of a ``reader.GGUFFile``."""
        info = file.info(name)
        return cls(file.raw(info), info.type_name, info.shape)

    def __repr__(self) -> str:
        return f"GGUFWeight({self.qtype}, shape={self.shape}, device={self.raw.device})"

    @property
    def device(self) -> torch.device:
        return self.raw.device

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    @property
    def is_quantized(self) -> bool:
        return self.qtype not in PLAIN_QTYPES

    def dequantize(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        raw = self.raw if device is None else self.raw.to(device)
        return dequantize(raw, self.qtype, self.shape, dtype)

    def to(self, device: torch.device | str) -> GGUFWeight:
        return GGUFWeight(self.raw.to(device), self.qtype, self.shape)

    # -- dim-0 surgery on packed data (what checkpoint converters need: q/k/v splits and re-ordering) --

    def _rows(self) -> torch.Tensor:
        """Bytes as (shape[0], bytes per dim-0 index); possible when each index spans whole blocks."""
        if not self.shape:
            raise ValueError("cannot slice a 0-d GGUFWeight")
        per_index = math.prod(self.shape[1:])
        block_size, type_size = block_info(self.qtype)
        if per_index % block_size:
            raise ValueError(
                f"cannot slice dim 0 of a {self.qtype} tensor of shape {self.shape}: one index spans "
                f"{per_index} elements, not a whole number of {block_size}-element blocks"
            )
        return self.raw.reshape(self.shape[0], per_index // block_size * type_size)

    def narrow(self, start: int, length: int) -> GGUFWeight:
        """Rows ``start:start+length`` along dim 0, as a zero-copy byte slice."""
        rows = self._rows().narrow(0, start, length)
        return GGUFWeight(rows, self.qtype, (length, *self.shape[1:]))

    def split(self, sizes: Sequence[int]) -> list[GGUFWeight]:
        if sum(sizes) != self.shape[0]:
            raise ValueError(f"split sizes {list(sizes)} do not add up to dim 0 of shape {self.shape}")
        out, start = [], 0
        for size in sizes:
            out.append(self.narrow(start, size))
            start += size
        return out

    def chunk(self, n: int) -> list[GGUFWeight]:
        if self.shape[0] % n:
            raise ValueError(f"cannot chunk dim 0 of shape {self.shape} into {n} equal parts")
        return self.split([self.shape[0] // n] * n)

    @staticmethod
    def cat(weights: Sequence[GGUFWeight]) -> GGUFWeight:
        """Concatenate along dim 0 (same type, same trailing dims)."""
        first = weights[0]
        for w in weights[1:]:
            if w.qtype != first.qtype or w.shape[1:] != first.shape[1:]:
                raise ValueError(f"cannot concatenate {w!r} with {first!r}")
        if len(weights) == 1:
            return first
        rows = torch.cat([w._rows() for w in weights], dim=0)
        return GGUFWeight(rows, first.qtype, (sum(w.shape[0] for w in weights), *first.shape[1:]))


class GGUFLinear(nn.Module):
    """``nn.Linear`` replacement that stores a GGML-packed weight and dequantizes it per forward.

    ``compute_dtype`` (default: the input's dtype) is the dtype the weight is dequantized to and the matmul
    runs in; the output is returned in the input's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        qtype: str | int = "F16",
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.qtype = qtype_name(qtype)
        self.compute_dtype = compute_dtype
        row_bytes = packed_nbytes((self.in_features,), self.qtype)
        packed = torch.zeros(self.out_features, row_bytes, dtype=torch.uint8, device=device)
        self.weight = nn.Parameter(packed, requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=bias_dtype, device=device), False)
        else:
            self.register_parameter("bias", None)

    @property
    def qtype(self) -> str:
        return self._qtype

    @qtype.setter
    def qtype(self, value: str | int) -> None:
        # resolved once here: the forward does no type lookups (they break a compiled graph)
        self._qtype = qtype_name(value)
        self._type_size = block_info(self._qtype)[1]
        self._fusable = _fusable(self._qtype)

    @classmethod
    def from_raw(
        cls,
        raw: torch.Tensor,
        qtype: str | int,
        shape: Sequence[int],
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> GGUFLinear:
        """Wrap packed bytes (no copy) of a weight with logical ``shape`` = (out_features, in_features)."""
        out_features, in_features = (int(s) for s in shape)
        w = GGUFWeight(raw, qtype, (out_features, in_features))
        with torch.device("meta"):  # skip allocating the placeholder weight
            module = cls(
                in_features, out_features, bias is not None, qtype=w.qtype, compute_dtype=compute_dtype
            )
        module.weight = nn.Parameter(w.raw.reshape(out_features, -1), requires_grad=False)
        if bias is not None:
            if bias.shape != (out_features,) or not bias.is_floating_point():
                raise ValueError(f"bias must be a float tensor of shape ({out_features},), got {bias.shape}")
            module.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return module

    @classmethod
    def from_weight(
        cls, weight: GGUFWeight, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None
    ) -> GGUFLinear:
        return cls.from_raw(weight.raw, weight.qtype, weight.shape, bias, compute_dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        qtype: str,
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> GGUFLinear:
        """Quantize an ``nn.Linear`` to ``qtype`` on ``device`` (default: the linear's), with
        :func:`~diffusers_quant.backends.gguf.quantize.to_ggml` (torch where it can, else gguf-py)."""
        from .quantize import to_ggml

        device = torch.device(device) if device is not None else linear.weight.device
        packed = to_ggml(linear.weight, qtype, device)
        bias = None if linear.bias is None else linear.bias.detach()
        module = cls.from_raw(packed, qtype, tuple(linear.weight.shape), bias, compute_dtype)
        return module.to(device)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def packed_nbytes(self) -> int:
        """Bytes held by the packed weight (bias not included)."""
        return self.weight.numel() * self.weight.element_size()

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(
            self.weight, self.qtype, self.weight_shape, dtype or self.compute_dtype or torch.float32
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or (x.dtype if x.is_floating_point() else torch.float32)
        if self._fusable and torch.compiler.is_compiling():
            # traced into the caller's graph; no type lookups here (dynamo breaks on the ggml enum's)
            blocks = self.weight.reshape(-1, self._type_size)
            if kernels.covers_ggml(self._qtype, dtype) and kernel_in_graph(x.device.type, "gguf"):
                w = ggml_decode(blocks, self._qtype, dtype)
            else:
                w = _decode(self._qtype, blocks, dtype)
            w = w.reshape(self.weight_shape)
        else:
            path = fast_path(x, "gguf") if self._fusable else None
            w = None
            if path == "fused":
                # one kernel reads the packed rows and writes the weight (fused.py)
                w = _fused_decoder(self._qtype).fast(self.weight, dtype)
            elif path == "cpu":  # the C kernel, where it covers the type (cpu_kernels.py)
                w = cpu_kernels.ggml(self._qtype, self.weight, dtype)
            if w is None:
                w = dequantize(self.weight, self._qtype, self.weight_shape, dtype, exact=False)
        b = self.bias
        if b is not None and b.dtype != dtype:
            b = b.to(dtype)
        if x.dtype == dtype:  # the common case, without two no-op conversions' host time
            return F.linear(x, w, b)
        y = F.linear(x.to(dtype), w, b)
        return y if not x.is_floating_point() else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}, "
            f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}"
        )

    # -- state dict: bytes in "weight", type and shape in "_extra_state" ---------------------------------

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor([_STATE_FORMAT, qtype_id(self.qtype), self.out_features, self.in_features])

    def set_extra_state(self, state: Any) -> None:
        values = [int(v) for v in torch.as_tensor(state).flatten().tolist()]
        if len(values) != 4 or values[0] != _STATE_FORMAT:
            raise ValueError(f"GGUFLinear: unrecognised extra state {values}")
        self.qtype = qtype_name(values[1])
        self.out_features, self.in_features = values[2], values[3]

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        extra = state_dict.get(prefix + "_extra_state")
        incoming = state_dict.get(prefix + "weight")
        if extra is not None:
            try:
                self.set_extra_state(extra)
            except ValueError as e:
                error_msgs.append(f"{prefix}_extra_state: {e}")
                return
        if incoming is not None:
            expected = (self.out_features, packed_nbytes((self.in_features,), self.qtype))
            if tuple(incoming.shape) != expected or incoming.dtype != torch.uint8:
                error_msgs.append(
                    f"{prefix}weight: expected packed {self.qtype} uint8 bytes of shape {expected} for "
                    f"({self.out_features}, {self.in_features}), got {incoming.dtype} {tuple(incoming.shape)}"
                )
                return
            if self.weight.shape != incoming.shape:  # saved with another qtype: re-shape our placeholder
                device = self.weight.device
                self.weight = nn.Parameter(torch.empty(expected, dtype=torch.uint8, device=device), False)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
