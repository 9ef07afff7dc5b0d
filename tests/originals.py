"""The tiny family models of ``families.py`` in the ORIGINAL key layouts their published files use (BFL's
Flux.2 and Chroma, Stability's SD3, Wan's, Tencent's HunyuanVideo, Lightricks' LTX-Video, Alpha-VLLM's
Lumina-Image-2.0, CompVis / SGM UNets; Qwen-Image and HiDream files carry diffusers' own names), made here by
inverting diffusers' single-file converters (``diffusers/loaders/single_file_utils.py``), for the GGUF
(``tests/backends/gguf/test_family_files.py``) and single-file safetensors (``test_single_file_families.py``)
tests.

Each model is the family pipeline's denoiser with every weight nudged by seeded noise (so no two tensors are
alike and a swapped or misplaced tensor cannot go unnoticed), and the inputs it gets in one generation of its
pipeline are recorded, so a loaded model can be run on exactly those.  Flux's original layout is
``test_keys.flux_diffusers_to_bfl`` (and ``flux_original.py`` at Flux's real width), SD 1.x's UNet is
``sd_original.unet_to_original``, SD3's and Wan's inverses are ``test_keys``'; they are reused here.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "backends" / "gguf"))
from families import FAMILIES, family_path, generate  # noqa: E402
from sd_original import unet_to_original  # noqa: E402
from test_keys import _WAN_INV, sd3_diffusers_to_original  # noqa: E402

COMFY = "model.diffusion_model."


def _swap(t: torch.Tensor) -> torch.Tensor:
    """diffusers' (scale, shift) back to the original (shift, scale)."""
    a, b = t.chunk(2)
    return torch.cat([b, a])


def _cat(sd: dict, keys: list[str]) -> torch.Tensor:
    return torch.cat([sd[k] for k in keys])


def _renamed(sd: dict, table: list[tuple[str, str]]) -> dict:
    """Every key through ``table``'s regex substitutions, in order."""
    out = {}
    for key, value in sd.items():
        for pattern, repl in table:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _fuse(sd: dict, fused: dict[str, list[str]]) -> dict:
    """``sd`` with each group of keys replaced by their dim-0 concatenation under the fused name."""
    out = dict(sd)
    for name, parts in fused.items():
        out[name] = _cat(sd, parts)
        for part in parts:
            del out[part]
    return out


def _blocks(sd: dict, prefix: str) -> list[str]:
    return sorted({k.split(".")[1] for k in sd if k.startswith(prefix + ".")}, key=int)


# --- Flux.2 (BFL layout, convert_flux2_transformer_checkpoint_to_diffusers inverted) ---------------------

# BFL's names for the attention norms and projections, shared by the Flux-layout families (Flux.2, Chroma)
_FLUX_ATTENTION = [
    (r"^transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
    (
        r"^transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight",
        r"double_blocks.\1.txt_attn.norm.query_norm.scale",
    ),
    (
        r"^transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight",
        r"double_blocks.\1.txt_attn.norm.key_norm.scale",
    ),
    (r"^transformer_blocks\.(\d+)\.attn\.to_out\.0\.", r"double_blocks.\1.img_attn.proj."),
    (r"^transformer_blocks\.(\d+)\.attn\.to_add_out\.", r"double_blocks.\1.txt_attn.proj."),
]
_FLUX_SINGLE_NORMS = [
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"single_blocks.\1.norm.query_norm.scale"),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"single_blocks.\1.norm.key_norm.scale"),
]


