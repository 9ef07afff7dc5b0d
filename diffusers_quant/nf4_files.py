"""Forge's bitsandbytes NF4 / FP4 single files, loaded as they are and written in their layout.

Forge (``flux1-dev-bnb-nf4-v2.safetensors``) stores each quantized Linear as bitsandbytes serialises a
``Params4bit``: the packed weight (uint8, two 4-bit codes a byte, row-major), ``.absmax`` (one float32 per
block of 64 codes; in older files itself quantized: ``.nested_absmax``, ``.nested_quant_map``),
``.quant_map`` and the JSON ``.quant_state.bitsandbytes__nf4`` (shape, dtype, blocksize), in the model's
original key layout. Loaded here, each such weight becomes bitsandbytes' own ``Linear4bit`` holding the
file's codes and block scales, so the model carries diffusers' bnb quantizer and config (save, LoRA,
dequantize, offload) like one quantized by ``bnb:nf4``.

diffusers' converter splits Flux's fused weights (``qkv``, ``linear1``) into rows. A row range of a packed
weight is a byte range, and its block scales a range of ``absmax``, when the range starts and ends on a
block: so the converter runs on stand-ins tagged with row ids (``convert.CarryRows``), and each converted
weight is cut from the file's bytes. The writer runs the same in reverse (diffusers' keys to Flux's).
Nested block scales are expanded to float32 (as bitsandbytes does before every dequantize), so the codes
and the dequantized weights are the file's exactly.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass

import torch

from .components import fp32_modules
from .convert import CarryRows, convert_checkpoint, finish_load, model_config, nbytes_at
from .detect import Detected
from .errors import QuantError
from .layouts import ORIGINAL_LAYOUTS, require_original_layout
from .spec import Plan, Spec

NF4_FORMAT = "forge-nf4"
_MARKER = ".quant_state.bitsandbytes__"
_STATS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


@dataclass(frozen=True)
class Packed:
    """One 4-bit weight: ``rows`` x ``cols`` codes packed two a byte (``data``, flat), one float32 scale
    per ``blocksize`` codes (``absmax``), the code book (``code``), the dtype it dequantizes to."""

    data: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    quant_type: str
    rows: int
    cols: int
    dtype: torch.dtype

    def quant_state(self, dtype: torch.dtype | None = None):
        from bitsandbytes.functional import QuantState

        return QuantState(
            absmax=self.absmax,
            shape=torch.Size((self.rows, self.cols)),
            code=self.code,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            dtype=dtype or self.dtype,
        )

    def serialised(self, key: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors bitsandbytes (and Forge) save for this weight under ``key``."""
        stats = self.quant_state(dtype).as_dict(packed=True)
        return {key: self.data.view(-1, 1), **{f"{key}.{k}": v for k, v in stats.items()}}

    def dequantized(self) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit

        weight = dequantize_4bit(self.data.view(-1, 1), self.quant_state(torch.float32))
        return weight.view(self.rows, self.cols)


def from_quant_state(data: torch.Tensor, state) -> Packed:
    """A ``Packed`` of bitsandbytes' weight bytes and ``QuantState`` (nested scales expanded to float32,
    as ``dequantize_4bit`` expands them)."""
    from bitsandbytes.functional import dequantize_blockwise

    absmax = state.absmax
    if state.nested:
        absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset
    rows, cols = (int(d) for d in state.shape)
    return Packed(
        data.detach().reshape(-1).view(torch.uint8),
        absmax.detach().float().reshape(-1),
        state.code.detach(),
        int(state.blocksize),
        state.quant_type,
        rows,
        cols,
        state.dtype,
    )


