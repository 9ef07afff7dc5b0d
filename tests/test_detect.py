"""The safetensors header reader and the format detection, on good files and on damaged ones (seeded fuzz):
only the project's error comes out, naming the file; no crash, no hang."""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch
from safetensors.torch import save_file

from diffusers_quant.detect import MAX_HEADER_BYTES, detect_file, read_safetensors_header
from diffusers_quant.errors import QuantError


def _scaled_fp8_file(path) -> bytes:
    save_file(
        {
            "blocks.0.qkv.weight": torch.ones(4, 4, dtype=torch.float8_e4m3fn),
            "blocks.0.qkv.scale_weight": torch.tensor(0.5),
            "blocks.0.norm.scale": torch.ones(4, dtype=torch.bfloat16),
            "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn),
            "blocks.1.comfy_quant": torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8),
        },
        str(path),
        metadata={
            "_quantization_metadata": json.dumps({"layers": {"blocks.1": {"format": "float8_e4m3fn"}}})
        },
    )
    return path.read_bytes()


def _header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def test_the_reader_agrees_with_safetensors(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "a.safetensors"
    _scaled_fp8_file(path)
    header = read_safetensors_header(path)
    with safe_open(str(path), framework="pt") as f:
        assert set(header.tensors) == set(f.keys())
        assert header.metadata == f.metadata()
        for name in f.keys():
            assert list(header.tensors[name].shape) == list(f.get_slice(name).get_shape())
    assert detect_file(path).format == "comfy-quant"  # the newer markers win over the legacy one


def _outcome(path):
    try:
        return detect_file(path)
    except QuantError as e:
        assert str(path) in str(e), f"the error must name the file: {e}"
        return e


def test_every_truncation_is_refused_or_read(tmp_path):
    path = tmp_path / "cut.safetensors"
    data = _scaled_fp8_file(tmp_path / "whole.safetensors")
    end = 8 + _header_length(data)
    for cut in list(range(0, end + 1)) + list(range(end, len(data), 7)):
        path.write_bytes(data[:cut])
        result = _outcome(path)
        if cut < 9:
            assert result is None, cut  # too short to be a safetensors file at all
        else:  # header cut short, or tensor bytes missing
            assert isinstance(result, QuantError), cut
    path.write_bytes(data)
    assert _outcome(path).format == "comfy-quant"


def test_seeded_byte_flips_never_crash(tmp_path):
    data = bytearray(_scaled_fp8_file(tmp_path / "whole.safetensors"))
    end = 8 + _header_length(bytes(data))
    rng = random.Random(0)
    path = tmp_path / "flipped.safetensors"
    for _ in range(400):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(end)] = rng.randrange(256)
        path.write_bytes(bytes(mutated))
        _outcome(path)


def _with_header(path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize(
    "header,message",
    [
        (b"{" + b'"a": [' * 200_000 + b"}", "damaged safetensors header"),  # deep JSON
        (b'{"a": "\xff\xfe"}', "damaged safetensors header"),  # not UTF-8
        (b'{"a": {"dtype": "F8_E4M3", "shape": "4", "data_offsets": [0, 4]}}', "shape must be a list"),
        (b'{"a": {"dtype": 8, "shape": [4], "data_offsets": [0, 4]}}', "no dtype"),
        (b'{"a": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4000000]}}', "byte range outside"),
        (b'{"a": {"dtype": "F8_E4M3", "shape": [-1], "data_offsets": [0, 0]}}', "shape must be a list"),
        (b'{"a": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [4, 0]}}', "byte range outside"),
        (b'{"__metadata__": {"k": 1}}', "__metadata__ must map names to strings"),
        (b'{"a": [1]}', "not an object"),
        (
            b'{"x.comfy_quant": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]}}',
            "not ComfyUI's layer JSON",
        ),
    ],
)
def test_damaged_headers_are_refused_with_the_file_named(tmp_path, header, message):
    path = tmp_path / "bad.safetensors"
    _with_header(path, header, b"abcd")
    with pytest.raises(QuantError, match=message) as info:
        detect_file(path)
    assert str(path) in str(info.value)


def test_an_oversized_length_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(QuantError, match="says 9223372036854775808 bytes"):
        detect_file(path)
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{" + b" " * 16)
    with pytest.raises(QuantError, match="damaged safetensors header"):
        detect_file(path)


def test_other_files_are_not_safetensors(tmp_path):
    for name, data in [("empty", b""), ("short", b"abc"), ("pickle", b"\x80\x04\x95" + b"\0" * 20)]:
        path = tmp_path / name
        path.write_bytes(data)
        assert detect_file(path) is None
