"""Flux at its real width (diffusers' Flux converter fixes it at 3072) with one double and one single block,
in Flux's original (BFL) key layout: the model the single-file format tests write and load."""

from __future__ import annotations

import json

import torch

H, MLP, HEAD = 3072, 4 * 3072, 128
# the outer widths of the demo Flux pipeline (T5 d_model 256, CLIP projection 128, 4 latent channels packed
# 2x2), so the model also runs inside that pipeline
IN, JOINT, POOLED = 16, 256, 128
CONFIG = dict(
    in_channels=IN,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=HEAD,
    num_attention_heads=H // HEAD,
    joint_attention_dim=JOINT,
    pooled_projection_dim=POOLED,
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)


def original_shapes() -> dict[str, tuple[int, ...]]:
    """Flux's original (BFL) keys for CONFIG, as diffusers' converter reads them."""
    shapes = {
        "img_in": (H, IN),
        "txt_in": (H, JOINT),
        "time_in.in_layer": (H, 256),
        "time_in.out_layer": (H, H),
        "vector_in.in_layer": (H, POOLED),
        "vector_in.out_layer": (H, H),
        "double_blocks.0.img_mod.lin": (6 * H, H),
        "double_blocks.0.txt_mod.lin": (6 * H, H),
        "double_blocks.0.img_attn.qkv": (3 * H, H),
        "double_blocks.0.txt_attn.qkv": (3 * H, H),
        "double_blocks.0.img_attn.proj": (H, H),
        "double_blocks.0.txt_attn.proj": (H, H),
        "double_blocks.0.img_mlp.0": (MLP, H),
        "double_blocks.0.img_mlp.2": (H, MLP),
        "double_blocks.0.txt_mlp.0": (MLP, H),
        "double_blocks.0.txt_mlp.2": (H, MLP),
        "single_blocks.0.modulation.lin": (3 * H, H),
        "single_blocks.0.linear1": (3 * H + MLP, H),
        "single_blocks.0.linear2": (H, H + MLP),
        "final_layer.linear": (IN, H),
        "final_layer.adaLN_modulation.1": (2 * H, H),
    }
    out = {}
    for layer, (rows, cols) in shapes.items():
        out[f"{layer}.weight"] = (rows, cols)
        out[f"{layer}.bias"] = (rows,)
    for norm in ("double_blocks.0.img_attn", "double_blocks.0.txt_attn", "single_blocks.0"):
        for which in ("query_norm", "key_norm"):
            out[f"{norm}.norm.{which}.scale"] = (HEAD,)
    return out


def write_config(folder) -> None:
    folder.joinpath("config.json").write_text(
        json.dumps({"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.42.1", **CONFIG})
    )


def inputs():
    gen = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(1, 16, IN, generator=gen).to(torch.bfloat16),
        encoder_hidden_states=torch.randn(1, 8, JOINT, generator=gen).to(torch.bfloat16),
        pooled_projections=torch.randn(1, POOLED, generator=gen).to(torch.bfloat16),
        timestep=torch.tensor([0.5], dtype=torch.bfloat16),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(8, 3),
        return_dict=False,
    )


def run(model):
    with torch.no_grad():
        return model(**inputs())[0].float()


def pipeline_folder(demo_flux, folder):
    """The demo Flux pipeline at ``folder`` with this transformer's config (and no transformer weights:
    they come from the single file)."""
    import shutil

    shutil.copytree(demo_flux, folder)
    shutil.rmtree(folder / "transformer")
    (folder / "transformer").mkdir()
    write_config(folder / "transformer")
    return folder
