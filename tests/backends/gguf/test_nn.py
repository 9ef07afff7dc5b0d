"""nn.py: GGUFWeight slicing on packed bytes, GGUFLinear forward, device moves and state-dict round trips."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

gguf = pytest.importorskip("gguf")
from diffusers_quant.backends.gguf.dequant import dequantize  # noqa: E402
from diffusers_quant.backends.gguf.nn import GGUFLinear, GGUFWeight  # noqa: E402
from diffusers_quant.backends.gguf.reader import read_gguf  # noqa: E402

T = gguf.GGMLQuantizationType


def _ref_weight(raw: np.ndarray, qtype: str, shape) -> torch.Tensor:
    """gguf-py's dequantization: the reference every forward is compared with."""
    return torch.from_numpy(gguf.quants.dequantize(raw.reshape(1, -1), T[qtype]).astype(np.float32)).reshape(
        shape
    )


@pytest.fixture(params=["Q4_0", "Q8_0", "Q4_K", "Q6_K", "IQ4_XS", "F16", "BF16"])
def packed(request, make_blocks):
    """(qtype, raw uint8 of a (64, 512) weight, reference float weight)."""
    qtype = request.param
    block_size = gguf.GGML_QUANT_SIZES[T[qtype]][0]
    raw = make_blocks(qtype, 64 * 512 // block_size, seed=5).reshape(64, -1)
    return qtype, raw, _ref_weight(raw, qtype, (64, 512))


def test_forward_matches_f_linear(packed):
    qtype, raw, ref = packed
    bias = torch.randn(64)
    layer = GGUFLinear.from_raw(torch.from_numpy(raw), qtype, (64, 512), bias=bias)
    x = torch.randn(3, 5, 512)
    torch.testing.assert_close(layer(x), F.linear(x, ref, bias), rtol=1e-5, atol=1e-4)
    # lower-precision input: weight decoded straight in the input dtype, output in that dtype too
    xb = x.to(torch.bfloat16)
    yb = layer(xb)
    assert yb.dtype == torch.bfloat16
    fast = dequantize(layer.weight, qtype, (64, 512), torch.bfloat16, exact=False)
    torch.testing.assert_close(yb, F.linear(xb, fast, bias.to(torch.bfloat16)), rtol=0, atol=0)
    exact = F.linear(x, ref, bias)
    assert ((yb.float() - exact).norm() / exact.norm()).item() < 1e-2


def test_compute_dtype_and_attributes(packed):
    qtype, raw, ref = packed
    layer = GGUFLinear.from_raw(torch.from_numpy(raw), qtype, (64, 512), compute_dtype=torch.float16)
    assert (layer.in_features, layer.out_features, layer.qtype) == (512, 64, qtype)
    assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
    assert layer.packed_nbytes() == raw.nbytes
    x = torch.randn(2, 512)
    y = layer(x)
    assert y.dtype == torch.float32  # returned in the input dtype, computed in float16
    fast = dequantize(layer.weight, qtype, (64, 512), torch.float16, exact=False)
    torch.testing.assert_close(y, F.linear(x.half(), fast).float(), rtol=0, atol=0)
    assert torch.equal(layer.dequantize_weight(torch.float32), ref)


def test_from_raw_is_zero_copy(make_blocks):
    raw = torch.from_numpy(make_blocks("Q8_0", 8 * 4)).reshape(8, -1)
    layer = GGUFLinear.from_raw(raw, "Q8_0", (8, 128))
    assert layer.weight.data_ptr() == raw.data_ptr()


def test_dtype_moves_keep_packed_bytes(make_blocks):
    raw = torch.from_numpy(make_blocks("Q4_K", 16)).reshape(8, -1)
    layer = GGUFLinear.from_raw(raw.clone(), "Q4_K", (8, 512), bias=torch.randn(8))
    model = nn.Sequential(layer)
    model.to(torch.float16)
    model.half()
    model.to(torch.bfloat16)
    model.float()
    model.to("cpu")
    assert layer.weight.dtype == torch.uint8 and torch.equal(layer.weight, raw)
    assert layer.bias.dtype == torch.float32
    model.requires_grad_(False)
    assert isinstance(layer.weight, nn.Parameter)


def test_state_dict_round_trip_across_qtypes(packed, tmp_path):
    qtype, raw, ref = packed
    src = nn.Sequential(
        nn.Identity(), GGUFLinear.from_raw(torch.from_numpy(raw), qtype, (64, 512), torch.randn(64))
    )
    sd = src.state_dict()
    assert set(sd) == {"1.weight", "1.bias", "1._extra_state"}
    assert all(isinstance(v, torch.Tensor) for v in sd.values())

    # safetensors can store it (tensors only), and a module built with another qtype reconfigures on load
    from safetensors.torch import load_file, save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
    dst = nn.Sequential(nn.Identity(), GGUFLinear(512, 64, qtype="Q8_0"))
    dst.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    assert dst[1].qtype == qtype
    assert torch.equal(dst[1].weight, src[1].weight)
    x = torch.randn(2, 512)
    assert torch.equal(dst(x), src(x))

    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    again = nn.Sequential(nn.Identity(), GGUFLinear(512, 64))
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(again(x), src(x))


def test_load_state_dict_rejects_wrong_bytes():
    layer = GGUFLinear(64, 8, qtype="Q8_0")
    sd = layer.state_dict()
    sd["weight"] = torch.zeros(8, 10, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"expected packed Q8_0 uint8 bytes of shape \(8, 68\)"):
        layer.load_state_dict(sd)


def test_accelerate_offload_hook_keeps_bytes(make_blocks):
    accelerate = pytest.importorskip("accelerate")
    raw = torch.from_numpy(make_blocks("Q8_0", 16)).reshape(4, -1)
    model = nn.Sequential(GGUFLinear.from_raw(raw.clone(), "Q8_0", (4, 128), torch.randn(4)))
    x = torch.randn(2, 128)
    expected = model(x)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    assert model[0].weight.device.type == "meta"  # offloaded between calls
    assert torch.equal(model(x), expected)
    accelerate.hooks.remove_hook_from_submodules(model)


def test_from_linear_quantizes_with_gguf_py():
    lin = nn.Linear(128, 16)
    layer = GGUFLinear.from_linear(lin, "Q8_0")
    ref = gguf.quants.dequantize(gguf.quants.quantize(lin.weight.detach().numpy(), T.Q8_0), T.Q8_0)
    assert torch.equal(layer.dequantize_weight(), torch.from_numpy(ref))
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), lin(x), rtol=0.05, atol=0.05)  # close to the float layer


