"""dequant.py against gguf-py's reference (numpy) dequantizers, type by type."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as ref_dequantize  # noqa: E402
from gguf.quants import quantize as ref_quantize  # noqa: E402

from diffusers_quant.backends.gguf import dequant  # noqa: E402
from diffusers_quant.backends.gguf.dequant import (  # noqa: E402
    DEQUANTIZERS,
    block_info,
    dequantize,
    packed_nbytes,
    qtype_id,
    qtype_name,
)

T = gguf.GGMLQuantizationType


def _gguf_can(fn, t) -> bool:
    block_size, type_size = gguf.GGML_QUANT_SIZES[t]
    try:
        if fn is ref_quantize:
            ref_quantize(np.zeros((1, block_size), np.float32), t)
        else:
            ref_dequantize(np.zeros((1, type_size), np.uint8), t)
    except NotImplementedError:
        return False
    return True


QUANTIZABLE = [t.name for t in T if _gguf_can(ref_quantize, t)]
DEQUANTIZABLE = [t.name for t in T if _gguf_can(ref_dequantize, t)]


def test_sizes_come_from_gguf_table():
    for name in (n for n in DEQUANTIZERS if n in T.__members__):
        assert block_info(name) == tuple(gguf.GGML_QUANT_SIZES[T[name]])
        assert qtype_id(name) == int(T[name])
        assert qtype_name(int(T[name])) == name
    assert qtype_name("q4_k") == "Q4_K"
    assert packed_nbytes((3, 512), "Q4_K") == 3 * 2 * 144
    with pytest.raises(ValueError, match="not a multiple of the Q4_K block size 256"):
        packed_nbytes((3, 100), "Q4_K")
    with pytest.raises(ValueError, match="unknown ggml type"):
        qtype_name("Q9_9")


def test_every_type_gguf_py_can_dequantize_is_supported():
    assert set(DEQUANTIZABLE) - {"F32", "F16"} <= set(DEQUANTIZERS)  # F32/F16 are gguf-py special cases
    required = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K"}
    assert required | {"Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"} <= set(DEQUANTIZERS)
    # Issue 14: valid types gguf-py writes or lists but cannot decode (F64 is what it writes for float64
    # numpy arrays); every ggml type but Q8_1 (an activation format with no ggml decoder) is supported.
    assert {"F64", "I8", "I16", "I32", "I64", "Q8_K"} <= set(DEQUANTIZERS)
    assert {t.name for t in T} - set(DEQUANTIZERS) == {"Q8_1"}


def _reference(raw: np.ndarray, qtype: str) -> torch.Tensor:
    return torch.from_numpy(ref_dequantize(raw.reshape(1, -1), T[qtype]).reshape(-1).astype(np.float32))


@pytest.mark.parametrize("qtype", QUANTIZABLE)
def test_matches_gguf_on_quantized_random_data(qtype):
    rng = np.random.default_rng(1)
    block_size, _ = gguf.GGML_QUANT_SIZES[T[qtype]]
    cols = 2 * max(block_size, 256)
    # rows at very different magnitudes, plus an all-zero row (scale 0 paths)
    x = (
        rng.standard_normal((6, cols)).astype(np.float32)
        * np.array([1e-3, 0.1, 1, 10, 300, 0], np.float32)[:, None]
    )
    packed = ref_quantize(x, T[qtype])
    expected = torch.from_numpy(ref_dequantize(packed, T[qtype]).astype(np.float32))
    got = dequantize(torch.from_numpy(packed.view(np.uint8)), qtype, x.shape)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("qtype", sorted(set(DEQUANTIZERS) & set(DEQUANTIZABLE)))
def test_matches_gguf_on_random_valid_blocks(qtype, make_blocks):
    raw = make_blocks(qtype, 96, seed=sum(qtype.encode()))
    block_size, _ = block_info(qtype)
    expected = _reference(raw, qtype)
    got = dequantize(torch.from_numpy(raw), qtype, (96 * block_size,))
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


_PLAIN_NUMPY = {"F64": np.float64, "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64}


def _ggml_reference(raw: np.ndarray, qtype: str) -> np.ndarray:
    """gguf-py has no decoder for these types: a literal, element-by-element reading of ggml-quants.c's
    dequantize_row_* over ggml-common.h's block structs, independent of dequant.py's vectorised code."""
    if qtype in _PLAIN_NUMPY:
        return raw.reshape(-1).view(_PLAIN_NUMPY[qtype]).astype(np.float32)
    out = []
    for block in raw:
        if qtype == "Q8_K":  # float d; int8_t qs[QK_K]; int16_t bsums[QK_K/16]
            d = block[0:4].view(np.float32)[0]
            qs = block[4:260].view(np.int8)
            out += [d * np.float32(qs[j]) for j in range(256)]
        elif qtype == "Q1_0":  # ggml_half d; uint8_t qs[QK1_0/8]
            d = block[0:2].view(np.float16)[0].astype(np.float32)
            for j in range(128):
                bit = (int(block[2 + j // 8]) >> (j % 8)) & 1
                out.append(np.float32(bit * 2 - 1) * d)
        else:
            raise AssertionError(qtype)
    return np.array(out, np.float32)


NOT_IN_GGUF_PY = sorted(set(DEQUANTIZERS) - set(DEQUANTIZABLE))


def test_the_types_gguf_py_cannot_decode_are_exactly_the_new_ones():
    assert NOT_IN_GGUF_PY == sorted({"F64", "I8", "I16", "I32", "I64", "Q8_K", "Q1_0"} & set(T.__members__))


@pytest.mark.parametrize("qtype", NOT_IN_GGUF_PY)
def test_matches_ggml_reference_where_gguf_py_has_no_decoder(qtype, make_blocks):
    raw = make_blocks(qtype, 24, seed=sum(qtype.encode()))
    block_size, _ = block_info(qtype)
    expected = torch.from_numpy(_ggml_reference(raw, qtype))
    assert torch.isfinite(expected).all() and expected.abs().sum() > 0
    got = dequantize(torch.from_numpy(raw), qtype, (24 * block_size,))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_q8_k_and_q1_0_known_blocks():
    """Hand-built blocks: Q8_K is d * qs (bsums ignored), Q1_0 is +d for a set bit and -d for a clear one."""
    q8k = np.zeros(292, np.uint8)
    q8k[:4] = np.array([0.5], np.float32).view(np.uint8)
    q8k[4:260] = np.arange(-128, 128, dtype=np.int8).view(np.uint8)
    q8k[260:] = 0xFF  # bsums: not used for decoding
    got = dequantize(torch.from_numpy(q8k), "Q8_K", (256,))
    assert torch.equal(got, torch.arange(-128, 128, dtype=torch.float32) * 0.5)
    q1 = np.zeros(18, np.uint8)
    q1[:2] = np.array([2.0], np.float16).view(np.uint8)
    q1[2] = 0b00000101  # elements 0 and 2 positive
    q1[17] = 0b10000000  # element 127 positive
    got = dequantize(torch.from_numpy(q1), "Q1_0", (128,))
    expected = torch.full((128,), -2.0)
    expected[[0, 2, 127]] = 2.0
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_output_dtype_and_shape(dtype, make_blocks):
    raw = make_blocks("Q4_K", 6)
    got = dequantize(torch.from_numpy(raw).reshape(3, -1), "Q4_K", (3, 2, 256), dtype)
    assert got.dtype == dtype and got.shape == (3, 2, 256)
    torch.testing.assert_close(got, _reference(raw, "Q4_K").reshape(3, 2, 256).to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("qtype", sorted(dequant._COMPUTE_DTYPE_TYPES))
def test_compute_dtype_decoding_is_within_16_bit_rounding(qtype, dtype, make_blocks):
    """The forward pass decodes the common types straight in bf16/fp16; each value stays within a few
    16-bit roundings of gguf-py's float32 result, and the path really runs in 16 bits (not float32 + cast)."""
    raw = torch.from_numpy(make_blocks(qtype, 64, seed=7))
    block_size, _ = block_info(qtype)
    exact = dequantize(raw, qtype, (64 * block_size,))
    fast = dequantize(raw, qtype, (64 * block_size,), dtype, exact=False)
    assert fast.dtype == dtype
    eps = torch.finfo(dtype).eps
    # Per block, errors scale with the block's largest magnitude (scale and min are subtracted in 16 bits).
    bound = exact.abs().reshape(64, -1).amax(dim=1, keepdim=True).expand(64, block_size).reshape(-1)
    error = (fast.float() - exact).abs()
    assert (error <= 4 * eps * bound + 1e-30).all(), (error / bound.clamp_min(1e-30)).max().item()


