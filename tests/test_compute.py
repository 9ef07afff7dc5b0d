"""compute=fp8 / int8: the W8A8 kernels against the pure-torch reference, and the plan setting on a real
quanto model (switched layers, output close to weight-only, save / reload, refusals)."""

from __future__ import annotations

import pytest
import torch

import diffusers_quant
from diffusers_quant.compute import (
    disable_compute,
    quantize_rows,
    w8a8_kernel,
    w8a8_reference,
)
from diffusers_quant.errors import PlanRefused, SpecError
from diffusers_quant.fused import REFERENCE_ENV
from diffusers_quant.spec import Plan

pytest.importorskip("optimum.quanto")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_the_kernel_matches_the_reference(kind):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 64, generator=gen).to(torch.bfloat16)
    w = torch.randn(48, 64, generator=gen)
    if kind == "fp8":
        codes, scale = quantize_rows(w, "fp8")
    else:
        codes, scale = quantize_rows(w, "int8")
    bias = torch.randn(48, generator=gen).to(torch.bfloat16)
    ours = w8a8_kernel(x, codes, scale.flatten(), bias, kind)
    reference = w8a8_reference(x, codes, scale.flatten(), bias, kind)
    assert ours.shape == (2, 24, 48) and ours.dtype == torch.bfloat16
    assert _rel(ours, reference) < 1e-2
    # and both are close to the full-precision product (8-bit activations and weights)
    exact = x.float() @ w.t() + bias.float()
    assert _rel(reference, exact) < (6e-2 if kind == "fp8" else 2e-2)


@pytest.mark.parametrize("kind, step", [("fp8", 2**-3), ("int8", 0.5)])
def test_rows_are_quantized_within_half_a_step(kind, step):
    x = torch.randn(8, 32)
    codes, scale = quantize_rows(x, kind)
    back = codes.float() * scale
    # fp8 e4m3 has 3 mantissa bits: within 2**-4 relative; int8 within half a code
    err = (back - x).abs() / (x.abs() * step if kind == "fp8" else scale)
    assert float(err.max()) <= 0.5 + 1e-6


def _tiny_flux(folder):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    FluxTransformer2DModel(
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        in_channels=16,
        axes_dims_rope=(4, 6, 6),
    ).save_pretrained(folder)


def _same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Every saved tensor of ``a`` equals ``b``'s byte for byte (quantized codes compared as bytes)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key, x in sa.items():
        y = sb[key]
        assert x.dtype == y.dtype and x.shape == y.shape, key
        x, y = x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)
        assert torch.equal(x, y), key


def _run(model):
    gen = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 32, 16, generator=gen),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=gen),
        pooled_projections=torch.randn(1, 32, generator=gen),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(32, 3),
        txt_ids=torch.zeros(8, 3),
        return_dict=False,
    )
    with torch.no_grad():
        return model(**inputs)[0]


def _three_loads(folder, spec: str, compute: str):
    """The tiny transformer loaded plain, weight-only with ``spec``, and with ``spec`` and ``compute``."""
    from diffusers import FluxTransformer2DModel

    _tiny_flux(folder)
    diffusers_quant.install()
    try:
        plain = FluxTransformer2DModel.from_pretrained(folder)
        weight_only = FluxTransformer2DModel.from_pretrained(folder, quant=f"transformer={spec}")
        w8a8 = FluxTransformer2DModel.from_pretrained(folder, quant=f"transformer={spec};compute={compute}")
    finally:
        diffusers_quant.uninstall()
    return plain, weight_only, w8a8


