"""A saved quantized folder whose config.json is damaged: truncated, deep, not UTF-8, wrong types in the
layer map. Loading it with the hooks installed raises only the project's error, naming the folder."""

from __future__ import annotations

import json
import random
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
