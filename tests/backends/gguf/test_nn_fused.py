"""GGUFLinear's fused dequantization (fused.py) against its reference decode, compiled here for the CPU."""

from __future__ import annotations

import pytest
import torch
from helpers import compiled_graph_ops

from diffusers_quant import fused
from diffusers_quant.backends.gguf.dequant import block_info
from diffusers_quant.backends.gguf.nn import GGUFLinear, _fused_decoder

QTYPES = ("Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K")


def _layer(qtype: str, make_blocks, out_features: int = 16) -> GGUFLinear:
    block_size, _ = block_info(qtype)
    in_features = 2 * max(block_size, 32)
    blocks = out_features * in_features // block_size
    raw = torch.from_numpy(make_blocks(qtype, blocks, seed=3)).reshape(out_features, -1)
    return GGUFLinear.from_raw(raw, qtype, (out_features, in_features), torch.randn(out_features))


@pytest.mark.parametrize("qtype", QTYPES)
def test_fused_forward_matches_the_reference_decode(qtype, make_blocks, monkeypatch):
    layer = _layer(qtype, make_blocks)
    x = torch.randn(3, 5, layer.in_features, dtype=torch.bfloat16)
    want = layer(x)  # CPU: the reference decode
    monkeypatch.setattr(fused, "FUSED_DEVICES", {"cuda", "cpu"})
    monkeypatch.setenv(fused.FUSED_ENV, "gguf")
    kernel = _fused_decoder(qtype)
    before = kernel.fused_calls
    got = layer(x)
    assert kernel.fused_calls == before + 1
    scale = want.abs().max().item()
    assert (got.float() - want.float()).abs().max().item() <= 8 * torch.finfo(torch.bfloat16).eps * scale


@pytest.mark.parametrize("qtype", ("Q8_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K"))
def test_compiled_layer_decodes_with_the_hand_written_kernel(qtype, make_blocks, monkeypatch):
    """Inside a compiled graph a covered type is decoded by our op (a triton_op: on CUDA Inductor's code
    launches the hand-written kernel, tested below; here, off CUDA, it decomposes to the plain decode);
    uncovered (float32 compute) or with the reference forced, the graph holds the plain decode ops instead."""
    from diffusers_quant import kernels

    monkeypatch.setattr(kernels, "KERNEL_DEVICES", {"cuda", "cpu"})
    monkeypatch.setattr(fused, "FUSED_DEVICES", {"cuda", "cpu"})
    monkeypatch.delenv(fused.REFERENCE_ENV, raising=False)
    monkeypatch.delenv(fused.FUSED_ENV, raising=False)
    layer = _layer(qtype, make_blocks)
    x = torch.randn(3, 5, layer.in_features, dtype=torch.bfloat16)
    runner = _fused_decoder(qtype)
    with torch.no_grad():
        calls = runner.kernel_calls
        eager = layer(x)  # the hand-written kernel, eager
        assert runner.kernel_calls == calls + 1
        got, ops = compiled_graph_ops(layer, x, fullgraph=True)
        assert "diffusers_quant.ggml_decode.default" in ops, ops
        got32, ops32 = compiled_graph_ops(layer, x.float(), fullgraph=True)
        assert not any(op.startswith("diffusers_quant") for op in ops32), ops32
        monkeypatch.setenv(fused.REFERENCE_ENV, "1")
        _, reference_ops = compiled_graph_ops(layer, x, fullgraph=True)
        assert not any(op.startswith("diffusers_quant") for op in reference_ops), reference_ops
        want = layer(x)
    scale = want.abs().max().item()
    for out in (got, eager):
        assert (out.float() - want.float()).abs().max().item() <= 8 * torch.finfo(torch.bfloat16).eps * scale


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ("Q8_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K"))
def test_compiled_graph_launches_the_kernel_from_inductors_code_on_cuda(qtype, make_blocks, monkeypatch):
    """On CUDA the op is no opaque call in the compiled code: Inductor's code launches the hand-written
    kernel itself, and the decoded weight equals the eager kernel's bit for bit."""
    from torch._inductor.utils import run_and_get_code

    from diffusers_quant import kernels
    from diffusers_quant.backends.gguf.nn import ggml_decode

    monkeypatch.delenv(fused.REFERENCE_ENV, raising=False)
    monkeypatch.delenv(fused.FUSED_ENV, raising=False)
    layer = _layer(qtype, make_blocks, out_features=64).to("cuda")
    blocks = layer.weight.reshape(-1, layer._type_size)
    x = torch.randn(4, 64, layer.in_features, dtype=torch.bfloat16, device="cuda")
    kernel = "k_blocks" if qtype in kernels.K_TYPES else "ggml_blocks"
    with torch.no_grad():
        torch._dynamo.reset()
        decode = torch.compile(lambda b: ggml_decode(b, qtype, torch.bfloat16), fullgraph=True)
        got, code = run_and_get_code(decode, blocks)
        assert torch.equal(got, kernels.ggml(qtype, blocks, torch.bfloat16))
        eager = layer(x)
        torch._dynamo.reset()
        out, layer_code = run_and_get_code(torch.compile(layer, fullgraph=True), x)
    for source in ("\n".join(code), "\n".join(layer_code)):
        # the kernel's own source and launch; no call of the op (its name is only in comments)
        assert kernel in source and "diffusers_quant.ggml_decode" not in source, source[:2000]
    scale = eager.abs().max().item()
    assert (out.float() - eager.float()).abs().max().item() <= 8 * torch.finfo(torch.bfloat16).eps * scale


def test_float_tensors_are_not_fused(monkeypatch):
    layer = GGUFLinear.from_linear(torch.nn.Linear(64, 8), "F16")
    monkeypatch.setattr(fused, "FUSED_DEVICES", {"cuda", "cpu"})
    monkeypatch.setenv(fused.FUSED_ENV, "all")
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.dequantize_weight(), layer.bias))


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["kernel", "compiled"])
@pytest.mark.parametrize("qtype", QTYPES)
def test_fused_forward_on_cuda(qtype, path, make_blocks, monkeypatch):
    """Both fast paths on CUDA: the hand-written kernel where it covers the type (kernels.GGML_TYPES), and
    the compiled decoder."""
    from diffusers_quant import kernels

    if path == "compiled":
        monkeypatch.setattr(kernels, "KERNEL_DEVICES", set())
    monkeypatch.setenv(fused.FUSED_ENV, "gguf")
    layer = _layer(qtype, make_blocks).to("cuda")
    x = torch.randn(4, 64, layer.in_features, dtype=torch.bfloat16, device="cuda")
    monkeypatch.setenv(fused.REFERENCE_ENV, "1")
    want = layer(x)
    monkeypatch.delenv(fused.REFERENCE_ENV)
    runner = _fused_decoder(layer.qtype)
    counts = runner.kernel_calls, runner.fused_calls
    got = layer(x)
    scale = want.abs().max().item()
    assert (got.float() - want.float()).abs().max().item() <= 8 * torch.finfo(torch.bfloat16).eps * scale
    took_kernel = path == "kernel" and kernels.covers_ggml(layer.qtype, torch.bfloat16)
    assert (runner.kernel_calls, runner.fused_calls) == (
        counts[0] + took_kernel,
        counts[1] + (not took_kernel),
    )
