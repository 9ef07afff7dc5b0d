"""fp8 single files (plain, ComfyUI scaled fp8, ComfyUI mixed fp8) loaded as they are: fp8 in memory.

Plain diffusers upcasts an fp8 file to ``torch_dtype`` at load, which throws the saving away. Here each
Linear whose weight the file stores in float8 becomes quanto's ``QLinear`` with a float8 weight: the file's
bytes unchanged, the file's scale (1 for plain fp8) as quanto's per-row scale, upcast per layer in the
forward. The model then carries quanto's quantizer and config like any quanto model (save, LoRA,
dequantize). float8 tensors that are not a Linear's weight are dequantized to the load dtype.

Files in the original layout (``double_blocks.0.img_attn.qkv...``) go through diffusers' own converter for
the model class. The converter splits and renames tensors but knows nothing of the scales, so it runs on
the fp8 bytes viewed as uint8 under a torch function mode that carries each tensor's per-row scales through
every split, cat and view. An op that would compute on the bytes (the converter doing arithmetic on a
weight) is refused: the result would be silently wrong.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

from .components import Component, count_linears, fp32_modules
from .detect import COMFY_LAYER_MARKER, COMFY_SCALED_MARKER, Detected, looks_like_a_scale
from .errors import QuantError
from .rules import enforce
from .spec import Plan, Spec

FP8_FORMATS = ("fp8", "comfy-scaled-fp8", "comfy-quant")
_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# per-layer scale names: ComfyUI's legacy scaled fp8, then its mixed quantization
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
# activation scales serve fp8 matmuls of the activations; a weight upcast per layer has no use for them
_DROPPED_SUFFIXES = (".scale_input", ".input_scale", COMFY_LAYER_MARKER)
SPEC = Spec("quanto", "qfloat8")


class NotRearranged(QuantError):
    """The converter computed on an fp8 weight instead of moving it."""


def load_fp8_file(load, path: str, kwargs: dict, detected: Detected, plan: Plan | None) -> torch.nn.Module:
    """``load.cls`` from the fp8 single file at ``path`` (``detected`` by its header and loadable), weights
    kept fp8."""
    plan = plan or Plan()
    from .backends import get_backend

    quanto = get_backend("quanto")
    quanto.require()
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    checkpoint = load_file(path)
    sources, tags = _sources(checkpoint, path)
    config = _model_config(load.cls, checkpoint, kwargs, path)
    with init_empty_weights():
        model = load.cls.from_config(config)
    converted = _convert(load.cls, model, config, sources, tags, kwargs, path)

    dtype = load.dtype or torch.float32
    keep = fp32_modules(model, dtype)
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    bytes_before = _nbytes_at(model, dtype)
    fp8_layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    for key, value in converted.items():
        tag = tags.get(id(value))
        kept_fp32 = bool(keep.intersection(key.split(".")))
        target = torch.float32 if kept_fp32 else dtype
        if tag is None or tag[0] is not value:
            plain[key] = value.to(target) if value.is_floating_point() else value
            continue
        _, rows, fp8 = tag
        data = value.view(fp8)
        layer = key.removesuffix(".weight")
        if key.endswith(".weight") and layer in linears and data.dim() == 2 and not kept_fp32:
            fp8_layers[layer] = (data, rows)
        else:  # a float8 tensor that is no Linear's weight: dequantized, as the file's scale says
            plain[key] = (data.float() * rows.view(-1, *[1] * (data.dim() - 1))).to(target)
    if fp8_layers:  # the rules for quanto fp8 layers (a VAE read out of an all-in-one file has none)
        enforce(
            Plan(entries=((load.name, SPEC),), offload=plan.offload, device=plan.device),
            [Component(load.name, load.kind, load.cls.__name__)],
        )
    # (scales of layouts not known here were refused by _sources, before the converter ran)
    result = model.load_state_dict(plain, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k.removesuffix(".weight") not in fp8_layers]
    if missing:
        raise QuantError(
            f"{path}: the file has no weights for {len(missing)} of {load.cls.__name__}'s tensors "
            f"(e.g. {', '.join(missing[:3])}); fix: give the config of the model this file holds (config=)"
        )
    for layer, (data, rows) in fp8_layers.items():
        linear = model.get_submodule(layer)
        if tuple(data.shape) != (linear.out_features, linear.in_features):
            raise QuantError(
                f"{path}: {layer}.weight is {tuple(data.shape)} in the file, {load.cls.__name__} wants "
                f"{(linear.out_features, linear.in_features)}; fix: give the config of the model this file holds"
            )
        # quanto's activation scales stay at 1: the weight is upcast per layer, activations are not quantized
        tensors = {
            "weight._data": data,
            "weight._scale": rows.view(-1, 1),
            # two tensors, not one shared: saving refuses shared memory
            "input_scale": torch.ones((), dtype=dtype),
            "output_scale": torch.ones((), dtype=dtype),
        }
        if linear.bias is not None:
            tensors["bias"] = linear.bias.data
        built = quanto.layer_from_state(
            tensors,
            {"in_features": linear.in_features, "out_features": linear.out_features},
            dtype,
            dtype,
            "cpu",
        )
        parent, _, attr = layer.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, built)
    model.to(load.device).eval()
    load.folder = None
    if not fp8_layers:
        return model
    return load.record(model, SPEC, "pre-quantized", bytes_before, len(fp8_layers), count_linears(model))


def _sources(checkpoint: dict[str, torch.Tensor], path: str):
    """The checkpoint without its scale and marker tensors, each float8 tensor as a uint8 view tagged
    with its per-row scales (float32) and its float8 dtype."""
    scales = {}
    for key, value in checkpoint.items():
        suffix = next((s for s in _SCALE_SUFFIXES if key.endswith(s)), None)
        if suffix is not None:
            scales[key[: -len(suffix)] + ".weight"] = value
    unknown = [
        k for k in checkpoint if looks_like_a_scale(k) and not k.endswith(_SCALE_SUFFIXES + _DROPPED_SUFFIXES)
    ]
    if unknown:  # a scale nobody applies would leave its weight silently wrong
        raise QuantError(
            f"{path}: scale tensors of a layout not known here (e.g. {', '.join(unknown[:3])}); "
            "fix: load the file with the tool that wrote it"
        )
    sources, tags = {}, {}
    for key, value in checkpoint.items():
        if key.endswith(_SCALE_SUFFIXES + _DROPPED_SUFFIXES) or key.rpartition(".")[2] == COMFY_SCALED_MARKER:
            continue
        if value.dtype in _FLOAT8:
            view = value.view(torch.uint8)
            rows = _rows(scales.get(key), value.shape[0] if value.dim() else 1, key, path)
            tags[id(view)] = (view, rows, value.dtype)
            value = view
        sources[key] = value
    return sources, tags


def _rows(scale: torch.Tensor | None, n: int, key: str, path: str) -> torch.Tensor:
    if scale is None:
        return torch.ones(n)
    # one scale per tensor (ComfyUI's), or one per row; never per input channel or per block
    if tuple(scale.shape) in ((), (1,)):
        return scale.float().reshape(1).expand(n).clone()
    if tuple(scale.shape) in ((n,), (n, 1)):
        return scale.float().flatten().clone()
    raise QuantError(
        f"{path}: the scale of {key} has shape {tuple(scale.shape)}; expected one per tensor or one per row "
        f"({n}); fix: load the file with the tool that wrote it"
    )


def _model_config(cls: type, checkpoint: dict, kwargs: dict, path: str) -> dict:
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


def _convert(cls, model, config, sources: dict, tags: dict, kwargs: dict, path: str) -> dict:
    """The checkpoint in diffusers' keys: as it is when it already has them, else through diffusers'
    converter for ``cls`` with the scales carried along."""
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
    with _CarryScales(tags):
        try:
            # diffusers pops config= before the mapping kwargs; so do we
            extra = {k: v for k, v in kwargs.items() if k not in ("config", "checkpoint")}
            return convert(
                config=config, checkpoint=dict(sources), **_get_mapping_function_kwargs(convert, **extra)
            )
        except NotRearranged as e:
            raise QuantError(
                f"{path}: diffusers' {cls.__name__} converter computes on the weights ({e}), so they cannot "
                "stay fp8; fix: load the file with plain diffusers (hooks off: upcast at load), or convert it "
                "to diffusers' layout first"
            ) from None


def _nbytes_at(model: torch.nn.Module, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return sum(
        t.numel() * (size if t.is_floating_point() else t.element_size()) for t in model.state_dict().values()
    )


# Ops that only move bytes. The value says how the per-row scales follow: "split" (rows split like dim 0),
# "cat" (rows concatenated along dim 0), "same" (dim 0 kept when its size is), "index" (rows indexed like
# dim 0), "turn" (dim 0 may move: only for scales equal on every row).
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


class _CarryScales(TorchFunctionMode):
    """Carry each tagged tensor's per-row scales through the ops a converter runs on it; refuse any other op."""

    def __init__(self, tags: dict):
        super().__init__()
        self.tags = tags  # id(tensor) -> (tensor, rows, float8 dtype); holding the tensor keeps its id unique

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
            raise NotRearranged(f"{name} writes into a float8 weight or from one")
        out = func(*args, **kwargs)
        if not _holds_tensors(out):
            return out  # metadata: shape, dtype, size
        how = _MOVES.get(name)
        if how is None or (name == "to" and isinstance(out, torch.Tensor) and out.dtype != torch.uint8):
            raise NotRearranged(f"{name} on a float8 weight")
        if how == "cat":
            inputs = list(args[0] if args else kwargs.get("tensors", ()))
        else:
            inputs = [args[0] if args else kwargs.get("input")]
        tagged = [self._tag(t) for t in inputs]
        inside = {id(t) for t in inputs}
        stray = [t for t in flat if self._tag(t) is not None and id(t) not in inside]
        if stray or any(t is None for t in tagged) or len({t[2] for t in tagged}) > 1:
            raise NotRearranged(f"{name} mixes a float8 weight with other tensors")
        rows, fp8 = tagged[0][1], tagged[0][2]
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
            self.tags[id(o)] = (o, piece, fp8)
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