_FLUX2 = [
    (r"^x_embedder\.", "img_in."),
    (r"^context_embedder\.", "txt_in."),
    (r"^time_guidance_embed\.timestep_embedder\.linear_1\.", "time_in.in_layer."),
    (r"^time_guidance_embed\.timestep_embedder\.linear_2\.", "time_in.out_layer."),
    (r"^time_guidance_embed\.guidance_embedder\.linear_1\.", "guidance_in.in_layer."),
    (r"^time_guidance_embed\.guidance_embedder\.linear_2\.", "guidance_in.out_layer."),
    (
        r"^(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear\.",
        r"\1.lin.",
    ),
    (r"^proj_out\.", "final_layer.linear."),
    (r"^norm_out\.linear\.", "final_layer.adaLN_modulation.1."),
    *_FLUX_ATTENTION,
    (r"^transformer_blocks\.(\d+)\.ff\.linear_in\.", r"double_blocks.\1.img_mlp.0."),
    (r"^transformer_blocks\.(\d+)\.ff\.linear_out\.", r"double_blocks.\1.img_mlp.2."),
    (r"^transformer_blocks\.(\d+)\.ff_context\.linear_in\.", r"double_blocks.\1.txt_mlp.0."),
    (r"^transformer_blocks\.(\d+)\.ff_context\.linear_out\.", r"double_blocks.\1.txt_mlp.2."),
    (r"^single_transformer_blocks\.(\d+)\.attn\.to_qkv_mlp_proj\.", r"single_blocks.\1.linear1."),
    (r"^single_transformer_blocks\.(\d+)\.attn\.to_out\.", r"single_blocks.\1.linear2."),
    *_FLUX_SINGLE_NORMS,
]


def flux2_to_original(sd: dict) -> dict:
    fused = {}
    for i in _blocks(sd, "transformer_blocks"):
        d = f"transformer_blocks.{i}.attn."
        fused[f"double_blocks.{i}.img_attn.qkv.weight"] = [f"{d}to_{x}.weight" for x in "qkv"]
        fused[f"double_blocks.{i}.txt_attn.qkv.weight"] = [f"{d}add_{x}_proj.weight" for x in "qkv"]
    out = _renamed(_fuse(sd, fused), _FLUX2)
    out["final_layer.adaLN_modulation.1.weight"] = _swap(out["final_layer.adaLN_modulation.1.weight"])
    return out


# --- Chroma (Flux's layout without modulation, plus the approximator) -----------------------------------

_CHROMA = [
    (
        r"^distilled_guidance_layer\.layers\.(\d+)\.linear_1\.",
        r"distilled_guidance_layer.layers.\1.in_layer.",
    ),
    (
        r"^distilled_guidance_layer\.layers\.(\d+)\.linear_2\.",
        r"distilled_guidance_layer.layers.\1.out_layer.",
    ),
    (r"^distilled_guidance_layer\.norms\.(\d+)\.weight", r"distilled_guidance_layer.norms.\1.scale"),
    (r"^x_embedder\.", "img_in."),
    (r"^context_embedder\.", "txt_in."),
    (r"^proj_out\.", "final_layer.linear."),
    *_FLUX_ATTENTION,
    (r"^transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.", r"double_blocks.\1.img_mlp.0."),
    (r"^transformer_blocks\.(\d+)\.ff\.net\.2\.", r"double_blocks.\1.img_mlp.2."),
    (r"^transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.", r"double_blocks.\1.txt_mlp.0."),
    (r"^transformer_blocks\.(\d+)\.ff_context\.net\.2\.", r"double_blocks.\1.txt_mlp.2."),
    (r"^single_transformer_blocks\.(\d+)\.proj_out\.", r"single_blocks.\1.linear2."),
    *_FLUX_SINGLE_NORMS,
]


def chroma_to_original(sd: dict) -> dict:
    fused = {}
    for p in ("weight", "bias"):
        for i in _blocks(sd, "transformer_blocks"):
            d = f"transformer_blocks.{i}.attn."
            fused[f"double_blocks.{i}.img_attn.qkv.{p}"] = [f"{d}to_{x}.{p}" for x in "qkv"]
            fused[f"double_blocks.{i}.txt_attn.qkv.{p}"] = [f"{d}add_{x}_proj.{p}" for x in "qkv"]
        for i in _blocks(sd, "single_transformer_blocks"):
            s = f"single_transformer_blocks.{i}."
            fused[f"single_blocks.{i}.linear1.{p}"] = [f"{s}attn.to_{x}.{p}" for x in "qkv"] + [
                f"{s}proj_mlp.{p}"
            ]
    return _renamed(_fuse(sd, fused), _CHROMA)


# --- HunyuanVideo (convert_hunyuan_video_transformer_to_diffusers inverted) -----------------------------

