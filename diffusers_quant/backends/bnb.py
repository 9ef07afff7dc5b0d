"""bitsandbytes: nf4 / fp4 (4-bit blockwise) and int8 (LLM.int8's format), on CPU and CUDA.

bitsandbytes 0.50 quantizes on CPU as well as CUDA, so unlike diffusers' BitsAndBytesConfig path this
backend does not require a GPU.  Quantization happens when a ``Params4bit`` / ``Int8Params`` is moved
with ``.to(device)``; we move it to the device it already sits on, so no copy goes anywhere else.
4-bit layers run bitsandbytes' own forward; int8 layers run weight-only (``bnb_int8.py``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..errors import SpecError
from .base import Backend, layer_class_name

if TYPE_CHECKING:
    import torch

    from ..spec import Spec


def _flag(spec: Spec, key: str, default: bool) -> bool:
    from ..spec import parse_flag

    value = spec.option(key)
    if value is None:
        return default
    flag = parse_flag(value)
    if flag is None:
        raise SpecError(f"option {key}={value!r} in {spec}; expected true or false")
    return flag


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


# the block sizes bitsandbytes' 4-bit quantization takes
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


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
        "threshold": "int8: outlier threshold of LLM.int8, bitsandbytes' int8 matmul, which the layers run only "
        "with DIFFUSERS_QUANT_FUSED not naming bnb (default 6.0; 0 disables outlier handling)",
        "compute_dtype": "4-bit: dtype of the matmul (default: the load's dtype)",
    }

    def option_problem(self, key: str, value: str) -> str | None:
        from ..spec import normalize_dtype, parse_flag

        if key == "double_quant":
            return None if parse_flag(value) is not None else "expected true or false"
        if key == "blocksize":
            ok = value.isdigit() and int(value) in BLOCKSIZES
            return (
                None
                if ok
                else f"expected one of {', '.join(map(str, BLOCKSIZES))} (bitsandbytes' 4-bit blocks)"
            )
        if key == "threshold":
            try:
                return None if float(value) >= 0 else "expected a number >= 0, e.g. 6.0"
            except ValueError:
                return "expected a number >= 0, e.g. 6.0"
        if key == "compute_dtype":
            try:
                normalize_dtype(value)
            except SpecError as e:
                return str(e)
            return None
        return super().option_problem(key, value)

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
            _weight_only(layer)
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
        eight = _is_int8(module)
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
        if _is_int8(first):
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
            _weight_only(layer)
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

    def settle_layer(self, module) -> None:
        _keep_saved_layout(module)
        _weight_only(module)

    def offload_ready(self, module) -> None:
        _keep_state_with_weight(module)

    def dequantize_weight(self, module):
        import bitsandbytes.functional as F
        import torch

        _keep_saved_layout(module)
        weight = module.weight
        if _is_int8(module):
            scb = weight.SCB if weight.SCB is not None else module.state.SCB
            return weight.data.float() * (scb.float().unsqueeze(1) / 127.0)
        return F.dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)

    def spec_of(self, module):
        from ..spec import Spec

        # options at their defaults are left out, so the report reads as the plan was written
        if _is_int8(module):
            threshold = float(module.state.threshold)
            return Spec.create(self.name, "int8", **({} if threshold == 6.0 else {"threshold": threshold}))
        weight = module.weight
        options = {}
        if not weight.compress_statistics:
            options["double_quant"] = False
        if weight.blocksize != 64:
            options["blocksize"] = weight.blocksize
        return Spec.create(self.name, weight.quant_type, **options)


def _is_int8(module) -> bool:
    return layer_class_name(module) == "Linear8bitLt"


def _weight_only(module) -> None:
    """An int8 layer runs weight-only: bitsandbytes' dequantize + matmul, not LLM.int8 (``bnb_int8.py``)."""
    if _is_int8(module):
        from .bnb_int8 import adopt

        adopt(module)


def _keep_saved_layout(module) -> None:
    """Keep a 4-bit layer's weight in the layout bitsandbytes saves and dequantizes.

    On a CPU with AVX512-BF16, bitsandbytes 0.50's ``Linear4bit.forward`` repacks the weight in place on its
    first call into a layout that its own ``dequantize_4bit`` does not read: PEFT's LoRA merge, ``dequantize()``
    and the saved files read through it then went wrong without an error (rel. error 0.07 instead of 0.002);
    it also asserts on layers whose out_features is not a multiple of 32, and without the kernels-community
    kernel (fetched from the Hub at run time) its fallback ran 1.9x slower on a 3072 x 3072 layer on this
    machine (9.9 ms against 5.3 ms at 288 tokens). A layer already repacked is restored with bitsandbytes'
    own inverse (best effort: the repack rounded the block scales to bfloat16)."""
    if not hasattr(module, "support_avx512bf16_for_cpu"):
        return
    module.support_avx512bf16_for_cpu = False
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        module.quant_state = weight.quant_state


