"""Placing a loaded pipeline or model: a plain move, or one of accelerate's / diffusers' offload planners.

Every mode uses the libraries' own machinery: ``enable_model_cpu_offload`` and
``enable_sequential_cpu_offload`` (accelerate's hooks), diffusers' group offloading, and for ``balanced``
accelerate's ``infer_auto_device_map`` with diffusers' offload groups (streamed, prefetched) on the blocks it
leaves on the CPU. Two things they get wrong for quantized layers are fixed here:

* sizes: accelerate counts ``numel x dtype size`` of parameters, which misses bitsandbytes' scales and
  counts a quanto weight at its logical dtype; the device map is planned with the bytes each layer stores
  (packed data plus scales), so it fits what is really resident;
* movement: a layer must move with its scales as one unit. Before any offloader is attached each backend
  makes its layers ready (``Backend.offload_ready``; bitsandbytes registers its out-of-module scales as
  buffers), and blocks the map leaves on the CPU move by swapping their tensors' storage (never rebuilt
  from a weights map on the meta device, which cannot rebuild packed layers).
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

    seen: set[int] = set()
    alive: list = []
    return _sizes(
        model,
        lambda name, module: own_state_nbytes(module, seen, alive),
        lambda name, tensor_name, tensor: tensor.numel() * tensor.element_size(),
    )


def _sizes(model: torch.nn.Module, module_nbytes, tensor_nbytes) -> dict[str, int]:
    """Sizes by name for accelerate's planners: each module's own bytes added to it and every parent, and,
    for a module with children, each of its own tensors by name too (accelerate places those separately)."""
    sizes: dict[str, int] = defaultdict(int)
    for name, module in model.named_modules():
        _add(sizes, name, module_nbytes(name, module))
        if next(module.children(), None) is not None:
            for tensor_name, tensor in _own_tensors(module):
                sizes[f"{name}.{tensor_name}" if name else tensor_name] = tensor_nbytes(
                    name, tensor_name, tensor
                )
    return sizes


def _own_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]


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


@contextlib.contextmanager
def _quiet(logger: str):
    import logging

    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# --- the balanced device map -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceMap:
    """Where each part of a component goes, and the bytes that puts on each device."""

    placement: dict[str, object]  # module name -> GPU index or "cpu"
    bytes_on: dict[str, int]  # "cuda:0" / "cpu" -> bytes
    largest_block: tuple[str, int]  # the biggest unit that must be on the GPU at once
    budget: int | None  # bytes of GPU memory the plan allows, None = what is free
    # with several GPUs: "cuda:N" / "cpu" -> the budget this component was planned against
    budgets: dict[str, int] | None = None

    @property
    def whole(self) -> bool:
        """Placed whole on one GPU (diffusers' pipeline-level balanced assignment)."""
        return list(self.placement) == [""] and isinstance(self.placement[""], int)

    def lines(self) -> list[str]:
        out = [f"  {name or '(whole model)'} -> {_device_name(d)}" for name, d in self.placement.items()]
        for dev, n in self.bytes_on.items():
            cap = (self.budgets or {}).get(dev)
            out.append(f"  {dev}: {_size(n)}" + (f" (budget {_size(cap)})" if cap is not None else ""))
        name, size = self.largest_block
        out.append(f"  largest block: {name or '(whole model)'} {_size(size)} (streamed in when on the CPU)")
        return out


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.2f} MiB"


def _device_name(d) -> str:
    return f"cuda:{d}" if isinstance(d, int) else str(d)


def _max_memory(plan: Plan, index: int) -> dict | None:
    if plan.max_memory:
        return {index if k == "gpu" else k: v for k, v in plan.max_memory_bytes().items()}
    if plan.gpu_memory is not None:
        return {index: int(plan.gpu_memory * GiB), "cpu": 2**50}
    return None


def main_index(plan: Plan) -> int:
    """The plan's GPU: where inputs go and blocks left on the CPU run. ``device=cuda:N`` names it; with
    ``device=cuda`` it is the first GPU ``max_memory`` names, else GPU 0."""
    index = torch.device(plan.device).index
    if index is not None:
        return index
    indices = plan.gpu_indices()
    return indices[0] if indices else 0


def is_multi_gpu(plan: Plan) -> bool:
    """Whether the plan spreads over several GPUs (``max_memory`` budgets two or more GPU indices)."""
    return plan.offload == "balanced" and len(plan.gpu_indices()) > 1