# --- writing ComfyUI's scaled fp8 single files ---------------------------------------------------------------

FP8_MAX = 448.0  # the largest float8_e4m3fn value


def _flux_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel state dict in Flux's original (BFL) keys: the inverse of diffusers'
    ``convert_flux_transformer_checkpoint_to_diffusers`` (which ComfyUI and diffusers both read)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return sd[key]

    def both(src: str, dst: str) -> None:  # a Linear's weight and bias
        for part in ("weight", "bias"):
            if f"{src}.{part}" in sd:
                out[f"{dst}.{part}"] = take(f"{src}.{part}")

    def fused(srcs: list[str], dst: str) -> None:
        for part in ("weight", "bias"):
            out[f"{dst}.{part}"] = torch.cat([take(f"{s}.{part}") for s in srcs])

    for src, dst in [
        ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
        ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
        ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
        ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
        ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
        ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
        ("context_embedder", "txt_in"),
        ("x_embedder", "img_in"),
        ("proj_out", "final_layer.linear"),
    ]:
        both(src, dst)
    for part in ("weight", "bias"):  # diffusers keeps (scale, shift); the original (shift, scale)
        scale, shift = take(f"norm_out.linear.{part}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{part}"] = torch.cat([shift, scale])
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")}
    for i in sorted(blocks):
        d, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
        both(f"{d}.norm1.linear", f"{o}.img_mod.lin")
        both(f"{d}.norm1_context.linear", f"{o}.txt_mod.lin")
        fused([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], f"{o}.img_attn.qkv")
        fused([f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], f"{o}.txt_attn.qkv")
        for src, dst in [
            ("attn.norm_q", "img_attn.norm.query_norm"),
            ("attn.norm_k", "img_attn.norm.key_norm"),
            ("attn.norm_added_q", "txt_attn.norm.query_norm"),
            ("attn.norm_added_k", "txt_attn.norm.key_norm"),
        ]:
            out[f"{o}.{dst}.scale"] = take(f"{d}.{src}.weight")
        both(f"{d}.ff.net.0.proj", f"{o}.img_mlp.0")
        both(f"{d}.ff.net.2", f"{o}.img_mlp.2")
        both(f"{d}.ff_context.net.0.proj", f"{o}.txt_mlp.0")
        both(f"{d}.ff_context.net.2", f"{o}.txt_mlp.2")
        both(f"{d}.attn.to_out.0", f"{o}.img_attn.proj")
        both(f"{d}.attn.to_add_out", f"{o}.txt_attn.proj")
    singles = {int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")}
    for i in sorted(singles):
        d, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        both(f"{d}.norm.linear", f"{o}.modulation.lin")
        fused([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"], f"{o}.linear1")
        out[f"{o}.norm.query_norm.scale"] = take(f"{d}.attn.norm_q.weight")
        out[f"{o}.norm.key_norm.scale"] = take(f"{d}.attn.norm_k.weight")
        both(f"{d}.proj_out", f"{o}.linear2")
    left = sorted(set(sd) - used)
    if left:
        raise QuantError(f"the Flux key map does not cover {len(left)} tensors (e.g. {', '.join(left[:3])})")
    return out


_ORIGINAL_LAYOUTS = {"FluxTransformer2DModel": _flux_to_original}


def require_original_layout(class_name: str) -> None:
    """Refuse a model class whose original key layout this package cannot write."""
    if class_name not in _ORIGINAL_LAYOUTS:
        raise QuantError(
            f"--quant fp8 writes ComfyUI's scaled fp8 layout, known here for {', '.join(_ORIGINAL_LAYOUTS)} "
            f"(not {class_name}); fix: --quant quanto:qfloat8 (a folder) or a gguf:<type> file"
        )


def write_scaled_fp8(model: torch.nn.Module, path: str) -> Counter:
    """Write ``model`` as a ComfyUI scaled fp8 file in its original key layout: each 2-D weight inside the
    transformer blocks as float8_e4m3fn with a float32 ``.scale_weight`` (its absmax / 448), the rest in
    the model's dtype, and the ``scaled_fp8`` marker. Written to a temporary name, then renamed. Returns
    how many tensors of each dtype were written."""
    from safetensors.torch import save_file

    from .files import replacing

    require_original_layout(type(model).__name__)
    original = _ORIGINAL_LAYOUTS[type(model).__name__]({k: v.detach() for k, v in model.state_dict().items()})
    tensors: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for key, value in original.items():
        in_block = key.startswith(("double_blocks.", "single_blocks."))
        if in_block and key.endswith(".weight") and value.dim() == 2:
            w = value.float()
            scale = (w.abs().max() / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
            tensors[key] = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            tensors[key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(())
        else:
            tensors[key] = value.contiguous()
    with replacing(path) as tmp:
        save_file(tensors, tmp)
    return Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())
