"""Torch GGML quantizers against the references, byte for byte (CPU; CUDA marked gpu): gguf-py's for the
simple types, ggml's quantize_row_q{4,5,6}_K_ref (compiled C, in a fixture) for the K types."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import quants as gguf_quants  # noqa: E402

from diffusers_quant.backends.gguf.nn import GGUFLinear  # noqa: E402
from diffusers_quant.backends.gguf.quantize import QUANTIZERS, quantize_rows, to_ggml  # noqa: E402

K_TYPES = ("Q4_K", "Q5_K", "Q6_K")  # ported from ggml-quants.c: gguf-py cannot quantize them
GGUF_PY_PORTS = sorted(set(QUANTIZERS) - set(K_TYPES))


def _awkward_weight(rows: int = 96, cols: int = 256, seed: int = 0) -> torch.Tensor:
    """Random rows plus the edge cases: an all-zero block, ties for the largest magnitude (both signs),
    exact .5 products, tiny and large values."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-4, 2, rows).unsqueeze(1)
    w[0, :32] = 0
    w[1, :32] = torch.tensor([1.0, -1.0] * 16)
    w[2, :32] = torch.arange(32, dtype=torch.float32) - 16
    w[3, :32] = torch.linspace(-8, 8, 32)
    w[4, :32] = 60000.0
    return w


def _reference(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    packed = gguf_quants.quantize(weight.float().numpy(), gguf.GGMLQuantizationType[qtype])
    return torch.from_numpy(np.ascontiguousarray(packed)).view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("qtype", GGUF_PY_PORTS)
def test_matches_gguf_py_bytes_on_cpu(qtype, dtype, monkeypatch):
    from diffusers_quant.backends.gguf import quantize

    weight = _awkward_weight().to(dtype)
    monkeypatch.setattr(quantize, "_BLOCK_ELEMENTS", 256 * 10)  # 10 rows per step, the last step short
    assert torch.equal(quantize_rows(weight, qtype), _reference(weight, qtype))


@pytest.mark.parametrize(
    ("qtype", "cols", "block"), [("Q8_0", 48, 32), ("Q4_K", 384, 256), ("Q6_K", 128, 256)]
)
def test_rows_that_are_not_whole_blocks_are_refused(qtype, cols, block):
    with pytest.raises(ValueError, match=f"{qtype} rows must be whole blocks of {block} values, got {cols}"):
        quantize_rows(torch.zeros(4, cols), qtype)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0"])
def test_from_linear_uses_torch_where_it_can_and_gguf_py_elsewhere(qtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 16).to(torch.bfloat16)
    layer = GGUFLinear.from_linear(linear, qtype, compute_dtype=torch.bfloat16, device="cpu")
    assert torch.equal(layer.weight, _reference(linear.weight.detach(), qtype).reshape(16, -1))
    assert layer.weight.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", GGUF_PY_PORTS)
def test_cuda_bytes_equal_gguf_py(qtype):
    weight = _awkward_weight(rows=512, cols=3072, seed=1).to(torch.bfloat16)
    packed = quantize_rows(weight, qtype, "cuda")
    assert packed.device.type == "cuda"
    assert torch.equal(packed.cpu(), _reference(weight, qtype))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "Q5_1", "F16"])
def test_to_ggml_gives_gguf_py_bytes_for_any_rank_and_type(qtype):
    """One encoder serves layers and the file writer: torch for its ports, gguf-py for the rest."""
    weight = _awkward_weight(rows=96, cols=64).reshape(4, 24, 64)
    packed = to_ggml(weight, qtype)
    assert packed.dtype == torch.uint8 and packed.shape[:-1] == (4, 24)
    expected = gguf_quants.quantize(weight.numpy(), gguf.GGMLQuantizationType[qtype])
    assert packed.numpy().tobytes() == np.ascontiguousarray(expected).tobytes()


# -- K quants: ggml's reference quantizers -----------------------------------------------------------------
# k_quants_reference.npz: 38 super-blocks (all zeros, constants, lone outliers, zero and constant sub-blocks,
# scales that underflow or overflow float16, ties, one-signed rows, bf16-rounded and heavy-tailed rows, and
# Gaussian/uniform/Laplace rows at several scales) and the bytes quantize_row_q{4,5,6}_K_ref gave for them,
# compiled from ggml-quants.c with gcc (see the file's "source" entry). Our port was also checked against that
# build on 120,022 such super-blocks per type: no byte differed.