def plan_device_map(
    model: torch.nn.Module,
    sizes: dict[str, int],
    plan: Plan,
    name: str = "component",
    max_memory: dict | None = None,
) -> DeviceMap:
    """accelerate's balanced device map of ``model`` (real or on the meta device) for ``sizes``.

    Transformer blocks (``_no_split_modules``) are never split, and a quantized layer is one module, so a
    layer never leaves its scales. A budget smaller than the largest block is refused: that block must be
    whole on the GPU while it runs. With several GPUs (``max_memory`` naming GPU indices; ``max_memory``
    here overrides the plan's, e.g. with what a pipeline's other components left), the blocks are spread
    over them by accelerate's ``get_balanced_memory`` and ``infer_auto_device_map``, every GPU's budget
    checked against the largest block."""
    if is_multi_gpu(plan):
        return _multi_gpu_map(model, sizes, plan, name, max_memory or _max_memory(plan, main_index(plan)))
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = _no_split(model)
    index = main_index(plan)
    max_memory = max_memory or _max_memory(plan, index)
    with _sizes_for_accelerate(sizes):
        largest_name, largest = largest_block(model, sizes)
        budget = (max_memory or {}).get(index)
        if budget is not None and largest > budget:
            raise PlanRefused(
                [
                    f"{name}: offload=balanced with {_size(budget)} of GPU memory is less than its largest "
                    f"block ({largest_name or '(whole model)'}, {_size(largest)}), which must be whole "
                    f"on the GPU while it runs; fix: give gpu_memory={largest * 1.25 / GiB:.3g} (GiB) or more, "
                    "or use offload=group (streams one block at a time)"
                ]
            )
        if max_memory is None:  # what is free on the plan's GPU (never the other GPUs of the host)
            free = get_balanced_memory(model, no_split_module_classes=no_split)
            max_memory = {k: v for k, v in free.items() if k in (index, "cpu")}
        placement = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    return DeviceMap(dict(placement), _bytes_on(placement, sizes), (largest_name, largest), budget)


def _bytes_on(placement: dict, sizes: dict[str, int]) -> dict[str, int]:
    bytes_on: dict[str, int] = defaultdict(int)
    for part, device in placement.items():
        bytes_on[_device_name(device) if device != "disk" else "cpu"] += sizes.get(part, 0)
    return dict(bytes_on)