def _check_switched_model(tmp_path, monkeypatch, plain, weight_only, w8a8, compute: str, layers: int) -> None:
    """A model switched to ``compute``: its report, its output (near plain, not weight-only's), the reference
    switch, the save / reload (weight-only again, the same tensors) and the switch both ways."""
    from diffusers import FluxTransformer2DModel

    row = w8a8.quant_report.components[0]
    assert row.compute == f"{compute} x{layers}" and f"compute={compute}" in str(w8a8.quant_report)
    expected = _run(plain)
    out = _run(w8a8)
    # activations quantized too: close to the weight-only model, not equal to it
    assert _rel(out, expected) < 5e-2 and not torch.equal(out, _run(weight_only))
    # the switch forces the reference, which agrees with the kernel
    monkeypatch.setenv(REFERENCE_ENV, "1")
    assert _rel(_run(w8a8), out) < 1e-2
    monkeypatch.delenv(REFERENCE_ENV)
    # still the library's model: it saves in its layout and reloads weight-only
    w8a8.save_pretrained(tmp_path / "saved")
    diffusers_quant.install()
    try:
        again = FluxTransformer2DModel.from_pretrained(tmp_path / "saved")
    finally:
        diffusers_quant.uninstall()
    # the same tensors bit for bit; the output within float32 rounding (MKL's float32 matmul rounds by the
    # weights' memory alignment on some CPUs, and the reload places the unquantized weights differently)
    _same_tensors(again, weight_only)
    assert _rel(_run(again), _run(weight_only)) < 1e-5
    assert disable_compute(w8a8) == layers
    assert torch.equal(_run(w8a8), _run(weight_only))
    # the same switch on a model loaded weight-only, through the public function
    assert diffusers_quant.enable_compute(weight_only, compute) == layers
    assert torch.equal(_run(weight_only), out)


@pytest.mark.parametrize(
    "spec, compute", [("quanto:qfloat8?min_features=16", "fp8"), ("quanto:qint8?min_features=16", "int8")]
)
def test_compute_mode_switches_the_quantized_layers(tmp_path, monkeypatch, spec, compute):
    from optimum.quanto import QLinear

    plain, weight_only, w8a8 = _three_loads(tmp_path / "transformer", spec, compute)
    layers = [m for m in w8a8.modules() if isinstance(m, QLinear)]
    assert layers and all(type(m).__name__ == "W8A8QLinear" for m in layers)
    _check_switched_model(tmp_path, monkeypatch, plain, weight_only, w8a8, compute, len(layers))
    assert diffusers_quant.enable_compute(weight_only, "none") == len(layers)


