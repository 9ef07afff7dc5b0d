"""Execute a Plan for one model load (a pipeline's component, or a model loaded on its own)."""

from __future__ import annotations

import contextvars
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .components import Component, count_linears, fp32_modules, kind_of_class
from .contract import attach, quantized_layers, settle
from .errors import QuantError
from .pickles import check_folder_pickles
from .plugin import announce
from .post_load import quantize_model, state_nbytes
from .report import ComponentReport, Report
from .rules import enforce
from .saving import SavedComponent, foreign_method, load_saved_component, read_saved, saved_specs
from .spec import Plan, Spec
from .streaming import NotStreamable, plan_stream, stream_load

logger = logging.getLogger("diffusers_quant")


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


@dataclass
class Load:
    """One model load, built once by the hook and passed down: what is loaded, how, and where it reports."""

    cls: type
    name: str
    kind: str
    folder: str | None
    dtype: torch.dtype | None
    device: torch.device
    report: Report
    compute: str = "none"  # the plan's compute mode, applied to what this load quantizes
    compute_device: torch.device | None = None  # where the component will run (the plan's device)
    start: float = field(default_factory=time.perf_counter)

    @classmethod
    def create(cls, model_cls: type, pretrained, kwargs: dict, plan: Plan | None, report: Report | None):
        plan = plan or Plan()
        return cls(
            cls=model_cls,
            name=component_name(model_cls, pretrained, kwargs),
            kind=kind_of_class(model_cls),
            folder=_resolve_folder(pretrained, kwargs),
            dtype=_load_dtype(kwargs, plan),
            # An offloaded component rests on the CPU: it is loaded there and the offloader places it.
            device=torch.device(plan.device if plan.offload == "none" else "cpu"),
            report=report if report is not None else Report(plan=str(plan), offload=plan.offload),
            compute=plan.compute,
            compute_device=torch.device(plan.device),
        )

    def record(
        self,
        model: torch.nn.Module,
        spec: Spec | str,
        mode: str,
        bytes_before: int,
        quantized: int,
        total: int,
    ) -> torch.nn.Module:
        """Make ``model`` a quantized model in the libraries' terms, and add its row to the report (bytes
        after measured on the model itself)."""
        if getattr(model, "hf_quantizer", None) is None:
            attach(model, self.dtype)
        else:  # loaded by the library's own quantizer
            settle(model)
        if hasattr(model, "register_to_config") and self.folder is not None:
            model.register_to_config(_name_or_path=str(self.folder))
        compute = "none"
        if self.compute != "none":
            from .compute import enable_compute

            # the device it will run on: an offloaded component rests on the CPU (self.device) meanwhile
            switched = enable_compute(model, self.compute, self.compute_device or self.device)
            compute = f"{self.compute} x{switched}" if switched else "none"
        self.report.add(
            ComponentReport(
                name=self.name,
                kind=self.kind,
                class_name=type(model).__name__,
                spec=str(spec),
                mode=mode,
                bytes_before=bytes_before,
                bytes_after=state_nbytes(model),
                layers_quantized=quantized,
                linears_total=total,
                seconds=time.perf_counter() - self.start,
                device=str(self.device),
                compute=compute,
            )
        )
        model.quant_report = self.report
        announce(self.report[self.name])
        return model


def load_quantized(
    original: Callable, load: Load, pretrained, args: tuple, kwargs: dict, plan: Plan, spec: Spec
) -> torch.nn.Module:
    """Load one model with ``spec`` applied, on load when possible (or asked), else straight after load."""
    stream, declined = None, "needs a local folder with safetensors weights in diffusers/transformers layout"
    if plan.mode in ("auto", "on-load") and load.folder is not None:
        try:
            stream = plan_stream(
                load.cls,
                load.folder,
                spec,
                load.kind,
                variant=kwargs.get("variant"),
                key_mapping=kwargs.get("key_mapping"),
            )
        except NotStreamable as e:
            declined = str(e)
    if stream is None and plan.mode == "on-load":
        raise QuantError(
            f"{load.name}: mode=on-load {declined} (got {pretrained!r}); fix: use mode=post-load or mode=auto"
        )
    if stream is None:
        if plan.mode == "auto" and load.folder is not None:  # the report's row says post-load; this says why
            logger.info("%s: quantized after load, not on load: on-load %s", load.name, declined)
        model = original(load.cls, pretrained, *args, **kwargs)
        return quantize_loaded(model, spec, load)
    bytes_before, total = fp_nbytes(stream.model, load.dtype), count_linears(stream.model)
    with _progress(len(stream.keys), f"{load.name}: {spec} on load (tensors)") as bar:
        model = stream_load(
            stream,
            spec,
            dtype=load.dtype,
            compute_dtype=load.dtype or torch.float32,
            device=load.device,
            on_tensor=bar.update,
        )
    return load.record(model, spec, "on-load", bytes_before, len(stream.selected), total)


