"""Execute a Plan for one model load (a pipeline's component, or a model loaded on its own)."""

from __future__ import annotations

import contextvars
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .components import Component, count_linears, fp32_modules, kind_of_class
from .errors import QuantError
from .post_load import quantize_model, state_nbytes
from .report import ComponentReport, Report
from .rules import enforce
from .saving import load_prequantized, read_quant_metadata
from .spec import Plan, Spec
from .streaming import plan_stream, stream_load


@dataclass
class PipelineLoad:
    """The pipeline load in progress, seen by the model hooks it triggers."""

    plan: Plan
    report: Report


ACTIVE_PIPELINE: contextvars.ContextVar[PipelineLoad | None] = contextvars.ContextVar(
    "diffusers_quant_pipeline", default=None
)


def component_name(cls: type, pretrained, kwargs: dict) -> str:
    """The pipeline's name for this component: its subfolder, else its folder's name, else its kind."""
    if kwargs.get("subfolder"):
        return str(kwargs["subfolder"]).strip("/").split("/")[-1]
    if isinstance(pretrained, (str, os.PathLike)) and os.path.isdir(pretrained):
        return os.path.basename(os.path.normpath(str(pretrained)))
    return kind_of_class(cls)


def _resolve_folder(pretrained, kwargs: dict) -> str | None:
    if not isinstance(pretrained, (str, os.PathLike)):
        return None
    folder = (
        os.path.join(str(pretrained), kwargs["subfolder"]) if kwargs.get("subfolder") else str(pretrained)
    )
    return folder if os.path.isdir(folder) else None


def _load_dtype(kwargs: dict, plan: Plan) -> torch.dtype | None:
    # diffusers 0.42 and transformers 5 both take ``dtype`` (``torch_dtype`` is deprecated but accepted).
    value = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if value is None and plan.dtype:
        value = getattr(torch, plan.dtype)
        kwargs["dtype"] = value
    if isinstance(value, str):
        value = getattr(torch, value, None) if value != "auto" else None
    return value


def _progress(total: int | None, desc: str):
    from tqdm.auto import tqdm

    # Same switch as diffusers' own bars: DIFFUSERS_QUANT_PROGRESS=0 silences ours.
    return tqdm(
        total=total, desc=desc, leave=False, disable=os.environ.get("DIFFUSERS_QUANT_PROGRESS") == "0"
    )


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def fp_nbytes(model: torch.nn.Module, dtype: torch.dtype | None) -> int:
    """Bytes the full-precision component takes at the load dtype (works on the meta device)."""
    keep = fp32_modules(model, dtype)
    tied = set(getattr(model, "all_tied_weights_keys", None) or ())  # stored once, under their source
    total = 0
    for key, t in model.state_dict().items():
        if key in tied:
            continue
        size = t.element_size()
        if t.is_floating_point() and dtype is not None and not keep.intersection(key.split(".")):
            size = torch.empty((), dtype=dtype).element_size()
        total += t.numel() * size
    return total


def load_quantized(
    original: Callable,
    cls: type,
    pretrained,
    args: tuple,
    kwargs: dict,
    plan: Plan,
    spec: Spec,
    name: str,
    kind: str,
    report: Report,
) -> torch.nn.Module:
    """Load one model with ``spec`` applied, on load when possible (or asked), else straight after load."""
    dtype = _load_dtype(kwargs, plan)
    device = torch.device(plan.device)
    folder = _resolve_folder(pretrained, kwargs)
    stream = None
    if plan.mode in ("auto", "on-load") and folder is not None:
        stream = plan_stream(cls, folder, spec, kind, variant=kwargs.get("variant"))
    if stream is None and plan.mode == "on-load":
        raise QuantError(
            f"{name}: mode=on-load needs a local folder with safetensors weights in diffusers/transformers "
            f"layout (got {pretrained!r}); fix: use mode=post-load or mode=auto"
        )
    start = time.perf_counter()
    if stream is not None:
        bytes_before, total = fp_nbytes(stream.model, dtype), count_linears(stream.model)
        with _progress(len(stream.keys), f"{name}: {spec} on load (tensors)") as bar:
            model = stream_load(
                stream,
                spec,
                dtype=dtype,
                compute_dtype=dtype or torch.float32,
                device=device,
                on_tensor=bar.update,
            )
        mode, quantized = "on-load", len(stream.selected)
    else:
        model = original(cls, pretrained, *args, **kwargs)
        return quantize_loaded(
            model, spec, name, kind, device, report, dtype=dtype, start=start, folder=folder
        )
    return _record(
        report, model, spec, name, kind, mode, bytes_before, quantized, total, start, device, folder
    )


def _record(
    report: Report,
    model: torch.nn.Module,
    spec: Spec | str,
    name: str,
    kind: str,
    mode: str,
    bytes_before: int,
    quantized: int,
    total: int,
    start: float,
    device,
    folder: str | None,
):
    """Add the component's row to the report (bytes after measured on the model itself)."""
    if hasattr(model, "register_to_config") and folder is not None:
        model.register_to_config(_name_or_path=str(folder))
    report.add(
        ComponentReport(
            name=name,
            kind=kind,
            class_name=type(model).__name__,
            spec=str(spec),
            mode=mode,
            bytes_before=bytes_before,
            bytes_after=state_nbytes(model),
            layers_quantized=quantized,
            linears_total=total,
            seconds=time.perf_counter() - start,
            device=str(device),
        )
    )
    return model


