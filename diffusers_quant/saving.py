"""Save a quantized component and recognise it again from its bytes at the start of a load.

A saved component is an ordinary model folder (config + one safetensors file under the library's usual
name) whose safetensors header metadata carries a ``diffusers_quant`` entry: the quantization map
(layer name -> backend and layer config).  Reading a safetensors header reads no tensor, so a load
knows it is pre-quantized before any weight is touched, and loads it with no dataset and no
requantization.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .components import is_transformers_class
from .errors import QuantError
from .streaming import build_empty, find_safetensors

META_KEY = "diffusers_quant"
FORMAT_VERSION = 1


def _weights_name(model: torch.nn.Module) -> str:
    stem = "model" if is_transformers_class(type(model)) else "diffusion_pytorch_model"
    return f"{stem}.safetensors"


def quantization_map(model: torch.nn.Module) -> dict[str, dict]:
    """Layer name -> {backend, config} for every saveable quantized layer; refuses unsaveable ones."""
    from .backends import backend_of

    layers: dict[str, dict] = {}
    for name, module in model.named_modules():
        backend = backend_of(module)
        if backend is None:
            continue
        if not backend.saves:
            raise QuantError(
                f"cannot save layer {name!r} ({type(module).__name__}): saving is supported for nncf-quantized "
                "components so far; fix: quantize with an nncf spec, or keep the original checkpoint and "
                "quantize it on load"
            )
        layers[name] = {"backend": backend.name, "config": backend.layer_config(module)}
    return layers


def save_quantized(model: torch.nn.Module, folder: str | os.PathLike) -> Path:
    """Write ``model`` (with its quantized layers) to a new folder, atomically."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise QuantError(f"{folder} already exists and is not empty; fix: save into a new folder")
    layers = quantization_map(model)
    if not layers:
        raise QuantError(
            "this model has no quantized layers to save; fix: load it with a plan first, "
            "or save it with the library's own save_pretrained"
        )
    tied = set(getattr(model, "all_tied_weights_keys", None) or ())
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    meta = {"version": FORMAT_VERSION, "dtype": str(dtype).replace("torch.", ""), "layers": layers}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        from safetensors.torch import save_file

        if is_transformers_class(type(model)):
            model.config.save_pretrained(tmp)
        else:
            model.save_config(tmp)
        save_file(
            {k: v.cpu() for k, v in state.items()},
            str(tmp / _weights_name(model)),
            metadata={"format": "pt", META_KEY: json.dumps(meta)},
        )
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_quant_metadata(folder: str | os.PathLike | None, variant: str | None = None) -> dict | None:
    """The quantization map from a folder's safetensors header, or None if it is not a saved component."""
    if folder is None:
        return None
    files = find_safetensors(folder, variant)
    if not files or len(files) != 1:
        return None
    from safetensors import safe_open

    try:
        with safe_open(files[0], framework="pt") as f:
            text = (f.metadata() or {}).get(META_KEY)
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise QuantError(
            f"{files[0]}: not a readable safetensors file ({exc}); fix: re-save or re-download it"
        ) from None
    if text is None:
        return None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        raise QuantError(
            f"{files[0]}: its diffusers_quant header is not valid JSON; fix: save it again"
        ) from None
    if meta.get("version") != FORMAT_VERSION:
        raise QuantError(
            f"{files[0]}: saved with diffusers_quant format {meta.get('version')!r}; this version "
            f"reads format {FORMAT_VERSION}; fix: upgrade diffusers-quant"
        )
    meta["file"] = str(files[0])
    return meta


def load_prequantized(
    cls: type,
    folder: str | os.PathLike,
    meta: dict,
    device: torch.device | str,
    compute_dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """Rebuild a saved quantized component: empty layers from the map, then the tensors assigned in."""
    from safetensors import safe_open

    from .backends import get_backend
    from .components import get_submodule_parent

    dtype = getattr(torch, meta.get("dtype", "float32"))
    model = build_empty(cls, folder)
    for name, entry in meta["layers"].items():
        backend = get_backend(entry["backend"])
        parent, attr = get_submodule_parent(model, name)
        setattr(parent, attr, backend.empty_layer(entry["config"], dtype=dtype, compute_dtype=compute_dtype))
    try:
        with safe_open(meta["file"], framework="pt", device="cpu") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise QuantError(
            f"{meta['file']}: could not read its tensors ({exc}); the file may be truncated; "
            "fix: save it again"
        ) from None
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise QuantError(
            f"{meta['file']}: tensors {result.unexpected_keys[:3]} do not belong to {cls.__name__}; "
            "fix: load it with the class it was saved from"
        )
    if hasattr(model, "tie_weights") and getattr(model, "all_tied_weights_keys", None):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise QuantError(
            f"{meta['file']}: no tensor for {missing[:3]}; the file is incomplete; fix: save it again"
        )
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model
