"""Tiny pipelines of every family the hooks are tested on (issue 16), built locally from configs with fixed
seeds (no model hub: text encoders from their configs, tokenizers made on the spot), saved with
``save_pretrained`` into the session cache and loaded back through the real loaders.

Sizes follow diffusers' own ``get_dummy_components``, widened where a Linear must reach the default
``min_features`` (64) so the backends have layers to quantize: inner widths of 64, feed-forwards of 128
(so quanto's grouped 2/4-bit weights, 128 inputs a group, have layers too), 1-2 blocks, 16-32 pixel
images, 1 frame for the video families, 2 steps.

``family_path(name)`` builds a family's folder on first use (atomically, like the demos) and returns it;
``FAMILIES[name]`` says how to call the pipeline, what comes out, and which components it has.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from diffusers_quant.demo import (
    _clip_text_encoder,
    _clip_tokenizer,
    _t5_tokenizer,
    cache_dir,
    demo_path,
)

# Bump when a builder below changes, so stale caches are rebuilt.
VERSION = "2"

_WORDS = (
    "a photo of an the cat dog red blue green yellow tree house sky sun moon river mountain city night "
    "day painting portrait astronaut horse riding on in with under over small big bright dark"
).split()
_CHARS = sorted(
    set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?'\"-_()[]{}<>|/\\=+*#&%$@\n")
)


@dataclass(frozen=True)
class Family:
    name: str
    pipeline: str  # the diffusers pipeline class
    build: Callable | None  # None: one of diffusers_quant.demo's pipelines (``demo``)
    denoisers: tuple[str, ...]
    text_encoders: tuple[str, ...]
    shape: tuple[int, ...]  # of the np output: images (1, H, W, 3), videos (1, F, H, W, 3)
    call: dict = field(default_factory=dict)  # generation arguments besides prompt, steps and generator
    attrs: dict = field(default_factory=dict)  # pipeline attributes set before generating
    demo: str | None = None


def family_path(name: str) -> Path:
    """Folder of the tiny pipeline of family ``name``, built on first use."""
    family = FAMILIES[name]
    if family.demo is not None:
        return demo_path(family.demo)
    path = cache_dir() / f"family-{name}-v{VERSION}"
    if not (path / "model_index.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            family.build().save_pretrained(tmp, safe_serialization=True)
            try:
                os.replace(tmp, path)
            except OSError:
                if not (path / "model_index.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def generate(pipe, family: Family, steps: int = 2, seed: int = 0):
    """The pipeline's output as a numpy array (images, or a video's frames)."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    for key, value in family.attrs.items():
        setattr(pipe, key, value)
    out = pipe(
        prompt="a red cat on a tree",
        num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        **family.call,
    )
    return out.frames if hasattr(out, "frames") else out.images


