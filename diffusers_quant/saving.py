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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .components import fp32_modules, get_submodule_parent
from .contract import OURS, attach, quantized_layers
from .errors import QuantError
from .files import normal_mode, read_json_object
from .spec import Spec
from .streaming import build_empty, find_safetensors, header_tensors

NATIVE_METHODS = {"bitsandbytes": "bnb", "quanto": "quanto"}


@dataclass
class SavedComponent:
    """What a saved folder holds, from its config and safetensors headers (no tensor read)."""

    folder: Path
    method: str
    files: list[Path]
    layers: dict[str, dict]  # layer name -> {"backend": name, "config": layer config or None}
    keys: dict[str, Path]  # every tensor name -> the file holding it
    # every tensor name -> (its file, safetensors dtype, shape), from the headers
    tensors: dict[str, tuple[Path, str, tuple[int, ...]]] = field(default_factory=dict)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # layer -> (in, out) its tensors say


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


# quanto's weights names in diffusers' / transformers' QuantoConfig -> ours
_QUANTO_WEIGHTS = {"int8": "qint8", "int4": "qint4", "int2": "qint2", "float8": "qfloat8"}


def saved_specs(folder: str | os.PathLike | None) -> tuple[Spec, ...]:
    """The formats a folder saved quantized holds, from its config.json alone (no weight file opened): what
    the offload rules check before such a folder is loaded. Empty for a plain or foreign folder."""
    if folder is None or not os.path.isdir(folder):
        return ()
    qconfig = _quantization_config(Path(folder))
    if qconfig is None:
        return ()
    method = _saved_method(qconfig)
    names: set[str] = set()
    if method == OURS and isinstance(qconfig.get("layers"), dict):
        for entry in qconfig["layers"].values():
            config = entry.get("config") if isinstance(entry, dict) else None
            if isinstance(entry, dict) and isinstance(config, dict) and isinstance(config.get("qtype"), str):
                names.add(f"{entry.get('backend')}:{config['qtype'].lower()}")
    elif method == "bitsandbytes":
        names.add(
            "bnb:int8" if qconfig.get("load_in_8bit") else f"bnb:{qconfig.get('bnb_4bit_quant_type', 'nf4')}"
        )
    elif method == "quanto":
        names.add(
            f"quanto:{_QUANTO_WEIGHTS.get(str(qconfig.get('weights_dtype', qconfig.get('weights'))), 'qint8')}"
        )
    specs = []
    for name in sorted(names):
        try:
            specs.append(Spec.parse(name))
        except QuantError:
            continue  # a damaged map: loading the folder refuses it, naming the file
    return tuple(specs)


def read_saved(folder: str | os.PathLike | None, variant: str | None = None) -> SavedComponent | None:
    """The saved quantized component in ``folder``, or None if it holds a plain (or foreign) checkpoint."""
    if folder is None or not os.path.isdir(folder):
        return None
    folder = Path(folder)
    qconfig = _quantization_config(folder)
    if qconfig is None:
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
    tensors = header_tensors(files)
    keys = {key: path for key, (path, _, _) in tensors.items()}
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
    saved = SavedComponent(folder, method, files, layers, keys, tensors)
    saved.sizes = check_saved_tensors(saved)
    return saved


def _quantization_config(folder: Path) -> dict | None:
    """The folder's ``quantization_config`` (None when it has none); one that is not a JSON object, or
    names its ``quant_method`` with anything but a string, is refused here, before any weight is read."""
    qconfig = (_config_json(folder) or {}).get("quantization_config")
    if qconfig is None:
        return None
    where = folder / "config.json"
    if not isinstance(qconfig, dict):
        raise QuantError(
            f"{where}: damaged quantization_config (a JSON {type(qconfig).__name__}, not an object); fix: "
            "save the model again, or remove quantization_config if the weights are not quantized"
        )
    method = qconfig.get("quant_method")
    if method is not None and not isinstance(method, str):
        raise QuantError(
            f"{where}: damaged quantization_config (quant_method is {str(method)[:40]!r}, not a name); fix: "
            "save the model again"
        )
    if method is None and _saved_method(qconfig) == "unknown":
        raise QuantError(
            f"{where}: its quantization_config names no quant_method (keys: {', '.join(map(str, qconfig))[:120]}), "
            "so no library can read the weights; fix: save the model again"
        )
    return qconfig


def _check_layer_map(folder: Path, layers: dict) -> None:
    """Each entry names a known backend and a config object (or none): a damaged map is refused here,
    not met as a TypeError half way through the load."""
    from .backends import backend_names

    for name, entry in layers.items():
        backend = entry.get("backend") if isinstance(entry, dict) else None
        if (
            not name
            or backend not in backend_names()
            or not isinstance(entry.get("config"), (dict, type(None)))
            or set(entry) - {"backend", "config"}
        ):
            raise QuantError(
                f"{folder}/config.json: damaged layer map entry {name!r} ({str(entry)[:80]}); expected "
                f"{{'backend': one of {', '.join(backend_names())}, 'config': {{...}} or null}}; fix: save it again"
            )


