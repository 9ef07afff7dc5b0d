"""Recognise pre-quantized checkpoints from their first bytes, before any tensor is read.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor name -> dtype, shape,
byte range; optional ``__metadata__``), then the tensor bytes. The header alone says which layout wrote
the file: the format is never guessed from the file's name."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field

from .errors import QuantError

GGUF_MAGIC = b"GGUF"
# safetensors' own bound on a header (its Rust reader refuses larger ones)
MAX_HEADER_BYTES = 100_000_000
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
# ComfyUI: scaled fp8 (a top-level ``scaled_fp8`` marker, ``.scale_weight`` per layer) and its newer mixed
# quantization (``.comfy_quant`` per layer and / or ``_quantization_metadata``, ``.weight_scale``).
COMFY_SCALED_MARKER = "scaled_fp8"
COMFY_LAYER_MARKER = ".comfy_quant"
COMFY_METADATA = "_quantization_metadata"
COMFY_FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
# names quantized layouts give their scale tensors (ComfyUI, ModelOpt, compressed-tensors, DeepSeek-style fp8)
SCALE_NAMES = (
    "scale_weight",
    "weight_scale",
    "weight_scale_inv",
    "weight_scale_2",
    "weight_global_scale",
    "scale_input",
    "input_scale",
    "input_global_scale",
)
FORGE_NF4_MARKERS = (".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")


def looks_like_a_scale(key: str) -> bool:
    return key.rpartition(".")[2] in SCALE_NAMES


def is_gguf_file(path) -> bool:
    """A GGUF file, whatever its name: its first four bytes are the magic."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offsets in the data section
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # file offset of the data section

    def read_bytes(self, name: str) -> bytes:
        """One tensor's raw bytes (for the small marker tensors; weights are read by the loaders)."""
        info = self.tensors[name]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + info.start)
            return f.read(info.end - info.start)


