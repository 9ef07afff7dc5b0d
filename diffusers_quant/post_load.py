"""Post-load quantization: replace a loaded model's Linear layers one by one.

Each layer is quantized for the target device and swapped in before the next one is touched. Backends that
quantize in blocks of rows (quanto, NNCF) move one block at a time, the others the whole layer, so the device
never holds more than one full-precision layer (or block) beyond the quantized model.
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
    """Bytes of everything the module stores (parameters, buffers, quantization state).

    Each submodule is asked for its own saved state, except those holding quantized tensor subclasses
    (quanto), which are counted from the tensors they hold: their ``state_dict()`` converts kernel
    layouts back to the portable one, and quanto unpacks int4 through an identity-matrix matmul (2.4x
    the quantized Flux-width model's GPU memory at peak, on an H100).
    """
    seen: set[int] = set()
    alive = []  # temporaries made by _save_to_state_dict stay referenced, so their ids are not reused
    total = 0
    for sub in module.modules():
        total += own_state_nbytes(sub, seen, alive)
    return total


def own_state_nbytes(sub: torch.nn.Module, seen: set[int], alive: list) -> int:
    """Bytes of what ``sub`` itself stores (not its children); tensors whose id is in ``seen`` are not
    counted again (tied weights), and every counted tensor is kept in ``alive``."""
    held = dict(sub._parameters)
    held.update((k, v) for k, v in sub._buffers.items() if k not in sub._non_persistent_buffers_set)
    if not any(_is_subclass(t) for t in held.values() if t is not None):
        held = {}
        sub._save_to_state_dict(held, "", keep_vars=True)  # this module only, with its quant state
    total = 0
    for tensor in held.values():
        if not isinstance(tensor, torch.Tensor) or id(tensor) in seen:  # tied weights count once
            continue
        seen.add(id(tensor))
        alive.append(tensor)
        total += _tensor_nbytes(tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor)
    return total


def _is_subclass(tensor: torch.Tensor) -> bool:
    data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    return type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__")


def _tensor_nbytes(tensor: torch.Tensor) -> int:
    # Quantized tensor subclasses (quanto) expose their inner tensors; count those, not the logical shape.
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) is not torch.Tensor:
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_nbytes(getattr(tensor, n)) for n in names)
    return tensor.numel() * tensor.element_size()


def quantize_linear_into(
    model: torch.nn.Module,
    name: str,
    linear: torch.nn.Linear,
    spec: Spec,
    compute_dtype: torch.dtype,
    device: torch.device | str | None = None,
) -> None:
    parent, attr = get_submodule_parent(model, name)
    quantized = get_backend(spec.backend).quantize_linear(linear, spec, compute_dtype, device)
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
        quantize_linear_into(model, name, model.get_submodule(name), spec, compute_dtype, device)
        if progress is not None:
            progress.update(1)
    if device is not None:
        model.to(device)
    model.requires_grad_(False)
    return stats
