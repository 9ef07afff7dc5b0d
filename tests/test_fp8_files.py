"""fp8 single files as users download them: plain fp8, ComfyUI scaled fp8 and ComfyUI mixed fp8, in Flux's
original key layout (so diffusers' converter runs), detected from their headers and loaded fp8 in memory.

diffusers' Flux converter fixes the width at 3072, so the test model is one double and one single block at
Flux's real width (about 480 M parameters, 0.5 GB as fp8), with random weights written straight to the file.
"""

from __future__ import annotations

import json

import pytest
import torch
from flux_original import CONFIG, H, pipeline_folder
from flux_original import inputs as _inputs
from flux_original import original_shapes as _original_shapes
from flux_original import run as _run
from safetensors.torch import load_file, save_file

import diffusers_quant
from diffusers_quant.cli import main
from diffusers_quant.convert import CarryRows
from diffusers_quant.detect import detect_file
from diffusers_quant.errors import QuantError
from diffusers_quant.fp8_files import _sources


def _write(folder, layout: str) -> dict:
    """A checkpoint in ``layout`` ("fp8", "comfy-scaled-fp8", "comfy-quant") and the bf16 file plain
    diffusers would make of it (each weight dequantized as ComfyUI does: fp8 x scale, then bf16)."""
    gen = torch.Generator().manual_seed(0)
    fp8, reference, marker = {}, {}, {}
    for key, shape in _original_shapes().items():
        if len(shape) == 2:
            w = torch.randn(shape, generator=gen) * 0.02
            scale = w.abs().max() / 448 if layout != "fp8" else torch.tensor(1.0)
            q = (w / scale).to(torch.float8_e4m3fn)
            fp8[key] = q
            reference[key] = (q.float() * scale).to(torch.bfloat16)
            layer = key.removesuffix(".weight")
            if layout == "comfy-scaled-fp8":
                fp8[f"{layer}.scale_weight"] = scale.reshape(())
                fp8[f"{layer}.scale_input"] = torch.tensor(1.0)
            elif layout == "comfy-quant":
                fp8[f"{layer}.weight_scale"] = scale.reshape(())
                marker[layer] = {"format": "float8_e4m3fn"}
        else:
            t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            if key.endswith(".scale"):
                t = t + 1
            fp8[key], reference[key] = t, t
    metadata = None
    if layout == "comfy-scaled-fp8":
        fp8["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    elif layout == "comfy-quant":
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": marker})}
    # a name that says nothing true about the content: detection reads the header only
    path = folder / f"{layout}-named-bf16.safetensors"
    save_file(fp8, str(path), metadata=metadata)
    ref_path = folder / "reference-bf16.safetensors"
    save_file(reference, str(ref_path))
    return dict(path=path, reference=ref_path)


@pytest.fixture(scope="module", params=["fp8", "comfy-scaled-fp8", "comfy-quant"])
def loaded(request, tmp_path_factory, config_folder):
    from diffusers import FluxTransformer2DModel

    files = _write(tmp_path_factory.mktemp(request.param), request.param)
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


def test_the_header_names_the_layout_whatever_the_file_is_called(loaded):
    layout, files, _, _ = loaded
    found = detect_file(files["path"])
    assert found.format == layout and found.loadable
    assert detect_file(files["reference"]).format == "safetensors"


def test_fp8_layers_keep_the_files_bytes_and_scales(loaded):
    layout, files, model, _ = loaded
    from optimum.quanto import QLinear

    raw = load_file(str(files["path"]))
    qkv = raw["double_blocks.0.img_attn.qkv.weight"]
    q = model.transformer_blocks[0].attn.to_q
    assert isinstance(q, QLinear) and q.weight._data.dtype == torch.float8_e4m3fn
    # the converter split qkv into q, k, v: q is its first third, byte for byte
    assert torch.equal(q.weight._data.view(torch.uint8), qkv[:H].view(torch.uint8))
    scale_key = {"comfy-scaled-fp8": ".scale_weight", "comfy-quant": ".weight_scale"}.get(layout)
    scale = raw[f"double_blocks.0.img_attn.qkv{scale_key}"] if scale_key else torch.tensor(1.0)
    assert torch.equal(q.weight._scale.float().flatten(), scale.to(torch.bfloat16).float().expand(H))
    # single block: linear1 split four ways, the MLP part too
    mlp = model.single_transformer_blocks[0].proj_mlp
    assert torch.equal(
        mlp.weight._data.view(torch.uint8), raw["single_blocks.0.linear1.weight"][3 * H :].view(torch.uint8)
    )
    fp8_layers = sum(isinstance(m, QLinear) for m in model.modules())
    # 21 fp8 Linears in the file; the converter splits the two qkv three ways and linear1 four ways
    assert fp8_layers == model.quant_report.components[0].layers_quantized == 21 + 2 + 2 + 3
    assert model.quant_report.components[0].spec == "quanto:qfloat8"


def test_the_output_matches_plain_diffusers_on_the_dequantized_file(loaded):
    layout, _, model, expected = loaded
    out = _run(model)
    err = float((out - expected).norm() / expected.norm())
    # quanto adds the bias after a bf16 matmul (F.linear adds it inside): two roundings per layer
    assert err < 2e-2, err


def test_the_weights_equal_the_dequantized_file(loaded):
    layout, files, model, _ = loaded
    reference = load_file(str(files["reference"]))["double_blocks.0.img_attn.qkv.weight"][:H].float()
    ours = model.transformer_blocks[0].attn.to_q.weight.dequantize().float()
    if layout == "fp8":
        assert torch.equal(ours, reference)  # no scale: the file's values exactly
    else:  # the scale is held in bf16 (quanto's scale dtype): off by its rounding, < 2**-8
        assert float(((ours - reference).abs() / reference.abs().clamp_min(1e-12)).max()) < 2**-7


def test_fp8_in_memory_is_half_the_bf16_model(loaded):
    _, _, model, _ = loaded
    row = model.quant_report.components[0]
    assert row.bytes_after < 0.55 * row.bytes_before


def test_a_loaded_fp8_file_saves_and_reloads_as_a_quanto_model(loaded, tmp_path):
    from diffusers import FluxTransformer2DModel

    layout, _, model, _ = loaded
    if layout != "comfy-scaled-fp8":
        pytest.skip("one layout is enough for the save round trip")
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "quanto"
    diffusers_quant.install()
    again = FluxTransformer2DModel.from_pretrained(tmp_path / "saved", dtype=torch.bfloat16)
    assert torch.equal(_run(again), _run(model))


def test_inspect_names_the_layout(loaded, capsys):
    layout, files, _, _ = loaded
    assert main(["inspect", str(files["path"])]) == 0
    assert layout in capsys.readouterr().out


def test_an_unsupported_comfy_format_is_refused_before_any_weight_is_read(tmp_path, config_folder):
    from diffusers import FluxTransformer2DModel

    path = tmp_path / "nvfp4.safetensors"
    marker = {"double_blocks.0.img_attn.qkv": {"format": "nvfp4"}}
    save_file(
        {"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4, dtype=torch.uint8)},
        str(path),
        metadata={"_quantization_metadata": json.dumps({"layers": marker})},
    )
    before = path.read_bytes()
    diffusers_quant.install()
    with pytest.raises(QuantError, match=r"ComfyUI mixed .*nvfp4 .*fix: "):
        FluxTransformer2DModel.from_single_file(str(path), config=str(config_folder))
    assert path.read_bytes() == before


def test_a_converter_that_computes_on_a_weight_is_refused():
    w = torch.ones(4, 4, dtype=torch.float8_e4m3fn)
    sources, tags = _sources({"a.weight": w, "a.scale_weight": torch.tensor(0.5)}, "f")
    assert set(sources) == {"a.weight"}
    with pytest.raises(QuantError, match="mul on a quantized weight"), CarryRows(tags):
        sources["a.weight"] * 2


def test_scales_follow_splits_and_cats():
    a = torch.ones(4, 2, dtype=torch.float8_e4m3fn)
    b = torch.ones(2, 2, dtype=torch.float8_e4m3fn)
    sources, tags = _sources(
        {
            "a.weight": a,
            "a.scale_weight": torch.tensor(2.0),
            "b.weight": b,
            "b.weight_scale": torch.tensor(3.0),
        },
        "f",
    )
    with CarryRows(tags):
        first, second = torch.chunk(sources["a.weight"], 2, dim=0)
        joined = torch.cat([second, sources["b.weight"]], dim=0)
    assert torch.equal(tags[id(first)][1], torch.tensor([2.0, 2.0]))
    assert torch.equal(tags[id(joined)][1], torch.tensor([2.0, 2.0, 3.0, 3.0]))


@pytest.fixture(scope="module")
def written(tmp_path_factory, config_folder):
    """A bf16 model at CONFIG, and the ComfyUI scaled fp8 file this package writes of it."""
    from diffusers import FluxTransformer2DModel

    from diffusers_quant.fp8_files import write_scaled_fp8

    torch.manual_seed(0)
    model = FluxTransformer2DModel.from_config(CONFIG).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("written") / "flux-fp8.safetensors"
    tally = write_scaled_fp8(model, str(path))
    return model, path, tally


def test_the_written_file_is_comfyuis_scaled_fp8_layout(written):
    _, path, tally = written
    raw = load_file(str(path))
    assert "scaled_fp8" in raw and raw["double_blocks.0.img_attn.qkv.weight"].dtype == torch.float8_e4m3fn
    assert raw["double_blocks.0.img_attn.qkv.scale_weight"].dtype == torch.float32
    assert raw["img_in.weight"].dtype == torch.bfloat16  # outside the blocks: kept as it was
    assert detect_file(path).format == "comfy-scaled-fp8"
    assert tally["float8_e4m3fn"] == 1 + 10 + 3  # the marker, the double and the single block's 2-D weights


def test_the_written_file_reloads_with_its_bytes_and_close_to_the_model(written, config_folder):
    from diffusers import FluxTransformer2DModel

    model, path, _ = written
    diffusers_quant.install()
    loaded = FluxTransformer2DModel.from_single_file(
        str(path), config=str(config_folder), dtype=torch.bfloat16
    )
    raw = load_file(str(path))
    linear1 = raw["single_blocks.0.linear1.weight"]
    pieces = [loaded.single_transformer_blocks[0].attn.to_q, loaded.single_transformer_blocks[0].proj_mlp]
    assert torch.equal(pieces[0].weight._data.view(torch.uint8), linear1[:H].view(torch.uint8))
    assert torch.equal(pieces[1].weight._data.view(torch.uint8), linear1[3 * H :].view(torch.uint8))
    expected, out = _run(model), _run(loaded)
    err = float((out - expected).norm() / expected.norm())
    assert err < 0.1, err  # per-tensor fp8 quantization of random weights


def test_quantize_fp8_refuses_what_it_cannot_write(tmp_path, flux_path, sd_path, capsys):
    assert main(["quantize", str(flux_path), "--quant", "fp8", "--out", str(tmp_path / "x.gguf")]) != 0
    assert "writes one safetensors file; fix: e.g. --out x-fp8.safetensors" in capsys.readouterr().err
    assert main(["quantize", str(sd_path), "--quant", "fp8", "--out", str(tmp_path / "u.safetensors")]) != 0
    assert "(not UNet2DConditionModel); fix: --out a folder" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.gpu
def test_a_scaled_fp8_file_runs_on_cuda_as_on_the_cpu(loaded, config_folder):
    """device=cuda: the same fp8 bytes on the GPU, the output as on the CPU (cuBLAS against CPU rounding)."""
    from diffusers import FluxTransformer2DModel

    layout, files, cpu_model, _ = loaded
    if layout != "comfy-scaled-fp8":
        pytest.skip("one layout is enough on the GPU")
    diffusers_quant.install("device=cuda")
    model = FluxTransformer2DModel.from_single_file(
        str(files["path"]), config=str(config_folder), dtype=torch.bfloat16
    )
    q = model.transformer_blocks[0].attn.to_q
    assert q.weight._data.device.type == "cuda" and q.weight._data.dtype == torch.float8_e4m3fn
    assert torch.equal(
        q.weight._data.cpu().view(torch.uint8),
        cpu_model.transformer_blocks[0].attn.to_q.weight._data.view(torch.uint8),
    )
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _inputs().items()}
    with torch.no_grad():
        out = model(**inputs)[0].float().cpu()
    expected = _run(cpu_model)
    assert float((out - expected).norm() / expected.norm()) < 2e-2


def test_a_path_object_takes_the_fp8_path_too(loaded, config_folder):
    from pathlib import Path

    from diffusers import FluxTransformer2DModel
    from optimum.quanto import QLinear

    _, files, _, _ = loaded
    diffusers_quant.install()
    model = FluxTransformer2DModel.from_single_file(Path(files["path"]), config=str(config_folder))
    assert isinstance(model.transformer_blocks[0].attn.to_q, QLinear)


def test_a_pipelines_from_single_file_loads_the_transformer_fp8(loaded, flux_path, tmp_path):
    """FluxPipeline.from_single_file of the file: diffusers builds the pipeline, the transformer comes from
    the file as it is (the same fp8 bytes as the model-level load), and the pipeline generates."""
    import numpy as np
    from diffusers import AutoencoderKL, FluxPipeline
    from optimum.quanto import QLinear
    from transformers import CLIPTextModel, T5EncoderModel

    layout, files, model, _ = loaded
    if layout == "comfy-quant":
        pytest.skip("two layouts are enough for the pipeline path")
    folder = pipeline_folder(flux_path, tmp_path / "flux")
    diffusers_quant.install()
    try:
        # the test file holds the transformer only: the others come from the folder (diffusers looks for
        # a text encoder's weights there under its own file names only, so they are passed in)
        others = dict(
            vae=AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.bfloat16),
            text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.bfloat16),
            text_encoder_2=T5EncoderModel.from_pretrained(folder / "text_encoder_2", dtype=torch.bfloat16),
        )
        pipe = FluxPipeline.from_single_file(
            str(files["path"]), config=str(folder), dtype=torch.bfloat16, **others
        )
    finally:
        diffusers_quant.uninstall()
    q = pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(q, QLinear) and q.weight._data.dtype == torch.float8_e4m3fn
    expected = model.transformer_blocks[0].attn.to_q.weight._data
    assert torch.equal(q.weight._data.view(torch.uint8), expected.view(torch.uint8))
    row = pipe.quant_report["transformer"]
    assert row.mode == "pre-quantized" and row.spec == "quanto:qfloat8"
    image = pipe("a cat", num_inference_steps=1, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_a_pipeline_file_with_scaled_text_encoder_tensors_is_refused(tmp_path):
    from diffusers import FluxPipeline

    path = tmp_path / "all-in-one.safetensors"
    save_file(
        {
            "model.diffusion_model.img_in.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn),
            "model.diffusion_model.img_in.scale_weight": torch.tensor(1.0),
            "text_encoders.t5xxl.transformer.encoder.block.0.weight": torch.zeros(
                4, 4, dtype=torch.float8_e4m3fn
            ),
            "text_encoders.t5xxl.transformer.encoder.block.0.scale_weight": torch.tensor(1.0),
            "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn),
        },
        str(path),
    )
    diffusers_quant.install()
    try:
        with pytest.raises(
            QuantError, match=r"quantized text-encoder or VAE tensors .*fix: load the transformer"
        ):
            FluxPipeline.from_single_file(str(path))
    finally:
        diffusers_quant.uninstall()


def test_scales_of_an_unknown_layout_are_refused(tmp_path, config_folder):
    from diffusers import FluxTransformer2DModel

    path = tmp_path / "inv.safetensors"
    save_file(
        {
            "x.weight": torch.ones(4, 4, dtype=torch.float8_e4m3fn),
            "x.weight_scale_inv": torch.ones(1, 1),
        },
        str(path),
    )
    assert detect_file(path).format == "unknown-scaled" and not detect_file(path).loadable
    diffusers_quant.install()
    with pytest.raises(QuantError, match=r"x.weight_scale_inv in a layout not known here; fix: "):
        FluxTransformer2DModel.from_single_file(str(path), config=str(config_folder))
    with pytest.raises(QuantError, match="layout not known here"):
        _sources(
            {"x.weight": torch.ones(4, 4, dtype=torch.float8_e4m3fn), "x.weight_scale_2": torch.ones(())}, "f"
        )


def test_a_per_input_channel_scale_is_refused():
    w = torch.ones(4, 4, dtype=torch.float8_e4m3fn)
    with pytest.raises(QuantError, match=r"shape \(1, 4\); expected one per tensor or one per row"):
        _sources({"a.weight": w, "a.scale_weight": torch.ones(1, 4)}, "f")


def _two_tagged():
    a = torch.ones(2, 2, dtype=torch.float8_e4m3fn)
    b = torch.ones(2, 2, dtype=torch.float8_e4m3fn)
    checkpoint = {
        "a.weight": a,
        "a.scale_weight": torch.tensor(2.0),
        "b.weight": b,
        "b.scale_weight": torch.tensor(3.0),
    }
    sources, tags = _sources(checkpoint, "f")
    return sources["a.weight"], sources["b.weight"], tags


@pytest.mark.parametrize(
    "op",
    [
        lambda a, b: torch.cat([a, b], axis=1),  # later dim, different scales
        lambda a, b: torch.concatenate([a, b], 1),
        lambda a, b: torch.tensor(2, dtype=torch.uint8) * a,  # arithmetic, the weight second
        lambda a, b: a.__setitem__(slice(0, 1), b[:1]),  # bytes of another scale written in
        lambda a, b: torch.zeros(2, 2).copy_(a),
        lambda a, b: a.T,
    ],
    ids=["cat-axis-1", "concatenate-1", "scalar-times-weight", "setitem", "copy", "transpose-property"],
)
def test_ops_that_are_not_plain_moves_are_refused(op):
    a, b, tags = _two_tagged()
    with pytest.raises(QuantError), CarryRows(tags):
        op(a, b)


def test_splits_by_keyword_and_cats_along_a_later_dim_with_equal_scales():
    a, _, tags = _two_tagged()
    with CarryRows(tags):
        first, second = a.split(split_size=1, dim=0)
        wide = torch.cat([a, a], dim=-1)
    assert torch.equal(tags[id(first)][1], torch.tensor([2.0]))
    assert torch.equal(tags[id(wide)][1], torch.tensor([2.0, 2.0]))
