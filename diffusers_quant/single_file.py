"""On-load quantization for single files: the layers quantized as diffusers' converter hands them over.

A single file (``from_single_file`` with the original repository's key names) needs diffusers' own key
conversion, which runs on the whole checkpoint at once; so unlike a folder it cannot be streamed tensor by
tensor from disk. What can be kept from on-load is the rest: diffusers converts, builds the model on the
meta device and fills it with ``load_model_dict_into_meta``; during a load here that function (hooked
by ``hooks.py``) quantizes each selected Linear from its converted tensors and hands the other tensors to
diffusers' own function (the checkpoint dict itself is left as it is). The full-precision model is never
built; everything else (config, conversion, fp32 modules, dtype, placement) is diffusers' code path.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .components import count_linears, select_linears
from .loading import Load, fp_nbytes
from .spec import Spec
from .streaming import quantize_layer


@dataclass
class _Stream:
    spec: Spec
    load: Load
    selected: list[str] = field(default_factory=list)
    bytes_before: int = 0
    total: int = 0
    filled: bool = False


_STREAM: contextvars.ContextVar[_Stream | None] = contextvars.ContextVar(
    "diffusers_quant_single_file", default=None
)


def load_on_load(original: Callable, load: Load, spec: Spec, pretrained, args, kwargs):
    """``(model, True)``: ``load.cls.from_single_file`` by diffusers, its selected Linears quantized as the
    converter hands them over, and reported; ``(model, False)`` where diffusers never reached its
    state-dict loader (the model unquantized: the caller quantizes it after load)."""
    stream = _Stream(spec, load)
    token = _STREAM.set(stream)
    try:
        model = original(load.cls, pretrained, *args, **kwargs)
    finally:
        _STREAM.reset(token)
    if not stream.filled:
        return model, False
    return load.record(model, spec, "on-load", stream.bytes_before, len(stream.selected), stream.total), True


def load_model_dict_into_meta(original: Callable, model, state_dict, *args, **kwargs):
    """diffusers' ``load_model_dict_into_meta`` with the selected layers quantized first (only inside
    :func:`load_on_load`, and only without a library quantizer)."""
    stream = _STREAM.get()
    if stream is None or kwargs.get("hf_quantizer") is not None:
        return original(model, state_dict, *args, **kwargs)
    _STREAM.set(None)  # this call fills this load's model; any later one in the load is not ours
    dtype = kwargs.get("dtype")
    dtype = dtype if isinstance(dtype, torch.dtype) else None
    device = (kwargs.get("device_map") or {}).get("", "cpu")
    keep_fp32 = set(kwargs.get("keep_in_fp32_modules") or ())
    stream.bytes_before, stream.total = fp_nbytes(model, dtype), count_linears(model)
    # each selected layer's parameter -> checkpoint key; a layer the checkpoint lacks a tensor of is left to
    # diffusers, which reports what is missing
    layers = {
        name: {p: f"{name}.{p}" for p, _ in model.get_submodule(name).named_parameters()}
        for name in select_linears(model, stream.spec, stream.load.kind)
    }
    layers = {name: keys for name, keys in layers.items() if all(k in state_dict for k in keys.values())}
    compute_dtype = stream.load.dtype or torch.float32
    for name, keys in layers.items():
        value_dtype = torch.float32 if keep_fp32.intersection(name.split(".")) else dtype
        tensors = {p: state_dict[k].to(dtype=value_dtype or state_dict[k].dtype) for p, k in keys.items()}
        quantize_layer(model, name, tensors, stream.spec, compute_dtype, device)
    stream.selected, stream.filled = list(layers), True
    taken = {k for keys in layers.values() for k in keys.values()}
    # the caller's dict is left as it is (a pipeline hands the same checkpoint to every component)
    rest = {k: v for k, v in state_dict.items() if k not in taken}
    return original(model, rest, *args, **kwargs)