def _multi_gpu_map(model, sizes: dict[str, int], plan: Plan, name: str, max_memory: dict) -> DeviceMap:
    """Blocks spread over several GPUs: accelerate's ``get_balanced_memory`` evens the budgets out and
    ``infer_auto_device_map`` places the blocks; where evening out would leave on the CPU blocks the
    budgets can hold, the map fills the GPUs in order up to their budgets instead."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = _no_split(model)
    largest_name, largest = largest_block(model, sizes)
    block = largest_name or "(whole model)"
    small = [k for k, v in max_memory.items() if isinstance(k, int) and v < largest]
    if small:
        raise PlanRefused(
            [
                f"{name}: offload=balanced with {_size(max_memory[k])} on GPU {k} is less than its largest "
                f"block ({block}, {_size(largest)}), which must be whole on one GPU while it runs; fix: give "
                f"max_memory {k}:{largest * 1.25 / GiB:.3g} (GiB) or more, or leave GPU {k} out of max_memory"
                for k in small
            ]
        )
    # accelerate warns of each budgeted GPU this machine lacks; planning on the CPU (check) is meant to work
    with _sizes_for_accelerate(sizes), _quiet("accelerate.utils.modeling"):
        placement = infer_auto_device_map(
            model, max_memory=dict(max_memory), no_split_module_classes=no_split
        )
        if sum(isinstance(k, int) for k in max_memory) > 1:
            even = get_balanced_memory(model, max_memory=dict(max_memory), no_split_module_classes=no_split)
            spread = infer_auto_device_map(model, max_memory=even, no_split_module_classes=no_split)
            if _bytes_on(spread, sizes).get("cpu", 0) <= _bytes_on(placement, sizes).get("cpu", 0):
                placement = spread
    budgets = {_device_name(k): v for k, v in max_memory.items() if k != "disk"}
    return DeviceMap(
        dict(placement),
        _bytes_on(placement, sizes),
        (largest_name, largest),
        max_memory.get(main_index(plan)),
        budgets,
    )


def plan_pipeline(
    models: dict[str, tuple[torch.nn.Module, dict[str, int]]], plan: Plan
) -> dict[str, DeviceMap]:
    """Where each component of a pipeline goes on several GPUs: diffusers' ``device_map="balanced"``
    assignment (``_assign_components_to_devices``: components largest first, whole, over the GPUs in turn)
    on the components' stored (quantization-aware) sizes; a component no GPU takes whole is split into
    blocks over what the others left (``plan_device_map``), the rest on the CPU. ``models``: name ->
    (model, sizes by module name), real or on the meta device."""
    from diffusers.pipelines.pipeline_loading_utils import _assign_components_to_devices

    budgets = _max_memory(plan, main_index(plan))
    totals = dict(
        sorted(((n, s[""]) for n, (_, s) in models.items()), key=lambda item: item[1], reverse=True)
    )
    gpus = dict(
        sorted(((k, v) for k, v in budgets.items() if isinstance(k, int)), key=lambda kv: kv[1], reverse=True)
    )
    assigned = _assign_components_to_devices(totals, gpus)
    left = dict(budgets)
    maps: dict[str, DeviceMap] = {}
    for device, names in assigned.items():
        if device == "cpu":  # diffusers keeps only the last of these; every unassigned one is split below
            continue
        for n in names:
            model, sizes = models[n]
            left[device] -= totals[n]
            maps[n] = DeviceMap(
                {"": device},
                {_device_name(device): totals[n]},
                largest_block(model, sizes),
                gpus[device],
                {_device_name(device): gpus[device]},
            )
    problems = []
    for n in totals:
        if n in maps:
            continue
        model, sizes = models[n]
        block, largest = largest_block(model, sizes)
        room = {k: v for k, v in left.items() if not isinstance(k, int) or v >= largest}
        if not any(isinstance(k, int) for k in room):
            taken = ", ".join(f"{m} on cuda:{d.placement['']}" for m, d in maps.items() if d.whole)
            problems.append(
                f"{n}: offload=balanced over GPUs {', '.join(str(k) for k in gpus)} leaves no GPU room for its "
                f"largest block ({block or '(whole model)'}, {_size(largest)}) after the components placed whole "
                f"({taken or 'none'}); fix: raise a GPU's budget in max_memory by {largest * 1.25 / GiB:.3g} GiB, "
                "or keep a component out of the plan's GPUs"
            )
            continue
        device_map = plan_device_map(model, sizes, plan, n, max_memory=room)
        for device, nbytes in device_map.bytes_on.items():
            key = int(device.split(":")[1]) if device.startswith("cuda:") else device
            if key in left:
                left[key] -= nbytes
        maps[n] = device_map
    if problems:
        raise PlanRefused(problems)
    return {n: maps[n] for n in models if n in maps}


def _no_split(model: torch.nn.Module) -> list[str]:
    return list(getattr(model, "_no_split_modules", None) or [])


def largest_block(model: torch.nn.Module, sizes: dict[str, int]) -> tuple[str, int]:
    """The biggest unit a balanced map cannot split (a ``_no_split_modules`` block, or a leaf module), and
    its bytes by ``sizes``: the least GPU memory a balanced split needs."""
    from accelerate.utils import get_max_layer_size

    size, names = get_max_layer_size(list(model.named_children()), sizes, _no_split(model))
    return (names[0] if names else ""), size


def balance_model(
    model: torch.nn.Module, plan: Plan, name: str = "component", device_map: DeviceMap | None = None
) -> DeviceMap:
    """Split ``model`` between the GPUs and the CPU by a quantization-aware balanced device map
    (``device_map``: one planned already, e.g. by ``plan_pipeline``).

    What the map puts on a GPU stays there; each block it leaves on the CPU becomes one of diffusers'
    offload groups (``ModuleGroup`` with its ``GroupOffloadingHook``) run on the plan's GPU. On CUDA the
    groups copy from pinned memory on a side stream and are chained so the next CPU block is copied while
    the current one runs (the first one while the GPU-resident blocks run); going back to the CPU is a
    pointer swap. With several GPUs, accelerate's hooks (``dispatch_model``) move each block's inputs to its
    GPU and the output back to the caller's device."""
    from diffusers.hooks.group_offloading import (
        GroupOffloadingConfig,
        ModuleGroup,
        _apply_group_offloading_hook,
    )

    offload_ready(model)
    if device_map is None:
        device_map = plan_device_map(model, module_sizes(model), plan, name)
    main = torch.device(plan.device)
    if main.type == "cuda" and main.index is None:
        main = torch.device("cuda", main_index(plan) if plan.gpu_indices() else torch.cuda.current_device())

    def on(device) -> torch.device:  # a map's GPU index on this machine (the CPU stands in on a CPU run)
        return torch.device(main.type, device) if main.type != "cpu" else main

    cpu = torch.device("cpu")
    on_cpu, on_gpus, tensors = [], {}, []
    for part, device in device_map.placement.items():
        module = _module_or_tensor(model, part)
        if isinstance(module, torch.Tensor):  # a module's own parameter or buffer: small, kept resident
            module.data = module.data.to(main)
            tensors.append(part)
        elif device in ("cpu", "disk"):
            on_cpu.extend(_callable_parts(part, module))
        else:
            module.to(on(device))
            on_gpus[part] = device
    if is_multi_gpu(plan):
        _add_device_hooks(model, on_gpus, main, cpu_blocks=bool(on_cpu), tensors=tensors)
    stream = torch.cuda.Stream(device=main) if main.type == "cuda" else None
    config = GroupOffloadingConfig(
        onload_device=main,
        offload_device=cpu,
        offload_type="block_level",
        non_blocking=stream is not None,
        record_stream=False,
        low_cpu_mem_usage=False,
        num_blocks_per_group=1,
        stream=stream,
    )
    groups = []
    for part, module in on_cpu:
        if next(module.parameters(), None) is None:  # buffers only: resident
            module.to(main)
            continue
        group = ModuleGroup(
            modules=[module],
            offload_device=cpu,
            onload_device=main,
            offload_leader=module,
            onload_leader=module,
            non_blocking=stream is not None,
            stream=stream,
            # With a stream, a group that loads itself must also wait for its copy: diffusers does that on
            # the path for groups nobody prefetched, which onload_self=False takes until the chain is built.
            onload_self=stream is None,
            group_id=f"{name}.{part}",
        )
        _apply_group_offloading_hook(module, group, config=config)
        groups.append((module, group))
    if stream is not None and groups:
        _keep_buffers_with_groups(model)
        _prefetch_in_execution_order(model, groups)
    model.hf_device_map = {p: _device_name(d) for p, d in device_map.placement.items()}
    return device_map


