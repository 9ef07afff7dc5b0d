"""Map tensor names of published GGUF files (original-repo layouts) to diffusers state-dict names.

Published diffusion GGUFs mostly keep the original repository's names (city96's Flux/SD3.5/Wan files);
Qwen-Image and other diffusers-native models ship diffusers names, sometimes under ComfyUI's
``model.diffusion_model.`` prefix.

Quantized tensors cannot go through arbitrary tensor code, but the converters only ever cut or join
tensors along dim 0, and dim 0 of a ggml tensor is always a byte slice: a ggml row (the last dim) is a whole
number of blocks, so each dim-0 index covers whole blocks.  diffusers' own GGUF path relies on the same
fact (``GGUFParameter.__torch_function__`` lets ``torch.chunk``/``torch.cat`` run on the uint8 data and
re-attaches the quant type).  Here values may be ``torch.Tensor`` or ``nn.GGUFWeight``; splits become
zero-copy byte slices, joins a concatenation of bytes.

Per format:

* ``diffusers``: names already match; only the ComfyUI prefix is stripped.
* ``flux_bfl`` (BFL Flux.1 dev/schnell/Fill/Kontext layout): implemented here, with the q/k/v and
  single-block linear1 splits sized from the tensors' shapes.  (diffusers'
  ``convert_flux_transformer_checkpoint_to_diffusers`` hard-codes ``inner_dim=3072``; the result is the
  same for real Flux files, which the tests check.)  Needs dim-0 splits of quantized tensors:
  ``img_attn.qkv``/``txt_attn.qkv`` (chunk 3), ``single_blocks.N.linear1`` (split q, k, v, mlp) and
  ``final_layer.adaLN_modulation.1`` (shift/scale swap = split + join).
* ``sd3`` (Stability SD3/SD3.5 ``joint_blocks`` layout): diffusers'
  ``convert_sd3_transformer_checkpoint_to_diffusers`` run on shape-only stand-ins that record which source
  rows land in which output (q/k/v chunks and the shift/scale swap are dim-0 only).
* ``wan`` (Wan 2.1/2.2 original layout): diffusers' ``convert_wan_transformer_to_diffusers``, renames
  only.  Wan-Animate checkpoints (``motion_encoder``/``face_adapter``) index other dims and are refused.
* ``flux2`` (BFL Flux.2 dev / Klein layout): diffusers' ``convert_flux2_transformer_checkpoint_to_diffusers``
  traced (q/k/v chunks, the final shift/scale swap; single blocks stay fused).
* ``chroma`` (Chroma's Flux-like layout with the ``distilled_guidance_layer`` approximator): the
  ``flux_bfl`` mapping plus the approximator's renames.  diffusers' converter hard-codes Flux's widths
  (``inner_dim=3072``, ``mlp_ratio=4``) for the ``linear1`` split, so it is not traced; the tests check the
  two agree at those widths.
* ``hunyuan_video`` (Tencent HunyuanVideo layout): diffusers'
  ``convert_hunyuan_video_transformer_to_diffusers`` traced, with the single blocks' ``linear1`` split here
  first, sized from ``linear2`` (the converter hard-codes ``hidden_size=3072``).
* ``ltx`` (Lightricks LTX-Video 0.9.x layout, ``patchify_proj``/``adaln_single``): diffusers'
  ``convert_ltx_transformer_checkpoint_to_diffusers`` traced, renames only.
* ``lumina2`` (Alpha-VLLM Lumina-Image-2.0 layout, ``cap_embedder``/``attention.qkv``): diffusers'
  ``convert_lumina2_to_diffusers`` traced, with the fused ``qkv`` split here first, sized from
  ``attention.out`` (the converter hard-codes 2304/768/768); the unused ``norm_final.weight`` is dropped
  as the converter drops it.
* Qwen-Image and HiDream files (city96's among them) use diffusers' names: the ``diffusers`` format.
* ``ldm_unet`` (CompVis / SGM SD 1.x, SD 2.x and SDXL UNets, ``input_blocks``/``output_blocks``): diffusers'
  ``convert_ldm_unet_checkpoint`` traced with the model's ``config`` (renames only; the ``[:, :, 0, 0]``
  reshape of ``conv_attn_to_linear`` is the VAE's, which GGUF files do not carry).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
SUPPORTED_FORMATS = (
    "diffusers",
    "flux_bfl",
    "sd3",
    "wan",
    "flux2",
    "chroma",
    "hunyuan_video",
    "ltx",
    "lumina2",
)
KNOWN_FORMATS = (*SUPPORTED_FORMATS, "unknown")


class KeyFormatError(ValueError):
    """Tensor names in a layout that cannot (yet) be mapped to diffusers names."""


# ---------------------------------------------------------------------------------------------------------
# Detection


def strip_prefix(name: str) -> str:
    for prefix in COMFY_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


_LUMINA_QKV = re.compile(r"(layers|noise_refiner|context_refiner)\.\d+\.attention\.qkv\.weight")
_DIFFUSERS_MARKERS = re.compile(
    r"^(transformer_blocks|single_transformer_blocks|down_blocks|up_blocks|mid_block)\."
    r"|^blocks\.\d+\.attn1\."
    r"|^(double|single)_stream_blocks\.\d+\.block\."  # HiDream (its original names are diffusers')
    r"|^(layers|noise_refiner|context_refiner)\.\d+\.attn\.to_q\."  # Lumina2
)


def detect_key_format(names: Iterable[str]) -> str:
    """Which naming layout a checkpoint uses: one of ``KNOWN_FORMATS``."""
    keys = {strip_prefix(n) for n in names}
    if "double_blocks.0.img_attn.qkv.weight" in keys:
        if any(k.startswith("distilled_guidance_layer.") for k in keys):
            return "chroma"
        if any(k.startswith("double_stream_modulation") for k in keys):
            return "flux2"
        return "flux_bfl"
    if "double_blocks.0.img_attn_qkv.weight" in keys:
        return "hunyuan_video"
    if "joint_blocks.0.x_block.attn.qkv.weight" in keys:
        return "sd3"
    if "blocks.0.self_attn.q.weight" in keys and (
        "patch_embedding.weight" in keys or "head.head.weight" in keys
    ):
        return "wan"
    if "input_blocks.0.0.weight" in keys and any(k.startswith("output_blocks.") for k in keys):
        return "ldm_unet"
    if "patchify_proj.weight" in keys:  # before the diffusers markers: LTX keeps transformer_blocks.N
        return "ltx"
    if "cap_embedder.0.weight" in keys or any(_LUMINA_QKV.fullmatch(k) for k in keys):
        return "lumina2"
    if any(_DIFFUSERS_MARKERS.match(k) for k in keys):
        return "diffusers"
    return "unknown"


def to_diffusers_keys(
    tensors: Mapping[str, Any], fmt: str | None = None, config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Rename (and split/join along dim 0) ``tensors`` into diffusers names.

    ``config`` (the diffusers model config) is needed by the layouts whose conversion depends on it
    (``ldm_unet``); the others ignore it.

    Values are ``torch.Tensor`` (logical shape) or ``GGUFWeight``; any object with ``shape``, ``narrow``
    and a ``cat`` static method works.  Raises ``KeyFormatError`` for unsupported formats and for keys a
    converter did not consume.
    """
    fmt = fmt or detect_key_format(tensors)
    sd = {strip_prefix(k): v for k, v in tensors.items()}
    if len(sd) != len(tensors):
        raise KeyFormatError("checkpoint has the same tensor name both with and without a ComfyUI prefix")
    if fmt == "diffusers":
        return sd
    if fmt == "flux_bfl":
        return _convert_flux_bfl(sd)
    if fmt == "sd3":
        from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

        return _run_traced(convert_sd3_transformer_checkpoint_to_diffusers, sd, fmt)
    if fmt == "wan":
        if any(k.startswith(("motion_encoder.", "face_adapter.")) for k in sd):
            raise KeyFormatError(
                "Wan-Animate checkpoints (motion_encoder/face_adapter) are not supported yet"
            )
        from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

        return _run_traced(convert_wan_transformer_to_diffusers, sd, fmt)
    if fmt == "ldm_unet":
        if config is None:
            raise KeyFormatError(
                "GGUF key format 'ldm_unet' is not supported yet without the UNet's config: its block layout "
                "comes from layers_per_block and the added conditioning; fix: pass config= (the folder of the "
                "UNet's config.json)"
            )
        from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

        def convert(checkpoint: dict) -> dict:  # the converter reads only the prefixed (LDM) names
            prefixed = {LDM_UNET_KEY + k: v for k, v in checkpoint.items()}
            return convert_ldm_unet_checkpoint(prefixed, dict(config))

        return _run_traced(convert, sd, fmt)
    if fmt == "flux2":
        from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

        return _run_traced(convert_flux2_transformer_checkpoint_to_diffusers, sd, fmt)
    if fmt == "chroma":
        return _convert_chroma(sd)
    if fmt == "hunyuan_video":
        from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers

        return _run_traced(convert_hunyuan_video_transformer_to_diffusers, _split_hunyuan_linear1(sd), fmt)
    if fmt == "ltx":
        from diffusers.loaders.single_file_utils import convert_ltx_transformer_checkpoint_to_diffusers

        return _run_traced(convert_ltx_transformer_checkpoint_to_diffusers, sd, fmt)
    if fmt == "lumina2":
        from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers

        return _run_traced(convert_lumina2_to_diffusers, _split_lumina_qkv(sd), fmt)
    if fmt == "unknown":
        raise KeyFormatError(
            f"could not recognise the tensor naming of this checkpoint (e.g. {_preview(list(sd), 3)}); "
            f"supported formats: {', '.join(SUPPORTED_FORMATS)}"
        )
    if fmt in KNOWN_FORMATS:
        raise KeyFormatError(
            f"GGUF key format {fmt!r} is not supported yet (supported: {', '.join(SUPPORTED_FORMATS)})"
        )
    raise KeyFormatError(f"unknown GGUF key format {fmt!r}; known: {', '.join(KNOWN_FORMATS)}")


