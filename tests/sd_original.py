"""The demo SD pipeline as one all-in-one file in the original (CompVis / LDM) key layout, as SD 1.x
checkpoints are downloaded (``model.diffusion_model.``, ``first_stage_model.``, ``cond_stage_model.``): the
inverse of diffusers' ``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint`` and
``convert_ldm_clip_checkpoint`` for the demo's block layout, so ``StableDiffusionPipeline.from_single_file``
runs diffusers' own converters on it."""

from __future__ import annotations

import re

import torch

_UNET_LAYERS = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_LAYERS = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    first, _, tail = rest.partition(".")
    return f"{_UNET_RESNET.get(first, first)}.{tail}"


def unet_to_original(sd: dict, config: dict) -> dict:
    per = config["layers_per_block"] + 1  # an LDM input / output block per resnet, plus the resampler
    attention_up = {i for i, t in enumerate(config["up_block_types"]) if "CrossAttn" in t}
    out = {}
    for key, t in sd.items():
        layer, _, part = key.rpartition(".")
        if layer in _UNET_LAYERS:
            out[f"{_UNET_LAYERS[layer]}.{part}"] = t
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            b, what, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            block = 1 + b * per + j
            out[f"input_blocks.{block}.{'0.' + _resnet(rest) if what == 'resnets' else '1.' + rest}"] = t
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            out[f"input_blocks.{1 + int(m[1]) * per + per - 1}.0.op.{m[2]}"] = t
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            out[f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"] = t
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            out[f"middle_block.1.{m[1]}"] = t
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            b, what, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            block = b * per + j
            out[f"output_blocks.{block}.{'0.' + _resnet(rest) if what == 'resnets' else '1.' + rest}"] = t
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            b = int(m[1])
            out[f"output_blocks.{b * per + per - 1}.{2 if b in attention_up else 1}.conv.{m[2]}"] = t
        else:
            raise KeyError(f"no original key for the UNet's {key}")
    return out


def vae_to_original(sd: dict, config: dict) -> dict:
    n = len(config["up_block_types"])
    out = {}
    for key, t in sd.items():
        layer, _, part = key.rpartition(".")
        if layer in _VAE_LAYERS:
            out[f"{_VAE_LAYERS[layer]}.{part}"] = t
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            out[f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"] = t
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            out[f"encoder.down.{m[1]}.downsample.conv.{m[2]}"] = t
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            up = n - 1 - int(m[1])
            out[f"decoder.up.{up}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"] = t
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            out[f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"] = t
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            out[f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"] = t
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            name = _VAE_ATTENTION[m[2]]
            # the original attention is made of 1x1 convolutions
            out[f"{m[1]}.mid.attn_1.{name}.{m[3]}"] = t[:, :, None, None] if t.ndim == 2 else t
        elif key.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")):
            out[key] = t  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
        else:
            raise KeyError(f"no original key for the VAE's {key}")
    return out


def _clip_key(key: str) -> str:
    return key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}"


def write_checkpoint(sd_folder, path) -> None:
    """``sd_folder`` (a diffusers StableDiffusionPipeline folder) as one original-layout safetensors file."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(sd_folder, subfolder="vae")
    clip = CLIPTextModel.from_pretrained(f"{sd_folder}/text_encoder")
    state = {}
    for prefix, tensors in (
        ("model.diffusion_model.", unet_to_original(unet.state_dict(), unet.config)),
        ("first_stage_model.", vae_to_original(vae.state_dict(), vae.config)),
        # SD 1.x files hold the CLIP text model under its transformers 4 names (text_model.*)
        ("cond_stage_model.transformer.", {_clip_key(k): t for k, t in clip.state_dict().items()}),
    ):
        state.update({prefix + k: t.contiguous() for k, t in tensors.items()})
    save_file(state, str(path))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
