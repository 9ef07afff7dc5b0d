"""Every backend x qtype x mode on the demo's transformer, UNet and a text encoder, through the real loaders."""

import pytest
import torch
from helpers import generate, rel_l2

import diffusers_quant
from diffusers_quant.backends import all_backends, get_backend
from diffusers_quant.components import select_linears
from diffusers_quant.errors import QuantError
from diffusers_quant.spec import Spec

SPECS = [Spec(b.name, q) for b in all_backends() if b.name in ("bnb", "quanto", "nncf") for q in b.qtypes]
MODES = ["on-load", "post-load"]
# Quantized layer types, by backend: what must replace nn.Linear.
LAYER_TYPES = {"bnb": ("Linear4bit", "Linear8bitLt"), "quanto": ("QLinear",), "nncf": ("NNCFLinear",)}


def _param_bytes(model):
    unique = {t.data_ptr(): t for t in model.state_dict().values()}  # tied weights count once
    return sum(t.numel() * t.element_size() for t in unique.values())


def _load(cls, folder, spec, mode):
    return cls.from_pretrained(folder, dtype=torch.bfloat16, quant=f"{_kind(cls)}={spec};mode={mode}")


def _kind(cls):
    from diffusers_quant.components import kind_of_class

    return kind_of_class(cls)


def _check_quantized(model, plain, spec, report_row):
    kind = report_row.kind
    names = select_linears(plain, spec, kind)
    assert names and report_row.layers_quantized == len(names)
    for name in names:
        assert type(model.get_submodule(name)).__name__ in LAYER_TYPES[spec.backend], name
    # bytes before: what diffusers/transformers itself loads for this component
    assert report_row.bytes_before == _param_bytes(plain)
    # bytes after, predicted independently from the planning estimate of each replaced layer
    backend = get_backend(spec.backend)
    replaced = sum(plain.get_submodule(n).weight.numel() for n in names)
    replaced_bytes = replaced * 2  # bf16
    predicted = report_row.bytes_before - replaced_bytes + replaced * backend.bytes_per_param(spec)
    assert report_row.bytes_after == pytest.approx(predicted, rel=0.05)
    assert report_row.bytes_after < report_row.bytes_before


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_transformer_and_text_encoder(spec, mode, flux_path):
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel

    diffusers_quant.install()
    for cls, sub in ((FluxTransformer2DModel, "transformer"), (T5EncoderModel, "text_encoder_2")):
        plain = cls.from_pretrained(flux_path / sub, dtype=torch.bfloat16, quant="none=none")
        model = _load(cls, flux_path / sub, spec, mode)
        row = model.quant_report[sub]
        assert row.mode == mode and row.spec == str(spec)
        _check_quantized(model, plain, spec, row)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_unet(spec, mode, sd_path):
    from diffusers import UNet2DConditionModel

    diffusers_quant.install()
    plain = UNet2DConditionModel.from_pretrained(sd_path / "unet", dtype=torch.bfloat16)
    model = _load(UNet2DConditionModel, sd_path / "unet", spec, mode)
    _check_quantized(model, plain, spec, model.quant_report["unet"])


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_on_load_and_post_load_give_the_same_weights(spec, flux_path):
    from diffusers import FluxTransformer2DModel

    diffusers_quant.install()
    on = _load(FluxTransformer2DModel, flux_path / "transformer", spec, "on-load")
    post = _load(FluxTransformer2DModel, flux_path / "transformer", spec, "post-load")
    on_state, post_state = on.state_dict(), post.state_dict()
    assert on_state.keys() == post_state.keys()
    for key, value in on_state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, post_state[key]), key


# Image rel-L2 vs the unquantized pipeline (bf16), measured on the demo; bounds carry a margin.
# Measured on 2 CPU cores (flux / sd): nf4 .006/.033, fp4 .007/.039, int8 .004/.015, qint8 .004/.012,
# qfloat8 .004/.015, qint4 .007/.025, qint2 .015/.10.
TOLERANCE = {
    "int8_sym": 0.04,
    "int4": 0.07,
    "int4_sym": 0.07,
    "nf4": 0.08,
    "fp4": 0.1,
    "int8": 0.04,
    "qint8": 0.04,
    "qfloat8": 0.05,
    "qint4": 0.07,
    "qint2": 0.25,
}


