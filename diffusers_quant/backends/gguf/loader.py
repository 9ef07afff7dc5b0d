"""Build a diffusers model from a GGUF file: packed weights stay packed (zero-copy views of the memory map
on the CPU, packed bytes on the GPU) and are dequantized per forward by ``GGUFLinear``."""

from __future__ import annotations

import collections.abc
import contextlib
import inspect
import json
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ...components import fp32_modules
from ...errors import QuantError, choices
from .dequant import DEQUANTIZERS, PLAIN_QTYPES
from .keys import detect_key_format, to_diffusers_keys
from .nn import GGUFLinear, GGUFWeight
from .reader import _TORCH_DTYPES, GGUFError, GGUFFile, read_gguf
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


# -- the model config: given (config=) or embedded in the file (untrusted, checked before use) ----------------

_CONFIG_FIX = "fix: pass config=<folder with the model's config.json> (and subfolder=...) to from_single_file"
MAX_CONFIG_CHARS = 1 << 20
# Integers in a config are sizes, counts, indices or constants: real diffusers models stay below 2**23
# (rope_theta 5_000_000 is the largest default); anything larger cannot be meant, and is refused before a
# single module is built (a loop over it could run away even on the meta device).
MAX_CONFIG_INT = 1 << 24
MAX_CONFIG_LIST = 4096
MAX_CONFIG_STRING = 4096
MAX_CONFIG_DEPTH = 8
# Keys diffusers writes into every config.json besides the __init__ arguments.
_PRIVATE_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")
# How much bigger than the file the model it builds may be before the config is taken as damaged: every
# parameter must come from a tensor of the file (a fused qkv tensor becomes 3 or 4 parameters).
_PARAM_ELEMENTS_FACTOR, _PARAM_ELEMENTS_SLACK = 2, 1 << 20
_PARAM_COUNT_FACTOR, _PARAM_COUNT_SLACK = 4, 256
_MODULE_COUNT_FACTOR, _MODULE_COUNT_SLACK = 64, 4096


def _config(file: GGUFFile, cls: type, config, subfolder: str | None) -> tuple[dict, str]:
    """The config to build ``cls`` from, and where it came from (for messages)."""
    if config is not None:
        if isinstance(config, dict):
            return config, "the config= given"
        try:
            loaded = cls.load_config(config, subfolder=subfolder) if subfolder else cls.load_config(config)
        except (OSError, ValueError) as exc:
            raise QuantError(
                f"{config}: cannot read the config of {cls.__name__} for {file.path} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); fix: pass "
                "config=<folder with the model's config.json> (and subfolder=...)"
            ) from None
        return dict(loaded), f"the config from {config}"
    if CONFIG_KEY not in file.metadata:
        raise QuantError(f"{file.path}: this GGUF file carries no model config; {_CONFIG_FIX}")
    return embedded_config(file, cls), f"the config embedded in the file ({CONFIG_KEY})"


