"""Patches on the loaders: one install() / uninstall() pair that are exact inverses, and a context manager.

Patched (each a classmethod on a base class, so every subclass is covered):

* ``DiffusionPipeline.from_pretrained`` and pipelines' ``FromSingleFileMixin.from_single_file``
* ``ModelMixin.from_pretrained`` and models' ``FromOriginalModelMixin.from_single_file``
* transformers' ``PreTrainedModel.from_pretrained`` (text encoders)

The originals are kept in ``_ORIGINALS`` and put back by identity on uninstall.  Plan precedence for a
load: the call's ``quant=`` keyword > the enclosing pipeline load > ``quantized(...)`` blocks > the plan
given to ``install()`` > the ``DIFFUSERS_QUANT`` environment variable > none.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import importlib
import inspect
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from . import single_file
from .components import Component, count_linears, kind_of_class
from .detect import FORMATS, detect_file
from .errors import PlanRefused, QuantError
from .files import read_json_object
from .fp8_files import FP8_FORMATS, load_fp8_file
from .loading import (
    ACTIVE_PIPELINE,
    Load,
    PipelineLoad,
    check_plan_first,
    component_report,
    load_gguf,
    load_model,
    quantize_loaded,
)
from .nf4_files import NF4_FORMAT, load_nf4_file
from .offload import place_model, place_pipeline, planned_maps
from .pickles import check_pickle, is_pickle_checkpoint
from .plugin import announce_report
from .post_load import state_nbytes
from .report import ComponentReport, Report
from .rules import problems
from .saving import saved_specs
from .spec import Plan

ENV_VAR = "DIFFUSERS_QUANT"
QUANT_KWARG = "quant"

_ORIGINALS: dict[tuple[object, str], object] = {}
_INSTALLED_PLAN: Plan | None = None
_CONTEXT_PLAN: contextvars.ContextVar[Plan | None] = contextvars.ContextVar(
    "diffusers_quant_plan", default=None
)


def ambient_plan() -> Plan | None:
    plan = _CONTEXT_PLAN.get() or _INSTALLED_PLAN
    if plan is None and os.environ.get(ENV_VAR):
        plan = Plan.parse(os.environ[ENV_VAR], source="env")
    return plan


def _call_plan(kwargs: dict) -> Plan | None:
    value = kwargs.pop(QUANT_KWARG, None)
    return Plan.coerce(value, source="call") if value is not None else None


# --- hook bodies ---------------------------------------------------------------------------------------


def _model_from_pretrained(original: Callable, cls: type, pretrained=None, *args, **kwargs):
    plan = _call_plan(kwargs) or (None if ACTIVE_PIPELINE.get() else ambient_plan())
    return _place_alone(load_model(original, cls, pretrained, args, kwargs, plan), plan)


def _place_alone(model, plan: Plan | None):
    """A model loaded on its own takes the plan's offload mode here (in a pipeline, the pipeline does)."""
    if plan is not None and plan.offload != "none" and ACTIVE_PIPELINE.get() is None:
        report = getattr(model, "quant_report", None)
        rows = report.components if report is not None else []
        place_model(model, plan, rows[0].name if rows else type(model).__name__)
    return model


def _refuse_on_load_for_pipeline_files(plan: Plan | None) -> None:
    if plan is not None and plan.mode == "on-load":
        raise QuantError(
            "mode=on-load is not supported for a whole pipeline's single file (diffusers builds some of its "
            "components through converters the hooks do not see); fix: use mode=post-load or mode=auto, or "
            "load the transformer with its class on load (e.g. FluxTransformer2DModel.from_single_file(path, "
            "config=..., quant='transformer=...;mode=on-load')) and pass it to the pipeline"
        )


