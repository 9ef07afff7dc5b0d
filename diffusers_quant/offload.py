"""Placing a loaded pipeline or model: a plain move, or one of accelerate's / diffusers' offload planners.

Every mode uses the libraries' own machinery: ``enable_model_cpu_offload`` and
``enable_sequential_cpu_offload`` (accelerate's hooks), diffusers' group offloading, and for ``balanced``
accelerate's ``infer_auto_device_map`` with accelerate's ``cpu_offload_with_hook`` on the blocks it leaves on
the CPU. Two things they get wrong for quantized layers are fixed here:

* sizes: accelerate counts ``numel x dtype size`` of parameters, which misses bitsandbytes' scales and
  counts a quanto weight at its logical dtype; the device map is planned with the bytes each layer stores
  (packed data plus scales), so it fits what is really resident;
* movement: a layer must move with its scales as one unit. Before any offloader is attached each backend
  makes its layers ready (``Backend.offload_ready``; bitsandbytes registers its out-of-module scales as
  buffers), and blocks the map leaves on the CPU are moved whole with ``Module.to`` (never rebuilt from a
  weights map on the meta device, which cannot rebuild packed layers).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass
from unittest import mock

import torch

from .errors import PlanRefused
from .rules import device_type
from .spec import Plan

GiB = 2**30


def is_quantized(module: torch.nn.Module) -> bool:
    from .backends import backend_of

    return any(backend_of(m) is not None for m in module.modules())


def offload_ready(model: torch.nn.Module) -> None:
    """Ask each backend to make its layers in ``model`` move as one unit under every offloader."""
    from .backends import backend_of

    for module in model.modules():
        backend = backend_of(module)
        if backend is not None:
            backend.offload_ready(module)


# --- sizes ----------------------------------------------------------------------------------------------


def module_sizes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes stored under every module name ('' = the whole model), the way accelerate's
    ``compute_module_sizes`` reports them, but counting what quantized layers really hold."""
    from .post_load import own_state_nbytes

    sizes: dict[str, int] = defaultdict(int)
    seen: set[int] = set()
    alive: list = []
    for name, module in model.named_modules():
        _add(sizes, name, own_state_nbytes(module, seen, alive))
    return sizes


def _add(sizes: dict[str, int], name: str, nbytes: int) -> None:
    parts = name.split(".") if name else []
    for i in range(len(parts) + 1):
        sizes[".".join(parts[:i])] += nbytes


@contextlib.contextmanager
def _sizes_for_accelerate(sizes: dict[str, int]):
    """accelerate's planners compute sizes from parameters' dtypes; have them use ours for this call."""
    from accelerate.utils import modeling

    def compute_module_sizes(model, dtype=None, special_dtypes=None, buffers_only=False):
        return defaultdict(int) if buffers_only else defaultdict(int, sizes)

    with mock.patch.object(modeling, "compute_module_sizes", compute_module_sizes):
        yield


# --- the balanced device map -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceMap:
    """Where each part of a component goes, and the bytes that puts on each device."""

    placement: dict[str, object]  # module name -> GPU index or "cpu"
    bytes_on: dict[str, int]  # "cuda:0" / "cpu" -> bytes
    largest_block: tuple[str, int]  # the biggest unit that must be on the GPU at once
    budget: int | None  # bytes of GPU memory the plan allows, None = what is free

    def lines(self) -> list[str]:
        out = [f"  {name or '(whole model)'} -> {_device_name(d)}" for name, d in self.placement.items()]
        out += [f"  {dev}: {n / GiB:.3f} GiB" for dev, n in self.bytes_on.items()]
        name, size = self.largest_block
        out.append(
            f"  largest block: {name or '(whole model)'} {size / GiB:.3f} GiB (streamed in when on the CPU)"
        )
        return out


def _device_name(d) -> str:
    return f"cuda:{d}" if isinstance(d, int) else str(d)


def _max_memory(plan: Plan, index: int) -> dict | None:
    if plan.max_memory:
        return {index if k == "gpu" else k: v for k, v in plan.max_memory_bytes().items()}
    if plan.gpu_memory is not None:
        return {index: int(plan.gpu_memory * GiB), "cpu": 2**50}
    return None


