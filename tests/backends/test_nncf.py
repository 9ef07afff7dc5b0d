"""NNCF through the loaders: data-free, moves with its state, saves and reloads without recompression."""

import shutil

import pytest
import torch
from helpers import generate, rel_l2

import diffusers_quant
from diffusers_quant import QuantError


def _transformer(flux_path, qtype="int4", mode="on-load"):
    from diffusers import FluxTransformer2DModel

    diffusers_quant.install()
    return FluxTransformer2DModel.from_pretrained(
        flux_path / "transformer", dtype=torch.bfloat16, quant=f"transformer=nncf:{qtype};mode={mode}"
    )


def _inputs(model, tokens=16, text=8):
    g = torch.Generator().manual_seed(0)
    c = model.config
    return dict(
        hidden_states=torch.randn(1, tokens, c.in_channels, generator=g, dtype=torch.bfloat16),
        encoder_hidden_states=torch.randn(1, text, c.joint_attention_dim, generator=g, dtype=torch.bfloat16),
        pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g, dtype=torch.bfloat16),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(text, 3),
    )


def test_no_dataset_and_no_tracing(flux_path, monkeypatch):
    import nncf

    # The whole-model API needs a dataset and traces; the loader must never call it.
    monkeypatch.setattr(nncf, "compress_weights", lambda *a, **k: pytest.fail("compress_weights was called"))
    model = _transformer(flux_path)
    assert model.quant_report["transformer"].layers_quantized > 0


@pytest.mark.parametrize("qtype", ["int8", "int4_sym"])
def test_saved_component_reloads_to_identical_outputs_without_recompression(
    flux_path, tmp_path, monkeypatch, qtype
):
    from diffusers import FluxTransformer2DModel

    from diffusers_quant.backends import nncf_ops

    model = _transformer(flux_path, qtype)
    expected = model(**_inputs(model)).sample
    folder = diffusers_quant.save_quantized(model, tmp_path / "transformer")
    monkeypatch.setattr(nncf_ops, "compress_weights", None, raising=False)
    monkeypatch.setattr(nncf_ops, "_nncf_compress", lambda *a, **k: pytest.fail("recompressed on reload"))
    # hooks installed, no plan: recognised from its config; the dtype of the load, as for any model
    reloaded = FluxTransformer2DModel.from_pretrained(folder, dtype=torch.bfloat16)
    row = reloaded.quant_report["transformer"]
    assert row.mode == "pre-quantized" and row.spec == f"nncf:{qtype}"
    assert type(reloaded.transformer_blocks[0].attn.to_q).__name__ == "NNCFLinear"
    torch.testing.assert_close(reloaded(**_inputs(reloaded)).sample, expected, rtol=0, atol=0)


def test_saved_transformer_inside_a_pipeline(flux_path, tmp_path, reference_image):
    from diffusers import DiffusionPipeline

    pipe_dir = tmp_path / "pipe"
    shutil.copytree(flux_path, pipe_dir, ignore=shutil.ignore_patterns("transformer"))
    diffusers_quant.save_quantized(_transformer(flux_path, "int8"), pipe_dir / "transformer")
    pipe = DiffusionPipeline.from_pretrained(pipe_dir, dtype=torch.bfloat16)
    assert pipe.quant_report["transformer"].mode == "pre-quantized"
    assert rel_l2(generate(pipe), reference_image) < 0.04


@pytest.fixture(scope="module")
def reference_image(flux_path):
    from diffusers import DiffusionPipeline

    return generate(DiffusionPipeline.from_pretrained(flux_path, dtype=torch.bfloat16))


def test_save_refuses_an_existing_folder_or_file_and_leaves_it_untouched(flux_path, tmp_path):
    target = tmp_path / "keep"
    target.mkdir()
    (target / "precious.txt").write_text("mine")
    (tmp_path / "a-file").write_text("also mine")
    model = _transformer(flux_path)
    for existing in (target, tmp_path / "a-file"):
        with pytest.raises(
            QuantError, match=r"already exists and is not an empty folder; fix: save into a new"
        ):
            diffusers_quant.save_quantized(model, existing)
    assert (target / "precious.txt").read_text() == "mine" and (
        tmp_path / "a-file"
    ).read_text() == "also mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp folder may be left behind"


def test_truncated_saved_file_gives_a_clear_error(flux_path, tmp_path):
    from diffusers import FluxTransformer2DModel

    folder = diffusers_quant.save_quantized(_transformer(flux_path), tmp_path / "transformer")
    weights = next(p for p in (tmp_path / "transformer").iterdir() if p.suffix == ".safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        QuantError, match=r"diffusion_pytorch_model.safetensors.*(truncated|not a readable).*fix:"
    ):
        FluxTransformer2DModel.from_pretrained(folder)


def test_dtype_casts_are_refused_and_moves_keep_the_packed_state(flux_path):
    model = _transformer(flux_path, "int4")
    layer = model.transformer_blocks[0].attn.to_q
    packed = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"is quantized .*fix: call \.dequantize\(\) first"):
        model.to(torch.float16)
    model.to("cpu")
    for key, value in layer.state_dict().items():
        assert value.dtype == packed[key].dtype and torch.equal(value, packed[key]), key


def test_survives_accelerate_offload_hooks(flux_path):
    """Model offload = accelerate hooks that move a whole component to the execution device per call."""
    from accelerate import cpu_offload_with_hook

    model = _transformer(flux_path, "int8")
    expected = model(**_inputs(model)).sample
    model, hook = cpu_offload_with_hook(model, execution_device="cpu")
    torch.testing.assert_close(model(**_inputs(model)).sample, expected)
    hook.offload()
    torch.testing.assert_close(model(**_inputs(model)).sample, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ["int8", "int4"])
def test_cuda_on_load_moves_and_model_offload(flux_path, qtype):
    from diffusers import DiffusionPipeline

    diffusers_quant.install()
    torch.cuda.reset_peak_memory_stats()
    model = _transformer(flux_path, qtype)
    cpu_out = model(**_inputs(model)).sample
    model.to("cuda")
    cuda_out = model(**{k: v.cuda() for k, v in _inputs(model).items()}).sample
    assert rel_l2(cuda_out.float().cpu(), cpu_out.float()) < 0.02
    model.to("cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    pipe = DiffusionPipeline.from_pretrained(
        flux_path, dtype=torch.bfloat16, quant=f"transformer=nncf:{qtype};offload=model;device=cuda"
    )
    assert generate(pipe).shape == (64, 64, 3)
