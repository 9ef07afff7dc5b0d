"""The model contract: every component the hooks return is a quantized model in diffusers' and transformers'
own terms.

``attach`` gives a quantized model what those libraries read to decide how to treat it: a quantizer object
(``hf_quantizer``, a subclass of the library's own quantizer for the backend), ``quantization_config`` in its
config, ``is_quantized`` / ``quantization_method`` / ``is_loaded_in_4bit`` / ``is_loaded_in_8bit`` (what PEFT
and the libraries' ``to()`` / ``half()`` read) and ``_pre_quantization_dtype``. Everything is derived from the
layers the model holds, so on-load, post-load, pre-quantized, GGUF and ``quantize()`` results get the same.

Where the library has the format (bitsandbytes, quanto) the config is the library's own, so its
``save_pretrained`` writes a folder plain diffusers / transformers load. NNCF and GGUF layers are only read by
this package: their config's ``quant_method`` is ``diffusers_quant``, which plain loaders refuse by name.
"""

from __future__ import annotations

import functools
import types
from enum import Enum

import torch

from .components import is_transformers_class

OURS = "diffusers_quant"
FORMAT_VERSION = 2
FIX = "pip install diffusers-quant, then call diffusers_quant.install() before loading"


class OurMethod(str, Enum):
    """``quant_method`` of the formats only this package reads (an Enum, as the libraries' own are)."""

    DIFFUSERS_QUANT = OURS


def library_of(model_or_cls) -> str:
    cls = model_or_cls if isinstance(model_or_cls, type) else type(model_or_cls)
    return "transformers" if is_transformers_class(cls) else "diffusers"


# --- our quantization config --------------------------------------------------------------------------


def _config_base(library: str) -> type:
    if library == "transformers":
        from transformers.utils.quantization_config import QuantizationConfigMixin
    else:
        from diffusers.quantizers.quantization_config import QuantizationConfigMixin
    return QuantizationConfigMixin


@functools.cache
def our_config_class(library: str) -> type:
    """``quantization_config`` of a component only this package reads: the layer map, per layer the
    backend and what rebuilds it."""

    class DiffusersQuantConfig(_config_base(library)):
        def __init__(self, layers: dict | None = None, version: int = FORMAT_VERSION, **kwargs):
            self.quant_method = OurMethod.DIFFUSERS_QUANT
            self.version = version
            self.layers = dict(layers or {})
            self.backends = sorted({entry["backend"] for entry in self.layers.values()})
            self.note = f"saved by diffusers-quant; to load it: {FIX}"

        def to_dict(self) -> dict:
            saved = {
                "quant_method": OURS,
                "format": OURS,
                "version": self.version,
                "backends": self.backends,
                "note": self.note,
                "layers": self.layers,
            }
            if library == "transformers":
                # transformers skips an unknown quant_method with a warning and would load the packed bytes
                # as weights; a config without one is refused before any weight is read
                del saved["quant_method"]
            return saved

        def to_diff_dict(self) -> dict:
            return self.to_dict()

    DiffusersQuantConfig.__qualname__ = f"DiffusersQuantConfig[{library}]"
    return DiffusersQuantConfig


# --- quantizer objects --------------------------------------------------------------------------------


def _quantizer_base(library: str, config) -> type:
    """The library's own quantizer class for this backend's format (ours where the library has none)."""
    method = getattr(config, "quant_method", None)
    method = getattr(method, "value", method)
    bnb8 = method == "bitsandbytes" and getattr(config, "load_in_8bit", False)
    if library == "transformers":
        if method == "bitsandbytes":
            from transformers.quantizers import quantizer_bnb_4bit, quantizer_bnb_8bit

            return quantizer_bnb_8bit.Bnb8BitHfQuantizer if bnb8 else quantizer_bnb_4bit.Bnb4BitHfQuantizer
        if method == "quanto":
            from transformers.quantizers.quantizer_quanto import QuantoHfQuantizer

            return QuantoHfQuantizer
        from transformers.quantizers.base import HfQuantizer

        return HfQuantizer
    if method == "bitsandbytes":
        from diffusers.quantizers.bitsandbytes import BnB4BitDiffusersQuantizer, BnB8BitDiffusersQuantizer

        return BnB8BitDiffusersQuantizer if bnb8 else BnB4BitDiffusersQuantizer
    if method == "quanto":
        from diffusers.quantizers.quanto import QuantoQuantizer

        return QuantoQuantizer
    from diffusers.quantizers.base import DiffusersQuantizer

    return DiffusersQuantizer