def _add_device_hooks(
    model: torch.nn.Module, on_gpus: dict, main: torch.device, *, cpu_blocks: bool, tensors: list[str]
) -> None:
    """accelerate's cross-device hooks for a model whose parts already sit on their GPUs: each part's inputs
    go to its GPU, the model's output back to the caller's device. ``dispatch_model`` where every part is on
    a GPU; with blocks on the CPU, the hooks ``dispatch_model`` attaches (accelerate's own
    ``attach_align_device_hook_on_blocks``) on the GPU parts only, since ``dispatch_model`` would rebuild the
    CPU blocks from a weights map on the meta device, which cannot rebuild packed layers; those blocks are
    diffusers' offload groups, which move their own inputs. ``tensors``: a split module's own parameters
    and buffers the map names, kept on the plan's GPU."""
    from accelerate import dispatch_model
    from accelerate.hooks import attach_align_device_hook_on_blocks

    devices = {part: (d if main.type == "cuda" else "cpu") for part, d in on_gpus.items()}
    main_device = main.index if main.type == "cuda" else "cpu"
    if not cpu_blocks:
        # (quiet: on a CPU run, where "cpu" stands in for each GPU, accelerate takes those parts for offloaded)
        with _quiet("accelerate.big_modeling"):
            every = {**devices, **dict.fromkeys(tensors, main_device)}
            dispatch_model(model, device_map=every, main_device=main_device, force_hooks=True)
    else:
        attach_align_device_hook_on_blocks(
            model,
            execution_device={**devices, "": main_device},
            offload={part: False for part in devices},
            skip_keys=None,
        )
    if main.type == "cuda":
        set_current_device(model, main.index)
        for part, index in on_gpus.items():
            set_current_device(model.get_submodule(part), index)