_FILE_SUFFIXES = (".gguf", ".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
_URL_PREFIXES = ("huggingface.co/", "hf.co/")  # diffusers takes these without a scheme too


def _require_local_file(pretrained):
    """``pretrained`` with a path object made a string. A local-looking path that does not exist is named
    here (diffusers would call it an invalid URL); nothing is opened."""
    if isinstance(pretrained, os.PathLike):
        pretrained = os.fspath(pretrained)
    if not isinstance(pretrained, str) or os.path.exists(pretrained):
        return pretrained
    if "://" in pretrained or pretrained.startswith(_URL_PREFIXES):
        return pretrained
    local = os.path.isabs(pretrained) or pretrained.startswith(("./", "../", ".\\", "..\\"))
    if local or pretrained.lower().endswith(_FILE_SUFFIXES):
        raise QuantError(
            f"from_single_file: {pretrained!r} does not exist; fix: give the path of an existing file "
            "(or an https:// URL)"
        )
    return pretrained  # a hub repo id: the library resolves it


def _check_pickle_file(pretrained) -> None:
    """A pickle is checked before the library unpickles it: refused here, naming the fix."""
    if isinstance(pretrained, str) and is_pickle_checkpoint(pretrained):
        check_pickle(pretrained)


def _detected(pretrained):
    """The format of a local single file, from its header (None for URLs, dicts and unknown files)."""
    return detect_file(pretrained) if isinstance(pretrained, str) and os.path.isfile(pretrained) else None


_PREQUANTIZED_LOADERS = {**dict.fromkeys(FP8_FORMATS, load_fp8_file), NF4_FORMAT: load_nf4_file}
# A pipeline's from_single_file of a pre-quantized file in progress: (path, its format, the plan). diffusers
# hands each component the file's tensors as a dict; the denoiser is loaded from the path instead, as what it is.
_PREQUANTIZED_FILE: contextvars.ContextVar[tuple | None] = contextvars.ContextVar(
    "diffusers_quant_prequantized_file", default=None
)
_DENOISERS = ("transformer", "unet")


def _model_from_single_file(original: Callable, cls: type, pretrained=None, *args, **kwargs):
    file = _PREQUANTIZED_FILE.get()
    active = ACTIVE_PIPELINE.get()
    if file is not None and isinstance(pretrained, dict) and kind_of_class(cls) in _DENOISERS:
        path, detected, plan = file
        load = Load.create(cls, path, kwargs, plan, active.report if active else None)
        return _PREQUANTIZED_LOADERS[detected.format](load, path, kwargs, detected, plan)
    pretrained = _require_local_file(pretrained)
    plan = _call_plan(kwargs) or (active.plan if active else ambient_plan())
    check_plan_first(cls, pretrained, kwargs, plan)  # before the file is opened (header, pickle)
    _check_pickle_file(pretrained)
    # Pre-quantized files are recognised from their bytes and loaded as they are, whatever the plan says.
    detected = _detected(pretrained)
    if detected is not None and detected.format == "gguf":
        load = Load.create(cls, pretrained, kwargs, plan, active.report if active else None)
        return _place_alone(load_gguf(load, pretrained, kwargs, plan), plan)
    if detected is not None and detected.format != "safetensors":
        loader = _PREQUANTIZED_LOADERS.get(detected.format)
        if not detected.loadable or loader is None:
            raise QuantError(f"{pretrained}: {FORMATS[detected.format]}: {detected.detail}")
        load = Load.create(cls, pretrained, kwargs, plan, active.report if active else None)
        return _place_alone(loader(load, pretrained, kwargs, detected, plan), plan)
    # Single files go through the library's converter; on load, each selected layer is quantized as the
    # converter hands it over (single_file.py).
    return _place_alone(load_model(original, cls, pretrained, args, kwargs, plan, single_file=True), plan)


def _pipeline_components(cls: type, folder: str | None, kwargs: dict) -> list[Component]:
    """The pipeline's components from model_index.json (or the class signature), reading no weights."""
    entries: dict[str, tuple[str, str]] = {}
    parsed = (
        read_json_object(os.path.join(folder, "model_index.json"), "model_index.json") if folder else None
    )
    if parsed is not None:
        for name, value in parsed.items():
            if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) and v for v in value):
                entries[name] = (value[0], value[1])
    else:
        for name, param in inspect.signature(cls.__init__).parameters.items():
            ann = str(param.annotation)
            if name != "self" and ("Model" in ann or "Transformer" in ann or "Autoencoder" in ann):
                entries[name] = ("", ann.split(".")[-1].strip("'>"))
    components = []
    for name, (library, class_name) in entries.items():
        if name in kwargs:  # passed in by the caller: not loaded here
            continue
        cls_obj = _import_class(library, class_name)
        if cls_obj is not None and not issubclass(cls_obj, torch.nn.Module):
            continue  # tokenizers, schedulers, processors: nothing to quantize
        saved = saved_specs(os.path.join(folder, name)) if folder else ()
        components.append(Component(name, kind_of_class(cls_obj or class_name), class_name, saved))
    return components


