"""The model contract, backend x property (modelled on diffusers' quantization test mixin,
``tests/models/testing_utils/quantization.py``): every component the hooks return is a quantized model to
diffusers, transformers and PEFT: it saves and reloads bit-identically, never reloads silently wrong, takes
LoRA (load, weights, disable, fuse, unload) and PEFT training, refuses dtype casts up front, dequantizes,
counts its parameters and bytes truthfully, and compiles."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import generate, rel_l2

import diffusers_quant

SPECS = [
    "bnb:nf4",
    "bnb:int8",
    "quanto:qint8",
    "quanto:qint4",
    "nncf:int8",
    "nncf:int4",
    "gguf:q8_0",
    "gguf:q4_0",
]
# Output error a format may add to the full-precision model's (rel-L2 of the transformer's output).
TOLERANCE = {"8": 5e-3, "4": 3e-2}


def _tolerance(spec: str) -> float:
    return TOLERANCE["4" if any(q in spec for q in ("4", "fp4")) else "8"]


def _load(flux_path, spec: str, mode: str = "auto"):
    from diffusers import FluxTransformer2DModel

    diffusers_quant.install()
    return FluxTransformer2DModel.from_pretrained(
        flux_path / "transformer", quant=f"transformer={spec};mode={mode}"
    )


def _inputs(model, tokens: int = 16, text: int = 8, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    c = model.config
    return dict(
        hidden_states=torch.randn(1, tokens, c.in_channels, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(1, text, c.joint_attention_dim, generator=g).to(dtype),
        pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g).to(dtype),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(text, 3),
        return_dict=False,
    )


def _run(model, **kwargs):
    with torch.no_grad():
        return model(**_inputs(model, **kwargs))[0]


@pytest.fixture(scope="module")
def reference(flux_path):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(flux_path / "transformer")
    return model, _run(model)


def _err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# --- what the libraries read -----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_carries_the_libraries_quantizer_config_and_flags(spec, flux_path):
    from diffusers.quantizers.base import DiffusersQuantizer

    model = _load(flux_path, spec)
    assert isinstance(model.hf_quantizer, DiffusersQuantizer)
    assert model.is_quantized and model.hf_quantizer.is_serializable and model.hf_quantizer.is_trainable
    assert model.config.quantization_config is model.hf_quantizer.quantization_config
    assert model._pre_quantization_dtype == torch.float32
    assert getattr(model, "is_loaded_in_4bit", False) == (spec in ("bnb:nf4", "bnb:fp4"))
    assert getattr(model, "is_loaded_in_8bit", False) == (spec == "bnb:int8")
    # PEFT wraps every quantized layer (our LoRA layer for the layers PEFT has none for)
    from peft.tuners.lora.model import LoraModel

    assert LoraModel._create_new_module.__qualname__.startswith("register_peft_dispatch")


@pytest.mark.parametrize("spec", SPECS)
def test_num_parameters_is_logical_and_footprint_is_real(spec, flux_path, reference):
    ref, _ = reference
    model = _load(flux_path, spec)
    assert model.num_parameters() == ref.num_parameters()
    assert model.get_memory_footprint() < 0.75 * ref.get_memory_footprint()
    assert model.get_memory_footprint() == model.quant_report["transformer"].bytes_after


_CASTS = {
    "to_fp16": lambda m: m.to(torch.float16),
    "to_bf16": lambda m: m.to("cpu", dtype=torch.bfloat16),
    "half": lambda m: m.half(),
    "bfloat16": lambda m: m.bfloat16(),
}


def _check_casts_refused(model, cast):
    from diffusers_quant import QuantError

    before = {n: (p.dtype, p.data_ptr()) for n, p in model.named_parameters()}
    with pytest.raises(QuantError, match=r"is quantized .*fix: call \.dequantize\(\) first"):
        _CASTS[cast](model)
    assert {n: (p.dtype, p.data_ptr()) for n, p in model.named_parameters()} == before
    model.to("cpu")  # a device move stays allowed, and so does the load's own dtype (a no-op)
    model.to("cpu", torch.float32).float()
    assert {n: (p.dtype, p.data_ptr()) for n, p in model.named_parameters()} == before


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("cast", sorted(_CASTS))
def test_dtype_casts_are_refused_before_any_parameter_changes(spec, cast, flux_path):
    model = _load(flux_path, spec)
    _check_casts_refused(model, cast)
    assert _run(model).dtype == torch.float32


@pytest.mark.parametrize("spec", ["nncf:int8", "quanto:qint8", "bnb:nf4"])
def test_text_encoder_dtype_casts_are_refused_too(spec, flux_path):
    from transformers import T5EncoderModel

    diffusers_quant.install()
    encoder = T5EncoderModel.from_pretrained(flux_path / "text_encoder_2", quant=f"text_encoder_2={spec}")
    for cast in _CASTS:
        _check_casts_refused(encoder, cast)


def _assert_same_weights(out, expected):
    # Plain diffusers holds the same weights, but at other byte offsets (safetensors' own buffers), and CPU
    # matmuls round differently on differently aligned data: equal to float32 rounding, not bit for bit
    # (on this host's CPU, 1e-6 off on outputs of 1e-2; any other weights would be off by 1e-2 and more).
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


# --- save and reload ---------------------------------------------------------------------------------------


def _plain_reload(folder):
    """The folder loaded by plain diffusers (hooks removed): the model, or the exception it raised."""
    from diffusers import FluxTransformer2DModel

    diffusers_quant.uninstall()
    try:
        return FluxTransformer2DModel.from_pretrained(folder)
    except Exception as exc:  # the test inspects what plain diffusers says
        return exc


@pytest.mark.parametrize("spec", [*SPECS, "bnb:fp4", "quanto:qfloat8", "quanto:qint2", "nncf:int4_sym"])
def test_save_pretrained_reloads_bit_identical_and_never_silently_wrong(spec, flux_path, tmp_path):
    from diffusers import FluxTransformer2DModel

    model = _load(flux_path, spec)
    expected = _run(model)
    model.save_pretrained(tmp_path / "transformer")
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    method = config["quantization_config"]["quant_method"]

    reloaded = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer")  # hooks installed, no plan
    assert reloaded.quant_report["transformer"].mode == "pre-quantized"
    assert type(reloaded.transformer_blocks[0].attn.to_q) is type(model.transformer_blocks[0].attn.to_q)
    torch.testing.assert_close(_run(reloaded), expected, rtol=0, atol=0)

    plain = _plain_reload(tmp_path / "transformer")
    if isinstance(plain, Exception):  # refused loudly: ours by name, bnb on a machine without a GPU
        assert method == "diffusers_quant" and "diffusers_quant" in str(plain) or "GPU" in str(plain)
    else:
        _assert_same_weights(_run(plain), expected)


def test_layout_is_the_librarys_own_where_its_skip_rule_can_express_the_selection(flux_path, tmp_path):
    """quanto: diffusers matches skips by a layer's own name, so a selection that quantizes every layer
    named ``to_q`` etc. and none named otherwise is saved in quanto's layout and loads in plain diffusers."""
    spec = "quanto:qint8?include=*attn.to_q|*attn.to_k|*attn.to_v"
    model = _load(flux_path, spec)
    expected = _run(model)
    model.save_pretrained(tmp_path / "transformer")
    qconfig = json.loads((tmp_path / "transformer" / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "quanto" and qconfig["weights_dtype"] == "int8"
    plain = _plain_reload(tmp_path / "transformer")
    assert not isinstance(plain, Exception), plain
    assert type(plain.transformer_blocks[0].attn.to_q).__name__ == "QLinear"
    assert type(plain.transformer_blocks[0].attn.to_out[0]).__name__ == "Linear"
    _assert_same_weights(_run(plain), expected)


def test_a_folder_saved_by_plain_diffusers_loads_through_the_hooks(flux_path, tmp_path):
    import warnings

    from diffusers import FluxTransformer2DModel, QuantoConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        config = QuantoConfig(weights_dtype="int4", modules_to_not_convert=["proj_out", "x_embedder"])
    plain = FluxTransformer2DModel.from_pretrained(flux_path / "transformer", quantization_config=config)
    expected = _run(plain)
    plain.save_pretrained(tmp_path / "transformer")
    diffusers_quant.install()
    ours = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer")
    assert ours.quant_report["transformer"].spec == "quanto:qint4"
    _assert_same_weights(_run(ours), expected)


@pytest.mark.parametrize("spec", ["nncf:int8", "bnb:nf4", "gguf:q4_0"])
def test_sharded_save_reloads_bit_identical(spec, flux_path, tmp_path):
    from diffusers import FluxTransformer2DModel

    model = _load(flux_path, spec)
    expected = _run(model)
    folder = diffusers_quant.save_quantized(model, tmp_path / "transformer", max_shard_size="1MB")
    shards = sorted(p.name for p in (tmp_path / "transformer").glob("*.safetensors"))
    assert (
        len(shards) > 1
        and (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    )
    torch.testing.assert_close(_run(FluxTransformer2DModel.from_pretrained(folder)), expected, rtol=0, atol=0)


def test_pipeline_save_pretrained_round_trip(flux_path, tmp_path):
    from diffusers import DiffusionPipeline

    diffusers_quant.install()
    pipe = DiffusionPipeline.from_pretrained(
        flux_path, quant="transformer=nncf:int8,text_encoder_2=bnb:int8,text_encoder=quanto:qint8"
    )
    expected = generate(pipe, steps=2)
    pipe.save_pretrained(tmp_path / "pipe")
    for name, method in (("transformer", "diffusers_quant"), ("text_encoder_2", "bitsandbytes")):
        saved = json.loads((tmp_path / "pipe" / name / "config.json").read_text())
        assert saved["quantization_config"]["quant_method"] == method
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    report = reloaded.quant_report
    assert {report[n].mode for n in ("transformer", "text_encoder", "text_encoder_2")} == {"pre-quantized"}
    assert (generate(reloaded, steps=2) == expected).all()


def test_text_encoder_bnb_folder_loads_in_plain_transformers(flux_path, tmp_path, monkeypatch):
    from transformers import T5EncoderModel

    from diffusers_quant import fused

    diffusers_quant.install()
    encoder = T5EncoderModel.from_pretrained(flux_path / "text_encoder_2", quant="text_encoder_2=bnb:int8")
    assert encoder.hf_quantizer.is_serializable() and encoder.config.quantization_config.load_in_8bit
    encoder.save_pretrained(tmp_path / "t5")
    diffusers_quant.uninstall()
    plain = T5EncoderModel.from_pretrained(tmp_path / "t5")
    assert type(plain.encoder.block[0].layer[0].SelfAttention.q).__name__ == "Linear8bitLt"
    # plain transformers puts a bnb model on the GPU where there is one: compare there (LLM.int8 on CUDA and
    # on the CPU are different kernels)
    encoder.to(plain.device)
    ids = torch.arange(12).reshape(1, 12).to(plain.device)
    with monkeypatch.context() as env:  # bitsandbytes' own forward (LLM.int8), as plain transformers runs it
        env.setenv(fused.REFERENCE_ENV, "1")
        expected = encoder(ids).last_hidden_state
    _assert_same_weights(plain(ids).last_hidden_state, expected)


@pytest.mark.parametrize("spec", ["nncf:int4", "quanto:qint8"])
def test_text_encoder_in_our_format_is_refused_by_plain_transformers(spec, flux_path, tmp_path):
    from transformers import T5EncoderModel

    diffusers_quant.install()
    encoder = T5EncoderModel.from_pretrained(flux_path / "text_encoder_2", quant=f"text_encoder_2={spec}")
    ids = torch.arange(12).reshape(1, 12)
    expected = encoder(ids).last_hidden_state
    encoder.save_pretrained(tmp_path / "t5")
    torch.testing.assert_close(
        T5EncoderModel.from_pretrained(tmp_path / "t5")(ids).last_hidden_state, expected, rtol=0, atol=0
    )
    diffusers_quant.uninstall()
    saved = json.loads((tmp_path / "t5" / "config.json").read_text())["quantization_config"]
    assert saved["format"] == "diffusers_quant" and "diffusers_quant.install()" in saved["note"]
    with pytest.raises(ValueError, match="quant_method"):  # transformers refuses it before reading weights
        T5EncoderModel.from_pretrained(tmp_path / "t5")


# --- dequantize ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_dequantize_gives_plain_linears_that_run(spec, flux_path, tmp_path):
    from diffusers import FluxTransformer2DModel

    model = _load(flux_path, spec)
    quantized = _run(model)
    model.dequantize()
    assert type(model.transformer_blocks[0].attn.to_q) is torch.nn.Linear
    assert not model.is_quantized and "quantization_config" not in model.config
    assert _err(_run(model), quantized) < 2e-3  # the same weights, dequantized once instead of per forward
    model.to(torch.float16)  # a plain model again: casts are allowed
    model.to(torch.float32).save_pretrained(tmp_path / "plain")
    diffusers_quant.uninstall()
    plain = FluxTransformer2DModel.from_pretrained(tmp_path / "plain")
    assert not getattr(plain, "is_quantized", False)


# --- LoRA through PEFT --------------------------------------------------------------------------------------


def _lora_state_dict(model, rank: int = 4, seed: int = 0, kohya: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in model.named_modules():
        if name.endswith(("attn.to_q", "attn.to_v", "ff.net.2")):
            down = torch.randn(rank, module.in_features, generator=g) * 0.1
            up = torch.randn(module.out_features, rank, generator=g) * 0.1
            state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = down, up
    return state


@pytest.fixture(scope="module")
def lora_reference(reference):
    """The full-precision transformer's output with the same LoRA, unfused and fused."""
    import copy

    model = copy.deepcopy(reference[0])
    model.load_lora_adapter(_lora_state_dict(model), adapter_name="style", prefix=None)
    with_lora = _run(model)
    model.set_adapters(["style"], weights=[0.5])
    half = _run(model)
    return with_lora, half


@pytest.mark.parametrize("spec", SPECS)
def test_lora_load_weights_disable_fuse_unfuse_unload(spec, flux_path, reference, lora_reference):
    model = _load(flux_path, spec)
    base = _run(model)
    with_lora, half = lora_reference
    model.load_lora_adapter(_lora_state_dict(model), adapter_name="style", prefix=None)
    out = _run(model)
    assert _err(out, base) > 0.02, "the adapter must change the output"
    assert _err(out, with_lora) < _tolerance(spec)
    model.set_adapters(["style"], weights=[0.5])
    assert _err(_run(model), half) < _tolerance(spec)
    model.set_adapters(["style"], weights=[1.0])
    model.disable_lora()
    torch.testing.assert_close(_run(model), base, rtol=0, atol=0)
    model.enable_lora()
    model.fuse_lora()
    layer = model.transformer_blocks[0].attn.to_q
    assert layer.merged and type(layer.get_base_layer()) is type(model.transformer_blocks[0].attn.to_k)
    fused = _run(model)
    assert _err(fused, with_lora) < _tolerance(spec)  # the merged weight was re-quantized, not added to bytes
    model.unfuse_lora()
    assert _err(_run(model), out) < _tolerance(spec)


@pytest.mark.parametrize("spec", ["nncf:int8", "bnb:nf4", "gguf:q4_0"])
def test_unloading_an_unfused_lora_gives_the_base_model_back_exactly(spec, flux_path):
    model = _load(flux_path, spec)
    base = _run(model)
    model.load_lora_adapter(_lora_state_dict(model), adapter_name="style", prefix=None)
    model.unload_lora()
    assert type(model.transformer_blocks[0].attn.to_q).__name__ != "QuantLoraLinear"
    torch.testing.assert_close(_run(model), base, rtol=0, atol=0)


def test_pipeline_load_lora_weights_in_kohya_format(flux_path):
    """A Kohya-style Flux LoRA (``lora_unet_double_blocks_0_img_attn_qkv`` ...) through the pipeline API."""
    from diffusers import DiffusionPipeline

    diffusers_quant.install()
    pipe = DiffusionPipeline.from_pretrained(flux_path, quant="transformer=nncf:int4")
    base = generate(pipe, steps=2)
    inner = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape_in, shape_out in (("lora_unet_double_blocks_0_img_attn_qkv", inner, 3 * inner),):
        state[f"{key}.lora_down.weight"] = torch.randn(4, shape_in, generator=g) * 0.3
        state[f"{key}.lora_up.weight"] = torch.randn(shape_out, 4, generator=g) * 0.3
        state[f"{key}.alpha"] = torch.tensor(4.0)
    pipe.load_lora_weights(state, adapter_name="kohya")
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q).__name__ == "QuantLoraLinear"
    styled = generate(pipe, steps=2)
    assert rel_l2(styled, base) > 1e-3
    pipe.fuse_lora()
    assert rel_l2(generate(pipe, steps=2), styled) < 0.05
    pipe.unfuse_lora()
    pipe.unload_lora_weights()


def test_fuse_refuses_a_type_it_cannot_requantize_before_changing_anything(flux_path):
    from diffusers_quant.errors import SpecError

    model = _load(flux_path, "gguf:q8_0")
    model.load_lora_adapter(_lora_state_dict(model), adapter_name="style", prefix=None)
    layer = model.transformer_blocks[0].attn.to_q
    layer.get_base_layer().qtype = "Q3_K"  # as a layer read from a Q3_K file is (no quantizer here)
    before = layer.get_base_layer().weight.clone()
    with pytest.raises(SpecError, match="cannot be re-quantized.*fix: keep the LoRA unfused"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.get_base_layer().weight, before)


@pytest.mark.parametrize("spec", SPECS)
def test_peft_add_adapter_trains_only_the_adapter(spec, flux_path):
    from peft import LoraConfig

    model = _load(flux_path, spec)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    out = model(**_inputs(model))[0]
    out.float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


# --- dtypes ----------------------------------------------------------------------------------------------


def test_gguf_without_a_dtype_loads_float32_like_diffusers(flux_path, tmp_path):
    from diffusers import DiffusionPipeline, FluxTransformer2DModel

    from diffusers_quant.backends.gguf import portable_config
    from diffusers_quant.backends.gguf.writer import write_gguf

    plain = FluxTransformer2DModel.from_pretrained(flux_path / "transformer")
    path = tmp_path / "t.gguf"
    write_gguf(path, plain.state_dict(), "Q8_0", arch="flux", config=portable_config(plain.config))
    diffusers_quant.install()
    transformer = FluxTransformer2DModel.from_single_file(str(path))
    assert transformer.x_embedder.weight.dtype == torch.float32
    pipe = DiffusionPipeline.from_pretrained(flux_path, transformer=transformer)
    assert generate(pipe, steps=2).shape[-1] == 3  # runs in the float32 pipeline


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["on-load", "post-load"])
def test_keep_in_fp32_modules_stay_fp32_on_every_path(dtype, mode, flux_path, monkeypatch):
    from diffusers import FluxTransformer2DModel

    # Flux declares none; give it one, as models such as Wan declare theirs
    monkeypatch.setattr(FluxTransformer2DModel, "_keep_in_fp32_modules", ["norm_out"])
    plain = FluxTransformer2DModel.from_pretrained(flux_path / "transformer", dtype=dtype)
    assert plain.norm_out.linear.weight.dtype == torch.float32  # what diffusers does
    diffusers_quant.install()
    model = FluxTransformer2DModel.from_pretrained(
        flux_path / "transformer", dtype=dtype, quant=f"transformer=nncf:int8;mode={mode}"
    )
    assert model.norm_out.linear.weight.dtype == torch.float32
    assert model.x_embedder.weight.dtype == dtype


# --- torch.compile -------------------------------------------------------------------------------------------


# One qtype per backend on the CPU (dynamo tracing is the cost); inductor runs on the GPU machine.
@pytest.mark.parametrize("spec", ["bnb:nf4", "quanto:qint8", "nncf:int4", "gguf:q4_0"])
def test_compiled_model_matches_eager(spec, flux_path):
    import torch._dynamo

    model = _load(flux_path, spec)
    eager = _run(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        out = compiled(**_inputs(model))[0]
    assert _err(out, eager) < 1e-5


@pytest.mark.parametrize("bits", ["4", "8"])
def test_a_text_encoder_saved_by_plain_transformers_with_bnb_loads_through_the_hooks(
    bits, flux_path, tmp_path, monkeypatch
):
    from transformers import BitsAndBytesConfig, T5EncoderModel

    config = BitsAndBytesConfig(**{f"load_in_{bits}bit": True})
    plain = T5EncoderModel.from_pretrained(flux_path / "text_encoder_2", quantization_config=config)
    ids = torch.arange(12).reshape(1, 12).to(plain.device)  # on the GPU where there is one
    expected = plain(ids).last_hidden_state
    plain.save_pretrained(tmp_path / "text_encoder_2")
    diffusers_quant.install()
    ours = T5EncoderModel.from_pretrained(tmp_path / "text_encoder_2")
    assert ours.quant_report["text_encoder_2"].mode == "pre-quantized"
    assert ours.quant_report["text_encoder_2"].spec == (
        "bnb:int8" if bits == "8" else "bnb:fp4?double_quant=false"
    )
    if bits == "8":  # our int8 layers run weight-only (backends/bnb_int8.py); plain ran LLM.int8
        from diffusers_quant import fused
        from diffusers_quant.backends.bnb_int8 import Linear8bitLt

        assert type(ours.encoder.block[0].layer[0].SelfAttention.q) is Linear8bitLt
        monkeypatch.setenv(fused.REFERENCE_ENV, "1")
    ours.to(plain.device)  # LLM.int8 on CUDA and on the CPU are different kernels: compare on one device
    _assert_same_weights(ours(ids).last_hidden_state, expected)
