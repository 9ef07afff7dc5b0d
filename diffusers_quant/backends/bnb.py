"""bitsandbytes: nf4 / fp4 (4-bit blockwise) and int8 (LLM.int8), on CPU and CUDA.

bitsandbytes 0.50 quantizes on CPU as well as CUDA, so unlike diffusers' BitsAndBytesConfig path this
backend does not require a GPU.  Quantization happens when a ``Params4bit`` / ``Int8Params`` is moved
with ``.to(device)``; we move it to the device it already sits on, so no copy goes anywhere else.
"""

from __future__ import annotations

import logging
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


# --- bitsandbytes' log lines a user cannot act on ----------------------------------------------------------

_KERNEL_FALLBACK = "Failed to load CPU gemm_4bit_forward from kernels-community"
_INT8_CAST = "MatMul8bitLt: inputs will be cast from"
_INT8_EXPLAINED = (
    "diffusers_quant: bnb:int8 layers compute in float16: LLM.int8 casts %s activations to float16 on every "
    "call (expected, nothing to do; said once)"
)


class _QuietBitsandbytes(logging.Filter):
    """Scoped to two exact messages of bitsandbytes' own loggers; everything else passes untouched."""

    def __init__(self) -> None:
        super().__init__()
        self.int8_explained = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith(_KERNEL_FALLBACK):
            # bitsandbytes falls back to its own CPU kernel, which works; the hub kernel it names is an
            # optional speed-up (the kernels package plus hub access).  Shown only at DEBUG.
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        if message.startswith(_INT8_CAST):  # logged on every int8 matmul: hundreds per generation
            if self.int8_explained:
                return False
            self.int8_explained = True
            record.msg, record.args = _INT8_EXPLAINED, record.args[:1] if record.args else ("non-float16",)
        return True


def _quiet_bitsandbytes() -> None:
    # Installed when the registry loads this backend, before bitsandbytes is imported: it logs the kernel
    # fallback at import time, and diffusers imports it for every pipeline.  Filters on a logger are kept
    # when the library later asks for the same logger.
    for name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietBitsandbytes) for f in logger.filters):
            logger.addFilter(_QuietBitsandbytes())


_quiet_bitsandbytes()


class BnbBackend(Backend):
    name = "bnb"
    module = "bitsandbytes"
    extra = "bnb"
    qtypes = ("nf4", "fp4", "int8")
    aliases = {"llm_int8": "int8", "8bit": "int8"}
    layer_types = ("Linear4bit", "Linear8bitLt")
    saved_markers = (".weight.quant_state.bitsandbytes__nf4", ".weight.quant_state.bitsandbytes__fp4", ".SCB")
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

    # --- the model contract: bitsandbytes' own layout and config, as diffusers and transformers save it ---

    def model_flags(self, module):
        eight = type(module).__name__ == "Linear8bitLt"
        # PEFT picks its bnb LoRA layers (whose merge dequantizes and re-quantizes) from these flags
        return {
            "is_loaded_in_8bit": eight,
            "is_loaded_in_4bit": not eight,
            "is_8bit_serializable": True,
            "is_4bit_serializable": True,
        }

    def native_method(self, module):
        return "bitsandbytes"

    def native_config(self, layers: list, skip: list[str], library: str, compute_dtype):
        import torch

        if library == "transformers":
            from transformers import BitsAndBytesConfig
        else:
            from diffusers import BitsAndBytesConfig
        first = layers[0]
        if type(first).__name__ == "Linear8bitLt":
            return BitsAndBytesConfig(
                load_in_8bit=True, llm_int8_threshold=first.state.threshold, llm_int8_skip_modules=skip
            )
        weight = first.weight
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=weight.quant_type,
            bnb_4bit_use_double_quant=bool(weight.compress_statistics),
            bnb_4bit_compute_dtype=first.compute_dtype or compute_dtype or torch.float32,
            bnb_4bit_quant_storage=str(weight.quant_storage).replace("torch.", ""),
            llm_int8_skip_modules=skip,
        )

    def layer_from_state(self, tensors, config, dtype, compute_dtype, device):
        self.require()
        import bitsandbytes as bnb
        import torch

        has_bias = "bias" in tensors
        device = torch.device(device)
        if "SCB" in tensors:
            layer = bnb.nn.Linear8bitLt(
                config["in_features"],
                config["out_features"],
                bias=has_bias,
                has_fp16_weights=False,
                threshold=float(config.get("threshold", 6.0)),
                device="meta",
            )
            data = tensors["weight"].to(device)
            weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
            weight.CB, weight.SCB = data, tensors["SCB"].to(device)
            layer.weight = weight
        else:
            layer = bnb.nn.Linear4bit(
                config["in_features"],
                config["out_features"],
                bias=has_bias,
                compute_dtype=compute_dtype,
                device="meta",
            )
            stats = {k[len("weight.") :]: v for k, v in tensors.items() if k.startswith("weight.")}
            layer.weight = bnb.nn.Params4bit.from_prequantized(
                tensors["weight"], stats, requires_grad=False, device=device, module=layer
            )
            layer.quant_type = layer.weight.quant_type
        if has_bias:
            bias = tensors["bias"].to(device, compute_dtype or dtype or tensors["bias"].dtype)
            layer.bias = torch.nn.Parameter(bias, requires_grad=False)
        return layer

    def dequantize_weight(self, module):
        import bitsandbytes.functional as F
        import torch

        weight = module.weight
        if type(module).__name__ == "Linear8bitLt":
            scb = weight.SCB if weight.SCB is not None else module.state.SCB
            return weight.data.float() * (scb.float().unsqueeze(1) / 127.0)
        return F.dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)

    def spec_of(self, module):
        from ..spec import Spec

        # options at their defaults are left out, so the report reads as the plan was written
        if type(module).__name__ == "Linear8bitLt":
            threshold = float(module.state.threshold)
            return Spec.create(self.name, "int8", **({} if threshold == 6.0 else {"threshold": threshold}))
        weight = module.weight
        options = {}
        if not weight.compress_statistics:
            options["double_quant"] = False
        if weight.blocksize != 64:
            options["blocksize"] = weight.blocksize
        return Spec.create(self.name, weight.quant_type, **options)