# safetensors' dtype names -> torch's
_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool",
}  # fmt: skip
_FLOATS = ("F64", "F32", "F16", "BF16")


def check_saved_tensors(saved: SavedComponent) -> dict[str, tuple[int, int]]:
    """The schema check of a saved folder, from its layer map and headers alone (no tensor read): each
    layer's tensors are the names, shapes and dtypes its backend's layer holds for the map's config (or,
    for the libraries' own layouts, their layout's). Returns each layer's (in, out) features."""
    by_layer: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {name: {} for name in saved.layers}
    for key, (_, dtype, shape) in saved.tensors.items():
        owner = _layer_of(key, saved.layers)
        if owner is not None:
            by_layer[owner[0]][owner[1]] = (dtype, shape)
    sizes = {}
    for name, entry in saved.layers.items():
        tensors = by_layer[name]
        if not tensors:
            raise QuantError(
                f"{saved.folder}/config.json: its layer map names {name!r}, but no weight file holds a tensor "
                "of it; fix: save it again"
            )
        where = saved.tensors[f"{name}.{next(iter(tensors))}"][0]
        if entry["config"] is not None:
            problem, size = _mapped_layer_problem(entry["backend"], entry["config"], tensors)
        else:
            problem, size = _LAYOUTS[entry["backend"]](tensors)
        if problem:
            described = (
                f"its {entry['backend']} entry in the layer map of {saved.folder}/config.json"
                if saved.method == OURS
                else f"{saved.method}'s saved layout"
            )
            raise QuantError(
                f"{where}: layer {name!r} does not match {described} ({problem}); fix: save it again"
            )
        sizes[name] = size
    return sizes