# ---------------------------------------------------------------------------------------------------------
# dim-0 operations on tensors and GGUFWeight alike


def _narrow(value: Any, start: int, length: int) -> Any:
    if start == 0 and length == value.shape[0]:
        return value
    if isinstance(value, torch.Tensor):
        return value.narrow(0, start, length)
    return value.narrow(start, length)


def _cat(values: Sequence[Any]) -> Any:
    if len(values) == 1:
        return values[0]
    if isinstance(values[0], torch.Tensor):
        return torch.cat(list(values), dim=0)
    return type(values[0]).cat(values)


def _split(value: Any, sizes: Sequence[int]) -> list[Any]:
    if sum(sizes) != value.shape[0]:
        raise KeyFormatError(f"cannot split dim 0 of shape {tuple(value.shape)} into {list(sizes)}")
    out, start = [], 0
    for size in sizes:
        out.append(_narrow(value, start, size))
        start += size
    return out


def _swap_halves(value: Any) -> Any:
    """(shift, scale) -> (scale, shift): original AdaLayerNorm order to diffusers'."""
    half = value.shape[0] // 2
    shift, scale = _split(value, [half, value.shape[0] - half])
    return _cat([scale, shift])


# ---------------------------------------------------------------------------------------------------------
# Flux (BFL layout)

_FLUX_GLOBAL = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
}
_FLUX_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
}
_FLUX_QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_FLUX_SINGLE = {
    "modulation.lin": "norm.linear",
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
    "linear2": "proj_out",
}
_FLUX_LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
_BLOCK = re.compile(r"(double_blocks|single_blocks)\.(\d+)\.(.+)")


def _convert_flux_bfl(sd: Mapping[str, Any], fmt: str = "flux_bfl") -> dict[str, Any]:
    out: dict[str, Any] = {}
    unknown: list[str] = []

    def put(name: str, value: Any) -> None:
        if name in out:
            raise KeyFormatError(f"{fmt}: two source tensors map to {name!r}")
        out[name] = value

    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        param = "weight" if param == "scale" else param  # RMSNorm "scale" is diffusers' "weight"
        m = _BLOCK.fullmatch(module)
        if m is None:
            if module == "final_layer.adaLN_modulation.1":
                put(f"norm_out.linear.{param}", _swap_halves(value))
            elif module in _FLUX_GLOBAL:
                put(f"{_FLUX_GLOBAL[module]}.{param}", value)
            else:
                unknown.append(key)
            continue
        kind, index, sub = m.groups()
        if kind == "double_blocks":
            prefix = f"transformer_blocks.{index}."
            if sub in _FLUX_QKV:
                rows = value.shape[0] // 3
                for target, part in zip(_FLUX_QKV[sub], _split(value, [rows] * 3), strict=True):
                    put(f"{prefix}{target}.{param}", part)
            elif sub in _FLUX_DOUBLE:
                put(f"{prefix}{_FLUX_DOUBLE[sub]}.{param}", value)
            else:
                unknown.append(key)
        else:
            prefix = f"single_transformer_blocks.{index}."
            if sub == "linear1":
                inner = _flux_inner_dim(sd, index, fmt)
                sizes = [inner, inner, inner, value.shape[0] - 3 * inner]
                for target, part in zip(_FLUX_LINEAR1, _split(value, sizes), strict=True):
                    put(f"{prefix}{target}.{param}", part)
            elif sub in _FLUX_SINGLE:
                put(f"{prefix}{_FLUX_SINGLE[sub]}.{param}", value)
            else:
                unknown.append(key)
    if unknown:
        raise KeyFormatError(f"{fmt}: no diffusers name for {len(unknown)} tensors: {_preview(unknown)}")
    return out