def test_forward_path_decodes_in_the_compute_dtype(monkeypatch, make_blocks):
    """exact=False hands the 16-bit dtype to the decoder (no float32 intermediate); exact=True never does."""
    seen = []
    real = DEQUANTIZERS["Q8_0"]
    monkeypatch.setitem(
        DEQUANTIZERS, "Q8_0", lambda blocks, *ftype: seen.append(ftype) or real(blocks, *ftype)
    )
    raw = torch.from_numpy(make_blocks("Q8_0", 4))
    assert dequantize(raw, "Q8_0", (128,), torch.bfloat16, exact=False).dtype == torch.bfloat16
    assert dequantize(raw, "Q8_0", (128,), torch.bfloat16).dtype == torch.bfloat16
    assert dequantize(raw, "Q8_0", (128,), torch.float32, exact=False).dtype == torch.float32
    assert seen == [(torch.bfloat16,), (), ()]


def test_typed_float_input_and_uint8_bytes_agree():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert torch.equal(dequantize(x, "BF16", (4, 8), torch.bfloat16), x)
    assert torch.equal(dequantize(x.view(torch.uint8), "BF16", (4, 8), torch.bfloat16), x)
    h = torch.randn(4, 8).half()
    assert torch.equal(dequantize(h.view(torch.uint8), "F16", (32,), torch.float16), h.flatten())


