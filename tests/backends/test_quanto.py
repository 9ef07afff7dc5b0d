"""quanto's weights quantized in blocks of rows must be exactly what ``QLinear.freeze()`` stores."""

from __future__ import annotations

import pytest
import torch

quanto = pytest.importorskip("optimum.quanto")

from diffusers_quant.backends.quanto import quantize_in_row_blocks  # noqa: E402

QTYPES = ("qint8", "qint4", "qint2", "qfloat8")


def _inner(tensor) -> dict[str, torch.Tensor]:
    """A quantized weight's inner tensors, packed wrappers unwrapped, as raw bytes for exact comparison."""
    names, _ = tensor.__tensor_flatten__()
    out = {}
    for name in names:
        inner = getattr(tensor, name)
        if hasattr(inner, "__tensor_flatten__"):
            inner = inner._data
        out[name] = inner.contiguous().view(torch.uint8) if inner.element_size() == 1 else inner
    return out


def _frozen_and_blocked(linear: torch.nn.Linear, qtype: str, block_elements: int):
    reference = quanto.QLinear.from_module(linear, weights=getattr(quanto, qtype))
    reference.freeze()
    layer = quanto.QLinear.from_module(linear, weights=getattr(quanto, qtype))
    with torch.no_grad():
        blocked = quantize_in_row_blocks(
            layer.weight, getattr(quanto, qtype), layer.optimizer, layer.weight_group_size, block_elements
        )
    layer.weight = torch.nn.Parameter(blocked, requires_grad=False)
    return reference, layer


def _assert_identical(reference, layer, dtype, device):
    assert type(layer.weight) is type(reference.weight)
    want, got = _inner(reference.weight), _inner(layer.weight)
    assert want.keys() == got.keys()
    for name in want:
        assert want[name].shape == got[name].shape, name
        assert torch.equal(want[name], got[name]), name
    x = torch.randn(5, layer.in_features, dtype=dtype, device=device)
    assert torch.equal(reference(x), layer(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("qtype", QTYPES)
def test_row_blocks_match_freeze_on_cpu(qtype, dtype):
    torch.manual_seed(0)
    # 336 rows in blocks of 64: five full blocks and a 16-row tail (tinygemm's CPU tiles are 64 rows).
    linear = torch.nn.Linear(256, 336, dtype=dtype)
    reference, layer = _frozen_and_blocked(linear, qtype, block_elements=256 * 64)
    _assert_identical(reference, layer, dtype, "cpu")


def test_small_layers_take_quantos_own_path():
    linear = torch.nn.Linear(128, 32, dtype=torch.bfloat16)
    reference, layer = _frozen_and_blocked(linear, "qint4", block_elements=1 << 20)
    _assert_identical(reference, layer, torch.bfloat16, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("qtype", QTYPES)
def test_row_blocks_match_freeze_on_cuda(qtype, dtype):
    # bf16 int4 takes tinygemm's CUDA tiles, fp16 int4 AWQ, float8 Marlin: each must stay bit-identical.
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 1344, dtype=dtype, device="cuda")
    reference, layer = _frozen_and_blocked(linear, qtype, block_elements=512 * 64)
    _assert_identical(reference, layer, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", QTYPES)
def test_blocks_keep_the_cuda_peak_near_the_weight(qtype):
    """Flux's largest Linear (3072 x 15360): the peak above the bf16 weight stays within the stored result
    plus a few MB, where freeze() alone allocates several full-size temporaries."""
    linear = torch.nn.Linear(15360, 3072, bias=False, dtype=torch.bfloat16, device="cuda")
    layer = quanto.QLinear.from_module(linear, weights=getattr(quanto, qtype))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    with torch.no_grad():
        qweight = quantize_in_row_blocks(
            layer.weight, getattr(quanto, qtype), layer.optimizer, layer.weight_group_size
        )
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    stored = torch.cuda.memory_allocated() - start
    assert qweight.shape == linear.weight.shape
    assert peak <= stored + 16 * 2**20, (qtype, peak / 2**20, stored / 2**20)
