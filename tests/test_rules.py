"""The compatibility table: every allowed cell runs; refusals carry a reason and a fix; the README shows it."""

from pathlib import Path

import pytest
import torch

import diffusers_quant
from diffusers_quant.components import Component
from diffusers_quant.rules import (
    RULES,
    cells,
    markdown_table,
    problems,
    readme_section,
    refusals_markdown,
    verdict,
)
from diffusers_quant.spec import Plan, Spec

ALLOWED_CPU = [(s, k, o) for s, k, o, d, v in cells(devices=("cpu",)) if v.allowed]
# Offload moves layers by their class, not their qtype: offloaded cells run for a few qtypes per backend
# (4-bit and 8-bit bnb take different code paths); resident cells run for every qtype.
OFFLOAD_QTYPES = {
    "bnb": ("nf4", "int8"),
    "quanto": ("qint8",),
    "nncf": ("int8_sym", "int4_sym"),
    "gguf": ("q4_0",),
}
ALLOWED_CUDA = [
    (s, k, o)
    for s, k, o, d, v in cells(devices=("cuda",))
    if v.allowed and (o == "none" or s.qtype in OFFLOAD_QTYPES[s.backend])
]


def test_table_ends_with_a_catch_all_refusal():
    last = RULES[-1]
    assert not last.allowed and "not supported yet" in last.reason
    # a backend no row names falls through to it
    assert verdict(Spec("future", "x"), "transformer", "none", "cuda").reason.startswith("not supported yet")


def test_every_refusal_has_reason_and_fix():
    for rule in RULES:
        assert rule.allowed or (rule.reason and rule.fix), rule


@pytest.mark.parametrize(
    "spec,offload,fragment",
    [
        (Spec("bnb", "nf4"), "sequential", "Blockwise quantization only supports 16/32-bit floats"),
        (
            Spec("quanto", "qint8"),
            "sequential",
            "QBytesTensor.__new__() missing 5 required positional arguments",
        ),
        (Spec("quanto", "qint4"), "balanced", "Expected all tensors to be on the same device"),
    ],
)
def test_known_field_failures_are_refused_with_their_symptom(spec, offload, fragment):
    v = verdict(spec, "transformer", offload, "cuda")
    assert not v.allowed and fragment in v.reason and v.fix


def test_checker_reports_all_problems_at_once():
    plan = Plan.parse(
        "transformer=bnb:nf4,vae=quanto:qint8,text_encoder=quanto:qint4;offload=sequential;device=cpu"
    )
    found = problems(
        plan,
        [
            Component("transformer", "transformer"),
            Component("vae", "vae"),
            Component("text_encoder", "text_encoder"),
        ],
    )
    assert len(found) == 3
    assert any("vae (vae)" in p and "fix: leave the VAE out" in p for p in found)
    assert all("fix:" in p for p in found)


def test_readme_shows_the_generated_table():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert readme_section() in readme, (
        "README table is stale: run `python -m diffusers_quant.rules --update-readme`"
    )
    assert markdown_table() in readme and refusals_markdown() in readme


def _component_source(kind, flux_path, sd_path, tmp_path_factory):
    from diffusers import ControlNetModel, FluxTransformer2DModel, UNet2DConditionModel
    from transformers import T5EncoderModel

    if kind == "transformer":
        return FluxTransformer2DModel, flux_path / "transformer"
    if kind == "unet":
        return UNet2DConditionModel, sd_path / "unet"
    if kind == "text_encoder":
        return T5EncoderModel, flux_path / "text_encoder_2"
    if kind == "controlnet":
        folder = sd_path.parent / "demo-controlnet"
        if not folder.exists():
            unet = UNet2DConditionModel.from_pretrained(sd_path / "unet")
            ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)).save_pretrained(
                folder
            )
        return ControlNetModel, folder
    raise AssertionError(f"no test component for kind {kind}")


@pytest.mark.parametrize("spec,kind,offload", ALLOWED_CPU, ids=lambda x: str(x))
def test_every_allowed_cpu_cell_runs(spec, kind, offload, flux_path, sd_path, tmp_path_factory):
    cls, folder = _component_source(kind, flux_path, sd_path, tmp_path_factory)
    diffusers_quant.install()
    model = cls.from_pretrained(folder, dtype=torch.bfloat16, quant=f"{kind}={spec};offload={offload}")
    row = next(iter(model.quant_report.components))
    assert row.kind == kind and row.layers_quantized > 0 and row.bytes_after < row.bytes_before


@pytest.mark.gpu
@pytest.mark.parametrize("spec,kind,offload", ALLOWED_CUDA, ids=lambda x: str(x))
def test_every_allowed_cuda_cell_runs(spec, kind, offload, flux_path, sd_path, tmp_path_factory):
    """On CUDA a cell runs as a whole pipeline with its offload mode, and generates."""
    from diffusers import DiffusionPipeline
    from helpers import generate, rel_l2

    from diffusers_quant.backends import backend_of

    if kind == "controlnet":
        cls, folder = _component_source(kind, flux_path, sd_path, tmp_path_factory)
        diffusers_quant.install()
        model = cls.from_pretrained(folder, dtype=torch.bfloat16, quant=f"{kind}={spec};device=cuda")
        assert next(iter(model.quant_report.components)).layers_quantized > 0
        return
    from diffusers_quant.offload import largest_block, module_sizes

    path = sd_path if kind == "unet" else flux_path
    name = "text_encoder" if kind == "text_encoder" else kind
    # Both text encoders where the budget does not matter; the one whose budget it is for balanced.
    pattern = "text_encoder*" if kind == "text_encoder" and offload != "balanced" else name
    diffusers_quant.install()
    resident = DiffusionPipeline.from_pretrained(
        path, dtype=torch.bfloat16, quant=f"{pattern}={spec};device=cuda"
    )
    expected = generate(resident)
    assert expected.shape == (64, 64, 3)
    if offload == "none":
        return
    # Half the component's stored bytes (at least its largest block, which must fit whole): a balanced
    # map must really split it between GPU and CPU.
    sizes = module_sizes(getattr(resident, name))
    budget_bytes = max(sizes[""] / 2, largest_block(getattr(resident, name), sizes)[1] * 1.25)
    del resident
    budget = f";gpu_memory={budget_bytes / 2**30:.6f}" if offload == "balanced" else ""
    pipe = DiffusionPipeline.from_pretrained(
        path, dtype=torch.bfloat16, quant=f"{pattern}={spec};offload={offload};device=cuda{budget}"
    )
    image = generate(pipe)
    assert image.shape == (64, 64, 3)
    # The same layers run on the same GPU; only where they rest differs (bnb quantizes on the CPU for an
    # offloaded load, which rounds a few scales differently).
    assert rel_l2(image, expected) < 0.02
    component = getattr(pipe, name)
    assert sum(1 for m in component.modules() if backend_of(m) is not None) > 0, "layers must stay quantized"
    if offload == "balanced":
        assert component.hf_device_map, "a balanced map must have placed the component"
        placed = set(component.hf_device_map.values())
        if budget_bytes < sizes[""]:
            assert "cpu" in placed, "a budget below the component's size must leave part of it on the CPU"
        if kind == "transformer":  # a tiny CLIP's largest layer takes its whole budget
            assert "cuda:0" in placed, "half a budget must keep part of the component on the GPU"
