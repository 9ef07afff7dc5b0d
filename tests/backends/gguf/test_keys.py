"""keys.py: original checkpoint layouts -> diffusers names, on plain tensors and on packed GGUF weights."""

from __future__ import annotations

import re

import pytest
import torch

gguf = pytest.importorskip("gguf")
from diffusers_quant.backends.gguf.keys import (  # noqa: E402
    KeyFormatError,
    detect_key_format,
    to_diffusers_keys,
)
from diffusers_quant.backends.gguf.nn import GGUFWeight  # noqa: E402
from diffusers_quant.backends.gguf.reader import read_gguf  # noqa: E402
from diffusers_quant.backends.gguf.writer import write_gguf  # noqa: E402


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2)
    return torch.cat([b, a])


# ---------------------------------------------------------------------------------------------------------
# Flux: diffusers -> BFL written independently here, so the test checks the mapping rather than restating it

_FLUX_GLOBAL_INV = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
}


def flux_diffusers_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    n_double = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    n_single = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks."))
    for src, dst in _FLUX_GLOBAL_INV.items():
        for p in ("weight", "bias"):
            if f"{src}.{p}" in sd:
                out[f"{dst}.{p}"] = sd[f"{src}.{p}"]
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap(sd[f"norm_out.linear.{p}"])
    for i in range(n_double):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{b}img_attn.qkv.{p}"] = torch.cat([sd[f"{d}attn.to_{x}.{p}"] for x in "qkv"])
            out[f"{b}txt_attn.qkv.{p}"] = torch.cat([sd[f"{d}attn.add_{x}_proj.{p}"] for x in "qkv"])
            for src, dst in [
                ("norm1.linear", "img_mod.lin"),
                ("norm1_context.linear", "txt_mod.lin"),
                ("attn.to_out.0", "img_attn.proj"),
                ("attn.to_add_out", "txt_attn.proj"),
                ("ff.net.0.proj", "img_mlp.0"),
                ("ff.net.2", "img_mlp.2"),
                ("ff_context.net.0.proj", "txt_mlp.0"),
                ("ff_context.net.2", "txt_mlp.2"),
            ]:
                out[f"{b}{dst}.{p}"] = sd[f"{d}{src}.{p}"]
        for src, dst in [
            ("norm_q", "img_attn.norm.query_norm"),
            ("norm_k", "img_attn.norm.key_norm"),
            ("norm_added_q", "txt_attn.norm.query_norm"),
            ("norm_added_k", "txt_attn.norm.key_norm"),
        ]:
            out[f"{b}{dst}.scale"] = sd[f"{d}attn.{src}.weight"]
    for i in range(n_single):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{b}linear1.{p}"] = torch.cat(
                [sd[f"{d}attn.to_{x}.{p}"] for x in "qkv"] + [sd[f"{d}proj_mlp.{p}"]]
            )
            out[f"{b}linear2.{p}"] = sd[f"{d}proj_out.{p}"]
            out[f"{b}modulation.lin.{p}"] = sd[f"{d}norm.linear.{p}"]
        out[f"{b}norm.query_norm.scale"] = sd[f"{d}attn.norm_q.weight"]
        out[f"{b}norm.key_norm.scale"] = sd[f"{d}attn.norm_k.weight"]
    assert len(out) == len(sd) - 8 * n_double - 6 * n_single  # q/k/v (and mlp) weights+biases merged
    return out


@pytest.fixture(scope="module")
def flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        in_channels=16,
        axes_dims_rope=(4, 6, 6),
        guidance_embeds=True,
    )
    for p in model.parameters():  # random everywhere, so a swapped or misplaced tensor cannot go unnoticed
        p.data.normal_()
    return model


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_detect_key_format():
    assert (
        detect_key_format(["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"])
        == "flux_bfl"
    )
    assert detect_key_format(["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"]) == "flux_bfl"
    assert (
        detect_key_format(["double_blocks.0.img_attn.qkv.weight", "distilled_guidance_layer.in_proj.weight"])
        == "chroma"
    )
    assert detect_key_format(["double_blocks.0.img_attn_qkv.weight"]) == "hunyuan_video"
    assert detect_key_format(["joint_blocks.0.x_block.attn.qkv.weight"]) == "sd3"
    assert detect_key_format(["blocks.0.self_attn.q.weight", "patch_embedding.weight"]) == "wan"
    assert (
        detect_key_format(["input_blocks.0.0.weight", "output_blocks.0.0.in_layers.0.weight"]) == "ldm_unet"
    )
    assert (
        detect_key_format(["transformer_blocks.0.attn.to_q.weight", "img_in.weight"]) == "diffusers"
    )  # Qwen-Image
    assert detect_key_format(["blocks.0.attn1.to_q.weight"]) == "diffusers"  # Wan, diffusers layout
    assert detect_key_format(["foo.weight"]) == "unknown"


