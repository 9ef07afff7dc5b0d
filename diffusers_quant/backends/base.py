"""The one small protocol every backend follows.

A backend turns one full-precision ``nn.Linear`` into a quantized module.  Everything else (which layers,
when, on which device, streaming during load) is generic and lives outside the backends, so on-load and
post-load quantization share the same per-layer code.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, ClassVar

from ..errors import BackendUnavailable, SpecError, choices

if TYPE_CHECKING:
    import torch

    from ..spec import Spec

# Options every backend accepts: fnmatch patterns over module names, separated by '|'.
COMMON_OPTIONS = {
    "include": "only quantize Linear layers whose name matches one of these patterns",
    "exclude": "never quantize Linear layers whose name matches one of these patterns (added to the defaults)",
    "min_features": "skip layers with fewer input or output features than this (default 64)",
}


class Backend:
    name: ClassVar[str]
    # Import name probed for availability, and the pip extra that installs it.
    module: ClassVar[str]
    extra: ClassVar[str]
    qtypes: ClassVar[tuple[str, ...]]
    options: ClassVar[dict[str, str]] = {}
    aliases: ClassVar[dict[str, str]] = {}
    # Whether quantized layers can be saved and loaded back without requantizing (layer_config/empty_layer).
    saves: ClassVar[bool] = False
    # Class names of the layers this backend puts in place of nn.Linear (names: no library import needed).
    layer_types: ClassVar[tuple[str, ...]] = ()

    def is_available(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def require(self) -> None:
        if not self.is_available():
            raise BackendUnavailable(
                f"backend {self.name!r} needs the {self.module!r} package, which is not installed; "
                f"fix: pip install 'diffusers-quant[{self.extra}]'"
            )

    def normalize_qtype(self, qtype: str) -> str:
        qtype = self.aliases.get(qtype.lower(), qtype.lower())
        if qtype not in self.qtypes:
            raise SpecError(
                f"unknown qtype {qtype!r} for backend {self.name!r}; expected one of {choices(self.qtypes)}"
            )
        return qtype

    def option_names(self) -> set[str]:
        return set(COMMON_OPTIONS) | set(self.options)

    def option_problem(self, key: str, value: str) -> str | None:
        """Why ``value`` is no good for option ``key`` (and what is), or None: checked when a plan is parsed,
        so a bad value never reaches the middle of a load."""
        if key == "min_features":
            return None if value.isdigit() and int(value) >= 1 else "expected a whole number >= 1, e.g. 64"
        if key in ("include", "exclude"):
            return None if value.strip("|") else "expected layer-name patterns separated by '|'"
        return None

    def bytes_per_param(self, spec: Spec) -> float:
        """Planning estimate of stored bytes per quantized weight, scales included."""
        raise NotImplementedError

    def can_quantize(self, linear: torch.nn.Linear, spec: Spec) -> bool:
        """Shape constraints of the backend's kernels; layers that fail stay in full precision."""
        return True

    def quantize_linear(
        self,
        linear: torch.nn.Linear,
        spec: Spec,
        compute_dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> torch.nn.Module:
        """Return a quantized replacement for ``linear`` on ``device`` (default: where its weight is).

        ``linear`` may still be on the CPU when ``device`` is a GPU: a backend that quantizes in blocks of
        rows moves one block at a time, so the full-precision layer is never whole on the device."""
        raise NotImplementedError

    def owns(self, module: torch.nn.Module) -> bool:
        """Whether ``module`` is one of this backend's quantized layers."""
        if getattr(module, "base_layer", None) is not None:
            return False  # PEFT's LoRA wrapper around the layer (its bnb ones have the layer's class name)
        return layer_class_name(module) in self.layer_types

    def layer_config(self, module: torch.nn.Module) -> dict | None:
        """JSON description of a quantized layer of this backend (None if ``module`` is not one)."""
        return None

    def empty_layer(
        self, config: dict, dtype: torch.dtype, compute_dtype: torch.dtype | None
    ) -> torch.nn.Module:
        """An uninitialised layer on the meta device that a saved state dict is assigned into."""
        raise NotImplementedError

    # --- the model contract: saving, reloading, dequantizing, fusing (see ``contract`` and ``saving``) ---

    def native_method(self, module: torch.nn.Module) -> str | None:
        """The libraries' ``quant_method`` for a layer like ``module`` where they have a format for it."""
        return None

    def model_flags(self, module: torch.nn.Module) -> dict[str, object]:
        """Attributes a model holding layers like ``module`` carries for the libraries and PEFT."""
        return {}

    def native_config(self, layers: list, skip: list[str], library: str, compute_dtype):
        """The library's own ``quantization_config`` for a model whose quantized layers are ``layers``
        (``skip``: the library's skip list for the Linear layers left in full precision), or None where the
        library has no format for them (then the model saves in this package's format)."""
        return None

    # Tensor-name endings that mark a layer saved in the library's layout (longest first).
    saved_markers: ClassVar[tuple[str, ...]] = ()

    def saved_layers(self, keys) -> set[str]:
        """Names of the layers a checkpoint in the library's layout holds in this backend's format, from its
        tensor names alone (no tensor read)."""
        layers = set()
        for key in keys:
            marker = next((m for m in self.saved_markers if key.endswith(m)), None)
            if marker is not None:
                layers.add(key[: -len(marker)])
        return layers

    def layer_from_state(
        self,
        tensors: dict[str, torch.Tensor],
        config: dict | None,
        dtype: torch.dtype,
        compute_dtype: torch.dtype | None,
        device: torch.device | str,
    ) -> torch.nn.Module:
        """Rebuild one saved quantized layer from its own tensors (names relative to the layer) on ``device``,
        without requantizing; ``config`` is its entry in the layer map, where the format has one."""
        layer = self.empty_layer(config, dtype=dtype, compute_dtype=compute_dtype)
        result = layer.load_state_dict(tensors, strict=False, assign=True)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"missing {result.missing_keys}, unexpected {result.unexpected_keys}")
        return layer.to(device)

    def settle_layer(self, module: torch.nn.Module) -> None:
        """Last step of every load that returns a layer of this backend, whoever built it (this package or
        the library's own loader): make it run and read back as the library saved it."""

    def offload_ready(self, module: torch.nn.Module) -> None:
        """Make the layer move as one unit under every offloader (``Module.to``, diffusers' ``.data``
        swaps, accelerate's hooks). Layers that keep all their state in parameters need nothing."""

    def dequantize_weight(self, module: torch.nn.Module) -> torch.Tensor:
        """The layer's weight in full precision (float32, or the layer's compute dtype), on its device."""
        raise NotImplementedError

    def spec_of(self, module: torch.nn.Module) -> Spec:
        """A Spec that quantizes a float weight into a layer like ``module`` (used to re-quantize on fuse)."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name}: {', '.join(self.qtypes)}"


def layer_class_name(module: torch.nn.Module) -> str:
    """The name of ``module``'s layer class; a layer switched to a compute mode (``compute.py``) is still its
    base class's layer."""
    return getattr(type(module), "_w8a8_base", type(module)).__name__