@pytest.fixture(scope="module")
def reference_images(flux_path, sd_path):
    from diffusers import DiffusionPipeline

    return {
        name: generate(DiffusionPipeline.from_pretrained(path, dtype=torch.bfloat16))
        for name, path in (("flux", flux_path), ("sd", sd_path))
    }


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_generation_flux_within_tolerance(spec, flux_path, reference_images):
    from diffusers import FluxPipeline

    diffusers_quant.install(f"transformer={spec},text_encoder*={spec}")
    pipe = FluxPipeline.from_pretrained(flux_path, dtype=torch.bfloat16)
    assert {r.name for r in pipe.quant_report.components if r.spec} == {
        "transformer",
        "text_encoder",
        "text_encoder_2",
    }
    image = generate(pipe)
    assert image.shape == (64, 64, 3)
    err = rel_l2(image, reference_images["flux"])
    print(f"{spec} rel-L2 {err:.4f}")
    assert 0 < err < TOLERANCE[spec.qtype], err


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_generation_sd_within_tolerance(spec, sd_path, reference_images):
    from diffusers import StableDiffusionPipeline

    diffusers_quant.install()
    pipe = StableDiffusionPipeline.from_pretrained(sd_path, dtype=torch.bfloat16, quant=f"model={spec}")
    assert pipe.quant_report["unet"].layers_quantized > 0
    err = rel_l2(generate(pipe), reference_images["sd"])
    print(f"{spec} rel-L2 {err:.4f}")
    assert 0 < err < TOLERANCE[spec.qtype], err


def test_quantize_an_already_loaded_model(flux_path):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(flux_path / "transformer", dtype=torch.bfloat16)
    row = diffusers_quant.quantize(model, "nncf:int8")
    assert row.mode == "post-load" and row.layers_quantized > 0 and row.bytes_after < row.bytes_before
    assert type(model.transformer_blocks[0].attn.to_q).__name__ == "NNCFLinear"
    with pytest.raises(diffusers_quant.PlanRefused, match=r"transformer/UNet component only"):
        diffusers_quant.quantize(
            torch.nn.Sequential(torch.nn.Linear(64, 64)), "gguf:q8_0", kind="text_encoder"
        )


def test_pipeline_from_single_file_quantizes_after_load(flux_path, tmp_path):
    """A Flux pipeline from one transformer file, the rest from a local config folder."""
    import shutil

    from diffusers import AutoencoderKL, FluxPipeline
    from transformers import CLIPTextModel, T5EncoderModel

    # diffusers' own Flux key converter assumes full-size Flux (inner dim 3072), so the tiny demo's file
    # keeps diffusers key names; the path through the hooks is the same.
    single = tmp_path / "flux-transformer.safetensors"
    shutil.copy(flux_path / "transformer" / "diffusion_pytorch_model.safetensors", single)
    # diffusers expects text encoders and VAE inside a Flux single file unless they are passed in
    bf16 = {"dtype": torch.bfloat16}
    parts = dict(
        text_encoder=CLIPTextModel.from_pretrained(flux_path / "text_encoder", **bf16),
        text_encoder_2=T5EncoderModel.from_pretrained(flux_path / "text_encoder_2", **bf16),
        vae=AutoencoderKL.from_pretrained(flux_path / "vae", **bf16),
    )
    diffusers_quant.install()
    pipe = FluxPipeline.from_single_file(
        str(single), config=str(flux_path), dtype=torch.bfloat16, quant="transformer=quanto:qint8", **parts
    )
    assert pipe.quant_report["transformer"].mode == "post-load"
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q).__name__ == "QLinear"
    assert generate(pipe).shape == (64, 64, 3)
    # on load is the model class's (from_single_file of the transformer), named in the refusal
    with pytest.raises(QuantError, match=r"whole pipeline's single file.*fix: .*FluxTransformer2DModel"):
        FluxPipeline.from_single_file(
            str(single), config=str(flux_path), quant="transformer=quanto:qint8;mode=on-load"
        )