# The libraries whose classes a model_index.json may name here. Any other library (a custom pipeline's own
# module, or a hostile entry such as ["os", "system"]) is never imported by the hooks: its kind is read from
# the class name, and diffusers makes of it what it does.
_LIBRARIES = ("diffusers", "transformers")


def _import_class(library: str, class_name: str):
    if not class_name.isidentifier():
        return None
    for module in (library, *_LIBRARIES):
        if module not in _LIBRARIES:
            continue
        try:
            found = getattr(importlib.import_module(module), class_name)
        except (ImportError, AttributeError):
            continue
        return found if isinstance(found, type) else None
    return None


def _local_folder(pretrained) -> str | None:
    if isinstance(pretrained, (str, os.PathLike)) and os.path.isdir(pretrained):
        return str(pretrained)
    return None


def _finish_pipeline(pipe, plan: Plan, report: Report):
    """Report every component (quantized or not) in the pipeline's order, then place the pipeline."""
    loaded = {c.name: c for c in report.components}
    report.components = [
        loaded.get(name)
        or _own_row(name, module)
        or component_report(name, module, kind_of_class(type(module)))
        for name, module in pipe.components.items()
        if hasattr(module, "parameters")
    ]
    place_pipeline(pipe, plan)
    pipe.quant_report = report
    announce_report(report)
    return pipe


def _one_row(module):
    own = getattr(module, "quant_report", None)
    rows = own.components if own is not None else []
    return rows[0] if len(rows) == 1 else None


def _own_row(name: str, module):
    """The report row of a component loaded on its own through the hooks and passed in, under its name here.
    Models passed in as a list (ControlNets, which diffusers wraps in one MultiControlNetModel) make one row
    adding up theirs, a model of them left unquantized counted as ``none``."""
    row = _one_row(module)
    if row is not None:
        return dataclasses.replace(row, name=name)
    from diffusers import ModelMixin

    parts, inside = [], set()
    for m in module.modules():
        if m is not module and id(m) not in inside and isinstance(m, ModelMixin):
            parts.append(m)
            inside.update(id(x) for x in m.modules())
    rows = [_one_row(m) for m in parts]
    done = [r for r in rows if r is not None]
    if not done:
        return None
    unquantized = ["none"] if len(done) < len(rows) else []
    nbytes = state_nbytes(module)
    return ComponentReport(
        name=name,
        kind=kind_of_class(type(module)),
        class_name=type(module).__name__,
        spec="+".join(dict.fromkeys([*(r.spec or "none" for r in done), *unquantized])),
        mode="+".join(dict.fromkeys([*(r.mode for r in done), *unquantized])),
        bytes_before=nbytes + sum(r.bytes_before - r.bytes_after for r in done),
        bytes_after=nbytes,
        layers_quantized=sum(r.layers_quantized for r in done),
        linears_total=count_linears(module)
        + sum(r.linears_total - count_linears(m) for m, r in zip(parts, rows, strict=True) if r),
        seconds=sum(r.seconds for r in done),
        device=done[0].device,
    )


def _passed_in(kwargs: dict) -> list[Component]:
    """The components the caller passed in already loaded (a pattern matching one is not unused); a list of
    models too: several ControlNets, which diffusers makes one."""
    passed = []
    for name, value in kwargs.items():
        models = value if isinstance(value, (list, tuple)) else [value]
        if models and all(isinstance(m, torch.nn.Module) for m in models):
            passed.append(Component(name, kind_of_class(type(models[0])), type(models[0]).__name__))
    return passed


def _pipeline_from_pretrained(original: Callable, cls: type, pretrained=None, *args, **kwargs):
    # With no plan the load still runs under an empty one, so components saved quantized are reported.
    plan = _call_plan(kwargs) or ambient_plan() or Plan(source="none")
    folder = _local_folder(pretrained)
    components = _pipeline_components(cls, folder, kwargs)
    found = problems(plan, components, whole_pipeline=True, passed=_passed_in(kwargs))
    if folder is not None:  # a budget below a block's size is refused too, before any weight is read
        try:
            planned_maps(plan, folder, components, kwargs.get("dtype") or kwargs.get("torch_dtype"))
        except PlanRefused as e:
            found += e.problems
    if found:
        raise PlanRefused(found)
    report = Report(plan=str(plan), offload=plan.offload)
    _pipeline_dtype(plan, kwargs)
    token = ACTIVE_PIPELINE.set(PipelineLoad(plan, report))
    try:
        pipe = original(cls, pretrained, *args, **kwargs)
    finally:
        ACTIVE_PIPELINE.reset(token)
    return _finish_pipeline(pipe, plan, report)