def _mapped_layer_problem(backend: str, config: dict, tensors: dict):
    """A layer saved with its config in the map: the backend's own empty layer for that config says which
    tensors it holds."""
    from .backends import get_backend

    try:
        layer = get_backend(backend).empty_layer(config, dtype=torch.float32, compute_dtype=None)
        expected = {k: v for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
        size = (int(layer.in_features), int(layer.out_features))
    except Exception as exc:  # the backend's own check of an untrusted config, whatever it raises
        return f"its config {str(config)[:120]} is not a {backend} layer ({type(exc).__name__}: {exc})", None
    if set(expected) != set(tensors):
        return f"tensors {sorted(tensors)}, its config needs {sorted(expected)}", size
    for key, value in expected.items():
        dtype, shape = tensors[key]
        if shape != tuple(value.shape):
            return f"{key} has shape {list(shape)}, its config needs {list(value.shape)}", size
        if value.is_floating_point() != (dtype in _FLOATS) or (
            not value.is_floating_point() and _DTYPES.get(dtype) != str(value.dtype).removeprefix("torch.")
        ):
            return f"{key} is {dtype}, its config needs {str(value.dtype).removeprefix('torch.')}", size
    return None, size


def _shape(tensors, key, dims: int | None = None):
    """The shape of ``key`` (None when absent, or when it has not ``dims`` dimensions)."""
    if key not in tensors:
        return None
    shape = tensors[key][1]
    return shape if dims is None or len(shape) == dims else None


def _extra(tensors, allowed) -> str | None:
    unknown = sorted(set(tensors) - set(allowed))
    return f"tensors {unknown} are not in this layout" if unknown else None


def _quanto_layout(tensors):
    """optimum-quanto's ``weight._data`` (8-bit, [out, in]) or packed ``weight._data._data`` (2 / 4-bit,
    [groups / (8 / bits), group]) with ``weight._scale`` (and ``._shift``) of one row per output row / group."""
    allowed = ("weight._data", "weight._data._data", "weight._scale", "weight._shift", "bias", "input_scale",
               "output_scale")  # fmt: skip
    problem = _extra(tensors, allowed)
    if problem:
        return problem, None
    scale = _shape(tensors, "weight._scale", 2)
    if scale is None or scale[1] != 1:
        return "weight._scale must be [rows, 1]", None
    if "weight._data._data" in tensors:
        packed = _shape(tensors, "weight._data._data", 2)
        shift = _shape(tensors, "weight._shift", 2)
        if packed is None or tensors["weight._data._data"][0] != "U8" or "weight._data" in tensors:
            return "packed weight._data._data must be one uint8 [rows, group] tensor", None
        if packed[0] == 0 or scale[0] not in (2 * packed[0], 4 * packed[0]) or shift != scale:
            return f"weight._scale / ._shift {list(scale)} / {shift} do not fit packed rows {packed[0]}", None
        numel = scale[0] * packed[1]
        bias = _shape(tensors, "bias", 1)
        out = bias[0] if bias else None
        if out is not None and (out == 0 or numel % out):
            return f"bias {list(bias)} does not fit {numel} weights", None
        return None, ("numel", numel, out)
    data = _shape(tensors, "weight._data", 2)
    if data is None or tensors["weight._data"][0] not in ("I8", "F8_E4M3", "F8_E5M2"):
        return "weight._data must be an int8 or float8 [out, in] tensor", None
    if scale[0] != data[0] or ("bias" in tensors and _shape(tensors, "bias") != (data[0],)):
        return f"weight._scale / bias rows do not match weight._data {list(data)}", None
    return None, (data[1], data[0])


_BNB_4BIT = ("weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
             "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4",
             "weight.quant_state.bitsandbytes__fp4")  # fmt: skip


def _bnb_layout(tensors):
    """bitsandbytes: 8-bit ``weight`` int8 [out, in] with ``SCB`` [out]; 4-bit ``weight`` uint8
    [ceil(out * in / 2), 1] with its quant state (``absmax``, ``quant_map``, one ``quant_state.*``)."""
    weight = _shape(tensors, "weight", 2)
    bias = _shape(tensors, "bias")
    if "SCB" in tensors:
        problem = _extra(tensors, ("weight", "bias", "SCB", "weight_format"))
        if problem:
            return problem, None
        if weight is None or tensors["weight"][0] != "I8":
            return "8-bit weight must be an int8 [out, in] tensor", None
        if _shape(tensors, "SCB") != (weight[0],) or (bias is not None and bias != (weight[0],)):
            return f"SCB / bias must have {weight[0]} rows, as weight {list(weight)}", None
        return None, (weight[1], weight[0])
    problem = _extra(tensors, _BNB_4BIT)
    if problem:
        return problem, None
    states = [k for k in tensors if k.startswith("weight.quant_state.")]
    if weight is None or weight[1] != 1 or tensors["weight"][0] != "U8" or len(states) != 1:
        return "4-bit weight must be uint8 [n, 1] with one quant_state tensor", None
    if not {"weight.absmax", "weight.quant_map"} <= set(tensors):
        return "4-bit weight needs weight.absmax and weight.quant_map", None
    if ("weight.nested_absmax" in tensors) != ("weight.nested_quant_map" in tensors):
        return "nested_absmax and nested_quant_map come together", None
    if bias is not None and (len(bias) != 1 or bias[0] == 0):
        return f"bias {list(bias)} must be [out]", None
    return None, ("packed", weight[0], bias[0] if bias else None)


_LAYOUTS = {"quanto": _quanto_layout, "bnb": _bnb_layout}


def _size_problem(size, placeholder) -> str | None:
    """Whether the sizes a layer's tensors say fit the model's Linear (in, out)."""
    inp, out = placeholder.in_features, placeholder.out_features
    if size[0] == "numel":
        ok = size[1] == inp * out and size[2] in (None, out)
    elif size[0] == "packed":
        ok = size[1] == (inp * out + 1) // 2 and size[2] in (None, out)
    else:
        ok = tuple(size) == (inp, out)
    return None if ok else f"its tensors do not fit a Linear of {inp} -> {out} features"


def check_against_model(saved: SavedComponent, model: torch.nn.Module, cls: type) -> None:
    """Before any tensor is read: every layer of the map is a Linear of the model of the size its tensors
    say; every other tensor is one of the model's, of its shape; nothing the model needs is missing."""
    expected = model.state_dict()
    for name in saved.layers:
        try:
            placeholder = model.get_submodule(name)
        except AttributeError:
            placeholder = None
        if not isinstance(getattr(placeholder, "in_features", None), int):
            raise QuantError(
                f"{saved.folder}/config.json: layer {name!r} has no place in {cls.__name__} (no such Linear); "
                "fix: load it with the class it was saved from, or save it again"
            )
        problem = _size_problem(saved.sizes[name], placeholder)
        if problem:
            where = next(p for k, (p, _, _) in saved.tensors.items() if k.startswith(name + "."))
            raise QuantError(f"{where}: layer {name!r}: {problem}; fix: save it again")
    for key, (path, dtype, shape) in saved.tensors.items():
        if _layer_of(key, saved.layers) is not None:
            continue
        if key not in expected:
            raise QuantError(
                f"{path}: tensor {key!r} does not belong to {cls.__name__}; fix: load it with "
                "the class it was saved from"
            )
        want = expected[key]
        if shape != tuple(want.shape) or (dtype in _FLOATS) != want.is_floating_point():
            raise QuantError(
                f"{path}: tensor {key!r} is {dtype} {list(shape)}, {cls.__name__} holds "
                f"{str(want.dtype).removeprefix('torch.')} {list(want.shape)} there; fix: save it again"
            )
    tied = set(getattr(model, "all_tied_weights_keys", None) or ())
    missing = [  # parameters (buffers may be built by the model) in no file and in no quantized layer
        name
        for name, _ in model.named_parameters()
        if name not in saved.tensors and name not in tied and _layer_of(name, saved.layers) is None
    ]
    if missing:
        raise QuantError(
            f"{saved.folder}: no tensor for {missing[:3]}; the checkpoint is incomplete; fix: save it again"
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
    check_against_model(saved, model, cls)  # before any tensor is read
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
    except Exception as exc:  # the library's own rebuild of the saved bytes (quant state JSON ...)
        raise QuantError(
            f"{path}: layer {name!r} cannot be rebuilt ({type(exc).__name__}: {exc}); fix: save it again"
        ) from None
    parent, attr = get_submodule_parent(model, name)
    setattr(parent, attr, layer)