def test_flux_bfl_round_trip_loads_into_model(flux):
    sd = flux.state_dict()
    bfl = flux_diffusers_to_bfl(sd)
    assert detect_key_format(bfl) == "flux_bfl"
    converted = to_diffusers_keys(bfl)
    _assert_same(converted, sd)
    flux.load_state_dict(converted, strict=True)
    # ComfyUI-prefixed names convert the same way
    _assert_same(to_diffusers_keys({f"model.diffusion_model.{k}": v for k, v in bfl.items()}), sd)


def test_flux_bfl_matches_diffusers_converter_at_real_dims(flux):
    """diffusers' converter hard-codes inner_dim=3072: compare on tensors with Flux.1's real row counts."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    g = torch.Generator().manual_seed(0)
    rows = {
        "single_blocks.0.linear1": 3 * 3072 + 12288,
        "single_blocks.0.linear2": 3072,
        "double_blocks.0.img_attn.qkv": 3 * 3072,
        "double_blocks.0.txt_attn.qkv": 3 * 3072,
    }
    bfl = {}
    for name, t in flux_diffusers_to_bfl(flux.state_dict()).items():
        n = rows.get(name.rsplit(".", 1)[0], t.shape[0])
        bfl[name] = torch.randn((n, 2) if t.dim() == 2 else (n,), generator=g)
    expected = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    _assert_same(to_diffusers_keys(bfl), expected)


def test_flux_bfl_on_packed_weights_equals_converting_float(flux, tmp_path):
    """Converting quantized bytes (zero-copy dim-0 slices) == converting the dequantized tensors."""
    bfl = flux_diffusers_to_bfl(flux.state_dict())
    path = tmp_path / "flux-q8.gguf"
    written = write_gguf(path, bfl, "Q8_0", arch="flux")
    assert written["double_blocks.0.img_attn.qkv.weight"] == "Q8_0"
    assert written["single_blocks.0.linear1.weight"] == "Q8_0"
    assert written["final_layer.adaLN_modulation.1.weight"] == "Q8_0"
    f = read_gguf(path)
    packed = {name: GGUFWeight.from_gguf(f, name) for name in f.names()}
    converted = to_diffusers_keys(packed)
    via_float = to_diffusers_keys({k: w.dequantize() for k, w in packed.items()})
    assert sorted(converted) == sorted(flux.state_dict())
    for k, w in converted.items():
        assert isinstance(w, GGUFWeight)
        assert torch.equal(w.dequantize(), via_float[k]), k
    q = converted["transformer_blocks.0.attn.to_k.weight"]
    assert (
        q.qtype == "Q8_0"
        and q.raw.data_ptr() == f.raw("double_blocks.0.img_attn.qkv.weight").data_ptr() + 32 * 34
    )
    flux.load_state_dict({k: w.dequantize() for k, w in converted.items()}, strict=True)


def test_flux_unknown_tensor_is_an_error(flux):
    bfl = flux_diffusers_to_bfl(flux.state_dict())
    bfl["double_blocks.0.img_attn.extra.weight"] = torch.zeros(2)
    with pytest.raises(
        KeyFormatError, match=r"flux_bfl: no diffusers name for 1 tensors: double_blocks\.0\.img_attn\.extra"
    ):
        to_diffusers_keys(bfl)


# ---------------------------------------------------------------------------------------------------------
# SD3 / SD3.5 (converted by diffusers' own converter through the row tracer)


def sd3_diffusers_to_original(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    out = {"pos_embed": sd["pos_embed.pos_embed"]}
    simple = {
        "pos_embed.proj": "x_embedder.proj",
        "context_embedder": "context_embedder",
        "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
        "proj_out": "final_layer.linear",
    }
    for p in ("weight", "bias"):
        for src, dst in simple.items():
            out[f"{dst}.{p}"] = sd[f"{src}.{p}"]
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap(sd[f"norm_out.linear.{p}"])
    for i in range(num_layers):
        d, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = i == num_layers - 1
        for p in ("weight", "bias"):
            out[f"{x}attn.qkv.{p}"] = torch.cat([sd[f"{d}attn.to_{q}.{p}"] for q in "qkv"])
            out[f"{c}attn.qkv.{p}"] = torch.cat([sd[f"{d}attn.add_{q}_proj.{p}"] for q in "qkv"])
            out[f"{x}attn.proj.{p}"] = sd[f"{d}attn.to_out.0.{p}"]
            out[f"{x}adaLN_modulation.1.{p}"] = sd[f"{d}norm1.linear.{p}"]
            ctx = sd[f"{d}norm1_context.linear.{p}"]
            out[f"{c}adaLN_modulation.1.{p}"] = _swap(ctx) if last else ctx
            out[f"{x}mlp.fc1.{p}"] = sd[f"{d}ff.net.0.proj.{p}"]
            out[f"{x}mlp.fc2.{p}"] = sd[f"{d}ff.net.2.{p}"]
            if not last:
                out[f"{c}attn.proj.{p}"] = sd[f"{d}attn.to_add_out.{p}"]
                out[f"{c}mlp.fc1.{p}"] = sd[f"{d}ff_context.net.0.proj.{p}"]
                out[f"{c}mlp.fc2.{p}"] = sd[f"{d}ff_context.net.2.{p}"]
            if f"{d}attn2.to_q.{p}" in sd:
                out[f"{x}attn2.qkv.{p}"] = torch.cat([sd[f"{d}attn2.to_{q}.{p}"] for q in "qkv"])
                out[f"{x}attn2.proj.{p}"] = sd[f"{d}attn2.to_out.0.{p}"]
        for src, dst in [
            ("attn.norm_q", f"{x}attn.ln_q"),
            ("attn.norm_k", f"{x}attn.ln_k"),
            ("attn.norm_added_q", f"{c}attn.ln_q"),
            ("attn.norm_added_k", f"{c}attn.ln_k"),
            ("attn2.norm_q", f"{x}attn2.ln_q"),
            ("attn2.norm_k", f"{x}attn2.ln_k"),
        ]:
            if f"{d}{src}.weight" in sd:
                out[f"{dst}.weight"] = sd[f"{d}{src}.weight"]
    return out


def test_sd3_round_trip_with_quantized_weights(tmp_path):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        qk_norm="rms_norm",
        dual_attention_layers=(0,),
        pos_embed_max_size=8,
    )
    for p in model.parameters():
        p.data.normal_()
    sd = model.state_dict()
    original = sd3_diffusers_to_original(sd, 2)
    assert detect_key_format(original) == "sd3"
    _assert_same(to_diffusers_keys(original), sd)
    model.load_state_dict(to_diffusers_keys(original), strict=True)

    write_gguf(tmp_path / "sd3.gguf", original, "Q8_0", arch="sd3")
    f = read_gguf(tmp_path / "sd3.gguf")
    packed = {n: GGUFWeight.from_gguf(f, n) for n in f.names()}
    assert packed["joint_blocks.0.x_block.attn.qkv.weight"].qtype == "Q8_0"
    converted = to_diffusers_keys(packed)
    via_float = to_diffusers_keys({k: w.dequantize() for k, w in packed.items()})
    assert sorted(converted) == sorted(sd)
    for k, w in converted.items():
        assert torch.equal(w.dequantize(), via_float[k]), k


# ---------------------------------------------------------------------------------------------------------
# Wan (renames only)

_WAN_INV = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.to_([qkv])\.", r".\1."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),  # diffusers norm2 is the original norm3
]


def test_wan_round_trip():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    sd = model.state_dict()
    original = {}
    for k, v in sd.items():
        for pattern, repl in _WAN_INV:
            k = re.sub(pattern, repl, k)
        original[k] = v
    assert "blocks.1.self_attn.q.weight" in original and "blocks.0.norm3.weight" in original
    assert detect_key_format(original) == "wan"
    converted = to_diffusers_keys({f"model.diffusion_model.{k}": v for k, v in original.items()})
    _assert_same(converted, sd)
    assert converted["patch_embedding.weight"] is sd["patch_embedding.weight"]  # renamed, not copied
    with pytest.raises(KeyFormatError, match="Wan-Animate .* not supported yet"):
        to_diffusers_keys({**original, "motion_encoder.enc.fc.weight": torch.zeros(2, 2)})


# ---------------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    "names,fmt",
    [(["input_blocks.0.0.weight", "output_blocks.0.0.in_layers.0.weight"], "ldm_unet")],
)
def test_unsupported_formats_are_named(names, fmt):
    with pytest.raises(KeyFormatError, match=f"GGUF key format '{fmt}' is not supported yet"):
        to_diffusers_keys({n: torch.zeros(2, 2) for n in names})


def test_unrecognised_names():
    with pytest.raises(KeyFormatError, match="could not recognise the tensor naming .*foo.weight"):
        to_diffusers_keys({"foo.weight": torch.zeros(1)})


def test_unknown_format_name():
    with pytest.raises(KeyFormatError, match="unknown GGUF key format 'nope'"):
        to_diffusers_keys({"a": torch.zeros(1)}, fmt="nope")


def test_traced_converter_refuses_non_dim0_ops():
    """A converter that indexes another dim cannot run on packed bytes: clear error, not garbage."""
    from diffusers_quant.backends.gguf import keys

    def converter(ckpt):
        return {"x": ckpt["a"][:, :, 0, 0]}

    with pytest.raises(KeyFormatError, match=r"needs a tensor operation .*indexing"):
        keys._run_traced(converter, {"a": torch.zeros(4, 4, 1, 1)}, "test")