def embedded_config(file: GGUFFile, cls: type) -> dict:
    """The JSON model config a GGUF file carries, checked against ``cls.__init__``: an object, known keys,
    values of the annotated types (integers bounded).  Anything else is a ``QuantError`` naming the file and
    the key: the file is data, never trusted to be what diffusers expects."""
    text = file.metadata[CONFIG_KEY]

    def refuse(what: str) -> QuantError:
        return QuantError(
            f"{file.path}: the model config embedded in the file ({CONFIG_KEY}) {what}; {_CONFIG_FIX}"
        )

    if not isinstance(text, str):
        raise refuse(f"is a {type(text).__name__}, not a JSON string")
    if len(text) > MAX_CONFIG_CHARS:
        raise refuse(f"is {len(text)} characters long, more than a model config can be ({MAX_CONFIG_CHARS})")
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise refuse(f"is not valid JSON ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(parsed, dict):
        raise refuse(f"is a JSON {_json_kind(parsed)}, not an object")
    parameters = _init_parameters(cls)
    unknown = sorted(k for k in parsed if k not in parameters and k not in _PRIVATE_KEYS)
    if unknown:
        shown = ", ".join(repr(k[:80]) for k in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise refuse(f"has key(s) {cls.__name__} does not take: {shown}")
    hints = _init_hints(cls)
    out = {}
    for key, value in parsed.items():
        if key in _PRIVATE_KEYS:
            problem = _private_problem(key, value, parameters)
            if key == "_name_or_path":  # where someone else's copy lived: never a path for us
                continue
        else:
            default = parameters[key].default
            if value == default and type(value) is type(default):
                problem = None
            elif value is None and default is None:
                problem = None
            else:
                problem = _value_problem(value, hints.get(key, _ANY), _lowest(default), 0)
        if problem:
            raise refuse(f"has {key} = {_short(value)}: {problem}")
        out[key] = value
    return out


_ANY = object()


def _init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    params = inspect.signature(cls.__init__).parameters
    return {
        n: p
        for i, (n, p) in enumerate(params.items())
        if i > 0 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _init_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not evaluate: check those values by their JSON kind only
        return {}


def _lowest(default: Any) -> int:
    """The smallest integer a config value may hold: a count or size defaulting to a positive number must
    stay positive (attention_head_dim=0 divides by zero); zero-based ones may be 0, negative defaults go."""
    values = [default] if not isinstance(default, (list, tuple)) else list(default)
    ints = [v for v in values if type(v) is int]
    if not ints:
        return 0
    return 1 if min(ints) >= 1 else min(0, *ints)


def _private_problem(key: str, value: Any, parameters: dict) -> str | None:
    if key == "_use_default_values":
        if not isinstance(value, list) or not all(isinstance(v, str) and v in parameters for v in value):
            return "must be a list of the model's parameter names"
        return None
    if not isinstance(value, str) or len(value) > MAX_CONFIG_STRING:
        return "must be a short string"
    return None


def _json_kind(value: Any) -> str:
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
    }.get(type(value), "null")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _value_problem(value: Any, hint: Any, lowest: int, depth: int) -> str | None:
    """Why ``value`` (decoded JSON) cannot be an argument annotated ``hint``; None when it can."""
    if depth > MAX_CONFIG_DEPTH:
        return f"is nested more than {MAX_CONFIG_DEPTH} levels deep"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is _ANY or hint is Any or hint is object:
        return _json_problem(value, lowest, depth)
    if origin in (typing.Union, types.UnionType):
        problems = [_value_problem(value, a, lowest, depth) for a in args]
        if any(p is None for p in problems):
            return None
        return " / ".join(dict.fromkeys(p for p in problems if p))
    if hint is type(None):
        return None if value is None else "must be null"
    if hint is bool:
        return None if type(value) is bool else "must be true or false"
    if hint is int:
        if type(value) is not int:
            return "must be an integer"
        if not lowest <= value <= MAX_CONFIG_INT:
            return f"must be an integer from {lowest} to {MAX_CONFIG_INT}"
        return None
    if hint is float:
        if type(value) not in (int, float) or not math.isfinite(value) or abs(value) > MAX_CONFIG_INT:
            return f"must be a finite number of at most {MAX_CONFIG_INT} in size"
        return None
    if hint is str:
        if not isinstance(value, str) or len(value) > MAX_CONFIG_STRING:
            return f"must be a string of at most {MAX_CONFIG_STRING} characters"
        return None
    if origin is typing.Literal:
        return (
            None
            if value in args and type(value) in {type(a) for a in args}
            else f"must be one of {list(args)}"
        )
    sequence = (tuple, list, collections.abc.Sequence, collections.abc.MutableSequence)
    if origin in sequence or hint in sequence:
        if not isinstance(value, list):
            return "must be a list"
        if len(value) > MAX_CONFIG_LIST:
            return f"must be a list of at most {MAX_CONFIG_LIST} items"
        # Tuple[int] is diffusers' way to say "a tuple of ints"; Tuple[int, int, int] means three of them.
        if len(args) > 1 and args[1] is not Ellipsis:
            if len(value) != len(args):
                return f"must be a list of {len(args)} items"
            element_hints = list(args)
        else:
            element_hints = [args[0] if args else _ANY] * len(value)
        for i, (item, item_hint) in enumerate(zip(value, element_hints, strict=True)):
            problem = _value_problem(item, item_hint, lowest, depth + 1)
            if problem:
                return f"item {i}: {problem}"
        return None
    if origin in (dict, collections.abc.Mapping) or hint in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            return "must be an object"
        item_hint = args[1] if len(args) == 2 else _ANY
        for k, item in value.items():
            problem = _value_problem(item, item_hint, lowest, depth + 1)
            if problem:
                return f"{k[:40]!r}: {problem}"
        return None
    return _json_problem(value, lowest, depth)  # another class (an enum ...): plain, bounded JSON


def _json_problem(value: Any, lowest: int, depth: int) -> str | None:
    """Bounds on an argument whose type is not known: only sizes a model config can have."""
    if depth > MAX_CONFIG_DEPTH:
        return f"is nested more than {MAX_CONFIG_DEPTH} levels deep"
    if isinstance(value, list):
        if len(value) > MAX_CONFIG_LIST:
            return f"must be a list of at most {MAX_CONFIG_LIST} items"
        return next((p for p in (_json_problem(v, lowest, depth + 1) for v in value) if p), None)
    if isinstance(value, dict):
        if len(value) > MAX_CONFIG_LIST:
            return f"must be an object of at most {MAX_CONFIG_LIST} keys"
        return next((p for p in (_json_problem(v, lowest, depth + 1) for v in value.values()) if p), None)
    if type(value) is int and not min(lowest, 0) <= value <= MAX_CONFIG_INT:
        return f"must be an integer from {min(lowest, 0)} to {MAX_CONFIG_INT}"
    if type(value) is float and (not math.isfinite(value) or abs(value) > MAX_CONFIG_INT):
        return f"must be a finite number of at most {MAX_CONFIG_INT} in size"
    if isinstance(value, str) and len(value) > MAX_CONFIG_STRING:
        return f"must be a string of at most {MAX_CONFIG_STRING} characters"
    return None


# -- building the model: first a probe on the meta device, bounded by the file's size ---------------------


class _TooBig(Exception):
    pass


@contextlib.contextmanager
def _bounded_build(limits: dict[str, int]) -> Iterator[dict[str, int]]:
    """Count what modules register while the block runs; raise ``_TooBig`` the moment a count passes its
    limit (so a config asking for a million layers stops at the first few too many)."""
    from torch.nn.modules import module as torch_module

    counts = dict.fromkeys(limits, 0)

    def add(kind: str, n: int) -> None:
        counts[kind] += n
        if counts[kind] > limits[kind]:
            raise _TooBig(kind)

    def on_parameter(module, name, param):
        if param is not None:
            add("parameter values", param.numel())
            add("parameters", 1)

    def on_buffer(module, name, buffer):
        if buffer is not None:
            add("buffer values", buffer.numel())

    def on_module(module, name, submodule):
        add("modules", 1)

    handles = [
        torch_module.register_module_parameter_registration_hook(on_parameter),
        torch_module.register_module_buffer_registration_hook(on_buffer),
        torch_module.register_module_module_registration_hook(on_module),
    ]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def _build(cls: type, cfg: dict, file: GGUFFile, source: str) -> torch.nn.Module:
    """``cls.from_config(cfg)`` with empty (meta) weights, after a probe build entirely on the meta device
    (parameters and buffers: nothing allocated) has shown the model fits the file: every parameter must
    come from the file, so a model many times the size of its tensors means a damaged config."""
    from accelerate import init_empty_weights

    values = sum(t.n_elements for t in file.tensors)
    limits = {
        "parameter values": _PARAM_ELEMENTS_FACTOR * values + _PARAM_ELEMENTS_SLACK,
        "parameters": _PARAM_COUNT_FACTOR * len(file.tensors) + _PARAM_COUNT_SLACK,
        "buffer values": _PARAM_ELEMENTS_FACTOR * values + _PARAM_ELEMENTS_SLACK,
        "modules": _MODULE_COUNT_FACTOR * len(file.tensors) + _MODULE_COUNT_SLACK,
    }
    fix = (
        "fix: pass config=<the folder of the config this file was made from>"
        if source.startswith("the config embedded")
        else "fix: pass the config this file was made from"
    )
    try:
        with torch.device("meta"), _bounded_build(limits):
            cls.from_config(cfg)
    except _TooBig as exc:
        kind = str(exc)
        raise QuantError(
            f"{file.path}: {source} describes a {cls.__name__} with more than {limits[kind]} {kind}, far more "
            f"than the file's {len(file.tensors)} tensors ({values} values) can fill; {fix}"
        ) from None
    except Exception:  # noqa: BLE001 - some models cannot be built on meta alone: the real build decides
        pass
    try:
        with init_empty_weights():
            return cls.from_config(cfg)
    except Exception as exc:  # noqa: BLE001 - whatever the model's __init__ makes of a bad config
        raise QuantError(
            f"{file.path}: {source} does not build a {cls.__name__} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); {fix}"
        ) from None


def _check_types(file: GGUFFile) -> None:
    """Every tensor's ggml type decodes here: checked from the header, before any tensor is read."""
    bad = [t for t in file.tensors if t.type_name not in DEQUANTIZERS]
    if not bad:
        return
    listed = ", ".join(f"{t.name!r} ({t.type_name})" for t in bad[:5]) + (" ..." if len(bad) > 5 else "")
    note = (
        " (Q8_1 is ggml's activation format: ggml itself has no decoder for it and gguf-py's block size for "
        "it disagrees with ggml's)"
        if any(t.type_name == "Q8_1" for t in bad)
        else ""
    )
    raise QuantError(
        f"{file.path}: {len(bad)} tensor(s) of ggml type(s) this loader cannot decode: {listed}{note}; "
        f"supported: {choices(DEQUANTIZERS)}; fix: re-quantize the model to one of those types (e.g. "
        "diffusers-quant quantize <model folder> --quant gguf:q8_0 --out <file>.gguf)"
    )


def _value(weight: GGUFWeight, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A file tensor placed as an ordinary one: floating model tensors in the load dtype (plain F64 or
    integer values converted once, quantized ones decoded), integer model tensors in their own dtype."""
    if weight.qtype in PLAIN_QTYPES:
        value = weight.raw.reshape(-1).view(_TORCH_DTYPES[weight.qtype]).reshape(weight.shape)
    else:
        value = weight.dequantize(torch.float32)
    return value.to(dtype if like.is_floating_point() else like.dtype)


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
    from accelerate.utils import set_module_tensor_to_device

    try:
        file = read_gguf(path)
    except GGUFError as exc:
        message = str(exc)
        if "; fix: " not in message:
            message += "; fix: the file is damaged or not a GGUF file: download or export it again"
        raise QuantError(message) from None
    names = file.names()
    mixed = sorted({n.split(".")[0] for n in names if n.startswith(ALL_IN_ONE_PREFIXES)})
    if mixed:
        raise QuantError(
            f"{path}: an all-in-one GGUF (it also holds {', '.join(mixed)}): GGUF is for the transformer/UNet "
            "only, text encoders and VAE need their own formats; fix: use a transformer-only GGUF and load the "
            "rest from a diffusers folder (e.g. from_pretrained(folder, transformer=<gguf model>))"
        )
    _check_types(file)
    cfg, source = _config(file, cls, config, subfolder)
    weights = {n: GGUFWeight.from_gguf(file, n) for n in names}  # zero-copy views, nothing read yet
    try:
        converted = to_diffusers_keys(weights, detect_key_format(names), config=cfg)
    except Exception as exc:  # KeyFormatError and friends: the naming is not one we can map
        raise QuantError(f"{path}: {exc}") from None
    model = _build(cls, cfg, file, source)
    dtype = dtype or torch.float32  # the caller's dtype; with none, float32, as diffusers loads
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
    # Every parameter must come from the file (a Linear's bias included): never a default in its place.
    missing = [n for n, _ in model.named_parameters() if n not in converted]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise QuantError(
            f"{path}: the file has no tensor for {len(missing)} parameter(s) of {cls.__name__}: {shown}; "
            "missing tensors are never filled with defaults; fix: use a complete file (re-export it), or "
            "pass the config this file was made from"
        )
    # The modules the class keeps in float32 are decoded, as diffusers' own GGUF loader does (its
    # modules_to_not_convert): model code reads their parameters' dtype (Wan casts the timestep to its
    # time_embedder's, which would be a GGUF layer's uint8), and at half precision they stay float32.
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    fp32 = fp32_modules(model, dtype)
    linears: dict[str, GGUFWeight] = {}
    for key, weight in converted.items():
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name)
        parts = key.split(".")
        decoded = any(m in parts for m in keep)
        if (
            weight.qtype not in PLAIN_QTYPES
            and attr == "weight"
            and type(module) is torch.nn.Linear
            and not decoded
        ):
            linears[module_name] = weight
        else:  # plain tensors (and quantized non-Linear ones) are placed as ordinary tensors
            value = _value(weight, expected[key], torch.float32 if any(m in parts for m in fp32) else dtype)
            set_module_tensor_to_device(model, key, device, value=value, dtype=value.dtype)
    for name, weight in linears.items():
        meta = model.get_submodule(name)
        bias = meta.bias  # placed above: every parameter was checked to be in the file
        layer = GGUFLinear.from_weight(weight.to(device), bias=bias, compute_dtype=compute_dtype or dtype)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    types = [w.qtype for w in linears.values()]
    qtype = max(set(types), key=types.count) if types else "F16"
    # What the same tensors take unquantized at the load dtype: the "before" of the report.
    logical = sum(math.prod(w.shape) for w in weights.values()) * torch.empty((), dtype=dtype).element_size()
    return GGUFLoad(model, qtype, logical)
