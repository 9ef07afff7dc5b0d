"""The per-family full-precision table (issue 16) drives which Linears a plan quantizes, with a reason each.

Each denoiser family's class is built tiny on the meta device; the test names the Linears it keeps in full
precision and checks each reason is the table's.  Families whose entries keep what the generic defaults kept
before the table must still select exactly the same layers; the others say what changed.  A class not in the
table gets the generic defaults and one notice on the ``diffusers_quant`` logger.
"""

from __future__ import annotations

import logging

import pytest
import torch

from diffusers_quant.components import DEFAULT_EXCLUDE, _named_linears, linear_choices, select_linears
from diffusers_quant.families import BY_CLASS, FAMILIES, GENERIC, family_of
from diffusers_quant.spec import Spec

# min_features=1: the tiny models are narrower than the default 64, and the table is what is tested here.
SPEC = Spec.parse("quanto:qint8?min_features=1")

# class -> (tiny config, the Linears it keeps in full precision)
CASES = {
    "FluxTransformer2DModel": (
        dict(
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=(4, 6, 6),
            guidance_embeds=True,
        ),
        {
            "time_text_embed.timestep_embedder.linear_1",
            "time_text_embed.timestep_embedder.linear_2",
            "time_text_embed.guidance_embedder.linear_1",
            "time_text_embed.guidance_embedder.linear_2",
            "time_text_embed.text_embedder.linear_1",
            "time_text_embed.text_embedder.linear_2",
            "context_embedder",
            "x_embedder",
            "norm_out.linear",
            "proj_out",
        },
    ),
    "Flux2Transformer2DModel": (
        dict(
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            axes_dims_rope=(4, 4, 4, 4),
        ),
        {
            "time_guidance_embed.timestep_embedder.linear_1",
            "time_guidance_embed.timestep_embedder.linear_2",
            "time_guidance_embed.guidance_embedder.linear_1",
            "time_guidance_embed.guidance_embedder.linear_2",
            "double_stream_modulation_img.linear",
            "double_stream_modulation_txt.linear",
            "single_stream_modulation.linear",
            "x_embedder",
            "context_embedder",
            "norm_out.linear",
            "proj_out",
        },
    ),
    "SD3Transformer2DModel": (
        dict(
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=32,
            sample_size=32,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            dual_attention_layers=(0,),
        ),
        {
            "time_text_embed.timestep_embedder.linear_1",
            "time_text_embed.timestep_embedder.linear_2",
            "time_text_embed.text_embedder.linear_1",
            "time_text_embed.text_embedder.linear_2",
            "context_embedder",
            "norm_out.linear",
            "proj_out",
        },
    ),
    "UNet2DConditionModel": (
        dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80,
        ),
        {
            "time_embedding.linear_1",
            "time_embedding.linear_2",
            "add_embedding.linear_1",
            "add_embedding.linear_2",
        },
    ),
    "WanTransformer3DModel": (
        dict(
            num_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            text_dim=32,
            freq_dim=32,
            ffn_dim=64,
            in_channels=4,
            out_channels=4,
            image_dim=32,
        ),
        {
            "condition_embedder.time_embedder.linear_1",
            "condition_embedder.time_embedder.linear_2",
            "condition_embedder.time_proj",
            "condition_embedder.text_embedder.linear_1",
            "condition_embedder.text_embedder.linear_2",
            "condition_embedder.image_embedder.ff.net.0.proj",
            "condition_embedder.image_embedder.ff.net.2",
            "proj_out",
        },
    ),
    "QwenImageTransformer2DModel": (
        dict(
            num_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            in_channels=16,
            out_channels=4,
            axes_dims_rope=(4, 6, 6),
        ),
        {
            "time_text_embed.timestep_embedder.linear_1",
            "time_text_embed.timestep_embedder.linear_2",
            "img_in",
            "txt_in",
            "norm_out.linear",
            "proj_out",
        },
    ),
    "SanaTransformer2DModel": (
        dict(
            num_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            num_cross_attention_heads=2,
            cross_attention_head_dim=16,
            cross_attention_dim=32,
            caption_channels=32,
            in_channels=4,
            out_channels=4,
            sample_size=16,
        ),
        {
            "time_embed.emb.timestep_embedder.linear_1",
            "time_embed.emb.timestep_embedder.linear_2",
            "time_embed.linear",
            "caption_projection.linear_1",
            "caption_projection.linear_2",
            "proj_out",
        },
    ),
    "LTXVideoTransformer3DModel": (
        dict(
            num_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            cross_attention_dim=32,
            caption_channels=32,
            in_channels=8,
            out_channels=8,
        ),
        {
            "proj_in",
            "time_embed.emb.timestep_embedder.linear_1",
            "time_embed.emb.timestep_embedder.linear_2",
            "time_embed.linear",
            "caption_projection.linear_1",
            "caption_projection.linear_2",
            "proj_out",
        },
    ),
    "Lumina2Transformer2DModel": (
        dict(
            num_layers=1,
            num_refiner_layers=1,
            num_attention_heads=2,
            num_kv_heads=2,
            hidden_size=32,
            cap_feat_dim=32,
            in_channels=4,
            axes_dim_rope=(4, 6, 6),
            axes_lens=(32, 32, 32),
            multiple_of=16,
        ),
        {
            "x_embedder",
            "time_caption_embed.timestep_embedder.linear_1",
            "time_caption_embed.timestep_embedder.linear_2",
            "time_caption_embed.caption_embedder.1",
            "norm_out.linear_1",
            "norm_out.linear_2",
        },
    ),
    "HiDreamImageTransformer2DModel": (
        dict(
            patch_size=2,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            in_channels=4,
            out_channels=4,
            text_emb_dim=32,
            caption_channels=[32, 32],
            num_routed_experts=2,
            num_activated_experts=1,
            axes_dims_rope=(4, 6, 6),
            max_resolution=(32, 32),
            llama_layers=[0, 1],
        ),
        {
            "t_embedder.timestep_embedder.linear_1",
            "t_embedder.timestep_embedder.linear_2",
            "p_embedder.pooled_embedder.linear_1",
            "p_embedder.pooled_embedder.linear_2",
            "x_embedder.proj",
            "final_layer.linear",
            "final_layer.adaLN_modulation.1",
            "caption_projection.0.linear",
            "caption_projection.1.linear",
            "caption_projection.2.linear",
        },
    ),
    "ChromaTransformer2DModel": (
        dict(
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            axes_dims_rope=(4, 6, 6),
            approximator_num_channels=8,
            approximator_hidden_dim=32,
            approximator_layers=1,
        ),
        {
            "distilled_guidance_layer.in_proj",
            "distilled_guidance_layer.layers.0.linear_1",
            "distilled_guidance_layer.layers.0.linear_2",
            "distilled_guidance_layer.out_proj",
            "context_embedder",
            "x_embedder",
            "proj_out",
        },
    ),
    "CogVideoXTransformer3DModel": (
        dict(
            num_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            text_embed_dim=32,
            time_embed_dim=16,
            in_channels=4,
            out_channels=4,
            sample_width=8,
            sample_height=8,
            sample_frames=5,
        ),
        {
            "patch_embed.text_proj",
            "time_embedding.linear_1",
            "time_embedding.linear_2",
            "norm_out.linear",
            "proj_out",
        },
    ),
    "HunyuanVideoTransformer3DModel": (
        dict(
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            num_refiner_layers=1,
            text_embed_dim=32,
            pooled_projection_dim=32,
            in_channels=4,
            out_channels=4,
            rope_axes_dim=(4, 6, 6),
        ),
        None,  # the whole context_embedder (the token refiner) and the conditioning: checked below
    ),
}


