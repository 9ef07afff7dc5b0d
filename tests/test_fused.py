"""The weight-only fast path (fused.py): each backend's fused dequantization against its reference.

On CUDA the fused kernels are the dequantization compiled by Inductor; here the same graphs compile for the
CPU (``FUSED_DEVICES`` gains "cpu"), so CI checks what the GPU runs. The GPU cases are under the ``gpu`` marker.
"""

from __future__ import annotations

import pytest
import torch

from diffusers_quant import fused
from diffusers_quant.backends import get_backend
from diffusers_quant.backends import quanto as quanto_backend
from diffusers_quant.backends.nncf_ops import _fused_decompress
from diffusers_quant.errors import QuantError
from diffusers_quant.spec import Spec

QUANTO = ("qint8", "qfloat8", "qint4", "qint2")
NNCF = ("int8", "int8_sym", "int4", "int4_sym")


@pytest.fixture
def fused_on_cpu(monkeypatch):
    monkeypatch.setattr(fused, "FUSED_DEVICES", {"cuda", "cpu"})
    monkeypatch.delenv(fused.REFERENCE_ENV, raising=False)
    monkeypatch.setenv(fused.FUSED_ENV, "all")


def _linear(dtype=torch.bfloat16, in_features=256, out_features=96, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features).to(dtype)


def _quantized(backend: str, qtype: str, dtype=torch.bfloat16):
    return get_backend(backend).quantize_linear(_linear(dtype), Spec.parse(f"{backend}:{qtype}"), dtype)


def _close(got, want, dtype):
    # the fused graph skips intermediate 16-bit roundings: a few ulps of the output's magnitude
    scale = want.abs().max().item()
    assert (got.float() - want.float()).abs().max().item() <= 4 * torch.finfo(dtype).eps * scale


@pytest.mark.parametrize("qtype", QUANTO)
def test_quanto_weights_decode_as_quanto_does(qtype):
    """The functions the kernels compile give quanto's own dequantized weight bit for bit."""
    weight = _quantized("quanto", qtype).weight
    with torch._C.DisableTorchFunctionSubclass():
        if qtype in ("qint4", "qint2"):
            mine = quanto_backend._bits_weight(
                weight._data._data, weight._scale, weight._shift, weight._data.bits, *weight.shape
            )
        else:
            mine = quanto_backend._bytes_weight(weight._data, weight._scale)
    assert torch.equal(mine, weight.dequantize())


@pytest.mark.parametrize("qtype", QUANTO)
def test_quanto_fused_linear_matches_quanto(qtype, fused_on_cpu, monkeypatch):
    layer = _quantized("quanto", qtype)
    x = torch.randn(2, 33, 256, dtype=torch.bfloat16)
    monkeypatch.setenv(fused.REFERENCE_ENV, "1")
    want = layer(x)  # quanto's own path
    monkeypatch.delenv(fused.REFERENCE_ENV)
    kernel = quanto_backend._fused_weights()[1 if qtype in ("qint4", "qint2") else 0]
    before = kernel.fused_calls
    got = layer(x)
    assert kernel.fused_calls == before + 1  # the compiled kernel ran
    _close(got, want, torch.bfloat16)


def test_quanto_leaves_what_it_cannot_fuse_to_quanto(fused_on_cpu):
    """A float32 input on a bf16 weight (quanto promotes), or quanto's activation quantization."""
    layer = _quantized("quanto", "qint8")
    kernels = quanto_backend._fused_weights()
    before = kernels[0].fused_calls
    out = layer(torch.randn(3, 256))  # float32 input, bf16 scales
    assert kernels[0].fused_calls == before
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("qtype", NNCF)
def test_nncf_fused_matches_reference(qtype, fused_on_cpu, monkeypatch):
    layer = _quantized("nncf", qtype)
    x = torch.randn(2, 17, 256, dtype=torch.bfloat16)
    monkeypatch.setattr(fused, "FUSED_DEVICES", {"cuda"})
    want = layer(x)
    monkeypatch.setattr(fused, "FUSED_DEVICES", {"cuda", "cpu"})
    before = _fused_decompress().fused_calls
    got = layer(x)
    assert _fused_decompress().fused_calls == before + 1
    _close(got, want, torch.bfloat16)


def test_reference_switch_turns_every_fused_path_off(fused_on_cpu, monkeypatch):
    monkeypatch.setenv(fused.REFERENCE_ENV, "1")
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    quanto_layer, nncf_layer = _quantized("quanto", "qint4"), _quantized("nncf", "int4")
    counts = [quanto_backend._fused_weights()[1].fused_calls, _fused_decompress().fused_calls]
    quanto_layer(x), nncf_layer(x)
    assert [quanto_backend._fused_weights()[1].fused_calls, _fused_decompress().fused_calls] == counts


def test_by_default_every_backend_fuses_and_the_switch_picks(fused_on_cpu, monkeypatch):
    """With the hand-written kernels every backend's eager step was faster fused on the GPU (kernels.py);
    the switch picks a subset."""
    monkeypatch.delenv(fused.FUSED_ENV)
    assert fused.fused_backends() == frozenset(fused.FUSED_BACKENDS)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    quanto_layer, nncf_layer = _quantized("quanto", "qint4"), _quantized("nncf", "int4")
    quanto_kernel = quanto_backend._fused_weights()[1]
    counts = [quanto_kernel.fused_calls, _fused_decompress().fused_calls]
    quanto_layer(x), nncf_layer(x)
    assert [quanto_kernel.fused_calls, _fused_decompress().fused_calls] == [counts[0] + 1, counts[1] + 1]
    monkeypatch.setenv(fused.FUSED_ENV, "nncf")
    quanto_layer(x), nncf_layer(x)
    assert [quanto_kernel.fused_calls, _fused_decompress().fused_calls] == [counts[0] + 1, counts[1] + 2]
    monkeypatch.setenv(fused.FUSED_ENV, "none")
    assert fused.fused_backends() == frozenset()


