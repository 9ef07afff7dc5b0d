"""The hand-written Triton kernels (kernels.py) against each backend's pure-torch reference.

On the CPU Triton's interpreter runs the same kernel code (``KERNEL_DEVICES`` gains "cpu"): float16 and
float32 outputs must equal the reference bit for bit; bfloat16 within the interpreter's truncating cast. On
CUDA (``gpu`` marker) every output must equal the reference bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from diffusers_quant import fused, kernels
from diffusers_quant.backends import get_backend
from diffusers_quant.backends import quanto as quanto_backend
from diffusers_quant.backends.gguf import nn as gguf_nn
from diffusers_quant.backends.gguf.dequant import DEQUANTIZERS, block_info
from diffusers_quant.backends.gguf.quantize import to_ggml
from diffusers_quant.backends.nncf_ops import decompress
from diffusers_quant.spec import Spec

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
HALF = (torch.bfloat16, torch.float16)
# 100 x 384: rows and element counts that are not multiples of the kernels' block (masked tails)
ROWS, COLS = 100, 384


@pytest.fixture
def kernels_here(monkeypatch):
    monkeypatch.setattr(kernels, "KERNEL_DEVICES", {"cuda", "cpu"})
    monkeypatch.setattr(fused, "FUSED_DEVICES", {"cuda", "cpu"})
    monkeypatch.delenv(fused.REFERENCE_ENV, raising=False)
    monkeypatch.setenv(fused.FUSED_ENV, "all")


def _linear(dtype, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(COLS, ROWS).to(dtype)


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype and got.device == want.device
    if got.device.type == "cuda" or got.dtype != torch.bfloat16:
        assert torch.equal(got, want), (got.float() - want.float()).abs().max()
    else:  # the interpreter truncates float32 -> bfloat16: within a few ulps of the weight's magnitude
        bound = 4 * torch.finfo(torch.bfloat16).eps * want.float().abs().max().item()
        assert (got.float() - want.float()).abs().max().item() <= bound


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("qtype", ["qint8", "qfloat8", "qint4", "qint2"])
def test_quanto_kernels_decode_as_quanto_does(qtype, dtype, device, kernels_here):
    weight = _quantized_weight("quanto", qtype, dtype).to(device)
    with torch._C.DisableTorchFunctionSubclass():
        if qtype in ("qint4", "qint2"):
            args = (weight._data._data, weight._scale, weight._shift, weight._data.bits, *weight.shape)
            got, want = kernels.quanto_bits(*args), quanto_backend._bits_weight(*args)
        else:
            got = kernels.quanto_bytes(weight._data, weight._scale)
            want = quanto_backend._bytes_weight(weight._data, weight._scale)
    _same(got, want)


def _quantized_weight(backend, qtype, dtype):
    return (
        get_backend(backend).quantize_linear(_linear(dtype), Spec.parse(f"{backend}:{qtype}"), dtype).weight
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
def test_bnb_int8_kernel_decodes_as_bitsandbytes_does(dtype, device, kernels_here):
    from diffusers_quant.backends.bnb_int8 import int8_weight

    layer = (
        get_backend("bnb").quantize_linear(_linear(torch.bfloat16), Spec.parse("bnb:int8"), dtype).to(device)
    )
    data, scb = layer.weight.data, layer.weight.SCB
    assert scb is not None and scb.dtype == torch.float32
    _same(kernels.bnb_int8(data, scb, dtype), int8_weight(data, scb, dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
@pytest.mark.parametrize("qtype", ["int8", "int8_sym", "int4", "int4_sym"])
def test_nncf_kernel_decompresses_as_nncf_does(qtype, dtype, device, kernels_here):
    layer = get_backend("nncf").quantize_linear(_linear(torch.float32), Spec.parse(f"nncf:{qtype}"), dtype)
    pieces = [p.to(device) if isinstance(p, torch.Tensor) else p for p in layer._pieces()]
    _same(kernels.nncf(*pieces, dtype), decompress(*pieces, dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("qtype", list(kernels.GGML_TYPES))
def test_ggml_kernel_decodes_as_the_forward_does(qtype, dtype, device, kernels_here):
    torch.manual_seed(1)
    blocks = to_ggml(torch.randn(ROWS, COLS) * 0.05, qtype).reshape(-1, block_info(qtype)[1]).to(device)
    _same(kernels.ggml(qtype, blocks, dtype), DEQUANTIZERS[qtype](blocks, dtype))


def _random_k_blocks(qtype: str, n: int = 13) -> torch.Tensor:
    """``n`` super-blocks of random bytes with finite, modest fp16 scales (every byte pattern is a valid
    block otherwise)."""
    size = kernels.K_TYPES[qtype][1]
    gen = torch.Generator().manual_seed(size)
    blocks = torch.randint(0, 256, (n, size), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, 2, generator=gen) * 0.01).half().view(torch.uint8)
    at = 208 if qtype == "Q6_K" else 0
    blocks[:, at : at + (2 if qtype == "Q6_K" else 4)] = scales[:, : 2 if qtype == "Q6_K" else 4]
    return blocks


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("qtype", list(kernels.K_TYPES))
def test_k_quant_kernel_decodes_as_the_forward_does(qtype, dtype, device, kernels_here):
    blocks = _random_k_blocks(qtype).to(device)
    _same(kernels.ggml(qtype, blocks, dtype), DEQUANTIZERS[qtype](blocks, dtype))


def test_ggml_kernel_declines_what_it_does_not_cover(kernels_here):
    blocks = to_ggml(torch.randn(8, 256), "Q8_0").reshape(-1, 34)
    assert kernels.ggml("Q8_0", blocks, torch.float32) is None  # the reference decodes float32 exactly
    assert kernels.ggml("Q3_K", torch.zeros(8, 110, dtype=torch.uint8), torch.bfloat16) is None  # not covered
    assert kernels.ggml("Q4_K", torch.zeros(8, 144, dtype=torch.uint8), torch.float32) is None
    assert kernels.ggml("Q8_0", blocks[:, :33], torch.bfloat16) is None  # not a Q8_0 block row


@pytest.mark.parametrize(
    "backend,qtype",
    [("quanto", "qint8"), ("quanto", "qint4"), ("nncf", "int8"), ("nncf", "int4"), ("gguf", "q4_0")],
)
def test_layers_run_the_kernel_and_match_their_reference(backend, qtype, kernels_here, monkeypatch):
    """A quantized Linear's forward takes the hand-written kernel (not the compiled function) and gives the
    reference forward's output."""
    dtype = torch.float16  # exact in the interpreter
    layer = get_backend(backend).quantize_linear(_linear(dtype), Spec.parse(f"{backend}:{qtype}"), dtype)
    x = torch.randn(3, COLS, dtype=dtype)
    runner = _runner(backend, qtype)
    kernel_before, compiled_before = runner.kernel_calls, runner.fused_calls
    got = layer(x)
    assert runner.kernel_calls == kernel_before + 1 and runner.fused_calls == compiled_before
    monkeypatch.setenv(fused.REFERENCE_ENV, "1")
    want = layer(x)
    assert runner.kernel_calls == kernel_before + 1
    if backend == "quanto":  # quanto's own matmul scales after the int matmul: other roundings
        bound = 4 * torch.finfo(dtype).eps * want.abs().max().item()
        assert (got - want).abs().max().item() <= bound
    else:
        assert torch.equal(got, want)