def set_current_device(module: torch.nn.Module, index: int) -> None:
    """While ``module`` runs, GPU ``index`` is the current CUDA device (an accelerate hook, composed after the
    ones there): kernels that launch on the current device, as Triton's do (NNCF's fused dequantization),
    then run where the module's tensors are, not on the GPU the caller had current."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class CurrentDevice(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            self.previous = torch.cuda.current_device()
            torch.cuda.set_device(index)
            return args, kwargs

        def post_forward(self, module, output):
            torch.cuda.set_device(self.previous)
            return output

    add_hook_to_module(module, CurrentDevice(), append=True)


def _module_or_tensor(model: torch.nn.Module, part: str):
    """What a device-map entry names: a module, or (accelerate places a split module's own tensors by
    name) a parameter or buffer."""
    if not part:
        return model
    try:
        return model.get_submodule(part)
    except AttributeError:
        parent, _, attr = part.rpartition(".")
        return getattr(model.get_submodule(parent) if parent else model, attr)


def _prefetch_in_execution_order(model: torch.nn.Module, groups: list) -> None:
    """Chain the CPU blocks' groups so each copies the next one in while it runs, in the order the first
    call runs them (module order is not run order: a UNet registers its up blocks before its mid block).
    Until then, and for a block a later call skips, a block is copied in when it runs."""
    order: list = []
    recorders = [
        module.register_forward_pre_hook(lambda m, args, g=group: order.append(g) if g not in order else None)
        for module, group in groups
    ]
    hook_of = {id(group): module._diffusers_hook.get_hook("group_offloading") for module, group in groups}

    def chain(module, args, output):
        for handle in recorders:
            handle.remove()
        finished.remove()
        for current, following in zip(order, order[1:], strict=False):
            hook_of[id(current)].next_group = following
            following.onload_self = False
        if order:
            first = order[0]
            first.onload_self = False
            # the first CPU block is copied in while the blocks resident on the GPU run
            model.register_forward_pre_hook(lambda m, a: first.onload_())

    finished = model.register_forward_hook(chain)


def _keep_buffers_with_groups(model: torch.nn.Module) -> None:
    """With streams, diffusers' groups copy their modules' buffers in but swap back only parameters and
    the group's own buffer list; put the buffers (bitsandbytes' scales among them) on that list, so they
    leave the GPU with their weights."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook("group_offloading") if registry is not None else None
        if hook is None or hook.group.stream is None:
            continue
        group = hook.group
        listed = {id(b) for b in group.buffers}
        for m in group.modules:
            for buffer in m.buffers():
                if id(buffer) not in listed and buffer in group.cpu_param_dict:
                    group.buffers.append(buffer)
                    listed.add(id(buffer))


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
    _keep_buffers_with_groups(model)


# --- placing -----------------------------------------------------------------------------------------------


def place_pipeline(pipe, plan: Plan) -> dict[str, DeviceMap] | None:
    """Apply the plan's offload mode (or move to the device) once every component is loaded. Returns the
    components' device maps of a balanced placement over several GPUs (None otherwise)."""
    modules = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    if plan.offload in ("model", "sequential"):  # balanced and group make their components ready themselves
        for module in modules.values():
            offload_ready(module)
    if plan.offload == "model":
        pipe.enable_model_cpu_offload(device=plan.device)
    elif plan.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=plan.device)
    elif plan.offload == "group":
        for module in modules.values():
            group_offload(module, plan)
    elif plan.offload == "balanced" and is_multi_gpu(plan):
        return balance_pipeline(pipe, modules, plan)
    elif plan.offload == "balanced":
        for name, module in modules.items():
            if is_quantized(module):
                balance_model(module, plan, name)
            else:
                module.to(plan.device)
    elif device_type(plan.device) != "cpu":
        pipe.to(plan.device)
    return None


