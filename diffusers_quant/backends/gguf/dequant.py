"""Pure-torch dequantization of GGML block formats (runs on any device the bytes live on).

Every function in ``DEQUANTIZERS`` takes ``blocks``, a ``uint8`` tensor of shape ``(n_blocks, type_size)``,
and returns ``float32`` of shape ``(n_blocks, block_size)``.  The layouts and the order of float operations
follow gguf-py's ``gguf/quants.py`` (itself a port of ggml-quants.c), so results match it bit for bit on
CPU.  Block and type sizes come from ``gguf.constants.GGML_QUANT_SIZES`` (read lazily: the one source of
truth); the IQ1/IQ2/IQ3 lookup grids are likewise read lazily from ``gguf.quants``.

Only torch and the standard library are imported at module level, and no numpy is used on the hot path,
so ``dequantize`` works unchanged on CUDA tensors.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor  # loaded by `import torch` already
from torch._subclasses.functional_tensor import FunctionalTensor

# The byte layouts are little-endian; reinterpreting bytes with .view() relies on a little-endian host.
if sys.byteorder != "little":  # pragma: no cover - no big-endian torch targets in practice
    raise ImportError("diffusers_quant.backends.gguf.dequant needs a little-endian host")

QK_K = 256
_KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_KVALUES_FP4 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # e2m1 values, doubled

DequantFn = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------
# Type table (lazy, from gguf)


@functools.cache
def _sizes_by_name() -> dict[str, tuple[int, int]]:
    from gguf.constants import GGML_QUANT_SIZES

    return {t.name: (int(bs), int(ts)) for t, (bs, ts) in GGML_QUANT_SIZES.items()}


@functools.cache
def _ids_by_name() -> dict[str, int]:
    from gguf.constants import GGMLQuantizationType

    return {t.name: int(t) for t in GGMLQuantizationType}


def qtype_name(qtype: str | int) -> str:
    """Canonical ggml type name ("Q4_K") for a name (any case) or a numeric ggml type id."""
    if isinstance(qtype, int):
        names = {tid: name for name, tid in _ids_by_name().items()}
        if qtype not in names:
            raise ValueError(f"unknown ggml type id {qtype}")
        return names[qtype]
    name = str(qtype).upper()
    if name not in _ids_by_name():
        raise ValueError(f"unknown ggml type {qtype!r}; known: {', '.join(sorted(_ids_by_name()))}")
    return name


def qtype_id(qtype: str | int) -> int:
    """Numeric ggml type id for a type name or id."""
    return _ids_by_name()[qtype_name(qtype)]


def block_info(qtype: str | int) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type."""
    return _sizes_by_name()[qtype_name(qtype)]


def blocks_nbytes(n_elements: int, qtype: str | int) -> int:
    """Bytes of ``n_elements`` values in ``qtype``; raises unless they are a whole number of blocks."""
    block_size, type_size = block_info(qtype)
    if n_elements % block_size:
        raise ValueError(
            f"{n_elements} elements are not a whole number of {qtype_name(qtype)} blocks of {block_size}"
        )
    return n_elements // block_size * type_size


def packed_nbytes(shape: Sequence[int], qtype: str | int) -> int:
    """Bytes a tensor of logical ``shape`` takes in ``qtype``; raises if the last dim is not whole blocks."""
    block_size, type_size = block_info(qtype)
    shape = tuple(int(s) for s in shape)
    row = shape[-1] if shape else 1
    if row % block_size:
        raise ValueError(
            f"shape {shape}: last dim {row} is not a multiple of the {qtype_name(qtype)} block size {block_size}"
        )
    return math.prod(shape) // block_size * type_size


# ---------------------------------------------------------------------------------------------------------
# Small helpers.  Fields are sliced out of the block rows, made contiguous and reinterpreted.


def _f16(b: torch.Tensor, ftype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, 2k) bytes -> (n, k) ``ftype`` (float32 unless told) read as little-endian fp16."""
    return b.contiguous().view(torch.float16).to(ftype)


def _u16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2k) bytes -> (n, k) int32 holding unsigned 16-bit values."""
    return b.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF


def _u32(b: torch.Tensor) -> torch.Tensor:
    """(n, 4k) bytes -> (n, k) int64 holding unsigned 32-bit values."""
    return b.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _shifts(values: Sequence[int], shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """A small constant tensor on ``like``'s device, cached (no host-to-device copy per call on GPU); made
    afresh while traced (a fake or functional tensor must not outlive its trace)."""
    # kernels.tracing's test, written out: this module stands alone (torch and the standard library only)
    if torch.compiler.is_compiling() or isinstance(like, (FakeTensor, FunctionalTensor)):
        return torch.tensor(values, dtype=like.dtype, device=like.device).reshape(shape)
    key = (tuple(values), tuple(shape), like.dtype, str(like.device))
    t = _CONSTANTS.get(key)
    if t is None:
        t = torch.tensor(key[0], dtype=like.dtype, device=like.device).reshape(shape)
        _CONSTANTS[key] = t
    return t


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 2k): all low nibbles first, then all high nibbles (ggml's order). The bytes are a
    strided slice of the blocks: copied together first, the bit ops run on contiguous memory (on the CPU
    Q4_0's decode then took 62 us against 94 on a 512 x 128 weight)."""
    qs = qs.contiguous()
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


_TABLES: dict[tuple[str, str], torch.Tensor] = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    """Constant lookup tables, built once per device."""
    key = (name, str(device))
    t = _TABLES.get(key)
    if t is None:
        if name == "iq4nl":
            t = torch.tensor(_KVALUES_IQ4NL, dtype=torch.float32)
        elif name == "fp4":
            t = torch.tensor(_KVALUES_FP4, dtype=torch.float32)
        elif name == "ksigns":
            import gguf.quants as gq

            t = torch.tensor(list(gq.IQ2_XXS.ksigns), dtype=torch.int32)
        else:  # IQ grids, decoded by gguf-py from its hex tables
            import gguf.quants as gq

            cls = getattr(gq, name)
            cls.init_grid()
            t = torch.tensor(cls.grid.reshape(cls.grid_shape).tolist(), dtype=torch.float32)
        t = t.to(device)
        _TABLES[key] = t
    return t


def _sign_bits(signs: torch.Tensor) -> torch.Tensor:
    """(..., k) byte values -> (..., k, 8) of +1/-1, bit i set meaning negative."""
    signs = signs.to(torch.int32)
    bits = (signs.unsqueeze(-1) >> _shifts(range(8), (8,), signs)) & 1
    return torch.where(bits == 0, 1.0, -1.0)


# ---------------------------------------------------------------------------------------------------------
# Unquantized types


def _deq_f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float32)


def _deq_f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float16).float()


def _deq_bf16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.bfloat16).float()


# ---------------------------------------------------------------------------------------------------------
# Legacy 32-element blocks


def _deq_q4_0(blocks: torch.Tensor, ftype: torch.dtype = torch.float32) -> torch.Tensor:
    d = _f16(blocks[:, :2], ftype)
    q = _nibbles(blocks[:, 2:]).view(torch.int8) - 8  # values 0..15: the same bytes as int8
    return d * q  # int8 promotes exactly inside the multiply: no float copy of q


def _deq_q4_1(blocks: torch.Tensor, ftype: torch.dtype = torch.float32) -> torch.Tensor:
    d, m = _f16(blocks[:, :2], ftype), _f16(blocks[:, 2:4], ftype)
    return d * _nibbles(blocks[:, 4:]).to(ftype) + m