def _pipeline_dtype(plan: Plan, kwargs: dict) -> None:
    """A plan's ``dtype=`` is the load dtype of the whole pipeline when the call gives none: the components
    it leaves in full precision (the VAE) load in it too, else their float32 convolutions meet the quantized
    components' bfloat16 activations ("Input type (c10::BFloat16) and bias type (float) should be the same")."""
    if plan.dtype and kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
        kwargs["dtype"] = getattr(torch, plan.dtype)


# Where all-in-one files keep the components other than the denoiser (ComfyUI, Forge, the original repos)
_OTHER_COMPONENT_PREFIXES = (
    "text_encoders.",
    "cond_stage_model.",
    "conditioner.",
    "first_stage_model.",
    "vae.",
)


def _pipeline_from_single_file(original: Callable, cls: type, pretrained=None, *args, **kwargs):
    pretrained = _require_local_file(pretrained)
    plan = _call_plan(kwargs) or ambient_plan()
    if plan is not None:  # the rules first: a refused plan opens no file
        found = problems(
            plan, _pipeline_components(cls, None, kwargs), whole_pipeline=True, passed=_passed_in(kwargs)
        )
        if found:
            raise PlanRefused(found)
    _check_pickle_file(pretrained)
    detected = _detected(pretrained)
    prequantized = detected is not None and detected.format in _PREQUANTIZED_LOADERS and detected.loadable
    if detected is not None and detected.format not in ("safetensors", "gguf") and not prequantized:
        raise QuantError(f"{pretrained}: {FORMATS[detected.format]}: {detected.detail}")
    if prequantized:
        _refuse_scales_outside_the_denoiser(pretrained, detected)
    if plan is None and not prequantized:
        return original(cls, pretrained, *args, **kwargs)
    plan = plan or Plan(source="none")
    _refuse_on_load_for_pipeline_files(plan)
    if detected is not None and detected.format == "gguf":
        raise QuantError(
            f"{pretrained}: a GGUF file holds a transformer/UNet, not a whole pipeline; fix: load it with the "
            "model class (e.g. FluxTransformer2DModel.from_single_file(path, config=...)) and pass it as "
            "transformer= to the pipeline's from_pretrained"
        )
    report = Report(plan=str(plan), offload=plan.offload)
    # Components are built by the library's converters (some bypass the hooks), so load them all
    # unquantized with the hooks quiet, then quantize each chosen one module by module. The denoiser of a
    # pre-quantized file is loaded from the file as what it is (the model hook sees _PREQUANTIZED_FILE).
    token = ACTIVE_PIPELINE.set(PipelineLoad(Plan(), report))
    file_token = _PREQUANTIZED_FILE.set((pretrained, detected, plan) if prequantized else None)
    try:
        pipe = original(cls, pretrained, *args, **kwargs)
    finally:
        _PREQUANTIZED_FILE.reset(file_token)
        ACTIVE_PIPELINE.reset(token)
    done = set(report.names())
    for name, module in pipe.components.items():
        kind = kind_of_class(type(module))
        spec = plan.spec_for(name, kind, pipeline=True) if hasattr(module, "parameters") else None
        if spec is not None and name not in done and name not in kwargs:  # passed in: as it came
            load = Load(type(module), name, kind, None, None, torch.device(plan.device), report)
            quantize_loaded(module, spec, load)
    return _finish_pipeline(pipe, plan, report)


