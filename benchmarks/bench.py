"""Benchmark harness: load time, host and GPU memory, step time and output error, ours vs plain diffusers.

    python benchmarks/bench.py --quick                 # CPU, tiny demo transformer, a few rows
    python benchmarks/bench.py --device cuda           # flux-width (~1.93B params), every registered row
    python benchmarks/bench.py --device cuda --full    # full Flux depth (19 + 38 blocks, ~12B params)

Every row (one way of loading the transformer) runs in a fresh subprocess (``--worker '<json>'``), so its
load time, host peak and GPU peak are not polluted by earlier rows; the parent collects one JSON line
per row and writes ``results.json``, ``results.md`` and ``chart.png`` into ``--out``.
See benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without an editable install
    sys.path.insert(0, str(REPO))

MARK = "@@BENCH@@ "
# Bump when a model definition below changes, so cached checkpoints are rebuilt.
MODEL_VERSION = "1"
SHARD_SIZE = "2GB"
MiB = 2**20

# Issue targets, evaluated per row.
PEAK_OVER_RESIDENT_MAX = 1.15
HOST_PEAK_OVER_CKPT_MAX = 1.1
LOAD_RATIO_MAX = 1.5
REL_L2_OVER_PLAIN_MAX = 1.05
# Issue 12: weight-only step time within 10% of bf16, eager against bf16 eager, compiled against bf16 compiled.
STEP_RATIO_MAX = 1.10

# Plain-diffusers equivalents of our qtypes.
PLAIN_QUANTO = {"qint8": "int8", "qint4": "int4", "qfloat8": "float8"}
PLAIN_NNCF = {"int8": "INT8_ASYM", "int8_sym": "INT8_SYM", "int4": "INT4_ASYM", "int4_sym": "INT4_SYM"}
NNCF_GROUP_SIZE = 64
# GGUF has dozens of qtypes; benchmark the most used ones (q4_k falls back to q4_0 where the writer lacks it).
GGUF_QTYPES = ("q8_0", "q4_k", "q4_1", "q5_0", "q5_k", "q6_k")
GGUF_FALLBACK = {"q4_k": "q4_0"}


# --- models ---------------------------------------------------------------------------------------------


def _flux_config(num_layers: int, num_single_layers: int) -> dict:
    return dict(
        patch_size=1,
        in_channels=64,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=False,
        axes_dims_rope=[16, 56, 56],
    )


@dataclass(frozen=True)
class ModelDef:
    name: str
    config: dict | None  # None: the demo pipeline's transformer
    img_tokens: int  # a square grid of latent patches
    txt_tokens: int
    warmup: int
    steps: int
    about: str
    # Load once before the measured load: for a 27 MB model, one-time lazy imports inside from_pretrained
    # would otherwise dominate its load time and host peak.
    warm_load: bool = False


MODELS = {
    "tiny": ModelDef(
        "tiny",
        None,
        256,
        32,
        2,
        10,
        "demo Flux transformer (~3.4M params), 16x16 latent patches",
        warm_load=True,
    ),
    "flux-mini": ModelDef(
        "flux-mini",
        _flux_config(1, 1),
        64,
        16,
        1,
        3,
        "Flux width, 1 + 1 blocks (~0.5B params): smoke test of the big-model path",
    ),
    "flux-width": ModelDef(
        "flux-width",
        _flux_config(3, 6),
        4096,
        512,
        2,
        5,
        "Flux width, 3 + 6 blocks (~1.93B params), 1024x1024 (64x64 latent patches)",
    ),
    "flux-full": ModelDef(
        "flux-full",
        _flux_config(19, 38),
        4096,
        512,
        2,
        5,
        "full Flux depth, 19 + 38 blocks (~11.9B params), 1024x1024",
    ),
}


def cache_root() -> Path:
    from diffusers_quant.demo import cache_dir

    return cache_dir()


def model_folder(name: str) -> Path:
    """The transformer folder (config.json + safetensors) of a model, without building it."""
    if MODELS[name].config is None:
        from diffusers_quant.demo import DEMO_VERSION

        return cache_root() / f"demo-flux-v{DEMO_VERSION}" / "transformer"
    # A 'transformer' subfolder, so our hooks name the component 'transformer' as in a pipeline.
    return cache_root() / f"bench-{name}-v{MODEL_VERSION}" / "transformer"


def ensure_model(name: str) -> Path:
    if MODELS[name].config is None:
        from diffusers_quant.demo import demo_path

        return demo_path("flux") / "transformer"
    folder = model_folder(name)
    if not (folder / "config.json").exists():
        build_model(name, folder.parent)
    return folder


def build_model(name: str, root: Path) -> None:
    """Random weights, fixed seed, built directly in bf16 and saved in shards (no fp32 copy, no 2x RAM)."""
    import torch
    from diffusers import FluxTransformer2DModel

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = FluxTransformer2DModel(**MODELS[name].config).eval()
        finally:
            torch.set_default_dtype(previous)
        model.save_pretrained(tmp / "transformer", safe_serialization=True, max_shard_size=SHARD_SIZE)
        params = sum(p.numel() for p in model.parameters())
        (tmp / "bench-model.json").write_text(json.dumps({"name": name, "params": params}))
        del model
        try:
            os.replace(tmp, root)
        except OSError:
            if not (root / "transformer" / "config.json").exists():  # lost a race: the other build is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def files_nbytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def warm_page_cache(files: list[Path]) -> None:
    # Read once so every row loads from the page cache: load times then measure loading, not the disk.
    for path in files:
        with open(path, "rb") as f:
            while f.read(64 * MiB):
                pass


def gguf_path(model: str, qtype: str) -> Path:
    return cache_root() / "bench-gguf" / f"{model}-v{MODEL_VERSION}-{qtype}.gguf"


def gguf_writable(qtype: str) -> str | None:
    """The qtype the GGUF writer can produce for ``qtype`` (or its fallback); None if there is no writer."""
    try:
        from diffusers_quant.backends.gguf.writer import WRITABLE_QTYPES
    except Exception:
        return None
    for candidate in (qtype, GGUF_FALLBACK.get(qtype)):
        if candidate and candidate.upper() in WRITABLE_QTYPES:
            return candidate
    return None


def write_model_gguf(folder: Path, qtype: str, path: Path) -> None:
    """Write the bf16 checkpoint as a GGUF file with diffusers key names (no conversion on load)."""
    from safetensors.torch import load_file

    from diffusers_quant.backends.gguf.writer import write_gguf

    state = {}
    for f in weight_files(folder):
        state.update(load_file(f))
    config = {
        k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # F32 for the unquantized (small) tensors: diffusers' GGUF loader treats BF16 tensors as quantized and
    # then fails on BF16 biases ("expanded size ... must match").
    write_gguf(path, state, qtype, arch="flux", config=config, float_type="F32")


# --- rows -----------------------------------------------------------------------------------------------


@dataclass
class Row:
    id: str
    impl: str  # baseline | ours | plain
    backend: str  # bf16 | bnb | quanto | nncf | gguf | ...
    qtype: str = ""
    mode: str = ""  # on-load | post-load | file (a GGUF file) | "" (plain)
    api: str = ""
    skip: str = ""  # reason the row is not run

    @property
    def format(self) -> str:
        return f"{self.backend}:{self.qtype}" if self.qtype else self.backend


def _ours(backend: str, qtype: str, mode: str) -> Row:
    api = "from_single_file(gguf, quant=...)" if mode == "file" else f"from_pretrained(quant=...;mode={mode})"
    return Row(f"ours/{backend}:{qtype}/{mode}", "ours", backend, qtype, mode, api)


def _plain(backend: str, qtype: str, api: str) -> Row:
    return Row(f"plain/{backend}:{qtype}", "plain", backend, qtype, "", api)


def _plain_row(backend: str, qtype: str) -> Row | None:
    if backend == "bnb":
        return _plain("bnb", qtype, "BitsAndBytesConfig")
    if backend == "quanto" and qtype in PLAIN_QUANTO:
        return _plain("quanto", qtype, "QuantoConfig")
    if backend == "nncf" and qtype in PLAIN_NNCF:
        return _plain("nncf", qtype, "nncf.compress_weights after bf16 load")
    return None


def _gguf_rows(registered: dict) -> list[Row]:
    """Per GGUF type: a file written from the bf16 model, loaded by plain diffusers and by us, then our
    quantize-on-load from the bf16 folder. q4_k falls back to q4_0 where gguf-py cannot write it."""
    backend = registered.get("gguf")
    unavailable = "" if backend is None or backend.is_available() else "backend library 'gguf' not installed"
    rows = []
    for qtype in GGUF_QTYPES:
        written = gguf_writable(qtype)
        file_qtype = written or qtype
        group = [_plain("gguf", file_qtype, "from_single_file + GGUFQuantizationConfig")]
        if backend is not None:
            group.append(_ours("gguf", file_qtype, "file"))
        for row in group:
            row.skip = (
                "" if written else "no GGUF writer (diffusers_quant.backends.gguf.writer) for this qtype"
            )
            if written and written != qtype:
                row.api += f" ({file_qtype}: gguf-py cannot write {qtype})"
        if backend is not None and file_qtype in backend.qtypes:
            group += [_ours("gguf", file_qtype, "on-load"), _ours("gguf", file_qtype, "post-load")]
        for row in group:
            row.skip = row.skip or unavailable
        rows += group
    return rows


def _backend_order(name: str) -> tuple[int, str]:
    order = ("bnb", "quanto", "nncf")
    return (order.index(name) if name in order else len(order), name)


def all_rows() -> list[Row]:
    """Every row for this device: bf16 baseline, then per format the plain row and ours (on-load, post-load)."""
    from diffusers_quant.backends import all_backends

    registered = {b.name: b for b in all_backends()}
    rows = [Row("bf16", "baseline", "bf16", api="from_pretrained(dtype=bf16)")]
    for name in sorted(set(registered) - {"gguf"}, key=_backend_order):
        backend = registered[name]
        unavailable = "" if backend.is_available() else f"backend library {backend.module!r} not installed"
        for qtype in backend.qtypes:
            group = [r for r in (_plain_row(name, qtype),) if r is not None]
            group += [_ours(name, qtype, "on-load"), _ours(name, qtype, "post-load")]
            for row in group:
                row.skip = row.skip or unavailable
            rows += group
    # GGUF last: writing its files and quantizing with gguf-py (numpy, on the CPU) is slow, so a time
    # budget cuts it first.
    return rows + _gguf_rows(registered)


QUICK_ROWS = (
    "bf16",
    "ours/bnb:nf4/on-load",
    "plain/bnb:nf4",
    "ours/quanto:qint8/on-load",
    "ours/quanto:qint8/post-load",
    "plain/quanto:qint8",
    "ours/quanto:qint4/on-load",
    "plain/quanto:qint4",
    "ours/nncf:int8/on-load",
    "plain/nncf:int8",
)


def select_rows(rows: list[Row], *, quick: bool, patterns: str | None) -> list[Row]:
    if quick:
        rows = [r for r in rows if r.id in QUICK_ROWS]
    if patterns:
        pats = [p.strip() for p in patterns.split(",") if p.strip()]
        # bf16 is the reference every ratio and rel_l2 needs, so it always runs.
        rows = [r for r in rows if r.id == "bf16" or any(fnmatch.fnmatchcase(r.id, p) for p in pats)]
    return rows


# --- worker (runs in its own process) -------------------------------------------------------------------


class SkipRow(Exception):
    """The row cannot run here (e.g. needs CUDA); recorded as skipped, not as an error."""


def _quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("DIFFUSERS_QUANT_PROGRESS", "0")
    for name in ("nncf", "diffusers", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()


def make_inputs(defn: ModelDef, config: dict, device: str) -> dict:
    """One denoising step's transformer inputs, fixed seed: identical in every row."""
    import torch

    g = torch.Generator("cpu").manual_seed(1234)
    n_img, n_txt = defn.img_tokens, defn.txt_tokens
    side = math.isqrt(n_img)
    img_ids = torch.zeros(n_img, 3)
    img_ids[:, 1] = (
        torch.arange(n_img) // side
    )  # (row, col) of each latent patch, as FluxPipeline builds them
    img_ids[:, 2] = torch.arange(n_img) % side
    inputs = dict(
        hidden_states=torch.randn(1, n_img, config["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(1, n_txt, config["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=img_ids,
        txt_ids=torch.zeros(n_txt, 3),
    )
    return {k: v.to(device=device, dtype=torch.bfloat16) for k, v in inputs.items()}


def _preimport(job: dict) -> None:
    # Import the backend library before timing, so neither side pays its import in load_s.
    modules = {
        "bnb": ["bitsandbytes"],
        "quanto": ["optimum.quanto"],
        "nncf": ["nncf", "nncf.torch"],
        "gguf": ["gguf"],
    }.get(job["backend"], [])
    for module in modules:
        try:
            __import__(module)
        except Exception:  # the load reports the real error
            pass
    if job["impl"] == "ours":
        import diffusers_quant
        from diffusers_quant.backends import get_backend

        get_backend(job["backend"])
        diffusers_quant.install()


def _warm_cuda() -> None:
    import torch

    torch.cuda.init()
    # Create the context and the cuBLAS workspace now, so no row counts them in its load figures.
    a = torch.ones(64, 64, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()
    torch.cuda.synchronize()


def _to_device(model, device: str):
    if any(p.device.type != device for p in model.parameters()):
        model = model.to(device)
    return model


def _load_bf16(job: dict, inputs: dict):
    import torch
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(job["folder"], dtype=torch.bfloat16)
    return _to_device(model, job["device"])


def _load_ours(job: dict, inputs: dict):
    import torch
    from diffusers import FluxTransformer2DModel

    if job["mode"] == "file":
        plan = f"transformer={job['backend']}:{job['qtype']};device={job['device']}"
        model = FluxTransformer2DModel.from_single_file(
            job["gguf"], config=job["folder"], dtype=torch.bfloat16, quant=plan
        )
    else:
        plan = f"transformer={job['backend']}:{job['qtype']};mode={job['mode']};device={job['device']}"
        model = FluxTransformer2DModel.from_pretrained(job["folder"], dtype=torch.bfloat16, quant=plan)
    return _to_device(model, job["device"])


def _load_plain_bnb(job: dict, inputs: dict):
    import torch
    from diffusers import BitsAndBytesConfig, FluxTransformer2DModel

    if job["qtype"] == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:  # same format as ours: double-quantized scales, bf16 compute
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=job["qtype"],
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    try:
        model = FluxTransformer2DModel.from_pretrained(
            job["folder"], dtype=torch.bfloat16, quantization_config=config
        )
    except Exception as e:
        if job["device"] != "cuda":
            raise SkipRow(f"needs CUDA (diffusers: {type(e).__name__}: {e})") from e
        raise
    return _to_device(model, job["device"])


def _load_plain_quanto(job: dict, inputs: dict):
    import torch
    from diffusers import FluxTransformer2DModel

    try:
        from diffusers import QuantoConfig
    except ImportError as e:
        raise SkipRow("diffusers has no QuantoConfig any more") from e
    config = QuantoConfig(weights_dtype=PLAIN_QUANTO[job["qtype"]])
    model = FluxTransformer2DModel.from_pretrained(
        job["folder"], dtype=torch.bfloat16, quantization_config=config
    )
    return _to_device(model, job["device"])


def _load_plain_nncf(job: dict, inputs: dict):
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

    model = _load_bf16(job, inputs)
    kwargs: dict[str, Any] = {"mode": getattr(nncf.CompressWeightsMode, PLAIN_NNCF[job["qtype"]])}
    if job["qtype"].startswith("int4"):
        # ADJUST, not nncf's default ERROR: layers whose width is no multiple of 64 get a smaller group.
        kwargs.update(
            group_size=NNCF_GROUP_SIZE,
            advanced_parameters=AdvancedCompressionParameters(
                group_size_fallback_mode=GroupSizeFallbackMode.ADJUST
            ),
        )
    # nncf traces the model, so it needs an example input (the step's inputs).
    return nncf.compress_weights(model, dataset=nncf.Dataset([inputs]), **kwargs)


def _load_plain_gguf(job: dict, inputs: dict):
    import torch
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    model = FluxTransformer2DModel.from_single_file(
        job["gguf"],
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16),
        config=job["folder"],
        dtype=torch.bfloat16,
    )
    return _to_device(model, job["device"])


PLAIN_LOADERS = {
    "bnb": _load_plain_bnb,
    "quanto": _load_plain_quanto,
    "nncf": _load_plain_nncf,
    "gguf": _load_plain_gguf,
}


def _loader(job: dict):
    if job["impl"] == "baseline":
        return _load_bf16
    if job["impl"] == "ours":
        return _load_ours
    if job["backend"] not in PLAIN_LOADERS:
        raise SkipRow(f"no plain-diffusers path for {job['backend']}")
    return PLAIN_LOADERS[job["backend"]]


def _reset_rss_peak() -> bool:
    # Writing 5 to clear_refs resets VmHWM (Linux), so VmHWM afterwards is the peak RSS of the load.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss() -> int | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return _status_kib("VmRSS")


def measure_load(job: dict, inputs: dict) -> tuple[Any, dict]:
    import torch

    from diffusers_quant.measure import track_memory

    cuda = job["device"] == "cuda"
    load = _loader(job)
    gc.collect()
    rss_start, hwm_ok = _rss(), _reset_rss_peak()
    with track_memory(cuda=cuda) as peak:
        start = time.perf_counter()
        model = load(job, inputs)
        if cuda:
            torch.cuda.synchronize()
        load_s = time.perf_counter() - start
    rss_peak = _status_kib("VmHWM") if hwm_ok else None
    figures = {
        "load_s": load_s,
        "host_peak_growth": peak.host_growth,
        "host_anon_start": peak.host_start,
        "host_rss_start": rss_start,
        "host_rss_peak": rss_peak,
        "host_rss_peak_growth": rss_peak - rss_start if rss_peak and rss_start else None,
    }
    if cuda:
        gc.collect()
        figures["gpu_resident_after_load"] = torch.cuda.memory_allocated() - peak.cuda_start
        figures["gpu_peak_during_load"] = peak.cuda_peak - peak.cuda_start
    return model, figures


def time_steps(model, inputs: dict, defn: ModelDef, device: str) -> tuple[Any, dict]:
    """Median step time after warm-up: CUDA events on the GPU, perf_counter on the CPU. On the GPU also the
    host's time to issue a step (the call's own time, the GPU not waited for): near the step time, the step
    is host-bound."""
    import torch

    from diffusers_quant import fused

    cuda = device == "cuda"
    times, issue = [], []
    # no_grad, not inference_mode: quanto's int4 matmul fails on inference tensors.
    with torch.no_grad():
        for _ in range(defn.warmup):
            out = model(**inputs, return_dict=False)[0]
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            before = _allocator_counts()
        host_op = [host_op_us()]
        paths_before = fused.path_counts()
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        for _ in range(defn.steps):
            if cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                start = time.perf_counter()
                out = model(**inputs, return_dict=False)[0]
                issue.append((time.perf_counter() - start) * 1000)
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
            else:
                start = time.perf_counter()
                out = model(**inputs, return_dict=False)[0]
                times.append((time.perf_counter() - start) * 1000)
        cpu_s, wall_s = time.process_time() - cpu_start, time.perf_counter() - wall_start
        paths = step_paths(paths_before, fused.path_counts(), defn.steps)
        host_op.append(host_op_us())
    figures: dict[str, Any] = {"step_ms": sorted(times)[len(times) // 2], "step_ms_all": times}
    figures["fused_paths_per_step"] = paths
    # the host's speed around the timed steps, and the process's CPU time over them (above 1: other
    # threads of the process were busy too): an eager row's host issue time reads against these
    figures["host_op_us"] = host_op
    figures["process_cpu_over_wall_in_steps"] = cpu_s / wall_s
    if cuda:
        figures["gpu_step_peak"] = torch.cuda.max_memory_allocated() - base
        figures["host_issue_ms"] = sorted(issue)[len(issue) // 2]
        # cudaMalloc / cudaFree (each free synchronizes the device) and retries within the timed steps:
        # a steady step makes none; a row whose issue time nears its step time may be waiting on them
        after = _allocator_counts()
        figures["allocator_calls_in_steps"] = {k: after[k] - before[k] for k in after}
    return out.detach().float().cpu(), figures


def step_paths(before: dict, after: dict, steps: int) -> dict[str, list[float]]:
    """Which fused path the quantized layers took in a step, from ``fused.path_counts()`` before and after
    ``steps`` steps: per fused function (fused.py's names, e.g. ``gguf Q4_K``), ``[hand-written kernel
    calls, compiled-function calls]`` a step; none for the reference."""
    deltas = {
        k: [(a - b) / steps for a, b in zip(v, before.get(k, (0, 0)), strict=True)] for k, v in after.items()
    }
    return {k: v for k, v in deltas.items() if any(v)}


# CUDA runtime / driver calls a profile counts: launches, allocator calls, copies and the synchronising ones
_RUNTIME_PREFIXES = ("cuda", "cuLaunch", "cuMem")


def profile_step(model, inputs: dict, device: str, top: int = 15) -> dict:
    """One step under torch.profiler: the CUDA runtime calls by count (cudaMalloc / cudaFree / a
    synchronize in a steady step show a waiting row), the kernels taking the most device time, and the
    host ops taking the most host time (self time, microseconds)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad():
        model(**inputs, return_dict=False)  # warm: a compile or a first launch is not profiled
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            model(**inputs, return_dict=False)
            if cuda:
                torch.cuda.synchronize()
    events = prof.key_averages()

    def device_us(e) -> float:
        value = getattr(e, "self_device_time_total", None)  # older torch: self_cuda_time_total
        return float(getattr(e, "self_cuda_time_total", 0.0) if value is None else value)

    runtime = {e.key: e.count for e in events if e.key.startswith(_RUNTIME_PREFIXES)}
    kernels = sorted((e for e in events if device_us(e) > 0), key=device_us, reverse=True)
    host_ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "runtime_calls": dict(sorted(runtime.items(), key=lambda kv: -kv[1])),
        "host_self_us": round(sum(e.self_cpu_time_total for e in events), 1),
        "device_self_us": round(sum(device_us(e) for e in events), 1),
        "top_kernels": [[e.key[:90], e.count, round(device_us(e), 1)] for e in kernels[:top]],
        "top_host_ops": [[e.key[:90], e.count, round(e.self_cpu_time_total, 1)] for e in host_ops[:top]],
    }


def host_op_us(calls: int = 2000) -> float:
    """The host's speed now: microseconds a call of a small CPU tensor op (the dispatcher-bound kind of host
    work an eager step issues), the median of 5 rounds. Hosts shared with other work vary by 2-3x between
    runs and within one, and a host-bound eager step with them."""
    import torch

    x = torch.ones(8)
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            x.add(1)
        rounds.append((time.perf_counter() - start) * 1e6 / calls)
    return round(sorted(rounds)[2], 3)


def _allocator_counts() -> dict[str, int]:
    import torch

    stats = torch.cuda.memory_stats()
    keys = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")
    return {k: int(stats.get(k, 0)) for k in keys}


def compare(out, job: dict) -> dict:
    """rel_l2 of the step output against the bf16 row's (which writes the reference)."""
    import torch

    ref_path = Path(job["ref"])
    if job["impl"] == "baseline":
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, ref_path)
        return {"rel_l2": 0.0, "out_norm": float(out.norm())}
    if not ref_path.exists():
        return {"rel_l2": None, "out_norm": float(out.norm()), "note": "no bf16 reference output"}
    return {"rel_l2": _rel_l2(out, ref_path), "out_norm": float(out.norm())}


def _rel_l2(out, ref_path: Path) -> float:
    """rel_l2 of ``out`` against the bf16 eager output saved at ``ref_path``."""
    import torch

    ref = torch.load(ref_path).double()
    return float((out.double() - ref).norm() / ref.norm())


def _report_figures(model) -> dict:
    report = getattr(model, "quant_report", None)
    if report is None or not report.components:
        return {}
    c = report.components[0]
    return {
        "quant_mode": c.mode,
        "layers_quantized": c.layers_quantized,
        "linears_total": c.linears_total,
        "report_bytes_before": c.bytes_before,
        "report_bytes_after": c.bytes_after,
        "report_seconds": c.seconds,
    }


def run_worker(job: dict) -> dict:
    _quiet()
    import torch

    from diffusers_quant.post_load import state_nbytes

    defn = MODELS[job["model"]]
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    result: dict[str, Any] = {
        "id": job["id"],
        "status": "ok",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_start": _loadavg(),
    }
    if job["device"] == "cuda":
        if not torch.cuda.is_available():
            raise SkipRow("device=cuda but no CUDA device is available")
        _warm_cuda()
        result["device_name"] = torch.cuda.get_device_name(0)
    config = json.loads((Path(job["folder"]) / "config.json").read_text())
    inputs = make_inputs(defn, config, job["device"])
    _preimport(job)
    if job["impl"] != "ours":
        import diffusers_quant

        assert not diffusers_quant.is_installed(), "plain rows must run without our hooks"
    if defn.warm_load:
        _loader(job)(job, inputs)  # dropped at once
        gc.collect()
    model, figures = measure_load(job, inputs)
    result.update(figures)
    result["model_bytes"] = state_nbytes(model)
    result.update(_report_figures(model))
    out, steps = time_steps(model, inputs, defn, job["device"])
    result.update(steps)
    result.update(compare(out, job))
    if job.get("profile"):
        result["profile"] = profile_step(model, inputs, job["device"])
    if job.get("compiled"):
        result.update(compiled_steps(model, inputs, defn, job))
    return result


def compiled_steps(model, inputs: dict, defn: ModelDef, job: dict) -> dict:
    """The same steps with the blocks compiled (diffusers' ``compile_repeated_blocks``: each block class
    compiled once), the graph breaks dynamo counted, and the output's rel_l2 against the bf16 eager one."""
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    started = time.perf_counter()
    try:
        model.compile_repeated_blocks(fullgraph=False)
        out, steps = time_steps(model, inputs, defn, job["device"])
    except Exception as e:  # a row whose layers cannot be compiled: say so, keep its eager figures
        return {"compiled_error": f"{type(e).__name__}: {str(e)[:200]}"}
    figures = {
        "compiled_step_ms": steps["step_ms"],
        "compile_and_steps_s": time.perf_counter() - started,
        "graph_breaks": sum(counters["graph_break"].values()),
        "graph_break_reasons": sorted(counters["graph_break"])[:5],
    }
    if Path(job["ref"]).exists():
        figures["compiled_rel_l2"] = _rel_l2(out, Path(job["ref"]))
    if job.get("profile"):
        figures["compiled_profile"] = profile_step(model, inputs, job["device"])
    return figures


def _loadavg() -> float | None:
    # Other processes on the CPU skew CPU step times badly (oversubscribed threads): record the load.
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def worker_main(text: str) -> int:
    job = json.loads(text)
    try:
        result = run_worker(job)
    except SkipRow as e:
        result = {"id": job["id"], "status": "skipped", "note": str(e)}
    except Exception as e:  # one failing row must not stop the run; the parent records the message
        import traceback

        traceback.print_exc()
        result = {"id": job["id"], "status": "error", "note": f"{type(e).__name__}: {e}"[:600]}
    print(MARK + json.dumps(_finite(result)), flush=True)
    return 0


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# --- parent ---------------------------------------------------------------------------------------------


def _worker_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("DIFFUSERS_QUANT_PROGRESS", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.pop("DIFFUSERS_QUANT", None)  # plain rows must see no ambient plan
    if env.pop("PYTHONDONTWRITEBYTECODE", None):
        # Each row is a fresh interpreter: without bytecode caching every one recompiles torch, diffusers and
        # the backends (seconds per row). Cache it in the cache folder the caller chose (the tests point
        # DIFFUSERS_QUANT_CACHE at a temporary one), never beside the sources nor in a fixed home folder.
        env.setdefault("PYTHONPYCACHEPREFIX", str(cache_root() / "pycache"))
    return env


def run_subprocess(args: list[str], timeout: float) -> tuple[dict | None, str]:
    """Run this script with ``args``; returns (the JSON it marked, the tail of its output)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=_worker_env(), cwd=REPO
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f}s"
    found = [line[len(MARK) :] for line in proc.stdout.splitlines() if line.startswith(MARK)]
    tail = (proc.stderr or proc.stdout)[-1500:]
    if not found:
        return None, f"exit code {proc.returncode}: {tail}"
    return json.loads(found[-1]), tail


def run_row(row: Row, job: dict, timeout: float) -> dict:
    result, tail = run_subprocess(["--worker", json.dumps(job)], timeout)
    if result is None:
        result = {
            "id": row.id,
            "status": "error",
            "note": tail.strip().splitlines()[-1] if tail.strip() else tail,
        }
    if result["status"] == "error":
        result["stderr_tail"] = tail  # the traceback, for whoever reads results.json after a GPU run
    return {**asdict(row), "format": row.format, **result}


def prepare_gguf(model: str, folder: Path, qtype: str, timeout: float) -> tuple[Path | None, str, float]:
    path = gguf_path(model, qtype)
    start = time.perf_counter()
    if not path.exists():
        result, tail = run_subprocess(["--write-gguf", json.dumps([str(folder), qtype, str(path)])], timeout)
        if not result or not result.get("ok"):
            return None, (result or {}).get("error") or tail, time.perf_counter() - start
    return path, "", time.perf_counter() - start


def gpu_name() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    result, _ = run_subprocess(["--gpu-name"], 120)
    return (result or {}).get("name")


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_slug(device: str, name: str | None) -> str:
    """cpu-<cores>c, or vendor + model of the GPU: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100'."""
    if device != "cuda" or not name:
        return f"cpu-{cpu_cores()}c"
    tokens = [t for t in re.split(r"[^a-z0-9]+", name.lower()) if t]
    model = next((t for t in tokens[1:] if any(c.isdigit() for c in t)), tokens[1] if len(tokens) > 1 else "")
    return "-".join(filter(None, [tokens[0], model]))


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info(device: str, name: str | None) -> dict:
    info = {
        "device": device,
        "gpu_name": name,
        "cpu_cores": cpu_cores(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            d: _version(d)
            for d in (
                "torch",
                "diffusers",
                "transformers",
                "accelerate",
                "bitsandbytes",
                "optimum-quanto",
                "nncf",
                "gguf",
            )
        },
    }
    try:
        import psutil

        info["ram_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    try:
        info["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


@dataclass
class Run:
    args: argparse.Namespace
    device: str
    model: str
    folder: Path
    out: Path
    info: dict
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)


def ref_path(model: str, device: str) -> Path:
    return cache_root() / "bench-refs" / f"{model}-v{MODEL_VERSION}-{device}.pt"


def _job(run: Run, row: Row, gguf: Path | None) -> dict:
    defn = MODELS[run.model]
    return {
        **asdict(row),
        "model": run.model,
        "folder": str(run.folder),
        "device": run.device,
        "ref": str(ref_path(run.model, run.device)),
        "gguf": str(gguf) if gguf else None,
        "warmup": defn.warmup,
        "steps": defn.steps,
        "threads": run.args.threads,
        "compiled": bool(getattr(run.args, "compiled", False)),
        "profile": bool(getattr(run.args, "profile", False)),
    }


def _previous_rows(run: Run) -> dict[str, dict]:
    """Rows of an earlier (interrupted) run into the same folder, for --resume."""
    path = run.out / "results.json"
    if not run.args.resume or not path.exists():
        return {}
    data = json.loads(path.read_text())
    if data.get("model", {}).get("name") != run.model or data.get("machine", {}).get("device") != run.device:
        return {}
    rows = {r["id"]: r for r in data.get("rows", []) if r.get("status") == "ok"}
    if "bf16" in rows and not ref_path(run.model, run.device).exists():
        return {}  # without the reference output the other rows' rel_l2 cannot be computed
    return rows


def _skipped(row: Row, note: str) -> dict:
    return {**asdict(row), "format": row.format, "status": "skipped", "note": note}


def _needs_gguf(row: Row) -> bool:
    return row.mode == "file" or (row.impl == "plain" and row.backend == "gguf")


def _gguf_file(run: Run, qtype: str, cache: dict[str, Path | None]) -> Path | None:
    """The GGUF file of the bf16 model in ``qtype``, written once (lazily, so a budget can skip it)."""
    if qtype not in cache:
        path, err, secs = prepare_gguf(run.model, run.folder, qtype, run.args.row_timeout)
        cache[qtype] = path
        run.notes.append(
            f"GGUF {qtype} file: " + (f"ready in {secs:.1f}s" if path else f"not written: {err[-300:]}")
        )
    return cache[qtype]


def _run_one(run: Run, row: Row, previous: dict[str, dict], gguf_files: dict[str, Path | None]) -> dict:
    if row.id in previous:
        return {**previous[row.id], "reused": True}
    if row.skip:
        return _skipped(row, row.skip)
    over = run.args.budget_s and time.perf_counter() - run.started > run.args.budget_s
    if over and row.id != "bf16":  # bf16 is the reference of every other row, so it always runs
        return _skipped(row, f"time budget of {run.args.budget_s:.0f}s spent; rerun with --resume")
    gguf = None
    if _needs_gguf(row):
        gguf = _gguf_file(run, row.qtype, gguf_files)
        if gguf is None:
            return _skipped(row, "the GGUF file could not be written (see notes)")
    return run_row(row, _job(run, row, gguf), run.args.row_timeout)


def execute(run: Run, rows: list[Row]) -> None:
    previous = _previous_rows(run)
    gguf_files: dict[str, Path | None] = {}
    for i, row in enumerate(rows, 1):
        started = time.perf_counter()
        result = _run_one(run, row, previous, gguf_files)
        _checkpoint_bytes(result, run)
        run.rows.append(result)
        note = f"  ({result.get('note')})" if result.get("note") and result["status"] != "ok" else ""
        status = "ok (reused from the earlier run)" if result.get("reused") else result["status"]
        print(
            f"[{i}/{len(rows)}] {row.id}: {status} in {time.perf_counter() - started:.1f}s{note}",
            file=sys.stderr,
            flush=True,
        )
        write_outputs(run, chart=False)  # keep partial results if the run is cut short
    reused = sum(1 for r in run.rows if r.get("reused"))
    if reused:
        run.notes.append(
            f"{reused} of {len(run.rows)} rows reused from earlier runs into this folder (--resume, "
            "marked 'reused' in results.json); the bf16 row is this run's, ratios are to it"
        )


def _checkpoint_bytes(row: dict, run: Run) -> None:
    """Bytes of the files the row reads: the GGUF file, or the bf16 safetensors shards."""
    if row["status"] != "ok" or row.get("checkpoint_bytes") is not None:
        return
    if row.get("mode") == "file" or (row["impl"] == "plain" and row["backend"] == "gguf"):
        path = gguf_path(run.model, row["qtype"])
        row["checkpoint_bytes"] = path.stat().st_size if path.exists() else None
    else:
        row["checkpoint_bytes"] = run.info["checkpoint_bytes"]


# --- figures, checks, outputs ---------------------------------------------------------------------------


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def _check(value, limit: float) -> str | None:
    return None if value is None else ("pass" if value <= limit else "fail")


def _resident(row: dict, device: str):
    # GPU: what the allocator holds after load; CPU: the model's stored bytes.
    return row.get("gpu_resident_after_load") if device == "cuda" else row.get("model_bytes")


def summarize(rows: list[dict], device: str) -> None:
    """Ratios to bf16 and the issue's target checks, added to each row in place."""
    base = next((r for r in rows if r["id"] == "bf16" and r["status"] == "ok"), {})
    plain = {r["format"]: r for r in rows if r["impl"] == "plain" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        r["resident_bytes"] = _resident(r, device)
        r["step_ratio"] = _ratio(r.get("step_ms"), base.get("step_ms"))
        r["compiled_vs_eager_bf16"] = _ratio(r.get("compiled_step_ms"), base.get("step_ms"))
        r["compiled_ratio"] = _ratio(r.get("compiled_step_ms"), base.get("compiled_step_ms"))
        r["mem_ratio"] = _ratio(r["resident_bytes"], _resident(base, device))
        r["load_ratio"] = _ratio(r.get("load_s"), base.get("load_s"))
        r["peak_over_resident"] = _ratio(r.get("gpu_peak_during_load"), r.get("gpu_resident_after_load"))
        r["host_peak_over_ckpt"] = _ratio(r.get("host_peak_growth"), r.get("checkpoint_bytes"))
        twin = plain.get(r["format"]) if r["impl"] == "ours" else None
        r["plain_rel_l2"] = twin.get("rel_l2") if twin else None
        rel_vs_plain = _ratio(r.get("rel_l2"), r["plain_rel_l2"])
        r["checks"] = {
            "peak_over_resident<=1.15": _check(r["peak_over_resident"], PEAK_OVER_RESIDENT_MAX),
            "host_peak<=1.1x_ckpt": _check(r["host_peak_over_ckpt"], HOST_PEAK_OVER_CKPT_MAX),
            "load_ratio<=1.5": _check(r["load_ratio"], LOAD_RATIO_MAX),
            "rel_l2<=1.05x_plain": _check(rel_vs_plain, REL_L2_OVER_PLAIN_MAX),
        }
        r["speed_checks"] = {
            "step<=1.10x": _check(r["step_ratio"], STEP_RATIO_MAX),
            "compiled<=1.10x": _check(r["compiled_ratio"], STEP_RATIO_MAX),
        }


def _mib(n) -> str:
    return "-" if n is None else f"{n / MiB:,.1f}"


def _num(x, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _mark(value: str | None) -> str:
    return {"pass": "pass", "fail": "**FAIL**"}.get(value or "", "-")


def _cell(text: str) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def rows_table(rows: list[dict], device: str) -> list[str]:
    res = "GPU resident MiB" if device == "cuda" else "model MiB"
    head = [
        "row",
        "load s",
        "load×",
        "host peak MiB",
        "ckpt MiB",
        res,
        "mem×",
        "GPU peak/res",
        "step ms",
        "step×",
        "rel_l2",
        "peak≤1.15",
        "host≤1.1×ckpt",
        "load≤1.5×",
        "rel≤1.05×plain",
        "status",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            cells = [r["id"], *["-"] * (len(head) - 2), _cell(f"{r['status']}: {r.get('note', '')}")[:160]]
        else:
            c = r["checks"]
            cells = [
                r["id"],
                _num(r["load_s"]),
                _num(r["load_ratio"]),
                _mib(r.get("host_peak_growth")),
                _mib(r.get("checkpoint_bytes")),
                _mib(r["resident_bytes"]),
                _num(r["mem_ratio"]),
                _num(r["peak_over_resident"]),
                _num(r["step_ms"], "{:.1f}"),
                _num(r["step_ratio"]),
                _num(r.get("rel_l2"), "{:.4f}"),
                *(_mark(v) for v in c.values()),
                "ok",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def speed_table(rows: list[dict]) -> list[str]:
    """Step times eager and compiled (``--compiled``), each against bf16's, with issue 12's 1.10x targets."""
    ok = [r for r in rows if r["status"] == "ok" and ("compiled_step_ms" in r or "compiled_error" in r)]
    if not ok:
        return []
    head = [
        "row",
        "eager ms",
        "eager × bf16",
        "eager host issue ms",
        "host op µs",
        "compiled ms",
        "compiled × bf16 eager",
        "compiled × bf16 compiled",
        "graph breaks",
        "rel_l2 compiled",
        "eager≤1.10×",
        "compiled≤1.10×",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ok:
        if "compiled_error" in r:
            lines.append(
                f"| {r['id']} | {_num(r['step_ms'], '{:.2f}')} | {_num(r['step_ratio'])} | "
                f"{_num(r.get('host_issue_ms'), '{:.2f}')} | {_host_op(r)} | "
                f"failed: {_cell(r['compiled_error'])[:120]} |||||||"
            )
            continue
        checks = r.get("speed_checks", {})
        cells = [
            r["id"],
            _num(r["step_ms"], "{:.2f}"),
            _num(r["step_ratio"], "{:.3f}"),
            _num(r.get("host_issue_ms"), "{:.2f}"),
            _host_op(r),
            _num(r["compiled_step_ms"], "{:.2f}"),
            _num(r["compiled_vs_eager_bf16"], "{:.3f}"),
            _num(r["compiled_ratio"], "{:.3f}"),
            str(r.get("graph_breaks", "-")),
            _num(r.get("compiled_rel_l2"), "{:.4f}"),
            *(_mark(checks.get(k)) for k in ("step<=1.10x", "compiled<=1.10x")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _host_op(row: dict) -> str:
    """The host's speed before / after the row's timed eager steps (``host_op_us``)."""
    values = row.get("host_op_us")
    return " / ".join(f"{v:.2f}" for v in values) if values else "-"


def pairs_table(rows: list[dict]) -> list[str]:
    """Ours next to plain diffusers for the same format (ours / plain in each cell)."""
    ok = [r for r in rows if r["status"] == "ok"]
    plain = {r["format"]: r for r in ok if r["impl"] == "plain"}
    head = [
        "format",
        "ours row",
        "plain API",
        "step× ours / plain",
        "mem× ours / plain",
        "load s ours / plain",
        "host peak MiB ours / plain",
        "rel_l2 ours / plain",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in (r for r in ok if r["impl"] == "ours" and r["format"] in plain):
        p = plain[r["format"]]
        cells = [
            r["format"],
            r["id"],
            p["api"],
            f"{_num(r['step_ratio'])} / {_num(p['step_ratio'])}",
            f"{_num(r['mem_ratio'])} / {_num(p['mem_ratio'])}",
            f"{_num(r['load_s'])} / {_num(p['load_s'])}",
            f"{_mib(r.get('host_peak_growth'))} / {_mib(p.get('host_peak_growth'))}",
            f"{_num(r.get('rel_l2'), '{:.4f}')} / {_num(p.get('rel_l2'), '{:.4f}')}",
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines if len(lines) > 2 else []


def highlights(rows: list[dict], device: str) -> list[str]:
    """Lines worth reading first: the CPU int4 step-time ratio (diffusers' QuantoConfig int4 on CPU was
    reported at 240x bf16) and the failed checks."""
    out = []
    for r in rows:
        if r["status"] == "ok" and r["format"] == "quanto:qint4" and r.get("step_ratio") is not None:
            out.append(f"- {device} step time, {r['id']} vs bf16: **{r['step_ratio']:.2f}x**")
    failed = [
        f"{r['id']} ({k})" for r in rows if r["status"] == "ok" for k, v in r["checks"].items() if v == "fail"
    ]
    out.append("- failed checks: " + (", ".join(failed) if failed else "none"))
    busy = [r["loadavg_start"] for r in rows if (r.get("loadavg_start") or 0) > cpu_cores()]
    if device == "cpu" and busy:
        out.append(
            f"- the CPU was busy during {len(busy)} row(s) (load average up to {max(busy):.1f} on "
            f"{cpu_cores()} cores): their CPU step times may be inflated"
        )
    return out


def markdown(run: Run) -> str:
    info, defn = run.info, MODELS[run.model]
    v = info["versions"]
    where = info["gpu_name"] or f"CPU ({info['cpu_cores']} cores)"
    lines = [
        f"# diffusers_quant benchmark: {run.model} on {where}",
        "",
        f"- model: {defn.about}; {_mib(run.info.get('checkpoint_bytes'))} MiB checkpoint"
        + (f", {run.info['params'] / 1e9:.3f}B params" if run.info.get("params") else ""),
        f"- step: one transformer forward, {defn.img_tokens} image + {defn.txt_tokens} text tokens, bf16; "
        f"{defn.warmup} warm-up + {defn.steps} timed steps, median",
        f"- torch {v['torch']}, diffusers {v['diffusers']}, bitsandbytes {v['bitsandbytes']}, "
        f"optimum-quanto {v['optimum-quanto']}, nncf {v['nncf']}, gguf {v['gguf']}; "
        f"{info['cpu_cores']} CPU cores; Python {info['python']}",
        "- ratios (×) are to the bf16 row; checks are the issue's targets (see benchmarks/README.md)",
        "",
        "## All rows",
        "",
        *rows_table(run.rows, run.device),
    ]
    speed = speed_table(run.rows)
    if speed:
        lines += ["", "## Step time, eager and compiled (`compile_repeated_blocks`)", "", *speed]
    pairs = pairs_table(run.rows)
    if pairs:
        lines += ["", "## Ours vs plain diffusers (same format)", "", *pairs]
    lines += ["", "## Highlights", "", *highlights(run.rows, run.device)]
    if run.notes:
        lines += ["", "## Notes", "", *(f"- {_cell(n)}" for n in run.notes)]
    return "\n".join(lines) + "\n"


def write_chart(run: Run, path: Path) -> str | None:
    """Step ratio, memory ratio and rel_l2 per row; ours and plain coloured apart. Returns an error or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no chart: {e}"
    rows = [r for r in run.rows if r["status"] == "ok"]
    colours = {"baseline": "0.5", "ours": "tab:blue", "plain": "tab:orange"}
    panels = (
        ("step_ratio", "step time / bf16"),
        ("mem_ratio", "memory / bf16"),
        ("rel_l2", "rel_l2 vs bf16"),
    )
    height = 1.8 + 0.32 * len(rows)
    fig, axes = plt.subplots(1, 3, figsize=(15, height), sharey=True)
    labels = [r["id"] for r in rows]
    for ax, (key, title) in zip(axes, panels, strict=True):
        values = [r.get(key) or 0.0 for r in rows]
        bars = ax.barh(range(len(rows)), values, color=[colours[r["impl"]] for r in rows])
        ax.bar_label(bars, fmt="%.3f" if key == "rel_l2" else "%.2f", fontsize=7, padding=2)
        if key != "rel_l2":
            ax.axvline(1.0, color="k", lw=0.8, ls="--")
        positive = [v for v in values if v > 0]
        if key == "step_ratio" and positive and max(positive) > 20 * min(positive):
            ax.set_xscale("log")  # a slow kernel (e.g. 100x) would flatten every other bar
        ax.set_title(title)
        ax.margins(x=0.15)  # room for the value labels
    axes[0].set_yticks(range(len(rows)), labels, fontsize=8)
    axes[0].invert_yaxis()
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    fig.legend(handles, ["bf16", "ours (diffusers_quant)", "plain diffusers"], loc="lower center", ncol=3)
    fig.suptitle(f"{run.model} on {run.info['gpu_name'] or 'CPU'}")
    fig.tight_layout(rect=(0, 0.6 / height, 1, 1))  # keep the legend clear of the axes
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_outputs(run: Run, chart: bool = True) -> str:
    run.out.mkdir(parents=True, exist_ok=True)
    summarize(run.rows, run.device)
    defn = MODELS[run.model]
    data = {
        "machine": run.info,
        "model": {
            "name": run.model,
            "about": defn.about,
            "folder": str(run.folder),
            "img_tokens": defn.img_tokens,
            "txt_tokens": defn.txt_tokens,
            "warmup": defn.warmup,
            "steps": defn.steps,
            "checkpoint_bytes": run.info.get("checkpoint_bytes"),
            "params": run.info.get("params"),
        },
        "command": " ".join(sys.argv),
        "elapsed_s": time.perf_counter() - run.started,
        "notes": run.notes,
        "rows": run.rows,
    }
    (run.out / "results.json").write_text(json.dumps(_finite(data), indent=1) + "\n")
    if chart:
        error = write_chart(run, run.out / "chart.png")
        if error:
            run.notes.append(error)
    md = markdown(run)
    (run.out / "results.md").write_text(md)
    return md


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _default_model(args: argparse.Namespace, device: str) -> str:
    if args.model:
        return args.model
    if args.quick or device == "cpu":
        return "tiny"
    return "flux-full" if args.full else "flux-width"


def parent_main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    device = args.device or _default_device()
    model = _default_model(args, device)
    rows = select_rows(all_rows(), quick=args.quick, patterns=args.rows)
    if args.list:
        print("\n".join(f"{r.id}{'  (skip: ' + r.skip + ')' if r.skip else ''}" for r in rows))
        return 0
    name = gpu_name() if device == "cuda" else None
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / machine_slug(device, name)
    info = machine_info(device, name)
    build_start = time.perf_counter()
    folder = _ensure_model_subprocess(model, args.row_timeout)
    files = weight_files(folder)
    warm_page_cache(files)
    info["checkpoint_bytes"] = files_nbytes(files)
    meta = folder.parent / "bench-model.json"
    info["params"] = json.loads(meta.read_text())["params"] if meta.exists() else None
    run = Run(args, device, model, folder, out, info, started=started)
    run.notes.append(f"model ready in {time.perf_counter() - build_start:.1f}s ({folder})")
    print(f"benchmarking {model} on {device} ({len(rows)} rows) into {out}", file=sys.stderr, flush=True)
    execute(run, rows)
    run.notes.append(f"total wall time {time.perf_counter() - started:.0f}s")
    md = write_outputs(run)
    print(md)
    return 0


def _ensure_model_subprocess(model: str, timeout: float) -> Path:
    folder = model_folder(model)
    if (folder / "config.json").exists():
        return folder
    # Built in a child so the parent never holds the model's memory.
    result, tail = run_subprocess(["--build", model], max(timeout, 1800))
    if not result or "folder" not in result:
        raise SystemExit(f"building model {model} failed: {tail}")
    return Path(result["folder"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny model, a few rows (CPU smoke run, minutes)")
    p.add_argument(
        "--full", action="store_true", help="full Flux depth (19 + 38 blocks) instead of flux-width"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument(
        "--model", choices=tuple(MODELS), help="override the model chosen by --quick/--full/--device"
    )
    p.add_argument(
        "--rows",
        help="comma-separated fnmatch patterns over row ids (bf16 always runs), "
        "e.g. 'ours/bnb:*,plain/bnb:*'",
    )
    p.add_argument("--out", help="output folder (default benchmarks/results/<machine>)")
    p.add_argument("--row-timeout", type=float, default=300.0, help="seconds before a row is killed")
    p.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="stop starting rows after this many seconds (0: no limit); the rest are skipped",
    )
    p.add_argument("--resume", action="store_true", help="reuse ok rows of an earlier run in --out")
    p.add_argument("--threads", type=int, help="torch threads in each row (default: torch's default)")
    p.add_argument("--list", action="store_true", help="print the row ids and exit")
    p.add_argument(
        "--compiled",
        action="store_true",
        help="also time each row with its blocks compiled (compile_repeated_blocks), against compiled bf16",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile one eager (and compiled) step of each row: runtime calls, top kernels, host ops",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--build", help=argparse.SUPPRESS)
    p.add_argument("--write-gguf", help=argparse.SUPPRESS)
    p.add_argument("--gpu-name", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _child_main(args: argparse.Namespace) -> int:
    """The helper processes: build a model, write a GGUF file, or name the GPU."""
    if args.build:
        print(MARK + json.dumps({"folder": str(ensure_model(args.build))}), flush=True)
    elif args.write_gguf:
        folder, qtype, path = json.loads(args.write_gguf)
        try:
            write_model_gguf(Path(folder), qtype, Path(path))
            print(MARK + json.dumps({"ok": True}), flush=True)
        except Exception as e:
            print(MARK + json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"[:600]}), flush=True)
    else:
        import torch

        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        print(MARK + json.dumps({"name": name}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.build or args.write_gguf or args.gpu_name:
        return _child_main(args)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
