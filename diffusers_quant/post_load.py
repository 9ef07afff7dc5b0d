"""Post-load quantization: replace a loaded model's Linear layers one by one.

Each layer is moved to the target device, quantized there and swapped in before the next one is touched,
so the device never holds more than one full-precision layer beyond the quantized model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import get_backend
from .components import get_submodule_parent, select_linears
from .spec import Spec


@dataclass
class QuantStats:
    quantized_layers: int = 0
    total_linears: int = 0


def state_nbytes(module: torch.nn.Module) -> int:
    """Bytes of everything the module stores (parameters, buffers, quantization state), as saved."""
    seen: set[int] = set()
    total = 0
    for tensor in module.state_dict(keep_vars=True).values():
        if not isinstance(tensor, torch.Tensor):
            continue
        if id(tensor) in seen:  # tied weights are stored once
            continue
        seen.add(id(tensor))
        total += _tensor_nbytes(tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor)
    return total


def _tensor_nbytes(tensor: torch.Tensor) -> int:
    # Quantized tensor subclasses (quanto) expose their inner tensors; count those, not the logical shape.
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) is not torch.Tensor:
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_nbytes(getattr(tensor, n)) for n in names)
    return tensor.numel() * tensor.element_size()


def quantize_linear_into(
    model: torch.nn.Module, name: str, linear: torch.nn.Linear, spec: Spec, compute_dtype: torch.dtype
) -> None:
    parent, attr = get_submodule_parent(model, name)
    quantized = get_backend(spec.backend).quantize_linear(linear, spec, compute_dtype)
    setattr(parent, attr, quantized)


def quantize_model(
    model: torch.nn.Module,
    spec: Spec,
    kind: str,
    compute_dtype: torch.dtype,
    device: torch.device | str | None = None,
    progress=None,
) -> QuantStats:
    """Quantize ``model`` in place, module by module; leaves every tensor on ``device`` (if given)."""
    get_backend(spec.backend).require()
    names = select_linears(model, spec, kind)
    stats = QuantStats(
        quantized_layers=len(names),
        total_linears=sum(isinstance(m, torch.nn.Linear) for m in model.modules()),
    )
    for name in names:
        linear = model.get_submodule(name)
        if device is not None:
            linear = linear.to(device)
        quantize_linear_into(model, name, linear, spec, compute_dtype)
        del linear
        if progress is not None:
            progress.update(1)
    if device is not None:
        model.to(device)
    model.requires_grad_(False)
    return stats
