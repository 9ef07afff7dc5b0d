"""Hand-written Triton dequantization kernels: the weight-only fast path without a compiled call's overhead.

Each kernel reads a layer's packed weight once and writes the dense weight once (one launch, ~20 us of host
time, against ~0.1-0.25 ms for a ``torch.compile``d function's guards and wrappers); cuBLAS then runs the
matmul. Every kernel reproduces its reference's arithmetic (the same operations in the same precision, so the
same roundings): quanto's 8-bit rows and 2/4-bit packed groups, NNCF's float16 ``(q - zero) * scale``,
bitsandbytes' int8 rows (``backends/bnb_int8.py``), ggml's Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 blocks and Q4_K /
Q5_K / Q6_K super-blocks in the compute dtype; and compute=fp8 / int8's per-token activation quantization and
int8 epilogue (``compute.py``). Where a kernel does not cover a layout it returns None and the caller falls
back to the compiled function (``fused.py``).

Kernels are built on first use: for CUDA tensors compiled, for CPU tensors (tests only, ``KERNEL_DEVICES``)
by Triton's interpreter, which runs the same kernel code with numpy (it rounds float32 -> bfloat16 by
truncation, so CPU checks of bfloat16 output allow one ulp; float16 and float32 are exact there too).
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import torch
from torch._subclasses.fake_tensor import FakeTensor  # loaded by `import torch` already
from torch._subclasses.functional_tensor import FunctionalTensor

# Devices whose tensors take the hand-written kernels (tests add "cpu": Triton's interpreter).
KERNEL_DEVICES = {"cuda"}
BLOCK = 1024  # columns per program of a row-wise kernel
ROWS = 32  # packed rows per program of quanto's packed-bits kernel

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.cache
def have_triton(device_type: str) -> bool:
    try:
        if device_type == "cuda":
            from torch.utils._triton import has_triton

            return has_triton()
        import triton  # noqa: F401  (the interpreter runs on the CPU)

        return True
    except ImportError:
        return False


_TRACING_TENSORS = (FakeTensor, FunctionalTensor)


def tracing(t: torch.Tensor) -> bool:
    """Whether ``t`` flows through ``torch.compile``'s tracing: inside a compiled region, or one of the fake /
    functional stand-ins it runs an op with (dynamo runs a call it does not inline, such as a tensor
    subclass's ``__torch_function__``, on fake tensors, where torch 2.11 does not report compiling; and a
    ``triton_op`` is decomposed into a graph on functional ones)."""
    return torch.compiler.is_compiling() or isinstance(t, _TRACING_TENSORS)


def available(t: torch.Tensor) -> bool:
    """Whether ``t``'s device takes the hand-written kernels here."""
    return t.device.type in KERNEL_DEVICES and have_triton(t.device.type)