def _q5_high_bits(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) of its bits (bit i: 5th bit of element i)."""
    return ((qh.unsqueeze(-1) >> _shifts(range(8), (1, 1, 8), qh)) & 1).reshape(-1, 32)


def _deq_q5_0(blocks: torch.Tensor, ftype: torch.dtype = torch.float32) -> torch.Tensor:
    d = _f16(blocks[:, :2], ftype)
    q = _nibbles(blocks[:, 6:]) | (_q5_high_bits(blocks[:, 2:6]) << 4)
    return d * (q.to(torch.int8) - 16).to(ftype)


def _deq_q5_1(blocks: torch.Tensor, ftype: torch.dtype = torch.float32) -> torch.Tensor:
    d, m = _f16(blocks[:, :2], ftype), _f16(blocks[:, 2:4], ftype)
    q = _nibbles(blocks[:, 8:]) | (_q5_high_bits(blocks[:, 4:8]) << 4)
    return d * q.to(ftype) + m


def _deq_q8_0(blocks: torch.Tensor, ftype: torch.dtype = torch.float32) -> torch.Tensor:
    d = _f16(blocks[:, :2], ftype)
    # A strided int8 view of the bytes; int8 promotes exactly inside the multiply (one pass over the
    # weight, as diffusers' own Q8_0 decoder does, instead of a copy, a cast and a multiply).
    return blocks[:, 2:].view(torch.int8) * d


# ---------------------------------------------------------------------------------------------------------
# K-quants (256-element super-blocks)


def _deq_q2_k(blocks: torch.Tensor, ftype: torch.dtype = torch.float32) -> torch.Tensor:
    n = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks[:, 80:82], ftype), _f16(blocks[:, 82:84], ftype)
    dl = (d * (scales & 0x0F).to(ftype)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(ftype)).reshape(n, 16, 1)
    q = (qs.reshape(n, 2, 1, 32) >> _shifts((0, 2, 4, 6), (1, 1, 4, 1), qs)) & 3
    return (dl * q.reshape(n, 16, 16).to(ftype) - ml).reshape(n, QK_K)


def _deq_q3_k(blocks: torch.Tensor, ftype: torch.dtype = torch.float32) -> torch.Tensor:
    n = blocks.shape[0]
    hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks[:, 108:110], ftype)
    # 16 6-bit scales: low 4 bits in bytes 0..7 (two per byte), high 2 bits in bytes 8..11 (four per byte)
    lo = (scales[:, :8].reshape(n, 1, 8) >> _shifts((0, 4), (1, 2, 1), scales)).reshape(n, 16)
    hi = (scales[:, 8:].reshape(n, 1, 4) >> _shifts((0, 2, 4, 6), (1, 4, 1), scales)).reshape(n, 16)
    sc = ((lo & 0x0F) | ((hi & 0x03) << 4)).to(torch.int8) - 32
    dl = (d * sc.to(ftype)).reshape(n, 16, 1)
    ql = (qs.reshape(n, 2, 1, 32) >> _shifts((0, 2, 4, 6), (1, 1, 4, 1), qs)).reshape(n, 16, 16) & 3
    qh = (hmask.reshape(n, 1, 1, 32) >> _shifts(range(8), (1, 1, 8, 1), hmask)).reshape(n, 16, 16) & 1
    q = ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)  # a set mask bit means "no offset"
    return (dl * q.to(ftype)).reshape(n, QK_K)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack Q4_K/Q5_K's 12 bytes into 8 6-bit scales and 8 6-bit mins."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _deq_q4_k(blocks: torch.Tensor, ftype: torch.dtype = torch.float32) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2], ftype), _f16(blocks[:, 2:4], ftype)
    sc, mn = _scale_min_k4(blocks[:, 4:16])
    d = (d * sc.to(ftype)).reshape(n, 8, 1)
    dm = (dmin * mn.to(ftype)).reshape(n, 8, 1)
    qs = blocks[:, 16:]
    q = (qs.reshape(n, 4, 1, 32) >> _shifts((0, 4), (1, 1, 2, 1), qs)).reshape(n, 8, 32) & 0x0F
    return (d * q.to(ftype) - dm).reshape(n, QK_K)


def _deq_q5_k(blocks: torch.Tensor, ftype: torch.dtype = torch.float32) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2], ftype), _f16(blocks[:, 2:4], ftype)
    sc, mn = _scale_min_k4(blocks[:, 4:16])
    d = (d * sc.to(ftype)).reshape(n, 8, 1)
    dm = (dmin * mn.to(ftype)).reshape(n, 8, 1)
    qh, qs = blocks[:, 16:48], blocks[:, 48:]
    ql = (qs.reshape(n, 4, 1, 32) >> _shifts((0, 4), (1, 1, 2, 1), qs)).reshape(n, 8, 32) & 0x0F
    qh = (qh.reshape(n, 1, 1, 32) >> _shifts(range(8), (1, 1, 8, 1), qh)).reshape(n, 8, 32) & 1
    return (d * (ql | (qh << 4)).to(ftype) - dm).reshape(n, QK_K)


def _deq_q6_k(blocks: torch.Tensor, ftype: torch.dtype = torch.float32) -> torch.Tensor:
    n = blocks.shape[0]
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).to(ftype)
    d = (_f16(blocks[:, 208:210], ftype) * scales).reshape(n, 16, 1)
    ql = (ql.reshape(n, 2, 1, 64) >> _shifts((0, 4), (1, 1, 2, 1), ql)).reshape(n, 8, 32) & 0x0F
    qh = (qh.reshape(n, 2, 1, 32) >> _shifts((0, 2, 4, 6), (1, 1, 4, 1), qh)).reshape(n, 8, 32) & 3
    q = (ql | (qh << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, 16, 16).to(ftype)).reshape(n, QK_K)


# ---------------------------------------------------------------------------------------------------------
# Non-linear 4-bit and ternary / fp4 types


def _deq_iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    q = _nibbles(blocks[:, 2:]).long()
    return d * _table("iq4nl", blocks.device)[q]


def _deq_iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks[:, :2])
    sh = _u16(blocks[:, 2:4])  # (n, 1): 2 high bits per sub-block
    sl = blocks[:, 4:8]
    lo = (sl.reshape(n, 4, 1) >> _shifts((0, 4), (1, 1, 2), sl)).reshape(n, 8) & 0x0F
    hi = (sh >> _shifts(range(0, 16, 2), (1, 8), sh)) & 0x03
    scales = (lo.to(torch.int32) | (hi << 4)) - 32
    dl = (d * scales.float()).reshape(n, 8, 1)
    qs = blocks[:, 8:]
    q = (qs.reshape(n, 8, 1, 16) >> _shifts((0, 4), (1, 1, 2, 1), qs)).reshape(n, 8, 32) & 0x0F
    return (dl * _table("iq4nl", blocks.device)[q.long()]).reshape(n, QK_K)


def _deq_tq1_0(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    qs, qh = blocks[:, :48].to(torch.int32), blocks[:, 48:52].to(torch.int32)
    d = _f16(blocks[:, 52:54])
    pow5 = _shifts((1, 3, 9, 27, 81), (1, 5, 1), qs)
    q0 = (qs[:, :32].reshape(n, 1, 32) * pow5).reshape(n, 160)
    q1 = (qs[:, 32:].reshape(n, 1, 16) * pow5).reshape(n, 80)
    q2 = (qh.reshape(n, 1, 4) * pow5[:, :4]).reshape(n, 16)
    # ggml multiplies in uint8 (wrapping), then reads the top trit with (x * 3) >> 8
    q = (((torch.cat([q0, q1, q2], dim=-1) & 0xFF) * 3) >> 8) - 1
    return d * q.float()


def _deq_tq2_0(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    qs = blocks[:, :64]
    d = _f16(blocks[:, 64:66])
    q = ((qs.reshape(n, 2, 1, 32) >> _shifts((0, 2, 4, 6), (1, 1, 4, 1), qs)) & 3).reshape(n, QK_K)
    return d * (q.to(torch.int8) - 1).float()


def _e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """ggml_e8m0_to_fp32_half: 2**(e - 128) as float32, including the two subnormal cases."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.full_like(e, 0x00200000) << e, (e - 1) << 23)
    return bits.view(torch.float32)


