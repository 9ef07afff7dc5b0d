"""bitsandbytes int8 layers run weight-only: bitsandbytes' own dequantize + matmul (backends/bnb_int8.py)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from diffusers_quant import fused, kernels  # noqa: E402
from diffusers_quant.backends import bnb_int8, get_backend  # noqa: E402
from diffusers_quant.spec import Spec  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@pytest.fixture
def defaults(monkeypatch):
    monkeypatch.delenv(fused.REFERENCE_ENV, raising=False)
    monkeypatch.delenv(fused.FUSED_ENV, raising=False)


def _layer(dtype=torch.bfloat16, spec="bnb:int8", in_features=256, out_features=96, seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features).to(dtype)
    return get_backend("bnb").quantize_linear(linear, Spec.parse(spec), dtype).eval(), linear


def _bitsandbytes_own(layer) -> bnb.nn.Linear8bitLt:
    """The same layer as bitsandbytes' own class (its forward, LLM.int8 in eval mode)."""
    plain = copy.deepcopy(layer)
    plain.__class__ = bnb.nn.Linear8bitLt
    return plain


def test_int8_layers_are_bitsandbytes_layers_with_the_weight_only_forward():
    layer, _ = _layer()
    assert type(layer) is bnb_int8.Linear8bitLt and isinstance(layer, bnb.nn.Linear8bitLt)
    assert type(layer).__name__ == "Linear8bitLt" and get_backend("bnb").owns(layer)
    assert type(_layer(spec="bnb:nf4")[0]) is bnb.nn.Linear4bit  # 4-bit layers keep bitsandbytes' forward


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_forward_is_bitsandbytes_own_dequantize_and_matmul_bit_for_bit(dtype, defaults):
    """bitsandbytes runs MatMul8bitFp (dequantize, then F.linear) for layers in training on the CPU: the
    weight-only forward is that result exactly, for every input dtype, in eval mode too."""
    layer, _ = _layer(dtype)
    x = torch.randn(2, 9, 256, dtype=dtype)
    reference = _bitsandbytes_own(layer).train()
    with torch.no_grad():
        assert torch.equal(layer(x), reference(x))


def test_weight_only_is_nearer_full_precision_than_llm_int8_and_the_switch_gives_llm_int8_back(
    defaults, monkeypatch
):
    layer, linear = _layer(in_features=1024, out_features=512)
    x = torch.randn(64, 1024, dtype=torch.bfloat16)
    llm_int8 = _bitsandbytes_own(layer)  # eval mode: int8 activations, float16 outliers
    with torch.no_grad():
        exact, ours, theirs = linear(x).float(), layer(x).float(), llm_int8(x).float()
        for name, value in ((fused.FUSED_ENV, "gguf,nncf,quanto"), (fused.REFERENCE_ENV, "1")):
            with monkeypatch.context() as env:
                env.setenv(name, value)
                assert torch.equal(layer(x).float(), theirs), name
    err = lambda out: ((out - exact).norm() / exact.norm()).item()  # noqa: E731
    assert err(ours) < 0.8 * err(theirs), (err(ours), err(theirs))


def test_the_fused_path_takes_the_kernel(defaults, monkeypatch):
    """Where the kernels run (Triton's interpreter stands in for CUDA here) the decode is one kernel launch,
    and the output is the reference's."""
    monkeypatch.setattr(kernels, "KERNEL_DEVICES", {"cuda", "cpu"})
    monkeypatch.setattr(fused, "FUSED_DEVICES", {"cuda", "cpu"})
    layer, _ = _layer(torch.float16)
    x = torch.randn(5, 256, dtype=torch.float16)
    runner = bnb_int8._fused_weight()
    before = runner.kernel_calls
    with torch.no_grad():
        out = layer(x)
    assert runner.kernel_calls == before + 1
    scb = layer.weight.SCB
    want = torch.nn.functional.linear(x, bnb_int8.int8_weight(layer.weight.data, scb, x.dtype), layer.bias)
    assert torch.equal(out, want)