def _read_packed(checkpoint: dict, key: str, path: str) -> Packed:
    """The weight ``key`` of a Forge file and its quantization state, checked against each other."""
    from bitsandbytes.functional import QuantState

    stats = {k[len(key) + 1 :]: v for k, v in checkpoint.items() if k.startswith(key + ".")}
    try:
        state = QuantState.from_dict(dict(stats), torch.device("cpu"))
    except Exception as e:  # bitsandbytes raises assertions, KeyErrors and JSON errors for damaged states
        raise QuantError(
            f"{path}: the 4-bit state of {key} is damaged ({type(e).__name__}: {str(e)[:120]}); fix: download "
            "the file again"
        ) from None
    data = checkpoint[key]
    shape = tuple(state.shape or ())
    ok = len(shape) == 2 and state.quant_type in ("nf4", "fp4") and data.dtype == torch.uint8
    if ok:
        n = shape[0] * shape[1]
        blocks = -(-n // max(int(state.blocksize), 1))
        ok = data.numel() == -(-n // 2) and state.absmax.numel() == blocks and state.code.numel() == 16
    if not ok:
        raise QuantError(
            f"{path}: {key} does not match its 4-bit state (shape {shape}, {data.numel()} bytes, "
            f"{state.absmax.numel()} block scales, type {state.quant_type}); fix: download the file again"
        )
    return from_quant_state(data, state)


class _Stand:
    """Stand-ins for packed weights: meta tensors of the logical shape, tagged with global row ids."""

    def __init__(self) -> None:
        self.tags: dict = {}
        self.bases: list[int] = []
        self.packed: list[Packed] = []

    def add(self, packed: Packed) -> torch.Tensor:
        base = self.bases[-1] + self.packed[-1].rows if self.bases else 0
        stand = torch.empty((packed.rows, packed.cols), dtype=torch.uint8, device="meta")
        self.tags[id(stand)] = (stand, torch.arange(base, base + packed.rows), packed.quant_type)
        self.bases.append(base)
        self.packed.append(packed)
        return stand

    def tagged(self, value) -> torch.Tensor | None:
        """The row ids of a converted tensor that stands for packed rows, else None."""
        tag = self.tags.get(id(value)) if isinstance(value, torch.Tensor) else None
        return tag[1] if tag is not None and tag[0] is value else None

    def runs(self, ids: torch.Tensor) -> list[tuple[Packed, int, int]]:
        """``ids`` as runs of consecutive rows of one source each: (source, first row, end row)."""
        out: list[tuple[Packed, int, int]] = []
        ids_list = ids.tolist()
        i = 0
        while i < len(ids_list):
            src = bisect.bisect_right(self.bases, ids_list[i]) - 1
            base, packed = self.bases[src], self.packed[src]
            j = i + 1
            while (
                j < len(ids_list) and ids_list[j] == ids_list[j - 1] + 1 and ids_list[j] < base + packed.rows
            ):
                j += 1
            out.append((packed, ids_list[i] - base, ids_list[j - 1] - base + 1))
            i = j
        return out

    def gather(self, value: torch.Tensor, ids: torch.Tensor) -> Packed | None:
        """The packed weight the converted ``value`` stands for, cut and joined from the sources' bytes; None
        when that cannot be done without requantizing (not 2-D, or a cut inside a block)."""
        runs = self.runs(ids)
        first = runs[0][0]
        cols, bs = first.cols, first.blocksize
        if value.dim() != 2 or tuple(value.shape) != (len(ids), cols):
            return None
        data, absmax = [], []
        for k, (p, s, e) in enumerate(runs):
            last = k == len(runs) - 1
            same = p.cols == cols and p.blocksize == bs and torch.equal(p.code, first.code)
            ends_on_block = (e * cols) % bs == 0 or (last and e == p.rows)
            if not same or (s * cols) % bs or not ends_on_block or (s * cols) % 2:
                return None
            data.append(p.data[s * cols // 2 : -(-e * cols // 2)])
            absmax.append(p.absmax[s * cols // bs : -(-e * cols // bs)])
        # a code book of its own: saving refuses tensors that share memory
        code = first.code.clone()
        return Packed(
            torch.cat(data), torch.cat(absmax), code, bs, first.quant_type, len(ids), cols, first.dtype
        )

    def dequantized(self, value: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The float32 values of the rows ``value`` stands for, in its shape."""
        rows = [p.dequantized()[s:e] for p, s, e in self.runs(ids)]
        return torch.cat(rows).reshape(value.shape)


def load_nf4_file(load, path: str, kwargs: dict, detected: Detected, plan: Plan | None) -> torch.nn.Module:
    """``load.cls`` from the Forge NF4 / FP4 single file at ``path``, its Linears bitsandbytes 4-bit layers
    with the file's codes and block scales."""
    plan = plan or Plan()
    from .backends import get_backend

    bnb = get_backend("bnb")
    bnb.require()
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    checkpoint = load_file(path)
    weights = [k[: k.index(_MARKER)] for k in checkpoint if _MARKER in k]
    stand = _Stand()
    sources = {k: v for k, v in checkpoint.items() if not any(k.startswith(w + ".") for w in weights)}
    for key in weights:
        if key not in checkpoint:
            raise QuantError(f"{path}: {key} has a 4-bit state but no weight; fix: download the file again")
        sources[key] = stand.add(_read_packed(checkpoint, key, path))
    del checkpoint
    config = model_config(load.cls, sources, kwargs, path)
    with init_empty_weights():
        model = load.cls.from_config(config)
    converted = convert_checkpoint(load.cls, model, config, sources, stand.tags, kwargs, path, "4-bit")

    dtype = load.dtype or torch.float32
    keep = fp32_modules(model, dtype)
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    bytes_before = nbytes_at(model, dtype)
    layers: dict[str, Packed] = {}
    plain: dict[str, torch.Tensor] = {}
    for key, value in converted.items():
        ids = stand.tagged(value)
        kept_fp32 = bool(keep.intersection(key.split(".")))
        target = torch.float32 if kept_fp32 else dtype
        if ids is None:
            plain[key] = value.to(target) if value.is_floating_point() else value
            continue
        layer = key.removesuffix(".weight")
        packed = stand.gather(value, ids)
        if key.endswith(".weight") and layer in linears and packed is not None and not kept_fp32:
            layers[layer] = packed
        else:  # not a Linear's weight, or cut inside a block: dequantized, as the file's scales say
            plain[key] = stand.dequantized(value, ids).to(target)
    types = sorted({p.quant_type for p in layers.values()})
    if len(types) > 1:  # one BitsAndBytesConfig describes a model: its save would write the wrong type
        raise QuantError(
            f"{path}: the file mixes 4-bit types ({', '.join(types)}); fix: load its bf16 original"
        )
    spec = Spec.create("bnb", types[0] if types else "nf4", double_quant=False)
    built = {layer: ((p.rows, p.cols), p.serialised("weight", dtype)) for layer, p in layers.items()}
    return finish_load(load, model, path, plan, spec, bnb, plain, built, bytes_before)


# --- writing Forge's layout ---------------------------------------------------------------------------------


def write_forge_nf4(model: torch.nn.Module, path: str) -> Counter:
    """Write a model quantized with ``bnb:nf4`` / ``bnb:fp4`` as a Forge 4-bit single file in its original key
    layout (block scales as float32, Forge's "v2" layout), the other tensors in their dtype. Written to a
    temporary name, then renamed. Returns how many tensors of each dtype were written."""
    from safetensors.torch import save_file

    from .files import replacing

    require_original_layout(type(model).__name__, "bnb:nf4")
    four_bit = {
        name: m
        for name, m in model.named_modules()
        if type(m).__name__ == "Linear4bit" and getattr(m.weight, "quant_state", None) is not None
    }
    if not four_bit:
        raise QuantError(
            f"{type(model).__name__} has no bitsandbytes 4-bit layers to write; fix: load it with "
            "quant='bnb:nf4' (the CLI does: --quant bnb:nf4)"
        )
    stand = _Stand()
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        layer = key.rpartition(".weight")[0] if ".weight" in key else None
        if layer in four_bit:
            continue  # the packed weight and its serialised state: replaced by a stand-in below
        state[key] = value.detach()
    for name, module in four_bit.items():
        state[f"{name}.weight"] = stand.add(from_quant_state(module.weight.data, module.weight.quant_state))
    with CarryRows(stand.tags):
        original = ORIGINAL_LAYOUTS[type(model).__name__](state)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in original.items():
        ids = stand.tagged(value)
        if ids is None:
            tensors[key] = value.contiguous()
            continue
        packed = stand.gather(value, ids)
        if packed is None:
            raise QuantError(
                f"{key}: the layout joins 4-bit weights inside a block; it cannot be written as 4-bit"
            )
        tensors.update(packed.serialised(key))
    with replacing(path) as tmp:
        save_file(tensors, tmp)
    return Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())