def _deq_mxfp4(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _e8m0_half(blocks[:, :1])
    qs = blocks[:, 1:]
    q = (qs.reshape(n, 1, 16) >> _shifts((0, 4), (1, 2, 1), qs)).reshape(n, 32) & 0x0F
    return d * _table("fp4", blocks.device)[q.long()]


def _ue4m3_half(x: torch.Tensor) -> torch.Tensor:
    """Unsigned e4m3 scale (bias 7) times 0.5, as in gguf-py's NVFP4.ue4m3_to_fp32."""
    x = x.to(torch.int32)
    exp = (x >> 3) & 0x0F
    man = (x & 0x07).float()
    raw = torch.where(exp == 0, man * 2.0**-9, (1.0 + man / 8.0) * torch.exp2(exp.float() - 7))
    return torch.where((x == 0) | (x == 0x7F), 0.0, raw * 0.5)


def _deq_nvfp4(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _ue4m3_half(blocks[:, :4]).reshape(n, 4, 1)
    qs = blocks[:, 4:].reshape(n, 4, 8)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # (n, 4, 16)
    return (d * _table("fp4", blocks.device)[q.long()]).reshape(n, 64)


# ---------------------------------------------------------------------------------------------------------
# Grid-based i-quants


def _ksigns(idx: torch.Tensor) -> torch.Tensor:
    """7-bit sign indices -> (..., 8) of +1/-1 via ggml's ksigns_iq2xs table (parity bit in bit 7)."""
    return _sign_bits(_table("ksigns", idx.device)[idx.long()])


def _deq_iq2_xxs(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks[:, :2])
    raw = blocks[:, 2:].reshape(n, 8, 8)  # 8 groups of (4 grid-index bytes, uint32 of signs + scale)
    aux = _u32(raw[:, :, 4:].reshape(n, 32))  # (n, 8)
    db = (d * (0.5 + (aux >> 28).float()) * 0.25).reshape(n, 8, 1, 1)
    signs = _ksigns((aux.unsqueeze(-1) >> _shifts((0, 7, 14, 21), (1, 1, 4), aux)) & 0x7F)  # (n, 8, 4, 8)
    grid = _table("IQ2_XXS", blocks.device)[raw[:, :, :4].long()]  # (n, 8, 4, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _deq_iq2_xs(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks[:, :2])
    qs = _u16(blocks[:, 2:66])  # (n, 32): 9-bit grid index + 7-bit sign index
    sc = blocks[:, 66:74]
    scales = (sc.reshape(n, 8, 1) >> _shifts((0, 4), (1, 1, 2), sc)).reshape(n, 16) & 0x0F
    db = (d * (0.5 + scales.float()) * 0.25).reshape(n, 16, 1, 1)
    signs = _ksigns(qs >> 9).reshape(n, 16, 2, 8)
    grid = _table("IQ2_XS", blocks.device)[(qs & 511).long()].reshape(n, 16, 2, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _deq_iq2_s(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks[:, :2])
    qs, signs, qh, sc = blocks[:, 2:34], blocks[:, 34:66], blocks[:, 66:74], blocks[:, 74:82]
    scales = (sc.reshape(n, 8, 1) >> _shifts((0, 4), (1, 1, 2), sc)).reshape(n, 16) & 0x0F
    db = (d * (0.5 + scales.float()) * 0.25).reshape(n, 16, 1, 1)
    signs = _sign_bits(signs).reshape(n, 16, 2, 8)
    qh = (qh.reshape(n, 8, 1) >> _shifts((0, 2, 4, 6), (1, 1, 4), qh)).reshape(n, 32) & 0x03
    idx = qs.long() | (qh.long() << 8)
    grid = _table("IQ2_S", blocks.device)[idx].reshape(n, 16, 2, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _deq_iq3_xxs(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks[:, :2])
    qs = blocks[:, 2:66]
    aux = _u32(blocks[:, 66:98])  # (n, 8)
    db = (d * (0.5 + (aux >> 28).float()) * 0.5).reshape(n, 8, 1, 1)
    signs = _ksigns((aux.unsqueeze(-1) >> _shifts((0, 7, 14, 21), (1, 1, 4), aux)) & 0x7F)  # (n, 8, 4, 8)
    grid = _table("IQ3_XXS", blocks.device)[qs.long()].reshape(n, 8, 4, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _deq_iq3_s(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks[:, :2])
    qs, qh, signs, sc = blocks[:, 2:66], blocks[:, 66:74], blocks[:, 74:106], blocks[:, 106:110]
    scales = (sc.reshape(n, 4, 1) >> _shifts((0, 4), (1, 1, 2), sc)).reshape(n, 8) & 0x0F
    db = (d * (1 + 2 * scales).float()).reshape(n, 8, 1, 1)
    signs = _sign_bits(signs).reshape(n, 8, 4, 8)
    qh = (qh.reshape(n, 8, 1) >> _shifts(range(8), (1, 1, 8), qh)).reshape(n, 64) & 1
    idx = qs.long() | (qh.long() << 8)
    grid = _table("IQ3_S", blocks.device)[idx].reshape(n, 8, 4, 8)
    return (db * grid * signs).reshape(n, QK_K)


_IQ1_DELTA = 0.125


def _deq_iq1_s(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks[:, :2])
    qs = blocks[:, 2:34]
    qh = _u16(blocks[:, 34:50])  # (n, 8)
    dl = (d * (2 * ((qh >> 12) & 7) + 1).float()).reshape(n, 8, 1, 1)
    delta = torch.where((qh & 0x8000) == 0, _IQ1_DELTA, -_IQ1_DELTA).reshape(n, 8, 1, 1)
    hi = ((qh.unsqueeze(-1) >> _shifts((0, 3, 6, 9), (1, 1, 4), qh)) & 7).reshape(n, 32)
    idx = qs.long() | (hi.long() << 8)
    grid = _table("IQ1_S", blocks.device)[idx].reshape(n, 8, 4, 8)
    return (dl * (grid + delta)).reshape(n, QK_K)


def _deq_iq1_m(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    qs, qh = blocks[:, :32], blocks[:, 32:48]
    sc = _u16(blocks[:, 48:56])  # (n, 4)
    # the fp16 super-block scale is spread over the top nibble of the four 16-bit scale words
    dbits = (sc & 0xF000) >> _shifts((12, 8, 4, 0), (1, 4), sc)
    dbits = dbits[:, 0] | dbits[:, 1] | dbits[:, 2] | dbits[:, 3]
    dbits = torch.where(dbits >= 0x8000, dbits - 0x10000, dbits)  # as signed, so the int16 cast is exact
    d = dbits.to(torch.int16).view(torch.float16).float().reshape(n, 1)
    scales = ((sc.unsqueeze(-1) >> _shifts((0, 3, 6, 9), (1, 1, 4), sc)) & 0x07).reshape(n, 16)
    dl = (d * (2 * scales + 1).float()).reshape(n, 8, 2, 1, 1)
    qh = qh.reshape(n, 16, 1) >> _shifts((0, 4), (1, 1, 2), qh)  # (n, 16, 2)
    idx = qs.long() | ((qh & 0x07).long() << 8).reshape(n, 32)
    delta = torch.where((qh & 0x08) == 0, _IQ1_DELTA, -_IQ1_DELTA).reshape(n, 8, 2, 2, 1)
    grid = _table("IQ1_S", blocks.device)[idx].reshape(n, 8, 2, 2, 8)
    return (dl * (grid + delta)).reshape(n, QK_K)


# ---------------------------------------------------------------------------------------------------------
# Types gguf-py stores but cannot dequantize: F64 and the integer types (read as plain values), Q8_K and
# Q1_0 (layouts from ggml-common.h, decoded as ggml-quants.c's dequantize_row_q8_K / _q1_0 do).
# Q8_1 is left out on purpose: it is ggml's activation format (ggml has no dequantize_row_q8_1) and
# gguf-py's block size for it (40 bytes, the old float d/s layout) disagrees with ggml's block_q8_1 (36).


def _deq_plain(dtype: torch.dtype) -> DequantFn:
    def decode(blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(dtype).to(torch.float32)

    decode.__name__ = f"_deq_{str(dtype).removeprefix('torch.')}"
    return decode


def _deq_q8_k(blocks: torch.Tensor) -> torch.Tensor:
    # block_q8_K: float d; int8_t qs[256]; int16_t bsums[16] (bsums are sums of qs, unused here)
    d = blocks[:, :4].contiguous().view(torch.float32)
    return d * blocks[:, 4 : 4 + QK_K].contiguous().view(torch.int8).to(torch.float32)


def _deq_q1_0(blocks: torch.Tensor) -> torch.Tensor:
    # block_q1_0: ggml_half d; uint8_t qs[16]; element j is +d if bit j % 8 of qs[j / 8] is set, else -d
    n = blocks.shape[0]
    d = _f16(blocks[:, :2])
    qs = blocks[:, 2:]
    bits = ((qs.unsqueeze(-1) >> _shifts(range(8), (1, 1, 8), qs)) & 1).reshape(n, 128)
    return d * (bits.to(torch.float32) * 2 - 1)


# ---------------------------------------------------------------------------------------------------------
# Public table and entry point

DEQUANTIZERS: dict[str, DequantFn] = {
    "F32": _deq_f32,
    "F16": _deq_f16,
    "BF16": _deq_bf16,
    "Q4_0": _deq_q4_0,
    "Q4_1": _deq_q4_1,
    "Q5_0": _deq_q5_0,
    "Q5_1": _deq_q5_1,
    "Q8_0": _deq_q8_0,
    "Q2_K": _deq_q2_k,
    "Q3_K": _deq_q3_k,
    "Q4_K": _deq_q4_k,
    "Q5_K": _deq_q5_k,
    "Q6_K": _deq_q6_k,
    "IQ4_NL": _deq_iq4_nl,
    "IQ4_XS": _deq_iq4_xs,
    "IQ2_XXS": _deq_iq2_xxs,
    "IQ2_XS": _deq_iq2_xs,
    "IQ2_S": _deq_iq2_s,
    "IQ3_XXS": _deq_iq3_xxs,
    "IQ3_S": _deq_iq3_s,
    "IQ1_S": _deq_iq1_s,
    "IQ1_M": _deq_iq1_m,
    "TQ1_0": _deq_tq1_0,
    "TQ2_0": _deq_tq2_0,
    "MXFP4": _deq_mxfp4,
    "NVFP4": _deq_nvfp4,
    "F64": _deq_plain(torch.float64),
    "I8": _deq_plain(torch.int8),
    "I16": _deq_plain(torch.int16),
    "I32": _deq_plain(torch.int32),
    "I64": _deq_plain(torch.int64),
    "Q8_K": _deq_q8_k,
    "Q1_0": _deq_q1_0,
}

# Types stored as plain values (no blocks): a loader places them as ordinary tensors of the load dtype.
PLAIN_QTYPES = frozenset({"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"})

SUPPORTED_QTYPES: tuple[str, ...] = tuple(DEQUANTIZERS)

# Types whose decoder can also run in a 16-bit compute dtype, as diffusers' and ComfyUI-GGUF's forward
# passes do: half the memory traffic of decoding in float32 and casting, at 16-bit rounding per operation.
_COMPUTE_DTYPE_TYPES = frozenset(
    {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
)


def dequantize(
    raw: torch.Tensor,
    qtype: str | int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    exact: bool = True,
) -> torch.Tensor:
    """Decode packed GGML data to a ``dtype`` tensor of logical ``shape`` on ``raw``'s device.

    ``raw`` is the tensor's bytes as ``uint8`` in any shape (e.g. ``(rows, bytes_per_row)``); for
    F32/F16/BF16 a typed tensor is accepted too.  Decoding is done in float32, then cast to ``dtype``
    (bit for bit gguf-py's result). ``exact=False`` lets the common types decode straight in a 16-bit
    ``dtype`` (the forward pass's choice: faster, within 16-bit rounding of the exact result).
    """
    name = qtype_name(qtype)
    shape = tuple(int(s) for s in shape)
    fn = DEQUANTIZERS.get(name)
    if fn is None:
        raise NotImplementedError(
            f"dequantization of GGML type {name} is not supported; supported: {', '.join(SUPPORTED_QTYPES)}"
        )
    block_size, type_size = block_info(name)
    if raw.dtype != torch.uint8:
        if block_size != 1 or raw.element_size() != type_size or not raw.is_floating_point():
            raise ValueError(f"{name} data must be given as uint8 bytes, got a {raw.dtype} tensor")
        if raw.numel() != math.prod(shape):
            raise ValueError(f"{name} tensor has {raw.numel()} elements, expected shape {shape}")
        return raw.reshape(shape).to(dtype)
    # Only the element count must be whole blocks: ComfyUI's orig_shape tensors have odd last dims.
    nbytes = blocks_nbytes(math.prod(shape), name)
    if raw.numel() != nbytes:
        raise ValueError(f"{name} data for shape {shape} must be {nbytes} bytes, got {raw.numel()}")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype, device=raw.device)
    blocks = raw.reshape(-1, type_size)
    if not exact and dtype in (torch.bfloat16, torch.float16) and name in _COMPUTE_DTYPE_TYPES:
        return fn(blocks, dtype).reshape(shape)
    return fn(blocks).reshape(shape).to(dtype)