def test_non_contiguous_bytes(make_blocks):
    raw = torch.from_numpy(make_blocks("Q6_K", 8))
    big = torch.zeros(8, 300, dtype=torch.uint8)
    big[:, 5 : 5 + raw.shape[1]] = raw
    view = big[:, 5 : 5 + raw.shape[1]]
    assert not view.is_contiguous()
    assert torch.equal(dequantize(view, "Q6_K", (8, 256)), dequantize(raw, "Q6_K", (8, 256)))


def test_errors_are_clear():
    raw = torch.zeros(2, 34, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"shape \(2, 64\) must be 136 bytes, got 68"):
        dequantize(raw, "Q8_0", (2, 64))
    with pytest.raises(ValueError, match="68 elements are not a whole number of Q8_0 blocks of 32"):
        dequantize(raw, "Q8_0", (2, 34))
    # only the total must be whole blocks (ComfyUI orig_shape tensors have odd last dims)
    assert dequantize(raw, "Q8_0", (4, 4, 4)).shape == (4, 4, 4)
    with pytest.raises(NotImplementedError, match="Q8_1 is not supported"):
        dequantize(torch.zeros(40, dtype=torch.uint8), "Q8_1", (32,))
    with pytest.raises(ValueError, match="uint8"):
        dequantize(torch.zeros(4, dtype=torch.int32), "Q8_0", (32,))


def test_module_imports_only_torch_and_stdlib():
    # Load the file on its own (not through the package) and check what it pulled in.
    path = Path(dequant.__file__)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('dq', {str(path)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "bad = [n for n in ('gguf', 'diffusers', 'transformers') if n in sys.modules]\n"
        "assert not bad, bad\n"
    )
    assert importlib.util.find_spec("torch") is not None
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", sorted(DEQUANTIZERS))
def test_cuda_matches_cpu(qtype, make_blocks):
    raw = torch.from_numpy(make_blocks(qtype, 512, seed=3))
    block_size, _ = block_info(qtype)
    cpu = dequantize(raw, qtype, (512, block_size))
    gpu = dequantize(raw.cuda(), qtype, (512, block_size))
    assert gpu.device.type == "cuda"
    # GPU kernels may fuse multiply-adds; allow float32 rounding differences only
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-6 * float(cpu.abs().max()))