_HUNYUAN = [
    (r"^x_embedder\.", "img_in."),
    (r"^context_embedder\.time_text_embed\.timestep_embedder\.linear_1\.", "txt_in.t_embedder.mlp.0."),
    (r"^context_embedder\.time_text_embed\.timestep_embedder\.linear_2\.", "txt_in.t_embedder.mlp.2."),
    (r"^context_embedder\.time_text_embed\.text_embedder\.", "txt_in.c_embedder."),
    (r"^context_embedder\.proj_in\.", "txt_in.input_embedder."),
    (r"^context_embedder\.token_refiner\.refiner_blocks\.", "txt_in.individual_token_refiner.blocks."),
    (r"^(txt_in\.individual_token_refiner\.blocks\.\d+)\.attn\.to_out\.0\.", r"\1.self_attn_proj."),
    (r"^(txt_in\.individual_token_refiner\.blocks\.\d+)\.ff\.net\.0\.proj\.", r"\1.mlp.fc1."),
    (r"^(txt_in\.individual_token_refiner\.blocks\.\d+)\.ff\.net\.2\.", r"\1.mlp.fc2."),
    (r"^(txt_in\.individual_token_refiner\.blocks\.\d+)\.norm_out\.linear\.", r"\1.adaLN_modulation.1."),
    (r"^time_text_embed\.timestep_embedder\.linear_1\.", "time_in.mlp.0."),
    (r"^time_text_embed\.timestep_embedder\.linear_2\.", "time_in.mlp.2."),
    (r"^time_text_embed\.guidance_embedder\.linear_1\.", "guidance_in.mlp.0."),
    (r"^time_text_embed\.guidance_embedder\.linear_2\.", "guidance_in.mlp.2."),
    (r"^time_text_embed\.text_embedder\.linear_1\.", "vector_in.in_layer."),
    (r"^time_text_embed\.text_embedder\.linear_2\.", "vector_in.out_layer."),
    (r"^transformer_blocks\.(\d+)\.norm1\.linear\.", r"double_blocks.\1.img_mod.linear."),
    (r"^transformer_blocks\.(\d+)\.norm1_context\.linear\.", r"double_blocks.\1.txt_mod.linear."),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_q\.", r"double_blocks.\1.img_attn_q_norm."),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_k\.", r"double_blocks.\1.img_attn_k_norm."),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_added_q\.", r"double_blocks.\1.txt_attn_q_norm."),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_added_k\.", r"double_blocks.\1.txt_attn_k_norm."),
    (r"^transformer_blocks\.(\d+)\.attn\.to_out\.0\.", r"double_blocks.\1.img_attn_proj."),
    (r"^transformer_blocks\.(\d+)\.attn\.to_add_out\.", r"double_blocks.\1.txt_attn_proj."),
    (r"^transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.", r"double_blocks.\1.img_mlp.fc1."),
    (r"^transformer_blocks\.(\d+)\.ff\.net\.2\.", r"double_blocks.\1.img_mlp.fc2."),
    (r"^transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.", r"double_blocks.\1.txt_mlp.fc1."),
    (r"^transformer_blocks\.(\d+)\.ff_context\.net\.2\.", r"double_blocks.\1.txt_mlp.fc2."),
    (r"^single_transformer_blocks\.(\d+)\.proj_out\.", r"single_blocks.\1.linear2."),
    (r"^single_transformer_blocks\.(\d+)\.norm\.linear\.", r"single_blocks.\1.modulation.linear."),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_q\.", r"single_blocks.\1.q_norm."),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_k\.", r"single_blocks.\1.k_norm."),
    (r"^norm_out\.linear\.", "final_layer.adaLN_modulation.1."),
    (r"^proj_out\.", "final_layer.linear."),
]


def hunyuanvideo_to_original(sd: dict) -> dict:
    fused = {}
    for p in ("weight", "bias"):
        for i in _blocks(sd, "transformer_blocks"):
            d = f"transformer_blocks.{i}.attn."
            fused[f"double_blocks.{i}.img_attn_qkv.{p}"] = [f"{d}to_{x}.{p}" for x in "qkv"]
            fused[f"double_blocks.{i}.txt_attn_qkv.{p}"] = [f"{d}add_{x}_proj.{p}" for x in "qkv"]
        for i in _blocks(sd, "single_transformer_blocks"):
            s = f"single_transformer_blocks.{i}."
            fused[f"single_blocks.{i}.linear1.{p}"] = [f"{s}attn.to_{x}.{p}" for x in "qkv"] + [
                f"{s}proj_mlp.{p}"
            ]
        refiner = "context_embedder.token_refiner.refiner_blocks"
        for i in sorted({k.split(".")[3] for k in sd if k.startswith(refiner + ".")}, key=int):
            r = f"{refiner}.{i}."
            fused[f"txt_in.individual_token_refiner.blocks.{i}.self_attn_qkv.{p}"] = [
                f"{r}attn.to_{x}.{p}" for x in "qkv"
            ]
    out = _renamed(_fuse(sd, fused), _HUNYUAN)
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap(out[f"final_layer.adaLN_modulation.1.{p}"])
    return out


