"""reader.py: parsing matches gguf-py, data is a zero-copy map, and every kind of bad file is refused cleanly."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from diffusers_quant.backends.gguf.dequant import dequantize  # noqa: E402
from diffusers_quant.backends.gguf.reader import GGUFError, read_gguf  # noqa: E402

T = gguf.GGMLQuantizationType


@pytest.fixture
def sample(tmp_path, make_gguf, make_blocks):
    """A small valid file: quantized, float and integer tensors plus metadata of every kind."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    tensors = {
        "blk.q8": (gguf.quants.quantize(x, T.Q8_0), "Q8_0"),
        "blk.q4k": (make_blocks("Q4_K", 6).reshape(3, 2 * 144), "Q4_K"),
        "blk.f32": (rng.standard_normal(5).astype(np.float32), "F32"),
        "blk.f16": (rng.standard_normal((2, 3)).astype(np.float16), "F16"),
        "blk.bf16": (gguf.quants.quantize(rng.standard_normal((2, 8)).astype(np.float32), T.BF16), "BF16"),
        "blk.i32": (np.arange(6, dtype=np.int32).reshape(3, 2), "I32"),
        "conv.weight": (
            gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), T.Q8_0),
            "Q8_0",
        ),
    }
    vt = gguf.GGUFValueType
    metadata = {
        "general.name": "tiny",
        "test.u32": 7,
        "test.f64": (2.5, vt.FLOAT64),
        "test.bool": (True, vt.BOOL),
        "test.i8": (-3, vt.INT8),
        "test.ints": [1, 2, 3],
        "test.strs": ["a", "bc", ""],
        "test.nested": ([[1, 2], [3]], vt.ARRAY),
        "comfy.gguf.orig_shape.conv.weight": ([2, 4, 4, 2, 2], vt.ARRAY, vt.INT32),
    }
    path = tmp_path / "sample.gguf"
    make_gguf(path, tensors, metadata, arch="flux")
    return path, tensors


def test_metadata_and_infos_match_gguf_py(sample):
    path, tensors = sample
    f = read_gguf(path)
    ref = gguf.GGUFReader(str(path))
    assert f.version == 3 and f.architecture == "flux"
    assert f.metadata["general.name"] == "tiny"
    assert f.metadata["test.u32"] == 7 and f.metadata["test.f64"] == 2.5 and f.metadata["test.bool"] is True
    assert f.metadata["test.i8"] == -3
    assert f.metadata["test.ints"] == [1, 2, 3] and f.metadata["test.strs"] == ["a", "bc", ""]
    assert f.metadata["test.nested"] == [[1, 2], [3]]
    assert set(f.metadata) == {
        k for k in ref.fields if not k.startswith("GGUF.")
    }  # gguf-py adds header fields
    assert f.names() == [t.name for t in ref.tensors] == list(tensors)
    for info, rt in zip(f.tensors, ref.tensors, strict=True):
        assert info.type_id == int(rt.tensor_type) and info.type_name == rt.tensor_type.name
        assert info.offset == rt.data_offset and info.nbytes == rt.n_bytes
        assert info.stored_shape == tuple(int(d) for d in reversed(rt.shape.tolist()))
    assert f.info("blk.q4k").shape == (3, 512) and f.info("blk.q4k").raw_shape == (3, 288)
    assert f.info("blk.q4k").is_quantized and not f.info("blk.f16").is_quantized
    # ComfyUI's flatten-for-quantization metadata gives the logical shape back
    assert f.info("conv.weight").shape == (2, 4, 4, 2, 2) and f.info("conv.weight").stored_shape == (2, 64)


def test_raw_data_matches_gguf_py_and_types(sample):
    path, tensors = sample
    f = read_gguf(path)
    ref = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for name, (arr, _) in tensors.items():
        raw = f.raw(name)
        assert (
            raw.contiguous().view(torch.uint8).numpy().tobytes() == ref[name].data.tobytes() == arr.tobytes()
        )
    assert f.raw("blk.q8").dtype == torch.uint8 and f.raw("blk.q8").shape == (4, 68)
    assert f.raw("blk.f32").dtype == torch.float32 and f.raw("blk.f32").shape == (5,)
    assert f.raw("blk.f16").dtype == torch.float16 and f.raw("blk.f16").shape == (2, 3)
    assert f.raw("blk.bf16").dtype == torch.bfloat16 and f.raw("blk.i32").dtype == torch.int32
    assert torch.equal(f.raw("blk.i32"), torch.arange(6, dtype=torch.int32).reshape(3, 2))
    info = f.info("blk.q4k")
    expected = gguf.quants.dequantize(tensors["blk.q4k"][0], T.Q4_K)
    got = dequantize(f.raw(info), info.type_name, info.shape)
    assert np.array_equal(got.numpy(), expected)
    assert torch.equal(f.dequantize("blk.q4k"), got)
    assert f.dequantize("blk.f16", torch.float16).dtype == torch.float16
    assert torch.equal(f.dequantize("blk.i32"), torch.arange(6.0).reshape(3, 2))
    assert f.dequantize("conv.weight").shape == (2, 4, 4, 2, 2)


