"""On-load quantization: build the model on the meta device, then stream the checkpoint tensor by tensor.

Each Linear chosen for quantization is materialised on the host from its own tensors only, quantized for
the target device (moved there whole, or block by block where the backend can) and swapped in; every other
tensor is placed directly.  The full-precision component is never
resident on the target device, and the host holds one tensor at a time beyond the memory map.

``plan_stream`` only reads headers and config, so a load that cannot be streamed (``.bin`` weights, tensors
that the library merges or splits on load) is known before a single weight is read, and why.  Keys the library
renames on load (transformers 5 renames the saved keys of its vision-language models, e.g. Qwen2.5-VL's
``model.layers.*`` to ``model.language_model.layers.*``) are renamed in the stream by transformers' own
conversion mapping.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch

from .components import fp32_modules, is_transformers_class, select_linears
from .errors import QuantError
from .files import read_json_object
from .post_load import quantize_linear_into
from .spec import Spec

# Names diffusers and transformers save their safetensors weights under.
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")


class NotStreamable(Exception):
    """Why a checkpoint cannot be streamed key for key (the library's own loader must read it); the message is
    what on-load lacks, one clause after "mode=on-load", e.g. "needs a local folder with safetensors weights
    in diffusers/transformers layout"."""


@dataclass
class StreamPlan:
    """What to read and what to quantize, derived from headers and config alone."""

    model: torch.nn.Module  # on the meta device
    files: list[Path]
    keys: dict[str, Path]
    selected: list[str]
    tied: dict[str, str] = field(default_factory=dict)
    # checkpoint key -> the model's name for it, where the library renames it on load
    renamed: dict[str, str] = field(default_factory=dict)

    def model_key(self, key: str) -> str:
        return self.renamed.get(key, key)


def find_safetensors(folder: str | os.PathLike, variant: str | None = None) -> list[Path] | None:
    """The checkpoint's safetensors files (all shards), or None if the folder holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for stem in _WEIGHT_STEMS:
        name = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
        index = folder / f"{name}.index.json"
        if index.is_file():
            return index_shards(index)
        if (folder / name).is_file():
            return [folder / name]
    return None


def index_shards(index: Path) -> list[Path]:
    """The shard files a ``*.safetensors.index.json`` names, checked: a JSON object whose ``weight_map``
    maps tensor names to ``.safetensors`` file names in the index's own folder, each of which exists."""
    folder = index.parent
    weight_map = read_json_object(index, "safetensors index").get("weight_map")
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(shard, str) and shard for shard in weight_map.values())
    ):
        raise QuantError(
            f"{index}: damaged safetensors index (its weight_map must map each tensor name to a shard file "
            f"name, got {str(weight_map)[:80]}); fix: save the model again, or re-download the index"
        )
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        parts = PurePosixPath(shard.replace("\\", "/")).parts
        if os.path.isabs(shard) or shard.startswith(("/", "\\")) or ".." in parts or len(parts) != 1:
            raise QuantError(
                f"{index}: shard {shard[:200]!r} is not a file name in {folder} (a path outside the folder); "
                "fix: save the model again, or re-download the index"
            )
        if not shard.endswith(".safetensors"):
            raise QuantError(
                f"{index}: shard {shard[:200]!r} is not a .safetensors file; fix: save the model again, or "
                "re-download the index"
            )
        if not (folder / shard).is_file():
            raise QuantError(
                f"{index}: names shard {shard!r}, which is not in {folder}; fix: download the missing shard, "
                "or save the model again"
            )
    return [folder / shard for shard in shards]


def header_keys(files: list[Path]) -> dict[str, Path]:
    """Every tensor name of a checkpoint -> the file holding it, from the safetensors headers alone."""
    from safetensors import safe_open

    keys: dict[str, Path] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                keys.update(dict.fromkeys(f.keys(), path))
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise QuantError(
                f"{path}: not a readable safetensors file ({exc}); fix: re-save or re-download it"
            ) from None
    return keys


def header_tensors(files: list[Path]) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """Every tensor name of a checkpoint -> (the file holding it, its safetensors dtype, its shape), from
    the headers alone (safetensors' own reader checks them; nothing else is read)."""
    from safetensors import safe_open

    found: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    found[key] = (path, piece.get_dtype(), tuple(piece.get_shape()))
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise QuantError(
                f"{path}: not a readable safetensors file ({exc}); fix: re-save or re-download it"
            ) from None
    return found


def build_empty(cls: type, folder: str | os.PathLike) -> torch.nn.Module:
    """The model from its config alone, parameters on the meta device (buffers real, as accelerate does)."""
    from accelerate import init_empty_weights

    if is_transformers_class(cls):
        config = cls.config_class.from_pretrained(folder)
        with init_empty_weights():
            return cls(config)
    config = cls.load_config(folder)
    with init_empty_weights():
        return cls.from_config(config)


