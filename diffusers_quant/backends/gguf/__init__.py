"""GGUF: pre-quantized transformer/UNet files (memory-mapped, dequantized per forward), and writing them.

Four roles, one file each: ``reader`` (mmap + validation), ``dequant`` (pure torch, every type gguf-py
can dequantize), ``writer`` (every type gguf-py can quantize, and Q4_K/Q5_K/Q6_K through ``quantize``'s
torch ports of ggml's reference quantizers), ``nn`` (``GGUFLinear``: packed bytes on
the device, dequantized in forward); ``keys`` maps published key names to diffusers', ``loader`` builds a
model from a file.  A spec is either a type to quantize to (``gguf:q8_0``) or a file (``gguf:/x/f.gguf``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import SpecError, choices
from ..base import Backend

if TYPE_CHECKING:
    import torch

    from ...spec import Spec

# (block size, bytes per block) of the types the writer can quantize to (gguf-py's, and the K quants
# quantize.py ports), from gguf.GGML_QUANT_SIZES: a test checks these against writer.WRITABLE_QTYPES and the
# library, so the registry needs no gguf import.
QUANTIZE_TYPES: dict[str, tuple[int, int]] = {
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
    "q8_0": (32, 34),
    "q4_k": (256, 144),
    "q5_k": (256, 176),
    "q6_k": (256, 210),
    "tq1_0": (256, 54),
    "tq2_0": (256, 66),
    "mxfp4": (32, 17),
}


def is_file_spec(spec: Spec) -> bool:
    return spec.backend == "gguf" and spec.qtype.lower().endswith(".gguf")


class GgufBackend(Backend):
    name = "gguf"
    module = "gguf"
    extra = "gguf"
    qtypes = tuple(QUANTIZE_TYPES)
    layer_types = ("GGUFLinear",)
    saves = True

    def normalize_qtype(self, qtype: str) -> str:
        if qtype.lower().endswith(".gguf"):
            return qtype  # a file to load; paths keep their case
        qtype = qtype.lower()
        if qtype not in self.qtypes:
            raise SpecError(
                f"unknown qtype {qtype!r} for backend 'gguf'; expected a .gguf file path or one of "
                f"{choices(self.qtypes)}"
            )
        return qtype

    def bytes_per_param(self, spec: Spec) -> float:
        if is_file_spec(spec):
            return 0.6  # planning guess for a typical Q4/Q5 file; the load reports the real figure
        block, size = QUANTIZE_TYPES[spec.qtype]
        return size / block

    def can_quantize(self, linear: torch.nn.Linear, spec: Spec) -> bool:
        # ggml rows are whole blocks
        return is_file_spec(spec) or linear.in_features % QUANTIZE_TYPES[spec.qtype][0] == 0

    def quantize_linear(
        self,
        linear: torch.nn.Linear,
        spec: Spec,
        compute_dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> torch.nn.Module:
        self.require()
        from .nn import GGUFLinear

        if is_file_spec(spec):
            raise SpecError(f"{spec} names a file; it is loaded as it is, not used to quantize a layer")
        return GGUFLinear.from_linear(linear, spec.qtype.upper(), compute_dtype=compute_dtype, device=device)

    def layer_config(self, module: torch.nn.Module) -> dict | None:
        if not self.owns(module):
            return None
        return {
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
            "qtype": module.qtype,
        }

    def empty_layer(
        self, config: dict, dtype: torch.dtype, compute_dtype: torch.dtype | None
    ) -> torch.nn.Module:
        from .nn import GGUFLinear

        return GGUFLinear(
            config["in_features"],
            config["out_features"],
            bool(config["bias"]),
            qtype=config["qtype"],
            compute_dtype=compute_dtype,
            device="meta",
            bias_dtype=dtype,
        )

    def dequantize_weight(self, module: torch.nn.Module) -> torch.Tensor:
        import torch

        return module.dequantize_weight(torch.float32)

    def spec_of(self, module: torch.nn.Module) -> Spec:
        from ...spec import Spec

        qtype = module.qtype.lower()
        if qtype not in QUANTIZE_TYPES:
            raise SpecError(
                f"a GGUF {module.qtype} layer cannot be re-quantized here (GGUF layers quantize to "
                f"{choices(QUANTIZE_TYPES)}); fix: keep the LoRA unfused (set_adapters / disable_lora), or "
                "load the full-precision model to fuse"
            )
        return Spec.create(self.name, qtype)


def portable_config(config) -> dict:
    """A model config as it should travel inside a file: JSON types only, no local paths."""
    import os

    out = {}
    for key, value in dict(config).items():
        if key == "_name_or_path":
            continue
        out[key] = os.fspath(value) if isinstance(value, os.PathLike) else value
    return out
