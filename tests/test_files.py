"""files.replacing: the temp-name-then-rename step both single-file writers (GGUF, scaled fp8) use."""

from __future__ import annotations

import os

import pytest

from diffusers_quant.files import normal_mode, replacing


def test_a_finished_write_replaces_the_file_with_the_usual_mode(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with replacing(str(target)) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and tmp != str(target)
        with open(tmp, "wb") as f:
            f.write(b"new")
        assert target.read_bytes() == b"old"  # nothing replaced before the block ends
    assert target.read_bytes() == b"new"
    assert os.stat(target).st_mode & 0o777 == normal_mode()
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), replacing(str(target)) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt  # killed half way
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