# --- LTX-Video (renames only) ----------------------------------------------------------------------------

_LTX = [
    (r"^proj_in\.", "patchify_proj."),
    (r"^time_embed\.", "adaln_single."),
    (r"\.norm_q\.", ".q_norm."),
    (r"\.norm_k\.", ".k_norm."),
]


def ltx_to_original(sd: dict) -> dict:
    return _renamed(sd, _LTX)


# --- Lumina-Image-2.0 (convert_lumina2_to_diffusers inverted) --------------------------------------------

_LUMINA = [
    (r"^time_caption_embed\.timestep_embedder\.linear_1\.", "t_embedder.mlp.0."),
    (r"^time_caption_embed\.timestep_embedder\.linear_2\.", "t_embedder.mlp.2."),
    (r"^time_caption_embed\.caption_embedder\.", "cap_embedder."),
    (r"^norm_out\.linear_1\.", "final_layer.adaLN_modulation.1."),
    (r"^norm_out\.linear_2\.", "final_layer.linear."),
    (r"\.attn\.to_out\.0\.", ".attention.out."),
    (r"\.attn\.norm_q\.", ".attention.q_norm."),
    (r"\.attn\.norm_k\.", ".attention.k_norm."),
    (r"\.feed_forward\.linear_([123])\.", r".feed_forward.w\1."),
    (r"\.norm1\.linear\.", ".adaLN_modulation.1."),
    (r"\.norm1\.norm\.", ".attention_norm1."),
    (r"^(context_refiner\.\d+)\.norm1\.", r"\1.attention_norm1."),
    (r"\.norm2\.", ".attention_norm2."),
]


def lumina2_to_original(sd: dict) -> dict:
    fused = {}
    for stack in ("noise_refiner", "context_refiner", "layers"):
        for i in _blocks(sd, stack):
            a = f"{stack}.{i}.attn."
            fused[f"{stack}.{i}.attention.qkv.weight"] = [f"{a}to_{x}.weight" for x in "qkv"]
    out = _renamed(_fuse(sd, fused), _LUMINA)
    # Lumina-Image-2.0's files carry a final norm the model never uses (diffusers' converter drops it)
    out["norm_final.weight"] = torch.ones(sd["x_embedder.weight"].shape[0])
    return out


# --- Wan, SD3, the UNets ---------------------------------------------------------------------------------


def wan_to_original(sd: dict) -> dict:
    return _renamed(sd, _WAN_INV)


def sd3_to_original(sd: dict) -> dict:
    return sd3_diffusers_to_original(sd, len(_blocks(sd, "transformer_blocks")))


def unet_original(config: dict) -> Callable[[dict], dict]:
    """SD 1.x / SDXL (SGM) UNet layout: sd_original's mapping, plus SDXL's added conditioning."""

    def to_original(sd: dict) -> dict:
        rest = {k: v for k, v in sd.items() if not k.startswith("add_embedding.")}
        out = unet_to_original(rest, config)
        for i, j in ((1, 0), (2, 2)):
            for p in ("weight", "bias"):
                if f"add_embedding.linear_{i}.{p}" in sd:
                    out[f"label_emb.0.{j}.{p}"] = sd[f"add_embedding.linear_{i}.{p}"]
        # LDM / SGM files hold the UNet under model.diffusion_model. (diffusers' converter reads only those)
        return {COMFY + k: v for k, v in out.items()}

    return to_original


def identity(sd: dict) -> dict:
    return dict(sd)


# --- the families ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Original:
    family: str
    component: str  # the pipeline component (and subfolder) the file holds
    to_original: Callable[[dict], dict] | None  # None: built from the model's config (the UNets)
    gguf_format: str | None  # what keys.detect_key_format must call the layout; None: no GGUF test
    single_file: str | None  # why diffusers' from_single_file cannot load it at the tiny width; None: it can
    comfy_prefix: bool = False  # the GGUF test writes the names under ComfyUI's model.diffusion_model.


