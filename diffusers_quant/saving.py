"""Saved quantized components: written by the libraries' own ``save_pretrained`` (the model carries their
quantizer and config, see ``contract``), recognised again from ``config.json`` and the safetensors headers at
the start of a load, and rebuilt layer by layer without requantizing.

Layouts: bitsandbytes and quanto folders are the libraries' own (``quantization_config`` with
``quant_method`` ``bitsandbytes`` / ``quanto``; bnb's ``weight.absmax`` / ``weight.quant_state.*`` / ``SCB``
keys, quanto's ``weight._data`` / ``weight._scale`` keys), so plain diffusers and transformers load them and
this package loads theirs. NNCF and GGUF layers (and mixes) are saved with ``quant_method`` ``diffusers_quant``
and the layer map in the config: plain loaders refuse that by name, so a silent wrong reload cannot happen.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .components import fp32_modules, get_submodule_parent
from .contract import OURS, attach, quantized_layers
from .errors import QuantError
from .files import normal_mode, read_json_object
from .streaming import build_empty, find_safetensors, header_keys

NATIVE_METHODS = {"bitsandbytes": "bnb", "quanto": "quanto"}


@dataclass
class SavedComponent:
    """What a saved folder holds, from its config and safetensors headers (no tensor read)."""

    folder: Path
    method: str
    files: list[Path]
    layers: dict[str, dict]  # layer name -> {"backend": name, "config": layer config or None}
    keys: dict[str, Path]  # every tensor name -> the file holding it


def save_quantized(model: torch.nn.Module, folder: str | os.PathLike, **save_kwargs) -> Path:
    """Write a quantized ``model`` to a new folder with the library's own ``save_pretrained``, atomically:
    written under a temporary name beside the target, then renamed."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise QuantError(f"{folder} already exists and is not an empty folder; fix: save into a new folder")
    if not quantized_layers(model):
        raise QuantError(
            "this model has no quantized layers to save; fix: load it with a plan first, "
            "or save it with the library's own save_pretrained"
        )
    if getattr(model, "hf_quantizer", None) is None:
        attach(model)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(tmp, **save_kwargs)
        _normal_permissions(tmp)
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _normal_permissions(folder: Path) -> None:
    # mkdtemp makes the folder 0700 and safetensors writes 0600; a saved model is an ordinary folder of
    # ordinary files (the umask decides, as for mkdir and open)
    os.chmod(folder, normal_mode(directory=True))
    for path in folder.rglob("*"):
        os.chmod(path, normal_mode(directory=path.is_dir()))


def _config_json(folder: Path) -> dict | None:
    return read_json_object(folder / "config.json", "JSON config")


def _saved_method(qconfig: dict) -> str:
    """Who saved a folder with this ``quantization_config``: this package, a library named in NATIVE_METHODS,
    or another quantizer (its ``quant_method``; "unknown" without one)."""
    if qconfig.get("load_in_4bit") or qconfig.get("load_in_8bit"):
        return "bitsandbytes"
    if qconfig.get("format") == OURS:
        return OURS
    method = qconfig.get("quant_method")
    return str(method) if method else "unknown"


def foreign_method(folder: str | os.PathLike | None) -> str | None:
    """The ``quant_method`` of a folder saved quantized by another library (torchao, sdnq, modelopt ...),
    which diffusers / transformers load through that library's own quantizer; None for any other folder."""
    if folder is None or not os.path.isdir(folder):
        return None
    qconfig = (_config_json(Path(folder)) or {}).get("quantization_config")
    if not isinstance(qconfig, dict):
        return None
    method = _saved_method(qconfig)
    return None if method == OURS or method in NATIVE_METHODS else method


def read_saved(folder: str | os.PathLike | None, variant: str | None = None) -> SavedComponent | None:
    """The saved quantized component in ``folder``, or None if it holds a plain (or foreign) checkpoint."""
    if folder is None or not os.path.isdir(folder):
        return None
    folder = Path(folder)
    config = _config_json(folder)
    qconfig = (config or {}).get("quantization_config")
    if not isinstance(qconfig, dict):
        return None
    method = _saved_method(qconfig)
    if method != OURS and method not in NATIVE_METHODS:
        return None  # another library's format (torchao, sdnq ...): its own loader reads it
    files = find_safetensors(folder, variant)
    if not files:
        raise QuantError(
            f"{folder}: its config says it is quantized ({method}) but it holds no safetensors weights; "
            "fix: save it again"
        )
    keys = header_keys(files)
    if method == OURS:
        layers = qconfig.get("layers")
        if not isinstance(layers, dict) or not layers:
            raise QuantError(
                f"{folder}/config.json: its diffusers_quant layer map is missing; fix: save it again"
            )
        _check_layer_map(folder, layers)
    else:
        from .backends import get_backend

        backend = NATIVE_METHODS[method]
        layers = {
            name: {"backend": backend, "config": None} for name in get_backend(backend).saved_layers(keys)
        }
    return SavedComponent(folder, method, files, layers, keys)


