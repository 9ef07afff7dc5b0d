"""LoRA on quantized layers, through PEFT.

PEFT's dispatch is given one more entry (``register_peft_dispatch``, idempotent, done when a quantized model
is attached) that wraps quanto, NNCF and GGUF layers in :class:`QuantLoraLinear`, PEFT's own LoRA Linear:
adapters run, train and switch (``set_adapters``, disable, unload) unchanged. NNCF and GGUF layers are not
``nn.Linear`` subclasses on purpose: code that reads ``Linear.weight.shape`` (diffusers' Flux LoRA loader
checks it for Control-LoRA expansion) would see packed bytes. What PEFT's plain Linear cannot do is merge:
it adds the delta into the packed bytes. ``QuantLoraLinear``'s merge dequantizes the weight, adds the delta
and re-quantizes with the layer's own settings; unmerge does the reverse (re-quantized, as PEFT's
bitsandbytes merge is, so unmerge is within one quantization step of the original). bitsandbytes layers
keep PEFT's own bnb LoRA layers, which the ``is_loaded_in_4bit`` / ``is_loaded_in_8bit`` flags select.
"""

from __future__ import annotations

import functools

import torch

_REGISTERED: dict[str, object] = {}


def _owner(module: torch.nn.Module):
    """The backend of a quantized layer that needs our merge (bitsandbytes has PEFT's own), else None."""
    from .backends import backend_of

    backend = backend_of(module)
    return backend if backend is not None and backend.name != "bnb" else None


def _float_dtype_of(layer: torch.nn.Module) -> torch.dtype:
    """The dtype the layer's float parts are in (quanto's weight reports it; others hold packed integers)."""
    if layer.weight.dtype.is_floating_point:
        return layer.weight.dtype
    if layer.bias is not None:
        return layer.bias.dtype
    return getattr(layer, "compute_dtype", None) or torch.float32


@functools.cache
def _lora_class() -> type:
    from peft.tuners.lora.layer import Linear
    from peft.tuners.tuners_utils import check_adapters_to_merge

    class QuantLoraLinear(Linear):
        """PEFT's LoRA Linear over a quantized base layer; merge re-quantizes."""

        def _get_in_out_features(self, module):
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            return base.in_features, base.out_features

        def _requantize(self, weight: torch.Tensor) -> None:
            from .post_load import quantize_linear_into

            base = self.get_base_layer()
            backend = _owner(base)
            spec = backend.spec_of(base)  # refuses types that cannot be re-quantized, before any change
            dtype = _float_dtype_of(base)
            linear = torch.nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
            linear.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
            linear.bias = base.bias
            holder = self
            while hasattr(holder.base_layer, "base_layer"):
                holder = holder.base_layer
            compute_dtype = getattr(base, "compute_dtype", None) or dtype
            quantize_linear_into(holder, "base_layer", linear, spec, compute_dtype, weight.device)

        def _merged_weight(self, adapters: list[str], sign: int) -> torch.Tensor:
            base = self.get_base_layer()
            _owner(base).spec_of(base)  # refuse a type that cannot be re-quantized before dequantizing it
            weight = _owner(base).dequantize_weight(base).float()
            for adapter in adapters:
                if self.lora_bias.get(adapter):
                    raise ValueError(
                        f"adapter {adapter!r} has lora_bias=True, which cannot be merged into a quantized "
                        "layer; fix: keep it unmerged"
                    )
                weight = weight + sign * self.get_delta_weight(adapter).float().to(weight.device)
            return weight

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            adapters = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
            if not adapters:
                return
            weight = self._merged_weight(adapters, +1)
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(f"NaNs detected in the merged weights of adapters {adapters}")
            self._requantize(weight)
            self.merged_adapters.extend(adapters)

        def unmerge(self) -> None:
            adapters = [a for a in self.merged_adapters if a in self.lora_A]
            if not adapters:
                self.merged_adapters.clear()
                return
            self._requantize(self._merged_weight(adapters, -1))
            self.merged_adapters.clear()

        def __repr__(self) -> str:
            return super().__repr__().replace("lora.Linear", "lora.QuantLoraLinear", 1)

    return QuantLoraLinear


def _register_logical_shapes() -> None:
    """diffusers' Flux LoRA loader reads each target's weight shape (for Control-LoRA expansion) and knows
    only bnb's and its own GGUF parameters; for our layers it is told the logical (out, in) shape."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    original = FluxLoraLoaderMixin.__dict__["_calculate_module_shape"]

    def _calculate_module_shape(model, base_module=None, base_weight_param_name=None):
        module = base_module
        if module is None and base_weight_param_name and base_weight_param_name.endswith(".weight"):
            try:
                module = model.get_submodule(base_weight_param_name.rsplit(".weight", 1)[0])
            except AttributeError:
                module = None
        if module is not None and _owner(module) is not None and hasattr(module, "in_features"):
            return torch.Size((module.out_features, module.in_features))
        return original.__func__(model, base_module, base_weight_param_name)

    _REGISTERED["shape"] = original
    FluxLoraLoaderMixin._calculate_module_shape = staticmethod(_calculate_module_shape)


def register_peft_dispatch() -> bool:
    """Put our LoRA layer first in PEFT's dispatch for quantized layers, and tell diffusers' LoRA loaders
    their logical shapes (idempotent). False without PEFT."""
    if "create" in _REGISTERED:
        return True
    try:
        from peft.tuners.lora.model import LoraModel
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    original = LoraModel.__dict__["_create_new_module"]

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if _owner(base) is not None and kwargs.get("parameter_name") is None:
            if lora_config.fan_in_fan_out:
                lora_config.fan_in_fan_out = False  # as PEFT does for every nn.Linear
            kwargs.pop("parameter_name", None)
            return _lora_class()(target, adapter_name, config=lora_config, **kwargs)
        return original.__func__(lora_config, adapter_name, target, **kwargs)

    _REGISTERED["create"] = original
    LoraModel._create_new_module = staticmethod(_create_new_module)
    _register_logical_shapes()
    return True


def unregister_peft_dispatch() -> None:
    """Put PEFT's own dispatch back, by identity."""
    original = _REGISTERED.pop("create", None)
    if original is not None:
        from peft.tuners.lora.model import LoraModel

        LoraModel._create_new_module = original
    original = _REGISTERED.pop("shape", None)
    if original is not None:
        from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

        FluxLoraLoaderMixin._calculate_module_shape = original
