"""optimum-quanto: qint8, qint4, qint2, qfloat8 weights, on CPU and CUDA.

Uses quanto's own ``QLinear`` (the maintained API) rather than diffusers' deprecated ``QuantoConfig``.
Each layer is quantized and frozen on its own, so a full-precision copy of the model never coexists
with the quantized one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Backend

if TYPE_CHECKING:
    import torch

    from ..spec import Spec

_QTYPE_NAMES = {"qint8": "qint8", "qint4": "qint4", "qint2": "qint2", "qfloat8": "qfloat8"}
_BITS = {"qint8": 8, "qint4": 4, "qint2": 2, "qfloat8": 8}
# quanto groups 2/4-bit weights by 128 along the input dimension.
_GROUP = 128


class QuantoBackend(Backend):
    name = "quanto"
    module = "optimum.quanto"
    extra = "quanto"
    qtypes = ("qint8", "qint4", "qint2", "qfloat8")
    layer_types = ("QLinear",)
    aliases = {"int8": "qint8", "int4": "qint4", "int2": "qint2", "float8": "qfloat8", "fp8": "qfloat8"}

    def is_available(self) -> bool:
        import importlib.util

        return importlib.util.find_spec("optimum") is not None and super().is_available()

    def bytes_per_param(self, spec: Spec) -> float:
        bits = _BITS[spec.qtype]
        if bits == 8:
            return 1.0
        # packed data + a bf16 scale and shift per group of 128
        return bits / 8 + 4.0 / _GROUP

    def can_quantize(self, linear: torch.nn.Linear, spec: Spec) -> bool:
        # Grouped 2/4-bit weights need whole groups along the input features.
        return _BITS[spec.qtype] == 8 or linear.in_features % _GROUP == 0

    def quantize_linear(
        self, linear: torch.nn.Linear, spec: Spec, compute_dtype: torch.dtype
    ) -> torch.nn.Module:
        self.require()
        from optimum import quanto

        qtype = getattr(quanto, _QTYPE_NAMES[spec.qtype])
        layer = quanto.QLinear.from_module(linear, weights=qtype, activations=None)
        layer.freeze()
        layer.requires_grad_(False)
        return layer
