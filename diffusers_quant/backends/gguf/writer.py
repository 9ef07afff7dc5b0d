"""Write a state dict as a GGUF file, quantized, atomically and one tensor at a time.

The types are those gguf-py can quantize plus the torch ports of ``quantize.QUANTIZERS`` (which add
Q4_K / Q5_K / Q6_K, ggml's reference quantizers); ``quantize.to_ggml`` encodes every tensor.

Which tensors are quantized: floating tensors with 2+ dims, more than ``SMALL_TENSOR_NUMEL`` elements and a
last dim that is a whole number of ``qtype`` blocks, unless ``keep_full_precision`` says otherwise (the same
rule ComfyUI-GGUF's converter uses).  Everything else is stored losslessly: BF16 and F16 sources keep their
dtype, other floats become F32 (or ``float_type`` if given), integer tensors keep their integer type.
Tensors with more than 4 dims (ggml's limit) are stored with leading dims merged and their real shape in
ComfyUI's ``comfy.gguf.orig_shape.<name>`` metadata, which ``reader.read_gguf`` applies.

The file is written to a temporary file next to ``path`` and moved over it with ``os.replace`` only once
complete, so a failure never leaves a partial file and never clobbers an existing one.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import gguf
import gguf.quants
import numpy as np
import torch

from ...files import replacing
from .dequant import block_info, packed_nbytes
from .quantize import QUANTIZERS, to_ggml
from .reader import ORIG_SHAPE_PREFIX

CONFIG_KEY = "diffusers_quant.config"
QTYPE_KEY = "diffusers_quant.qtype"
FORMAT_KEY = "diffusers_quant.format_version"
FORMAT_VERSION = 1
# Tensors this small gain nothing from quantization and are often precision-sensitive (ComfyUI's threshold).
SMALL_TENSOR_NUMEL = 1024
_GGML_MAX_DIMS = 4

_FLOAT_TYPES = ("F32", "F16", "BF16")
_SOURCE_FLOAT_TYPE = {torch.bfloat16: "BF16", torch.float16: "F16"}
_INT_TYPES = {torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64"}


@functools.cache
def _gguf_py_qtypes() -> tuple[str, ...]:
    """Every ggml type gguf-py can quantize to, found by trying (its table grows between releases)."""
    found = []
    for t in gguf.GGMLQuantizationType:
        block_size, _ = gguf.GGML_QUANT_SIZES[t]
        probe = np.linspace(-1.0, 1.0, max(block_size, 1), dtype=np.float32).reshape(1, -1)
        try:
            gguf.quants.quantize(probe, t)
        except NotImplementedError:
            continue
        found.append(t.name)
    return tuple(found)


GGUF_PY_QTYPES: tuple[str, ...] = _gguf_py_qtypes()
# gguf-py's types and the torch ports (the K quants gguf-py lacks), in ggml's type order
WRITABLE_QTYPES: tuple[str, ...] = tuple(
    t.name for t in gguf.GGMLQuantizationType if t.name in GGUF_PY_QTYPES or t.name in QUANTIZERS
)


def write_gguf(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    qtype: str,
    *,
    arch: str,
    config: Mapping[str, Any] | None = None,
    keep_full_precision: Callable[[str, torch.Tensor], bool] | None = None,
    float_type: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Write ``state_dict`` to ``path`` as GGUF; returns {tensor name: ggml type written}.

    ``config`` (the model's config dict) is stored as JSON under ``diffusers_quant.config``; ``metadata``
    adds extra str/int/float/bool/list keys.  ``float_type`` (F32/F16/BF16) overrides the lossless type
    chosen for tensors that are not quantized.
    """
    path = os.fspath(path)
    qtype = _check_type(qtype, WRITABLE_QTYPES, "qtype")
    if float_type is not None:
        float_type = _check_type(float_type, _FLOAT_TYPES, "float_type")
    if not arch or not isinstance(arch, str):
        raise ValueError("write_gguf needs a non-empty arch string (stored as general.architecture)")
    config_json = _config_json(config) if config is not None else None

    plan = [_plan_tensor(name, t, qtype, keep_full_precision, float_type) for name, t in state_dict.items()]

    with replacing(path) as tmp_path:
        writer = gguf.GGUFWriter(tmp_path, arch)
        try:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            writer.add_uint32(FORMAT_KEY, FORMAT_VERSION)
            writer.add_string(QTYPE_KEY, qtype)
            if config_json is not None:
                writer.add_string(CONFIG_KEY, config_json)
            for key, value in (metadata or {}).items():
                _add_metadata(writer, key, value)
            for name, _, ttype, stored_shape, orig_shape in plan:
                if orig_shape is not None:
                    writer.add_key_value(
                        ORIG_SHAPE_PREFIX + name,
                        list(orig_shape),
                        gguf.GGUFValueType.ARRAY,
                        gguf.GGUFValueType.INT32,
                    )
                nbytes = packed_nbytes(stored_shape, ttype)
                # tensor_dtype only matters when it is uint8 (then the shape would be read as bytes)
                writer.add_tensor_info(
                    name, stored_shape, np.dtype(np.float32), nbytes, raw_dtype=_ggml_type(ttype)
                )

            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for (
                name,
                tensor,
                ttype,
                stored_shape,
                _,
            ) in plan:  # streamed: one encoded tensor in memory at a time
                writer.write_tensor_data(_encode(name, tensor, ttype, stored_shape))
            writer.flush()
            assert writer.fout is not None
            for f in writer.fout:
                os.fsync(f.fileno())
        finally:
            writer.close()
    return {name: ttype for name, _, ttype, _, _ in plan}


