"""diffusers_quant: loader hooks that quantize diffusers pipelines on the fly.

    import diffusers_quant
    diffusers_quant.install("transformer=bnb:nf4,text_encoder_2=quanto:qint8")
    pipe = FluxPipeline.from_pretrained(path, torch_dtype=torch.bfloat16)   # plain diffusers call
    print(pipe.quant_report)

Importing this package imports no backend library and touches no GPU.
"""

from __future__ import annotations

from .errors import BackendUnavailable, PlanRefused, QuantError, SpecError
from .spec import Plan, Spec

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "Plan",
    "PlanRefused",
    "QuantError",
    "Spec",
    "SpecError",
    "enable_compute",
    "install",
    "is_installed",
    "quantize",
    "quantized",
    "save_quantized",
    "uninstall",
]


def install(plan: Plan | str | dict | None = None) -> None:
    """Patch diffusers' and transformers' loaders; ``plan`` becomes the default for every load."""
    from .hooks import install as _install

    _install(plan)


def uninstall() -> None:
    """Restore the original loaders exactly."""
    from .hooks import uninstall as _uninstall

    _uninstall()


def is_installed() -> bool:
    from .hooks import is_installed as _is_installed

    return _is_installed()


def quantized(plan: Plan | str | dict):
    """Context manager: loads inside the block use ``plan``."""
    from .hooks import quantized as _quantized

    return _quantized(plan)


def quantize(model, spec: Spec | str, *, kind: str | None = None, device: str | None = None):
    """Quantize an already-loaded model in place, module by module; returns its report row."""
    import torch

    from .components import Component, kind_of_class
    from .loading import Load, quantize_loaded
    from .report import Report
    from .rules import enforce

    spec = spec if isinstance(spec, Spec) else Spec.parse(spec)
    kind = kind or kind_of_class(type(model))
    plan = Plan(entries=((kind, spec),), mode="post-load", device=device or _device_of(model))
    enforce(plan, [Component(kind, kind, type(model).__name__)])
    load = Load(type(model), kind, kind, None, None, torch.device(plan.device), Report(plan=str(plan)))
    quantize_loaded(model, spec, load)
    return load.report[kind]


def enable_compute(model, compute: str = "auto") -> int:
    """Run the quantized Linears of a loaded model with W8A8 matmuls: ``fp8`` (quanto:qfloat8 layers),
    ``int8`` (quanto:qint8, bnb:int8 and nncf:int8_sym layers), ``auto`` (what the model's device runs well),
    ``none`` (weight-only again). Returns how many layers switched. The plan setting ``compute=`` does this at
    load."""
    from .compute import disable_compute
    from .compute import enable_compute as _enable

    if compute == "none":
        return disable_compute(model)
    return _enable(model, compute, _device_of(model))


def save_quantized(model, folder, **save_kwargs) -> str:
    """Save a quantized component to a new folder with the library's own ``save_pretrained`` (atomically);
    loading that folder later needs no requantization. Equivalent to ``model.save_pretrained(folder)``."""
    from .saving import save_quantized as _save

    return str(_save(model, folder, **save_kwargs))


def _device_of(model) -> str:
    return str(next(model.parameters()).device) if any(True for _ in model.parameters()) else "cpu"