def _flux_inner_dim(sd: Mapping[str, Any], index: str, fmt: str = "flux_bfl") -> int:
    # linear2 maps concat(attn, mlp) back to the hidden size, so its out dim is the attention width
    linear2 = sd.get(f"single_blocks.{index}.linear2.weight")
    if linear2 is None:
        raise KeyFormatError(
            f"{fmt}: single_blocks.{index}.linear2.weight missing; cannot size linear1 split"
        )
    return int(linear2.shape[0])


# Chroma: Flux's blocks without their modulation, plus the approximator (distilled_guidance_layer)
_CHROMA_GUIDANCE = re.compile(
    r"distilled_guidance_layer\.(?:layers\.(\d+)\.(in_layer|out_layer)|norms\.(\d+))\.(\w+)"
)


def _convert_chroma(sd: Mapping[str, Any]) -> dict[str, Any]:
    guidance: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, value in sd.items():
        if not key.startswith("distilled_guidance_layer."):
            rest[key] = value
            continue
        m = _CHROMA_GUIDANCE.fullmatch(key)
        if m is None:  # in_proj / out_proj keep their names
            guidance[key] = value
        elif m[1] is not None:
            linear = "linear_1" if m[2] == "in_layer" else "linear_2"
            guidance[f"distilled_guidance_layer.layers.{m[1]}.{linear}.{m[4]}"] = value
        else:  # RMSNorm "scale" is diffusers' "weight"
            param = "weight" if m[4] == "scale" else m[4]
            guidance[f"distilled_guidance_layer.norms.{m[3]}.{param}"] = value
    out = _convert_flux_bfl(rest, "chroma")
    clash = sorted(set(out) & set(guidance))
    if clash:
        raise KeyFormatError(f"chroma: two source tensors map to {_preview(clash)}")
    return {**guidance, **out}


