"""Fixtures shared by the GGUF layer tests: random valid GGML blocks and small GGUF files made by gguf-py."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

# Byte offsets of the fp16 scale fields per type; random bytes there could be NaN/Inf, so tests overwrite
# them with finite values.  (IQ1_M spreads its scale over four nibbles and is patched separately.)
F16_FIELDS: dict[str, tuple[int, ...]] = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
    "IQ4_NL": (0,),
    "IQ4_XS": (0,),
    "IQ2_XXS": (0,),
    "IQ2_XS": (0,),
    "IQ2_S": (0,),
    "IQ3_XXS": (0,),
    "IQ3_S": (0,),
    "IQ1_S": (0,),
    "TQ1_0": (52,),
    "TQ2_0": (64,),
    "Q1_0": (0,),
}
# Types stored as plain numpy values (random bytes there could be NaN for F64).
PLAIN_NUMPY = {"F64": np.float64, "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64}


def random_blocks(qtype: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    """(n_blocks, type_size) uint8 of random but finite-valued blocks of ``qtype``."""
    rng = np.random.default_rng(seed)
    t = gguf.GGMLQuantizationType[qtype]
    block_size, type_size = gguf.GGML_QUANT_SIZES[t]
    if qtype in ("F32", "F16", "BF16"):
        x = rng.standard_normal((n_blocks, block_size)).astype(np.float32)
        return gguf.quants.quantize(x, t).view(np.uint8).reshape(n_blocks, type_size)
    if qtype in PLAIN_NUMPY:
        kind = np.dtype(PLAIN_NUMPY[qtype])
        if kind.kind == "f":
            x = rng.standard_normal(n_blocks).astype(kind)
        else:
            x = rng.integers(np.iinfo(kind).min, np.iinfo(kind).max, n_blocks, dtype=kind, endpoint=True)
        return x.view(np.uint8).reshape(n_blocks, type_size)
    raw = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    if qtype == "Q8_K":  # float32 super-block scale
        raw[:, :4] = rng.standard_normal(n_blocks).astype(np.float32).view(np.uint8).reshape(-1, 4)
    for off in F16_FIELDS.get(qtype, ()):
        raw[:, off : off + 2] = rng.standard_normal(n_blocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
    if qtype == "IQ1_M":
        d = rng.standard_normal(n_blocks).astype(np.float16).view(np.uint16)
        scales = raw[:, 48:56].copy().view(np.uint16)
        for k in range(4):  # word k's top nibble holds bits 4k..4k+3 of the fp16 scale
            scales[:, k] = (scales[:, k] & 0x0FFF) | (((d >> (4 * k)) & 0xF) << 12)
        raw[:, 48:56] = scales.view(np.uint8)
    if qtype == "MXFP4":
        raw[:, 0] = rng.integers(100, 150, n_blocks)  # e8m0 exponent near 1.0, so products stay finite
    return raw


def write_gguf_file(path, tensors: dict, metadata: dict | None = None, arch: str = "test") -> None:
    """Write ``tensors`` {name: (np.ndarray, ggml type name)} with gguf-py; uint8 arrays are raw bytes."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        if isinstance(value, tuple):  # (value, GGUFValueType[, sub type])
            writer.add_key_value(key, *value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_uint32(key, value)
    for name, (arr, qtype) in tensors.items():
        writer.add_tensor(name, arr, raw_dtype=gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def make_blocks():
    return random_blocks


@pytest.fixture
def make_gguf():
    return write_gguf_file
