"""Memory-mapped GGUF reader with strict validation.

The header is parsed here (not with ``gguf.GGUFReader``) so every count and offset is checked against the
file size before anything is allocated: a corrupt or hostile file raises ``GGUFError`` naming the file and
the problem instead of crashing, hanging or allocating gigabytes.  Tensor data is never read eagerly:
``GGUFFile.raw`` returns zero-copy torch views over a copy-on-write memory map.

Format (little-endian): magic "GGUF", u32 version (2 or 3), u64 tensor count, u64 metadata count, the
metadata key/values, the tensor infos (name, u32 n_dims, u64 dims (ggml order: fastest first), u32 type,
u64 offset), padding to ``general.alignment`` (default 32), then the tensor data.
"""

from __future__ import annotations

import itertools
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .dequant import block_info, dequantize, qtype_name

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# ggml's own limit is 4; Python writers can emit more, so accept a few extra rather than reject them.
MAX_DIMS = 8
MAX_ARRAY_NESTING = 8
# Metadata key ComfyUI-GGUF's converter writes when it flattened a tensor to make it quantizable.
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."

_HEADER_SIZE = 24
# Smallest possible encodings, used to bound counts by the bytes left before allocating anything.
_MIN_KV_SIZE = 8 + 4 + 1  # key length, value type, a one-byte value
_MIN_TENSOR_INFO_SIZE = 8 + 4 + 4 + 8  # name length, n_dims, type, offset

# GGUF metadata value types: id -> (name, struct format or None)
_VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("UINT8", "<B"),
    1: ("INT8", "<b"),
    2: ("UINT16", "<H"),
    3: ("INT16", "<h"),
    4: ("UINT32", "<I"),
    5: ("INT32", "<i"),
    6: ("FLOAT32", "<f"),
    7: ("BOOL", "<?"),
    8: ("STRING", None),
    9: ("ARRAY", None),
    10: ("UINT64", "<Q"),
    11: ("INT64", "<q"),
    12: ("FLOAT64", "<d"),
}
_STRING, _ARRAY = 8, 9
_MIN_VALUE_SIZE = {t: struct.calcsize(f) if f else 0 for t, (_, f) in _VALUE_TYPES.items()}
_MIN_VALUE_SIZE[_STRING] = 8
_MIN_VALUE_SIZE[_ARRAY] = 4 + 8

# Types that have a direct torch dtype; everything else is handed out as packed bytes.
_TORCH_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
}


class GGUFError(ValueError):
    """A GGUF file that is malformed, truncated or uses something unsupported."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    type_id: int
    type_name: str
    shape: tuple[int, ...]  # logical torch-order shape (ComfyUI's orig_shape applied)
    stored_shape: tuple[int, ...]  # torch-order shape as stored (ggml dims reversed)
    offset: int  # absolute byte offset in the file
    nbytes: int
    block_size: int
    type_size: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def is_quantized(self) -> bool:
        return self.type_name not in _TORCH_DTYPES

    @property
    def raw_shape(self) -> tuple[int, int]:
        """(rows, bytes_per_row) of the stored tensor: a row is a whole number of blocks."""
        row = self.stored_shape[-1] if self.stored_shape else 1
        rows = math.prod(self.stored_shape[:-1])
        return rows, row // self.block_size * self.type_size


class GGUFFile:
    """A parsed GGUF file; tensor bytes stay in the memory map until ``raw`` views them."""

    def __init__(
        self,
        path: str,
        version: int,
        alignment: int,
        data_offset: int,
        metadata: dict[str, Any],
        tensors: list[GGUFTensorInfo],
        mm: np.ndarray,
    ):
        self.path = path
        self.version = version
        self.alignment = alignment
        self.data_offset = data_offset
        self.metadata = metadata
        self.tensors = tensors
        self._by_name = {t.name: t for t in tensors}
        self._mm: np.ndarray | None = mm

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, v{self.version}, {len(self.tensors)} tensors)"

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[GGUFTensorInfo]:
        return iter(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def info(self, name: str) -> GGUFTensorInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def raw(self, name: str | GGUFTensorInfo) -> torch.Tensor:
        """Zero-copy view of a tensor's data.

        Quantized types: ``uint8`` of shape ``raw_shape`` (rows, bytes_per_row).  Types with a torch dtype
        (F32/F16/BF16/F64/I8..I64): a typed tensor of the logical shape.  The view keeps the map alive.
        """
        info = name if isinstance(name, GGUFTensorInfo) else self.info(name)
        if self._mm is None:
            raise ValueError(f"{self.path}: file is closed")
        data = torch.from_numpy(self._mm[info.offset : info.offset + info.nbytes])
        dtype = _TORCH_DTYPES.get(info.type_name)
        if dtype is None:
            return data.view(info.raw_shape)
        return data.view(dtype).view(info.shape)

    def dequantize(
        self,
        name: str | GGUFTensorInfo,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """A tensor decoded to ``dtype`` (on ``device`` if given; the packed bytes are moved, not the floats)."""
        info = name if isinstance(name, GGUFTensorInfo) else self.info(name)
        raw = self.raw(info)
        if device is not None:
            raw = raw.to(device)
        if not info.is_quantized:  # already a typed tensor (float or integer): a plain cast
            return raw.to(dtype)
        return dequantize(raw, info.type_name, info.shape, dtype)

    def close(self) -> None:
        """Drop this object's reference to the map; views already handed out keep it alive."""
        self._mm = None


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Memory-map and validate a GGUF file; raises ``GGUFError`` naming the file and the problem."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise GGUFError(f"{path}: is a folder, not a GGUF file; fix: give the path of the .gguf file")
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise GGUFError(f"{path}: cannot open GGUF file: {e.strerror or e}") from e
    if size < 4:
        raise GGUFError(f"{path}: truncated GGUF file: {size} bytes, too small to hold the magic")
    # Copy-on-write keeps the array writable for torch.from_numpy without ever touching the file.
    mm = np.memmap(path, dtype=np.uint8, mode="c", shape=(size,))
    parser = _Parser(path, mm, size)
    return parser.parse()


