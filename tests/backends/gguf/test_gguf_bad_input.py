"""Issue 14, the GGUF findings: missing tensors, an untrusted embedded config and ggml types the dequantizer
lacked are refused (or loaded right) at the start of the load, with the file named; never a silent default,
a runaway build or a failure at the first forward."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import torch
from tiny_gguf import decode_q1_0, decode_q8_k, forward, tiny_flux, write_with_gguf_py

import diffusers_quant
from diffusers_quant.backends.gguf.loader import load_gguf_model
from diffusers_quant.backends.gguf.writer import write_gguf
from diffusers_quant.errors import QuantError

BIAS = "transformer_blocks.0.ff.net.2.bias"


@pytest.fixture(scope="module")
def tiny():
    model, config = tiny_flux()
    return model, config, forward(model)


def _load(path, **kwargs):
    from diffusers import FluxTransformer2DModel

    return load_gguf_model(FluxTransformer2DModel, str(path), dtype=None, device="cpu", **kwargs).model


def _from_single_file(path, **kwargs):
    from diffusers import FluxTransformer2DModel

    diffusers_quant.install()
    try:
        return FluxTransformer2DModel.from_single_file(str(path), **kwargs)
    finally:
        diffusers_quant.uninstall()


# -- finding 1: a tensor the model needs and the file lacks -------------------------------------------------


@pytest.mark.parametrize(
    "dropped",
    [
        BIAS,
        "transformer_blocks.0.ff.net.2.weight",
        "norm_out.linear.bias",
        "single_transformer_blocks.0.norm.linear.weight",
    ],
)
def test_a_missing_tensor_is_refused_naming_the_file_and_the_tensor(tmp_path, tiny, dropped):
    """The bias of a quantized Linear used to be taken as "no bias": the layer ran without it."""
    model, config, _ = tiny
    state = {k: v for k, v in model.state_dict().items() if k != dropped}
    path = tmp_path / "incomplete.gguf"
    write_gguf(path, state, "Q8_0", arch="flux", config=config)
    pattern = rf"{re.escape(str(path))}: the file has no tensor for 1 parameter\(s\) of FluxTransformer2DModel: '{re.escape(dropped)}'; missing tensors are never filled with defaults; fix: "
    with pytest.raises(QuantError, match=pattern):
        _from_single_file(path)
    with pytest.raises(QuantError, match=pattern):
        _load(path)


def test_a_missing_bias_is_refused_on_the_plan_and_config_paths(tmp_path, flux_path):
    """The plan's gguf:/path spec (the pipeline folder gives the config) and config= take the same check."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from diffusers_quant.backends.gguf import portable_config

    model = FluxTransformer2DModel.from_pretrained(flux_path / "transformer")
    state = {k: v for k, v in model.state_dict().items() if k != BIAS}
    path = tmp_path / "no-bias.gguf"
    write_gguf(path, state, "Q8_0", arch="flux", config=portable_config(model.config))
    pattern = rf"{re.escape(str(path))}: the file has no tensor for 1 parameter\(s\) .*'{re.escape(BIAS)}'"
    diffusers_quant.install()
    with pytest.raises(QuantError, match=pattern):
        FluxPipeline.from_pretrained(flux_path, quant=f"transformer=gguf:{path}")
    with pytest.raises(QuantError, match=pattern):
        FluxTransformer2DModel.from_single_file(str(path), config=str(flux_path), subfolder="transformer")
    with pytest.raises(QuantError, match="not a whole pipeline"):  # a pipeline's from_single_file: refused
        FluxPipeline.from_single_file(str(path), quant="transformer=bnb:nf4")


def test_a_complete_file_still_loads_with_the_bias(tmp_path, tiny):
    model, config, reference = tiny
    path = tmp_path / "full.gguf"
    write_gguf(path, model.state_dict(), "Q8_0", arch="flux", config=config)
    loaded = _from_single_file(path)
    layer = loaded.transformer_blocks[0].ff.net[2]
    assert type(layer).__name__ == "GGUFLinear"
    assert torch.equal(layer.bias, model.transformer_blocks[0].ff.net[2].bias)
    assert (forward(loaded) - reference).abs().max() < 0.05 * reference.abs().max()


# -- finding 2: the embedded config is data ----------------------------------------------------------------


