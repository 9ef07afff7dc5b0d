"""Hand-written Triton dequantization kernels: the weight-only fast path without a compiled call's overhead.

Each kernel reads a layer's packed weight once and writes the dense weight once (one launch, ~20 us of host
time, against ~0.1-0.25 ms for a ``torch.compile``d function's guards and wrappers); cuBLAS then runs the
matmul. Every kernel reproduces its reference's arithmetic (the same operations in the same precision, so
the same roundings): quanto's 8-bit rows and 2/4-bit packed groups, NNCF's float16 ``(q - zero) * scale``,
and ggml's Q8_0 / Q4_0 / Q4_1 blocks in the compute dtype. Where a kernel does not cover a layout it
returns None and the caller falls back to the compiled function (``fused.py``).

Kernels are built on first use: for CUDA tensors compiled, for CPU tensors (tests only, ``KERNEL_DEVICES``)
by Triton's interpreter, which runs the same kernel code with numpy (it rounds float32 -> bfloat16 by
truncation, so CPU checks of bfloat16 output allow one ulp; float16 and float32 are exact there too).
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import torch

# Devices whose tensors take the hand-written kernels (tests add "cpu": Triton's interpreter).
KERNEL_DEVICES = {"cuda"}
BLOCK = 1024  # columns per program of a row-wise kernel
ROWS = 32  # packed rows / ggml blocks per program of a block-wise kernel

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.cache
def _have_triton(device_type: str) -> bool:
    try:
        if device_type == "cuda":
            from torch.utils._triton import has_triton

            return has_triton()
        import triton  # noqa: F401  (the interpreter runs on the CPU)

        return True
    except ImportError:
        return False


def available(t: torch.Tensor) -> bool:
    """Whether ``t``'s device takes the hand-written kernels here."""
    return t.device.type in KERNEL_DEVICES and _have_triton(t.device.type)


