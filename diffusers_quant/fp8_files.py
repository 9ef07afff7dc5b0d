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

from .components import fp32_modules
from .convert import convert_checkpoint, finish_load, model_config, nbytes_at
from .detect import COMFY_LAYER_MARKER, COMFY_SCALED_MARKER, Detected, looks_like_a_scale
from .errors import QuantError
from .layouts import ORIGINAL_LAYOUTS, require_original_layout
from .spec import Plan, Spec

FP8_FORMATS = ("fp8", "comfy-scaled-fp8", "comfy-quant")
_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# per-layer scale names: ComfyUI's legacy scaled fp8, then its mixed quantization
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
# activation scales serve fp8 matmuls of the activations; a weight upcast per layer has no use for them
_DROPPED_SUFFIXES = (".scale_input", ".input_scale", COMFY_LAYER_MARKER)
SPEC = Spec("quanto", "qfloat8")


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
    config = model_config(load.cls, checkpoint, kwargs, path)
    with init_empty_weights():
        model = load.cls.from_config(config)
    converted = convert_checkpoint(load.cls, model, config, sources, tags, kwargs, path, "fp8")

    dtype = load.dtype or torch.float32
    keep = fp32_modules(model, dtype)
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    bytes_before = nbytes_at(model, dtype)
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
    # (scales of layouts not known here were refused by _sources, before the converter ran)
    # quanto's activation scales stay at 1: the weight is upcast per layer, activations are not quantized;
    # two tensors, not one shared: saving refuses shared memory
    layers = {
        layer: (
            tuple(data.shape),
            {
                "weight._data": data,
                "weight._scale": rows.view(-1, 1),
                "input_scale": torch.ones((), dtype=dtype),
                "output_scale": torch.ones((), dtype=dtype),
            },
        )
        for layer, (data, rows) in fp8_layers.items()
    }
    return finish_load(load, model, path, plan, SPEC, quanto, plain, layers, bytes_before)


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


# --- writing ComfyUI's scaled fp8 single files ---------------------------------------------------------------

FP8_MAX = 448.0  # the largest float8_e4m3fn value


def write_scaled_fp8(model: torch.nn.Module, path: str) -> Counter:
    """Write ``model`` as a ComfyUI scaled fp8 file in its original key layout: each 2-D weight inside the
    transformer blocks as float8_e4m3fn with a float32 ``.scale_weight`` (its absmax / 448), the rest in
    the model's dtype, and the ``scaled_fp8`` marker. Written to a temporary name, then renamed. Returns
    how many tensors of each dtype were written."""
    from safetensors.torch import save_file

    from .files import replacing

    require_original_layout(type(model).__name__, "fp8")
    original = ORIGINAL_LAYOUTS[type(model).__name__]({k: v.detach() for k, v in model.state_dict().items()})
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