def quantize_loaded(model: torch.nn.Module, spec: Spec, load: Load) -> torch.nn.Module:
    """Post-load: quantize an already-loaded model module by module, and report it."""
    bytes_before = state_nbytes(model)
    dtype = load.dtype or _float_dtype(model)
    with _progress(None, f"{load.name}: {spec} after load (layers)") as bar:
        stats = quantize_model(model, spec, load.kind, dtype, device=load.device, progress=bar)
    return load.record(model, spec, "post-load", bytes_before, stats.quantized_layers, stats.total_linears)


def load_saved(saved: SavedComponent, load: Load) -> torch.nn.Module:
    """A component saved quantized (by this package, or diffusers / transformers in their layout): rebuilt
    as it is, no dataset, no requantizing."""
    model = load_saved_component(load.cls, saved, load.device, load.dtype)
    layers = quantized_layers(model)
    specs = "+".join(sorted({str(b.spec_of(m)) for b, m in layers.values()}))
    # Saved already quantized: the bytes before are the bytes on disk and in memory.
    nbytes = state_nbytes(model)
    return load.record(model, specs, "pre-quantized", nbytes, len(layers), len(layers) + count_linears(model))


def load_foreign(original: Callable, load: Load, method: str, pretrained, args: tuple, kwargs: dict):
    """A folder saved quantized by another library (``method``): loaded by diffusers / transformers through
    that library, never quantized a second time by the plan."""
    try:
        model = original(load.cls, pretrained, *args, **kwargs)
    except (ImportError, NotImplementedError, ValueError) as e:
        raise QuantError(
            f"{load.folder}: saved quantized by {method} (quantization_config quant_method {method!r}), which "
            f"the libraries read through {method} itself; that failed: {str(e).splitlines()[0][:200]}; fix: "
            f"install what it names (e.g. pip install {method}), or load the unquantized original with a plan"
        ) from None
    nbytes = state_nbytes(model)
    return load.record(model, f"{method} (saved)", "pre-quantized", nbytes, 0, count_linears(model))


def load_native(original: Callable, load: Load, pretrained, args: tuple, kwargs: dict):
    """A load given its own ``quantization_config=`` (diffusers' or transformers'): the library quantizes
    it; the plan's spec is not applied on top, and the report says the app's config won."""
    config = kwargs["quantization_config"]
    method = getattr(config, "quant_method", None) or type(config).__name__
    method = getattr(method, "value", method)
    model = original(load.cls, pretrained, *args, **kwargs)
    nbytes = state_nbytes(model)
    return load.record(
        model, f"{method} (the app's quantization_config)", "native", nbytes, 0, count_linears(model)
    )


def load_gguf(load: Load, path, kwargs: dict, plan: Plan | None, config=None) -> torch.nn.Module:
    """A GGUF file for this component: checked against the rules, then loaded packed."""
    from .backends import get_backend

    plan = plan or Plan()
    spec = Spec("gguf", str(path))
    enforce(
        Plan(entries=((load.name, spec),), offload=plan.offload, device=plan.device),
        [Component(load.name, load.kind)],
    )
    get_backend("gguf").require()
    from .backends.gguf.loader import load_gguf_model

    loaded = load_gguf_model(
        load.cls,
        path,
        config=config if config is not None else kwargs.get("config"),
        subfolder=kwargs.get("subfolder"),
        dtype=load.dtype,
        device=load.device,
    )
    model = loaded.model
    quantized = sum(get_backend("gguf").owns(m) for m in model.modules())
    load.folder = None
    return load.record(
        model,
        f"gguf:{loaded.qtype.lower()}",
        "pre-quantized",
        loaded.logical_bytes,
        quantized,
        quantized + count_linears(model),
    )