def test_compute_int8_runs_bitsandbytes_int8_layers(tmp_path, monkeypatch):
    """bnb:int8 layers hold int8 rows with one scale each (SCB / 127): compute=int8 quantizes their input
    per token and runs the int8 matmul; the layers stay bitsandbytes' (the model saves, reloads weight-only)."""
    import bitsandbytes as bnb

    from diffusers_quant.backends import bnb_int8
    from diffusers_quant.backends.bnb_int8 import int8_weight

    monkeypatch.delenv(REFERENCE_ENV, raising=False)
    plain, weight_only, w8a8 = _three_loads(tmp_path / "transformer", "bnb:int8?min_features=16", "int8")
    layers = [m for m in w8a8.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert layers and all(type(m).__name__ == "W8A8Linear8bitLt" for m in layers)
    assert w8a8.hf_quantizer is not None and w8a8.hf_quantizer.is_serializable

    # one layer: the int8 matmul of per-token codes equals the reference on bitsandbytes' own weight
    layer = next(m for m in layers if m.in_features % 16 == 0 and m.out_features % 16 == 0)
    x = torch.randn(2, 24, layer.in_features).to(torch.bfloat16)
    steps = layer.weight.SCB.float().unsqueeze(1) / 127
    with torch.no_grad():
        got = layer(x)
    want = w8a8_reference(x, layer.weight.data, steps.flatten(), layer.bias, "int8")
    assert _rel(got, want) < 1e-2
    dense = (
        x.float() @ int8_weight(layer.weight.data, layer.weight.SCB, torch.float32).t() + layer.bias.float()
    )
    assert _rel(got, dense) < 2e-2 and not torch.equal(got, bnb_int8.Linear8bitLt.forward(layer, x))
    _check_switched_model(tmp_path, monkeypatch, plain, weight_only, w8a8, "int8", len(layers))


def test_compute_int8_runs_nncf_symmetric_int8_layers(tmp_path, monkeypatch):
    """nncf:int8_sym layers hold int8 rows with one float16 scale each: compute=int8 runs them; the
    asymmetric int8 mode (a zero point per row) stays weight-only and is refused in the plan."""
    from diffusers_quant.backends.nncf_ops import NNCFLinear, decompress

    monkeypatch.delenv(REFERENCE_ENV, raising=False)
    plain, weight_only, w8a8 = _three_loads(tmp_path / "transformer", "nncf:int8_sym?min_features=16", "int8")
    layers = [m for m in w8a8.modules() if isinstance(m, NNCFLinear)]
    assert layers and all(type(m).__name__ == "W8A8NNCFLinear" for m in layers)
    layer = next(m for m in layers if m.in_features % 16 == 0 and m.out_features % 16 == 0)
    x = torch.randn(2, 24, layer.in_features).to(torch.bfloat16)
    with torch.no_grad():
        got = layer(x)
    scale = layer.scale.view(torch.float16).float()
    assert _rel(got, w8a8_reference(x, layer.weight, scale.flatten(), layer.bias, "int8")) < 1e-2
    dense = x.float() @ decompress(*layer._pieces(), torch.float32).t() + layer.bias.float()
    assert _rel(got, dense) < 2e-2
    # compiled, the scale's conversion is an op of its own (fused into the epilogue, Inductor's CPU code
    # read the int16 bits unvectorized: 1.5x slower), and the output is eager's
    targets: set[str] = set()

    def record(gm, _inputs):
        targets.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(layer, backend=record)(x)
        torch._dynamo.reset()
        compiled = torch.compile(layer)(x)
    assert any("nncf_scale_float" in t for t in targets), targets
    assert _rel(compiled, got) < 1e-2
    _check_switched_model(tmp_path, monkeypatch, plain, weight_only, w8a8, "int8", len(layers))


def test_a_compute_mode_the_specs_cannot_run_is_refused_before_loading(tmp_path):
    from diffusers import FluxTransformer2DModel

    _tiny_flux(tmp_path / "transformer")
    before = (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    diffusers_quant.install()
    try:
        with pytest.raises(PlanRefused, match=r"compute=fp8 runs quanto:qfloat8 layers only; fix: "):
            FluxTransformer2DModel.from_pretrained(
                tmp_path / "transformer", quant="transformer=bnb:nf4;compute=fp8"
            )
    finally:
        diffusers_quant.uninstall()
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    diffusers_quant.install()
    try:
        with pytest.raises(
            PlanRefused,
            match=r"compute=int8 runs quanto:qint8 or bnb:int8 or nncf:int8_sym layers only; fix: "
            r"transformer=quanto:qint8 or transformer=bnb:int8 or transformer=nncf:int8_sym, or compute=auto",
        ):
            FluxTransformer2DModel.from_pretrained(
                tmp_path / "transformer", quant="transformer=nncf:int8;compute=int8"
            )
    finally:
        diffusers_quant.uninstall()
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    with pytest.raises(SpecError, match=r"compute='fp4'; expected one of"):
        Plan.parse("transformer=quanto:qint8;compute=fp4")
    assert Plan.parse("transformer=quanto:qint8;compute=int8").compute == "int8"
    assert "compute=int8" in str(Plan.parse("transformer=quanto:qint8;compute=int8"))


@pytest.mark.gpu
def test_a_bitsandbytes_int8_layer_runs_compute_int8_on_cuda_eager_and_compiled():
    """A bnb:int8 layer quantized on the CPU, moved to CUDA and switched: the Triton quantization, the int8
    matmul and the epilogue give the reference's output, eager and compiled."""
    from diffusers_quant.backends import get_backend
    from diffusers_quant.compute import enable_compute
    from diffusers_quant.spec import Spec

    torch.manual_seed(0)
    linear = torch.nn.Linear(3072, 1024).to(torch.bfloat16)
    layer = get_backend("bnb").quantize_linear(linear, Spec.parse("bnb:int8"), torch.bfloat16).eval()
    model = torch.nn.Sequential(layer).cuda()
    assert enable_compute(model, "int8", "cuda") == 1 and type(model[0]).__name__ == "W8A8Linear8bitLt"
    x = torch.randn(2, 300, 3072, dtype=torch.bfloat16, device="cuda")
    steps = model[0].weight.SCB.float() / 127
    want = w8a8_reference(x, model[0].weight.data, steps, model[0].bias, "int8")
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        compiled = torch.compile(model)(x)
    assert _rel(eager, want) < 1e-2 and _rel(compiled, want) < 1e-2
    assert _rel(eager, linear.cuda()(x)) < 3e-2


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_the_cuda_kernel_matches_the_reference(kind):
    from diffusers_quant.compute import w8a8_linear

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 3072, generator=gen).to(torch.bfloat16).cuda()
    w = torch.randn(3072 * 4, 3072, generator=gen) * 0.02
    codes, scale = quantize_rows(w, kind)
    codes, scale = codes.cuda(), scale.flatten().cuda()
    bias = torch.randn(3072 * 4, generator=gen).to(torch.bfloat16).cuda()
    from diffusers_quant.compute import _compiled_kernel, w8a8_kernel, w8a8_launch

    ours = w8a8_linear(x, codes, scale, bias, kind)  # eager on CUDA: the Triton kernels
    reference = w8a8_reference(x, codes, scale, bias, kind)
    assert _rel(ours, reference) < 1e-2
    # the kernels give the torch ops' result bit for bit; the compiled function (Inductor fuses the
    # quantization its own way: a few codes one step apart, 2.5e-3 on the H200) within the reference's bound
    assert torch.equal(ours, w8a8_launch(x, codes, scale, bias, kind))
    assert torch.equal(ours, w8a8_kernel(x, codes, scale, bias, kind))
    assert _rel(_compiled_kernel()(x, codes, scale, bias, kind), ours) < 1e-2


def test_the_kernel_takes_column_major_and_empty_inputs():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=gen)
    codes, scale = quantize_rows(w, "int8")
    x = torch.randn(64, 24, generator=gen).to(torch.bfloat16).t()  # a column-major view, as a permute gives
    assert not x.is_contiguous()
    from diffusers_quant.compute import w8a8_linear

    assert (
        _rel(
            w8a8_linear(x, codes, scale.flatten(), None, "int8"),
            w8a8_reference(x, codes, scale, None, "int8"),
        )
        < 1e-2
    )
    for kind in ("fp8", "int8"):
        c, s = quantize_rows(w, kind)
        empty = w8a8_linear(torch.zeros(0, 64, dtype=torch.bfloat16), c, s.flatten(), None, kind)
        assert empty.shape == (0, 32)