class _Parser:
    def __init__(self, path: str, mm: np.ndarray, size: int):
        self.path = path
        self.mm = mm
        self.buf = memoryview(mm)
        self.size = size
        self.pos = 0

    def fail(self, msg: str) -> GGUFError:
        return GGUFError(f"{self.path}: {msg}")

    # -- primitive reads, each bounds-checked --------------------------------------------------------------

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"truncated file: {what} needs {n} bytes at offset {self.pos}, "
                f"but the file has only {self.size} bytes"
            )

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"length of {what}")
        self.need(n, what)
        data = self.buf[self.pos : self.pos + n].tobytes()
        self.pos += n
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} at offset {self.pos - n} is not valid UTF-8") from e

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype not in _VALUE_TYPES:
            raise self.fail(f"unknown metadata value type {vtype} for {what}")
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            return self.array(what, depth + 1)
        return self.unpack(_VALUE_TYPES[vtype][1], what)

    def array(self, what: str, depth: int) -> list[Any]:
        if depth > MAX_ARRAY_NESTING:
            raise self.fail(f"metadata array {what} is nested more than {MAX_ARRAY_NESTING} levels deep")
        etype = self.unpack("<I", f"element type of array {what}")
        if etype not in _VALUE_TYPES:
            raise self.fail(f"unknown array element type {etype} in metadata {what}")
        count = self.unpack("<Q", f"length of array {what}")
        remaining = self.size - self.pos
        if count * _MIN_VALUE_SIZE[etype] > remaining:
            raise self.fail(
                f"metadata array {what} claims {count} {_VALUE_TYPES[etype][0]} elements, "
                f"more than the {remaining} bytes left in the file can hold"
            )
        fmt = _VALUE_TYPES[etype][1]
        if fmt is not None:  # numeric: one vectorised read
            n = count * struct.calcsize(fmt)
            arr = np.frombuffer(self.buf, dtype=np.dtype(fmt), count=count, offset=self.pos)
            self.pos += n
            return arr.tolist()
        return [self.value(etype, f"{what}[{i}]", depth) for i in range(count)]

    # -- structure --------------------------------------------------------------------------------------------

    def parse(self) -> GGUFFile:
        magic = self.buf[:4].tobytes()
        if magic != GGUF_MAGIC:
            raise self.fail(f"not a GGUF file: bad magic {magic!r} (expected {GGUF_MAGIC!r})")
        self.pos = 4
        version = self.unpack("<I", "version")
        if version not in SUPPORTED_VERSIONS:
            if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
                raise self.fail("big-endian GGUF files are not supported")
            raise self.fail(
                f"unsupported GGUF version {version} (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})"
            )
        n_tensors = self.unpack("<Q", "tensor count")
        n_kv = self.unpack("<Q", "metadata count")
        remaining = self.size - _HEADER_SIZE
        if n_kv * _MIN_KV_SIZE + n_tensors * _MIN_TENSOR_INFO_SIZE > remaining:
            raise self.fail(
                f"header claims {n_tensors} tensors and {n_kv} metadata entries, more than the "
                f"{remaining} bytes after the header can hold (corrupt or truncated file)"
            )

        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = self.string(f"metadata key #{i}")
            if key in metadata:
                raise self.fail(f"duplicate metadata key {key!r}")
            vtype = self.unpack("<I", f"value type of metadata {key!r}")
            metadata[key] = self.value(vtype, repr(key))

        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise self.fail(f"general.alignment must be a positive power of two, got {alignment!r}")

        raw_infos = [self.tensor_info(i) for i in range(n_tensors)]
        data_offset = -(-self.pos // alignment) * alignment
        if n_tensors and data_offset > self.size:
            raise self.fail(f"truncated file: tensor data would start at {data_offset}, past the end")
        tensors = self.check_tensors(raw_infos, metadata, alignment, data_offset)
        return GGUFFile(self.path, version, alignment, data_offset, metadata, tensors, self.mm)

    def tensor_info(self, i: int) -> tuple[str, tuple[int, ...], int, int]:
        name = self.string(f"name of tensor #{i}")
        n_dims = self.unpack("<I", f"n_dims of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self.fail(f"tensor {name!r} has {n_dims} dimensions (supported: 1 to {MAX_DIMS})")
        self.need(8 * n_dims, f"dims of tensor {name!r}")
        dims = struct.unpack_from(f"<{n_dims}Q", self.buf, self.pos)
        self.pos += 8 * n_dims
        type_id = self.unpack("<I", f"type of tensor {name!r}")
        offset = self.unpack("<Q", f"data offset of tensor {name!r}")
        return name, tuple(reversed(dims)), type_id, offset

    def check_tensors(
        self,
        raw_infos: list[tuple[str, tuple[int, ...], int, int]],
        metadata: dict[str, Any],
        alignment: int,
        data_offset: int,
    ) -> list[GGUFTensorInfo]:
        infos: list[GGUFTensorInfo] = []
        seen: set[str] = set()
        for name, shape, type_id, rel_offset in raw_infos:
            if name in seen:
                raise self.fail(f"duplicate tensor name {name!r}")
            seen.add(name)
            try:
                type_name = qtype_name(type_id)
                block_size, type_size = block_info(type_name)
            except (ValueError, KeyError):
                raise self.fail(f"tensor {name!r} has unknown ggml type id {type_id}") from None
            # A dim no file of this size could fill (a zero elsewhere keeps the byte count at 0, but torch
            # cannot even describe a 2**63-long dim): corrupt.
            max_dim = self.size * block_size // type_size
            if any(d > max_dim for d in shape):
                raise self.fail(
                    f"tensor {name!r} has an impossible shape {shape} for {type_name} data: a dim above "
                    f"{max_dim} (what the file's {self.size} bytes could hold) (corrupt file)"
                )
            if shape[-1] % block_size:
                raise self.fail(
                    f"tensor {name!r}: byte size does not match shape {shape} x type {type_name}: "
                    f"row length {shape[-1]} is not a multiple of the block size {block_size}"
                )
            nbytes = math.prod(shape) // block_size * type_size
            if rel_offset % alignment:
                raise self.fail(
                    f"tensor {name!r} data offset {rel_offset} is misaligned (alignment {alignment})"
                )
            start = data_offset + rel_offset
            if start + nbytes > self.size:
                raise self.fail(
                    f"truncated file: tensor {name!r} ({type_name}, shape {shape}, {nbytes} bytes) at offset "
                    f"{start} extends past the end of the file ({self.size} bytes)"
                )
            logical = self.orig_shape(name, shape, metadata, max_dim)
            infos.append(
                GGUFTensorInfo(name, type_id, type_name, logical, shape, start, nbytes, block_size, type_size)
            )
        ordered = sorted(infos, key=lambda t: t.offset)
        for prev, cur in itertools.pairwise(ordered):
            if cur.offset < prev.offset + prev.nbytes:
                raise self.fail(
                    f"tensor data overlaps: {cur.name!r} starts at {cur.offset}, inside {prev.name!r} "
                    f"({prev.offset}..{prev.offset + prev.nbytes})"
                )
        # GGUF stores tensors back to back, each padded to the alignment.  A gap of a whole alignment or
        # more is data no tensor accounts for: a tensor whose type or shape was changed to a smaller one
        # (which would otherwise read the start of its old bytes as other values), or a dropped tensor.
        end = data_offset
        for info in ordered:
            if info.offset - end >= alignment:
                raise self.fail(
                    f"{info.offset - end} bytes before tensor {info.name!r} (at {info.offset}) belong to no "
                    f"tensor, more than the padding to the alignment {alignment} (corrupt file: a tensor's "
                    "type or shape does not match its data)"
                )
            end = max(end, info.offset + info.nbytes)
        if ordered and self.size - end >= alignment:
            raise self.fail(
                f"{self.size - end} bytes after the last tensor (which ends at {end}) belong to no tensor, "
                f"more than the padding to the alignment {alignment} (corrupt file: a tensor's type or "
                "shape does not match its data, or the tensor count is wrong)"
            )
        return infos

    def orig_shape(
        self, name: str, shape: tuple[int, ...], metadata: dict[str, Any], max_dim: int
    ) -> tuple[int, ...]:
        orig = metadata.get(ORIG_SHAPE_PREFIX + name)
        if orig is None:
            return shape
        if (
            not isinstance(orig, list)
            or not 1 <= len(orig) <= MAX_DIMS
            or not all(type(d) is int and 0 <= d <= max_dim for d in orig)
            or math.prod(orig) != math.prod(shape)
        ):
            raise self.fail(
                f"metadata {ORIG_SHAPE_PREFIX + name} = {orig!r} is not a valid shape for tensor {name!r} "
                f"stored as {shape}"
            )
        return tuple(orig)