def quantize_loaded(
    model: torch.nn.Module,
    spec: Spec,
    name: str,
    kind: str,
    device: torch.device | str,
    report: Report,
    *,
    dtype: torch.dtype | None = None,
    start: float | None = None,
    folder: str | None = None,
) -> torch.nn.Module:
    """Post-load: quantize an already-loaded model module by module, and report it."""
    start = time.perf_counter() if start is None else start
    bytes_before = state_nbytes(model)
    with _progress(None, f"{name}: {spec} after load (layers)") as bar:
        stats = quantize_model(model, spec, kind, dtype or _float_dtype(model), device=device, progress=bar)
    return _record(
        report,
        model,
        spec,
        name,
        kind,
        "post-load",
        bytes_before,
        stats.quantized_layers,
        stats.total_linears,
        start,
        device,
        folder,
    )


def load_saved(
    cls: type, folder: str, meta: dict, name: str, kind: str, plan: Plan | None, report: Report
) -> torch.nn.Module:
    """A component saved quantized by diffusers_quant: rebuilt as it is, no dataset, no requantizing."""
    device = torch.device(plan.device if plan else "cpu")
    dtype = getattr(torch, plan.dtype) if plan and plan.dtype else None
    start = time.perf_counter()
    model = load_prequantized(cls, folder, meta, device, compute_dtype=dtype)
    specs = "+".join(
        sorted({f"{e['backend']}:{e['config'].get('qtype', '?')}" for e in meta["layers"].values()})
    )
    quantized = len(meta["layers"])
    # Saved already quantized: the bytes before are the bytes on disk and in memory.
    return _record(
        report,
        model,
        specs,
        name,
        kind,
        "pre-quantized",
        state_nbytes(model),
        quantized,
        quantized + count_linears(model),
        start,
        device,
        None,
    )


def load_gguf(
    cls: type, path, kwargs: dict, plan: Plan | None, name: str, kind: str, report: Report | None, config=None
) -> torch.nn.Module:
    """A GGUF file for this component: checked against the rules, then loaded packed."""
    from .backends import get_backend

    plan = plan or Plan()
    spec = Spec("gguf", str(path))
    enforce(Plan(entries=((name, spec),), offload=plan.offload, device=plan.device), [Component(name, kind)])
    get_backend("gguf").require()
    from .backends.gguf.loader import load_gguf_model

    dtype = _load_dtype(kwargs, plan)
    start = time.perf_counter()
    loaded = load_gguf_model(
        cls,
        path,
        config=config if config is not None else kwargs.get("config"),
        subfolder=kwargs.get("subfolder"),
        dtype=dtype,
        device=torch.device(plan.device),
    )
    model = loaded.model
    quantized = sum(get_backend("gguf").owns(m) for m in model.modules())
    report = report or Report(plan=str(plan))
    _record(
        report,
        model,
        f"gguf:{loaded.qtype.lower()}",
        name,
        kind,
        "pre-quantized",
        loaded.logical_bytes,
        quantized,
        quantized + count_linears(model),
        start,
        plan.device,
        None,
    )
    model.quant_report = report
    return model


def load_model(original: Callable, cls: type, pretrained, args: tuple, kwargs: dict, plan: Plan | None):
    """Body of the model-level hooks (diffusers ModelMixin and transformers PreTrainedModel)."""
    active = ACTIVE_PIPELINE.get()
    if plan is None and active is not None:
        plan = active.plan
    # A saved quantized component is recognised from its header before anything else is read.
    folder = _resolve_folder(pretrained, kwargs)
    meta = read_quant_metadata(folder, kwargs.get("variant"))
    if meta is not None:
        name, kind = component_name(cls, pretrained, kwargs), kind_of_class(cls)
        report = active.report if active is not None else Report(plan=str(plan or ""))
        model = load_saved(cls, folder, meta, name, kind, plan, report)
        model.quant_report = report
        return model
    if plan is None:
        return original(cls, pretrained, *args, **kwargs)
    name, kind = component_name(cls, pretrained, kwargs), kind_of_class(cls)
    spec = plan.spec_for(name, kind)
    if spec is None:
        return original(cls, pretrained, *args, **kwargs)
    if spec.backend == "gguf" and spec.qtype.lower().endswith(".gguf"):
        # transformer=gguf:/path/file.gguf: the file replaces this component; its folder gives the config.
        return load_gguf(
            cls, spec.qtype, kwargs, plan, name, kind, active.report if active else None, config=folder
        )
    if active is None:  # a model loaded on its own: check its one component now
        enforce(plan, [Component(name, kind, cls.__name__)])
        report = Report(plan=str(plan), offload=plan.offload)
    else:
        report = active.report
    model = load_quantized(original, cls, pretrained, args, kwargs, plan, spec, name, kind, report)
    model.quant_report = report
    return model


def component_report(name: str, module, kind: str) -> ComponentReport:
    """A row for a component the plan left in full precision."""
    nbytes = state_nbytes(module) if isinstance(module, torch.nn.Module) else 0
    device = (
        str(next(module.parameters()).device)
        if isinstance(module, torch.nn.Module) and any(True for _ in module.parameters())
        else "-"
    )
    return ComponentReport(
        name=name,
        kind=kind,
        class_name=type(module).__name__,
        spec=None,
        mode="none",
        bytes_before=nbytes,
        bytes_after=nbytes,
        device=device,
    )