def _config_cases(config: dict):
    yield "{", r"is not valid JSON \(JSONDecodeError"
    yield "null", r"is a JSON null, not an object"
    yield "[1, 2]", r"is a JSON array, not an object"
    yield json.dumps("/etc/passwd"), r"is a JSON string, not an object"
    yield "[" * 100_000, r"is not valid JSON \(RecursionError"
    yield (
        json.dumps({**config, "attention_head_dim": 0}),
        r"has attention_head_dim = 0: must be an integer from 1",
    )
    yield json.dumps({**config, "num_layers": 1.5}), r"has num_layers = 1.5: must be an integer"
    yield json.dumps({**config, "num_layers": True}), r"has num_layers = true: must be an integer"
    yield json.dumps({**config, "num_layers": "19"}), r"has num_layers = \"19\": must be an integer"
    yield json.dumps({**config, "num_layers": None}), r"has num_layers = null: must be an integer"
    yield json.dumps({**config, "num_layers": -3}), r"has num_layers = -3: must be an integer from 1"
    yield (
        json.dumps({**config, "num_layers": 10**40}),
        r"has num_layers = 1000+: must be an integer from 1 to",
    )
    yield json.dumps({**config, "num_attention_heads": 10**9}), r"has num_attention_heads = 1000000000"
    yield (
        json.dumps({**config, "axes_dims_rope": [8, 12]}),
        r"has axes_dims_rope = \[8, 12\]: must be a list of 3",
    )
    yield json.dumps({**config, "axes_dims_rope": 32}), r"has axes_dims_rope = 32: must be a list"
    yield json.dumps({**config, "guidance_embeds": 1}), r"has guidance_embeds = 1: must be true or false"
    yield json.dumps({**config, "from_pretrained": "x", "zz": 1}), r"does not take: 'from_pretrained', 'zz'"
    yield json.dumps({**config, "_class_name": 5}), r"has _class_name = 5: must be a short string"
    yield '{"num_layers": NaN}', r"has num_layers = NaN: must be an integer"


def test_a_damaged_embedded_config_is_refused_with_the_key_and_the_fix(tmp_path, tiny):
    model, config, reference = tiny
    cases = list(_config_cases(config))
    folder = tmp_path / "config"
    model.save_config(folder)
    for i, (text, pattern) in enumerate(cases):
        path = tmp_path / f"bad-{i}.gguf"
        write_with_gguf_py(path, model.state_dict(), text)
        with pytest.raises(QuantError) as info:
            _from_single_file(path)
        message = str(info.value)
        assert message.startswith(f"{path}: the model config embedded in the file"), message
        assert re.search(pattern, message), (pattern, message)
        assert message.endswith(
            "fix: pass config=<folder with the model's config.json> (and subfolder=...) to from_single_file"
        )
        # and the fix works: the folder's config replaces the damaged one
        assert torch.equal(forward(_from_single_file(path, config=str(folder))), reference)


@pytest.mark.parametrize(
    "change",
    [{"num_layers": 1_000_000}, {"num_single_layers": 5_000_000}, {"joint_attention_dim": 10_000_000}],
)
def test_a_config_far_bigger_than_the_file_is_refused_before_it_is_built(tmp_path, tiny, change):
    """A million layers used to grow memory without bound; the probe build on the meta device stops at the
    first few more parameters than the file could fill."""
    model, config, _ = tiny
    path = tmp_path / "big.gguf"
    write_with_gguf_py(path, model.state_dict(), {**config, **change})
    start = time.perf_counter()
    with pytest.raises(QuantError) as info:
        _from_single_file(path)
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert message.startswith(
        f"{path}: the config embedded in the file (diffusers_quant.config) describes a "
    )
    assert re.search(
        r"FluxTransformer2DModel with more than \d+ (parameters|parameter values), far more than the file's 62 tensors",
        message,
    )
    assert "fix: pass config=" in message


def test_a_config_its_model_rejects_is_the_projects_error(tmp_path, tiny):
    """What the model's own __init__ raises for a well-typed but inconsistent config (here diffusers' UNet:
    ValueError) leaves as our error naming the file."""
    from diffusers import UNet2DConditionModel

    model, _, _ = tiny
    path = tmp_path / "unet.gguf"
    config = {
        "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D"],
        "block_out_channels": [32, 32],
    }
    write_with_gguf_py(path, model.state_dict(), config)
    diffusers_quant.install()
    with pytest.raises(QuantError) as info:
        UNet2DConditionModel.from_single_file(str(path))
    message = str(info.value)
    assert message.startswith(
        f"{path}: the config embedded in the file (diffusers_quant.config) does not build "
    )
    assert "UNet2DConditionModel (ValueError: " in message and "fix: pass config=" in message
    # a plain shape mismatch (3 heads of 32 for a file made with 2) is refused as one
    write_with_gguf_py(path, model.state_dict(), {**tiny[1], "num_attention_heads": 3})
    with pytest.raises(
        QuantError, match=rf"{re.escape(str(path))}: tensor .* in the file but FluxTransformer2DModel expects"
    ):
        _from_single_file(path)