@pytest.fixture(scope="module")
def k_reference():
    from pathlib import Path

    with np.load(Path(__file__).with_name("k_quants_reference.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("qtype", K_TYPES)
def test_k_quants_are_llama_cpp_reference_bytes(qtype, k_reference, monkeypatch):
    from diffusers_quant.backends.gguf import quantize

    x, expected = torch.from_numpy(k_reference["x"]), torch.from_numpy(k_reference[qtype.lower()])
    assert torch.equal(quantize_rows(x, qtype), expected)
    # rows of four super-blocks, quantized a row per step
    monkeypatch.setattr(quantize, "_BLOCK_ELEMENTS", 1024)
    rows = quantize_rows(x[:36].reshape(9, 1024), qtype)
    assert rows.shape == (9, 4 * expected.shape[1])
    assert torch.equal(rows, expected[:36].reshape(9, -1))


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _naive(x: np.ndarray, qtype: str) -> np.ndarray:
    """The simple variant with float scales: min/max affine per 32 (Q4_K, Q5_K), max-abs per 16 (Q6_K)."""
    if qtype == "Q6_K":
        g = x.reshape(-1, 16)
        d = np.abs(g).max(1, keepdims=True) / 31
        return (np.clip(np.round(g / d), -32, 31) * d).reshape(x.shape)
    top = 15 if qtype == "Q4_K" else 31
    g = x.reshape(-1, 32)
    low, high = g.min(1, keepdims=True), g.max(1, keepdims=True)
    d = (high - low) / top
    return (np.clip(np.round((g - low) / d), 0, top) * d + low).reshape(x.shape)


# rel-L2 of gguf-py's dequantization of our bytes on N(0, 1) (64 x 1024, seed 0): measured 0.0715, 0.0360,
# 0.0177 (seeds 1, 2 within 0.001); the simple variants give 0.0783, 0.0378, 0.0192.
K_ERROR = {"Q4_K": 0.073, "Q5_K": 0.037, "Q6_K": 0.018}


@pytest.mark.parametrize("qtype", K_TYPES)
def test_k_quants_error_is_small_and_beats_the_simple_scales(qtype):
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
    packed = quantize_rows(w, qtype)
    assert packed.shape == (64, 4 * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1])
    x = w.numpy()
    got = gguf_quants.dequantize(packed.numpy(), gguf.GGMLQuantizationType[qtype]).reshape(x.shape)
    error = _rel_l2(got, x)
    assert error < K_ERROR[qtype]
    assert error < _rel_l2(_naive(x, qtype), x)


@pytest.mark.parametrize("qtype", K_TYPES)
def test_k_quant_search_kernels_give_the_reference_bytes(qtype, k_reference, monkeypatch):
    """The Triton kernels of the K-quant searches (kernels.make_qkx2_quants / make_qx_quants, which CUDA
    runs), here under Triton's interpreter: ggml's bytes for the fixture, and the torch port's bytes for
    awkward rows (zeros, ties, constants, tiny and huge values, an outlier)."""
    from diffusers_quant import kernels

    search = "make_qx_quants" if qtype == "Q6_K" else "make_qkx2_quants"
    calls = []
    real = getattr(kernels, search)

    def spy(*args):
        found = real(*args)
        calls.append(found is not None)  # the kernel ran (None would leave the work to the torch port)
        return found

    monkeypatch.setattr(kernels, search, spy)
    awkward = _awkward_weight(rows=12, cols=512, seed=4)
    awkward[5] = 0.37
    awkward[6, 100] = 1000.0
    monkeypatch.delenv("DIFFUSERS_QUANT_REFERENCE", raising=False)
    monkeypatch.setattr(kernels, "KERNEL_DEVICES", {"cuda", "cpu"})
    got = quantize_rows(torch.from_numpy(k_reference["x"]), qtype)
    assert calls and all(calls), "the search did not take the kernel"
    assert torch.equal(got, torch.from_numpy(k_reference[qtype.lower()]))
    with_kernel = quantize_rows(awkward, qtype)
    monkeypatch.setenv("DIFFUSERS_QUANT_REFERENCE", "1")  # the switch keeps the torch port
    count = len(calls)
    assert torch.equal(with_kernel, quantize_rows(awkward, qtype)) and len(calls) == count


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_k_quant_search_kernels_spread_nan_and_inf_as_the_torch_port(value, device, monkeypatch):
    """A group holding NaN or an infinity: the searches' levels, scales and mins are the torch port's (NaN
    where it has NaN). The bytes written from a NaN then depend on its bit pattern, as in ggml's C."""
    from diffusers_quant import kernels
    from diffusers_quant.backends.gguf import quantize

    x = torch.randn(32, 5, generator=torch.Generator().manual_seed(1))
    x[5, 1] = value
    x = x.to(device)
    weights = x.abs() + 0.1
    monkeypatch.setattr(kernels, "KERNEL_DEVICES", {"cuda", "cpu"})
    monkeypatch.delenv("DIFFUSERS_QUANT_REFERENCE", raising=False)
    got = kernels.make_qkx2_quants(x, weights, 15, quantize._steps(-1.0, 0.1, 21, 15.0))
    monkeypatch.setenv("DIFFUSERS_QUANT_REFERENCE", "1")
    want = quantize._make_qkx2_quants(x, weights, 15, -1.0, 0.1, 20)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    x6 = torch.randn(16, 5, generator=torch.Generator().manual_seed(2))
    x6[3, 2] = value
    x6 = x6.to(device)
    numerators = [-32.0] + [
        float(-(np.float32(32) + np.float32(0.1) * np.float32(i))) for i in range(-9, 10) if i
    ]
    got = kernels.make_qx_quants(x6, 32, [float(np.float32(v)) for v in numerators], quantize._GROUP_MAX_EPS)
    want = quantize._make_qx_quants(x6, 32)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("qtype", K_TYPES)
def test_k_quants_on_awkward_rows(qtype):
    t = gguf.GGMLQuantizationType[qtype]
    zeros = quantize_rows(torch.zeros(2, 512), qtype)
    assert not zeros.any()  # d, scales and levels all 0, as ggml writes them
    rows = torch.zeros(4, 512)
    rows[0], rows[1], rows[2, 256:] = 0.37, -2.5, 1e-3  # constants (and a zero super-block)
    rows[3] = torch.randn(512, generator=torch.Generator().manual_seed(0))
    rows[3, 100] = 1000.0  # one huge outlier
    got = gguf_quants.dequantize(quantize_rows(rows, qtype).numpy(), t).reshape(rows.shape)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[:2], rows[:2].numpy(), rtol=1e-3, atol=0)
    np.testing.assert_allclose(got[2], rows[2].numpy(), rtol=0.03, atol=0)  # 1e-3: float16 d near subnormal
    assert got[3, 100] == pytest.approx(1000.0, rel=1e-3)
    # the outlier's super-block is the reference's to spoil; the next one is quantized as any other
    assert _rel_l2(got[3, 256:], rows[3, 256:].numpy()) < 1.1 * K_ERROR[qtype]