@functools.cache
def _build(interpret: bool) -> SimpleNamespace:
    """The kernels, compiled for the GPU or interpreted (``TRITON_INTERPRET`` is read as they are defined)."""
    import triton.language  # noqa: F401  (imported as compiled code: only the kernels below are interpreted)

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
        SCALE_MUL: tl.constexpr,
        MATH: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # out[r, c] = round_MATH((q - zero) * scale) for the group (r, c // GROUP_COLS; GROUP_COLS 0: one group a
        # row): quanto's 8-bit rows (MATH the scale's dtype), NNCF's int8 / int4 (MATH float16, then cast
        # as NNCF does) and bitsandbytes' int8 rows (the float32 scale times SCALE_MUL, 1/127, first).
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
        if SCALE_MUL != 1.0:
            s = s * SCALE_MUL
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
        h_ptr,
        out_ptr,
        n_blocks,
        TYPE: tl.constexpr,
        TYPE_SIZE: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        # ggml blocks of 32 elements decoded in the output dtype as the forward's reference does: the fp16
        # scales cast to it, then one rounding per operation. TYPE 0: Q8_0, 1: Q4_0, 2: Q4_1, 3: Q5_0, 4: Q5_1.
        # One program per ROWS blocks. h_ptr: the same bytes as float16 (every block and scale offset is even).
        b = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
        live = b < n_blocks
        base = b.to(tl.int64) * TYPE_SIZE
        dt = out_ptr.dtype.element_ty
        half = base // 2  # the block's first float16
        d = tl.load(h_ptr + half, mask=live, other=0).to(tl.float32).to(dt).to(tl.float32)
        if TYPE == 0:
            k = tl.arange(0, 32)[None, :]
            q = tl.load(b_ptr + base + 2 + k, mask=live, other=0).to(tl.int8, bitcast=True).to(tl.float32)
            tl.store(out_ptr + b.to(tl.int64) * 32 + k, (q * d).to(dt), mask=live)
        else:
            # the nibbles start after the scales (and a 5-bit type's 4 bytes of high bits); byte k holds
            # element k (low nibble) and element k + 16 (high nibble): each byte is read once
            k = tl.arange(0, 16)[None, :]
            start = 2 if TYPE == 1 else 4 if TYPE == 2 else 6 if TYPE == 3 else 8
            byte = tl.load(b_ptr + base + start + k, mask=live, other=0).to(tl.int32)
            q_lo = byte & 15
            q_hi = byte >> 4
            if TYPE >= 3:  # bit e of the little-endian uint32 before the nibbles: bytes 0-1 then 2-3
                bits = start - 4 + (k >> 3)
                lo_bits = tl.load(b_ptr + base + bits, mask=live, other=0).to(tl.int32)
                hi_bits = tl.load(b_ptr + base + bits + 2, mask=live, other=0).to(tl.int32)
                q_lo = q_lo | (((lo_bits >> (k & 7)) & 1) << 4)
                q_hi = q_hi | (((hi_bits >> (k & 7)) & 1) << 4)
            q_lo = q_lo.to(tl.float32)
            q_hi = q_hi.to(tl.float32)
            if TYPE == 1:
                w_lo = (d * (q_lo - 8)).to(dt)
                w_hi = (d * (q_hi - 8)).to(dt)
            elif TYPE == 3:
                w_lo = (d * (q_lo - 16)).to(dt)
                w_hi = (d * (q_hi - 16)).to(dt)
            else:
                m = tl.load(h_ptr + half + 1, mask=live, other=0).to(tl.float32).to(dt).to(tl.float32)
                w_lo = ((d * q_lo).to(dt).to(tl.float32) + m).to(dt)
                w_hi = ((d * q_hi).to(dt).to(tl.float32) + m).to(dt)
            row = out_ptr + b.to(tl.int64) * 32 + k
            tl.store(row, w_lo, mask=live)
            tl.store(row + 16, w_hi, mask=live)

    @triton.jit
    def k_blocks(
        b_ptr,
        h_ptr,
        out_ptr,
        n_blocks,
        TYPE: tl.constexpr,
        TYPE_SIZE: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        # ggml's 256-element super-blocks decoded as the forward's reference does (backends/gguf/dequant.py:
        # the fp16 scales cast to the output dtype, one rounding per operation). TYPE 0: Q4_K, 1: Q5_K,
        # 2: Q6_K. One program per ROWS super-blocks, as [ROWS, 4, 32] tiles: every packed byte is read once
        # and yields the elements it holds, and each scale is read once per tile row of 32 (or 16) elements.
        b = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None, None]
        i = tl.arange(0, 4)[None, :, None]
        lane = tl.arange(0, 32)[None, None, :]
        live = b < n_blocks
        base = b.to(tl.int64) * TYPE_SIZE
        half = base // 2  # the block's first float16
        dt = out_ptr.dtype.element_ty
        row = out_ptr + b.to(tl.int64) * 256
        if TYPE == 2:
            # Q6_K: half n = i // 2 of the super-block (128 elements) from 64 bytes of low nibbles at
            # n * 64, 32 bytes of 2-bit pairs at 128 + n * 32 and int8 scales (one per 16) at 192; byte
            # n * 64 + 32 * (i % 2) + lane holds elements n * 128 + 32 * (i % 2) + lane (low nibble) and + 64
            # (high nibble); the high-bit byte n * 32 + lane holds pairs for the 4 elements n * 128 + lane + 32 c
            n = i >> 1
            odd = i & 1
            low = tl.load(b_ptr + base + n * 64 + odd * 32 + lane, mask=live, other=0).to(tl.int32)
            high = tl.load(b_ptr + base + 128 + n * 32 + lane, mask=live, other=0).to(tl.int32)
            d = tl.load(h_ptr + half + 104, mask=live, other=0).to(tl.float32).to(dt).to(tl.float32)
            e_lo = n * 128 + odd * 32 + lane  # element of the low nibble; the high nibble's is e_lo + 64
            q_lo = ((low & 15) | (((high >> (odd * 2)) & 3) << 4)) - 32
            q_hi = ((low >> 4) | (((high >> (odd * 2 + 4)) & 3) << 4)) - 32
            sc_lo = tl.load(b_ptr + base + 192 + (e_lo >> 4), mask=live, other=0).to(tl.int8, bitcast=True)
            sc_hi = tl.load(b_ptr + base + 196 + (e_lo >> 4), mask=live, other=0).to(tl.int8, bitcast=True)
            d_lo = (d * sc_lo.to(tl.float32)).to(dt).to(tl.float32)
            d_hi = (d * sc_hi.to(tl.float32)).to(dt).to(tl.float32)
            tl.store(row + e_lo, (d_lo * q_lo.to(tl.float32)).to(dt), mask=live)
            tl.store(row + e_lo + 64, (d_hi * q_hi.to(tl.float32)).to(dt), mask=live)
        else:
            # Q4_K / Q5_K: byte i * 32 + lane of the nibbles holds element lane of sub-block 2i (low nibble)
            # and of sub-block 2i + 1 (high nibble)
            d = tl.load(h_ptr + half, mask=live, other=0).to(tl.float32).to(dt).to(tl.float32)
            dmin = tl.load(h_ptr + half + 1, mask=live, other=0).to(tl.float32).to(dt).to(tl.float32)
            start = 16 if TYPE == 0 else 48  # Q5_K: 32 bytes of high bits first
            byte = tl.load(b_ptr + base + start + i * 32 + lane, mask=live, other=0).to(tl.int32)
            if TYPE == 1:  # bit j of byte lane of the high bits: sub-block j's fifth bit
                high = tl.load(b_ptr + base + 16 + lane, mask=live, other=0).to(tl.int32)
            for h in tl.static_range(2):
                j = 2 * i + h  # the sub-block: its 6-bit scale and min packed in the 12 bytes at offset 4
                first = j < 4
                s_lo = tl.load(b_ptr + base + 4 + (j & 3), mask=live, other=0).to(tl.int32)
                m_lo = tl.load(b_ptr + base + 8 + (j & 3), mask=live, other=0).to(tl.int32)
                both = tl.load(b_ptr + base + 12 + (j & 3), mask=live, other=0).to(tl.int32)
                sc = tl.where(first, s_lo & 63, (both & 15) | ((s_lo >> 2) & 48)).to(tl.float32)
                mn = tl.where(first, m_lo & 63, (both >> 4) | ((m_lo >> 2) & 48)).to(tl.float32)
                q = (byte >> (4 * h)) & 15
                if TYPE == 1:
                    q = q | (((high >> j) & 1) << 4)
                dl = (d * sc).to(dt).to(tl.float32)
                ml = (dmin * mn).to(dt).to(tl.float32)
                w = ((dl * q.to(tl.float32)).to(dt).to(tl.float32) - ml).to(dt)
                tl.store(row + j * 32 + lane, w, mask=live)

    @triton.jit
    def quantize_rows(
        x_ptr,
        q_ptr,
        s_ptr,
        cols,
        TOP: tl.constexpr,
        INT8: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # compute.quantize_rows in one pass over a row (one program a row, the row in registers): the float32
        # absmax times 1 / TOP, the row divided by it, clamped, then rounded half to even (int8) or cast
        # round-to-nearest (float8 e4m3).
        r = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        live = c < cols
        x = tl.load(x_ptr + r * cols + c, mask=live, other=0).to(tl.float32)
        # tl.max's own combine through tl.reduce: Triton's interpreter cannot call tl.max (defined before the
        # interpreter was switched on) but knows this combine
        scale = tl.maximum(tl.reduce(tl.abs(x), 0, tl.standard._elementwise_max), 1e-12) * (1.0 / TOP)
        y = tl.math.div_rn(x, scale)  # IEEE division as torch's (Triton's `/` is the approximate one)
        y = tl.minimum(tl.maximum(y, -TOP), TOP)  # clamped before rounding: TOP is whole, so the same
        if INT8:
            # rounded half to even as torch.round: adding and taking away 1.5 * 2**23 leaves no fraction bits
            y = (y + 12582912.0) - 12582912.0
        else:
            # rounded half to even onto the e4m3 grid here, so the cast below is exact (the GPU's cast rounds
            # the same way; Triton's interpreter rounds carries wrongly): normal values keep 3 mantissa bits
            # of the float32 pattern, subnormal ones (under 2**-6) multiples of 2**-9
            bits = y.to(tl.int32, bitcast=True)
            normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
            tiny = (y + 24576.0) - 24576.0
            tiny = tl.where(tiny == 0, y * 0, tiny)  # a negative value rounded to zero stays -0, as the cast
            y = tl.where(tl.abs(y) < 0.015625, tiny, normal)
        tl.store(q_ptr + r * cols + c, y.to(q_ptr.dtype.element_ty), mask=live)
        tl.store(s_ptr + r, scale)

    @triton.jit
    def scale_rows_cols(
        acc_ptr,
        xs_ptr,
        ws_ptr,
        b_ptr,
        out_ptr,
        cols,
        HAS_BIAS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # the int8 matmul's epilogue as compute.w8a8_kernel writes it: (acc * x_scale * w_scale) rounded to the
        # output dtype, then the bias added in it.
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = c < cols
        acc = tl.load(acc_ptr + r * cols + c, mask=live, other=0).to(tl.float32)
        w = tl.load(ws_ptr + c, mask=live, other=0)
        out = (acc * tl.load(xs_ptr + r) * w).to(out_ptr.dtype.element_ty)
        if HAS_BIAS:
            bias = tl.load(b_ptr + c, mask=live, other=0).to(out_ptr.dtype.element_ty)
            out = (out.to(tl.float32) + bias.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + r * cols + c, out, mask=live)

    @triton.jit
    def qkx2_search(
        x_ptr,
        w_ptr,
        num_ptr,
        levels_ptr,
        scale_ptr,
        min_ptr,
        groups,
        N: tl.constexpr,
        NMAX: tl.constexpr,
        STEPS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # ggml's make_qkx2_quants (use_mad false) as backends/gguf/quantize.py's torch port computes it, on
        # element-major x and weights [N, groups]: one program per BLOCK groups, every sum one element after
        # another and every operation rounded to float32 (launched without fp fusion, divisions IEEE). The
        # candidates are tried in order, each from the best min so far; the chosen one's levels are recomputed
        # at the end from its inverse scale and the min it was measured from. Levels round as ggml's
        # nearest_int: the float32 sum with 1.5 * 2**23 read as an integer (half to even, wrapping as in C).
        g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = g < groups
        x = tl.load(x_ptr + g, mask=live, other=0.0)
        w = tl.load(w_ptr + g, mask=live, other=0.0)
        low = x
        high = x
        sum_w = w
        sum_x = w * x
        for e in range(1, N):
            x = tl.load(x_ptr + e * groups + g, mask=live, other=0.0)
            w = tl.load(w_ptr + e * groups + g, mask=live, other=0.0)
            low = tl.minimum(low, x, propagate_nan=tl.PropagateNan.ALL)  # a NaN spreads, as in torch's amin
            high = tl.maximum(high, x, propagate_nan=tl.PropagateNan.ALL)
            sum_w = sum_w + w
            sum_x = sum_x + w * x
        low = tl.where(low > 0, 0.0, low)
        flat = high == low
        flat_min = low
        ones = tl.full([BLOCK], 1.0, tl.float32)
        iscale = tl.math.div_rn(ones * NMAX, high - low)
        scale = tl.math.div_rn(ones, iscale)
        best_error = tl.full([BLOCK], 0.0, tl.float32)
        for e in range(N):
            x = tl.load(x_ptr + e * groups + g, mask=live, other=0.0)
            w = tl.load(w_ptr + e * groups + g, mask=live, other=0.0)
            v = iscale * (x - low) + 12582912.0
            lf = tl.minimum(tl.maximum((v.to(tl.int32, bitcast=True) & 0x7FFFFF) - 0x400000, 0), NMAX).to(
                tl.float32
            )
            diff = scale * lf + low - x
            best_error = best_error + w * (diff * diff)
        best_iscale = iscale
        best_from = low
        for i in range(STEPS):
            cand = tl.math.div_rn(ones * tl.load(num_ptr + i), high - low)
            sum_l = tl.full([BLOCK], 0.0, tl.float32)
            sum_l2 = tl.full([BLOCK], 0.0, tl.float32)
            sum_xl = tl.full([BLOCK], 0.0, tl.float32)
            for e in range(N):
                x = tl.load(x_ptr + e * groups + g, mask=live, other=0.0)
                w = tl.load(w_ptr + e * groups + g, mask=live, other=0.0)
                v = cand * (x - low) + 12582912.0
                lf = tl.minimum(tl.maximum((v.to(tl.int32, bitcast=True) & 0x7FFFFF) - 0x400000, 0), NMAX).to(
                    tl.float32
                )
                wl = w * lf
                sum_l = sum_l + wl
                sum_l2 = sum_l2 + wl * lf
                sum_xl = sum_xl + wl * x
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = tl.math.div_rn(sum_w * sum_xl - sum_x * sum_l, det)
            this_min = tl.math.div_rn(sum_l2 * sum_x - sum_l * sum_xl, det)
            clipped = this_min > 0
            this_scale = tl.where(clipped, tl.math.div_rn(sum_xl, sum_l2), this_scale)
            this_min = tl.where(clipped, 0.0, this_min)
            error = tl.full([BLOCK], 0.0, tl.float32)
            for e in range(N):
                x = tl.load(x_ptr + e * groups + g, mask=live, other=0.0)
                w = tl.load(w_ptr + e * groups + g, mask=live, other=0.0)
                v = cand * (x - low) + 12582912.0
                lf = tl.minimum(tl.maximum((v.to(tl.int32, bitcast=True) & 0x7FFFFF) - 0x400000, 0), NMAX).to(
                    tl.float32
                )
                diff = this_scale * lf + this_min - x
                error = error + w * (diff * diff)
            take = (det > 0) & (error < best_error)  # strictly better, as in C
            best_error = tl.where(take, error, best_error)
            best_iscale = tl.where(take, cand, best_iscale)
            best_from = tl.where(take, low, best_from)
            scale = tl.where(take, this_scale, scale)
            low = tl.where(take, this_min, low)
        for e in range(N):
            x = tl.load(x_ptr + e * groups + g, mask=live, other=0.0)
            v = best_iscale * (x - best_from) + 12582912.0
            level = tl.minimum(tl.maximum((v.to(tl.int32, bitcast=True) & 0x7FFFFF) - 0x400000, 0), NMAX)
            tl.store(levels_ptr + e * groups + g, tl.where(flat, 0, level), mask=live)
        tl.store(scale_ptr + g, tl.where(flat, 0.0, scale), mask=live)
        tl.store(min_ptr + g, -tl.where(flat, flat_min, low), mask=live)

    @triton.jit
    def qx_search(
        x_ptr,
        num_ptr,
        levels_ptr,
        scale_ptr,
        groups,
        eps,
        N: tl.constexpr,
        NMAX: tl.constexpr,
        CANDIDATES: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # ggml's make_qx_quants (rmse_type 1, no quant weights) as the torch port computes it, on element-major
        # x [N, groups]: the candidate scales from the first value of largest magnitude, measured one after
        # another (sums in element order, float32 roundings, no fp fusion), the first candidate's scale unless
        # a later one is strictly better; levels (+ NMAX) recomputed from the chosen inverse scale.
        g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = g < groups
        amax = tl.full([BLOCK], 0.0, tl.float32)
        peak = tl.full([BLOCK], 0.0, tl.float32)
        for e in range(N):
            x = tl.load(x_ptr + e * groups + g, mask=live, other=0.0)
            # the first of largest magnitude, a NaN taken as largest (torch's argmax)
            bigger = (tl.abs(x) > amax) | ((x != x) & (amax == amax))
            amax = tl.where(bigger, tl.abs(x), amax)
            peak = tl.where(bigger, x, peak)
        zero = tl.abs(peak) < eps
        ones = tl.full([BLOCK], 1.0, tl.float32)
        scale = tl.full([BLOCK], 0.0, tl.float32)
        best = tl.full([BLOCK], 0.0, tl.float32)
        chosen = tl.full([BLOCK], 0.0, tl.float32)
        for k in tl.static_range(CANDIDATES):
            iscale = tl.math.div_rn(ones * tl.load(num_ptr + k), peak)
            sumlx = tl.full([BLOCK], 0.0, tl.float32)
            suml2 = tl.full([BLOCK], 0.0, tl.float32)
            for e in range(N):
                x = tl.load(x_ptr + e * groups + g, mask=live, other=0.0)
                v = iscale * x + 12582912.0
                lf = tl.minimum(
                    tl.maximum((v.to(tl.int32, bitcast=True) & 0x7FFFFF) - 0x400000, -NMAX), NMAX - 1
                ).to(tl.float32)
                w = x * x
                sumlx = sumlx + w * x * lf
                suml2 = suml2 + w * lf * lf
            if k == 0:
                scale = tl.where(suml2 != 0, tl.math.div_rn(sumlx, suml2), 0.0)
                best = scale * sumlx
                chosen = iscale
            else:
                take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
                scale = tl.where(take, tl.math.div_rn(sumlx, suml2), scale)
                best = tl.where(take, scale * sumlx, best)
                chosen = tl.where(take, iscale, chosen)
        for e in range(N):
            x = tl.load(x_ptr + e * groups + g, mask=live, other=0.0)
            v = chosen * x + 12582912.0
            level = (
                tl.minimum(tl.maximum((v.to(tl.int32, bitcast=True) & 0x7FFFFF) - 0x400000, -NMAX), NMAX - 1)
                + NMAX
            )
            tl.store(levels_ptr + e * groups + g, tl.where(zero, 0, level), mask=live)
        tl.store(scale_ptr + g, tl.where(zero, 0.0, scale), mask=live)

    return SimpleNamespace(
        grouped=grouped,
        quanto_bits=quanto_bits,
        ggml_blocks=ggml_blocks,
        k_blocks=k_blocks,
        quantize_rows=quantize_rows,
        scale_rows_cols=scale_rows_cols,
        qkx2_search=qkx2_search,
        qx_search=qx_search,
        tl=tl,
    )


def _kernels(t: torch.Tensor) -> SimpleNamespace | None:
    """The kernels for ``t``'s device; None while ``t`` is traced off CUDA (the interpreter needs real data)."""
    off_cuda = t.device.type != "cuda"
    if off_cuda and tracing(t):
        return None
    return _build(off_cuda)


# Compiled kernels by launch signature, each launched through its handle: the JIT's own launch binds and
# specializes every argument on each call (21 us of host time on the H200 against 9 through the handle,
# benchmarks/results/nvidia-h200/session9/probe-host-handle.json). The key holds everything Triton 3
# specializes a compile on, so a handle only ever runs arguments its compile was specialized for.
HANDLE_DEVICES = {"cuda"}  # where launches go through handles (a test adds "cpu" with a stand-in kernel)
# key -> (the handle's launcher for the key's grid, the constexpr values in the kernel's argument order)
_HANDLES: dict[tuple, tuple] = {}
_handles_work = True  # cleared for good if this Triton's handles take arguments differently


def _signature(args: tuple) -> list:
    """What Triton specializes a compile on, per runtime argument: a pointer's dtype and 16-byte alignment,
    an int's being 1 (a constant), a multiple of 16, 32 or 64 bits; other values as they are."""
    spec: list = []
    for value in args:
        if isinstance(value, torch.Tensor):
            spec += (value.dtype, value.data_ptr() % 16 == 0)
        elif type(value) is int:
            spec += (value == 1, value % 16 == 0, -(2**31) <= value < 2**31)
        else:
            spec.append(value)
    return spec


# Entries past this (a long process seeing ever new activation row counts) start the cache afresh.
MAX_HANDLES = 4096


def _launch(kernel, grid: tuple[int, ...], *args, num_warps: int | None = None, **constexprs) -> None:
    """``kernel[grid](*args, **constexprs)``, through the compiled handle on CUDA once the JIT compiled it."""
    global _handles_work
    options = {} if num_warps is None else {"num_warps": num_warps}
    if isinstance(args[0], _TRACING_TENSORS):
        # a triton_op decomposed into a compiled graph (gguf/nn.py, quanto_ops.py): the launch goes into the
        # graph, and Inductor's generated code makes it (no op dispatch, no Python of ours per call)
        torch.library.wrap_triton(kernel)[grid](*args, **constexprs, **options)
        return
    if not _handles_work or args[0].device.type not in HANDLE_DEVICES:
        kernel[grid](*args, **constexprs, **options)
        return
    key = (kernel, grid, args[0].device.index, num_warps, *constexprs.items(), *_signature(args))
    entry = _HANDLES.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **constexprs, **options)  # launched: what follows only caches
        try:
            tail = tuple(constexprs[name] for name in kernel.arg_names[len(args) :])
            launcher = compiled[(*grid, 1, 1)[:3]]
        except (TypeError, AttributeError, IndexError, KeyError):  # a Triton whose handles differ
            _handles_work = False
            return
        if len(_HANDLES) >= MAX_HANDLES:
            _HANDLES.clear()
        _HANDLES[key] = (launcher, tail)
        return
    launcher, tail = entry
    try:
        launcher(*args, *tail)
    except (TypeError, AttributeError, IndexError):  # raised while binding, before any launch
        _handles_work = False
        kernel[grid](*args, **constexprs, **options)


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
    if k is None:
        return None
    out = torch.empty(data.shape, dtype=scale.dtype, device=data.device)
    rows, cols = data.shape
    block = _block(cols)
    _launch(
        k.grouped, (rows, _cdiv(cols, block)),
        data, scale, scale, out, cols, 1, GROUP_COLS=0, BITS=8, SYM_OFFSET=0, HAS_ZERO=False, SCALE_MUL=1.0,
        MATH=getattr(k.tl, _MATH[scale.dtype]), BLOCK=block,
    )  # fmt: skip
    return out


# bitsandbytes' int8 row scale (SCB) is the row's absmax: the codes' step is SCB * (1 / 127)
BNB_INT8_STEP = 1.0 / 127.0


def bnb_int8(data: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """bitsandbytes' int8 weight (codes ``[rows, cols]``, float32 row absmax ``scb`` ``[rows]``) in ``dtype``:
    ``q * (scb * (1 / 127))`` rounded once (``backends.bnb_int8.int8_weight``)."""
    if data.dim() != 2 or not data.is_contiguous() or data.dtype != torch.int8 or dtype not in _OUT_DTYPES:
        return None
    if scb.dtype != torch.float32 or scb.numel() != data.shape[0] or not scb.is_contiguous():
        return None
    k = _kernels(data)
    if k is None:
        return None
    out = torch.empty(data.shape, dtype=dtype, device=data.device)
    rows, cols = data.shape
    block = _block(cols)
    _launch(
        k.grouped, (rows, _cdiv(cols, block)),
        data, scb, scb, out, cols, 1, GROUP_COLS=0, BITS=8, SYM_OFFSET=0, HAS_ZERO=False,
        SCALE_MUL=BNB_INT8_STEP, MATH=getattr(k.tl, _MATH[dtype]), BLOCK=block,
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
    if k is None:
        return None
    out = torch.empty((rows, cols), dtype=scale.dtype, device=packed.device)
    _launch(
        k.quanto_bits, (_cdiv(packed.shape[0], ROWS),),
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
    if k is None:
        return None
    out = torch.empty((rows, cols), dtype=dtype, device=weight.device)
    half_scale = scale.view(torch.float16)
    block = _block(cols)
    _launch(
        k.grouped, (rows, _cdiv(cols, block)),
        weight, half_scale, half_scale if zero_point is None else zero_point, out, cols, groups,
        GROUP_COLS=0 if groups == 1 else cols // groups, BITS=bits,
        SYM_OFFSET=8 if bits == 4 and zero_point is None else 0, HAS_ZERO=zero_point is not None,
        SCALE_MUL=1.0, MATH=k.tl.float16, BLOCK=block,
    )  # fmt: skip
    return out


GGML_TYPES = {"Q8_0": (0, 34), "Q4_0": (1, 18), "Q4_1": (2, 20), "Q5_0": (3, 22), "Q5_1": (4, 24)}
K_TYPES = {"Q4_K": (0, 144), "Q5_K": (1, 176), "Q6_K": (2, 210)}
# Blocks per program, from a sweep of the launch shapes on the H200 (benchmarks/probe_decode.py,
# results/nvidia-h200/session9/probe-decode-after-*.json): 4,096 elements a program fed the memory best
# for the 32-element types and Q4_K / Q5_K, 2,048 for Q6_K.
GGML_ROWS = 128
K_ROWS = {"Q4_K": 16, "Q5_K": 16, "Q6_K": 8}


# qtype -> (kernel TYPE, bytes a block, elements a block, blocks a program)
_GGML_PLANS = {
    **{qtype: (kind, size, 32, GGML_ROWS) for qtype, (kind, size) in GGML_TYPES.items()},
    **{qtype: (kind, size, 256, K_ROWS[qtype]) for qtype, (kind, size) in K_TYPES.items()},
}
_HALF_DTYPES = (torch.bfloat16, torch.float16)


def covers_ggml(qtype: str, dtype: torch.dtype) -> bool:
    """Whether :func:`ggml` decodes ``qtype`` blocks to ``dtype`` (given contiguous uint8 blocks)."""
    return qtype in _GGML_PLANS and dtype in _HALF_DTYPES


def ggml(qtype: str, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """ggml blocks of Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q4_K / Q5_K / Q6_K decoded in a 16-bit ``dtype`` as
    the GGUF forward's reference does (other types and float32 output: None). ``blocks``: ``uint8``
    ``[rows, k * type_size]`` (``[n_blocks, type_size]``, or a weight's packed rows), decoded to
    ``[rows, k * block elements]``."""
    plan = _GGML_PLANS.get(qtype)
    if plan is None or dtype not in _HALF_DTYPES or blocks.dtype != torch.uint8 or blocks.dim() != 2:
        return None
    kind, type_size, width, per_program = plan
    per_row, rest = divmod(blocks.shape[1], type_size)
    if rest or not blocks.is_contiguous():
        return None
    k = _kernels(blocks)
    if k is None:
        return None
    n = blocks.shape[0] * per_row
    out = torch.empty((blocks.shape[0], per_row * width), dtype=dtype, device=blocks.device)
    kernel = k.ggml_blocks if width == 32 else k.k_blocks
    halves = blocks.view(torch.float16)  # the fp16 scales read in place: type sizes and offsets are even
    grid = (_cdiv(n, per_program),)
    _launch(kernel, grid, blocks, halves, out, n, TYPE=kind, TYPE_SIZE=type_size, ROWS=per_program)
    return out


# The widest row quantize_rows keeps in one program's registers (a diffusion transformer's widest input is
# 4 x 3072; wider rows fall back to the caller's torch ops).
MAX_ROW = 1 << 15


def quantize_rows(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``compute.quantize_rows`` in one launch: ``x`` (M, K) contiguous, per-row (codes, float32 scales
    ``(M, 1)``); None where not covered."""
    if x.dim() != 2 or not x.is_contiguous() or x.dtype not in _OUT_DTYPES or x.shape[1] > MAX_ROW:
        return None
    k = _kernels(x)
    if k is None:
        return None
    rows, cols = x.shape
    fp8 = kind == "fp8"
    codes = torch.empty(x.shape, dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block = 1 << max(cols - 1, 1).bit_length()  # the whole row
        _launch(
            k.quantize_rows, (rows,),
            x, codes, scales, cols, TOP=448.0 if fp8 else 127.0, INT8=not fp8, BLOCK=block,
            num_warps=8 if block >= 4096 else 4,
        )  # fmt: skip
    return codes, scales


def scale_int_mm(
    acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, dtype
) -> torch.Tensor | None:
    """``(acc * x_scale * w_scale).to(dtype) + bias`` for an int32 matmul result ``acc`` (M, N), float32
    ``x_scale`` (M, 1) and ``w_scale`` (N,), in one launch; None where not covered."""
    if acc.dim() != 2 or not acc.is_contiguous() or dtype not in _OUT_DTYPES:
        return None
    if not (x_scale.is_contiguous() and w_scale.is_contiguous()) or x_scale.dtype != torch.float32:
        return None
    if w_scale.dtype != torch.float32 or (bias is not None and not bias.is_contiguous()):
        return None
    k = _kernels(acc)
    if k is None:
        return None
    rows, cols = acc.shape
    out = torch.empty((rows, cols), dtype=dtype, device=acc.device)
    if rows:
        block = _block(cols)
        _launch(
            k.scale_rows_cols, (rows, _cdiv(cols, block)),
            acc, x_scale, w_scale, w_scale if bias is None else bias, out, cols,
            HAS_BIAS=bias is not None, BLOCK=block,
        )  # fmt: skip
    return out


# Groups per program of the K-quant searches (one group a lane; each program's x and weights stay in cache).
SEARCH_BLOCK = 128


def make_qkx2_quants(
    x: torch.Tensor, weights: torch.Tensor, nmax: int, numerators: list[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``backends.gguf.quantize._make_qkx2_quants`` in one launch: element-major float32 ``x`` and ``weights``
    ``(n, groups)`` -> (levels int32 ``(n, groups)``, scale, the min), bit for bit the torch port; the
    candidate ``numerators`` as the port computes them. None where not covered."""
    if x.dtype != torch.float32 or weights.dtype != torch.float32 or x.shape != weights.shape or x.dim() != 2:
        return None
    if not (x.is_contiguous() and weights.is_contiguous()):
        return None
    k = _kernels(x)
    if k is None:
        return None
    n, groups = x.shape
    levels = torch.empty((n, groups), dtype=torch.int32, device=x.device)
    scale = torch.empty(groups, dtype=torch.float32, device=x.device)
    low = torch.empty(groups, dtype=torch.float32, device=x.device)
    steps = torch.tensor(numerators, dtype=torch.float32, device=x.device)
    # fp fusion off: an a * b + c contracted into one FMA rounds once where the port rounds twice
    k.qkx2_search[(_cdiv(groups, SEARCH_BLOCK),)](
        x, weights, steps, levels, scale, low, groups,
        N=n, NMAX=nmax, STEPS=len(numerators), BLOCK=SEARCH_BLOCK, enable_fp_fusion=False,
    )  # fmt: skip
    return levels, scale, low


def make_qx_quants(
    x: torch.Tensor, nmax: int, numerators: list[float], eps: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``backends.gguf.quantize._make_qx_quants`` in one launch: element-major float32 ``x`` ``(n, groups)`` ->
    (levels + nmax int32, scale), bit for bit the torch port. None where not covered."""
    if x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous():
        return None
    k = _kernels(x)
    if k is None:
        return None
    n, groups = x.shape
    levels = torch.empty((n, groups), dtype=torch.int32, device=x.device)
    scale = torch.empty(groups, dtype=torch.float32, device=x.device)
    candidates = torch.tensor(numerators, dtype=torch.float32, device=x.device)
    k.qx_search[(_cdiv(groups, SEARCH_BLOCK),)](
        x, candidates, levels, scale, groups, eps,
        N=n, NMAX=nmax, CANDIDATES=len(numerators), BLOCK=SEARCH_BLOCK, enable_fp_fusion=False,
    )  # fmt: skip
    return levels, scale