@functools.cache
def quantizer_class(base: type) -> type:
    """``base`` (a library quantizer) with this package's dequantize, which works for every backend and
    device, and which also drops the config's ``quantization_config`` so a later save is plain."""

    class Quantizer(base):
        requires_calibration = False

        # abstract in the bases: the model is already built and loaded when the quantizer is attached
        def _process_model_before_weight_loading(self, model, **kwargs):
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            return model

        if is_transformers_class(base):  # transformers calls it; diffusers reads a property

            def is_serializable(self, *args, **kwargs):
                return True

        else:

            @property
            def is_serializable(self):
                return True

        # PEFT adapters train on top of the quantized layers (their forward is differentiable)
        @property
        def is_trainable(self):
            return True

        @property
        def is_compileable(self) -> bool:
            return True

        def validate_environment(self, *args, **kwargs):
            return None

        def dequantize(self, model, dtype=None):  # both libraries' models call this one
            model = dequantize_model(model, dtype)
            detach(model)
            return model

    Quantizer.__name__ = Quantizer.__qualname__ = f"DiffusersQuant{base.__name__}"
    return Quantizer


# --- attach / detach ----------------------------------------------------------------------------------


def quantized_layers(model: torch.nn.Module) -> dict[str, tuple[object, torch.nn.Module]]:
    """Name -> (backend, module) for every quantized layer the model holds."""
    from .backends import backend_of

    found = {}
    for name, module in model.named_modules():
        backend = backend_of(module)
        if backend is not None:
            found[name] = (backend, module)
    return found


def settle(model: torch.nn.Module) -> None:
    """Each backend's last step on the layers of a loaded model (``Backend.settle_layer``)."""
    for backend, module in quantized_layers(model).values():
        backend.settle_layer(module)


def skipped_linears(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) is torch.nn.Linear]


# How each library matches its skip list against Linear names when it rebuilds a saved model (diffusers
# quantizers/quanto/utils.py: the child's own name; quantizers/bitsandbytes/utils.py: the child's name, or an
# entry equal to the full name or followed by "." in it; transformers quantizers_utils.should_convert_module:
# a regex from the start up to a module boundary, or a plain suffix).
def _skips_diffusers_quanto(full: str, entries: list[str]) -> bool:
    return full.rpartition(".")[2] in entries


def _skips_diffusers_bnb(full: str, entries: list[str]) -> bool:
    leaf = full.rpartition(".")[2]
    return leaf in entries or any(e + "." in full or e == full for e in entries)


def _skips_transformers(full: str, entries: list[str]) -> bool:
    import re

    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{e}){boundary}", full) or full.endswith(e) for e in entries)


def _skip_entries(library: str, method: str, skipped: list[str]) -> list[str]:
    import re

    if library == "transformers":
        return [re.escape(name) + "$" for name in skipped]  # exact names, as anchored regexes
    if method == "quanto":
        return sorted({name.rpartition(".")[2] for name in skipped})
    return list(skipped)


_SKIP_MATCHERS = {
    ("diffusers", "quanto"): _skips_diffusers_quanto,
    ("diffusers", "bitsandbytes"): _skips_diffusers_bnb,
    ("transformers", "quanto"): _skips_transformers,
    ("transformers", "bitsandbytes"): _skips_transformers,
}


def exact_skip_list(
    library: str, method: str, quantized: list[str], skipped: list[str], keep_fp32
) -> list | None:
    """A skip list with which the library rebuilds exactly these quantized layers, or None if its matching
    rule cannot tell them apart (then the model saves in this package's format, which plain loaders refuse
    by name, rather than in a layout they would load wrong)."""
    entries = _skip_entries(library, method, skipped)
    matches = _SKIP_MATCHERS[(library, method)]
    library_skips = entries + list(keep_fp32 or ())  # the libraries add the model's keep-in-fp32 modules
    if any(matches(name, library_skips) for name in quantized):
        return None
    if not all(matches(name, entries) for name in skipped):
        return None
    return entries


def build_config(model: torch.nn.Module, layers: dict, library: str, compute_dtype: torch.dtype | None):
    """The ``quantization_config`` that describes ``layers``, the model's quantized layers: the library's
    own where one backend with a library format holds every layer and the library's skip rule can express
    the selection, else ours (the layer map)."""
    backends = {b.name: b for b, _ in layers.values()}
    if len(backends) == 1:
        (backend,) = backends.values()
        method = backend.native_method(next(iter(layers.values()))[1])
        if method is not None:
            keep = getattr(model, "_keep_in_fp32_modules", None) or ()
            entries = exact_skip_list(library, method, list(layers), skipped_linears(model), keep)
            if entries is not None:
                native = backend.native_config(
                    [m for _, m in layers.values()], entries, library, compute_dtype
                )
                if native is not None:
                    return native
    entries = {name: {"backend": b.name, "config": b.layer_config(m)} for name, (b, m) in layers.items()}
    return our_config_class(library)(layers=entries)


