"""A folder save that fails half way leaves nothing at the target and no temporary folder behind; the
previous good save, elsewhere, is untouched (GGUF files: tests/backends/gguf/test_writer.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from helpers import wide_flux_transformer

import diffusers_quant


def _digest(folder) -> dict:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


def test_a_save_killed_half_way_leaves_no_folder_and_keeps_the_previous_one(tmp_path, monkeypatch):
    model = wide_flux_transformer(1).to(torch.bfloat16)
    diffusers_quant.quantize(model, "nncf:int8", kind="transformer")
    good = diffusers_quant.save_quantized(model, tmp_path / "v1")
    before = _digest(good)
    original = type(model).save_pretrained

    def dies_mid_write(self, folder, **kwargs):
        original(self, folder, **kwargs)  # every file written ...
        weights = next(p for p in sorted(Path(folder).iterdir()) if p.suffix == ".safetensors")
        weights.write_bytes(weights.read_bytes()[:100])  # ... then the process dies half way through one
        raise KeyboardInterrupt

    monkeypatch.setattr(type(model), "save_pretrained", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        diffusers_quant.save_quantized(model, tmp_path / "v2")
    assert not (tmp_path / "v2").exists(), "a failed save must leave nothing at its target"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"], "no temporary folder may be left behind"
    assert _digest(good) == before