def test_raw_is_a_zero_copy_copy_on_write_view(sample):
    path, _ = sample
    before = path.read_bytes()
    f = read_gguf(path)
    info = f.info("blk.q8")
    raw = f.raw(info)
    base = f._mm.ctypes.data
    assert raw.data_ptr() == base + info.offset  # a view into the map, not a copy
    raw.zero_()  # private pages: the file on disk must not change
    assert path.read_bytes() == before
    f.close()
    assert raw.sum() == 0  # the view keeps the mapping alive after close()
    with pytest.raises(ValueError, match="closed"):
        f.raw("blk.q8")


def test_large_tensor_is_not_read_into_memory(tmp_path):
    psutil = pytest.importorskip("psutil")
    path = tmp_path / "big.gguf"
    n = 256 * 1024 * 1024  # 256 MiB of F32, left sparse on disk
    writer = gguf.GGUFWriter(str(path), "test")
    writer.add_tensor_info("big", (n // 4,), np.dtype(np.float32), n, raw_dtype=T.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    header = path.stat().st_size
    os.truncate(path, -(-header // 32) * 32 + n)
    rss = psutil.Process().memory_info().rss
    f = read_gguf(path)
    raw = f.raw("big")
    assert raw.shape == (n // 4,)
    assert psutil.Process().memory_info().rss - rss < 64 * 1024 * 1024


# ---------------------------------------------------------------------------------------------------------
# Bad files


def _tensor_info_pos(data: bytes, name: str) -> int:
    """Offset of the n_dims field of tensor ``name``'s info (infos come after metadata: take the last hit)."""
    needle = struct.pack("<Q", len(name)) + name.encode()
    pos = data.rfind(needle)
    assert pos > 0
    return pos + len(needle)


def _patch(path, pos: int, fmt: str, value) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, pos, value)
    path.write_bytes(bytes(data))


def _expect_error(path, pattern: str) -> str:
    with pytest.raises(GGUFError) as exc:
        read_gguf(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert pytest.importorskip("re").search(pattern, msg), msg
    return msg


@pytest.fixture
def small(tmp_path, make_gguf):
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    tensors = {
        "aa": (gguf.quants.quantize(x, T.Q8_0), "Q8_0"),
        "ab": (np.ones(8, np.float32), "F32"),
    }
    path = tmp_path / "small.gguf"
    make_gguf(path, tensors, {"general.name": "x"})
    return path


def test_bad_magic(small):
    _patch(small, 0, "4s", b"GGUX")
    _expect_error(small, "not a GGUF file: bad magic")


@pytest.mark.parametrize("size", [0, 3])
def test_tiny_file(small, size):
    os.truncate(small, size)
    _expect_error(small, "truncated")


@pytest.mark.parametrize(
    "version,pattern", [(1, "unsupported GGUF version 1"), (99, "version 99"), (0x03000000, "big-endian")]
)
def test_unsupported_version(small, version, pattern):
    _patch(small, 4, "<I", version)
    _expect_error(small, pattern)


def test_every_truncation_is_a_clean_error(small):
    data = small.read_bytes()
    for cut in range(4, len(data)):
        small.write_bytes(data[:cut])
        with pytest.raises(GGUFError, match="truncated|past the end|more than") as exc:
            read_gguf(small)
        assert str(small) in str(exc.value)


def test_truncated_tensor_data(small):
    os.truncate(small, small.stat().st_size - 1)
    _expect_error(small, r"truncated file: tensor 'ab' .* extends past the end of the file")


@pytest.mark.parametrize("field,offset", [("tensor count", 8), ("metadata count", 16)])
def test_huge_counts_are_refused_before_allocating(small, field, offset):
    _patch(small, offset, "<Q", 2**62)
    _expect_error(small, r"header claims .* more than the \d+ bytes after the header can hold")


def test_huge_string_length(small):
    _patch(small, 24, "<Q", 2**62)  # length of the first metadata key
    _expect_error(small, r"truncated file: metadata key #0 needs 4611686018427387904 bytes")


def test_huge_array_length(tmp_path, make_gguf):
    path = tmp_path / "arr.gguf"
    make_gguf(path, {"t": (np.ones(4, np.float32), "F32")}, {"z.arr": [1, 2, 3]})
    data = path.read_bytes()
    pos = data.find(b"z.arr") + len(b"z.arr") + 4 + 4  # skip value type and element type
    _patch(path, pos, "<Q", 2**61)
    _expect_error(path, r"metadata array 'z.arr' claims 2305843009213693952 INT32 elements")


def test_unknown_value_type(small):
    data = small.read_bytes()
    pos = data.find(b"general.architecture") + len(b"general.architecture")
    _patch(small, pos, "<I", 42)
    _expect_error(small, "unknown metadata value type 42")


def test_unknown_tensor_type(small):
    pos = _tensor_info_pos(small.read_bytes(), "aa")
    _patch(small, pos + 4 + 2 * 8, "<I", 77)
    _expect_error(small, "tensor 'aa' has unknown ggml type id 77")


def test_misaligned_offset(small):
    pos = _tensor_info_pos(small.read_bytes(), "ab")
    _patch(small, pos + 4 + 8 + 4, "<Q", 1)
    _expect_error(small, r"tensor 'ab' data offset 1 is misaligned \(alignment 32\)")


def test_overlapping_tensors(small):
    pos = _tensor_info_pos(small.read_bytes(), "ab")
    _patch(small, pos + 4 + 8 + 4, "<Q", 64)  # aligned, but inside 'aa' (136 bytes)
    _expect_error(small, "tensor data overlaps: 'ab' starts at .* inside 'aa'")


def test_offset_beyond_end(small):
    pos = _tensor_info_pos(small.read_bytes(), "ab")
    _patch(small, pos + 4 + 8 + 4, "<Q", 2**40)
    _expect_error(small, r"tensor 'ab' .* extends past the end of the file")


def test_row_not_whole_blocks(small):
    pos = _tensor_info_pos(small.read_bytes(), "aa")
    _patch(small, pos + 4, "<Q", 33)  # ne0 of a Q8_0 tensor
    _expect_error(
        small, "byte size does not match shape .* row length 33 is not a multiple of the block size 32"
    )


def test_huge_dims(small):
    pos = _tensor_info_pos(small.read_bytes(), "aa")
    _patch(small, pos + 4 + 8, "<Q", 2**60)  # ne1
    _expect_error(small, r"tensor 'aa' has an impossible shape \(1152921504606846976, 64\) for Q8_0")


@pytest.mark.parametrize("dim", [2**63, 2**64 - 1, 10**6])
def test_zero_elements_with_an_impossible_dim(tmp_path, make_gguf, dim):
    """Issue 14: a zero-element tensor with a 2**63 dim passed validation and failed in raw()."""
    path = tmp_path / "zero.gguf"
    make_gguf(path, {"z": (np.zeros((0, 4), np.float32), "F32"), "t": (np.ones(4, np.float32), "F32")})
    pos = _tensor_info_pos(path.read_bytes(), "z")
    _patch(path, pos + 4, "<Q", dim)  # ne0 (the row); ne1 stays 0, so the byte count is still 0
    msg = _expect_error(path, r"tensor 'z' has an impossible shape \(0, \d+\) for F32 data: a dim above \d+")
    assert "corrupt file" in msg


def test_a_zero_element_tensor_within_bounds_still_reads(tmp_path, make_gguf):
    path = tmp_path / "zero.gguf"
    make_gguf(path, {"z": (np.zeros((0, 4), np.float32), "F32"), "t": (np.ones(4, np.float32), "F32")})
    f = read_gguf(path)
    assert f.raw("z").shape == (0, 4) and f.dequantize("z").shape == (0, 4)


def test_orig_shape_with_an_impossible_dim(tmp_path, make_gguf):
    path = tmp_path / "shape.gguf"
    vt = gguf.GGUFValueType
    make_gguf(
        path,
        {"z": (np.zeros((0, 4), np.float32), "F32")},
        {"comfy.gguf.orig_shape.z": ([0, 2**62], vt.ARRAY, vt.INT64)},
    )
    _expect_error(path, r"comfy.gguf.orig_shape.z = \[0, 4611686018427387904\] is not a valid shape")


def test_too_many_dims(small):
    pos = _tensor_info_pos(small.read_bytes(), "aa")
    _patch(small, pos, "<I", 1000)
    _expect_error(small, "tensor 'aa' has 1000 dimensions")


def test_duplicate_tensor_name(small):
    data = bytearray(small.read_bytes())
    pos = _tensor_info_pos(bytes(data), "ab")
    data[pos - 2 : pos] = b"aa"
    small.write_bytes(bytes(data))
    _expect_error(small, "duplicate tensor name 'aa'")


def test_bad_alignment(tmp_path, make_gguf):
    path = tmp_path / "align.gguf"
    make_gguf(path, {"t": (np.ones(4, np.float32), "F32")}, {"general.alignment": 48})
    _expect_error(path, "general.alignment must be a positive power of two, got 48")


def test_bad_orig_shape(tmp_path, make_gguf):
    path = tmp_path / "shape.gguf"
    vt = gguf.GGUFValueType
    make_gguf(
        path,
        {"t": (np.ones(4, np.float32), "F32")},
        {"comfy.gguf.orig_shape.t": ([3, 2], vt.ARRAY, vt.INT32)},
    )
    _expect_error(path, r"comfy.gguf.orig_shape.t = \[3, 2\] is not a valid shape for tensor 't'")


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.gguf", "cannot open GGUF file")


def test_random_corruption_never_crashes(small):
    """Flip bytes anywhere in the header: the result is either a valid file or a GGUFError."""
    data = small.read_bytes()
    header_end = _tensor_info_pos(data, "ab") + 4 + 8 + 4 + 8
    rng = np.random.default_rng(0)
    for _ in range(300):
        corrupt = bytearray(data)
        for pos in rng.integers(0, header_end, size=rng.integers(1, 4)):
            corrupt[pos] = int(rng.integers(0, 256))
        small.write_bytes(bytes(corrupt))
        try:
            f = read_gguf(small)
        except GGUFError as e:
            assert str(small) in str(e)
        else:
            for info in f.tensors:
                assert info.offset + info.nbytes <= len(corrupt)
                f.raw(info)


def test_a_folder_is_named_not_opened(tmp_path):
    """Issue 14, finding 8: a folder gave IsADirectoryError."""
    _expect_error(tmp_path, "is a folder, not a GGUF file; fix: give the path of the .gguf file")


def test_a_type_changed_to_a_smaller_one_is_refused(small):
    """A Q8_0 tensor relabelled Q4_0 has the same shape and would read the start of its old bytes as other
    values: the bytes left over (no tensor accounts for them) show it."""
    pos = _tensor_info_pos(small.read_bytes(), "aa")
    _patch(small, pos + 4 + 2 * 8, "<I", int(T.Q4_0))
    _expect_error(small, r"88 bytes before tensor 'ab' \(at \d+\) belong to no tensor.*type or shape")


def test_a_shrunken_last_tensor_is_refused(tmp_path, make_gguf):
    path = tmp_path / "last.gguf"
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    make_gguf(path, {"a": (np.ones(8, np.float32), "F32"), "z": (gguf.quants.quantize(x, T.Q8_0), "Q8_0")})
    pos = _tensor_info_pos(path.read_bytes(), "z")
    _patch(path, pos + 4 + 2 * 8, "<I", int(T.Q4_0))
    _expect_error(path, r"88 bytes after the last tensor \(which ends at \d+\) belong to no tensor")


def test_a_lowered_tensor_count_is_refused(small):
    _patch(small, 8, "<Q", 1)
    with pytest.raises(GGUFError) as exc:
        read_gguf(small)
    assert str(small) in str(exc.value)


def test_padding_below_the_alignment_is_fine(tmp_path, make_gguf):
    path = tmp_path / "pad.gguf"
    make_gguf(path, {"a": (np.ones(3, np.float32), "F32"), "b": (np.ones(5, np.float16), "F16")})
    f = read_gguf(path)
    assert f.raw("a").tolist() == [1.0] * 3 and f.raw("b").shape == (5,)
