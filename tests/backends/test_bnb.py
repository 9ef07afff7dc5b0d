"""bitsandbytes layers keep the layout bitsandbytes saves and dequantizes (backends/bnb.py)."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from bitsandbytes.nn.modules import has_avx512bf16  # noqa: E402

from diffusers_quant.backends import get_backend  # noqa: E402


def test_a_loaded_4bit_layer_reads_back_the_same_after_a_cpu_forward(flux_path):
    """bitsandbytes 0.50 repacks a 4-bit weight in place on its first CPU forward where the CPU has
    AVX512-BF16, into a layout its own dequantize_4bit misreads; the layers of a model loaded through the
    hooks are told not to, so dequantizing after a forward gives the weight it gave before."""
    from diffusers import FluxTransformer2DModel

    import diffusers_quant

    diffusers_quant.install()
    model = FluxTransformer2DModel.from_pretrained(
        flux_path / "transformer", quant="transformer=bnb:nf4", torch_dtype=torch.bfloat16
    )
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    backend = get_backend("bnb")
    before = [backend.dequantize_weight(m) for m in layers]
    with torch.no_grad():
        for m in layers:
            m(torch.randn(4, m.in_features, dtype=torch.bfloat16))
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert all(torch.equal(b, backend.dequantize_weight(m)) for b, m in zip(before, layers, strict=True))


@pytest.mark.skipif(not has_avx512bf16(), reason="bitsandbytes repacks only on CPUs with AVX512-BF16")
def test_a_layer_bitsandbytes_already_repacked_is_restored_by_settling():
    """A layer that ran before it reached us (bitsandbytes' own repack done) is put back in the saved layout:
    the same packed bytes, and the weight within the rounding of bitsandbytes' own inverse (its repack keeps
    the block scales in bfloat16, so they come back to within 2**-8; not bit for bit)."""
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128, dtype=torch.bfloat16), requires_grad=False)
    layer = layer.to("cpu").eval()
    packed = layer.weight.data.clone()
    reference = bnb.functional.dequantize_4bit(packed, layer.weight.quant_state)
    layer.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        layer(torch.randn(2, 128, dtype=torch.bfloat16))
    assert layer.weight.quant_state.packing_format_for_cpu  # bitsandbytes' repack happened
    get_backend("bnb").settle_layer(layer)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert not layer.support_avx512bf16_for_cpu
    assert torch.equal(layer.weight.data, packed)
    restored = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert 0 < (restored.float() - reference.float()).norm() / reference.float().norm() < 2**-8
