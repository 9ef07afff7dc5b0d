"""writer.py: what gets quantized, exact round trips through reader + dequant, metadata, atomic replace."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from diffusers_quant.backends.gguf import writer as writer_mod  # noqa: E402
from diffusers_quant.backends.gguf.dequant import dequantize  # noqa: E402
from diffusers_quant.backends.gguf.quantize import QUANTIZERS, to_ggml  # noqa: E402
from diffusers_quant.backends.gguf.reader import read_gguf  # noqa: E402
from diffusers_quant.backends.gguf.writer import (  # noqa: E402
    CONFIG_KEY,
    GGUF_PY_QTYPES,
    QTYPE_KEY,
    WRITABLE_QTYPES,
    write_gguf,
)

T = gguf.GGMLQuantizationType


def _state_dict(dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {
        "blocks.0.linear.weight": torch.randn(8, 512, generator=g),  # quantizable for every block size
        "blocks.0.linear.bias": torch.randn(8, generator=g),  # 1-D: kept
        "blocks.0.small.weight": torch.randn(4, 256, generator=g),  # 1024 elements: kept (small)
        "conv.weight": torch.randn(16, 8, 3, 3, generator=g),  # last dim 3: not whole blocks, kept
        "embed.weight": torch.randn(3, 2, 4, 256, generator=g),  # 4-D, quantizable
        "patch.weight": torch.randn(16, 4, 1, 2, 256, generator=g),  # 5-D: stored flattened + orig_shape
    }
    return {k: v.to(dtype) for k, v in sd.items()}


def test_writable_qtypes_are_what_gguf_py_can_quantize_and_the_torch_k_quants():
    assert {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"} <= set(GGUF_PY_QTYPES)
    for t in T:
        block_size = gguf.GGML_QUANT_SIZES[t][0]
        probe = np.ones((1, block_size), np.float32)
        if t.name in GGUF_PY_QTYPES:
            gguf.quants.quantize(probe, t)
        else:
            with pytest.raises(NotImplementedError):
                gguf.quants.quantize(probe, t)
    # our additions: the K quants gguf-py cannot write, ported from ggml (test_quantize.py checks the bytes)
    assert {"Q4_K", "Q5_K", "Q6_K"} <= set(QUANTIZERS)
    assert set(WRITABLE_QTYPES) == set(GGUF_PY_QTYPES) | set(QUANTIZERS)
    assert list(WRITABLE_QTYPES) == sorted(WRITABLE_QTYPES, key=lambda name: T[name].value)  # ggml's order


@pytest.mark.parametrize("qtype", WRITABLE_QTYPES)
def test_round_trip_every_writable_type(tmp_path, qtype):
    sd = _state_dict()
    path = tmp_path / f"m-{qtype}.gguf"
    written = write_gguf(path, sd, qtype, arch="flux", config={"num_layers": 1})
    f = read_gguf(path)
    assert f.names() == list(sd)
    block = gguf.GGML_QUANT_SIZES[T[qtype]][0]
    for name, x in sd.items():
        info = f.info(name)
        assert info.type_name == written[name]
        assert info.shape == tuple(x.shape)
        quantize = x.dim() >= 2 and x.numel() > 1024 and x.shape[-1] % block == 0
        assert written[name] == (qtype if quantize else "F32"), name
        got = dequantize(f.raw(info), info.type_name, info.shape)
        if quantize:
            if qtype in GGUF_PY_QTYPES:
                packed = gguf.quants.quantize(x.numpy(), T[qtype])
            else:  # gguf-py cannot quantize it: our torch port's bytes, read back by gguf-py
                packed = to_ggml(x, qtype).numpy()
            stored = f.raw(info).contiguous().view(torch.uint8).reshape(-1).numpy()
            assert np.array_equal(stored, packed.view(np.uint8).reshape(-1)), name
            ref = gguf.quants.dequantize(packed, T[qtype])
            assert np.array_equal(got.numpy(), ref.astype(np.float32)), name
        else:
            assert torch.equal(got, x), name
    assert written["blocks.0.linear.weight"] == qtype
    assert written["blocks.0.linear.bias"] == written["blocks.0.small.weight"] == "F32"
    assert written["conv.weight"] == (qtype if block == 1 else "F32")


def test_bf16_source_keeps_exact_bits_and_quantizes_from_float(tmp_path):
    sd = _state_dict(torch.bfloat16)
    path = tmp_path / "bf16.gguf"
    written = write_gguf(path, sd, "Q8_0", arch="flux")
    f = read_gguf(path)
    assert written["blocks.0.linear.bias"] == "BF16" and written["conv.weight"] == "BF16"
    assert torch.equal(f.raw("conv.weight"), sd["conv.weight"])  # bit-exact, typed bfloat16
    ref = gguf.quants.dequantize(gguf.quants.quantize(sd["embed.weight"].float().numpy(), T.Q8_0), T.Q8_0)
    got = dequantize(f.raw("embed.weight"), "Q8_0", (3, 2, 4, 256))
    assert np.array_equal(got.numpy(), ref)


def test_keep_full_precision_and_float_type(tmp_path):
    sd = _state_dict()
    seen = []

    def keep(name, tensor):
        seen.append(name)
        return name.startswith("embed")

    written = write_gguf(
        tmp_path / "k.gguf", sd, "Q4_0", arch="x", keep_full_precision=keep, float_type="f16"
    )
    assert written["embed.weight"] == "F16" and written["blocks.0.linear.weight"] == "Q4_0"
    assert written["blocks.0.linear.bias"] == "F16"
    assert "embed.weight" in seen and "blocks.0.linear.bias" not in seen  # only asked about candidates
    f = read_gguf(tmp_path / "k.gguf")
    assert torch.equal(f.raw("embed.weight"), sd["embed.weight"].half())


def test_metadata(tmp_path):
    config = {"num_layers": 2, "axes_dims_rope": (4, 6, 6), "_class_name": "FluxTransformer2DModel"}
    path = tmp_path / "meta.gguf"
    write_gguf(path, _state_dict(), "Q8_0", arch="flux", config=config, metadata={"my.key": "v", "my.n": 5})
    f = read_gguf(path)
    assert f.architecture == "flux"
    assert json.loads(f.metadata[CONFIG_KEY]) == {**config, "axes_dims_rope": [4, 6, 6]}
    assert f.metadata[QTYPE_KEY] == "Q8_0"
    assert f.metadata["my.key"] == "v" and f.metadata["my.n"] == 5
    assert f.metadata["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    assert f.metadata["comfy.gguf.orig_shape.patch.weight"] == [16, 4, 1, 2, 256]
    assert f.info("patch.weight").stored_shape == (64, 1, 2, 256)
    # gguf-py (and so ComfyUI / diffusers) can read it too
    ref = gguf.GGUFReader(str(path))
    assert [t.name for t in ref.tensors] == f.names()


def test_int_tensors_and_invalid_inputs(tmp_path):
    sd = {"w": torch.randn(4, 64), "idx": torch.arange(10, dtype=torch.int64)}
    written = write_gguf(tmp_path / "i.gguf", sd, "Q8_0", arch="x")
    assert written["idx"] == "I64"
    assert torch.equal(read_gguf(tmp_path / "i.gguf").raw("idx"), sd["idx"])
    with pytest.raises(ValueError, match="unsupported GGUF qtype 'Q3_K'; expected one of"):
        write_gguf(tmp_path / "bad.gguf", sd, "Q3_K", arch="x")
    with pytest.raises(ValueError, match="0-dimensional"):
        write_gguf(tmp_path / "bad.gguf", {"s": torch.tensor(1.0)}, "Q8_0", arch="x")
    with pytest.raises(ValueError, match="dtype torch.bool"):
        write_gguf(tmp_path / "bad.gguf", {"b": torch.ones(3, dtype=torch.bool)}, "Q8_0", arch="x")
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_gguf(tmp_path / "bad.gguf", sd, "Q8_0", arch="x", config={"f": object()})
    assert not (tmp_path / "bad.gguf").exists()


@pytest.mark.parametrize("existing", [True, False])
def test_failure_midway_leaves_target_untouched(tmp_path, monkeypatch, existing):
    path = tmp_path / "model.gguf"
    if existing:
        path.write_bytes(b"previous complete file")
    calls = []
    real = gguf.quants.quantize

    def flaky(data, qtype):
        calls.append(qtype)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "quantize", flaky)
    with pytest.raises(ValueError, match="disk on fire"):
        write_gguf(path, _state_dict(), "Q8_0", arch="x")
    assert len(calls) == 3  # it really failed in the middle of the tensor data
    if existing:
        assert path.read_bytes() == b"previous complete file"
    else:
        assert not path.exists()
    assert os.listdir(tmp_path) == (["model.gguf"] if existing else [])  # no temp file left behind


def test_replaces_existing_file_with_normal_permissions(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"old")
    write_gguf(path, _state_dict(), "Q8_0", arch="x")
    assert read_gguf(path).info("blocks.0.linear.weight").type_name == "Q8_0"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["model.gguf"]


def test_streams_one_tensor_at_a_time(tmp_path, monkeypatch):
    """Tensors are encoded while writing, not all collected first (bounded memory for big models)."""
    events = []
    real_encode = writer_mod._encode
    real_write = gguf.GGUFWriter.write_tensor_data

    def encode(*args):
        events.append("encode")
        return real_encode(*args)

    def write(self, tensor):
        events.append("write")
        return real_write(self, tensor)

    monkeypatch.setattr(writer_mod, "_encode", encode)
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write)
    write_gguf(tmp_path / "s.gguf", _state_dict(), "Q8_0", arch="x")
    assert events == ["encode", "write"] * len(_state_dict())
