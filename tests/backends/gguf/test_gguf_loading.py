"""GGUF through the loaders: files written from the demo models load packed, generate, and are refused
where GGUF cannot work."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import generate, rel_l2, wide_flux_transformer
from test_keys import flux_diffusers_to_bfl

import diffusers_quant
from diffusers_quant import PlanRefused, QuantError
from diffusers_quant.backends.gguf import QUANTIZE_TYPES, portable_config
from diffusers_quant.backends.gguf.dequant import dequantize
from diffusers_quant.backends.gguf.writer import WRITABLE_QTYPES, write_gguf
from diffusers_quant.rules import verdict
from diffusers_quant.spec import Spec


def test_registry_types_match_gguf_py():
    import gguf

    quantized = {t for t in WRITABLE_QTYPES if t not in ("F32", "F16", "BF16")}
    assert {t.upper() for t in QUANTIZE_TYPES} == quantized
    for name, (block, size) in QUANTIZE_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name.upper()]] == (block, size)


@pytest.fixture(scope="module")
def flux_state(flux_path):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(flux_path / "transformer")
    return model.state_dict(), portable_config(model.config)


def _write(tmp_path, flux_state, qtype, bfl=False, name=None):
    state, config = flux_state
    path = tmp_path / (name or f"flux-{qtype}.gguf")
    if bfl:
        state = flux_diffusers_to_bfl(state)
    write_gguf(path, state, qtype, arch="flux", config=None if bfl else config)
    return path


@pytest.mark.parametrize("qtype", sorted(t for t in WRITABLE_QTYPES if t not in ("F32", "F16", "BF16")))
def test_every_writable_type_loads_packed_with_the_written_values(qtype, tmp_path, flux_state):
    from diffusers import FluxTransformer2DModel

    from diffusers_quant.backends.gguf.reader import read_gguf

    path = _write(tmp_path, flux_state, qtype)
    diffusers_quant.install()
    model = FluxTransformer2DModel.from_single_file(str(path), dtype=torch.bfloat16)
    row = model.quant_report["transformer"]
    assert row.mode == "pre-quantized" and row.layers_quantized > 0
    layer = model.transformer_blocks[0].ff.net[2]
    assert type(layer).__name__ == "GGUFLinear" and layer.weight.dtype == torch.uint8
    file = read_gguf(path)
    info = file.info("transformer_blocks.0.ff.net.2.weight")
    assert info.type_name == qtype
    expected = dequantize(file.raw(info), qtype, info.shape, torch.float32)
    torch.testing.assert_close(layer.dequantize_weight(torch.float32), expected, rtol=0, atol=0)
    assert row.bytes_after < row.bytes_before


def test_original_bfl_key_names_load(tmp_path, flux_state, flux_path):
    from diffusers import FluxTransformer2DModel

    path = _write(tmp_path, flux_state, "Q8_0", bfl=True)
    diffusers_quant.install()
    with pytest.raises(QuantError, match=r"carries no model config; fix: pass config="):
        FluxTransformer2DModel.from_single_file(str(path))
    model = FluxTransformer2DModel.from_single_file(str(path), config=str(flux_path), subfolder="transformer")
    reference = FluxTransformer2DModel.from_single_file(str(_write(tmp_path, flux_state, "Q8_0")))
    for (ka, a), (kb, b) in zip(
        sorted(model.state_dict().items()), sorted(reference.state_dict().items()), strict=True
    ):
        assert ka == kb and torch.equal(a, b), ka


def test_pipeline_with_gguf_transformer_generates(tmp_path, flux_state, flux_path):
    from diffusers import DiffusionPipeline, FluxPipeline, FluxTransformer2DModel

    reference = generate(DiffusionPipeline.from_pretrained(flux_path, dtype=torch.bfloat16))
    path = _write(tmp_path, flux_state, "Q8_0")
    diffusers_quant.install()
    pipe = FluxPipeline.from_pretrained(flux_path, dtype=torch.bfloat16, quant=f"transformer=gguf:{path}")
    assert pipe.quant_report["transformer"].spec == "gguf:q8_0"
    assert rel_l2(generate(pipe), reference) < 0.02
    # and the diffusers way: the model loaded from the file, passed in
    transformer = FluxTransformer2DModel.from_single_file(str(path), dtype=torch.bfloat16)
    pipe = FluxPipeline.from_pretrained(flux_path, transformer=transformer, dtype=torch.bfloat16)
    assert rel_l2(generate(pipe), reference) < 0.02


def test_gguf_quantization_on_load_from_safetensors(flux_path):
    from diffusers import FluxTransformer2DModel

    diffusers_quant.install()
    model = FluxTransformer2DModel.from_pretrained(flux_path / "transformer", quant="transformer=gguf:q5_1")
    assert model.quant_report["transformer"].mode == "on-load"
    assert type(model.transformer_blocks[0].attn.to_q).__name__ == "GGUFLinear"


def test_cli_quantize_writes_a_file_that_loads_back(tmp_path, flux_path):
    from diffusers import FluxTransformer2DModel

    from diffusers_quant.cli import main

    out = tmp_path / "t.gguf"
    assert main(["quantize", str(flux_path), "--quant", "gguf:q4_0", "--out", str(out)]) == 0
    diffusers_quant.install()
    model = FluxTransformer2DModel.from_single_file(str(out))
    assert model.quant_report["transformer"].spec == "gguf:q4_0"
    assert main(["inspect", str(out)]) == 0


def test_refusals_have_reason_and_fix(tmp_path, flux_path, flux_state):
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel

    for kind in ("text_encoder", "vae", "controlnet"):
        v = verdict(Spec("gguf", "q8_0"), kind, "none", "cpu")
        assert not v.allowed and "transformer/UNet component only" in v.reason and v.fix
    v = verdict(Spec("gguf", "q8_0"), "transformer", "balanced", "cuda")
    assert not v.allowed and "balanced offload is allowed only for bnb and NNCF" in v.reason
    diffusers_quant.install()
    with pytest.raises(
        PlanRefused, match=r"text_encoder_2 \(text_encoder\).*transformer/UNet component only"
    ):
        T5EncoderModel.from_pretrained(flux_path / "text_encoder_2", quant="text_encoder_2=gguf:q8_0")
    # an all-in-one file: transformer plus text encoder and VAE tensors
    state, _ = flux_state
    mixed = dict(state)
    mixed["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4)
    mixed["cond_stage_model.transformer.embeddings.weight"] = torch.zeros(4, 4)
    path = tmp_path / "all-in-one.gguf"
    write_gguf(path, mixed, "Q8_0", arch="sd", config=None)
    with pytest.raises(
        QuantError, match=r"all-in-one GGUF \(it also holds cond_stage_model, first_stage_model\)"
    ):
        FluxTransformer2DModel.from_single_file(str(path), config=str(flux_path), subfolder="transformer")
    from diffusers import FluxPipeline

    with pytest.raises(QuantError, match=r"not a whole pipeline; fix: load it with the model class"):
        FluxPipeline.from_single_file(str(path), quant="transformer=bnb:nf4")


def test_bad_files_give_clear_errors(tmp_path, flux_state, flux_path, sd_path):
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    path = _write(tmp_path, flux_state, "Q8_0")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    diffusers_quant.install()
    with pytest.raises(QuantError, match=r"truncated.gguf.*truncated"):
        FluxTransformer2DModel.from_single_file(str(truncated))
    # a file whose tensors do not fit the model it is loaded into
    with pytest.raises(QuantError, match=r"has no place in UNet2DConditionModel|expects"):
        UNet2DConditionModel.from_single_file(str(path), config=str(sd_path), subfolder="unet")
    assert path.read_bytes() == data, "loading never writes to the file"


HOST_SCRIPT = textwrap.dedent("""
    import json, sys, torch, diffusers_quant
    from diffusers import FluxTransformer2DModel
    from diffusers_quant.measure import track_memory
    diffusers_quant.install()
    FluxTransformer2DModel.from_single_file(sys.argv[1])  # warm imports
    with track_memory() as peak:
        model = FluxTransformer2DModel.from_single_file(sys.argv[1], dtype=torch.bfloat16)
    print(json.dumps({"growth": peak.host_growth, "after": model.quant_report["transformer"].bytes_after}))
