"""bitsandbytes: nf4 / fp4 (4-bit blockwise) and int8 (LLM.int8), on CPU and CUDA.

bitsandbytes 0.50 quantizes on CPU as well as CUDA, so unlike diffusers' BitsAndBytesConfig path this
backend does not require a GPU.  Quantization happens when a ``Params4bit`` / ``Int8Params`` is moved
with ``.to(device)``; we move it to the device it already sits on, so no copy goes anywhere else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import SpecError
from .base import Backend

if TYPE_CHECKING:
    import torch

    from ..spec import Spec

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _flag(spec: Spec, key: str, default: bool) -> bool:
    value = spec.option(key)
    if value is None:
        return default
    if value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise SpecError(f"option {key}={value!r} in {spec}; expected true or false")


class BnbBackend(Backend):
    name = "bnb"
    module = "bitsandbytes"
    extra = "bnb"
    qtypes = ("nf4", "fp4", "int8")
    aliases = {"llm_int8": "int8", "8bit": "int8"}
    layer_types = ("Linear4bit", "Linear8bitLt")
    options = {
        "double_quant": "4-bit: also quantize the block scales (default true)",
        "blocksize": "4-bit: weights per scale block (default 64)",
        "threshold": "int8: outlier threshold of LLM.int8 (default 6.0; 0 disables outlier handling)",
        "compute_dtype": "4-bit: dtype of the matmul (default: the load's dtype)",
    }

    def bytes_per_param(self, spec: Spec) -> float:
        if spec.qtype == "int8":
            return 1.0
        blocksize = int(spec.option("blocksize", "64"))
        scale_bytes = 1.0 if _flag(spec, "double_quant", True) else 4.0
        return 0.5 + scale_bytes / blocksize

    def quantize_linear(
        self,
        linear: torch.nn.Linear,
        spec: Spec,
        compute_dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> torch.nn.Module:
        self.require()
        import bitsandbytes as bnb
        import torch

        from ..spec import normalize_dtype

        # bitsandbytes quantizes a whole weight at once, on the device it is moved to.
        weight = linear.weight.detach()
        device = torch.device(device) if device is not None else weight.device
        has_bias = linear.bias is not None
        if spec.qtype == "int8":
            threshold = float(spec.option("threshold", "6.0"))
            layer = bnb.nn.Linear8bitLt(
                linear.in_features,
                linear.out_features,
                bias=has_bias,
                has_fp16_weights=False,
                threshold=threshold,
                device="meta",
            )
            layer.weight = bnb.nn.Int8Params(weight.contiguous(), requires_grad=False, has_fp16_weights=False)
            # Int8Params only quantizes on a move *from* the CPU; quantize where the weight already is, so a
            # weight read straight onto the GPU is not left in full precision.
            layer.weight._quantize(device)
        else:
            if spec.option("compute_dtype"):
                compute_dtype = getattr(torch, normalize_dtype(spec.option("compute_dtype")))
            double_quant = _flag(spec, "double_quant", True)
            blocksize = int(spec.option("blocksize", "64"))
            layer = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=has_bias,
                compute_dtype=compute_dtype,
                compress_statistics=double_quant,
                quant_type=spec.qtype,
                device="meta",
            )
            # bitsandbytes quantizes only 16/32-bit floats; upcast anything else first.
            if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                weight = weight.to(torch.float32)
            layer.weight = bnb.nn.Params4bit(
                weight.contiguous(),
                requires_grad=False,
                quant_type=spec.qtype,
                compress_statistics=double_quant,
                blocksize=blocksize,
            )
        if has_bias:
            layer.bias = torch.nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
        return layer.to(device)