def _runner(backend, qtype):
    if backend == "quanto":
        bytes_weight, bits_weight = quanto_backend._fused_weights()
        return bits_weight if qtype in ("qint4", "qint2") else bytes_weight
    if backend == "nncf":
        from diffusers_quant.backends.nncf_ops import _fused_decompress

        return _fused_decompress()
    return gguf_nn._fused_decoder(qtype.upper())


def test_kernels_stay_off_devices_not_listed():
    assert "cpu" not in kernels.KERNEL_DEVICES
    assert not kernels.available(torch.zeros(1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_activation_rows_quantize_as_compute_does(kind, dtype, device, kernels_here):
    """compute=fp8 / int8's per-token quantization: one launch, the same codes and scales as the torch ops
    (rows of 384 and 3000: a masked tail; an all-zero row takes the floor scale)."""
    from diffusers_quant.compute import quantize_rows

    for cols in (384, 3000):
        x = (torch.randn(37, cols, generator=torch.Generator().manual_seed(cols)) * 3).to(dtype).to(device)
        x[5] = 0
        codes, scales = kernels.quantize_rows(x, kind)
        want_codes, want_scales = quantize_rows(x, kind)
        assert torch.equal(scales, want_scales)
        assert codes.dtype == want_codes.dtype
        assert torch.equal(codes.view(torch.int8), want_codes.view(torch.int8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_epilogue_scales_as_compute_does(bias, dtype, device, kernels_here):
    gen = torch.Generator().manual_seed(0)
    acc = torch.randint(-(2**20), 2**20, (33, 1100), generator=gen, dtype=torch.int32).to(device)
    x_scale = torch.rand(33, 1, generator=gen).to(device) / 100
    w_scale = torch.rand(1100, generator=gen).to(device) / 100
    b = torch.randn(1100, generator=gen).to(dtype).to(device) if bias else None
    want = (acc.float() * x_scale * w_scale.view(1, -1)).to(dtype)
    if b is not None:
        want = want + b
    _same(kernels.scale_int_mm(acc, x_scale, w_scale, b, dtype), want)
    assert kernels.quantize_rows(torch.zeros(2, kernels.MAX_ROW + 16, device=device), "fp8") is None


class _StandInKernel:
    """A JIT function's launch surface: ``kernel[grid](...)`` compiles (returns a handle), the handle's
    ``[grid](*all_args)`` launches; both record what they were given."""

    arg_names = ("src", "out", "n", "TYPE", "ROWS")

    def __init__(self, handle_error: type[Exception] | None = None):
        self.jit_calls: list = []
        self.handle_calls: list = []
        self.handle_error = handle_error

    def __getitem__(self, grid):
        def jit(*args, **kwargs):
            self.jit_calls.append((grid, args, kwargs))
            return _StandInHandle(self)

        return jit


class _StandInHandle:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args):
            if self.kernel.handle_error is not None:
                raise self.kernel.handle_error("takes exactly 20 arguments")
            self.kernel.handle_calls.append((grid, args))

        return launch


def test_launches_go_through_the_handle_of_a_compile_with_the_same_specialization(monkeypatch):
    """The first launch of a signature compiles through the JIT; later ones with the same dtypes, pointer
    alignment and integer specialization launch the compiled handle with every argument in the kernel's
    order (constexprs included) and a 3-D grid; a launch Triton would specialize differently (an unaligned
    pointer, a length that is no multiple of 16) compiles again."""
    monkeypatch.setattr(kernels, "HANDLE_DEVICES", {"cpu"})
    monkeypatch.setattr(kernels, "_HANDLES", {})
    kernel = _StandInKernel()
    src, out = torch.zeros(64, dtype=torch.uint8), torch.zeros(64, dtype=torch.bfloat16)
    kernels._launch(kernel, (4,), src, out, 32, TYPE=1, ROWS=8, num_warps=4)
    assert len(kernel.jit_calls) == 1 and kernel.jit_calls[0][2] == {"TYPE": 1, "ROWS": 8, "num_warps": 4}
    kernels._launch(kernel, (4,), src, out, 48, TYPE=1, ROWS=8, num_warps=4)  # 48: also a multiple of 16
    assert kernel.handle_calls == [((4, 1, 1), (src, out, 48, 1, 8))]
    kernels._launch(kernel, (4,), src, out, 33, TYPE=1, ROWS=8, num_warps=4)  # not a multiple of 16
    kernels._launch(kernel, (4,), src[1:], out, 32, TYPE=1, ROWS=8, num_warps=4)  # a pointer off 16 bytes
    kernels._launch(kernel, (4,), src, out, 32, TYPE=2, ROWS=8, num_warps=4)  # another constexpr
    kernels._launch(kernel, (4,), src, out.float(), 32, TYPE=1, ROWS=8, num_warps=4)  # another dtype
    assert len(kernel.jit_calls) == 5 and len(kernel.handle_calls) == 1


def test_a_handle_that_refuses_its_arguments_turns_handles_off(monkeypatch):
    monkeypatch.setattr(kernels, "HANDLE_DEVICES", {"cpu"})
    monkeypatch.setattr(kernels, "_HANDLES", {})
    monkeypatch.setattr(kernels, "_handles_work", True)
    kernel = _StandInKernel(handle_error=TypeError)
    src, out = torch.zeros(64, dtype=torch.uint8), torch.zeros(64, dtype=torch.bfloat16)
    for _ in range(3):
        kernels._launch(kernel, (4,), src, out, 32, TYPE=1, ROWS=8)
    assert len(kernel.jit_calls) == 3 and not kernels._handles_work  # the JIT launched every time


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_1", "Q4_K"])
def test_handle_launches_decode_as_the_jit_does_on_cuda(qtype, kernels_here, monkeypatch):
    """On CUDA repeated decodes go through the handles; every one equals the reference, for block counts
    and pointer offsets that specialize differently (a multiple of 16 or not, 16-byte aligned or not)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (run on the GPU machine)")
    size = block_info(qtype)[1]
    width = 256 if qtype in kernels.K_TYPES else 32
    data = to_ggml(torch.randn(64, 4 * width) * 0.05, qtype).reshape(-1, size).cuda()
    monkeypatch.setattr(kernels, "_HANDLES", {})  # every signature compiles here first
    cases = (data, data[:13], data[1:], data[1:14], data, data[:13], data[1:])
    for blocks in cases:
        for _ in range(2):
            _same(kernels.ggml(qtype, blocks, torch.bfloat16), DEQUANTIZERS[qtype](blocks, torch.bfloat16))
    # one JIT launch per specialization (16-byte aligned or not, a multiple of 16 blocks or not) and grid,
    # then the handle's launcher
    per_program = kernels._GGML_PLANS[qtype][3]
    signatures = {
        (b.data_ptr() % 16 == 0, b.shape[0] % 16 == 0, -(-b.shape[0] // per_program)) for b in cases
    }
    assert kernels._handles_work and len(kernels._HANDLES) == len(signatures)