# --- offloading: a layer moves with its quantization state as one unit -------------------------------------
#
# bitsandbytes keeps the 4-bit block scales in a QuantState object and the int8 row scales (SCB) on the
# parameter or in the layer's MatmulLtState: outside the module's parameters and buffers. Offloaders move
# parameters and buffers only (diffusers' group offload swaps ``.data``; ``Module.to`` goes through
# ``_apply``, which never calls ``Linear8bitLt.to``), so the scales stay behind and the next forward fails
# with a device mismatch, or the int8 state puts the weight back on the device it came from. The fix: the
# scales become non-persistent buffers of the layer (integer views, so dtype casts never touch them), which
# every offloader moves with the weight, and bitsandbytes' state objects read and write those buffers
# (properties on a subclass of their own class), so no second reference keeps a moved copy alive.

_INT_VIEW = {4: "int32", 2: "int16", 1: "uint8"}
_QS_FIELDS = ("absmax", "code", "offset")
_LINKED: dict[type, type] = {}


def _scale_property(field: str):
    def get(self):
        if field == "CB":
            return self._dq_module.weight.data
        buffer = self._dq_module._buffers.get(self._dq_prefix + field)
        dtype = self._dq_dtypes.get(field)
        if buffer is None or dtype is None:
            return self.__dict__.get(field)
        return buffer.view(dtype) if dtype.is_floating_point else buffer

    def set_(self, value):
        if field == "CB":  # int8: CB is the weight's data itself; a stale copy must never replace it
            return
        if value is None:
            # cleared (PEFT's merge ends with state.reset_grads()): read as None until set again; the buffer
            # object stays for the next value, so offloaders keyed by it keep working
            self._dq_dtypes.pop(field, None)
            self.__dict__[field] = None
            return
        _store(self._dq_module, self._dq_prefix + field, value)
        self._dq_dtypes[field] = value.dtype

    return property(get, set_)


def _store(module, name: str, value) -> None:
    import torch

    kind = getattr(torch, _INT_VIEW[value.element_size()])
    as_int = value.view(kind) if value.is_floating_point() else value
    buffer = module._buffers.get(name)
    if buffer is None:
        module.register_buffer(name, as_int, persistent=False)
    else:
        buffer.data = as_int  # the same buffer object: offloaders keyed by it keep working


def _linked_class(base: type, fields: tuple[str, ...]) -> type:
    if base not in _LINKED:

        def plain(self):
            """An unlinked copy's contents: bitsandbytes' own class holding the tensors themselves."""
            out = base.__new__(base)
            out.__dict__.update({k: v for k, v in self.__dict__.items() if not k.startswith("_dq_")})
            out.__dict__.update({f: getattr(self, f) for f in fields})
            return out

        def deepcopy(self, memo):
            import copy

            return copy.deepcopy(plain(self), memo)

        def reduce_ex(self, protocol):  # pickled as the unlinked copy: the linked class is made at run time
            return _unlinked, (base, plain(self).__dict__)

        namespace = {f: _scale_property(f) for f in fields}
        namespace.update(__deepcopy__=deepcopy, __reduce_ex__=reduce_ex)
        _LINKED[base] = type(f"Linked{base.__name__}", (base,), namespace)
    return _LINKED[base]


def _unlinked(base: type, attributes: dict):
    """Unpickling a linked state object: bitsandbytes' own class holding the tensors themselves."""
    out = base.__new__(base)
    out.__dict__.update(attributes)
    return out


def _link(obj, module, prefix: str, fields: tuple[str, ...]) -> None:
    """Move ``obj``'s scale tensors into buffers of ``module`` and make ``obj`` read them from there."""
    if type(obj) in _LINKED.values():
        return
    values = {f: obj.__dict__.pop(f, None) for f in fields}
    obj._dq_module, obj._dq_prefix, obj._dq_dtypes = module, prefix, {}
    obj.__class__ = _linked_class(type(obj), fields)
    for field, value in values.items():
        setattr(obj, field, value)


def _keep_state_with_weight(module) -> None:
    if _is_int8(module):
        _move_scb_to_state(module)
        _link(module.state, module, "_dq_", ("CB", "SCB"))
        if not getattr(module, "_dq_relinks", False):
            # A LoRA merge gives the weight new codes with their SCB on the parameter (bitsandbytes' own forward
            # moved it to the state; the weight-only one does not): move it to the linked state before the
            # call, so offloaders move it and PEFT's unmerge and dequantize (which read the state) see it.
            module.register_forward_pre_hook(_move_scb_before_call)
            module._dq_relinks = True
        return
    _link_quant_state(module)
    if not getattr(module, "_dq_relinks", False):
        # A LoRA merge or a reload gives the weight a new quant state: link that one too.
        module.register_forward_pre_hook(_link_before_call)
        module._dq_relinks = True


def _move_scb_before_call(module, args) -> None:  # module-level, not a lambda: the layer stays picklable
    _move_scb_to_state(module)


def _link_before_call(module, args) -> None:
    _link_quant_state(module)


def _move_scb_to_state(module) -> None:
    """What bitsandbytes' ``init_8bit_state`` leaves: the row scales on the state, none on the weight."""
    weight, state = module.weight, module.state
    if weight.SCB is not None:
        state.SCB = weight.SCB
    elif state.SCB is None:
        return
    weight.CB = weight.SCB = None


def _link_quant_state(module) -> None:
    qs = module.weight.quant_state
    _link(qs, module, "_dq_", _QS_FIELDS)
    if qs.nested and qs.state2 is not None:
        _link(qs.state2, module, "_dq_state2_", _QS_FIELDS)
    module.quant_state = qs
