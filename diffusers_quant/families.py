"""Which Linear layers each model family keeps in full precision by default, and why: one data table.

Embedders, the timestep / guidance conditioning, modulation that reaches every block, and the model's final
projection carry little of its weight but much of the quantization error (what SD.Next, Forge and ComfyUI keep
unquantized too).  Each entry is an anchored ``fnmatch`` pattern over a Linear's full module name ("proj_out"
is the model's last layer, not every block's ``proj_out``) with the one-line reason it stays.  A model whose
class (or a base class) is in the table gets its family's entries; any other gets the generic entries of its
kind and one notice per class on the ``diffusers_quant`` logger.  On top of either, every module in the
class's ``_keep_in_fp32_modules`` stays (the library keeps it in float32).  A plan's ``include=`` replaces
these defaults, its ``exclude=`` adds to them.

The entries come from the installed diffusers model classes (their ``_keep_in_fp32_modules``,
``_skip_layerwise_casting_patterns`` and the module names of their ``__init__``); the families whose entries
differ from what the generic defaults kept before the table (Flux.2, Qwen-Image, Sana, LTX, HiDream, Chroma,
CogVideoX) say so in ``changed``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger("diffusers_quant")


@dataclass(frozen=True)
class Keep:
    """Linears whose full name matches ``pattern`` stay in full precision, because of ``reason``."""

    pattern: str
    reason: str


@dataclass(frozen=True)
class Family:
    name: str
    classes: tuple[str, ...]  # class names, diffusers' or transformers' own
    keep: tuple[Keep, ...]
    changed: str = ""  # what differs from the generic defaults of its kind (empty: the same layers)


# The generic defaults, per kind (what every model got before the table; a class not in it still does).
GENERIC: dict[str, tuple[Keep, ...]] = {
    "transformer": (
        Keep("x_embedder", "input patch embedder"),
        Keep("context_embedder", "text-state embedder"),
        Keep("*embedder*", "an embedder"),
        Keep("*embed", "an embedding"),
        Keep("pos_embed*", "positional embedding"),
        Keep("proj_out", "final projection to the output latents"),
        Keep("norm_out.*", "final norm's modulation"),
        Keep("time_text_embed.*", "timestep / pooled-text conditioning"),
        Keep("time_embed*", "timestep conditioning"),
        Keep("*timestep_embedder*", "timestep embedder"),
    ),
    "unet": (
        Keep("conv_in", "input convolution"),
        Keep("conv_out", "output convolution"),
        Keep("time_embedding.*", "timestep embedding"),
        Keep("add_embedding.*", "added (SDXL size / pooled-text) conditioning"),
        Keep("class_embedding*", "class conditioning"),
    ),
    "controlnet": (
        Keep("conv_in", "input convolution"),
        Keep("time_embedding.*", "timestep embedding"),
        Keep("add_embedding.*", "added (SDXL size / pooled-text) conditioning"),
        Keep("controlnet_cond_embedding.*", "control image embedder"),
    ),
    "text_encoder": (
        Keep("*embed*", "token / position embeddings"),
        Keep("shared", "shared token embedding"),
        Keep("lm_head", "output head"),
        Keep("*position*", "position embeddings"),
    ),
    "vae": (Keep("*", "VAEs stay in full precision (convolutions, and small)"),),
    "other": (),
}

_TIMESTEP = "timestep / guidance conditioning: feeds every block's modulation"
_FINAL_NORM = "final norm's modulation (scale / shift of the output)"
_PROJ_OUT = "final projection to the output latents"
_TEXT_IN = "text-state embedder (the encoder's states into the model's width)"
_IMAGE_IN = "input patch embedder"

FAMILIES: tuple[Family, ...] = (
    Family(
        "Flux",
        ("FluxTransformer2DModel",),
        (
            Keep("x_embedder", _IMAGE_IN),
            Keep("context_embedder", _TEXT_IN),
            Keep("time_text_embed.*", _TIMESTEP + " (timestep, guidance, pooled CLIP text)"),
            Keep("norm_out.*", _FINAL_NORM),
            Keep("proj_out", _PROJ_OUT),
        ),
    ),
    Family(
        "Flux.2",
        ("Flux2Transformer2DModel",),
        (
            Keep("x_embedder", _IMAGE_IN),
            Keep("context_embedder", _TEXT_IN),
            Keep("time_guidance_embed.*", _TIMESTEP + " (timestep, guidance)"),
            Keep("double_stream_modulation_*", "modulation shared by every double-stream block"),
            Keep("single_stream_modulation.*", "modulation shared by every single-stream block"),
            Keep("norm_out.*", _FINAL_NORM),
            Keep("proj_out", _PROJ_OUT),
        ),
        changed="also keeps double_stream_modulation_img, double_stream_modulation_txt and "
        "single_stream_modulation, the modulation all blocks share (the generic defaults quantized them)",
    ),
    Family(
        "SD3",
        ("SD3Transformer2DModel",),
        (
            Keep("pos_embed*", "patch embedder and positional embedding"),
            Keep("context_embedder", _TEXT_IN),
            Keep("time_text_embed.*", _TIMESTEP + " (timestep, pooled text)"),
            Keep("norm_out.*", _FINAL_NORM),
            Keep("proj_out", _PROJ_OUT),
        ),
    ),
    Family(
        "SD / SDXL UNet",
        ("UNet2DConditionModel",),
        (
            Keep("conv_in", "input convolution"),
            Keep("conv_out", "output convolution"),
            Keep("time_embedding.*", "timestep embedding: feeds every resnet's time projection"),
            Keep("add_embedding.*", "SDXL's added conditioning (sizes, pooled text)"),
            Keep("class_embedding*", "class conditioning"),
        ),
    ),
    Family(
        "Wan",
        ("WanTransformer3DModel", "WanVACETransformer3DModel"),
        (
            Keep("patch_embedding", _IMAGE_IN),
            Keep(
                "condition_embedder.*",
                "timestep, text and image embedders, and the timestep projection that modulates every block",
            ),
            Keep("proj_out", _PROJ_OUT),
        ),
    ),
    Family(
        "Qwen-Image",
        ("QwenImageTransformer2DModel",),
        (
            Keep("img_in", _IMAGE_IN),
            Keep("txt_in", _TEXT_IN),
            Keep("time_text_embed.*", _TIMESTEP),
            Keep("norm_out.*", _FINAL_NORM),
            Keep("proj_out", _PROJ_OUT),
        ),
        changed="also keeps img_in and txt_in, its input embedders (the generic names missed them)",
    ),
    Family(
        "Sana",
        ("SanaTransformer2DModel",),
        (
            Keep("patch_embed.*", _IMAGE_IN),
            Keep("caption_projection.*", _TEXT_IN),
            Keep(
                "time_embed.*",
                _TIMESTEP + " (AdaLayerNormSingle: the timestep into every block's modulation)",
            ),
            Keep("proj_out", _PROJ_OUT),
        ),
        changed="also keeps caption_projection, its text embedder (the generic names missed it)",
    ),
    Family(
        "LTX",
        ("LTXVideoTransformer3DModel",),
        (
            Keep("proj_in", _IMAGE_IN),
            Keep("caption_projection.*", _TEXT_IN),
            Keep(
                "time_embed.*",
                _TIMESTEP + " (AdaLayerNormSingle: the timestep into every block's modulation)",
            ),
            Keep("proj_out", _PROJ_OUT),
        ),
        changed="also keeps proj_in and caption_projection, its input embedders (the generic names missed them)",
    ),
    Family(
        "Lumina2",
        ("Lumina2Transformer2DModel",),
        (
            Keep("x_embedder", _IMAGE_IN),
            Keep("time_caption_embed.*", "timestep and caption embedders"),
            Keep("norm_out.*", "final norm's modulation and the final projection"),
        ),
    ),
    Family(
        "HiDream",
        ("HiDreamImageTransformer2DModel",),
        (
            Keep("x_embedder.*", _IMAGE_IN),
            Keep("t_embedder.*", _TIMESTEP),
            Keep("p_embedder.*", "pooled-text embedder: feeds every block's modulation"),
            Keep("caption_projection.*", "text-state embedders (T5 and each Llama layer's states)"),
            Keep("final_layer.*", "final modulation and projection to the output latents"),
        ),
        changed="also keeps caption_projection and final_layer (the generic names missed them)",
    ),
    Family(
        "Chroma",
        ("ChromaTransformer2DModel",),
        (
            Keep("x_embedder", _IMAGE_IN),
            Keep("context_embedder", _TEXT_IN),
            Keep(
                "distilled_guidance_layer.*",
                "the approximator: computes every block's modulation from the timestep",
            ),
            Keep("proj_out", _PROJ_OUT),
        ),
        changed="also keeps distilled_guidance_layer, the modulation approximator (the generic defaults "
        "quantized it)",
    ),
    Family(
        "CogVideoX",
        ("CogVideoXTransformer3DModel",),
        (
            Keep("patch_embed.*", "patch and text embedders"),
            Keep("time_embedding.*", _TIMESTEP),
            Keep("ofs_embedding.*", "frame-offset conditioning (CogVideoX 1.5)"),
            Keep("norm_out.*", _FINAL_NORM),
            Keep("proj_out", _PROJ_OUT),
        ),
        changed="also keeps patch_embed.text_proj, its text embedder (the generic names missed it)",
    ),
    Family(
        "HunyuanVideo",
        ("HunyuanVideoTransformer3DModel",),
        (
            Keep("x_embedder.*", _IMAGE_IN),
            Keep(
                "context_embedder.*",
                "the text token refiner (a small transformer over the text states) and its embedders",
            ),
            Keep("time_text_embed.*", _TIMESTEP + " (timestep, guidance, pooled text)"),
            Keep("norm_out.*", _FINAL_NORM),
            Keep("proj_out", _PROJ_OUT),
        ),
    ),
    Family(
        "ControlNet (SD / SDXL)",
        ("ControlNetModel",),
        GENERIC["controlnet"],
    ),
    Family(
        "text encoders",
        (
            "CLIPTextModel",
            "CLIPTextModelWithProjection",
            "T5EncoderModel",
            "UMT5EncoderModel",
            "Qwen2_5_VLForConditionalGeneration",
            "Mistral3ForConditionalGeneration",
            "Gemma2Model",
            "LlamaForCausalLM",
            "LlamaModel",
            "Qwen3ForCausalLM",
        ),
        GENERIC["text_encoder"],
    ),
)

BY_CLASS: dict[str, Family] = {name: family for family in FAMILIES for name in family.classes}

_noticed: set[str] = set()


def family_of(cls: type) -> Family | None:
    """The table's family for ``cls``: its own class name, else the nearest base class in the table."""
    for base in getattr(cls, "__mro__", (cls,)):
        family = BY_CLASS.get(getattr(base, "__name__", ""))
        if family is not None:
            return family
    return None


def default_keeps(model, kind: str) -> tuple[Keep, ...]:
    """What ``model`` keeps in full precision by default: its family's entries (or the generic ones of its
    kind, with a notice once per class), then the modules its class keeps in float32."""
    cls = type(model)
    family = family_of(cls)
    if family is not None:
        keeps = family.keep
    else:
        keeps = GENERIC.get(kind, ())
        if kind != "vae" and cls.__name__ not in _noticed:
            _noticed.add(cls.__name__)
            logger.info(
                "%s is not in diffusers_quant's family table (diffusers_quant/families.py): the generic %s "
                "defaults choose what stays in full precision",
                cls.__name__,
                kind,
            )
    fp32 = tuple(
        Keep(f"*{m}*", f"in {cls.__name__}._keep_in_fp32_modules (the library keeps it in float32)")
        for m in (getattr(model, "_keep_in_fp32_modules", None) or ())
    )
    return keeps + fp32