def plan_stream(
    cls: type,
    folder: str | os.PathLike,
    spec: Spec,
    kind: str,
    variant: str | None = None,
    key_mapping: dict[str, str] | None = None,
) -> StreamPlan:
    """A StreamPlan if this checkpoint can be streamed into ``cls`` key for key (after the library's own key
    renaming), else NotStreamable saying why."""
    files = find_safetensors(folder, variant)
    if not files:
        raise NotStreamable("needs a local folder with safetensors weights in diffusers/transformers layout")
    keys = header_keys(files)
    model = build_empty(cls, folder)
    renamed = library_key_names(model, keys, key_mapping)
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    expected = set(model.state_dict().keys())
    missing = expected - {renamed.get(k, k) for k in keys} - set(tied)
    if missing:
        converted = " even after transformers' key conversion" if renamed else ""
        raise NotStreamable(
            f"cannot stream this checkpoint: it has no tensor for {len(missing)} of {cls.__name__}'s parameters"
            f"{converted} (e.g. {', '.join(sorted(missing)[:3])}), so its keys need a conversion only the "
            "library's own loader applies"
        )
    return StreamPlan(
        model=model,
        files=files,
        keys=keys,
        selected=select_linears(model, spec, kind),
        tied=tied,
        renamed=renamed,
    )


def library_key_names(
    model: torch.nn.Module, keys, key_mapping: dict[str, str] | None = None
) -> dict[str, str]:
    """Checkpoint keys the library renames when it loads them into ``model`` -> the new name, by its own
    conversion: transformers 5's weight mapping for the class (``get_model_conversion_mapping``, the mapping
    ``from_pretrained`` applies, ``key_mapping=`` included) through its ``rename_source_key``.  A key that
    transformers instead merges with others or splits (a ``WeightConverter``: fused experts, fused qkv ...)
    cannot be streamed one tensor at a time: NotStreamable names the converter.  diffusers models load
    their saved keys as they are."""
    if not is_transformers_class(type(model)):
        return {}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: no conversion on load, keys are read as saved
        return {}
    mapping = get_model_conversion_mapping(model, key_mapping)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta = model.state_dict()
    prefix = model.base_model_prefix
    renamed: dict[str, str] = {}
    for key in keys:
        # As transformers' convert_and_load_state_dict_in_model does for each key.
        name, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if name not in meta and key in meta:
            name, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta)
        if pattern is not None and name in meta:
            converter = by_pattern.get(pattern)
            ops = "+".join(type(op).__name__ for op in getattr(converter, "operations", ())) or "a conversion"
            raise NotStreamable(
                f"cannot stream this checkpoint tensor by tensor: transformers converts {type(model).__name__}'s saved "
                f"tensors on load ({ops} of {key!r} into {name!r}), which needs several tensors at once"
            )
        if name != key:
            renamed[key] = name
    return renamed


def stream_load(
    plan: StreamPlan,
    spec: Spec,
    *,
    dtype: torch.dtype | None,
    compute_dtype: torch.dtype,
    device: torch.device | str,
    on_tensor: Callable[[], None] | None = None,
) -> torch.nn.Module:
    """Fill ``plan.model`` from the checkpoint, quantizing the selected layers as their tensors arrive."""
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    model = plan.model
    selected = set(plan.selected)
    keep_fp32 = fp32_modules(model, dtype)
    # A selected layer is complete once all its own parameters have been read.
    expected = {name: {n for n, _ in model.get_submodule(name).named_parameters()} for name in selected}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for path in plan.files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for saved_key in f.keys():
                key = plan.model_key(saved_key)
                layer, _, pname = key.rpartition(".")
                if layer in selected:
                    # Kept on the host: the backend moves it to the device (in blocks of rows where it can).
                    tensor = f.get_tensor(saved_key).to(dtype=dtype or None)
                    pending.setdefault(layer, {})[pname] = tensor
                    if set(pending[layer]) == expected[layer]:
                        quantize_layer(model, layer, pending.pop(layer), spec, compute_dtype, device)
                elif _is_model_key(model, key):
                    tensor = f.get_tensor(saved_key)
                    value_dtype = None
                    if tensor.is_floating_point():
                        value_dtype = (
                            torch.float32
                            if keep_fp32.intersection(key.split("."))
                            else (dtype or tensor.dtype)
                        )
                    set_module_tensor_to_device(model, key, device, value=tensor, dtype=value_dtype)
                if on_tensor is not None:
                    on_tensor()
    if pending:
        raise QuantError(f"checkpoint ended before these layers were complete: {sorted(pending)[:5]}")
    if plan.tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise QuantError(
            f"checkpoint has no tensor for {len(still_meta)} parameter(s), e.g. {still_meta[:3]}; "
            "fix: use mode=post-load so the library's own loader reads this checkpoint"
        )
    model.to(device)  # non-persistent buffers were created on the CPU
    model.eval()
    model.requires_grad_(False)
    return model


def _is_model_key(model: torch.nn.Module, key: str) -> bool:
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    return attr in module._parameters or attr in module._buffers


def quantize_layer(
    model: torch.nn.Module,
    name: str,
    tensors: dict[str, torch.Tensor],
    spec: Spec,
    compute_dtype: torch.dtype,
    device: torch.device | str,
) -> None:
    meta = model.get_submodule(name)
    linear = torch.nn.Linear(meta.in_features, meta.out_features, bias="bias" in tensors, device="meta")
    linear.weight = torch.nn.Parameter(tensors["weight"], requires_grad=False)
    if "bias" in tensors:
        linear.bias = torch.nn.Parameter(tensors["bias"], requires_grad=False)
    quantize_linear_into(model, name, linear, spec, compute_dtype, device)