def load_model(
    original: Callable,
    cls: type,
    pretrained,
    args: tuple,
    kwargs: dict,
    plan: Plan | None,
    single_file: bool = False,
):
    """Body of the model-level hooks (diffusers ModelMixin and transformers PreTrainedModel, and diffusers'
    ``from_single_file`` with ``single_file``)."""
    active = ACTIVE_PIPELINE.get()
    if plan is None and active is not None:
        plan = active.plan
    report = active.report if active is not None else None
    check_plan_first(cls, pretrained, kwargs, plan)
    # A saved quantized component is recognised from its config and headers before anything else is read.
    folder = _resolve_folder(pretrained, kwargs)
    check_folder_pickles(folder)
    saved = read_saved(folder, kwargs.get("variant"))
    if saved is not None:
        return load_saved(saved, Load.create(cls, pretrained, kwargs, plan, report))
    foreign = foreign_method(folder)
    if foreign is not None:
        return load_foreign(
            original, Load.create(cls, pretrained, kwargs, plan, report), foreign, pretrained, args, kwargs
        )
    if plan is None:
        return original(cls, pretrained, *args, **kwargs)
    if kwargs.get("quantization_config") is not None:  # the app's own: the library quantizes, never twice
        return load_native(
            original, Load.create(cls, pretrained, kwargs, plan, report), pretrained, args, kwargs
        )
    name, kind = component_name(cls, pretrained, kwargs), kind_of_class(cls)
    spec = plan.spec_for(name, kind)
    if spec is None:
        return original(cls, pretrained, *args, **kwargs)
    load = Load.create(cls, pretrained, kwargs, plan, report)
    if spec.backend == "gguf" and spec.qtype.lower().endswith(".gguf"):
        # transformer=gguf:/path/file.gguf: the file replaces this component; its folder gives the config.
        return load_gguf(load, spec.qtype, kwargs, plan, config=folder)
    if single_file:
        return load_single_file(original, load, pretrained, args, kwargs, plan, spec)
    return load_quantized(original, load, pretrained, args, kwargs, plan, spec)


def load_single_file(
    original: Callable, load: Load, pretrained, args: tuple, kwargs: dict, plan: Plan, spec: Spec
) -> torch.nn.Module:
    """A single file through diffusers' converter, then quantized module by module; with ``mode=on-load``
    each selected layer is quantized as the converter hands it over (``single_file.py``). ``auto`` stays
    post-load: the checkpoint is memory-mapped either way, so on load saved no host memory here (a 250 MiB
    file: 470 against 514 MiB peak growth for nncf:int8 cast to float16, 582-683 against 514 for
    quanto:qint8), and post-load quantizes on the plan's device where on load quantizes on the host."""
    if plan.mode == "on-load" and kwargs.get("low_cpu_mem_usage") is False:
        raise QuantError(
            f"{load.name}: mode=on-load needs diffusers to build the model on the meta device, and "
            "low_cpu_mem_usage=False was given; fix: drop low_cpu_mem_usage=False, or use mode=post-load"
        )
    if plan.mode != "on-load":
        return quantize_loaded(original(load.cls, pretrained, *args, **kwargs), spec, load)
    from .single_file import load_on_load

    model, streamed = load_on_load(original, load, spec, pretrained, args, kwargs)
    if streamed:
        return model
    logger.info("%s: quantized after load: diffusers loaded it without its meta-device loader", load.name)
    return quantize_loaded(model, spec, load)


def check_plan_first(cls: type, pretrained, kwargs: dict, plan: Plan | None) -> None:
    """A model loaded on its own (in a pipeline, the pipeline's hook has checked the whole plan): the rules
    for its one component, before any of its weight files is opened (a pickle unpickled, a header read)."""
    if plan is None or ACTIVE_PIPELINE.get() is not None or kwargs.get("quantization_config") is not None:
        return
    name, kind = component_name(cls, pretrained, kwargs), kind_of_class(cls)
    if plan.spec_for(name, kind) is not None:
        enforce(plan, [Component(name, kind, cls.__name__)])
    elif plan.offload != "none":  # a folder saved quantized, placed as the plan says: its formats' rules
        enforce(plan, [Component(name, kind, cls.__name__, saved_specs(_resolve_folder(pretrained, kwargs)))])


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
