"""quanto weights quantized in blocks of rows: exactly quanto's own result, kept portable through moves."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

quanto = pytest.importorskip("optimum.quanto")

from helpers import compiled_graph_ops, rel_l2  # noqa: E402
from optimum.quanto.tensor.weights import WeightQBitsTensor, WeightQBytesTensor, quantize_weight  # noqa: E402

from diffusers_quant.backends import get_backend  # noqa: E402
from diffusers_quant.backends.quanto import (  # noqa: E402
    _bytes_weight,
    _cpu_bytes_weight,
    _fused_weights,
    portable_class,
    quantize_in_row_blocks,
)
from diffusers_quant.post_load import state_nbytes  # noqa: E402
from diffusers_quant.spec import Spec  # noqa: E402

QTYPES = ("qint8", "qint4", "qint2", "qfloat8")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# relative L2 of one output computed in two orders: the dtype's rounding
ROUNDING = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-6}


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return rel_l2(a.detach().float(), b.detach().float())


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


def _reference(linear: torch.nn.Linear, qtype: str):
    """What quanto computes for this layer, in its portable (unoptimized) layout: freeze() would repack
    bf16 int4 for tinygemm and float8 for Marlin on a recent GPU."""
    layer = quanto.QLinear.from_module(linear, weights=getattr(quanto, qtype))
    if layer.weight_qtype.bits == 8:
        scale = layer.optimizer(layer.weight, qtype=layer.weight_qtype, axis=0)
        return quantize_weight(
            layer.weight.detach(), qtype=layer.weight_qtype, axis=0, scale=scale, optimized=False
        )
    scale, shift = layer.optimizer(
        layer.weight, qtype=layer.weight_qtype, axis=0, group_size=layer.weight_group_size
    )
    return quantize_weight(
        layer.weight.detach(),
        qtype=layer.weight_qtype,
        axis=0,
        scale=scale,
        shift=shift,
        group_size=layer.weight_group_size,
        optimized=False,
    )


def _blocked(linear: torch.nn.Linear, qtype: str, block_elements: int, device=None):
    layer = quanto.QLinear.from_module(linear, weights=getattr(quanto, qtype))
    with torch.no_grad():
        return quantize_in_row_blocks(
            layer.weight, layer.weight_qtype, layer.optimizer, layer.weight_group_size, block_elements, device
        )


def _assert_same_weight(reference, got):
    want, have = _inner(reference), _inner(got)
    assert want.keys() == have.keys()
    for name in want:
        assert want[name].shape == have[name].shape, name
        assert torch.equal(want[name], have[name]), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("in_features", [256, 128], ids=["grouped", "one-group-per-row"])
def test_row_blocks_equal_quantos_result_on_cpu(qtype, dtype, in_features, monkeypatch):
    """quanto's weight bytes, so quanto's output through quanto's own matmul (the reference switch); the CPU
    path (our dequantization and one matmul: quanto scales int8 outputs after its matmul) within the
    dtype's rounding of it."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, 330, dtype=dtype)  # 6 rows per block: 55 blocks, the last short
    reference = _reference(linear, qtype)
    blocked = _blocked(linear, qtype, block_elements=in_features * 6)
    _assert_same_weight(reference, blocked)
    assert type(blocked) is portable_class(blocked.qtype.bits)
    x = torch.randn(5, in_features, dtype=dtype)
    expected = torch.nn.functional.linear(x, reference, linear.bias)
    fast = torch.nn.functional.linear(x, blocked, linear.bias)
    assert _err(fast, expected) < ROUNDING[dtype]
    monkeypatch.setenv("DIFFUSERS_QUANT_REFERENCE", "1")
    torch.testing.assert_close(torch.nn.functional.linear(x, blocked, linear.bias), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_float8_decoding_is_the_cast_bit_for_bit(dtype):
    """Every finite float8 e4m3 code (subnormals, zeros, +-448) times a scale, decoded by integer ops on
    the CPU, equals quanto's cast and multiply."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    codes = codes[~torch.isnan(codes.float())].reshape(1, -1).expand(6, -1).contiguous()
    scale = (torch.tensor([1.0, 0.37, 3e-3, 1e-5, 2.5e-2, 7.0]).reshape(6, 1)).to(dtype)
    assert torch.equal(_cpu_bytes_weight(codes, scale), _bytes_weight(codes, scale))


def test_cpu_layers_skip_quantos_dispatch_and_its_int8_kernel(monkeypatch):
    """On the CPU a quanto layer runs our dequantization and one matmul: quanto's own CPU int8 kernel, a
    matrix-vector kernel several times slower than the bf16 matmul at diffusion token counts, is not
    called, nor is it under the reference switch turned off."""
    called = []
    real = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: called.append(1) or real(*a))
    monkeypatch.delenv("DIFFUSERS_QUANT_REFERENCE", raising=False)
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, dtype=torch.bfloat16)
    layer = get_backend("quanto").quantize_linear(linear, Spec.parse("quanto:qint8"), torch.bfloat16)
    x = torch.randn(2, 9, 256, dtype=torch.bfloat16)
    ours = layer(x)
    assert not called
    monkeypatch.setenv("DIFFUSERS_QUANT_REFERENCE", "1")
    assert _err(ours, layer(x)) < ROUNDING[torch.bfloat16] and called  # quanto's own path: its kernel


def test_a_layer_whose_width_quantos_int8_kernel_overruns_runs():
    """quanto 0.2.7 sends bfloat16 inputs to torch's int8 CPU kernel whenever in_features % 4 == 0, and the
    kernel segfaults unless in_features is a multiple of 16: layers of width 36 and 40 run (in a child
    process, so a crash fails this test, not the run), fast path and reference switch alike, and match a
    float32 matmul of the dequantized weight."""
    script = textwrap.dedent(
        """
        import os, torch
        from diffusers_quant.backends import get_backend
        from diffusers_quant.spec import Spec
        backend = get_backend("quanto")
        for reference in ("0", "1"):
            os.environ["DIFFUSERS_QUANT_REFERENCE"] = reference
            for width in (36, 40):
                torch.manual_seed(0)
                linear = torch.nn.Linear(width, 64).to(torch.bfloat16)
                layer = backend.quantize_linear(linear, Spec.parse("quanto:qint8"), torch.bfloat16)
                x = torch.randn(3, width, dtype=torch.bfloat16)
                weight = backend.dequantize_weight(layer).float()
                want = torch.nn.functional.linear(x.float(), weight, linear.bias.float())
                err = ((layer(x).float() - want).norm() / want.norm()).item()
                assert err < 1e-2, (reference, width, err)
        print("ran")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ran")


@pytest.mark.parametrize("qtype", QTYPES)
def test_portable_weights_stay_portable_through_moves_and_save_as_quantos_own(qtype):
    # quanto would repack on a move (int4 for tinygemm, float8 for Marlin); ours keeps the layout.
    torch.manual_seed(0)
    weight = _blocked(torch.nn.Linear(256, 64, dtype=torch.bfloat16), qtype, block_elements=256 * 16)
    portable = portable_class(weight.qtype.bits)
    on_meta = weight.to("meta")  # a real device move, as CPU <-> CUDA is on the GPU machine
    assert type(on_meta) is portable and on_meta.device.type == "meta"
    assert on_meta._data.device.type == on_meta._scale.device.type == "meta"
    detached = weight.detach()
    assert type(detached) is portable
    _assert_same_weight(weight, detached)
    with pytest.raises(ValueError, match="dtype of a quantized quanto weight cannot be changed"):
        weight.to(torch.float16)
    if weight.qtype.bits == 8:
        saved, quantos = weight.weight_qbytes_tensor(), WeightQBytesTensor
    else:
        saved, quantos = weight.weight_qbits_tensor(), WeightQBitsTensor
    assert type(saved) is quantos
    _assert_same_weight(weight, saved)
    state = {}
    weight.save_to_state_dict(state, "w.", keep_vars=False)
    assert {k: v.shape for k, v in state.items()} == {
        k: v.shape
        for k, v in _saved(_reference(torch.nn.Linear(256, 64, dtype=torch.bfloat16), qtype)).items()
    }


def _saved(weight) -> dict:
    state = {}
    weight.save_to_state_dict(state, "w.", keep_vars=False)
    return state


def test_backend_layer_matches_quanto_and_reports_its_bytes_without_unpacking(monkeypatch):
    """The report counts bytes from the tensors held: quanto's state_dict() would convert layouts (for
    tinygemm int4 through an identity-matrix matmul, a 2.4x GPU peak on Flux-width)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128, dtype=torch.bfloat16)
    layer = get_backend("quanto").quantize_linear(linear, Spec.parse("quanto:qint4"), torch.bfloat16)
    expected = sum(t.numel() * t.element_size() for t in _inner(layer.weight).values())
    expected += sum(t.numel() * t.element_size() for n, t in layer.named_buffers()) + 128 * 2  # bias
    monkeypatch.setattr(
        portable_class(),
        "weight_qbits_tensor",
        lambda self: pytest.fail("state_dict conversion during count"),
    )
    assert state_nbytes(layer) == expected
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    expected = torch.nn.functional.linear(x, _reference(linear, "qint4"), linear.bias)
    assert _err(layer(x), expected) < ROUNDING[torch.bfloat16]
    monkeypatch.setenv("DIFFUSERS_QUANT_REFERENCE", "1")
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("qtype", QTYPES)
def test_host_weight_quantized_for_cuda_block_by_block(qtype, dtype):
    # A CPU weight quantized for CUDA equals quanto's own result computed on CUDA, and keeps its layout.
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 1344, dtype=dtype)
    reference = _reference(linear.cuda(), qtype)
    blocked = _blocked(linear.cpu(), qtype, block_elements=512 * 64, device=torch.device("cuda"))
    assert blocked.device.type == "cuda"
    assert type(blocked) is portable_class(blocked.qtype.bits)
    _assert_same_weight(reference, blocked)
    moved = blocked.to("cpu").to("cuda")
    assert type(moved) is type(blocked)


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", QTYPES)
def test_cuda_peak_stays_near_the_result_for_flux_largest_linear(qtype):
    """Flux's largest Linear (3072 x 15360), from the host: the GPU never holds it in bf16, only the
    result plus a few MB of block temporaries."""
    linear = torch.nn.Linear(15360, 3072, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    layer = get_backend("quanto").quantize_linear(
        linear, Spec.parse(f"quanto:{qtype}"), torch.bfloat16, "cuda"
    )
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    stored = torch.cuda.memory_allocated() - start
    assert layer.weight.device.type == "cuda" and layer.bias.device.type == "cuda"
    assert peak <= stored + 16 * 2**20, (qtype, peak / 2**20, stored / 2**20)


@pytest.mark.parametrize("qtype", ["qint8", "qfloat8", "qint4", "qint2"])
def test_compiled_layer_decodes_8_bit_weights_with_the_hand_written_kernel(qtype, monkeypatch):
    """Inside a compiled graph an 8-bit quanto weight is decoded by our op (a triton_op: on CUDA Inductor's
    code launches the hand-written kernel, tested below; off CUDA it decomposes to the plain decode, so here
    the graph shows only that decode: the op's calls while traced are counted instead); a 2/4-bit weight's
    decode is traced (Inductor's kernel was faster there), as is every weight's with the reference forced;
    outputs stay within rounding of each other."""
    from diffusers_quant import fused, kernels

    monkeypatch.setattr(kernels, "KERNEL_DEVICES", {"cuda", "cpu"})
    monkeypatch.setattr(fused, "FUSED_DEVICES", {"cuda", "cpu"})
    monkeypatch.delenv(fused.REFERENCE_ENV, raising=False)
    monkeypatch.setenv(fused.FUSED_ENV, "all")
    traced_calls = []
    kernel = kernels.quanto_bytes

    def counted(data, scale):
        traced_calls.append(kernels.tracing(data))
        return kernel(data, scale)

    _fused_weights()  # built (and cached) before the patch: eager layers keep the real kernel
    monkeypatch.setattr(kernels, "quanto_bytes", counted)  # what the op calls
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 64).to(torch.bfloat16)
    layer = get_backend("quanto").quantize_linear(linear, Spec.parse(f"quanto:{qtype}"), torch.bfloat16)
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = layer(x)  # the hand-written kernel, eager
        got, ops = compiled_graph_ops(layer, x)
        in_graph = list(traced_calls)
        monkeypatch.setenv(fused.REFERENCE_ENV, "1")
        want, reference_ops = compiled_graph_ops(layer, x)
    assert (True in in_graph) == (qtype in ("qint8", "qfloat8")), in_graph
    assert len(traced_calls) == len(in_graph)  # none with the reference forced
    assert not any(op.startswith("diffusers_quant") for op in ops | reference_ops)
    assert _err(got, want) < 1e-2 and _err(got, eager) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ["qint8", "qfloat8"])
def test_compiled_graph_launches_the_8_bit_kernel_from_inductors_code_on_cuda(qtype, monkeypatch):
    """On CUDA the 8-bit op is no opaque call in the compiled code: Inductor's code launches the
    hand-written kernel itself, and the decoded weight equals the eager kernel's bit for bit."""
    from torch._inductor.utils import run_and_get_code

    from diffusers_quant import fused, kernels
    from diffusers_quant.backends.quanto_ops import bytes_weight

    monkeypatch.delenv(fused.REFERENCE_ENV, raising=False)
    monkeypatch.setenv(fused.FUSED_ENV, "all")
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128).to(torch.bfloat16)
    layer = get_backend("quanto").quantize_linear(linear, Spec.parse(f"quanto:{qtype}"), torch.bfloat16)
    layer = layer.to("cuda")
    x = torch.randn(4, 64, 256, dtype=torch.bfloat16, device="cuda")
    with torch._C.DisableTorchFunctionSubclass():
        data, scale = layer.weight._data, layer.weight._scale
    with torch.no_grad():
        torch._dynamo.reset()
        got, code = run_and_get_code(torch.compile(bytes_weight, fullgraph=True), data, scale)
        assert torch.equal(got, kernels.quanto_bytes(data, scale))
        eager = layer(x)
        torch._dynamo.reset()
        out, layer_code = run_and_get_code(torch.compile(layer), x)
    for source in ("\n".join(code), "\n".join(layer_code)):
        # the kernel's own source and launch; no call of the op (its name is only in comments)
        assert "grouped" in source and "diffusers_quant.quanto_bytes" not in source, source[:2000]
    assert _err(out.cpu(), eager.cpu()) < 1e-2