def test_gguf_weight_dim0_slices_are_byte_slices(make_blocks):
    raw = torch.from_numpy(make_blocks("Q4_K", 12 * 2)).reshape(12, -1)
    w = GGUFWeight(raw, "Q4_K", (12, 512))
    full = w.dequantize()
    q, k, v = w.chunk(3)
    assert q.shape == (4, 512) and q.raw.data_ptr() == raw.data_ptr()  # zero-copy
    assert torch.equal(k.dequantize(), full[4:8])
    a, b = w.split([5, 7])
    assert torch.equal(b.dequantize(), full[5:])
    swapped = GGUFWeight.cat([v, q])
    assert torch.equal(swapped.dequantize(), torch.cat([full[8:], full[:4]]))
    flat = GGUFWeight(raw.reshape(-1), "Q4_K", (12 * 512,))
    with pytest.raises(
        ValueError, match="one index spans 1 elements, not a whole number of 256-element blocks"
    ):
        flat.narrow(0, 256)
    # ComfyUI orig_shape tensors: odd trailing dims are fine as long as the total is whole blocks
    odd = GGUFWeight(raw, "Q4_K", (3, 4, 512))
    assert torch.equal(odd.dequantize(), full.reshape(3, 4, 512))
    with pytest.raises(ValueError, match="one index spans 6 elements"):
        GGUFWeight(raw, "Q4_K", (1024, 3, 2)).narrow(0, 1)


def test_gguf_weight_from_file(tmp_path, make_gguf, make_blocks):
    raw = make_blocks("Q5_K", 6).reshape(3, -1)
    make_gguf(tmp_path / "w.gguf", {"w": (raw, "Q5_K"), "b": (np.ones(3, np.float32), "F32")})
    f = read_gguf(tmp_path / "w.gguf")
    w = GGUFWeight.from_gguf(f, "w")
    assert w.qtype == "Q5_K" and w.shape == (3, 512) and w.is_quantized
    assert torch.equal(w.dequantize(), _ref_weight(raw, "Q5_K", (3, 512)))
    b = GGUFWeight.from_gguf(f, "b")
    assert b.qtype == "F32" and torch.equal(b.dequantize(), torch.ones(3))
    with pytest.raises(ValueError, match=r"shape \(3, 512\) must be 1056 bytes, got 10"):
        GGUFWeight(torch.zeros(10, dtype=torch.uint8), "Q5_K", (3, 512))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_move_and_forward(packed):
    qtype, raw, ref = packed
    layer = GGUFLinear.from_raw(torch.from_numpy(raw).clone(), qtype, (64, 512), bias=torch.randn(64))
    x = torch.randn(4, 512)
    cpu_out = layer(x)
    layer.to("cuda")
    assert layer.weight.is_cuda and layer.weight.dtype == torch.uint8
    assert torch.equal(layer.weight.cpu(), torch.from_numpy(raw))
    gpu_out = layer(x.cuda())
    assert gpu_out.is_cuda
    torch.testing.assert_close(gpu_out.cpu(), cpu_out, rtol=1e-4, atol=1e-3)
    layer.to("cpu")
    assert torch.equal(layer.weight, torch.from_numpy(raw))