""")


def test_host_memory_during_load_stays_far_below_the_file_size(tmp_path):
    """The file is memory-mapped: packed weights are views of it, never copied into RAM."""
    model = wide_flux_transformer(num_single_layers=2)
    path = tmp_path / "wide.gguf"
    write_gguf(path, model.state_dict(), "Q8_0", arch="flux", config=portable_config(model.config))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", DIFFUSERS_QUANT_PROGRESS="0")
    out = subprocess.run(
        [sys.executable, "-c", HOST_SCRIPT, str(path)], capture_output=True, text=True, env=env, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    size = path.stat().st_size
    print(f"file {size / 2**20:.1f} MiB, host RssAnon growth during load {result['growth'] / 2**20:.1f} MiB")
    # Only the few float tensors (norms, embedders kept in full precision) are copied.
    assert result["growth"] < 0.35 * size, (result, size)


@pytest.mark.gpu
@pytest.mark.parametrize("offload", ["model"])
def test_offload_keeps_gguf_bytes_packed(offload, tmp_path, flux_state, flux_path):
    from diffusers import FluxPipeline

    path = _write(tmp_path, flux_state, "Q4_0")
    diffusers_quant.install()
    pipe = FluxPipeline.from_pretrained(
        flux_path, dtype=torch.bfloat16, quant=f"transformer=gguf:{path};offload={offload};device=cuda"
    )
    layer = pipe.transformer.transformer_blocks[0].ff.net[2]
    before = layer.weight.detach().to("cpu").clone()
    assert generate(pipe).shape == (64, 64, 3)
    assert layer.weight.dtype == torch.uint8
    assert torch.equal(layer.weight.detach().to("cpu"), before), (
        "packed bytes must survive the moves unchanged"
    )


@pytest.mark.parametrize("qtype", ["q4_k", "q5_k", "q6_k"])
def test_k_quants_on_load_run_with_the_reference_weights(qtype, flux_path):
    """On-load K quantization: every layer whose rows are whole super-blocks holds our port's bytes (ggml's
    reference quantizer's), and the model runs as the full-precision one would with those weights."""
    from diffusers import FluxTransformer2DModel

    from diffusers_quant.backends.gguf.quantize import to_ggml

    full = FluxTransformer2DModel.from_pretrained(flux_path / "transformer")
    diffusers_quant.install()
    model = FluxTransformer2DModel.from_pretrained(
        flux_path / "transformer", quant=f"transformer=gguf:{qtype}"
    )
    row = model.quant_report["transformer"]
    assert row.mode == "on-load" and row.spec == f"gguf:{qtype}" and row.bytes_after < row.bytes_before
    dequantized = full.state_dict()
    layers = 0
    for name, module in model.named_modules():
        if type(module).__name__ != "GGUFLinear":
            continue
        layers += 1
        source = full.get_submodule(name).weight
        assert module.qtype == qtype.upper() and source.shape[1] % 256 == 0
        assert torch.equal(module.weight, to_ggml(source, qtype)), name
        dequantized[name + ".weight"] = module.dequantize_weight(torch.float32)
    assert layers >= 10
    assert type(model.transformer_blocks[0].ff.net[0].proj).__name__ == "GGUFLinear"

    g = torch.Generator().manual_seed(1)
    c = full.config
    inputs = dict(
        hidden_states=torch.randn(1, 16, c.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, 8, c.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(8, 3),
        return_dict=False,
    )
    with torch.no_grad():
        got = model(**inputs)[0]
        unquantized = full(**inputs)[0]
        full.load_state_dict(dequantized)
        expected = full(**inputs)[0]
    torch.testing.assert_close(got, expected)  # equal here; float32 tolerance for other CPUs
    # measured 0.0061, 0.0028, 0.0015 (40 layers quantized)
    assert 0 < rel_l2(got, unquantized) < {"q4_k": 0.012, "q5_k": 0.006, "q6_k": 0.003}[qtype]