def test_a_valid_embedded_config_loads_the_same_model(tmp_path, tiny):
    model, config, reference = tiny
    path = tmp_path / "ok.gguf"
    write_with_gguf_py(path, model.state_dict(), {**config, "_name_or_path": "/somewhere/else"})
    loaded = _from_single_file(path)
    assert loaded.config.get("_name_or_path") != "/somewhere/else"  # someone else's path is never used
    assert torch.equal(forward(loaded), reference)


# -- finding 3: valid ggml types the dequantizer lacked ------------------------------------------------------


def test_f64_and_integer_tensors_load_as_plain_tensors(tmp_path, tiny):
    """gguf-py writes float64 arrays as F64: a Linear weight in F64 used to become a GGUF layer that failed at
    its first forward; integer tensors (here norm weights of ones) failed at load."""
    model, config, reference = tiny
    types = {
        "transformer_blocks.0.ff.net.2.weight": "F64",
        "transformer_blocks.0.ff.net.2.bias": "F64",
        "transformer_blocks.0.attn.norm_q.weight": "I8",
        "transformer_blocks.0.attn.norm_k.weight": "I16",
        "single_transformer_blocks.0.attn.norm_q.weight": "I32",
    }
    path = tmp_path / "plain.gguf"
    write_with_gguf_py(path, model.state_dict(), config, types)
    from diffusers_quant.backends.gguf.reader import read_gguf

    assert {read_gguf(path).info(n).type_name for n in types} == {"F64", "I8", "I16", "I32"}
    loaded = _from_single_file(path)
    layer = loaded.transformer_blocks[0].ff.net[2]
    assert type(layer) is torch.nn.Linear and layer.weight.dtype == torch.float32
    assert loaded.transformer_blocks[0].attn.norm_q.weight.dtype == torch.float32
    assert torch.equal(forward(loaded), reference)
    bf16 = _from_single_file(path, dtype=torch.bfloat16)
    assert bf16.transformer_blocks[0].ff.net[2].weight.dtype == torch.bfloat16
    assert bf16.transformer_blocks[0].attn.norm_k.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("qtype,decode", [("Q8_K", decode_q8_k), ("Q1_0", decode_q1_0)])
def test_q8_k_and_q1_0_linear_weights_load_packed_and_run(tmp_path, tiny, qtype, decode):
    model, config, _ = tiny
    name = "transformer_blocks.0.ff.net.2.weight"  # (64, 256): whole blocks of 256 and of 128
    path = tmp_path / f"{qtype}.gguf"
    write_with_gguf_py(path, model.state_dict(), config, {name: qtype})
    loaded = _from_single_file(path)
    layer = loaded.transformer_blocks[0].ff.net[2]
    assert type(layer).__name__ == "GGUFLinear" and layer.qtype == qtype and layer.weight.dtype == torch.uint8
    expected = torch.from_numpy(decode(model.state_dict()[name].numpy()))
    assert torch.equal(layer.dequantize_weight(torch.float32), expected)
    reference = tiny_flux()[0]
    reference.transformer_blocks[0].ff.net[2].weight.data = expected
    torch.testing.assert_close(forward(loaded), forward(reference), rtol=1e-5, atol=1e-5)


def test_a_type_with_no_decoder_is_refused_before_any_tensor_is_read(tmp_path, monkeypatch):
    """Q8_1 (no config in the file either: the type is found first, from the header alone)."""
    import gguf
    from diffusers import FluxTransformer2DModel

    from diffusers_quant.backends.gguf import nn

    path = tmp_path / "q8_1.gguf"
    writer = gguf.GGUFWriter(str(path), "flux")
    writer.add_tensor(
        "x_embedder.weight", np.zeros((4, 40), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_1
    )
    writer.add_tensor("x_embedder.bias", np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    monkeypatch.setattr(nn.GGUFWeight, "from_gguf", lambda *a: pytest.fail("a tensor was read"))
    with pytest.raises(QuantError) as info:
        load_gguf_model(FluxTransformer2DModel, str(path), dtype=None, device="cpu")
    message = str(info.value)
    assert message.startswith(
        f"{path}: 1 tensor(s) of ggml type(s) this loader cannot decode: 'x_embedder.weight' (Q8_1)"
    )
    assert "activation format" in message and "fix: re-quantize" in message


def test_an_unreadable_config_folder_is_the_projects_error(tmp_path, tiny):
    model, config, _ = tiny
    path = tmp_path / "ok.gguf"
    write_gguf(path, model.state_dict(), "Q8_0", arch="flux", config=config)
    missing = tmp_path / "no-such-folder"
    with pytest.raises(
        QuantError,
        match=rf"{re.escape(str(missing))}: cannot read the config of FluxTransformer2DModel for .*ok.gguf .*; fix: pass config=",
    ):
        _load(path, config=str(missing))