def attach(model: torch.nn.Module, pre_quantization_dtype: torch.dtype | None = None):
    """Give ``model`` the quantizer object, config and flags of a natively quantized model (idempotent).
    Returns the model; a model without quantized layers is left as it is."""
    layers = quantized_layers(model)
    if not layers:
        return model
    settle(model)
    library = library_of(model)
    dtype = pre_quantization_dtype or _float_dtype(model)
    config = build_config(model, layers, library, dtype)
    quantizer = quantizer_class(_quantizer_base(library, config))(config, pre_quantized=True)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = config.quant_method
    model._pre_quantization_dtype = dtype
    for backend, module in layers.values():  # what PEFT reads to pick its layer type (bnb's flags)
        for flag, value in backend.model_flags(module).items():
            setattr(model, flag, value)
    if library == "transformers":
        model.config.quantization_config = config
    else:
        model.register_to_config(quantization_config=config, _pre_quantization_dtype=dtype)
    # The libraries count packed storage: a quantized model answers with logical counts and real bytes.
    model.num_parameters = types.MethodType(logical_num_parameters, model)
    model.get_memory_footprint = types.MethodType(memory_footprint, model)
    # One dtype rule for every backend and library, checked before any parameter is touched (transformers
    # lets .to(dtype) through for non-bnb models and quanto then fails half way).
    model.to = types.MethodType(_guarded_to, model)
    for name, dtype in _CASTS.items():
        setattr(model, name, types.MethodType(_guarded_cast(dtype), model))
    from .lora import register_peft_dispatch

    register_peft_dispatch()
    return model


_CASTS = {"half": torch.float16, "float": torch.float32, "bfloat16": torch.bfloat16, "double": torch.float64}


def _refuse_cast(model, dtype) -> None:
    from .errors import QuantError

    if dtype is not None and dtype != model._pre_quantization_dtype:
        method = getattr(model.quantization_method, "value", model.quantization_method)
        raise QuantError(
            f"{type(model).__name__} is quantized ({method}); casting it to {dtype} would "
            f"change only its unquantized parts; fix: call .dequantize() first for a full-precision model, or "
            f"load it with dtype={dtype} (its unquantized parts follow the load's dtype)"
        )


def _guarded_to(model, *args, **kwargs):
    """``Module.to`` that refuses a dtype other than the load's before touching anything; the load's own
    dtype is a no-op (modules kept in float32 stay so), device moves go to the class's ``to``."""
    device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    _refuse_cast(model, dtype)
    move = {"device": device} if device is not None else {}
    if non_blocking:
        move["non_blocking"] = True
    if memory_format is not None:
        move["memory_format"] = memory_format
    return type(model).to(model, **move) if move else model


def _guarded_cast(dtype: torch.dtype):
    def cast(model, *args):
        _refuse_cast(model, dtype)
        return model

    return cast


_FLAGS = (
    "hf_quantizer",
    "to",
    *_CASTS,
    "num_parameters",
    "get_memory_footprint",
    "quantization_method",
    "is_loaded_in_4bit",
    "is_loaded_in_8bit",
    "is_4bit_serializable",
    "is_8bit_serializable",
    "_pre_quantization_dtype",
)


def detach(model: torch.nn.Module) -> None:
    """Undo ``attach`` (after dequantize): the model is a plain model again, and saves as one."""
    for flag in _FLAGS:
        if flag in model.__dict__:
            delattr(model, flag)
    model.is_quantized = False
    if library_of(model) == "transformers":
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    else:
        internal = dict(model._internal_dict)
        internal.pop("quantization_config", None)
        internal.pop("_pre_quantization_dtype", None)
        from diffusers.configuration_utils import FrozenDict

        model._internal_dict = FrozenDict(internal)


def logical_num_parameters(model, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """Parameters the model would have unquantized (a quantized layer counts its weight's logical shape and
    bias, not its packed bytes and scales)."""
    layers = quantized_layers(model)
    embeddings = set()
    if exclude_embeddings:
        embeddings = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    total = 0
    for name, param in model.named_parameters():
        owner = name.rpartition(".")[0]
        if owner in layers or name in embeddings or (only_trainable and not param.requires_grad):
            continue
        total += param.numel()
    for _, module in layers.values():
        bias = module.bias
        if only_trainable and not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        total += module.in_features * module.out_features + (bias.numel() if bias is not None else 0)
    return total


def memory_footprint(model, return_buffers: bool = True) -> int:
    """Bytes the model really holds (packed weights, scales and quantization state counted as stored)."""
    from .post_load import state_nbytes

    total = state_nbytes(model)
    if not return_buffers:
        total -= sum(b.numel() * b.element_size() for b in model.buffers())
    return total


def dequantize_model(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Replace every quantized layer with a plain ``nn.Linear`` holding its dequantized weight."""
    from .components import get_submodule_parent

    dtype = dtype or getattr(model, "_pre_quantization_dtype", None) or _float_dtype(model)
    for name, (backend, module) in quantized_layers(model).items():
        weight = backend.dequantize_weight(module)
        bias = module.bias
        linear = torch.nn.Linear(
            weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight.to(dtype))
            if bias is not None:
                linear.bias.copy_(bias.detach().to(dtype))
        linear.requires_grad_(False)
        parent, attr = get_submodule_parent(model, name)
        setattr(parent, attr, linear)
    return model


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(
        (p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32),
        torch.float32,
    )