def _check_type(value: str, allowed: tuple[str, ...], what: str) -> str:
    name = str(value).upper()
    if name not in allowed:
        raise ValueError(f"unsupported GGUF {what} {value!r}; expected one of {', '.join(allowed)}")
    return name


def _ggml_type(name: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[name]


def _plan_tensor(
    name: str,
    tensor: torch.Tensor,
    qtype: str,
    keep: Callable[[str, torch.Tensor], bool] | None,
    float_type: str | None,
) -> tuple[str, torch.Tensor, str, tuple[int, ...], tuple[int, ...] | None]:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"state_dict[{name!r}] is a {type(tensor).__name__}, not a torch.Tensor")
    if tensor.device.type == "meta":
        raise ValueError(f"tensor {name!r} is on the meta device and has no data to write")
    shape = tuple(tensor.shape)
    if not shape:
        raise ValueError(
            f"tensor {name!r} is 0-dimensional; GGUF needs at least one dim (reshape it to (1,))"
        )

    if tensor.dtype in _INT_TYPES:
        ttype = _INT_TYPES[tensor.dtype]
    elif not tensor.is_floating_point():
        raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which GGUF cannot store")
    elif _quantizable(name, tensor, qtype, keep):
        ttype = qtype
    else:
        ttype = float_type or _SOURCE_FLOAT_TYPE.get(tensor.dtype, "F32")

    stored, orig = shape, None
    if len(shape) > _GGML_MAX_DIMS:  # merge leading dims, keep the last ones so the row length is unchanged
        stored, orig = (math.prod(shape[: -(_GGML_MAX_DIMS - 1)]), *shape[-(_GGML_MAX_DIMS - 1) :]), shape
    return name, tensor, ttype, stored, orig


def _quantizable(
    name: str, tensor: torch.Tensor, qtype: str, keep: Callable[[str, torch.Tensor], bool] | None
) -> bool:
    block_size, _ = block_info(qtype)
    if tensor.dim() < 2 or tensor.numel() <= SMALL_TENSOR_NUMEL or tensor.shape[-1] % block_size:
        return False
    return not (keep is not None and keep(name, tensor))


def _encode(name: str, tensor: torch.Tensor, ttype: str, stored_shape: tuple[int, ...]) -> np.ndarray:
    """The tensor's bytes in ``ttype`` as a numpy array (through ``to_ggml``: torch or gguf-py)."""
    t = tensor.detach().to("cpu").contiguous().reshape(stored_shape)
    if ttype in ("I8", "I16", "I32", "I64"):
        return t.numpy()
    if _SOURCE_FLOAT_TYPE.get(t.dtype) == ttype:  # same 16-bit type: copy the bits, no rounding
        return t.view(torch.int16).numpy()
    try:
        return to_ggml(t, ttype).numpy()
    except Exception as e:
        raise ValueError(
            f"quantizing tensor {name!r} (shape {tuple(tensor.shape)}) to {ttype} failed: {e}"
        ) from e


def _config_json(config: Mapping[str, Any]) -> str:
    def default(obj: Any) -> Any:
        if isinstance(obj, torch.dtype):
            return str(obj).removeprefix("torch.")
        if isinstance(obj, (np.generic, np.ndarray)):
            return obj.tolist()
        if isinstance(obj, (set, frozenset)):
            return sorted(obj)
        raise TypeError(f"model config value {obj!r} of type {type(obj).__name__} is not JSON serializable")

    return json.dumps(dict(config), default=default, sort_keys=True)


def _add_metadata(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    vt = gguf.GGUFValueType
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_key_value(key, value, vt.INT64)
    elif isinstance(value, float):
        writer.add_key_value(key, value, vt.FLOAT64)
    elif isinstance(value, str):
        writer.add_key_value(key, value, vt.STRING)  # add_string would silently drop ""
    elif isinstance(value, (list, tuple)) and value:
        writer.add_key_value(key, list(value), vt.ARRAY)
    else:
        raise ValueError(
            f"metadata {key!r}: unsupported value {value!r} (use str, int, float, bool or a list)"
        )