def _build(class_name: str):
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():
        return getattr(diffusers, class_name)(**CASES[class_name][0])


def _kind(class_name: str) -> str:
    return "unet" if class_name.startswith("UNet") else "transformer"


def _generic_kept(model, kind: str) -> set[str]:
    fp32 = tuple(f"*{m}*" for m in (getattr(model, "_keep_in_fp32_modules", None) or ()))
    patterns = DEFAULT_EXCLUDE[kind] + fp32
    import fnmatch

    return {n for n, _ in _named_linears(model) if any(fnmatch.fnmatchcase(n, p) for p in patterns)}


def test_every_denoiser_family_of_the_issue_is_in_the_table():
    assert set(CASES) <= set(BY_CLASS)
    names = {f.name for f in FAMILIES}
    for family in ("Flux", "Flux.2", "SD3", "SD / SDXL UNet", "Wan", "Qwen-Image", "Sana", "LTX", "Lumina2"):
        assert family in names
    for family in ("HiDream", "Chroma", "CogVideoX", "HunyuanVideo"):
        assert family in names
    for family in FAMILIES:
        assert family.keep, family.name
        for keep in family.keep:
            assert keep.reason and "\n" not in keep.reason, (family.name, keep)


@pytest.mark.parametrize("class_name", sorted(CASES))
def test_the_table_chooses_what_each_family_keeps_and_reports_why(class_name, caplog):
    model = _build(class_name)
    kind = _kind(class_name)
    family = family_of(type(model))
    assert family is not None and class_name in family.classes
    with caplog.at_level(logging.INFO, logger="diffusers_quant"):
        choices = linear_choices(model, SPEC, kind)
    assert not [r for r in caplog.records if "not in diffusers_quant's family table" in r.getMessage()]
    kept = {name for name, why in choices.items() if why is not None}
    expected = CASES[class_name][1]
    if expected is None:  # HunyuanVideo: every Linear of the text token refiner, and the conditioning
        expected = {n for n in choices if n.startswith(("context_embedder.", "time_text_embed."))}
        expected |= {"norm_out.linear", "proj_out"}
        assert "context_embedder.token_refiner.refiner_blocks.0.attn.to_q" in expected
    assert kept == expected
    # Every Linear outside the table is quantized; every kept one carries its table entry's reason.
    assert set(select_linears(model, SPEC, kind)) == set(choices) - kept
    import fnmatch

    from diffusers_quant.families import default_keeps

    keeps = default_keeps(model, kind)
    assert keeps[: len(family.keep)] == family.keep
    for name in kept:
        keep = next(k for k in keeps if fnmatch.fnmatchcase(name, k.pattern))
        assert choices[name] == f"{keep.reason} ({keep.pattern})", name


