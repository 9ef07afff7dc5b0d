"""diffusers' single-file converters run on quantized weights without computing on them.

A converter renames, splits and joins a checkpoint's tensors on the way to diffusers' keys; it knows
nothing of quantization. Each quantized weight goes in as a stand-in tagged with its rows (per-row scales
for fp8; row ids for packed 4-bit weights) and a torch function mode carries those rows through every
split, cat and view. An op that would compute on the bytes is refused: its result would be silently wrong.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from .errors import QuantError


class NotRearranged(QuantError):
    """The converter computed on a quantized weight instead of moving it."""


def model_config(cls: type, checkpoint: dict, kwargs: dict, path: str) -> dict:
    """The diffusers config, as ``from_single_file`` finds it: ``config=`` (a folder or repo), else
    inferred from the checkpoint's keys (a repo id, which needs the hub or its cache)."""
    config, subfolder = kwargs.get("config"), kwargs.get("subfolder")
    if config is None:
        from diffusers.loaders.single_file_model import (
            SINGLE_FILE_LOADABLE_CLASSES,
            _get_single_file_loadable_mapping_class,
        )
        from diffusers.loaders.single_file_utils import fetch_diffusers_config

        inferred = dict(fetch_diffusers_config(checkpoint))
        config = inferred["pretrained_model_name_or_path"]
        mapping = SINGLE_FILE_LOADABLE_CLASSES.get(_get_single_file_loadable_mapping_class(cls) or "", {})
        subfolder = subfolder or mapping.get("default_subfolder") or inferred.get("subfolder")
    try:
        return cls.load_config(config, subfolder=subfolder, local_files_only=kwargs.get("local_files_only"))
    except (OSError, ValueError) as e:
        raise QuantError(
            f"{path}: no config for {cls.__name__} ({config!r}: {str(e).splitlines()[0][:200]}); fix: pass "
            "config=<a local folder with this model's config.json>"
        ) from None


def convert_checkpoint(
    cls, model, config, sources: dict, tags: dict, kwargs: dict, path: str, kept: str
) -> dict:
    """The checkpoint in diffusers' keys: as it is when it already has them, else through diffusers'
    converter for ``cls`` with the rows of the ``tags``' tensors carried along (``kept``: what the
    weights stay, for the error when the converter computes on them)."""
    from diffusers.loaders.single_file_model import (
        SINGLE_FILE_LOADABLE_CLASSES,
        _get_mapping_function_kwargs,
        _get_single_file_loadable_mapping_class,
        _should_convert_state_dict_to_diffusers,
    )

    if not _should_convert_state_dict_to_diffusers(model.state_dict(), sources):
        return sources
    mapping = _get_single_file_loadable_mapping_class(cls)
    if mapping is None:
        raise QuantError(f"{path}: diffusers has no single-file converter for {cls.__name__}")
    convert = SINGLE_FILE_LOADABLE_CLASSES[mapping]["checkpoint_mapping_fn"]
    with CarryRows(tags):
        try:
            # diffusers pops config= before the mapping kwargs; so do we
            extra = {k: v for k, v in kwargs.items() if k not in ("config", "checkpoint")}
            return convert(
                config=config, checkpoint=dict(sources), **_get_mapping_function_kwargs(convert, **extra)
            )
        except NotRearranged as e:
            raise QuantError(
                f"{path}: diffusers' {cls.__name__} converter computes on the weights ({e}), so they cannot "
                f"stay {kept}; fix: load the file with plain diffusers (hooks off: upcast at load), or convert it "
                "to diffusers' layout first"
            ) from None


def finish_load(
    load,
    model,
    path: str,
    plan,
    spec,
    backend,
    plain: dict,
    layers: dict[str, tuple[tuple[int, int], dict]],
    bytes_before: int,
):
    """The end of a single-file load: ``plain`` tensors into ``model``, each quantized Linear in ``layers``
    (layer -> (the file's weight shape, the tensors ``backend`` builds its layer from)) swapped in, the rules
    for ``spec`` enforced first, and the load recorded (``bytes_before``: the model at the load dtype). A tensor the model wants and the file lacks is an
    error naming the fix."""
    from .components import Component, count_linears
    from .rules import enforce
    from .spec import Plan

    if layers:  # (a VAE read out of an all-in-one file has no quantized layers, and no rules to meet)
        enforce(
            Plan(entries=((load.name, spec),), offload=plan.offload, device=plan.device),
            [Component(load.name, load.kind, load.cls.__name__)],
        )
    result = model.load_state_dict(plain, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k.removesuffix(".weight") not in layers]
    if missing:
        raise QuantError(
            f"{path}: the file has no weights for {len(missing)} of {load.cls.__name__}'s tensors "
            f"(e.g. {', '.join(missing[:3])}); fix: give the config of the model this file holds (config=)"
        )
    dtype = load.dtype or torch.float32
    for layer, (shape, tensors) in layers.items():
        linear = model.get_submodule(layer)
        if tuple(shape) != (linear.out_features, linear.in_features):
            raise QuantError(
                f"{path}: {layer}.weight is {tuple(shape)} in the file, {type(model).__name__} wants "
                f"{(linear.out_features, linear.in_features)}; fix: give the config of the model this file holds"
            )
        if linear.bias is not None:
            tensors["bias"] = linear.bias.data
        config = {"in_features": linear.in_features, "out_features": linear.out_features}
        built = backend.layer_from_state(tensors, config, dtype, dtype, "cpu")
        parent, _, attr = layer.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, built)
    model.to(load.device).eval()
    load.folder = None
    if not layers:
        return model
    return load.record(model, spec, "pre-quantized", bytes_before, len(layers), count_linears(model))