@pytest.mark.parametrize(
    "spec, cls_name", [("quanto:qint8", "W8A8QLinear"), ("bnb:int8", "W8A8Linear8bitLt")]
)
def test_a_lora_stays_on_through_the_switch_and_the_layers_stay_quantized(tmp_path, spec, cls_name):
    import pickle

    from diffusers import FluxTransformer2DModel

    from diffusers_quant.contract import quantized_layers

    _tiny_flux(tmp_path / "transformer")
    diffusers_quant.install()
    try:
        model = FluxTransformer2DModel.from_pretrained(
            tmp_path / "transformer", quant=f"transformer={spec}?min_features=16"
        )
    finally:
        diffusers_quant.uninstall()
    base = _run(model)
    layers = len(quantized_layers(model))
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, module in model.named_modules():
        if name.endswith("attn.to_q") and hasattr(module, "in_features"):
            state[f"{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=g) * 0.3
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=g) * 0.3
    model.load_lora_adapter(state, adapter_name="style", prefix=None)
    with_lora = _run(model)
    switched = diffusers_quant.enable_compute(model, "int8")
    # the library's layers switch, PEFT's wrappers around them do not (their forward adds the LoRA)
    assert switched == layers and len(quantized_layers(model)) == layers
    assert not any(type(m).__name__.startswith("W8A8") and hasattr(m, "lora_A") for m in model.modules())
    out = _run(model)
    assert _rel(out, with_lora) < 0.3 * _rel(with_lora, base)
    cls = next(type(m) for m in model.modules() if type(m).__name__ == cls_name)
    assert pickle.loads(pickle.dumps(cls)) is cls


