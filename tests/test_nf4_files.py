"""Forge's bitsandbytes NF4 single files: built here as Forge writes them (bitsandbytes' own ``quantize_4bit``
and ``QuantState.as_dict(packed=True)`` per Linear, Flux's original keys under ``model.diffusion_model.``),
detected from the header, loaded as bnb 4-bit layers holding the file's codes; and written back in that layout
by ``diffusers-quant quantize --quant bnb:nf4 --out x.safetensors``."""

from __future__ import annotations

import json

import pytest
import torch
from flux_original import CONFIG, H, pipeline_folder
from flux_original import original_shapes as _original_shapes
from flux_original import run as _run
from safetensors.torch import load_file, save_file

import diffusers_quant
from diffusers_quant.cli import main
from diffusers_quant.detect import detect_file
from diffusers_quant.errors import QuantError

pytest.importorskip("bitsandbytes")
PREFIX = "model.diffusion_model."


def _write_forge(folder, nested: bool) -> dict:
    """A Forge NF4 file (``nested``: block scales double-quantized, Forge's first layout; else float32, its
    "v2") with a text-encoder tensor beside the transformer's as in an all-in-one file, and the bf16 file of
    its dequantized weights."""
    import bitsandbytes.functional as F

    gen = torch.Generator().manual_seed(0)
    forge, reference = {}, {}
    for key, shape in _original_shapes().items():
        t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if key.endswith(".scale"):
            t = t + 1
        if len(shape) == 2:
            packed, state = F.quantize_4bit(t, blocksize=64, compress_statistics=nested, quant_type="nf4")
            forge[PREFIX + key] = packed
            for name, value in state.as_dict(packed=True).items():
                forge[f"{PREFIX}{key}.{name}"] = value
            reference[key] = F.dequantize_4bit(packed, state)
        else:
            forge[PREFIX + key] = reference[key] = t
    forge["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)
    path = folder / "flux1-dev-fp8-named.safetensors"  # the name says fp8: the header says nf4
    save_file(forge, str(path))
    ref_path = folder / "reference-bf16.safetensors"
    save_file(reference, str(ref_path))
    return dict(path=path, reference=ref_path)


@pytest.fixture(scope="module", params=["v2", "nested"])
def loaded(request, tmp_path_factory, config_folder):
    from diffusers import FluxTransformer2DModel

    files = _write_forge(tmp_path_factory.mktemp(request.param), nested=request.param == "nested")
    diffusers_quant.uninstall()
    plain = FluxTransformer2DModel.from_single_file(
        str(files["reference"]), config=str(config_folder), dtype=torch.bfloat16
    )
    expected = _run(plain)
    del plain
    diffusers_quant.install()  # no plan: the file's own format decides
    try:
        ours = FluxTransformer2DModel.from_single_file(
            str(files["path"]), config=str(config_folder), dtype=torch.bfloat16
        )
    finally:
        diffusers_quant.uninstall()
    return request.param, files, ours, expected


def test_the_header_names_forges_layout_whatever_the_file_is_called(loaded):
    _, files, _, _ = loaded
    found = detect_file(files["path"])
    assert found.format == "forge-nf4" and found.loadable and found.layers == 21
    assert "nf4" in found.detail


def test_the_layers_hold_the_files_codes_and_block_scales(loaded):
    import bitsandbytes.functional as F
    from bitsandbytes.functional import QuantState

    layout, files, model, _ = loaded
    raw = load_file(str(files["path"]))
    key = PREFIX + "double_blocks.0.img_attn.qkv.weight"
    state = QuantState.from_dict(
        {k[len(key) + 1 :]: v for k, v in raw.items() if k.startswith(key + ".")}, "cpu"
    )
    absmax = state.absmax
    if layout == "nested":
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    q = model.transformer_blocks[0].attn.to_q
    assert type(q).__name__ == "Linear4bit" and q.weight.quant_type == "nf4"
    # the converter split qkv into q, k, v: q is its first third, byte for byte and scale for scale
    assert torch.equal(q.weight.data.flatten(), raw[key].flatten()[: H * H // 2])
    assert torch.equal(q.weight.quant_state.absmax, absmax.float()[: H * H // 64])
    # single block: linear1 split four ways, the MLP part is its last rows
    mlp = model.single_transformer_blocks[0].proj_mlp
    linear1 = raw[PREFIX + "single_blocks.0.linear1.weight"].flatten()
    assert torch.equal(mlp.weight.data.flatten(), linear1[3 * H * H // 2 :])
    four_bit = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    # 21 4-bit Linears in the file; the converter splits the two qkv three ways and linear1 four ways
    assert four_bit == model.quant_report.components[0].layers_quantized == 21 + 2 + 2 + 3
    assert model.quant_report.components[0].spec == "bnb:nf4?double_quant=false"


def test_the_weights_and_output_equal_plain_diffusers_on_the_dequantized_file(loaded):
    _, files, model, expected = loaded
    reference = load_file(str(files["reference"]))["single_blocks.0.linear1.weight"]
    mlp = model.single_transformer_blocks[0].proj_mlp
    import bitsandbytes.functional as F

    assert torch.equal(F.dequantize_4bit(mlp.weight.data, mlp.weight.quant_state), reference[3 * H :])
    out = _run(model)
    err = float((out - expected).norm() / expected.norm())
    assert err < 1e-2, err


def test_nf4_in_memory_is_under_a_third_of_the_bf16_model(loaded):
    row = loaded[2].quant_report.components[0]
    assert row.bytes_after < 0.33 * row.bytes_before


def test_a_loaded_forge_file_saves_and_reloads_as_a_bnb_model(loaded, tmp_path):
    from diffusers import FluxTransformer2DModel

    layout, _, model, _ = loaded
    if layout != "v2":
        pytest.skip("one layout is enough for the save round trip")
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    diffusers_quant.install()
    try:
        again = FluxTransformer2DModel.from_pretrained(tmp_path / "saved", dtype=torch.bfloat16)
    finally:
        diffusers_quant.uninstall()
    assert torch.equal(_run(again), _run(model))


def test_a_damaged_block_scale_table_is_refused_naming_the_file(tmp_path, config_folder):
    from diffusers import FluxTransformer2DModel

    files = _write_forge(tmp_path, nested=False)
    raw = load_file(str(files["path"]))
    key = PREFIX + "double_blocks.0.img_attn.qkv.weight.absmax"
    raw[key] = raw[key][:-1]  # one block scale short
    save_file(raw, str(files["path"]))
    before = files["path"].read_bytes()
    diffusers_quant.install()
    try:
        with pytest.raises(QuantError, match=r"flux1-dev-fp8-named.safetensors: .*qkv.weight does not match"):
            FluxTransformer2DModel.from_single_file(str(files["path"]), config=str(config_folder))
    finally:
        diffusers_quant.uninstall()
    assert files["path"].read_bytes() == before


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A bf16 model folder at CONFIG, and the Forge NF4 file the CLI writes of it."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("written")
    FluxTransformer2DModel.from_config(CONFIG).to(torch.bfloat16).save_pretrained(folder / "bf16")
    out = folder / "flux-bnb-nf4.safetensors"
    assert main(["quantize", str(folder / "bf16"), "--quant", "bnb:nf4", "--out", str(out)]) == 0
    diffusers_quant.uninstall()
    return folder, out


def test_the_written_file_is_forges_layout(written):
    _, path = written
    raw = load_file(str(path))
    qkv = "double_blocks.0.img_attn.qkv.weight"
    assert raw[qkv].dtype == torch.uint8 and raw[f"{qkv}.absmax"].dtype == torch.float32
    assert f"{qkv}.quant_state.bitsandbytes__nf4" in raw and f"{qkv}.nested_absmax" not in raw
    assert raw["img_in.weight"].dtype == torch.bfloat16  # kept in full precision by the default plan
    assert detect_file(path).format == "forge-nf4"


def test_the_written_file_loads_back_bit_identical(written, config_folder):
    from diffusers import FluxTransformer2DModel

    from diffusers_quant.nf4_files import write_forge_nf4

    folder, path = written
    diffusers_quant.install()
    try:
        source = FluxTransformer2DModel.from_pretrained(
            folder / "bf16", dtype=torch.bfloat16, quant="transformer=bnb:nf4"
        )
        loaded = FluxTransformer2DModel.from_single_file(
            str(path), config=str(config_folder), dtype=torch.bfloat16
        )
    finally:
        diffusers_quant.uninstall()
    # the codes and the expanded block scales are the quantized model's: the same output, bit for bit
    assert torch.equal(_run(loaded), _run(source))
    again = folder / "again.safetensors"
    write_forge_nf4(loaded, str(again))
    first, second = load_file(str(path)), load_file(str(again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_the_writer_refuses_what_it_cannot_write(tmp_path):
    from diffusers_quant.nf4_files import write_forge_nf4

    with pytest.raises(
        QuantError, match=r"original key layout, known here for FluxTransformer2DModel \(not Linear\)"
    ):
        write_forge_nf4(torch.nn.Linear(4, 4), str(tmp_path / "u.safetensors"))
    from diffusers import FluxTransformer2DModel

    tiny = FluxTransformer2DModel(
        num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2
    )
    with pytest.raises(QuantError, match=r"no bitsandbytes 4-bit layers to write; fix: "):
        write_forge_nf4(tiny, str(tmp_path / "t.safetensors"))
    assert not list(tmp_path.iterdir())


def test_inspect_names_forges_layout(loaded, capsys):
    _, files, _, _ = loaded
    assert main(["inspect", str(files["path"])]) == 0
    out = capsys.readouterr().out
    assert "forge-nf4" in out and "nf4" in out


def test_a_pipelines_from_single_file_loads_the_transformer_4bit(loaded, flux_path, tmp_path):
    """FluxPipeline.from_single_file of a Forge file (transformer keys under model.diffusion_model.): the
    transformer comes from the file as 4-bit layers, the same bytes as the model-level load, and generates."""
    import numpy as np
    from diffusers import AutoencoderKL, FluxPipeline
    from transformers import CLIPTextModel, T5EncoderModel

    layout, files, model, _ = loaded
    if layout != "v2":
        pytest.skip("one layout is enough for the pipeline path")
    folder = pipeline_folder(flux_path, tmp_path / "flux")
    bf16 = dict(dtype=torch.bfloat16)
    diffusers_quant.install()
    try:
        pipe = FluxPipeline.from_single_file(
            str(files["path"]),
            config=str(folder),
            vae=AutoencoderKL.from_pretrained(folder / "vae", **bf16),
            text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", **bf16),
            text_encoder_2=T5EncoderModel.from_pretrained(folder / "text_encoder_2", **bf16),
            **bf16,
        )
    finally:
        diffusers_quant.uninstall()
    q = pipe.transformer.single_transformer_blocks[0].proj_mlp
    assert type(q).__name__ == "Linear4bit"
    assert torch.equal(q.weight.data, model.single_transformer_blocks[0].proj_mlp.weight.data)
    assert pipe.quant_report["transformer"].spec == "bnb:nf4?double_quant=false"
    image = pipe("a cat", num_inference_steps=1, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