@functools.cache
def _build(interpret: bool) -> SimpleNamespace:
    """The kernels, compiled for the GPU or interpreted (``TRITON_INTERPRET`` is read as they are defined)."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        return _define()
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


def _define() -> SimpleNamespace:
    import triton
    import triton.language as tl

    @triton.jit
    def grouped(
        q_ptr,
        s_ptr,
        z_ptr,
        out_ptr,
        cols,
        groups,
        GROUP_COLS: tl.constexpr,
        BITS: tl.constexpr,
        SYM_OFFSET: tl.constexpr,
        HAS_ZERO: tl.constexpr,
        MATH: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # out[r, c] = round_MATH((q - zero) * scale) for the group (r, c // GROUP_COLS; GROUP_COLS 0: one group a
        # row): quanto's 8-bit rows (MATH the scale's dtype) and NNCF's int8 / int4 (MATH float16, then cast
        # as NNCF does).
        # One program per row and BLOCK columns: no per-element division by a runtime value.
        r = tl.program_id(0)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = c < cols
        i = r.to(tl.int64) * cols + c
        if GROUP_COLS == 0:
            g = r + 0 * c
        else:
            g = r * groups + c // GROUP_COLS
        if BITS == 8:
            q = tl.load(q_ptr + i, mask=live).to(tl.float32)  # no `other`: float8 takes no int fill
        else:  # two per byte, element 2k in the low nibble
            byte = tl.load(q_ptr + (i >> 1), mask=live, other=0).to(tl.int32)
            q = ((byte >> ((i & 1) * 4).to(tl.int32)) & 15).to(tl.float32) - SYM_OFFSET
        if HAS_ZERO:
            if BITS == 8:
                z = tl.load(z_ptr + r).to(tl.float32)
            else:
                zb = tl.load(z_ptr + (g >> 1), mask=live, other=0).to(tl.int32)
                z = ((zb >> ((g & 1) * 4)) & 15).to(tl.float32)
            q = q - z
        s = tl.load(s_ptr + g, mask=live, other=0).to(tl.float32)
        w = (q * s).to(MATH)
        tl.store(out_ptr + i, w.to(out_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def quanto_bits(
        p_ptr,
        s_ptr,
        sh_ptr,
        out_ptr,
        packed_rows,
        group_rows,
        GROUP: tl.constexpr,
        BITS: tl.constexpr,
        INT_SHIFT: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        # quanto's packed 2/4-bit layout: weight viewed as [group_rows, GROUP]; bit field f of packed row p is
        # grouped row p + f * packed_rows; w = scale * q - shift (float shift) or scale * (q - shift) (int).
        # One program per ROWS packed rows, each byte read once and its 8 / BITS values written.
        p = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
        c = tl.arange(0, GROUP)[None, :]
        live = p < packed_rows
        byte = tl.load(p_ptr + p.to(tl.int64) * GROUP + c, mask=live, other=0).to(tl.int32)
        for f in tl.static_range(8 // BITS):
            r = p + f * packed_rows
            ok = r < group_rows
            q = ((byte >> (BITS * f)) & ((1 << BITS) - 1)).to(tl.float32)
            s = tl.load(s_ptr + r, mask=ok, other=0)
            sh = tl.load(sh_ptr + r, mask=ok, other=0)
            if INT_SHIFT:
                w = (s.to(tl.float32) * (q - sh.to(tl.float32))).to(s.dtype)
            else:
                w = (s.to(tl.float32) * q).to(s.dtype)
                w = (w.to(tl.float32) - sh.to(tl.float32)).to(s.dtype)
            tl.store(out_ptr + r.to(tl.int64) * GROUP + c, w.to(out_ptr.dtype.element_ty), mask=ok & live)

    @triton.jit
    def ggml_blocks(
        b_ptr,
        out_ptr,
        n_blocks,
        TYPE: tl.constexpr,
        TYPE_SIZE: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        # ggml blocks of 32 elements decoded in the output dtype as the forward's reference does: the fp16
        # scales cast to it, then one rounding per operation. TYPE 0: Q8_0, 1: Q4_0, 2: Q4_1. One program per
        # ROWS blocks.
        b = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
        k = tl.arange(0, 32)[None, :]
        live = b < n_blocks
        base = b.to(tl.int64) * TYPE_SIZE
        dt = out_ptr.dtype.element_ty
        lo = tl.load(b_ptr + base, mask=live, other=0).to(tl.uint16)
        hi = tl.load(b_ptr + base + 1, mask=live, other=0).to(tl.uint16)
        d = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32).to(dt).to(tl.float32)
        if TYPE == 0:
            q = tl.load(b_ptr + base + 2 + k, mask=live, other=0).to(tl.int8, bitcast=True).to(tl.float32)
            w = (q * d).to(dt)
        else:
            start = 2 if TYPE == 1 else 4
            byte = tl.load(b_ptr + base + start + (k & 15), mask=live, other=0).to(tl.int32)
            q = ((byte >> ((k >> 4) * 4)) & 15).to(tl.float32)
            if TYPE == 1:
                w = (d * (q - 8)).to(dt)
            else:
                mlo = tl.load(b_ptr + base + 2, mask=live, other=0).to(tl.uint16)
                mhi = tl.load(b_ptr + base + 3, mask=live, other=0).to(tl.uint16)
                m = (mlo | (mhi << 8)).to(tl.float16, bitcast=True).to(tl.float32).to(dt).to(tl.float32)
                w = ((d * q).to(dt).to(tl.float32) + m).to(dt)
        tl.store(out_ptr + b.to(tl.int64) * 32 + k, w, mask=live)

    return SimpleNamespace(grouped=grouped, quanto_bits=quanto_bits, ggml_blocks=ggml_blocks, tl=tl)


def _kernels(t: torch.Tensor) -> SimpleNamespace:
    return _build(t.device.type != "cuda")


def _cdiv(n: int, d: int) -> int:
    return (n + d - 1) // d


def _block(cols: int) -> int:
    """Columns per program: BLOCK, or the power of two that covers a narrower row."""
    return min(BLOCK, 1 << max(cols - 1, 1).bit_length())


_MATH = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def quanto_bytes(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """quanto's 8-bit weight (int8 / float8 codes ``[rows, cols]``, ``scale`` ``[rows, 1]``): ``scale * q``."""
    if data.dim() != 2 or not data.is_contiguous() or scale.numel() != data.shape[0]:
        return None
    if scale.dtype not in _OUT_DTYPES or not scale.is_contiguous():
        return None
    k = _kernels(data)
    out = torch.empty(data.shape, dtype=scale.dtype, device=data.device)
    rows, cols = data.shape
    block = _block(cols)
    k.grouped[(rows, _cdiv(cols, block))](
        data, scale, scale, out, cols, 1, GROUP_COLS=0, BITS=8, SYM_OFFSET=0, HAS_ZERO=False,
        MATH=getattr(k.tl, _MATH[scale.dtype]), BLOCK=block,
    )  # fmt: skip
    return out