def balance_pipeline(pipe, modules: dict[str, torch.nn.Module], plan: Plan) -> dict[str, DeviceMap]:
    """Several GPUs: every component (quantized or not) where ``plan_pipeline`` puts it, by the bytes it
    stores; a component placed whole gets accelerate's hooks (``dispatch_model``, as diffusers' and
    transformers' ``device_map`` loads do), a split one ``balance_model``'s. The pipeline's ``hf_device_map``
    then says it is device-mapped, so diffusers refuses ``pipe.to()`` and model offload on it."""
    from accelerate import dispatch_model

    for module in modules.values():
        offload_ready(module)
    maps = plan_pipeline({n: (m, module_sizes(m)) for n, m in modules.items()}, plan)
    cuda = device_type(plan.device) == "cuda"
    for name, device_map in maps.items():
        module = modules[name]
        if device_map.whole:
            device = device_map.placement[""]
            module.to(torch.device("cuda", device) if cuda else "cpu")
            with _quiet("accelerate.big_modeling"):
                dispatch_model(module, device_map={"": device if cuda else "cpu"}, force_hooks=True)
            if cuda:
                set_current_device(module, device)
            module.hf_device_map = {"": _device_name(device)}
        else:
            balance_model(module, plan, name, device_map)
    pipe.hf_device_map = {n: d.placement[""] if d.whole else "+".join(d.bytes_on) for n, d in maps.items()}
    return maps


def place_model(model: torch.nn.Module, plan: Plan, name: str) -> DeviceMap | None:
    """A model loaded on its own: the same modes, with accelerate's hooks where a pipeline would add them.
    Returns the device map of a balanced placement (None for the other modes)."""
    if plan.offload in ("model", "sequential"):  # balanced and group make the model ready themselves
        offload_ready(model)
    if plan.offload == "model":
        from accelerate import cpu_offload_with_hook

        # Moved to the GPU at its first call; ``model.quant_offload_hook.offload()`` sends it back (in a
        # pipeline, the pipeline does that after each call).
        _, model.quant_offload_hook = cpu_offload_with_hook(model, execution_device=torch.device(plan.device))
    elif plan.offload == "sequential":
        from accelerate import cpu_offload

        cpu_offload(model, execution_device=torch.device(plan.device))
    elif plan.offload == "group":
        group_offload(model, plan)
    elif plan.offload == "balanced":
        return balance_model(model, plan, name)
    return None


# --- planning before any weight is read --------------------------------------------------------------------


def planned_sizes(model: torch.nn.Module, spec, kind: str, dtype: torch.dtype | None) -> dict[str, int]:
    """Bytes per module name of ``model`` (on the meta device) once ``spec`` has quantized it: the
    backend's bytes per parameter (packed data plus scales) for each layer it takes, the load dtype for the
    rest."""
    from .backends import get_backend
    from .components import select_linears

    chosen = set(select_linears(model, spec, kind)) if spec is not None else set()
    per_param = get_backend(spec.backend).bytes_per_param(spec) if spec is not None else 0.0

    def tensor_nbytes(name: str, tensor_name: str, t: torch.Tensor) -> int:
        if name in chosen and tensor_name == "weight":
            return int(t.numel() * per_param)
        if dtype is not None and t.is_floating_point():
            return t.numel() * dtype.itemsize
        return t.numel() * t.element_size()

    return _sizes(
        model,
        lambda name, module: sum(tensor_nbytes(name, n, t) for n, t in _own_tensors(module)),
        tensor_nbytes,
    )


def planned_maps(plan: Plan, folder: str, components, dtype=None) -> dict[str, DeviceMap]:
    """The balanced device map of every quantized component of the pipeline in ``folder``, from configs
    alone (models built on the meta device; no weight file is opened), at the load's ``dtype`` (default: the
    plan's, else float32 as the libraries load). Raises PlanRefused where a budget is smaller than a
    component's largest block."""
    import os

    from .hooks import _import_class
    from .streaming import build_empty

    maps = {}
    if plan.offload != "balanced" or (plan.gpu_memory is None and not plan.max_memory):
        return maps
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):  # "auto", a per-component dict: the plan's, else float32
        dtype = getattr(torch, plan.dtype) if plan.dtype else None
    multi = is_multi_gpu(plan)  # then every component is placed, quantized or not
    models = {}
    for c in components:
        spec = plan.spec_for(c.name, c.kind, pipeline=True)
        cls = _import_class("", c.class_name)
        sub = os.path.join(folder, c.name)
        if (spec is None and not multi) or cls is None or not os.path.isdir(sub):
            continue
        model = build_empty(cls, sub)
        if not isinstance(model, torch.nn.Module):
            continue
        models[c.name] = (model, planned_sizes(model, spec, c.kind, dtype))
    if multi:
        return plan_pipeline(models, plan)
    return {n: plan_device_map(model, sizes, plan, n) for n, (model, sizes) in models.items()}