@pytest.mark.parametrize(
    "method, qconfig",
    [
        ("sdnq", {"quant_method": "sdnq", "weights_dtype": "int8"}),
        ("torchao", {"quant_method": "torchao", "quant_type": "int8_weight_only"}),
    ],
)
def test_a_folder_saved_by_another_quantizer_is_never_quantized_again(tmp_path, capsys, method, qconfig):
    """SDNQ / torchao folders go to the library's own quantizer; the plan's spec is not applied over them
    (that would load their packed tensors as plain weights). Without the library: our error, naming it."""
    import json

    from diffusers import FluxTransformer2DModel

    from diffusers_quant.cli import main
    from diffusers_quant.errors import QuantError

    model = FluxTransformer2DModel(
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        in_channels=16,
        axes_dims_rope=(2, 2, 4),
    )
    folder = tmp_path / "transformer"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": qconfig}))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    diffusers_quant.install("transformer=bnb:nf4")
    try:
        with pytest.raises(QuantError, match=rf"saved quantized by {method} .*fix: install what it names"):
            FluxTransformer2DModel.from_pretrained(folder)
    finally:
        diffusers_quant.uninstall()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert main(["inspect", str(folder)]) == 0
    assert f"saved by {method}" in capsys.readouterr().out


def _folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, flux_path):
    """The demo transformer saved in shards, plain and quantized (this package's layout)."""
    from diffusers import FluxTransformer2DModel

    root = tmp_path_factory.mktemp("sharded")
    model = FluxTransformer2DModel.from_pretrained(flux_path, subfolder="transformer")
    model.save_pretrained(root / "plain", max_shard_size="200KB")
    diffusers_quant.quantize(model, "nncf:int8", kind="transformer")
    diffusers_quant.save_quantized(model, root / "quantized", max_shard_size="200KB")
    return root


INDEX = "diffusion_pytorch_model.safetensors.index.json"


def _damaged_indexes(index: dict):
    shard = next(iter(index["weight_map"].values()))
    name = next(iter(index["weight_map"]))
    yield "{", r"not a readable safetensors index \(JSONDecodeError"
    yield "[1, 2]", r"damaged safetensors index \(a JSON list, not an object\)"
    yield {"metadata": {}}, r"damaged safetensors index \(its weight_map must map each tensor name"
    yield {**index, "weight_map": [shard]}, "its weight_map must map each tensor name"
    yield {**index, "weight_map": {**index["weight_map"], name: 5}}, "its weight_map must map"
    yield {**index, "weight_map": {**index["weight_map"], name: "../" + shard}}, r"is not a file name in .*"
    yield {**index, "weight_map": {**index["weight_map"], name: "/etc/passwd"}}, r"a path outside the folder"
    yield {**index, "weight_map": {**index["weight_map"], name: "nope.safetensors"}}, r"names shard 'nope"
    yield {**index, "weight_map": {**index["weight_map"], name: "model.bin"}}, "is not a .safetensors file"


@pytest.mark.parametrize("kind", ["plain", "quantized"])
def test_a_damaged_shard_index_is_named(sharded, tmp_path, kind):
    """Issue 14, finding 7: a corrupt *.safetensors.index.json gave JSONDecodeError / KeyError from the
    streaming and the saved-folder readers; now our error names the index, and the folder is left as it was."""
    import json
    import shutil

    from diffusers import FluxTransformer2DModel

    from diffusers_quant.errors import QuantError

    folder = tmp_path / "transformer"
    index = json.loads((sharded / kind / INDEX).read_text())
    for damaged, message in _damaged_indexes(index):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(sharded / kind, folder)
        (folder / INDEX).write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
        before = _folder_bytes(folder)
        diffusers_quant.install("transformer=quanto:qint8;mode=on-load")
        try:
            with pytest.raises(QuantError, match=message) as info:
                FluxTransformer2DModel.from_pretrained(folder)
        finally:
            diffusers_quant.uninstall()
        assert str(folder / INDEX) in str(info.value), damaged
        assert "fix: " in str(info.value)
        assert _folder_bytes(folder) == before
    shutil.rmtree(folder)
    shutil.copytree(sharded / kind, folder)
    with diffusers_quant.quantized("transformer=quanto:qint8;mode=on-load"):
        model = FluxTransformer2DModel.from_pretrained(folder)  # the intact index loads
    assert model.quant_report["transformer"].mode == ("on-load" if kind == "plain" else "pre-quantized")
