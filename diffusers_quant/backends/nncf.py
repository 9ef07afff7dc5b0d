"""NNCF: data-free int8 / int4 weight compression, one Linear at a time (see ``nncf_ops``).

Unlike ``nncf.compress_weights`` on a whole model, nothing is traced and no dataset is needed, and each
compressed layer owns its packed weight, scale and zero point, so device maps and offloading move a
layer and its decompression state together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import SpecError
from .base import Backend

if TYPE_CHECKING:
    import torch

    from ..spec import Spec


class NncfBackend(Backend):
    name = "nncf"
    module = "nncf"
    extra = "nncf"
    # Mirrors nncf_ops.NNCF_QTYPES without importing torch at registry time.
    qtypes = ("int8", "int8_sym", "int4", "int4_sym")
    aliases = {"int8_asym": "int8", "int4_asym": "int4"}
    options = {
        "group_size": "int4: weights per scale group (default 64); a width it does not divide uses the largest "
        "power of two dividing it (>= 32), else int8 per channel, as NNCF's ADJUST fallback does",
    }
    saves = True
    layer_types = ("NNCFLinear",)

    def option_problem(self, key: str, value: str) -> str | None:
        if key == "group_size":
            ok = value.strip() == "-1" or (value.strip().isdigit() and int(value) > 0)
            return None if ok else "expected a positive integer or -1"
        return super().option_problem(key, value)

    def group_size(self, spec: Spec) -> int:
        value = spec.option("group_size", "64")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size != -1 and size <= 0:
            raise SpecError(f"option group_size={value!r} in {spec}; expected a positive integer or -1")
        return size

    def bytes_per_param(self, spec: Spec) -> float:
        from .nncf_ops import bytes_per_param

        return bytes_per_param(spec.qtype, self.group_size(spec))

    def quantize_linear(
        self,
        linear: torch.nn.Linear,
        spec: Spec,
        compute_dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> torch.nn.Module:
        self.require()
        from .nncf_ops import compress_linear

        return compress_linear(
            linear,
            spec.qtype,
            group_size=self.group_size(spec),
            compute_dtype=compute_dtype,
            device=device,
        )

    def layer_config(self, module: torch.nn.Module) -> dict | None:
        from .nncf_ops import NNCFLinear

        return dict(module.layer_config) if isinstance(module, NNCFLinear) else None

    def empty_layer(
        self, config: dict, dtype: torch.dtype, compute_dtype: torch.dtype | None
    ) -> torch.nn.Module:
        from .nncf_ops import NNCFLinear

        return NNCFLinear.empty(**config, dtype=dtype, device="meta", compute_dtype=compute_dtype)

    def dequantize_weight(self, module: torch.nn.Module) -> torch.Tensor:
        import torch

        return module.dequantize(torch.float32)

    def spec_of(self, module: torch.nn.Module) -> Spec:
        from ..spec import Spec

        if module.qtype.startswith("int4") and module.group_size != 64:  # 64: the default, left out
            return Spec.create(self.name, module.qtype, group_size=module.group_size)
        return Spec.create(self.name, module.qtype)