@pytest.mark.parametrize("graph_op", [False, True], ids=["traced", "graph-op"])
def test_compiled_the_layer_traces_whole_and_matches_eager(graph_op, defaults, monkeypatch):
    """Compiled, the decode is traced into the graph (no bitsandbytes op, no break), or where the kernels run
    (CUDA; forced here) it is our ``triton_op``."""
    monkeypatch.setattr(bnb_int8, "kernel_in_graph", lambda device, backend: graph_op)
    layer, _ = _layer()
    x = torch.randn(2, 9, 256, dtype=torch.bfloat16)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    targets: set[str] = set()

    def record(gm, _inputs):  # dynamo's graph, before AOTAutograd decomposes the op
        targets.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        eager = layer(x)
        traced = torch.compile(layer, backend=record)(x)
        torch._dynamo.reset()
        compiled = torch.compile(layer)(x)
    assert not any("bitsandbytes" in t for t in targets), targets
    assert any("bnb_int8_weight" in t for t in targets) == graph_op, targets
    scale = eager.float().abs().max().item()
    for out in (traced, compiled):
        assert (out.float() - eager.float()).abs().max().item() <= 4 * torch.finfo(torch.bfloat16).eps * scale


@pytest.mark.parametrize("spec", ["bnb:int8", "bnb:nf4"])
def test_a_layer_ready_for_offloading_pickles(spec, defaults):
    """Offloading links bitsandbytes' state objects to the layer's buffers (a class made at run time); the
    layer pickles as bitsandbytes' own state, the same output after."""
    from diffusers_quant.backends.bnb import _keep_state_with_weight

    layer, _ = _layer(spec=spec)
    _keep_state_with_weight(layer)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(pickle.loads(pickle.dumps(layer))(x), layer(x))


