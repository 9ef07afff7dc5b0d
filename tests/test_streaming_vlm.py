"""On-load for the vision-language text encoders (issue 16): Qwen-Image's Qwen2.5-VL and Flux.2's Mistral3.

transformers 5 saves these in their old key layout (``model.layers.*``, ``language_model.model.*``) and renames
the keys on load; the stream applies transformers' own renaming, so on-load gives post-load's quantized
tensors bit for bit.  A checkpoint whose tensors transformers merges or splits on load is refused by on-load
naming that conversion, and auto falls back to post-load and says why in the log.
"""

from __future__ import annotations

import logging

import pytest
import torch

import diffusers_quant
from diffusers_quant.errors import QuantError

SPECS = ("quanto:qint8", "bnb:nf4")


def _qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            max_position_embeddings=256,
            rope_theta=1e6,
            rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            out_hidden_size=128,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            fullatt_block_indexes=[1],
            window_size=112,
        ),
        vocab_size=512,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _mistral3():
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config=dict(
            model_type="mistral",
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            vocab_size=512,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            model_type="pixtral",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            head_dim=16,
            image_size=64,
            patch_size=16,
        ),
        spatial_merge_size=2,
        tie_word_embeddings=False,  # as Flux.2's Mistral Small 3.1 encoder
    )
    return Mistral3ForConditionalGeneration(config)


# class name -> (builder, a key as saved on disk, the model's name for it)
MODELS = {
    "Qwen2_5_VLForConditionalGeneration": (
        _qwen2_5_vl,
        "model.layers.0.self_attn.q_proj.weight",
        "model.language_model.layers.0.self_attn.q_proj.weight",
    ),
    "Mistral3ForConditionalGeneration": (
        _mistral3,
        "language_model.model.layers.0.self_attn.q_proj.weight",
        "model.language_model.layers.0.self_attn.q_proj.weight",
    ),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def saved_encoder(request, tmp_path_factory):
    """(class, folder) of a tiny encoder saved by its own ``save_pretrained`` in bf16, as real pipelines ship."""
    import transformers

    builder, saved_key, model_key = MODELS[request.param]
    torch.manual_seed(0)
    model = builder().to(torch.bfloat16).eval()
    folder = tmp_path_factory.mktemp(request.param) / "text_encoder"
    model.save_pretrained(folder)
    return getattr(transformers, request.param), folder, saved_key, model_key


def _saved_keys(folder):
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return set(f.keys())


def _load(cls, folder, spec, mode):
    return cls.from_pretrained(folder, dtype=torch.bfloat16, quant=f"text_encoder={spec};mode={mode}")


@pytest.mark.parametrize("spec", SPECS)
def test_on_load_renames_the_saved_keys_as_transformers_does_and_equals_post_load(saved_encoder, spec):
    from diffusers_quant.backends import get_backend
    from diffusers_quant.spec import Spec

    cls, folder, saved_key, model_key = saved_encoder
    keys = _saved_keys(folder)
    # The checkpoint is in the saved layout, not the model's: without the renaming nothing would match.
    assert saved_key in keys and model_key not in keys
    diffusers_quant.install()
    on = _load(cls, folder, spec, "on-load")
    post = _load(cls, folder, spec, "post-load")
    assert on.quant_report["text_encoder"].mode == "on-load"
    assert post.quant_report["text_encoder"].mode == "post-load"
    layer = model_key.removesuffix(".weight")
    backend = get_backend(Spec.parse(spec).backend)
    assert backend.owns(on.get_submodule(layer)), type(on.get_submodule(layer))
    on_row, post_row = on.quant_report["text_encoder"], post.quant_report["text_encoder"]
    assert (on_row.layers_quantized, on_row.linears_total) == (
        post_row.layers_quantized,
        post_row.linears_total,
    )
    assert on_row.layers_quantized > 0
    on_state, post_state = on.state_dict(), post.state_dict()
    assert on_state.keys() == post_state.keys()
    for key, value in on_state.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == post_state[key].dtype, key
            assert torch.equal(value, post_state[key]), key
    ids = torch.randint(3, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on_out = on(input_ids=ids, output_hidden_states=True)
        post_out = post(input_ids=ids, output_hidden_states=True)
    assert torch.equal(on_out.logits, post_out.logits)
    # What Qwen-Image and Flux.2 read: the language model's hidden states.
    assert torch.equal(on_out.hidden_states[-1], post_out.hidden_states[-1])


def test_the_stream_plan_uses_transformers_own_mapping(saved_encoder):
    from diffusers_quant.spec import Spec
    from diffusers_quant.streaming import plan_stream

    cls, folder, saved_key, model_key = saved_encoder
    plan = plan_stream(cls, folder, Spec.parse("quanto:qint8"), "text_encoder")
    assert plan.model_key(saved_key) == model_key
    assert {plan.model_key(k) for k in plan.keys} >= set(plan.model.state_dict()) - set(plan.tied)


def test_a_key_transformers_cannot_map_is_refused_naming_the_parameter(saved_encoder, tmp_path):
    from safetensors.torch import load_file, save_file

    cls, folder, saved_key, model_key = saved_encoder
    broken = tmp_path / "text_encoder"
    broken.mkdir()
    for f in folder.iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(folder / "model.safetensors")
    tensors["renamed_by_hand." + saved_key] = tensors.pop(saved_key)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    diffusers_quant.install()
    with pytest.raises(QuantError) as info:
        _load(cls, broken, "quanto:qint8", "on-load")
    message = str(info.value)
    assert (
        f"has no tensor for 1 of {cls.__name__}'s parameters even after transformers' key conversion"
        in message
    )
    assert model_key in message and "fix: use mode=post-load or mode=auto" in message


@pytest.fixture(scope="module")
def saved_moe(tmp_path_factory):
    """A tiny Mixtral: transformers 5 merges its saved per-expert tensors into one fused tensor on load."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        num_local_experts=2,
        num_experts_per_tok=1,
        max_position_embeddings=128,
    )
    folder = tmp_path_factory.mktemp("moe") / "text_encoder"
    MixtralForCausalLM(config).save_pretrained(folder)
    return MixtralForCausalLM, folder


def test_merged_tensors_are_refused_on_load_naming_the_conversion_and_auto_falls_back(saved_moe, caplog):
    cls, folder = saved_moe
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in _saved_keys(folder)
    diffusers_quant.install()
    with pytest.raises(QuantError) as info:
        _load(cls, folder, "quanto:qint8", "on-load")
    message = str(info.value)
    assert message.startswith("text_encoder: mode=on-load cannot stream this checkpoint tensor by tensor")
    assert (
        "transformers converts MixtralForCausalLM's saved tensors on load (MergeModulelist+Concatenate"
        in (message)
    )
    assert "'model.layers.0.mlp.experts.gate_up_proj'" in message
    assert message.endswith("fix: use mode=post-load or mode=auto")
    with caplog.at_level(logging.INFO, logger="diffusers_quant"):
        auto = _load(cls, folder, "quanto:qint8", "auto")
    assert auto.quant_report["text_encoder"].mode == "post-load"
    assert auto.quant_report["text_encoder"].layers_quantized > 0
    notes = [r.getMessage() for r in caplog.records if r.name == "diffusers_quant"]
    assert any(
        n.startswith("text_encoder: quantized after load, not on load: on-load cannot stream") for n in notes
    ), notes