_HARD_CODED = "diffusers' converter hard-codes the real model's widths ({}), which a tiny model cannot have"

ORIGINALS: dict[str, Original] = {
    o.family: o
    for o in (
        Original("sd", "unet", None, "ldm_unet", None),
        Original("sdxl", "unet", None, "ldm_unet", None),
        Original("sd3", "transformer", sd3_to_original, "sd3", None),
        Original("wan", "transformer", wan_to_original, "wan", None, comfy_prefix=True),
        Original("wan22", "transformer_2", wan_to_original, "wan", None),
        Original("flux2", "transformer", flux2_to_original, "flux2", None),
        Original("flux2_klein", "transformer", flux2_to_original, "flux2", None, comfy_prefix=True),
        Original(
            "chroma",
            "transformer",
            chroma_to_original,
            "chroma",
            _HARD_CODED.format("inner_dim=3072, mlp_ratio=4"),
        ),
        Original(
            "hunyuanvideo",
            "transformer",
            hunyuanvideo_to_original,
            "hunyuan_video",
            _HARD_CODED.format("hidden_size=3072 for the single blocks"),
        ),
        Original("qwenimage", "transformer", identity, "diffusers", None, comfy_prefix=True),
        Original("hidream", "transformer", identity, "diffusers", None),
        Original("ltx", "transformer", ltx_to_original, "ltx", None),
        Original(
            "lumina2",
            "transformer",
            lumina2_to_original,
            "lumina2",
            _HARD_CODED.format("q 2304, k and v 768"),
        ),
    )
}


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every floating parameter nudged by seeded noise (zero-initialised layers too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@functools.cache
def folder(family: str) -> Path:
    return family_path(family)


def model_class(family: str, component: str | None = None):
    import json

    import diffusers

    sub = component or ORIGINALS[family].component
    config = json.loads((folder(family) / sub / "config.json").read_text())
    return getattr(diffusers, config["_class_name"])


@functools.cache
def float_model(family: str, component: str | None = None) -> torch.nn.Module:
    """The family's denoiser from its folder, weights nudged (a fresh seed per component)."""
    sub = component or ORIGINALS[family].component
    model = model_class(family, sub).from_pretrained(folder(family) / sub)
    return perturb_(model, seed=sum(map(ord, family + sub)))


def original_state(family: str, component: str | None = None) -> dict[str, torch.Tensor]:
    """``float_model``'s weights in the family's original layout (contiguous, as a file holds them)."""
    entry = ORIGINALS[family]
    model = float_model(family, component)
    convert = entry.to_original or unet_original(dict(model.config))
    return {k: v.detach().contiguous().clone() for k, v in convert(model.state_dict()).items()}


@dataclass
class Run:
    """One generation of the family's pipeline with its float denoiser(s): the output and what each
    denoiser was called with first."""

    output: object
    inputs: dict[str, tuple[tuple, dict]]


@functools.cache
def float_run(family: str) -> Run:
    import diffusers

    fam = FAMILIES[family]
    models = {name: float_model(family, name) for name in fam.denoisers}
    inputs: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for name, model in models.items():

        def record(module, args, kwargs, name=name):
            inputs.setdefault(name, (args, dict(kwargs)))

        handles.append(model.register_forward_pre_hook(record, with_kwargs=True))
    try:
        # the pipeline's own class: DiffusionPipeline.from_pretrained drops a passed-in transformer that the
        # pipeline's __init__ defaults to None (Wan's), loading the folder's instead
        pipe = getattr(diffusers, fam.pipeline).from_pretrained(folder(family), **models)
        assert all(getattr(pipe, name) is model for name, model in models.items())
        output = generate(pipe, fam)
    finally:
        for handle in handles:
            handle.remove()
    for name in models:  # a denoiser the two steps never reached (Wan 2.2's low-noise one) takes the other's
        if name not in inputs:
            inputs[name] = next(iter(inputs.values()))
    return Run(output, inputs)


def forward(model: torch.nn.Module, family: str, component: str | None = None) -> torch.Tensor:
    """``model`` run on what the family's float denoiser got first in its pipeline."""
    sub = component or ORIGINALS[family].component
    args, kwargs = float_run(family).inputs[sub]
    with torch.no_grad():
        out = model(*args, **kwargs)
    out = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
    return out.float()


def rel_l2(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())