# HunyuanVideo and Lumina2: fused tensors diffusers' converters split at hard-coded widths, split here first
# (sized from the tensors' shapes) under names the converters then rename as they would their own pieces.
_HUNYUAN_LINEAR1 = re.compile(r"single_blocks\.(\d+)\.linear1\.(weight|bias)")


def _split_hunyuan_linear1(sd: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in sd.items():
        m = _HUNYUAN_LINEAR1.fullmatch(key)
        if m is None:
            out[key] = value
            continue
        index, param = m.groups()
        hidden = _flux_inner_dim(sd, index, "hunyuan_video")
        sizes = [hidden, hidden, hidden, value.shape[0] - 3 * hidden]
        names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
        for name, part in zip(names, _split(value, sizes), strict=True):
            out[f"single_blocks.{index}.{name}.{param}"] = part
    return out


_LUMINA_QKV_PARAM = re.compile(r"(.+)\.attention\.qkv\.(weight|bias)")


def _split_lumina_qkv(sd: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in sd.items():
        if key == "norm_final.weight":  # unused by the model; diffusers' converter drops it too
            continue
        m = _LUMINA_QKV_PARAM.fullmatch(key)
        if m is None:
            out[key] = value
            continue
        prefix, param = m.groups()
        proj = sd.get(f"{prefix}.attention.out.weight")
        if proj is None:
            raise KeyFormatError(f"lumina2: {prefix}.attention.out.weight missing; cannot size the qkv split")
        q = int(proj.shape[1])  # out maps the heads back to the width: its in dim is the query width
        kv, odd = divmod(value.shape[0] - q, 2)
        if odd or kv <= 0:
            raise KeyFormatError(
                f"lumina2: {key} has {value.shape[0]} rows, not {q} query rows plus two equal key/value parts"
            )
        for name, part in zip(("to_q", "to_k", "to_v"), _split(value, [q, kv, kv]), strict=True):
            out[f"{prefix}.attention.{name}.{param}"] = part
    return out


def _preview(names: Sequence[str], n: int = 8) -> str:
    shown = ", ".join(sorted(names)[:n])
    return shown + (f", ... ({len(names) - n} more)" if len(names) > n else "")


# ---------------------------------------------------------------------------------------------------------
# Running diffusers' converters on shape-only stand-ins


class _UnsupportedOp(Exception):
    pass


class _Rows:
    """Stand-in for a tensor inside a diffusers converter: a shape plus the source rows it is made of.

    Only dim-0 chunk/split/narrow/slice/cat are allowed (anything else would not be a byte operation on
    quantized data) and raise ``_UnsupportedOp``.
    """

    def __init__(self, segments: tuple[tuple[str, int, int], ...], shape: tuple[int, ...]):
        self.segments = segments  # (source name, first row, end row), in order
        self._shape = shape

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._shape)

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self._shape[dim]

    @property
    def ndim(self) -> int:
        return len(self._shape)

    def dim(self) -> int:
        return len(self._shape)

    def _dim0(self, dim: int) -> None:
        if dim not in (0, -len(self._shape)):
            raise _UnsupportedOp(f"operation along dim {dim} (only dim 0 is a byte slice of packed data)")

    def narrow(self, dim: int, start: int, length: int) -> _Rows:
        self._dim0(dim)
        rows = self._shape[0]
        start = start + rows if start < 0 else start
        if not (0 <= start and length >= 0 and start + length <= rows):
            raise _UnsupportedOp(f"narrow({start}, {length}) out of range for {rows} rows")
        picked, pos = [], 0
        for name, a, b in self.segments:
            lo, hi = max(start, pos), min(start + length, pos + b - a)
            if lo < hi:
                picked.append((name, a + lo - pos, a + hi - pos))
            pos += b - a
        return _Rows(tuple(picked), (length, *self._shape[1:]))

    def split(self, split_size: int | Sequence[int], dim: int = 0) -> tuple[_Rows, ...]:
        self._dim0(dim)
        rows = self._shape[0]
        if isinstance(split_size, int):
            sizes = [min(split_size, rows - s) for s in range(0, rows, split_size)]
        else:
            sizes = list(split_size)
            if sum(sizes) != rows:
                raise _UnsupportedOp(f"split sizes {sizes} do not add up to {rows}")
        out, start = [], 0
        for size in sizes:
            out.append(self.narrow(0, start, size))
            start += size
        return tuple(out)

    def chunk(self, chunks: int, dim: int = 0) -> tuple[_Rows, ...]:
        self._dim0(dim)
        return self.split(-(-self._shape[0] // chunks), 0)

    def __getitem__(self, key: Any) -> _Rows:
        if isinstance(key, tuple):
            if not key or any(k != slice(None) for k in key[1:]):
                raise _UnsupportedOp(f"indexing with {key!r}")
            key = key[0]
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise _UnsupportedOp(f"indexing with {key!r}")
        start, stop, _ = key.indices(self._shape[0])
        return self.narrow(0, start, max(stop - start, 0))

    @staticmethod
    def cat(parts: Sequence[_Rows], dim: int = 0) -> _Rows:
        parts = list(parts)
        if not parts or not all(isinstance(p, _Rows) for p in parts):
            raise _UnsupportedOp("cat of non-checkpoint values")
        parts[0]._dim0(dim)
        if any(p._shape[1:] != parts[0]._shape[1:] for p in parts):
            raise _UnsupportedOp("cat of tensors with different trailing dims")
        segments = tuple(s for p in parts for s in p.segments)
        return _Rows(segments, (sum(p._shape[0] for p in parts), *parts[0]._shape[1:]))

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in (torch.cat, torch.concat, torch.concatenate):
            return cls.cat(*args, **kwargs)
        if func in (torch.chunk, torch.Tensor.chunk):
            return args[0].chunk(*args[1:], **kwargs)
        if func in (torch.split, torch.Tensor.split):
            return args[0].split(*args[1:], **kwargs)
        if func in (torch.narrow, torch.Tensor.narrow):
            return args[0].narrow(*args[1:], **kwargs)
        raise _UnsupportedOp(getattr(func, "__name__", repr(func)))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # protocol probes (copy, pickle, numpy) must see a plain AttributeError
            raise AttributeError(name)
        raise _UnsupportedOp(f"tensor attribute or method {name!r}")


def _run_traced(converter: Callable[..., dict], sd: Mapping[str, Any], fmt: str) -> dict[str, Any]:
    """Run a diffusers converter on ``_Rows`` stand-ins, then apply the recorded row plan to the values."""
    proxies = {}
    for k, v in sd.items():
        shape = tuple(int(s) for s in v.shape)
        proxies[k] = _Rows(((k, 0, shape[0] if shape else 1),), shape)
    try:
        plan = converter(dict(proxies))
    except _UnsupportedOp as e:
        raise KeyFormatError(
            f"{fmt}: the diffusers converter needs a tensor operation that cannot run on packed GGUF data "
            f"({e}); this checkpoint variant is not supported yet"
        ) from None
    except KeyError as e:
        raise KeyFormatError(f"{fmt}: checkpoint lacks a tensor the converter expects: {e}") from None

    out: dict[str, Any] = {}
    used: set[str] = set()
    for name, rows in plan.items():
        if not isinstance(rows, _Rows):
            raise KeyFormatError(
                f"{fmt}: converter produced {type(rows).__name__} for {name!r}, not a tensor"
            )
        pieces = [_narrow(sd[src], a, b - a) for src, a, b in rows.segments]
        used.update(src for src, _, _ in rows.segments)
        out[name] = _cat(pieces)
    unused = sorted(set(sd) - used)
    if unused:
        raise KeyFormatError(f"{fmt}: no diffusers name for {len(unused)} tensors: {_preview(unused)}")
    return out
