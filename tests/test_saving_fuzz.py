"""A saved quantized folder whose config.json is damaged: truncated, deep, not UTF-8, wrong types in the
layer map. Loading it with the hooks installed raises only the project's error, naming the folder."""

from __future__ import annotations

import json
import random
import re
import shutil

import pytest

import diffusers_quant
from diffusers_quant.errors import QuantError


@pytest.fixture(scope="module")
def saved(tmp_path_factory, flux_path):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(flux_path, subfolder="transformer")
    diffusers_quant.quantize(model, "nncf:int8_sym", kind="transformer")  # saved in this package's format
    folder = tmp_path_factory.mktemp("saved") / "transformer"
    diffusers_quant.save_quantized(model, folder)
    return folder


def _load_with(saved, tmp_path, config_text: bytes | str):
    from diffusers import FluxTransformer2DModel

    folder = tmp_path / "damaged"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(saved, folder)
    data = config_text.encode() if isinstance(config_text, str) else config_text
    (folder / "config.json").write_bytes(data)
    diffusers_quant.install()
    try:
        return FluxTransformer2DModel.from_pretrained(folder)
    finally:
        diffusers_quant.uninstall()


def _layer_map_variants(config: dict):
    name = next(iter(config["quantization_config"]["layers"]))
    entry = config["quantization_config"]["layers"][name]
    yield "layers a list", {"layers": []}
    yield "layers a string", {"layers": "x"}
    yield "entry a number", {"layers": {name: 5}}
    yield "unknown backend", {"layers": {name: {**entry, "backend": "nope"}}}
    yield "config a string", {"layers": {name: {**entry, "config": "bad"}}}
    yield "layer not in the model", {"layers": {"no.such.layer": entry}}


@pytest.mark.parametrize("case", range(6))
def test_wrong_types_in_the_layer_map_are_refused(saved, tmp_path, case):
    config = json.loads((saved / "config.json").read_text())
    label, change = list(_layer_map_variants(config))[case]
    config["quantization_config"].update(change)
    with pytest.raises(QuantError) as info:
        _load_with(saved, tmp_path, json.dumps(config))
    assert "damaged" in str(info.value) or "config" in str(info.value), label


def test_truncated_deep_and_undecodable_configs_are_refused(saved, tmp_path):
    text = (saved / "config.json").read_text()
    rng = random.Random(0)
    cuts = sorted(rng.sample(range(1, len(text) - 1), 12))
    bad = [text[:cut] for cut in cuts] + ['{"a": ' * 100_000, b"\xff\xfe{}", "[1, 2]"]
    for data in bad:
        try:
            _load_with(saved, tmp_path, data)
        except QuantError as e:
            assert "damaged" in str(e) or "config.json" in str(e)
        except Exception as e:  # only the project's error may leave it
            pytest.fail(f"{type(e).__name__} for {str(data)[:40]!r}: {e}")


def _copy(saved, tmp_path):
    folder = tmp_path / "transformer"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(saved, folder)
    return folder


def _files(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _refused(folder, message: str, capsys=None) -> str:
    """Loading ``folder`` with the hooks (and inspecting it) is our error matching ``message``; the folder's
    files are unchanged."""
    from diffusers import FluxTransformer2DModel

    from diffusers_quant.cli import main

    before = _files(folder)
    with diffusers_quant.quantized("transformer=quanto:qint8"):
        with pytest.raises(QuantError, match=message) as info:
            FluxTransformer2DModel.from_pretrained(folder)
    if capsys is not None:
        capsys.readouterr()
        assert main(["inspect", str(folder)]) == 2  # our error, no traceback
        err = capsys.readouterr().err
        assert "Traceback" not in err and str(folder) in err
    assert _files(folder) == before
    return str(info.value)


@pytest.mark.parametrize(
    "qconfig, message",
    [
        ([1, 2], r"config.json: damaged quantization_config \(a JSON list, not an object\); fix: "),
        ("nf4", r"config.json: damaged quantization_config \(a JSON str, not an object\)"),
        (5, r"config.json: damaged quantization_config \(a JSON int, not an object\)"),
        (
            {"quant_method": [1]},
            r"config.json: damaged quantization_config \(quant_method is '\[1\]', not a name",
        ),
        ({"weights_dtype": "int8"}, r"config.json: its quantization_config names no quant_method .*fix: "),
    ],
)
def test_a_quantization_config_that_is_not_a_map_is_refused_by_detection_load_and_inspect(
    saved, tmp_path, capsys, qconfig, message
):
    """Issue 14, finding 5: these gave AttributeError / TypeError from the load, and inspect called the
    folder a plain one."""
    folder = _copy(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": qconfig}))
    _refused(folder, message, capsys)


def _rewrite(folder, change):
    """The folder's weights written again with ``change(tensors)`` applied (the header follows)."""
    from safetensors.torch import load_file, save_file

    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def _a_layer(folder) -> str:
    config = json.loads((folder / "config.json").read_text())
    return sorted(config["quantization_config"]["layers"])[0]


def test_tensor_shapes_that_disagree_with_the_map_are_named_before_any_tensor_is_read(saved, tmp_path):
    """Issue 14, finding 5: a layer's tensors of another shape than its map entry says (or a plain tensor of
    another shape than the model's) met torch's "Error(s) in loading state_dict" after reading."""
    folder = _copy(saved, tmp_path)
    layer = _a_layer(folder)
    path = _rewrite(folder, lambda t: t.update({f"{layer}.weight": t[f"{layer}.weight"][:-1]}))
    message = _refused(
        folder, rf"layer '{re.escape(layer)}' does not match its nncf entry in the layer map of .*config.json"
    )
    assert message.startswith(str(path)) and "weight has shape" in message and "fix: save it again" in message

    folder = _copy(saved, tmp_path)
    plain = "x_embedder.bias"
    config = json.loads((folder / "config.json").read_text())
    assert plain.rpartition(".")[0] not in config["quantization_config"]["layers"]
    _rewrite(folder, lambda t: t.update({plain: t[plain][:3]}))
    _refused(folder, r"tensor 'x_embedder.bias' is F32 \[3\], FluxTransformer2DModel holds float32 \[\d+\]")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"in_features": 7}, r"its tensors do not fit a Linear of|does not match its nncf entry"),
        ({"qtype": "int3"}, r"is not a nncf layer \(ValueError: Unknown NNCF qtype 'int3'"),
        ({"extra": 1}, r"is not a nncf layer \(TypeError"),
        ({"group_size": "x"}, r"is not a nncf layer"),
    ],
)
def test_a_layer_config_that_no_backend_layer_has_is_refused(saved, tmp_path, change, message):
    folder = _copy(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    layer = _a_layer(folder)
    config["quantization_config"]["layers"][layer]["config"].update(change)
    (folder / "config.json").write_text(json.dumps(config))
    assert "fix: " in _refused(folder, message)


def test_a_map_layer_that_is_no_linear_of_the_model_is_refused(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    layers = config["quantization_config"]["layers"]
    layer = _a_layer(folder)
    renamed = "transformer_blocks.0.norm1"  # a module of the model, but no Linear
    layers[renamed] = layers.pop(layer)
    (folder / "config.json").write_text(json.dumps(config))

    def rename(t):
        for key in [k for k in t if k.startswith(layer + ".")]:
            t[renamed + key[len(layer) :]] = t.pop(key)

    _rewrite(folder, rename)
    _refused(
        folder, r"config.json: layer 'transformer_blocks.0.norm1' has no place in FluxTransformer2DModel"
    )
