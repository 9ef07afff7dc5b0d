"""Torch GGML quantizers against gguf-py's, byte for byte (CPU; CUDA marked gpu)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import quants as gguf_quants  # noqa: E402

from diffusers_quant.backends.gguf.nn import GGUFLinear  # noqa: E402
from diffusers_quant.backends.gguf.quantize import QUANTIZERS, quantize_rows  # noqa: E402


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
@pytest.mark.parametrize("qtype", sorted(QUANTIZERS))
def test_matches_gguf_py_bytes_on_cpu(qtype, dtype, monkeypatch):
    from diffusers_quant.backends.gguf import quantize

    weight = _awkward_weight().to(dtype)
    monkeypatch.setattr(quantize, "_BLOCK_ELEMENTS", 256 * 10)  # 10 rows per step, the last step short
    assert torch.equal(quantize_rows(weight, qtype), _reference(weight, qtype))


def test_rows_that_are_not_whole_blocks_are_refused():
    with pytest.raises(ValueError, match="whole blocks of 32"):
        quantize_rows(torch.zeros(4, 48), "Q8_0")


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0"])
def test_from_linear_uses_torch_where_it_can_and_gguf_py_elsewhere(qtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 16).to(torch.bfloat16)
    layer = GGUFLinear.from_linear(linear, qtype, compute_dtype=torch.bfloat16, device="cpu")
    assert torch.equal(layer.weight, _reference(linear.weight.detach(), qtype).reshape(16, -1))
    assert layer.weight.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", sorted(QUANTIZERS))
def test_cuda_bytes_equal_gguf_py(qtype):
    weight = _awkward_weight(rows=512, cols=3072, seed=1).to(torch.bfloat16)
    packed = quantize_rows(weight, qtype, "cuda")
    assert packed.device.type == "cuda"
    assert torch.equal(packed.cpu(), _reference(weight, qtype))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "Q5_1", "F16"])
def test_to_ggml_gives_gguf_py_bytes_for_any_rank_and_type(qtype):
    """One encoder serves layers and the file writer: torch for its ports, gguf-py for the rest."""
    from diffusers_quant.backends.gguf.quantize import to_ggml

    weight = _awkward_weight(rows=96, cols=64).reshape(4, 24, 64)
    packed = to_ggml(weight, qtype)
    assert packed.dtype == torch.uint8 and packed.shape[:-1] == (4, 24)
    expected = gguf_quants.quantize(weight.numpy(), gguf.GGMLQuantizationType[qtype])
    assert packed.numpy().tobytes() == np.ascontiguousarray(expected).tobytes()