def _check_layer_map(folder: Path, layers: dict) -> None:
    """Each entry names a known backend and a config object (or none): a damaged map is refused here,
    not met as a TypeError half way through the load."""
    from .backends import backend_names

    for name, entry in layers.items():
        backend = entry.get("backend") if isinstance(entry, dict) else None
        if backend not in backend_names() or not isinstance(entry.get("config"), (dict, type(None))):
            raise QuantError(
                f"{folder}/config.json: damaged layer map entry {name!r} ({str(entry)[:80]}); expected "
                f"{{'backend': one of {', '.join(backend_names())}, 'config': {{...}} or null}}; fix: save it again"
            )


def _layer_of(key: str, layers: dict) -> tuple[str, str] | None:
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in layers:
            return prefix, ".".join(parts[i:])
    return None


def load_saved_component(
    cls: type,
    saved: SavedComponent,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """Rebuild a saved quantized component: the model on the meta device, each quantized layer from its own
    tensors, every other tensor placed at ``dtype`` (float32 if none, as diffusers loads)."""
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    device = torch.device(device)
    model = build_empty(cls, saved.folder)
    dtype = dtype or torch.float32
    keep_fp32 = fp32_modules(model, dtype)
    expected = set(model.state_dict())
    pending: dict[str, dict[str, torch.Tensor]] = {}
    owners = {key: _layer_of(key, saved.layers) for key in saved.keys}  # key -> (layer, name in it) or None
    wanted = {name: set() for name in saved.layers}
    for owner in filter(None, owners.values()):
        wanted[owner[0]].add(owner[1])
    for path in saved.files:
        try:
            handle = safe_open(path, framework="pt", device="cpu")
        except Exception as exc:
            raise QuantError(f"{path}: could not read its tensors ({exc}); fix: save it again") from None
        with handle as f:
            for key in f.keys():
                owner = owners.get(key)
                try:
                    # a copy: safetensors' tensors can sit at any byte offset, and CPU matmuls round
                    # differently on unaligned data (the reload must compute what the saved model did)
                    tensor = f.get_tensor(key).clone()
                except Exception as exc:
                    raise QuantError(
                        f"{path}: tensor {key!r} cannot be read ({exc}); the file may be truncated; fix: save it again"
                    ) from None
                if owner is None:
                    if key not in expected:
                        raise QuantError(
                            f"{path}: tensor {key!r} does not belong to {cls.__name__}; fix: load it with "
                            "the class it was saved from"
                        )
                    value_dtype = None
                    if tensor.is_floating_point():
                        value_dtype = torch.float32 if keep_fp32.intersection(key.split(".")) else dtype
                    set_module_tensor_to_device(model, key, device, value=tensor, dtype=value_dtype)
                    continue
                name, rest = owner
                pending.setdefault(name, {})[rest] = tensor
                if set(pending[name]) == wanted[name]:
                    _place_layer(model, name, saved, pending.pop(name), dtype, device, path)
    if pending or any(not wanted[n] for n in wanted):
        missing = sorted(set(pending) | {n for n in wanted if not wanted[n]})
        raise QuantError(f"{saved.folder}: no complete tensors for layers {missing[:3]}; fix: save it again")
    if hasattr(model, "tie_weights") and getattr(model, "all_tied_weights_keys", None):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise QuantError(
            f"{saved.folder}: no tensor for {still_meta[:3]}; the checkpoint is incomplete; fix: save it again"
        )
    model.to(device)  # non-persistent buffers were built on the CPU
    model.eval()
    model.requires_grad_(False)
    attach(model, dtype)
    return model


def _place_layer(model, name, saved, tensors, dtype, device, path) -> None:
    from .backends import get_backend

    entry = saved.layers[name]
    try:
        placeholder = model.get_submodule(name)
    except AttributeError:
        raise QuantError(
            f"{path}: layer {name!r} has no place in {type(model).__name__}; fix: load it with the class it was saved from"
        ) from None
    config = entry.get("config") or {
        "in_features": placeholder.in_features,
        "out_features": placeholder.out_features,
        "bias": placeholder.bias is not None,
    }
    compute_dtype = dtype if dtype != torch.float32 else None
    if "bias" in tensors and tensors["bias"].is_floating_point():
        tensors["bias"] = tensors["bias"].to(dtype)  # the load's dtype, as every other float tensor
    try:
        layer = get_backend(entry["backend"]).layer_from_state(tensors, config, dtype, compute_dtype, device)
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise QuantError(f"{path}: layer {name!r} cannot be rebuilt ({exc}); fix: save it again") from None
    parent, attr = get_submodule_parent(model, name)
    setattr(parent, attr, layer)
