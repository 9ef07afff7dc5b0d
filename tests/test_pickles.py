"""Pickle checkpoints are read as data only: a planted payload never runs, through any patched loader, and
the refusal is this package's error naming the file and the fix."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import diffusers_quant
from diffusers_quant.errors import QuantError
from diffusers_quant.pickles import check_pickle


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path, marker, legacy: bool = False):
    torch.save(
        {"weight": torch.zeros(4, 4), "extra": _Payload(marker)},
        path,
        _use_new_zipfile_serialization=not legacy,
    )


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_planted_payload_is_refused_and_never_runs(tmp_path, legacy):
    marker = tmp_path / "ran"
    path = tmp_path / "model.ckpt"
    _plant(path, marker, legacy)
    with pytest.raises(
        QuantError, match=r"model\.ckpt: this pickle checkpoint holds more than tensors.*fix: convert"
    ):
        check_pickle(path)
    assert not marker.exists()


def test_a_plain_tensor_checkpoint_passes(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weight": torch.ones(3)}, path)
    check_pickle(path)


def test_a_truncated_checkpoint_is_our_error(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"weight": torch.ones(64)}, path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(QuantError, match=r"model\.pth: not a readable torch checkpoint"):
        check_pickle(path)


def test_single_file_loaders_refuse_the_payload_before_the_library_reads_it(tmp_path):
    from diffusers import FluxTransformer2DModel, StableDiffusionPipeline

    marker = tmp_path / "ran"
    path = tmp_path / "flux1-dev.ckpt"
    _plant(path, marker)
    diffusers_quant.install()
    for load in (FluxTransformer2DModel.from_single_file, StableDiffusionPipeline.from_single_file):
        with pytest.raises(QuantError, match="holds more than tensors"):
            load(str(path))
    assert not marker.exists()


def test_a_model_folder_with_a_pickle_payload_is_refused(flux_path, tmp_path):
    from diffusers import FluxTransformer2DModel

    marker = tmp_path / "ran"
    folder = tmp_path / "transformer"
    folder.mkdir()
    shutil.copy(flux_path / "transformer" / "config.json", folder / "config.json")
    _plant(folder / "diffusion_pytorch_model.bin", marker)
    before = (folder / "diffusion_pytorch_model.bin").read_bytes()
    diffusers_quant.install()
    with pytest.raises(QuantError, match=r"diffusion_pytorch_model\.bin: this pickle checkpoint"):
        FluxTransformer2DModel.from_pretrained(folder)
    assert not marker.exists()
    assert (folder / "diffusion_pytorch_model.bin").read_bytes() == before
