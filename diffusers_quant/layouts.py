"""Original key layouts: a diffusers model's state dict in the keys its original code (and ComfyUI, Forge)
uses, for the single-file writers. Each map only renames, splits and joins tensors (never computes on a
weight), so it also runs on stand-ins for packed weights (``convert.CarryRows``)."""

from __future__ import annotations

import torch

from .errors import QuantError


def _flux_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel state dict in Flux's original (BFL) keys: the inverse of diffusers'
    ``convert_flux_transformer_checkpoint_to_diffusers`` (which ComfyUI and diffusers both read)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return sd[key]

    def both(src: str, dst: str) -> None:  # a Linear's weight and bias
        for part in ("weight", "bias"):
            if f"{src}.{part}" in sd:
                out[f"{dst}.{part}"] = take(f"{src}.{part}")

    def fused(srcs: list[str], dst: str) -> None:
        for part in ("weight", "bias"):
            out[f"{dst}.{part}"] = torch.cat([take(f"{s}.{part}") for s in srcs])

    for src, dst in [
        ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
        ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
        ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
        ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
        ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
        ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
        ("context_embedder", "txt_in"),
        ("x_embedder", "img_in"),
        ("proj_out", "final_layer.linear"),
    ]:
        both(src, dst)
    for part in ("weight", "bias"):  # diffusers keeps (scale, shift); the original (shift, scale)
        scale, shift = take(f"norm_out.linear.{part}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{part}"] = torch.cat([shift, scale])
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")}
    for i in sorted(blocks):
        d, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
        both(f"{d}.norm1.linear", f"{o}.img_mod.lin")
        both(f"{d}.norm1_context.linear", f"{o}.txt_mod.lin")
        fused([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], f"{o}.img_attn.qkv")
        fused([f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], f"{o}.txt_attn.qkv")
        for src, dst in [
            ("attn.norm_q", "img_attn.norm.query_norm"),
            ("attn.norm_k", "img_attn.norm.key_norm"),
            ("attn.norm_added_q", "txt_attn.norm.query_norm"),
            ("attn.norm_added_k", "txt_attn.norm.key_norm"),
        ]:
            out[f"{o}.{dst}.scale"] = take(f"{d}.{src}.weight")
        both(f"{d}.ff.net.0.proj", f"{o}.img_mlp.0")
        both(f"{d}.ff.net.2", f"{o}.img_mlp.2")
        both(f"{d}.ff_context.net.0.proj", f"{o}.txt_mlp.0")
        both(f"{d}.ff_context.net.2", f"{o}.txt_mlp.2")
        both(f"{d}.attn.to_out.0", f"{o}.img_attn.proj")
        both(f"{d}.attn.to_add_out", f"{o}.txt_attn.proj")
    singles = {int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")}
    for i in sorted(singles):
        d, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        both(f"{d}.norm.linear", f"{o}.modulation.lin")
        fused([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"], f"{o}.linear1")
        out[f"{o}.norm.query_norm.scale"] = take(f"{d}.attn.norm_q.weight")
        out[f"{o}.norm.key_norm.scale"] = take(f"{d}.attn.norm_k.weight")
        both(f"{d}.proj_out", f"{o}.linear2")
    left = sorted(set(sd) - used)
    if left:
        raise QuantError(f"the Flux key map does not cover {len(left)} tensors (e.g. {', '.join(left[:3])})")
    return out


ORIGINAL_LAYOUTS = {"FluxTransformer2DModel": _flux_to_original}


def require_original_layout(class_name: str, quant: str) -> None:
    """Refuse a model class whose original key layout this package cannot write (``quant``: what is written,
    for the message)."""
    if class_name not in ORIGINAL_LAYOUTS:
        raise QuantError(
            f"--quant {quant} --out FILE.safetensors writes the model's original key layout, known here for "
            f"{', '.join(ORIGINAL_LAYOUTS)} (not {class_name}); fix: --out a folder (diffusers' layout) or a "
            "gguf:<type> file"
        )