def test_an_unknown_backend_in_the_switch_names_the_choices(monkeypatch):
    monkeypatch.setenv(fused.FUSED_ENV, "quanto,gguff")
    with pytest.raises(
        QuantError,
        match=r"unknown backend\(s\) gguff; expected all, none, or a comma list of bnb, gguf, nncf, quanto",
    ):
        fused.fused_backends()


@pytest.mark.parametrize(
    ("backend", "qtype"),
    [
        ("quanto", "qint4"),
        ("quanto", "qint8"),
        ("nncf", "int4_sym"),
        ("bnb", "nf4"),
        ("bnb", "int8"),
        ("gguf", "q8_0"),
    ],
)
def test_no_graph_break_inside_a_quantized_linear(backend, qtype, fused_on_cpu):
    """Compiled inside a model, a layer is traced whole (the fused path stands aside for the outer graph)."""
    layer = _quantized(backend, qtype)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(torch.randn(2, 9, 256, dtype=torch.bfloat16))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize(
    ("backend", "qtype"), [("quanto", "qint8"), ("quanto", "qfloat8"), ("nncf", "int8"), ("nncf", "int4")]
)
def test_no_graph_break_where_the_cpu_has_its_own_eager_path(backend, qtype, monkeypatch):
    """The CPU's eager paths (quanto's float8 decoding, NNCF's float32 blocks) stand aside when compiled:
    the layer is traced whole, as on CUDA."""
    monkeypatch.delenv(fused.REFERENCE_ENV, raising=False)
    monkeypatch.delenv(fused.FUSED_ENV, raising=False)
    layer = _quantized(backend, qtype)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(torch.randn(2, 9, 256, dtype=torch.bfloat16))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize(("backend", "qtype"), [("quanto", "qint8"), ("quanto", "qint4"), ("nncf", "int8")])
def test_fake_tensors_take_the_traced_path(backend, qtype, fused_on_cpu, monkeypatch):
    """dynamo runs a call it does not inline (a quanto weight's ``__torch_function__``) on fake tensors, where
    torch 2.11 does not report compiling: such a call must take the plain ops, never launch a kernel (on the
    H200 every compiled quanto model failed there: "Dynamo failed to run FX node with fake tensors")."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from diffusers_quant import kernels

    monkeypatch.setattr(kernels, "KERNEL_DEVICES", {"cuda", "cpu"})
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    layer = _quantized(backend, qtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(3, 256, dtype=torch.bfloat16)
        assert fused.fast_path(x, backend) == "traced"
        out = layer(x)
    assert out.shape == (3, 96) and fused.tracing(out)


def _aot_graph_ops(layer, x) -> tuple[torch.Tensor, set[str]]:
    """``layer(x)`` compiled, and the op namespaces of the graph AOTAutograd hands the compiler."""
    from torch._dynamo.backends.common import aot_autograd

    namespaces: set[str] = set()

    def record(gm, _inputs):
        namespaces.update(str(n.target).split(".")[0] for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    return torch.compile(layer, backend=aot_autograd(fw_compiler=record))(x), namespaces


@pytest.mark.parametrize("qtype", QUANTO)
def test_compiled_quanto_layer_traces_our_dequantization(qtype, monkeypatch):
    """Inside a compiled region a quanto layer's graph is this package's dequantization and one matmul
    (which Inductor fuses), not quanto's opaque ops (``quanto.qbytes_mm``, ``quanto.unpack``: they ran
    1.2-1.5x compiled bf16 on the H200): torch.compile traces with fake tensors, which the fused path takes."""
    monkeypatch.delenv(fused.REFERENCE_ENV, raising=False)
    monkeypatch.delenv(fused.FUSED_ENV, raising=False)
    layer = _quantized("quanto", qtype)
    x = torch.randn(2, 9, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        got, namespaces = _aot_graph_ops(layer, x)
        monkeypatch.setenv(fused.REFERENCE_ENV, "1")
        want = layer(x)
    assert "quanto" not in namespaces and "aten" in namespaces, namespaces
    _close(got, want, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["kernel", "compiled"])
@pytest.mark.parametrize(
    ("backend", "qtype"), [*(("quanto", q) for q in QUANTO), *(("nncf", q) for q in NNCF)]
)
def test_fused_kernels_on_cuda(backend, qtype, path, monkeypatch):
    """Both fast paths on CUDA: the hand-written Triton kernel (kernels.py), and with it off the compiled
    function."""
    from diffusers_quant import kernels

    if path == "compiled":
        monkeypatch.setattr(kernels, "KERNEL_DEVICES", set())
    monkeypatch.setenv(fused.FUSED_ENV, "all")
    layer = _quantized(backend, qtype).to("cuda")
    x = torch.randn(4, 512, 256, dtype=torch.bfloat16, device="cuda")
    monkeypatch.setenv(fused.REFERENCE_ENV, "1")
    want = layer(x)
    monkeypatch.delenv(fused.REFERENCE_ENV)
    if backend == "nncf":
        runner = _fused_decompress()
    else:
        runner = quanto_backend._fused_weights()[qtype in ("qint4", "qint2")]
    counts = runner.kernel_calls, runner.fused_calls
    _close(layer(x), want, torch.bfloat16)
    took_kernel = path == "kernel"
    assert (runner.kernel_calls, runner.fused_calls) == (
        counts[0] + took_kernel,
        counts[1] + (not took_kernel),
    )