def test_to_ggml_and_from_linear_use_the_k_ports():
    weight = torch.randn(2, 8, 512, generator=torch.Generator().manual_seed(3))
    packed = to_ggml(weight, "q5_k")
    assert packed.shape == (2, 8, 2 * 176)
    assert torch.equal(packed.reshape(16, -1), quantize_rows(weight.reshape(16, 512), "Q5_K"))
    linear = torch.nn.Linear(512, 8).to(torch.bfloat16)
    layer = GGUFLinear.from_linear(linear, "Q4_K", compute_dtype=torch.bfloat16, device="cpu")
    assert torch.equal(layer.weight, quantize_rows(linear.weight.detach(), "Q4_K"))
    expected = gguf_quants.dequantize(layer.weight.numpy(), gguf.GGMLQuantizationType.Q4_K)
    assert torch.equal(layer.dequantize_weight(torch.float32), torch.from_numpy(expected).reshape(8, 512))


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", K_TYPES)
def test_k_quants_cuda_bytes_equal_the_reference_and_cpu(qtype, k_reference):
    x = torch.from_numpy(k_reference["x"])
    packed = quantize_rows(x, qtype, "cuda")
    assert packed.device.type == "cuda"
    assert torch.equal(packed.cpu(), torch.from_numpy(k_reference[qtype.lower()]))
    weight = _awkward_weight(rows=512, cols=3072, seed=1).to(torch.bfloat16)
    assert torch.equal(quantize_rows(weight, qtype, "cuda").cpu(), quantize_rows(weight, qtype))
