"""What a component is (its kind) and which of its Linear layers a Spec quantizes.

Kinds are derived from the class, never from backend-specific module types, so the same rules apply to
any diffusers or transformers model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass

from .families import GENERIC, Keep, default_keeps
from .spec import Spec


@dataclass(frozen=True)
class Component:
    name: str
    kind: str
    class_name: str = ""
    saved: tuple[Spec, ...] = ()  # the formats its folder was saved quantized in (saving.saved_specs)


def kind_of_class(cls: type | str) -> str:
    """transformer / unet / vae / controlnet / text_encoder / other, from the class (or its name)."""
    name = cls if isinstance(cls, str) else cls.__name__
    lowered = name.lower()
    if "controlnet" in lowered:
        return "controlnet"
    if "unet" in lowered:
        return "unet"
    if lowered.startswith(("autoencoder", "vqmodel", "consistencydecoder")) or "vae" in lowered:
        return "vae"
    if "transformer" in lowered and lowered.endswith("model") and not is_transformers_class(cls):
        return "transformer"
    if is_transformers_class(cls) or any(k in lowered for k in ("textmodel", "encodermodel", "forcausallm")):
        return "text_encoder"
    return "other"


def is_transformers_class(cls: type | str) -> bool:
    if isinstance(cls, str):
        return False
    return any(base.__module__.startswith("transformers.") for base in cls.__mro__)


# The generic defaults per kind, as patterns (the reasons, and each family's own entries: families.py).
DEFAULT_EXCLUDE: dict[str, tuple[str, ...]] = {
    kind: tuple(keep.pattern for keep in keeps) for kind, keeps in GENERIC.items()
}
DEFAULT_MIN_FEATURES = 64


def _named_linears(model) -> Iterator[tuple[str, object]]:
    import torch

    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear:
            yield name, module


def _matches_any(name: str, patterns: tuple[str, ...]) -> bool:
    # A pattern matches the full dotted name or any dotted suffix of it ("to_q" matches "a.b.to_q").
    parts = name.split(".")
    suffixes = {".".join(parts[i:]) for i in range(len(parts))}
    return any(fnmatch.fnmatchcase(s, p) for p in patterns for s in suffixes)


def fp32_modules(model, dtype) -> set[str]:
    """Module names the libraries keep in float32 at this load dtype: diffusers keeps its
    ``_keep_in_fp32_modules`` at fp16 and bf16 alike (``model_loading_utils.load_model_dict_into_meta``);
    transformers only at fp16, and its ``_keep_in_fp32_modules_strict`` at both."""
    import torch

    if dtype not in (torch.float16, torch.bfloat16):
        return set()
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16 or not is_transformers_class(type(model)):
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return keep


def default_excludes(model, kind: str) -> tuple[str, ...]:
    """Anchored patterns ``model`` keeps in full precision by default: its family's (families.py), else
    the generic ones of its kind, plus the modules the model keeps in float32."""
    return tuple(keep.pattern for keep in default_keeps(model, kind))


def _matches_full(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _first_keep(name: str, keeps: tuple[Keep, ...]) -> Keep | None:
    return next((k for k in keeps if fnmatch.fnmatchcase(name, k.pattern)), None)


def linear_choices(model, spec: Spec, kind: str) -> dict[str, str | None]:
    """Every Linear layer of ``model`` -> None where ``spec`` quantizes it, else why it stays in full
    precision (the family table's reason, the plan's include / exclude, min_features, the backend)."""
    from .backends import get_backend

    backend = get_backend(spec.backend)
    include = spec.patterns("include")
    exclude = spec.patterns("exclude")
    keeps = () if include else default_keeps(model, kind)
    min_features = int(spec.option("min_features", str(DEFAULT_MIN_FEATURES)))
    choices: dict[str, str | None] = {}
    for name, linear in _named_linears(model):
        # An explicit include replaces the default excludes; the user's own excludes still apply.
        keep = _first_keep(name, keeps)
        if include and not _matches_any(name, include):
            choices[name] = f"not in include={'|'.join(include)}"
        elif _matches_any(name, exclude):
            choices[name] = f"in exclude={'|'.join(exclude)}"
        elif keep is not None:
            choices[name] = f"{keep.reason} ({keep.pattern})"
        elif min(linear.in_features, linear.out_features) < min_features:
            choices[name] = f"narrower than min_features={min_features}"
        elif not backend.can_quantize(linear, spec):
            choices[name] = f"{spec.backend} cannot quantize its shape"
        else:
            choices[name] = None
    return choices


def select_linears(model, spec: Spec, kind: str) -> list[str]:
    """Names of the Linear layers ``spec`` quantizes in ``model`` (works on meta-device models too)."""
    return [name for name, why in linear_choices(model, spec, kind).items() if why is None]


def count_linears(model) -> int:
    return sum(1 for _ in _named_linears(model))


def get_submodule_parent(model, name: str):
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr
