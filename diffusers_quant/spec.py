"""Spec (one quantization choice) and Plan (what a whole load should do), with one string grammar.

Spec:  ``backend:qtype[?key=value&key=value]``      e.g. ``bnb:nf4?double_quant=false``
Plan:  ``pattern=spec[,pattern=spec...][;setting=value...]``
       e.g. ``transformer=bnb:nf4,text_encoder_2=quanto:qint8;mode=on-load;offload=model``

The same grammar serves the environment variable, the CLI and Python.  Settings may also be
separated by commas; a key is a setting when it is one of ``SETTINGS``.

Patterns select components by name (exact or fnmatch), by group (``GROUPS``), or, for a model loaded on
its own, by kind: in a pipeline ``text_encoder`` is the component of that name, never ``text_encoder_2``.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import sys
from dataclasses import dataclass, field, fields, replace

from .errors import SpecError, choices

MODES = ("auto", "on-load", "post-load")
OFFLOADS = ("none", "model", "sequential", "balanced", "group")
DTYPES = ("bfloat16", "float16", "float32")
SETTINGS = (
    "mode",
    "offload",
    "device",
    "dtype",
    "gpu_memory",
    "max_memory",
    "group_type",
    "group_blocks",
    "stream",
    "record_stream",
    "low_cpu_mem_usage",
    "compute",
)
# compute=fp8 | int8: quantized Linears with fp8 / int8 weights run W8A8 matmuls (see compute.py)
COMPUTES = ("none", "fp8", "int8", "auto")
# Budgets belong to offload=balanced, the others to offload=group (diffusers' group-offloading options).
BALANCED_SETTINGS = ("gpu_memory", "max_memory")
GROUP_SETTINGS = ("group_type", "group_blocks", "stream", "record_stream", "low_cpu_mem_usage")
GROUP_TYPES = ("block", "leaf")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_flag(text: str) -> bool | None:
    """``true``/``yes``/``on``/``1`` -> True, their opposites -> False, anything else -> None."""
    text = str(text).strip().lower()
    return text in _TRUE if text in _TRUE + _FALSE else None


# Component kinds: what a component is, whatever the pipeline calls it.
KINDS = ("transformer", "unet", "text_encoder", "vae", "controlnet", "other")
# Group names usable as patterns, expanding to kinds (in a pipeline too).
GROUPS = {"model": ("transformer", "unet"), "text_encoders": ("text_encoder",)}
# Kind names usable as patterns for a model loaded on its own, whatever its folder is called.  In a pipeline
# they are component names only: the pipelines name their components after these words, and a pattern
# that is a component's name must select that component alone.
KIND_WORDS = ("transformer", "unet", "text_encoder", "vae", "controlnet")

_DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
}


def normalize_dtype(name: str) -> str:
    name = str(name).replace("torch.", "").strip().lower()
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise SpecError(f"unknown dtype {name!r}; expected one of {choices(DTYPES)}")
    return name


@dataclass(frozen=True)
class Spec:
    """One quantization choice: backend, qtype and options (sorted, so equal specs compare equal)."""

    backend: str
    qtype: str
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Spec:
        from .backends import get_backend

        text = text.strip()
        if ":" not in text:
            raise SpecError(f"bad spec {text!r}; expected 'backend:qtype', e.g. 'bnb:nf4' or 'quanto:qint8'")
        backend_name, rest = text.split(":", 1)
        qtype, _, query = rest.partition("?")
        backend = get_backend(backend_name.strip().lower())
        options = {}
        for item in filter(None, query.split("&")):
            key, sep, value = item.partition("=")
            if not sep:
                raise SpecError(f"bad option {item!r} in spec {text!r}; expected key=value")
            options[key.strip()] = value.strip()
        return cls.create(backend.name, qtype, **options)

    @classmethod
    def create(cls, backend: str, qtype: str, /, **options: object) -> Spec:
        """Build a validated Spec; unknown backends, qtypes and options, and option values out of range,
        raise SpecError naming the choices. (An option called ``backend`` or ``qtype`` is just unknown.)"""
        from .backends import get_backend

        impl = get_backend(backend)
        qtype = impl.normalize_qtype(str(qtype).strip())
        known = impl.option_names()
        for key in options:
            if key not in known:
                raise SpecError(
                    f"unknown option {key!r} for backend {impl.name!r}; expected one of {choices(known)}"
                )
        opts = tuple(sorted((k, _option_text(v)) for k, v in options.items()))
        for key, value in opts:
            problem = impl.option_problem(key, value)
            if problem:
                spec_text = f"{impl.name}:{qtype}?{key}={value}"
                raise SpecError(f"option {key}={value!r} in {spec_text}: {problem}")
        return cls(impl.name, qtype, opts)

    def option(self, key: str, default: str | None = None) -> str | None:
        return dict(self.options).get(key, default)

    def patterns(self, key: str) -> tuple[str, ...]:
        """include / exclude options hold fnmatch patterns separated by '|'."""
        value = self.option(key)
        return tuple(p for p in (value or "").split("|") if p)

    def __str__(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in self.options)
        return f"{self.backend}:{self.qtype}" + (f"?{query}" if query else "")

    def to_dict(self) -> dict:
        return {"backend": self.backend, "qtype": self.qtype, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, data: dict) -> Spec:
        return cls.create(data["backend"], data["qtype"], **data.get("options", {}))


def _option_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "|".join(str(v) for v in value)
    return str(value)


def _bool_setting(key: str, value: object) -> bool:
    flag = value if isinstance(value, bool) else parse_flag(value)
    if flag is None:
        raise SpecError(f"{key}={value!r}; expected true or false")
    return flag


MAX_MEMORY_FORMS = (
    "expected 'gpu:GiB|cpu:GiB' (the plan's GPU) or 'N:GiB|N:GiB|cpu:GiB' (GPU N each) with positive "
    "numbers, e.g. max_memory=gpu:8|cpu:64 or max_memory=0:40|1:40|cpu:64"
)


def _max_memory_text(value: object) -> str:
    """Normalise accelerate's per-device budgets (GiB): ``gpu:8|cpu:64`` (``gpu`` or ``cuda`` = the plan's
    GPU) or ``0:40|1:40|cpu:64`` (GPU indices, as accelerate's ``max_memory={0: ..., 1: ...}``; ``cuda:0:40``
    is read as ``0:40``)."""
    parts: dict[str, str] = {}
    for item in str(value).split("|"):
        key, sep, amount = item.strip().partition(":")
        key = key.strip().lower()
        if key == "cuda" and amount.count(":") == 1:  # cuda:N:GiB
            key, _, amount = amount.partition(":")
            key = key.strip()
        key = "gpu" if key == "cuda" else key
        try:
            gib = float(amount)
        except ValueError:
            gib = -1.0
        if not sep or not (key in ("gpu", "cpu") or key.isdigit()) or not (gib > 0 and math.isfinite(gib)):
            raise SpecError(f"max_memory={value!r}; {MAX_MEMORY_FORMS}")
        key = str(int(key)) if key.isdigit() else key
        if key in parts:
            what = f"GPU {key}" if key.isdigit() else key
            raise SpecError(f"max_memory={value!r} gives {what} twice; expected e.g. max_memory=gpu:8|cpu:64")
        parts[key] = f"{gib:g}"
    indices = [k for k in parts if k.isdigit()]
    if "gpu" in parts and indices:
        raise SpecError(
            f"max_memory={value!r} mixes gpu (the plan's GPU) with GPU indices; fix: name every GPU by its "
            "index, e.g. max_memory=0:40|1:40|cpu:64"
        )
    if "gpu" not in parts and not indices:
        raise SpecError(f"max_memory={value!r} gives no GPU budget; expected e.g. max_memory=gpu:8|cpu:64")
    order = sorted(indices, key=int) + [k for k in ("gpu", "cpu") if k in parts]
    return "|".join(f"{k}:{parts[k]}" for k in order)


def pattern_matches(pattern: str, name: str, kind: str, *, pipeline: bool = False) -> bool:
    """A pattern matches a group of kinds, the component's name (fnmatch), or, unless the component is
    part of a pipeline, its kind (``KIND_WORDS``)."""
    if pattern in GROUPS:
        return kind in GROUPS[pattern]
    if fnmatch.fnmatchcase(name, pattern):
        return True
    return not pipeline and pattern in KIND_WORDS and pattern == kind


def in_pipeline_load() -> bool:
    """Whether a pipeline load is running: the model loads it triggers are components of that pipeline."""
    # The pipeline hook marks its load in loading.ACTIVE_PIPELINE; if that module is not imported, no
    # pipeline load can be running (and this module must not import torch to find out).
    loading = sys.modules.get("diffusers_quant.loading")
    return loading is not None and loading.ACTIVE_PIPELINE.get() is not None


def _refuse_non_spec(key: str, value: str, *, setting_position: bool) -> None:
    """``key=value`` where value is no spec: after a ';', or with a key close to a setting's name, the key
    is a misspelt setting; otherwise the value is a bad spec (Spec.parse says how)."""
    import difflib  # only for a misspelt setting: kept off the import path of every process

    close = difflib.get_close_matches(key, SETTINGS, n=1, cutoff=0.6)
    if close or setting_position:
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SpecError(f"unknown setting {key!r}; expected one of {', '.join(SETTINGS)}{hint}")
    Spec.parse(value)


@dataclass(frozen=True)
class Plan:
    """What a load should do: component pattern -> Spec (None = leave in full precision) and settings."""

    entries: tuple[tuple[str, Spec | None], ...] = ()
    mode: str = "auto"
    offload: str = "none"
    device: str = "cpu"
    dtype: str | None = None
    # GiB of GPU memory a balanced offload may fill per component (default: accelerate's balanced split).
    gpu_memory: float | None = None
    # accelerate's max_memory for offload=balanced, GiB per device: 'gpu:GiB|cpu:GiB' (the plan's GPU) or
    # 'N:GiB|N:GiB|cpu:GiB' (GPU N each; several GPUs spread a pipeline's components and blocks over them).
    max_memory: str | None = None
    # diffusers' group offloading: block_level groups of group_blocks blocks, or leaf_level; CUDA streams
    # overlap the transfers with compute.
    group_type: str = "block"
    group_blocks: int = 1
    stream: bool = False
    record_stream: bool = False
    low_cpu_mem_usage: bool = False
    compute: str = "none"
    # Where the plan came from (call, context, env); not part of its identity.
    source: str = field(default="python", compare=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise SpecError(f"unknown mode {self.mode!r}; expected one of {choices(MODES)}")
        if self.offload not in OFFLOADS:
            raise SpecError(f"unknown offload {self.offload!r}; expected one of {choices(OFFLOADS)}")
        device = str(self.device)
        if not re.fullmatch(r"(cpu|cuda|mps|xpu|npu|hpu)(:\d+)?", device):
            hint = f"; did you mean {device.strip().lower()!r}?" if device.strip().lower() != device else ""
            raise SpecError(f"device={device!r}; expected cpu, cuda or cuda:N{hint}")
        if self.compute not in COMPUTES:
            raise SpecError(
                f"compute={self.compute!r}; expected one of {choices(COMPUTES)} (fp8 runs quanto:qfloat8 "
                "layers on fp8 tensor cores, int8 runs quanto:qint8 layers with int8 matmuls)"
            )
        if self.dtype is not None:
            object.__setattr__(self, "dtype", normalize_dtype(self.dtype))
        if self.gpu_memory is not None:
            try:
                object.__setattr__(self, "gpu_memory", float(self.gpu_memory))
            except (TypeError, ValueError):
                raise SpecError(
                    f"gpu_memory={self.gpu_memory!r}; expected a number of GiB, e.g. gpu_memory=8"
                ) from None
            if not (self.gpu_memory > 0 and math.isfinite(self.gpu_memory)):
                raise SpecError(f"gpu_memory={self.gpu_memory:g}; expected a positive number of GiB")
        self._check_offload_settings()
        for pattern, _ in self.entries:
            if not pattern:
                raise SpecError("empty component pattern in plan; expected e.g. 'transformer=bnb:nf4'")

    def _check_offload_settings(self) -> None:
        defaults = {f.name: f.default for f in fields(Plan)}
        for key in ("stream", "record_stream", "low_cpu_mem_usage"):
            object.__setattr__(self, key, _bool_setting(key, getattr(self, key)))
        group_type = str(self.group_type).lower().removesuffix("_level")
        if group_type not in GROUP_TYPES:
            raise SpecError(f"unknown group_type {self.group_type!r}; expected one of {choices(GROUP_TYPES)}")
        object.__setattr__(self, "group_type", group_type)
        try:
            blocks = self.group_blocks
            object.__setattr__(
                self, "group_blocks", blocks if type(blocks) is int else int(str(blocks).strip())
            )
        except (TypeError, ValueError):
            raise SpecError(
                f"group_blocks={self.group_blocks!r}; expected a whole number, e.g. group_blocks=1"
            ) from None
        if self.group_blocks < 1:
            raise SpecError(f"group_blocks={self.group_blocks}; expected 1 or more blocks per group")
        if self.max_memory is not None:
            object.__setattr__(self, "max_memory", _max_memory_text(self.max_memory))
            self._check_device_is_budgeted()
        if self.group_blocks != 1 and self.group_type == "leaf":
            raise SpecError("group_blocks is for group_type=block (leaf groups are single layers); drop one")
        if self.gpu_memory is not None and self.max_memory is not None:
            raise SpecError("gpu_memory and max_memory both set a GPU budget; give one of them")
        if self.record_stream and not self.stream:
            raise SpecError(
                "record_stream=true needs stream=true (it records tensors on the transfer stream)"
            )
        for group, mode in ((BALANCED_SETTINGS, "balanced"), (GROUP_SETTINGS, "group")):
            given = [k for k in group if getattr(self, k) != defaults[k]]
            if given and self.offload != mode:
                raise SpecError(
                    f"{', '.join(given)} {'is a setting' if len(given) == 1 else 'are settings'} of "
                    f"offload={mode}, but the plan has offload={self.offload}; fix: add offload={mode} or drop "
                    f"{', '.join(given)}"
                )

    def _check_device_is_budgeted(self) -> None:
        """With GPUs named by index, the plan's GPU (where inputs go and CPU blocks run) is one of them."""
        indices = self.gpu_indices()
        index = re.fullmatch(r"cuda:(\d+)", str(self.device))
        if indices and index and int(index.group(1)) not in indices:
            listed = "|".join(f"{i}:..." for i in indices)
            raise SpecError(
                f"device={self.device} is not among the GPUs max_memory={self.max_memory} budgets ({listed}); "
                f"fix: device=cuda:{indices[0]}, or add {index.group(1)}:GiB to max_memory"
            )

    def gpu_indices(self) -> list[int]:
        """The GPUs ``max_memory`` names by index, in order (empty for ``gpu:...`` or no max_memory)."""
        return [k for k in self.max_memory_bytes() if isinstance(k, int)]

    def max_memory_bytes(self) -> dict[str | int, int]:
        """``max_memory`` as accelerate takes it, in bytes: GPU indices as ints, 'gpu' standing for the plan's
        GPU, 'cpu'."""
        out: dict[str | int, int] = {}
        for item in self.max_memory.split("|") if self.max_memory else ():
            key, _, value = item.partition(":")
            out[int(key) if key.isdigit() else key] = int(float(value) * 2**30)
        return out

    @classmethod
    def parse(cls, text: str, source: str = "python") -> Plan:
        entries: list[tuple[str, Spec | None]] = []
        settings: dict[str, str] = {}
        # (item, whether it follows a ';', where the grammar puts settings)
        items = ((p.strip(), i > 0) for i, chunk in enumerate(text.split(";")) for p in chunk.split(","))
        for item, after_semicolon in items:
            if not item:
                continue
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not value:
                raise SpecError(
                    f"bad plan item {item!r}; expected 'component=backend:qtype' (e.g. 'transformer=bnb:nf4') "
                    f"or a setting ({', '.join(f'{s}=...' for s in SETTINGS)})"
                )
            if key in SETTINGS:
                settings[key] = value
            elif value.lower() == "none" or ":" in value:
                entries.append((key, None if value.lower() == "none" else Spec.parse(value)))
            else:  # not a spec: a misspelt setting, or a bad spec
                _refuse_non_spec(key, value, setting_position=after_semicolon)
        return cls(entries=tuple(entries), source=source, **settings)

    @classmethod
    def coerce(cls, value: Plan | str | dict, source: str = "python") -> Plan:
        """Accept a Plan, a plan string, or a {pattern: spec} mapping."""
        if isinstance(value, Plan):
            return value
        if isinstance(value, str):
            return cls.parse(value, source=source)
        if isinstance(value, dict):
            bad = [k for k in value if not isinstance(k, str) or not k.strip()]
            if bad:
                raise SpecError(
                    f"plan keys must be component names or patterns (strings), not {bad[0]!r}; e.g. "
                    "{'transformer': 'bnb:nf4'}"
                )
            entries = tuple(
                (k, v if isinstance(v, Spec) or v is None else Spec.parse(str(v))) for k, v in value.items()
            )
            return cls(entries=entries, source=source)
        raise SpecError(f"a plan must be a string, a dict or a Plan, not {type(value).__name__}")

    def spec_for(self, name: str, kind: str, *, pipeline: bool | None = None) -> Spec | None:
        """First entry whose pattern matches wins, so exact names can precede broad patterns.

        ``pipeline``: whether the component is part of a pipeline (then kind words are names only);
        by default, whether a pipeline load is running."""
        if pipeline is None:
            pipeline = in_pipeline_load()
        for pattern, spec in self.entries:
            if pattern_matches(pattern, name, kind, pipeline=pipeline):
                return spec
        return None

    def with_settings(self, **settings) -> Plan:
        return replace(self, **{k: v for k, v in settings.items() if v is not None})

    def __str__(self) -> str:
        parts = ",".join(f"{p}={s if s is not None else 'none'}" for p, s in self.entries)
        defaults = Plan()
        settings = [f"{k}={getattr(self, k)}" for k in SETTINGS if getattr(self, k) != getattr(defaults, k)]
        return ";".join(x for x in [parts, *settings] if x)

    def to_dict(self) -> dict:
        return {
            "entries": [[p, s.to_dict() if s else None] for p, s in self.entries],
            "mode": self.mode,
            "offload": self.offload,
            "device": self.device,
            "dtype": self.dtype,
            **{
                k: getattr(self, k)
                for k in ("gpu_memory", *BALANCED_SETTINGS[1:], *GROUP_SETTINGS, "compute")
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        entries = tuple((p, Spec.from_dict(s) if s else None) for p, s in data.pop("entries"))
        return cls(entries=entries, **data)