def _refuse_scales_outside_the_denoiser(path: str, detected) -> None:
    """diffusers builds an all-in-one file's text encoders and VAE from its tensors with no notion of
    scales: a scaled or 4-bit tensor of theirs would load silently wrong, so such a file is refused."""
    from .detect import COMFY_LAYER_MARKER, FORGE_NF4_MARKERS, looks_like_a_scale, read_safetensors_header

    header = read_safetensors_header(path)
    marked = [
        k
        for k in header.tensors
        if k.startswith(_OTHER_COMPONENT_PREFIXES)
        and (looks_like_a_scale(k) or k.endswith(FORGE_NF4_MARKERS + (COMFY_LAYER_MARKER,)))
    ]
    if marked:
        raise QuantError(
            f"{path}: {FORMATS[detected.format]} with quantized text-encoder or VAE tensors (e.g. {marked[0]}), "
            "which diffusers would load without their scales; fix: load the transformer from it with its class "
            "(e.g. FluxTransformer2DModel.from_single_file(path, config=...)) and the other components from "
            "their bf16 files, then pass them to the pipeline's from_pretrained"
        )


# --- install / uninstall ------------------------------------------------------------------------------

_TARGETS: tuple[tuple[str, str, str, Callable], ...] = (
    ("diffusers.pipelines.pipeline_utils", "DiffusionPipeline", "from_pretrained", _pipeline_from_pretrained),
    ("diffusers.loaders.single_file", "FromSingleFileMixin", "from_single_file", _pipeline_from_single_file),
    ("diffusers.models.modeling_utils", "ModelMixin", "from_pretrained", _model_from_pretrained),
    (
        "diffusers.loaders.single_file_model",
        "FromOriginalModelMixin",
        "from_single_file",
        _model_from_single_file,
    ),
    ("transformers.modeling_utils", "PreTrainedModel", "from_pretrained", _model_from_pretrained),
    # a module function (no class): diffusers' from_single_file fills its model through it
    (
        "diffusers.loaders.single_file_model",
        "",
        "load_model_dict_into_meta",
        single_file.load_model_dict_into_meta,
    ),
)


def _wrap(original_func: Callable, body: Callable) -> classmethod:
    # The loaders' first parameter (the path) may come by keyword, as diffusers' own single-file loading
    # passes it; the hook bodies take it positionally.
    first = list(inspect.signature(original_func).parameters)[1]

    @functools.wraps(original_func)
    def hooked(cls, *args, **kwargs):
        if not args and first in kwargs:
            args = (kwargs.pop(first),)
        return body(original_func, cls, *args, **kwargs)

    hooked.__diffusers_quant__ = True
    return classmethod(hooked)


def _wrap_function(original: Callable, body: Callable) -> Callable:
    @functools.wraps(original)
    def hooked(*args, **kwargs):
        return body(original, *args, **kwargs)

    hooked.__diffusers_quant__ = True
    return hooked


def targets() -> Iterator[tuple[object, str]]:
    """(owner, attribute) of each patched loader: a class, or a module for a module function."""
    for module, cls_name, attr, _ in _TARGETS:
        owner = importlib.import_module(module)
        yield (getattr(owner, cls_name) if cls_name else owner), attr


def install(plan: Plan | str | dict | None = None) -> None:
    """Patch the loaders (idempotent). ``plan`` becomes the process-wide default plan."""
    global _INSTALLED_PLAN
    if plan is not None:
        _INSTALLED_PLAN = Plan.coerce(plan, source="install")
    if _ORIGINALS:
        return
    for (owner, attr), (_, _, _, body) in zip(targets(), _TARGETS, strict=True):
        original = owner.__dict__[attr]
        _ORIGINALS[(owner, attr)] = original
        hooked = _wrap(original.__func__, body) if isinstance(owner, type) else _wrap_function(original, body)
        setattr(owner, attr, hooked)


def uninstall() -> None:
    """Put back the original loaders, by identity (idempotent), and forget the installed plan."""
    global _INSTALLED_PLAN
    for (owner, attr), original in list(_ORIGINALS.items()):
        setattr(owner, attr, original)
    _ORIGINALS.clear()
    _INSTALLED_PLAN = None


def is_installed() -> bool:
    return bool(_ORIGINALS)


@contextmanager
def quantized(plan: Plan | str | dict) -> Iterator[Plan]:
    """Loads inside the block use ``plan``; hooks installed here are removed on exit."""
    resolved = Plan.coerce(plan, source="context")
    installed_here = not is_installed()
    install()
    token = _CONTEXT_PLAN.set(resolved)
    try:
        yield resolved
    finally:
        _CONTEXT_PLAN.reset(token)
        if installed_here:
            uninstall()