def plan_device_map(
    model: torch.nn.Module, sizes: dict[str, int], plan: Plan, name: str = "component"
) -> DeviceMap:
    """accelerate's balanced device map of ``model`` (real or on the meta device) for ``sizes``.

    Transformer blocks (``_no_split_modules``) are never split, and a quantized layer is one module, so a
    layer never leaves its scales. A budget smaller than the largest block is refused: that block must be
    whole on the GPU while it runs."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_layer_size

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    index = torch.device(plan.device).index or 0
    max_memory = _max_memory(plan, index)
    with _sizes_for_accelerate(sizes):
        modules = [(n, m) for n, m in model.named_children()]
        largest, block_names = get_max_layer_size(modules, sizes, no_split)
        budget = (max_memory or {}).get(index)
        if budget is not None and largest > budget:
            raise PlanRefused(
                [
                    f"{name}: offload=balanced with {budget / GiB:.3f} GiB of GPU memory is less than its "
                    f"largest block ({block_names[0] if block_names else '?'}, {largest / GiB:.3f} GiB), "
                    "which must be whole on the GPU while it runs; fix: give gpu_memory="
                    f"{largest / GiB * 1.25:.2f} or more, or use offload=group (streams one block at a time)"
                ]
            )
        if max_memory is None:
            max_memory = get_balanced_memory(model, no_split_module_classes=no_split)
        placement = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    bytes_on: dict[str, int] = defaultdict(int)
    for part, device in placement.items():
        bytes_on[_device_name(device) if device != "disk" else "cpu"] += sizes.get(part, 0)
    largest_name = block_names[0] if block_names else ""
    return DeviceMap(dict(placement), dict(bytes_on), (largest_name, largest), budget)


def balance_model(model: torch.nn.Module, plan: Plan, name: str = "component") -> DeviceMap:
    """Split ``model`` between the GPU and the CPU by a quantization-aware balanced device map; blocks left
    on the CPU are moved to the GPU whole when they run and back after (accelerate's ``CpuOffload`` hooks,
    chained so at most one of them is on the GPU at a time)."""
    from accelerate import cpu_offload_with_hook

    offload_ready(model)
    device_map = plan_device_map(model, module_sizes(model), plan, name)
    main = torch.device(plan.device)
    on_cpu = []
    for part, device in device_map.placement.items():
        module = model.get_submodule(part) if part else model
        if device in ("cpu", "disk"):
            on_cpu.extend(_callable_parts(part, module))
        else:
            module.to(torch.device(main.type, device))
    hooks = []
    for _part, module in on_cpu:
        if next(module.parameters(), None) is None:  # buffers only: resident (accelerate's hook needs a
            module.to(main)  # parameter to tell where the module is)
            continue
        _, hook = cpu_offload_with_hook(
            module, execution_device=main, prev_module_hook=hooks[-1] if hooks else None
        )
        hooks.append(hook)
    if len(hooks) > 1:  # the first block of the next call offloads the last one of this call
        hooks[0].hook.prev_module_hook = hooks[-1]
    model.hf_device_map = {p: _device_name(d) for p, d in device_map.placement.items()}
    return device_map


def _callable_parts(name: str, module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The parts of a CPU-resident module that get a hook: containers (ModuleList, ModuleDict) are never
    called, so their hooks would never run: their children instead."""
    if isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)):
        return [p for n, c in module.named_children() for p in _callable_parts(f"{name}.{n}", c)]
    return [(name, module)]


# --- group offload -----------------------------------------------------------------------------------------


def group_options(plan: Plan) -> dict:
    """diffusers' group-offloading arguments from the plan."""
    options = dict(
        onload_device=torch.device(plan.device),
        offload_device=torch.device("cpu"),
        offload_type=f"{plan.group_type}_level",
        use_stream=plan.stream,
        record_stream=plan.record_stream,
        low_cpu_mem_usage=plan.low_cpu_mem_usage,
        non_blocking=plan.stream,
    )
    if plan.group_type == "block":
        options["num_blocks_per_group"] = plan.group_blocks
    return options


def group_offload(model: torch.nn.Module, plan: Plan) -> None:
    from diffusers.hooks import apply_group_offloading

    offload_ready(model)
    apply_group_offloading(model, **group_options(plan))


# --- placing -----------------------------------------------------------------------------------------------


def place_pipeline(pipe, plan: Plan) -> None:
    """Apply the plan's offload mode (or move to the device) once every component is loaded."""
    modules = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    if plan.offload != "none":
        for module in modules.values():
            offload_ready(module)
    if plan.offload == "model":
        pipe.enable_model_cpu_offload(device=plan.device)
    elif plan.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=plan.device)
    elif plan.offload == "group":
        for module in modules.values():
            group_offload(module, plan)
    elif plan.offload == "balanced":
        for name, module in modules.items():
            if is_quantized(module):
                balance_model(module, plan, name)
            else:
                module.to(plan.device)
    elif device_type(plan.device) != "cpu":
        pipe.to(plan.device)


def place_model(model: torch.nn.Module, plan: Plan, name: str) -> None:
    """A model loaded on its own: the same modes, with accelerate's hooks where a pipeline would add them."""
    if plan.offload == "none":
        return
    offload_ready(model)
    if plan.offload == "model":
        from accelerate import cpu_offload_with_hook

        cpu_offload_with_hook(model, execution_device=torch.device(plan.device))
    elif plan.offload == "sequential":
        from accelerate import cpu_offload

        cpu_offload(model, execution_device=torch.device(plan.device))
    elif plan.offload == "group":
        group_offload(model, plan)
    elif plan.offload == "balanced":
        balance_model(model, plan, name)
