"""Embedded demo pipelines, built locally (no model hub) from configs with fixed seeds, and cached.

* ``flux``: FluxPipeline with a small FluxTransformer2DModel, CLIP and T5 text encoders, a VAE, a
  flow-matching scheduler and tokenizers made on the spot.
* ``sd``: StableDiffusionPipeline with a small UNet2DConditionModel, a CLIP text encoder and a VAE.

They use the real diffusers / transformers classes and are saved with ``save_pretrained``, so they are
loaded through the real loaders.  Linear layers are wide enough (>= 128 features) for every backend's
kernels and grouping, yet a 4-step generation takes seconds on 2 CPU cores.

Their weights are random (seeded, never trained): a demo image is noise by design, and what it shows is
how far the quantized pipeline's output is from the full-precision one's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

DEMOS = ("flux", "sd")
# Bump when a config below changes, so stale caches are rebuilt.
DEMO_VERSION = "2"
# The demos' image size (their tiny models are sized for it); the pipelines' own defaults differ (flux: 256).
DEMO_SIZE = 64
# Written into a demo folder, so a copy of it is still known as a demo.
MARKER = "diffusers_quant_demo.json"
RANDOM_WEIGHTS_NOTE = (
    "note: the demo weights are random (seeded, never trained), so the image is noise by design; what to "
    "look at is how close the quantized image is to the full-precision one: the comparison sheet and its rel-L2"
)

_WORDS = (
    "a photo of an the cat dog red blue green yellow tree house sky sun moon river mountain city night "
    "day painting portrait astronaut horse riding on in with under over small big bright dark"
).split()


def cache_dir() -> Path:
    root = os.environ.get("DIFFUSERS_QUANT_CACHE") or os.path.join(Path.home(), ".cache", "diffusers_quant")
    return Path(root)


def demo_path(name: str = "flux") -> Path:
    """Folder of the demo pipeline ``name``, built on first use."""
    if name not in DEMOS:
        from .errors import QuantError, choices

        raise QuantError(f"unknown demo {name!r}; expected one of {choices(DEMOS)}")
    path = cache_dir() / f"demo-{name}-v{DEMO_VERSION}"
    if not (path / "model_index.json").exists():
        _build_atomically(name, path)
    return path


def demo_name(path: str | os.PathLike) -> str | None:
    """The demo a pipeline folder holds (from its marker), or None for any other folder or file."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text()).get("demo")
    except (OSError, ValueError, AttributeError):
        return None


def _build_atomically(name: str, path: Path) -> None:
    # Build into a temp folder beside the target and rename, so an interrupted build never leaves a
    # half-written pipeline that later loads would trust.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        pipe = build_flux() if name == "flux" else build_sd()
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / MARKER).write_text(json.dumps({"demo": name, "version": DEMO_VERSION, "size": DEMO_SIZE}))
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / "model_index.json").exists():  # lost a race with another builder: theirs is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    chars = sorted(set("".join(_WORDS)))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for w in _WORDS:
        vocab.setdefault(w + "</w>", len(vocab))
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        tok = CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"))
    tok.model_max_length = max_length
    return tok


def _t5_tokenizer(max_length: int = 64):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    chars = sorted(set("".join(_WORDS)))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in _WORDS] + [(c, -5.0) for c in chars]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tok = T5TokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )
    tok.model_max_length = max_length
    return tok


def _clip_text_encoder(vocab_size: int, hidden: int = 128, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=projection or hidden,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def _vae(latent_channels: int, shift_factor: float | None = None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=64,
        shift_factor=shift_factor,
    ).eval()


def build_flux():
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip_tok = _clip_tokenizer()
    t5_tok = _t5_tokenizer()
    text_encoder = _clip_text_encoder(len(clip_tok), hidden=128)
    t5_config = T5Config(
        vocab_size=len(t5_tok),
        d_model=256,
        d_kv=64,
        d_ff=512,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        feed_forward_proj="gated-gelu",
    )
    text_encoder_2 = T5EncoderModel(t5_config).eval()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=64,
        num_attention_heads=4,
        joint_attention_dim=256,
        pooled_projection_dim=128,
        guidance_embeds=False,
        axes_dims_rope=(16, 24, 24),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    return FluxPipeline(
        scheduler=scheduler,
        vae=_vae(latent_channels=4, shift_factor=0.0),
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def build_sd():
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tok = _clip_tokenizer()
    text_encoder = _clip_text_encoder(len(tok), hidden=128)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(128, 256),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=8,
        norm_num_groups=32,
        use_linear_projection=True,
    ).eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=_vae(latent_channels=4),
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def generate_kwargs(
    pipe, *, prompt: str, steps: int, seed: int, height: int | None = DEMO_SIZE, width: int | None = DEMO_SIZE
) -> dict:
    """Call arguments that fit the demo sizes for the pipeline's family."""
    import torch

    kwargs = dict(
        prompt=prompt,
        num_inference_steps=steps,
        height=height,
        width=width,
        generator=torch.Generator("cpu").manual_seed(seed),
    )
    if type(pipe).__name__.startswith("Flux"):
        kwargs.update(max_sequence_length=min(64, pipe.tokenizer_2.model_max_length), guidance_scale=3.5)
    return kwargs
