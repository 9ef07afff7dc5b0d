"""Backend registry: names -> backend objects.  Importing this imports no backend library."""

from __future__ import annotations

from ..errors import SpecError, choices
from .base import Backend
from .bnb import BnbBackend
from .gguf import GgufBackend
from .nncf import NncfBackend
from .quanto import QuantoBackend

_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SpecError(f"unknown backend {name!r}; expected one of {choices(_REGISTRY)}") from None


def backend_of(module) -> Backend | None:
    """The backend whose quantized layer ``module`` is, if any."""
    return next((b for b in _REGISTRY.values() if b.owns(module)), None)


def backend_names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def all_backends() -> tuple[Backend, ...]:
    return tuple(_REGISTRY[n] for n in backend_names())


register(BnbBackend())
register(QuantoBackend())
register(NncfBackend())
register(GgufBackend())

__all__ = ["Backend", "all_backends", "backend_names", "backend_of", "get_backend", "register"]
