"""Torch GGML quantizers, on any device, bit for bit the reference ones.

gguf-py quantizes with numpy on the CPU: 16 s for a 1.9B-parameter transformer to Q8_0, four times the
model's bf16 load on an H100. Q8_0, Q4_0 and Q4_1 follow gguf-py's ``quants.py`` operation for operation;
Q4_K, Q5_K and Q6_K (which gguf-py cannot quantize) follow ggml-quants.c's ``quantize_row_q{4,5,6}_K_ref``
with ``make_qkx2_quants`` / ``make_qx_quants``, the imatrix-free path ``llama-quantize`` takes without
``--imatrix``. All run in float32 with the C code's order of operations (sums left to right, ties and
integer wrap-arounds as in C), so CPU and CUDA give the reference's exact bytes (tests check both, the K
types against the C functions compiled here). Types without a port are quantized by gguf-py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from ... import kernels
from ...fused import reference_forced

_QK_K = 256  # elements per K-type super-block
_GROUP_MAX_EPS = float(np.float32(1e-15))  # ggml's GROUP_MAX_EPS (1e-15f): below it a group is all zero


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """(n, 1) float32 -> (n, 2) uint8 of its float16 value (round to nearest even, as numpy's astype)."""
    return values.to(torch.float16).view(torch.uint8)


def _divide(x: torch.Tensor, divisor: float | torch.Tensor) -> torch.Tensor:
    """``x / divisor`` correctly rounded on every device. CUDA turns a division by a Python number into
    a multiplication by its reciprocal, one rounding off numpy's result; a tensor divisor is divided."""
    return x / torch.as_tensor(divisor, dtype=x.dtype, device=x.device).expand_as(x).contiguous()


def _over(numerator: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``numerator / x`` correctly rounded (``2.0 / t`` is ``t.reciprocal() * 2.0`` in torch)."""
    return torch.as_tensor(numerator, dtype=x.dtype, device=x.device) / x


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


# ---------------------------------------------------------------------------------------------------------
# K quants: ggml-quants.c's reference quantizers, vectorised over groups. Each candidate scale of the C
# search loop is a leading dim; sums stay sequential (one add per element, as the C loops), since a tree
# reduction rounds differently and flips the search's choices.


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: the magic-number round (half to even), bit for bit, out-of-range inputs too."""
    return ((v + 12582912.0).view(torch.int32) & 0x007FFFFF) - 0x00400000


def _sqrtf(v: torch.Tensor) -> torch.Tensor:
    """C's sqrtf, correctly rounded. torch's float32 sqrt on the CPU can be an ulp off (torch 2.13 here:
    3 of 96,000 Q4_K/Q5_K super-blocks then differed from ggml), so the float64 root rounded to float32 is
    moved to whichever neighbour has ``v`` between the squares of its rounding midpoints (exact in float64)."""
    root = torch.sqrt(v.double()).float()
    up = torch.nextafter(root, torch.full_like(root, float("inf")))
    down = torch.nextafter(root, torch.zeros_like(root))
    v, r = v.double(), root.double()
    high, low = (r + up.double()) / 2, (r + down.double()) / 2
    root = torch.where(v > high * high, up, root)
    return torch.where(v < low * low, down, root)


def _sum_in_order(terms: torch.Tensor, first: bool = False) -> torch.Tensor:
    """Sum over dim 0 in float32 one term after another, as ``float s = 0; for (...) s += t[i];`` does
    (``first``: as ``float s = t[0]; for (i = 1; ...)``)."""
    total = terms[0].clone() if first else terms[0] + 0.0
    for term in terms[1:]:
        total = total + term
    return total


def _steps(start: float, delta: float, count: int, offset: float) -> list[float]:
    """``start + delta*is + offset`` for is in [0, count), evaluated in float32 as C does."""
    f = np.float32
    return [float(f(f(f(start) + f(delta) * f(i)) + f(offset))) for i in range(count)]


def _kernel_here(x: torch.Tensor) -> bool:
    """Whether the searches run as Triton kernels: on a kernel device, the reference not forced."""
    return kernels.available(x) and not reference_forced()


# The group searches below take their values element-major, (n, groups): a C loop over a group's elements
# is then a Python loop over contiguous rows, each one op across every group.


def _make_qkx2_quants(
    x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qkx2_quants (use_mad false) on (n, groups) ``x`` -> (levels int32, scale, the_min).

    The candidate scales are tried one after another as in C, each measured from the best min so far. On
    CUDA one Triton kernel runs the whole search (``kernels.make_qkx2_quants``, bit for bit these ops)."""
    if _kernel_here(x):
        found = kernels.make_qkx2_quants(x, weights, nmax, _steps(rmin, rdelta, nstep + 1, float(nmax)))
        if found is not None:
            return found
    low = x.amin(dim=0)
    high = x.amax(dim=0)
    sum_w = _sum_in_order(weights, first=True)
    sum_x = _sum_in_order(weights * x, first=True)
    low = torch.where(low > 0, torch.zeros_like(low), low)
    flat = high == low  # C returns at once: levels 0, scale 0, the min as it is
    flat_min = low

    iscale = _over(float(nmax), high - low)
    scale = _over(1.0, iscale)
    levels = _nearest_int(iscale * (x - low)).clamp(0, nmax)
    diff = scale * levels.float() + low - x
    best_error = _sum_in_order(weights * (diff * diff))

    for numerator in _steps(rmin, rdelta, nstep + 1, float(nmax)):
        iscale = _over(numerator, high - low)
        candidate = _nearest_int(iscale * (x - low)).clamp(0, nmax)
        lf = candidate.float()
        wl = weights * lf
        sum_l, sum_l2, sum_xl = _sum_in_order(torch.stack([wl, wl * lf, wl * x], dim=1))
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clipped = this_min > 0
        this_scale = torch.where(clipped, sum_xl / sum_l2, this_scale)
        this_min = torch.where(clipped, torch.zeros_like(this_min), this_min)
        diff = this_scale * lf + this_min - x
        error = _sum_in_order(weights * (diff * diff))
        take = (det > 0) & (error < best_error)  # strictly better, as in C
        best_error = torch.where(take, error, best_error)
        levels = torch.where(take, candidate, levels)
        scale = torch.where(take, this_scale, scale)
        low = torch.where(take, this_min, low)
    levels = torch.where(flat, torch.zeros_like(levels), levels)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return levels, scale, -torch.where(flat, flat_min, low)


def _make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants with rmse_type 1 and no quant weights on (n, groups) ``x``
    -> (levels + nmax as int32, scale). Its 19 candidate scales are independent: all are measured at
    once, then chosen in the C loop's order (on CUDA one Triton kernel, ``kernels.make_qx_quants``)."""
    f = np.float32
    numerators = [f(-nmax)] + [f(-(f(nmax) + f(0.1) * f(i))) for i in range(-9, 10) if i]
    if _kernel_here(x):
        found = kernels.make_qx_quants(x, nmax, [float(v) for v in numerators], _GROUP_MAX_EPS)
        if found is not None:
            return found
    groups = torch.arange(x.shape[1], device=x.device)
    peak = x[x.abs().argmax(dim=0), groups]  # the first value of largest magnitude, sign kept
    zero = peak.abs() < _GROUP_MAX_EPS
    iscales = torch.tensor(np.array(numerators), device=x.device).view(-1, 1) / peak  # (19, groups)
    xs = x.unsqueeze(1)
    levels = _nearest_int(iscales * xs).clamp(-nmax, nmax - 1)  # (n, 19, groups)
    lf = levels.float()
    w = xs * xs
    sumlx, suml2 = _sum_in_order(torch.stack([w * xs * lf, w * lf * lf], dim=1))

    scale = torch.where(suml2[0] != 0, sumlx[0] / suml2[0], torch.zeros_like(suml2[0]))
    best = scale * sumlx[0]
    chosen = torch.zeros_like(groups)
    for k in range(1, len(numerators)):  # is = -9..-1, 1..9
        take = (suml2[k] > 0) & (sumlx[k] * sumlx[k] > best * suml2[k])
        scale = torch.where(take, sumlx[k] / suml2[k], scale)
        best = torch.where(take, scale * sumlx[k], best)
        chosen = torch.where(take, k, chosen)
    out = levels[:, chosen, groups] + nmax
    return torch.where(zero, torch.zeros_like(out), out), torch.where(zero, torch.zeros_like(scale), scale)


def _running_max(values: torch.Tensor) -> torch.Tensor:
    """``float m = 0; for (...) if (v > m) m = v;`` over the last dim."""
    best = torch.zeros_like(values[..., 0])
    for v in values.unbind(-1):
        best = torch.where(v > best, v, best)
    return best


def _scale_min_k4(blocks: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """The shared part of quantize_row_q4_K_ref / q5_K_ref on (n, 256) blocks: the 8 sub-block scales and
    mins packed as 6 bits each into 12 bytes, the super-block d and dmin (float16), and the levels."""
    n = blocks.shape[0]
    x = blocks.reshape(n * 8, 32).t().contiguous()
    av_x = _sqrtf(_divide(_sum_in_order(x * x), 32.0))
    weights = av_x + x.abs()
    levels, scales, mins = _make_qkx2_quants(x, weights, nmax, rmin, 0.1, nstep)
    levels, scales, mins = levels.t().reshape(n, 8, 32), scales.view(n, 8), mins.view(n, 8)

    max_scale, max_min = _running_max(scales), _running_max(mins)
    zero = torch.zeros_like(max_scale)
    inv_scale = torch.where(max_scale > 0, _over(63.0, max_scale), zero).unsqueeze(1)
    inv_min = torch.where(max_min > 0, _over(63.0, max_min), zero).unsqueeze(1)
    ls = (_nearest_int(inv_scale * scales) & 0xFF).clamp(max=63)  # uint8_t ls = ...; MIN(63, ls)
    lm = (_nearest_int(inv_min * mins) & 0xFF).clamp(max=63)
    packed = torch.cat(
        [
            ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
            lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
            (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4),
        ],
        dim=1,
    ).to(torch.uint8)
    d16 = _divide(max_scale, 63.0).to(torch.float16)
    dmin16 = _divide(max_min, 63.0).to(torch.float16)

    d = d16.float().unsqueeze(1) * ls.float()
    dm = dmin16.float().unsqueeze(1) * lm.float()
    x = blocks.reshape(n, 8, 32)
    requant = _nearest_int((x + dm.unsqueeze(2)) / d.unsqueeze(2)).clamp(0, nmax)
    levels = torch.where((d != 0).unsqueeze(2), requant, levels)  # if (!d) continue;
    header = torch.cat([d16.view(n, 1), dmin16.view(n, 1)], dim=1).view(torch.uint8)
    return header, packed, levels.view(n, 4, 2, 32)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    header, scales, levels = _scale_min_k4(blocks, nmax=15, rmin=-1.0, nstep=20)
    qs = levels[:, :, 0] | (levels[:, :, 1] << 4)  # 32 bytes per 64 values: low nibble first 32
    return torch.cat([header, scales, qs.reshape(-1, 128).to(torch.uint8)], dim=1)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    header, scales, levels = _scale_min_k4(blocks, nmax=31, rmin=-0.5, nstep=15)
    low = levels & 0xF
    qs = low[:, :, 0] | (low[:, :, 1] << 4)
    high = levels >> 4  # (n, 4, 2, 32): fifth bit of value j + 64*i + 32*k goes to qh[j] bit 2*i + k
    shifts = torch.arange(8, device=blocks.device).view(1, 4, 2, 1)
    qh = (high << shifts).sum(dim=(1, 2))
    return torch.cat([header, scales, qh.to(torch.uint8), qs.reshape(-1, 128).to(torch.uint8)], dim=1)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    levels, scales = _make_qx_quants(blocks.reshape(n * 16, 16).t().contiguous(), nmax=32)
    levels, scales = levels.t().reshape(n, 16, 16), scales.view(n, 16)

    max_abs = torch.zeros_like(scales[:, 0])
    max_scale = torch.zeros_like(max_abs)
    for s in scales.unbind(1):
        take = s.abs() > max_abs
        max_abs = torch.where(take, s.abs(), max_abs)
        max_scale = torch.where(take, s, max_scale)
    empty = max_abs < _GROUP_MAX_EPS

    iscale = _over(-128.0, max_scale)
    d16 = _over(1.0, iscale).to(torch.float16)
    sc = _nearest_int(iscale.unsqueeze(1) * scales).clamp(max=127)
    sc = (sc & 0xFF).to(torch.uint8).view(torch.int8)  # stored as int8_t
    d = (d16.float().unsqueeze(1) * sc.float()).unsqueeze(2)
    x = blocks.reshape(n, 16, 16)
    requant = _nearest_int(x / d).clamp(-32, 31) + 32
    levels = torch.where(d != 0, requant, levels).view(n, 2, 4, 32)

    low = levels & 0xF
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2)
    shifts = torch.tensor([0, 2, 4, 6], device=blocks.device).view(1, 1, 4, 1)
    qh = ((levels >> 4) << shifts).sum(dim=2)
    out = torch.cat(
        [
            ql.reshape(n, 128).to(torch.uint8),
            qh.reshape(n, 64).to(torch.uint8),
            sc.view(torch.uint8),
            d16.view(n, 1).view(torch.uint8),
        ],
        dim=1,
    )
    return torch.where(empty.unsqueeze(1), torch.zeros_like(out), out)


class Quantizer(NamedTuple):
    block: int  # elements per block: rows must be whole blocks
    fn: Callable[[torch.Tensor], torch.Tensor]  # (n, block) float32 -> (n, bytes per block) uint8
    expansion: int = 1  # float32 intermediates per value, relative to the simple types: fewer rows a step
    cuda_steps: int = 1  # on CUDA, this many times more rows a step (the searches are many small launches)


QUANTIZERS: dict[str, Quantizer] = {
    "Q8_0": Quantizer(32, _q8_0),
    "Q4_0": Quantizer(32, _q4_0),
    "Q4_1": Quantizer(32, _q4_1),
    # ~2,000 launches per step (Q6_K fewer, but all 19 candidate scales at once): on an H200 16x the rows a
    # step takes the K types from ~10 to 90-190 M values/s, for 0.25-0.5 GiB of intermediates
    "Q4_K": Quantizer(_QK_K, _q4_k, expansion=4, cuda_steps=16),
    "Q5_K": Quantizer(_QK_K, _q5_k, expansion=4, cuda_steps=16),
    "Q6_K": Quantizer(_QK_K, _q6_k, expansion=16, cuda_steps=16),
}

# Values quantized per step (times a type's cuda_steps on CUDA, over its expansion): float32 intermediates
# stay bounded whatever the layer (some 20 MB on the CPU).
_BLOCK_ELEMENTS = 1 << 20


def quantize_rows(weight: torch.Tensor, qtype: str, device: torch.device | str | None = None) -> torch.Tensor:
    """``(rows, bytes_per_row)`` uint8 GGML data of a 2-D ``weight`` on ``device`` (default: the weight's).

    The weight is moved there and quantized a block of rows at a time, so a host weight quantized for
    the GPU never sits there whole in float32.
    """
    block, fn, expansion, cuda_steps = QUANTIZERS[qtype]
    rows, cols = weight.shape
    if cols % block:
        raise ValueError(
            f"{qtype} rows must be whole blocks of {block} values, got {cols}; fix: pick a type whose "
            f"block size divides {cols}, or keep this tensor unquantized"
        )
    device = torch.device(device) if device is not None else weight.device
    budget = _BLOCK_ELEMENTS * (cuda_steps if device.type == "cuda" else 1)
    step = max(1, budget // (cols * expansion))
    out = None
    for start in range(0, rows, step):
        part = weight[start : start + step].to(device=device, dtype=torch.float32)
        packed = fn(part.reshape(-1, block)).reshape(part.shape[0], -1)
        if out is None:
            out = torch.empty((rows, packed.shape[1]), dtype=torch.uint8, device=device)
        out[start : start + part.shape[0]] = packed
    return out


def to_ggml(weight: torch.Tensor, qtype: str, device: torch.device | str | None = None) -> torch.Tensor:
    """``weight``'s bytes in GGML ``qtype`` (any type gguf-py can write, and Q4_K/Q5_K/Q6_K), shaped
    ``(..., bytes_per_row)``.

    The types in ``QUANTIZERS`` are quantized by torch on ``device`` (default: the weight's), a block of
    rows at a time; other types by gguf-py with numpy on the CPU, then moved there. Both give the
    reference's exact bytes (gguf-py's; for the K types ggml's ``quantize_row_*_K_ref``).
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