@pytest.mark.parametrize("class_name", sorted(CASES))
def test_families_change_the_generic_choice_only_where_they_say_so(class_name):
    model = _build(class_name)
    kind = _kind(class_name)
    family = family_of(type(model))
    kept = {n for n, why in linear_choices(model, SPEC, kind).items() if why is not None}
    generic = _generic_kept(model, kind)
    if family.changed:
        assert kept != generic and kept > generic, (kept - generic, generic - kept)
        added = kept - generic
        for name in added:  # the changed note names what it adds
            assert any(part in family.changed for part in name.split(".")), (name, family.changed)
    else:
        assert kept == generic  # Flux, SD3, the SD UNet ...: the same layers as before the table


def test_wan_keep_in_fp32_modules_are_kept_with_the_class_reason():
    model = _build("WanTransformer3DModel")
    choices = linear_choices(model, SPEC, "transformer")
    reason = choices["condition_embedder.time_embedder.linear_1"]
    # The family entry matches first; the class's own float32 list is in the defaults too.
    assert reason.startswith("timestep, text and image embedders")
    from diffusers_quant.families import default_keeps

    keeps = {k.pattern: k.reason for k in default_keeps(model, "transformer")}
    assert (
        keeps["*time_embedder*"]
        == "in WanTransformer3DModel._keep_in_fp32_modules (the library keeps it in float32)"
    )


def test_a_class_not_in_the_table_gets_the_generic_defaults_and_one_notice(caplog):
    import diffusers
    from accelerate import init_empty_weights

    from diffusers_quant import families

    with init_empty_weights():
        model = diffusers.PixArtTransformer2DModel(
            num_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            in_channels=4,
            out_channels=8,
            cross_attention_dim=32,
            caption_channels=32,
            sample_size=8,
        )
    assert family_of(type(model)) is None
    families._noticed.discard("PixArtTransformer2DModel")
    with caplog.at_level(logging.INFO, logger="diffusers_quant"):
        first = linear_choices(model, SPEC, "transformer")
        second = linear_choices(model, SPEC, "transformer")
    assert first == second
    notices = [r.getMessage() for r in caplog.records if r.name == "diffusers_quant"]
    assert notices == [
        "PixArtTransformer2DModel is not in diffusers_quant's family table (diffusers_quant/families.py): the "
        "generic transformer defaults choose what stays in full precision"
    ]
    kept = {n for n, why in first.items() if why is not None}
    assert kept == _generic_kept(model, "transformer") and kept
    assert first["proj_out"] == "final projection to the output latents (proj_out)"
    assert {keep.pattern for keep in GENERIC["transformer"]} == set(DEFAULT_EXCLUDE["transformer"])


def test_include_replaces_the_table_and_exclude_adds_to_it():
    model = _build("QwenImageTransformer2DModel")
    spec = Spec.parse("quanto:qint8?min_features=1&include=img_in|txt_in")
    choices = linear_choices(model, spec, "transformer")
    assert {n for n, why in choices.items() if why is None} == {"img_in", "txt_in"}
    assert choices["proj_out"] == "not in include=img_in|txt_in"
    spec = Spec.parse("quanto:qint8?min_features=1&exclude=to_q")
    choices = linear_choices(model, spec, "transformer")
    assert choices["transformer_blocks.0.attn.to_q"] == "in exclude=to_q"
    assert choices["img_in"] == "input patch embedder (img_in)"


def test_the_quantize_path_follows_the_table():
    """A real (tiny, CPU) Qwen-Image transformer quantized by the plugin: its input embedders stay
    nn.Linear as the table says, the blocks' Linears are quantized."""
    import diffusers

    import diffusers_quant
    from diffusers_quant.backends import get_backend

    torch.manual_seed(0)
    model = diffusers.QwenImageTransformer2DModel(
        num_layers=1,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=64,
        in_channels=64,
        out_channels=16,
        axes_dims_rope=(8, 12, 12),
    )
    expected = select_linears(model, Spec.parse("quanto:qint8"), "transformer")
    assert "img_in" not in expected and "transformer_blocks.0.attn.to_q" in expected
    row = diffusers_quant.quantize(model, "quanto:qint8")
    for name in ("img_in", "txt_in", "proj_out", "norm_out.linear"):
        assert type(model.get_submodule(name)) is torch.nn.Linear, name
    assert all(get_backend("quanto").owns(model.get_submodule(name)) for name in expected)
    assert row.layers_quantized == len(expected)