def quanto_bits(
    packed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, bits: int, rows: int, cols: int
) -> torch.Tensor | None:
    """quanto's packed 2/4-bit weight (see ``backends.quanto._bits_weight``)."""
    group_rows = scale.shape[0]
    if packed.dim() != 2 or not (packed.is_contiguous() and scale.is_contiguous() and shift.is_contiguous()):
        return None
    group = packed.shape[1]
    if scale.dtype not in _OUT_DTYPES or group_rows * group != rows * cols or shift.numel() != group_rows:
        return None
    if group & (group - 1):  # a program covers one packed row: a power-of-two width
        return None
    k = _kernels(packed)
    out = torch.empty((rows, cols), dtype=scale.dtype, device=packed.device)
    k.quanto_bits[(_cdiv(packed.shape[0], ROWS),)](
        packed, scale, shift, out, packed.shape[0], group_rows,
        GROUP=group, BITS=bits, INT_SHIFT=not shift.is_floating_point(), ROWS=ROWS,
    )  # fmt: skip
    return out


def nncf(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: int,
    rows: int,
    cols: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """NNCF's weight (see ``backends.nncf_ops.decompress``): ``(q - zero) * scale`` in float16, then ``dtype``."""
    groups = scale.shape[1]
    if dtype not in _OUT_DTYPES or cols % groups or not weight.is_contiguous() or not scale.is_contiguous():
        return None
    if zero_point is not None and not zero_point.is_contiguous():
        return None
    k = _kernels(weight)
    out = torch.empty((rows, cols), dtype=dtype, device=weight.device)
    half_scale = scale.view(torch.float16)
    block = _block(cols)
    k.grouped[(rows, _cdiv(cols, block))](
        weight, half_scale, half_scale if zero_point is None else zero_point, out, cols, groups,
        GROUP_COLS=0 if groups == 1 else cols // groups, BITS=bits,
        SYM_OFFSET=8 if bits == 4 and zero_point is None else 0, HAS_ZERO=zero_point is not None,
        MATH=k.tl.float16, BLOCK=block,
    )  # fmt: skip
    return out


GGML_TYPES = {"Q8_0": (0, 34), "Q4_0": (1, 18), "Q4_1": (2, 20)}


def ggml(qtype: str, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """ggml blocks (``uint8`` ``[n_blocks, type_size]``) of Q8_0 / Q4_0 / Q4_1 decoded in a 16-bit ``dtype``
    as the GGUF forward's reference does (other types and float32 output: None)."""
    if qtype not in GGML_TYPES or dtype not in (torch.bfloat16, torch.float16) or not blocks.is_contiguous():
        return None
    kind, type_size = GGML_TYPES[qtype]
    if blocks.dtype != torch.uint8 or blocks.shape[-1] != type_size:
        return None
    k = _kernels(blocks)
    out = torch.empty((blocks.shape[0], 32), dtype=dtype, device=blocks.device)
    n = blocks.shape[0]
    k.ggml_blocks[(_cdiv(n, ROWS),)](blocks, out, n, TYPE=kind, TYPE_SIZE=type_size, ROWS=ROWS)
    return out
