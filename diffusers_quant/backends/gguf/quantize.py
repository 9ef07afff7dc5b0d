"""Torch GGML quantizers for the simple block types, on any device, bit for bit gguf-py's.

gguf-py quantizes with numpy on the CPU: 16 s for a 1.9B-parameter transformer to Q8_0, four times the
model's bf16 load on an H100. These ports follow gguf-py's ``quants.py`` (itself ggml-quants.c's
reference) operation for operation in float32, so CPU and CUDA give its exact bytes (tests check both).
Types without a port here are quantized by gguf-py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_BLOCK = 32


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """(n, 1) float32 -> (n, 2) uint8 of its float16 value (round to nearest even, as numpy's astype)."""
    return values.to(torch.float16).view(torch.uint8)


def _divide(x: torch.Tensor, divisor: float | torch.Tensor) -> torch.Tensor:
    """``x / divisor`` correctly rounded on every device. CUDA turns a division by a Python number into
    a multiplication by its reciprocal, one rounding off numpy's result; a tensor divisor is divided."""
    return x / torch.as_tensor(divisor, dtype=x.dtype, device=x.device).expand_as(x).contiguous()


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), _divide(torch.ones_like(d), d))


def _roundf(n: torch.Tensor) -> torch.Tensor:
    """ggml's roundf (half away from zero), as gguf-py's np_roundf computes it."""
    a = n.abs()
    floored = a.floor()
    return n.sign() * (floored + (2 * (a - floored)).floor())


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 32) values in [0, 15] -> (n, 16) bytes: element i low nibble, element i + 16 high nibble."""
    return qs[:, :16] | (qs[:, 16:] << 4)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _divide(blocks.abs().amax(dim=1, keepdim=True), 127.0)
    qs = _roundf(blocks * _inverse(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([_fp16_bytes(d), qs], dim=1)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # The signed value of largest magnitude (the first one on ties, as numpy's argmax).
    largest = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))
    d = _divide(largest, -8.0)
    qs = (blocks * _inverse(d) + 8.5).trunc().to(torch.uint8).clamp(0, 15)
    return torch.cat([_fp16_bytes(d), _nibbles(qs)], dim=1)


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    high = blocks.amax(dim=1, keepdim=True)
    low = blocks.amin(dim=1, keepdim=True)
    d = _divide(high - low, 15.0)
    qs = ((blocks - low) * _inverse(d) + 0.5).trunc().to(torch.uint8).clamp(0, 15)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(low), _nibbles(qs)], dim=1)


QUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1}

# Rows quantized per step: float32 intermediates stay a few MB whatever the layer.
_BLOCK_ELEMENTS = 1 << 20


def quantize_rows(weight: torch.Tensor, qtype: str, device: torch.device | str | None = None) -> torch.Tensor:
    """``(rows, bytes_per_row)`` uint8 GGML data of a 2-D ``weight`` on ``device`` (default: the weight's).

    The weight is moved there and quantized a block of rows at a time, so a host weight quantized for
    the GPU never sits there whole in float32.
    """
    fn = QUANTIZERS[qtype]
    rows, cols = weight.shape
    if cols % _BLOCK:
        raise ValueError(f"{qtype} rows must be whole blocks of {_BLOCK} values, got {cols}")
    device = torch.device(device) if device is not None else weight.device
    step = max(1, _BLOCK_ELEMENTS // cols)
    out = None
    for start in range(0, rows, step):
        part = weight[start : start + step].to(device=device, dtype=torch.float32)
        packed = fn(part.reshape(-1, _BLOCK)).reshape(part.shape[0], -1)
        if out is None:
            out = torch.empty((rows, packed.shape[1]), dtype=torch.uint8, device=device)
        out[start : start + part.shape[0]] = packed
    return out


def to_ggml(weight: torch.Tensor, qtype: str, device: torch.device | str | None = None) -> torch.Tensor:
    """``weight``'s bytes in GGML ``qtype`` (any type gguf-py can write), shaped ``(..., bytes_per_row)``.

    Q8_0, Q4_0 and Q4_1 are quantized by torch on ``device`` (default: the weight's), a block of rows at a
    time; other types by gguf-py with numpy on the CPU, then moved there. Both give gguf-py's exact bytes.
    """
    from .dequant import qtype_name

    name = qtype_name(qtype)
    weight = weight.detach()
    if name in QUANTIZERS:
        rows = quantize_rows(weight.reshape(-1, weight.shape[-1]), name, device)
        return rows.reshape(*weight.shape[:-1], rows.shape[-1])
    import gguf
    import gguf.quants

    data = weight.to("cpu", torch.float32).numpy()
    packed = torch.from_numpy(gguf.quants.quantize(data, gguf.GGMLQuantizationType[name]))
    packed = packed.view(torch.uint8)  # float results (F16, F32) as their bytes
    return packed if device is None else packed.to(device)