def test_switched_models_pickle_in_a_fresh_process_and_bitsandbytes_own_layers_share_one_class(tmp_path):
    """A W8A8 class is made on first use: torch.load in a new process finds it by name; bitsandbytes' own
    int8 class (a plain BitsAndBytesConfig load) is adopted first, so one class has that name."""
    import pickle
    import subprocess
    import sys

    import bitsandbytes as bnb

    from diffusers_quant.backends import get_backend
    from diffusers_quant.compute import enable_compute
    from diffusers_quant.spec import Spec

    def layer(spec):
        linear = torch.nn.Linear(64, 32).to(torch.bfloat16)
        return get_backend(spec.split(":")[0]).quantize_linear(linear, Spec.parse(spec), torch.bfloat16)

    own = layer("bnb:int8")
    own.__class__ = bnb.nn.Linear8bitLt
    model = torch.nn.Sequential(layer("nncf:int8_sym"), layer("bnb:int8"), own)
    assert enable_compute(model, "int8") == 3
    assert type(model[1]) is type(model[2]) and type(model[2]).__name__ == "W8A8Linear8bitLt"
    assert pickle.loads(pickle.dumps(model[2])).__class__ is type(model[2])
    torch.save(model, tmp_path / "m.pt")
    path = str(tmp_path / "m.pt")
    code = (
        f"import torch; m = torch.load({path!r}, weights_only=False); print(*[type(x).__name__ for x in m])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["W8A8NNCFLinear", "W8A8Linear8bitLt", "W8A8Linear8bitLt"]


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_eager_kernels_launch_the_compiled_kernels_arithmetic(kind, monkeypatch):
    """Eager with the Triton kernels (here Triton's interpreter): the quantization kernel, the matmul and for
    int8 the epilogue kernel give what the compiled function's torch ops give, and that path is the one taken."""
    from diffusers_quant import compute, fused, kernels

    monkeypatch.setattr(kernels, "KERNEL_DEVICES", {"cuda", "cpu"})
    monkeypatch.delenv(fused.REFERENCE_ENV, raising=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 96, generator=gen).to(torch.bfloat16)
    codes, scale = quantize_rows(torch.randn(48, 96, generator=gen), kind)
    bias = torch.randn(48, generator=gen).to(torch.bfloat16)
    launched = []
    real = compute.w8a8_launch
    monkeypatch.setattr(compute, "w8a8_launch", lambda *a: launched.append(1) or real(*a))
    got = compute.w8a8_linear(x, codes, scale.flatten(), bias, kind)
    want = compute.w8a8_kernel(x, codes, scale.flatten(), bias, kind)
    assert launched and got.shape == want.shape == (2, 40, 48)
    bound = 4 * torch.finfo(torch.bfloat16).eps * want.float().abs().max().item()  # the interpreter's bf16
    assert (got.float() - want.float()).abs().max().item() <= bound
    assert _rel(got, w8a8_reference(x, codes, scale, bias, kind)) < 1e-2