def test_the_layer_copies_pickles_and_trains_like_bitsandbytes(defaults):
    layer, _ = _layer()
    x = torch.randn(3, 256, dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        want = layer(x)
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert type(other) is bnb_int8.Linear8bitLt
        with torch.no_grad():
            assert torch.equal(other(x), want)
    layer(x).sum().backward()  # gradients reach the input, as through bitsandbytes' own forward
    reference = x.detach().clone().requires_grad_()
    _bitsandbytes_own(layer).train()(reference).sum().backward()
    assert torch.equal(x.grad, reference.grad)


def test_a_loaded_and_reloaded_model_runs_the_weight_only_forward(flux_path, tmp_path, defaults):
    from diffusers import FluxTransformer2DModel

    import diffusers_quant

    diffusers_quant.install()
    model = FluxTransformer2DModel.from_pretrained(
        flux_path / "transformer", quant="transformer=bnb:int8", torch_dtype=torch.bfloat16
    )
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert layers and all(type(m) is bnb_int8.Linear8bitLt for m in layers)
    model.save_pretrained(tmp_path / "saved")
    again = FluxTransformer2DModel.from_pretrained(tmp_path / "saved", torch_dtype=torch.bfloat16)
    reloaded = [m for m in again.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(reloaded) == len(layers) and all(type(m) is bnb_int8.Linear8bitLt for m in reloaded)
    x = torch.randn(4, layers[0].in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layers[0](x), reloaded[0](x))


def test_peft_lora_wrappers_are_not_taken_for_bitsandbytes_layers(flux_path, defaults):
    """PEFT's bnb LoRA wrappers are named Linear8bitLt / Linear4bit too: they are not quantized layers of
    their own, so counting, settling and preparing for offload pass them by (preparing one raised
    AttributeError: no ``state``)."""
    from diffusers import FluxTransformer2DModel

    import diffusers_quant
    from diffusers_quant.contract import quantized_layers
    from diffusers_quant.offload import offload_ready

    diffusers_quant.install()
    model = FluxTransformer2DModel.from_pretrained(
        flux_path / "transformer", quant="transformer=bnb:int8", torch_dtype=torch.bfloat16
    )
    before = len(quantized_layers(model))
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, module in model.named_modules():
        if name.endswith("attn.to_q") and isinstance(module, bnb.nn.Linear8bitLt):
            state[f"{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=g)
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=g)
    assert state
    model.load_lora_adapter(state, adapter_name="style", prefix=None)
    wrappers = [m for m in model.modules() if type(m).__name__ == "Linear8bitLt" and hasattr(m, "base_layer")]
    assert len(wrappers) == len(state) // 2
    assert len(quantized_layers(model)) == before
    offload_ready(model)
    assert all(get_backend("bnb").owns(w.base_layer) for w in wrappers)


@pytest.mark.parametrize("linked", [False, True], ids=["plain", "offload-ready"])
def test_a_peft_merge_and_unmerge_gives_the_weight_back(linked, defaults):
    """PEFT merges a LoRA into a bnb int8 layer (new codes, their SCB on the weight) and ends with
    state.reset_grads(); unmerging reads the state's SCB. With the state linked for offloading, a cleared
    SCB kept reading the old scales and the unmerged weight was 45% off; one adapter or two at once."""
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear8bitLt as LoraLinear8bitLt

    from diffusers_quant.backends.bnb import _keep_state_with_weight

    layer, _ = _layer(in_features=256, out_features=128)
    if linked:
        _keep_state_with_weight(layer)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["x"], init_lora_weights=False)
    torch.manual_seed(1)
    wrapper = LoraLinear8bitLt(layer, "one", config=config, r=4, lora_alpha=4)
    wrapper.update_layer("two", r=4, lora_alpha=4, config=config, init_lora_weights=False)
    wrapper.set_adapter(["one", "two"])
    backend = get_backend("bnb")
    x = torch.randn(8, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        before = backend.dequantize_weight(layer).clone()
        unmerged = wrapper(x)
        wrapper.merge(adapter_names=["one", "two"])
        merged = wrapper(x)
        wrapper.unmerge()
        after = backend.dequantize_weight(layer)
    assert ((merged - unmerged).float().norm() / unmerged.float().norm()).item() < 3e-2
    assert ((after - before).norm() / before.norm()).item() < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["weight-only", "bitsandbytes"])
def test_a_layer_quantized_on_the_cpu_runs_on_cuda_after_a_move(mode, defaults, monkeypatch):
    """torch's move swaps the weight's .data in place, which left bitsandbytes' CB / SCB on the CPU beside a
    CUDA weight (bitsandbytes' Int8Params.to moves them on a copy that torch drops); they follow it now."""
    if mode == "bitsandbytes":
        monkeypatch.setenv(fused.FUSED_ENV, "none")
    layer, linear = _layer(in_features=1024, out_features=512)
    layer.cuda()
    assert layer.weight.SCB.is_cuda and layer.weight.CB.is_cuda
    x = torch.randn(4, 1024, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        out = layer(x).float()
        want = linear.cuda()(x).float()
    assert layer.weight.is_cuda and out.is_cuda
    assert ((out - want).norm() / want.norm()).item() < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_on_cuda_the_kernel_path_is_the_reference_bit_for_bit_and_compiles_into_the_graph(dtype, defaults):
    """On CUDA the eager forward takes the hand-written kernel, equal to the reference decode and matmul; the
    compiled layer holds the kernel as a graph op (``triton_op``) and gives the same output."""
    layer, _ = _layer(dtype, in_features=3072, out_features=1024)
    layer = layer.to("cuda")
    x = torch.randn(2, 300, 3072, dtype=dtype, device="cuda")
    scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
    assert scb.is_cuda
    want = torch.nn.functional.linear(x, bnb_int8.int8_weight(layer.weight.data, scb, dtype), layer.bias)
    runner = bnb_int8._fused_weight()
    before = runner.kernel_calls
    with torch.no_grad():
        eager = layer(x)
        torch._dynamo.reset()
        compiled = torch.compile(layer)(x)
    assert runner.kernel_calls == before + 1 and torch.equal(eager, want)
    scale = want.float().abs().max().item()
    assert (compiled.float() - want.float()).abs().max().item() <= 4 * torch.finfo(dtype).eps * scale