def nbytes_at(model: torch.nn.Module, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return sum(
        t.numel() * (size if t.is_floating_point() else t.element_size()) for t in model.state_dict().values()
    )


# Ops that only move bytes. The value says how the rows follow: "split" (rows split like dim 0),
# "cat" (rows concatenated along dim 0), "same" (dim 0 kept when its size is), "index" (rows indexed like
# dim 0), "turn" (dim 0 may move: only for rows that are all equal, like one scale per tensor).
_MOVES = {
    "chunk": "split",
    "split": "split",
    "tensor_split": "split",
    "split_with_sizes": "split",
    "cat": "cat",
    "concat": "cat",
    "concatenate": "cat",
    "__getitem__": "index",
    "narrow": "same",
    "contiguous": "same",
    "clone": "same",
    "detach": "same",
    "view": "same",
    "reshape": "same",
    "flatten": "same",
    "squeeze": "same",
    "unsqueeze": "same",
    "cpu": "same",
    "to": "same",
    "t": "turn",
    "transpose": "turn",
    "permute": "turn",
}


class CarryRows(TorchFunctionMode):
    """Carry each tagged tensor's rows (a tensor with one entry per row: scales, or row ids) through the ops a
    converter runs on it; refuse any other op."""

    def __init__(self, tags: dict):
        super().__init__()
        # id(tensor) -> (tensor, rows, kind); holding the tensor keeps its id unique; tensors of two kinds never mix
        self.tags = tags

    def _tag(self, t):
        entry = self.tags.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry if entry is not None and entry[0] is t else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = torch.utils._pytree.tree_flatten((args, kwargs))
        if not any(self._tag(t) for t in flat):
            return func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if name in ("__setitem__", "copy_", "set_") or (name.endswith("_") and not name.startswith("__")):
            raise NotRearranged(f"{name} writes into a quantized weight or from one")
        out = func(*args, **kwargs)
        if not _holds_tensors(out):
            return out  # metadata: shape, dtype, size
        how = _MOVES.get(name)
        if how is None or (name == "to" and isinstance(out, torch.Tensor) and out.dtype != torch.uint8):
            raise NotRearranged(f"{name} on a quantized weight")
        if how == "cat":
            inputs = list(args[0] if args else kwargs.get("tensors", ()))
        else:
            inputs = [args[0] if args else kwargs.get("input")]
        tagged = [self._tag(t) for t in inputs]
        inside = {id(t) for t in inputs}
        stray = [t for t in flat if self._tag(t) is not None and id(t) not in inside]
        if stray or any(t is None for t in tagged) or len({t[2] for t in tagged}) > 1:
            raise NotRearranged(f"{name} mixes a quantized weight with other tensors")
        rows, kind = tagged[0][1], tagged[0][2]
        dim = _dim_arg(name, args, kwargs, inputs[0].dim())
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        if how == "split" and dim == 0:
            pieces = list(func(rows, _split_arg(args, kwargs), dim=0))
        elif how == "cat" and dim == 0:
            pieces = [torch.cat([t[1] for t in tagged])]
        elif how == "index" and _keeps_rows(args[1]):
            first = args[1][0] if isinstance(args[1], tuple) else args[1]
            pieces = [rows[first]]
        else:  # dim 0 kept, or moved: the same scales for every row of every input, or refused
            same = all(torch.equal(t[1], rows) for t in tagged) and bool(torch.all(rows == rows[0]))
            if how in ("turn", "index") and not same:
                raise NotRearranged(f"{name} moves the rows of a weight with per-row scales")
            if how == "cat" and not all(torch.equal(t[1], rows) for t in tagged):
                raise NotRearranged(f"{name} joins weights with different scales along a later dim")
            pieces = [rows] * len(outs)
        for o, piece in zip(outs, pieces, strict=True):
            n = o.shape[0] if o.dim() else 1
            if piece.numel() != n:  # dim 0 changed size (a reshape or a transpose)
                if not all(bool(torch.all(t[1] == rows[0])) for t in tagged):
                    raise NotRearranged(f"{name} moves the rows of a weight with per-row scales")
                piece = rows[:1].expand(n).clone()
            self.tags[id(o)] = (o, piece, kind)
        return out


def _holds_tensors(out) -> bool:
    if isinstance(out, torch.Tensor):
        return True
    return isinstance(out, (list, tuple)) and bool(out) and all(isinstance(o, torch.Tensor) for o in out)


_DIM_POSITION = {
    "chunk": 2,
    "split": 2,
    "tensor_split": 2,
    "split_with_sizes": 2,
    "cat": 1,
    "concat": 1,
    "concatenate": 1,
    "narrow": 1,
    "transpose": 1,
}


def _dim_arg(name: str, args: tuple, kwargs: dict, ndim: int) -> int:
    """The op's dim (``dim=``, ``axis=`` or positional), made non-negative."""
    dim = kwargs.get("dim", kwargs.get("axis"))
    if dim is None:
        index = _DIM_POSITION.get(name)
        dim = args[index] if index is not None and len(args) > index else 0
    return dim % ndim if ndim and isinstance(dim, int) else 0


def _split_arg(args: tuple, kwargs: dict):
    """The sizes or count a chunk / split was called with, positional or by any of its keyword names."""
    if len(args) > 1:
        return args[1]
    for key in (
        "chunks",
        "split_size_or_sections",
        "split_size",
        "sections",
        "indices_or_sections",
        "split_sizes",
    ):
        if key in kwargs:
            return kwargs[key]
    raise NotRearranged("a split without sizes")


def _keeps_rows(index) -> bool:
    """An index whose first element slices dim 0 and whose others only slice or pick later dims."""
    parts = index if isinstance(index, tuple) else (index,)
    return bool(parts) and isinstance(parts[0], slice) and all(isinstance(p, (slice, int)) for p in parts[1:])