def read_safetensors_header(path) -> SafetensorsHeader | None:
    """The header of a safetensors file, or None if the file does not start like one. A file that starts
    like one but whose header is damaged (cut short, oversized lengths, wrong types, byte ranges outside the
    file) is a QuantError naming the file."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
        if len(head) < 9:
            return None
        (length,) = struct.unpack("<Q", head[:8])
        if head[8:9] != b"{":
            return None  # not JSON after the length: some other kind of file
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise QuantError(
                f"{path}: damaged safetensors header (says {length} bytes, the file has {size}); "
                "fix: download the file again"
            )
        f.seek(8)
        raw = f.read(length)
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise QuantError(
            f"{path}: damaged safetensors header ({type(e).__name__}); fix: download it again"
        ) from None
    if not isinstance(parsed, dict):
        raise QuantError(f"{path}: damaged safetensors header (not a JSON object)")
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise QuantError(f"{path}: damaged safetensors header (__metadata__ must map names to strings)")
    data_size = size - 8 - length
    tensors = {}
    for name, entry in parsed.items():
        tensors[name] = _tensor_info(path, name, entry, data_size)
    return SafetensorsHeader(path, tensors, metadata, 8 + length)


def _tensor_info(path: str, name: str, entry, data_size: int) -> TensorInfo:
    def bad(why: str) -> QuantError:
        return QuantError(f"{path}: damaged safetensors header at tensor {name!r} ({why})")

    if not isinstance(entry, dict):
        raise bad("not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise bad("no dtype")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad("shape must be a list of sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise bad("byte range outside the file")
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


@dataclass(frozen=True)
class Detected:
    """What a single file is, from its header: ``format`` is one of FORMATS."""

    format: str
    layers: int = 0  # quantized layers
    dtypes: dict[str, int] = field(default_factory=dict)  # tensor dtype -> count
    detail: str = ""
    loadable: bool = True  # False: recognised, but cannot be loaded here (``detail`` says why)


FORMATS = {
    "gguf": "GGUF (llama.cpp / ComfyUI-GGUF)",
    "fp8": "plain fp8 (float8 weights, no scales)",
    "comfy-scaled-fp8": "ComfyUI scaled fp8 (scaled_fp8 marker, .scale_weight per layer)",
    "comfy-quant": "ComfyUI mixed quantization (.comfy_quant markers, .weight_scale)",
    "forge-nf4": "Forge bitsandbytes NF4/FP4 single file (quant_state.bitsandbytes__* keys)",
    "unknown-scaled": "quantized weights with scales in an unknown layout",
    "safetensors": "plain safetensors (no pre-quantized format)",
}


def detect_file(path) -> Detected | None:
    """The format of a single checkpoint file, from its header; None when it is no file this reads."""
    if is_gguf_file(path):
        return Detected("gguf")
    header = read_safetensors_header(path)
    if header is None:
        return None
    names = header.tensors
    dtypes: dict[str, int] = {}
    for info in names.values():
        dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
    forge = [n for n in names if n.endswith(FORGE_NF4_MARKERS)]
    if forge:
        types = sorted({n.rpartition("__")[2] for n in forge})
        return Detected("forge-nf4", len(forge), dtypes, "4-bit types: " + ", ".join(types))
    formats = comfy_formats(header)
    if formats is not None:
        unsupported = sorted(set(formats.values()) - set(COMFY_FP8_FORMATS))
        return Detected(
            "comfy-quant",
            len(formats),
            dtypes,
            (
                f"layer formats {', '.join(unsupported)} are not supported here (only "
                f"{', '.join(COMFY_FP8_FORMATS)}); fix: use the file's fp8 or bf16 variant"
                if unsupported
                else "formats: " + ", ".join(sorted(set(formats.values())))
            ),
            loadable=not unsupported,
        )
    fp8 = [n for n, info in names.items() if info.dtype in FP8_DTYPES and n.endswith(".weight")]
    scaled = [n for n in names if n.endswith(".scale_weight")]
    if any(n.rpartition(".")[2] == COMFY_SCALED_MARKER for n in names):
        return Detected("comfy-scaled-fp8", len(scaled), dtypes)
    scales = sorted(n for n in names if looks_like_a_scale(n))
    if scales:  # scales without a layout this knows: loading the weights alone would be silently wrong
        return Detected(
            "unknown-scaled",
            len(scales),
            dtypes,
            f"scale tensors such as {', '.join(scales[:2])} in a layout not known here; fix: load the file with "
            "the tool that wrote it",
            loadable=False,
        )
    if fp8:
        return Detected("fp8", len(fp8), dtypes)
    return Detected("safetensors", 0, dtypes)


def comfy_formats(header: SafetensorsHeader) -> dict[str, str] | None:
    """ComfyUI mixed quantization: layer -> format (from ``_quantization_metadata`` and the per-layer
    ``.comfy_quant`` JSON markers), or None when the file has neither."""
    layers: dict[str, str] = {}
    found = False
    if COMFY_METADATA in header.metadata:
        found = True
        try:
            entries = json.loads(header.metadata[COMFY_METADATA]).get("layers", {})
            for layer, conf in entries.items():
                layers[layer] = conf if isinstance(conf, str) else str(conf.get("format"))
        except (json.JSONDecodeError, AttributeError, RecursionError):
            raise QuantError(
                f"{header.path}: damaged {COMFY_METADATA} metadata (not ComfyUI's JSON)"
            ) from None
    for name, info in header.tensors.items():
        if not name.endswith(COMFY_LAYER_MARKER):
            continue
        found = True
        if info.end - info.start > 4096:
            raise QuantError(f"{header.path}: {name} is {info.end - info.start} bytes, not a layer marker")
        try:
            conf = json.loads(header.read_bytes(name).decode("utf-8"))
            layers[name[: -len(COMFY_LAYER_MARKER)]] = str(conf.get("format"))
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, RecursionError):
            raise QuantError(f"{header.path}: {name} is not ComfyUI's layer JSON") from None
    return layers if found else None