# --- tokenizers --------------------------------------------------------------------------------------

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(
    specials: tuple[str, ...], *, pad: str, eos: str, bos: str | None = None, max_length: int = 64
):
    """A unigram tokenizer over the demo words and single characters (any English prompt or template
    tokenizes), with the family's special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = [(s, 0.0) for s in specials] + [("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in _WORDS] + [(c, -5.0) for c in _CHARS]
    tk = Tokenizer(models.Unigram(vocab, unk_id=specials.index("<unk>")))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token=pad, eos_token=eos, bos_token=bos, unk_token="<unk>"
    )
    tok.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in (pad, eos, bos)]})
    tok.chat_template = _CHAT_TEMPLATE
    tok.model_max_length = max_length
    return tok


def _qwen_tokenizer(max_length: int = 64):
    return _tokenizer(
        (
            "<|endoftext|>",
            "<unk>",
            "<|im_start|>",
            "<|im_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|image_pad|>",
        ),
        pad="<|endoftext|>",
        eos="<|im_end|>",
        max_length=max_length,
    )


def _llama_tokenizer(max_length: int = 64):
    return _tokenizer(
        ("<pad>", "<unk>", "<s>", "</s>"), pad="<pad>", eos="</s>", bos="<s>", max_length=max_length
    )


# --- builders ----------------------------------------------------------------------------------------

_W = 64  # inner width of every tiny model


def _t5(vocab_size: int, d_model: int = _W):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=32,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        feed_forward_proj="gated-gelu",
    )
    return T5EncoderModel(config).eval()


def _small_vae(latent_channels: int, blocks: int = 2, **kwargs):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(8,) * blocks,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
        **kwargs,
    ).eval()


def build_sdxl():
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tok = _clip_tokenizer()
    tok_2 = _clip_tokenizer()
    text_encoder = _clip_text_encoder(len(tok), hidden=64)
    text_encoder_2 = _clip_text_encoder(len(tok_2), hidden=64, projection=64)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=64 + 6 * 8,
        norm_num_groups=32,
        use_linear_projection=True,
    ).eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    return StableDiffusionXLPipeline(
        vae=_small_vae(4),
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tok_2,
        unet=unet,
        scheduler=scheduler,
    )


def build_sd3():
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tok, tok_2, tok_3 = _clip_tokenizer(), _clip_tokenizer(), _t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=32,
        num_attention_heads=2,
        caption_projection_dim=_W,
        joint_attention_dim=_W,
        pooled_projection_dim=2 * _W,
        out_channels=4,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_small_vae(4, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip_text_encoder(len(tok), hidden=_W, projection=_W),
        tokenizer=tok,
        text_encoder_2=_clip_text_encoder(len(tok_2), hidden=_W, projection=_W),
        tokenizer_2=tok_2,
        text_encoder_3=_t5(len(tok_3)),
        tokenizer_3=tok_3,
        image_encoder=None,
        feature_extractor=None,
    )


def _wan_transformer(in_channels: int = 16):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=in_channels,
        out_channels=in_channels,
        text_dim=_W,
        freq_dim=_W,
        ffn_dim=2 * _W,
        num_layers=1,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


def _build_wan(two: bool):
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(0)
    tok = _t5_tokenizer()
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    transformer = _wan_transformer()
    transformer_2 = _wan_transformer() if two else None
    return WanPipeline(
        tokenizer=tok,
        text_encoder=_t5(len(tok)),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=0.5 if two else None,
    )


def build_wan():
    return _build_wan(two=False)


def build_wan22():
    return _build_wan(two=True)


def build_qwenimage():
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    tok = _qwen_tokenizer(max_length=1024)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=1,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=_W,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    ).eval()
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()
    ids = tok.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": _W,
            "intermediate_size": 2 * _W,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [4, 6, 6], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": len(tok),
            "bos_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": _W,
        },
        hidden_size=_W,
        vocab_size=len(tok),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        vision_token_id=ids("<|image_pad|>"),
        image_token_id=ids("<|image_pad|>"),
    )
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval(),
        tokenizer=tok,
        transformer=transformer,
    )


def _flux2_transformer(guidance: bool):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=_W,
        timestep_guidance_channels=_W,
        axes_dims_rope=[8, 8, 8, 8],
        guidance_embeds=guidance,
    ).eval()


def _flux2_vae():
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def build_flux2():
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(0)
    tok = _llama_tokenizer(max_length=64)
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": len(tok),
            "hidden_size": _W,
            "intermediate_size": 2 * _W,
            "max_position_embeddings": 512,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000000.0,
            "sliding_window": None,
            "bos_token_id": 2,
            "eos_token_id": 3,
            "pad_token_id": 0,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 16,
            "image_size": 30,
            "patch_size": 6,
            "num_channels": 3,
        },
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        image_seq_length=4,
        vision_feature_layer=-1,
        image_token_index=1,
    )
    return Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_flux2_vae(),
        text_encoder=Mistral3ForConditionalGeneration(config).eval(),
        tokenizer=tok,
        transformer=_flux2_transformer(guidance=True),
    )


def build_flux2_klein():
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    tok = _qwen_tokenizer(max_length=64)
    config = Qwen3Config(
        intermediate_size=2 * _W,
        hidden_size=_W,
        head_dim=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=512,
    )
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_flux2_vae(),
        text_encoder=Qwen3ForCausalLM(config).eval(),
        tokenizer=tok,
        transformer=_flux2_transformer(guidance=False),
    )


def build_chroma():
    import torch
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    tok = _t5_tokenizer()
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=_W,
        axes_dims_rope=(8, 12, 12),
        approximator_hidden_dim=_W,
        approximator_layers=1,
        approximator_num_channels=16,
    ).eval()
    return ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=_t5(len(tok)),
        tokenizer=tok,
        transformer=transformer,
        vae=_small_vae(
            1, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False
        ),
        image_encoder=None,
        feature_extractor=None,
    )


def _gemma2(tok, **kwargs):
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        head_dim=32,
        hidden_size=_W,
        intermediate_size=2 * _W,
        num_attention_heads=2,
        num_hidden_layers=2,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        attn_implementation="eager",
        **kwargs,
    )
    return Gemma2Model(config).eval()


def build_sana():
    import torch
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    torch.manual_seed(0)
    tok = _llama_tokenizer(max_length=64)
    transformer = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=32,
        num_cross_attention_heads=2,
        cross_attention_head_dim=32,
        cross_attention_dim=_W,
        caption_channels=_W,
        sample_size=32,
    ).eval()
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=[1, 1],
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()
    return SanaPipeline(
        tokenizer=tok,
        text_encoder=_gemma2(tok),
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )


def build_lumina2():
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    torch.manual_seed(0)
    tok = _llama_tokenizer(max_length=64)
    transformer = Lumina2Transformer2DModel(
        sample_size=4,
        patch_size=2,
        in_channels=4,
        hidden_size=_W,
        num_layers=1,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=2,
        multiple_of=16,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        scaling_factor=1.0,
        axes_dim_rope=[8, 12, 12],
        cap_feat_dim=_W,
    ).eval()
    return Lumina2Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        # the pipeline takes a VAE scale factor of 8 whatever the VAE is
        vae=_small_vae(
            4,
            blocks=4,
            shift_factor=0.0609,
            scaling_factor=1.5035,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=_gemma2(tok, sliding_window=2),
        tokenizer=tok,
    )


def build_ltx():
    import torch
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    torch.manual_seed(0)
    tok = _t5_tokenizer()
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=32,
        cross_attention_dim=_W,
        num_layers=1,
        caption_channels=_W,
    ).eval()
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    ).eval()
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    return LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_t5(len(tok)),
        tokenizer=tok,
        transformer=transformer,
    )


def build_cogvideox():
    import torch
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
        DDIMScheduler,
    )

    torch.manual_seed(0)
    tok = _t5_tokenizer()
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=4,
        out_channels=4,
        time_embed_dim=_W,
        text_embed_dim=_W,
        num_layers=1,
        sample_width=2,
        sample_height=2,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
    ).eval()
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()
    return CogVideoXPipeline(
        tokenizer=tok, text_encoder=_t5(len(tok)), vae=vae, transformer=transformer, scheduler=DDIMScheduler()
    )


def build_hunyuanvideo():
    import torch
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    tok = _llama_tokenizer(max_length=64)
    tok_2 = _clip_tokenizer()
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=32,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=_W,
        pooled_projection_dim=_W,
        rope_axes_dim=(8, 12, 12),
    ).eval()
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    ).eval()
    llama = LlamaConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        hidden_size=_W,
        intermediate_size=2 * _W,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=len(tok),
        hidden_act="gelu",
    )
    return HunyuanVideoPipeline(
        text_encoder=LlamaModel(llama).eval(),
        tokenizer=tok,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=_clip_text_encoder(len(tok_2), hidden=_W),
        tokenizer_2=tok_2,
    )


def build_hidream():
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        HiDreamImagePipeline,
        HiDreamImageTransformer2DModel,
    )
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok, tok_2, tok_3, tok_4 = _clip_tokenizer(), _clip_tokenizer(), _t5_tokenizer(), _llama_tokenizer(128)
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=32,
        num_attention_heads=2,
        caption_channels=[_W, _W],
        text_emb_dim=2 * _W,
        num_routed_experts=2,
        num_activated_experts=1,
        axes_dims_rope=(8, 12, 12),
        max_resolution=(32, 32),
        llama_layers=(0, 1),
    ).eval()
    llama = LlamaConfig(
        bos_token_id=tok_4.bos_token_id,
        eos_token_id=tok_4.eos_token_id,
        pad_token_id=tok_4.pad_token_id,
        hidden_size=_W,
        intermediate_size=2 * _W,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=len(tok_4),
    )
    text_encoder_4 = LlamaForCausalLM(llama).eval()
    text_encoder_4.generation_config.pad_token_id = tok_4.pad_token_id
    return HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_small_vae(4, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_clip_text_encoder(len(tok), hidden=_W, projection=_W),
        tokenizer=tok,
        text_encoder_2=_clip_text_encoder(len(tok_2), hidden=_W, projection=_W),
        tokenizer_2=tok_2,
        text_encoder_3=_t5(len(tok_3)),
        tokenizer_3=tok_3,
        text_encoder_4=text_encoder_4,
        tokenizer_4=tok_4,
        transformer=transformer,
    )


_IMG = dict(height=32, width=32)
_VID = dict(height=16, width=16, num_frames=1)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "flux",
            "FluxPipeline",
            None,
            ("transformer",),
            ("text_encoder", "text_encoder_2"),
            (1, 64, 64, 3),
            dict(height=64, width=64, max_sequence_length=64, guidance_scale=3.5),
            demo="flux",
        ),
        Family(
            "sd",
            "StableDiffusionPipeline",
            None,
            ("unet",),
            ("text_encoder",),
            (1, 64, 64, 3),
            dict(height=64, width=64),
            demo="sd",
        ),
        Family(
            "sdxl",
            "StableDiffusionXLPipeline",
            build_sdxl,
            ("unet",),
            ("text_encoder", "text_encoder_2"),
            (1, 32, 32, 3),
            dict(_IMG),
        ),
        Family(
            "sd3",
            "StableDiffusion3Pipeline",
            build_sd3,
            ("transformer",),
            ("text_encoder", "text_encoder_2", "text_encoder_3"),
            (1, 32, 32, 3),
            dict(_IMG, max_sequence_length=16),
        ),
        Family(
            "wan",
            "WanPipeline",
            build_wan,
            ("transformer",),
            ("text_encoder",),
            (1, 1, 16, 16, 3),
            dict(_VID, max_sequence_length=16),
        ),
        Family(
            "wan22",
            "WanPipeline",
            build_wan22,
            ("transformer", "transformer_2"),
            ("text_encoder",),
            (1, 1, 16, 16, 3),
            dict(_VID, max_sequence_length=16),
        ),
        Family(
            "qwenimage",
            "QwenImagePipeline",
            build_qwenimage,
            ("transformer",),
            ("text_encoder",),
            (1, 32, 32, 3),
            dict(_IMG, max_sequence_length=16, true_cfg_scale=1.0),
        ),
        Family(
            "flux2",
            "Flux2Pipeline",
            build_flux2,
            ("transformer",),
            ("text_encoder",),
            (1, 16, 16, 3),
            dict(height=16, width=16, max_sequence_length=32, text_encoder_out_layers=(1,)),
        ),
        Family(
            "flux2_klein",
            "Flux2KleinPipeline",
            build_flux2_klein,
            ("transformer",),
            ("text_encoder",),
            (1, 16, 16, 3),
            dict(height=16, width=16, max_sequence_length=32, text_encoder_out_layers=(1,)),
        ),
        Family(
            "chroma",
            "ChromaPipeline",
            build_chroma,
            ("transformer",),
            ("text_encoder",),
            (1, 16, 16, 3),
            dict(height=16, width=16, max_sequence_length=16),
        ),
        Family(
            "sana",
            "SanaPipeline",
            build_sana,
            ("transformer",),
            ("text_encoder",),
            (1, 32, 32, 3),
            dict(_IMG, max_sequence_length=16, complex_human_instruction=None, use_resolution_binning=False),
        ),
        Family(
            "ltx",
            "LTXPipeline",
            build_ltx,
            ("transformer",),
            ("text_encoder",),
            (1, 1, 32, 32, 3),
            dict(height=32, width=32, num_frames=1, max_sequence_length=16),
        ),
        Family(
            "lumina2",
            "Lumina2Pipeline",
            build_lumina2,
            ("transformer",),
            ("text_encoder",),
            (1, 32, 32, 3),
            dict(_IMG, max_sequence_length=16),
        ),
        Family(
            "hidream",
            "HiDreamImagePipeline",
            build_hidream,
            ("transformer",),
            ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4"),
            (1, 32, 32, 3),
            dict(_IMG, max_sequence_length=16),
            # it rescales every request to default_sample_size * vae_scale_factor squared (128: 256 x 256)
            attrs=dict(default_sample_size=16),
        ),
        Family(
            "cogvideox",
            "CogVideoXPipeline",
            build_cogvideox,
            ("transformer",),
            ("text_encoder",),
            (1, 1, 16, 16, 3),
            dict(_VID, max_sequence_length=16),
        ),
        Family(
            "hunyuanvideo",
            "HunyuanVideoPipeline",
            build_hunyuanvideo,
            ("transformer",),
            ("text_encoder", "text_encoder_2"),
            (1, 1, 16, 16, 3),
            dict(_VID, max_sequence_length=16, prompt_template={"template": "{}", "crop_start": 0}),
        ),
    )
}
