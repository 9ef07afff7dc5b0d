"""Build a diffusers model from a GGUF file: packed weights stay packed (zero-copy views of the memory map
on the CPU, packed bytes on the GPU) and are dequantized per forward by ``GGUFLinear``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from ...errors import QuantError
from .keys import detect_key_format, to_diffusers_keys
from .nn import GGUFLinear, GGUFWeight
from .reader import GGUFError, read_gguf
from .writer import CONFIG_KEY

# Prefixes of whole-pipeline checkpoints (SD/SDXL "all-in-one" files): text encoders and VAE included.
ALL_IN_ONE_PREFIXES = (
    "first_stage_model.",
    "cond_stage_model.",
    "conditioner.",
    "text_encoders.",
    "vae.",
    "text_encoder.",
    "text_model.",
)


@dataclass
class GGUFLoad:
    model: torch.nn.Module
    qtype: str  # the most common quantized type in the file
    logical_bytes: int


def _config(file, cls: type, config, subfolder: str | None) -> dict:
    if config is not None:
        if isinstance(config, dict):
            return config
        return dict(cls.load_config(config, subfolder=subfolder) if subfolder else cls.load_config(config))
    embedded = file.metadata.get(CONFIG_KEY)
    if embedded:
        return json.loads(embedded)
    raise QuantError(
        f"{file.path}: this GGUF file carries no model config; fix: pass config=<folder with the "
        f"model's config.json> (and subfolder=...) to from_single_file"
    )


def load_gguf_model(
    cls: type,
    path,
    *,
    config=None,
    subfolder: str | None = None,
    dtype: torch.dtype | None,
    device: torch.device | str,
    compute_dtype: torch.dtype | None = None,
) -> GGUFLoad:
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    try:
        file = read_gguf(path)
    except GGUFError as exc:
        raise QuantError(str(exc)) from None
    names = file.names()
    mixed = sorted({n.split(".")[0] for n in names if n.startswith(ALL_IN_ONE_PREFIXES)})
    if mixed:
        raise QuantError(
            f"{path}: an all-in-one GGUF (it also holds {', '.join(mixed)}): GGUF is for the transformer/UNet "
            "only, text encoders and VAE need their own formats; fix: use a transformer-only GGUF and load the "
            "rest from a diffusers folder (e.g. from_pretrained(folder, transformer=<gguf model>))"
        )
    cfg = _config(file, cls, config, subfolder)
    weights = {n: GGUFWeight.from_gguf(file, n) for n in names}
    try:
        converted = to_diffusers_keys(weights, detect_key_format(names))
    except Exception as exc:  # KeyFormatError and friends: the naming is not one we can map
        raise QuantError(f"{path}: {exc}") from None
    with init_empty_weights():
        model = cls.from_config(cfg)
    dtype = dtype or torch.float32  # the caller's dtype; with none, float32, as diffusers loads
    linears: dict[str, GGUFWeight] = {}
    expected = model.state_dict()
    for key, weight in converted.items():
        if key not in expected:
            raise QuantError(
                f"{path}: tensor {key!r} has no place in {cls.__name__}; fix: pass the config this "
                "file was made from (config=...)"
            )
        want = tuple(expected[key].shape)
        if tuple(weight.shape) != want:
            raise QuantError(
                f"{path}: tensor {key!r} has shape {tuple(weight.shape)} in the file but "
                f"{cls.__name__} expects {want}; fix: pass the config this file was made from"
            )
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name)
        if weight.is_quantized and attr == "weight" and type(module) is torch.nn.Linear:
            linears[module_name] = weight
        else:  # float tensors (and quantized non-Linear ones) are placed dequantized
            value = weight.dequantize(torch.float32)
            set_module_tensor_to_device(model, key, device, value=value, dtype=dtype)
    for name, weight in linears.items():
        meta = model.get_submodule(name)
        bias = meta.bias if meta.bias is not None and meta.bias.device.type != "meta" else None
        layer = GGUFLinear.from_weight(weight.to(device), bias=bias, compute_dtype=compute_dtype or dtype)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise QuantError(
            f"{path}: no tensor for {len(missing)} parameter(s) of {cls.__name__}, e.g. "
            f"{missing[:3]}; fix: pass the config this file was made from"
        )
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    types = [w.qtype for w in linears.values()]
    qtype = max(set(types), key=types.count) if types else "F16"
    # What the same tensors take unquantized at the load dtype: the "before" of the report.
    logical = sum(math.prod(w.shape) for w in weights.values()) * torch.empty((), dtype=dtype).element_size()
    return GGUFLoad(model, qtype, logical)
