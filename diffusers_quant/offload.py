"""Placing a loaded pipeline: plain move, or one of accelerate's offload planners.

Sizes are taken from the quantized modules themselves (packed tensors count what they store), so a
balanced device map of a quantized component fits what is really resident.
"""

from __future__ import annotations

import torch

from .rules import device_type
from .spec import Plan


def is_quantized(module: torch.nn.Module) -> bool:
    from .backends import backend_of

    return any(backend_of(m) is not None for m in module.modules())


def balance_model(model: torch.nn.Module, device: str, gpu_memory: float | None = None) -> dict:
    """Split ``model`` between ``device`` and the CPU by accelerate's balanced device map; weights on the
    CPU are brought to the GPU block by block at forward time."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    index = torch.device(device).index or 0
    if gpu_memory is not None:
        max_memory = {index: int(gpu_memory * 2**30), "cpu": 2**40}
    else:
        max_memory = get_balanced_memory(model, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    if set(device_map.values()) == {"cpu"}:
        # Nothing fits on the GPU: still run there, streaming every block in (dispatch_model would run the
        # component on the CPU, and its weights map breaks for a map of the whole model).
        from accelerate import cpu_offload

        cpu_offload(model, execution_device=f"cuda:{index}")
        model.hf_device_map = dict(device_map)
        return device_map
    dispatch_model(model, device_map=device_map, main_device=f"cuda:{index}")
    return device_map


def place_pipeline(pipe, plan: Plan) -> None:
    """Apply the plan's offload mode (or move to the device) once every component is loaded."""
    if plan.offload == "model":
        pipe.enable_model_cpu_offload(device=plan.device)
    elif plan.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=plan.device)
    elif plan.offload == "balanced":
        for module in pipe.components.values():
            if not isinstance(module, torch.nn.Module):
                continue
            if is_quantized(module):
                balance_model(module, plan.device, plan.gpu_memory)
            else:
                module.to(plan.device)
    elif device_type(plan.device) != "cpu":
        pipe.to(plan.device)
