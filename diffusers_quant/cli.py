"""``diffusers-quant`` command line: generate | check | quantize | inspect | run | autoload."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .errors import QuantError

DEFAULT_QUANT = "model=bnb:nf4"


def _plan(args):
    from .spec import Plan

    plan = Plan.parse(args.quant, source="cli")
    return plan.with_settings(mode=args.mode, device=args.device, dtype=args.dtype)


def _model_path(args) -> tuple[str, str | None]:
    """The pipeline to load, and which demo it is (None for any other pipeline)."""
    from .demo import demo_name, demo_path

    if args.model:
        if not os.path.exists(args.model):
            raise QuantError(
                f"--model {args.model!r} does not exist; give a local pipeline folder or a single file"
            )
        return args.model, demo_name(args.model) if os.path.isdir(args.model) else None
    return str(demo_path(args.demo)), args.demo


def _load_pipeline(path: str, plan, pipeline: str | None):
    import torch
    from diffusers import DiffusionPipeline

    dtype = getattr(torch, plan.dtype or "bfloat16")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise QuantError(f"{path!r} has no model_index.json: it is not a diffusers pipeline folder")
        return DiffusionPipeline.from_pretrained(path, dtype=dtype, quant=plan)
    if not pipeline:
        raise QuantError(
            f"{path!r} is a single file; name its pipeline class with --pipeline, "
            "e.g. --pipeline StableDiffusionPipeline"
        )
    import diffusers

    cls = getattr(diffusers, pipeline, None)
    if cls is None or not hasattr(cls, "from_single_file"):
        raise QuantError(f"--pipeline {pipeline!r} is not a diffusers pipeline with from_single_file")
    return cls.from_single_file(path, dtype=dtype, quant=plan)


def cmd_generate(args) -> int:
    from dataclasses import replace

    from . import install

    plan = _plan(args)
    out = Path(args.out)
    _refuse_image_suffix(out)
    path, demo = _model_path(args)
    install()
    start = time.perf_counter()
    pipe = _load_pipeline(path, plan, args.pipeline)
    load_seconds = time.perf_counter() - start
    report = pipe.quant_report
    print(report)
    print(f"load time: {load_seconds:.2f}s")
    quantized = _render(pipe, args, demo)
    del pipe  # the full-precision pipeline below must not sit beside it in memory
    out.parent.mkdir(parents=True, exist_ok=True)
    from .report import to_pil

    to_pil(quantized).save(out)
    print(f"wrote {out.resolve()}")
    if args.compare:
        import gc

        import numpy as np

        from .report import comparison_sheet

        gc.collect()
        full = _render(_load_pipeline(path, replace(plan, entries=()), args.pipeline), args, demo)
        rel_l2 = float(np.linalg.norm(quantized - full) / max(float(np.linalg.norm(full)), 1e-12))
        sheet = out.with_name(f"{out.stem}-compare.png")
        comparison_sheet(full, quantized, _sheet_lines(report, rel_l2)).save(sheet)
        print(f"wrote {sheet.resolve()} (full precision | quantized | difference; rel-L2 {rel_l2:.4f})")
    if demo:
        from .demo import RANDOM_WEIGHTS_NOTE

        print(RANDOM_WEIGHTS_NOTE + ("" if args.compare else " (drop --no-compare to get the sheet)"))
    return 0


def _render(pipe, args, demo: str | None):
    """One image as a float HxWx3 array in [0, 1]; demo pipelines default to the size they are built for."""
    from .demo import DEMO_SIZE, generate_kwargs

    default = DEMO_SIZE if demo else None
    size = {"height": args.height or default, "width": args.width or default}
    kwargs = generate_kwargs(pipe, prompt=args.prompt, steps=args.steps, seed=args.seed, **size)
    return pipe(**kwargs, output_type="np").images[0]


def _sheet_lines(report, rel_l2: float) -> list[str]:
    before = sum(c.bytes_before for c in report.components)
    after = sum(c.bytes_after for c in report.components)
    quantized = ", ".join(
        f"{c.name} {c.spec} {c.bytes_before / 2**20:.2f} -> {c.bytes_after / 2**20:.2f} MiB"
        for c in report.components
        if c.spec
    )
    return [
        f"plan: {report.plan or '(none)'}",
        f"bytes: {before / 2**20:.2f} -> {after / 2**20:.2f} MiB" + (f" ({quantized})" if quantized else ""),
        f"rel-L2 quantized vs full precision: {rel_l2:.4f}",
    ]


def _refuse_image_suffix(out: Path) -> None:
    from PIL import Image

    if out.suffix.lower() not in Image.registered_extensions():
        raise QuantError(
            f"--out {str(out)!r}: not an image file name; fix: end it with .png (or .jpg, .webp)"
        )


def cmd_check(args) -> int:
    """Say whether a plan can run on a pipeline, reading no weights."""
    from .errors import PlanRefused
    from .hooks import _pipeline_components
    from .offload import _size, is_multi_gpu, planned_maps
    from .rules import problems

    plan = _plan(args)
    path, _ = _model_path(args)
    components = _pipeline_components(object, path, {})
    found = problems(plan, components, whole_pipeline=True)
    for c in components:
        spec = plan.spec_for(c.name, c.kind, pipeline=True)
        print(f"{c.name:16} {c.kind:13} {spec or '-'}")
    if os.path.isdir(path):  # the map needs no GPU: it is shown even where the GPU check refused
        try:
            maps = planned_maps(plan, path, components)
        except PlanRefused as e:
            found += e.problems
        else:
            for name, device_map in maps.items():
                print(f"{name}: balanced device map (from the configs; no weight read)")
                print("\n".join(device_map.lines()))
            if is_multi_gpu(plan) and maps:
                total: dict[str, int] = {}
                for device_map in maps.values():
                    for device, nbytes in device_map.bytes_on.items():
                        total[device] = total.get(device, 0) + nbytes
                budgets = {
                    f"cuda:{k}" if isinstance(k, int) else k: v for k, v in plan.max_memory_bytes().items()
                }
                print(
                    f"pipeline over {', '.join(f'cuda:{i}' for i in plan.gpu_indices())} (max_memory={plan.max_memory}):"
                )
                for device in sorted(total, key=lambda d: (d == "cpu", d)):
                    cap = f" of {_size(budgets[device])}" if device in budgets else ""
                    names = [n for n, m in maps.items() if device in m.bytes_on]
                    print(f"  {device}: {_size(total[device])}{cap} ({', '.join(names)})")
    if found:
        print("refused:\n" + "\n".join(f"  - {p}" for p in found))
        return 1
    print(f"ok: {plan}")
    return 0


def cmd_run(args) -> int:
    """Run an app (a script, or -m module) with the hooks installed: the plan from --quant, else
    DIFFUSERS_QUANT, else the default."""
    from .plugin import run_app

    if args.module is None and args.script is None:
        raise QuantError(
            "run: give the app's script or -m module.name; e.g. diffusers-quant run app.py --its-args"
        )
    target = args.module if args.module is not None else args.script
    argv = args.script_args
    settings = dict(mode=args.mode, device=args.device, dtype=args.dtype)
    return run_app(args.quant, target, argv, module=args.module is not None, settings=settings)


def cmd_autoload(args) -> int:
    """autoload enable | disable | status: the .pth hook in this environment's site-packages."""
    from . import plugin

    if args.action == "enable":
        path = plugin.autoload_enable()
        print(f"autoload enabled: {path} (active in processes where {plugin.ENV_VAR} is set)")
    elif args.action == "disable":
        path = plugin.autoload_disable()
        print(f"autoload disabled: {path} removed")
    else:
        enabled, path = plugin.autoload_status()
        plan = os.environ.get(plugin.ENV_VAR)
        print(f"autoload {'enabled' if enabled else 'disabled'}: {path}")
        print(f"{plugin.ENV_VAR}={plan!r}" if plan else f"{plugin.ENV_VAR} is not set: the hook does nothing")
    return 0


def _component_folder(path: str, component: str | None) -> tuple[str, str]:
    """(folder of the model to quantize, component name) from a pipeline folder or a model folder."""
    import json

    if os.path.isfile(os.path.join(path, "model_index.json")):
        with open(os.path.join(path, "model_index.json")) as f:
            index = json.load(f)
        names = [n for n in ("transformer", "unet") if isinstance(index.get(n), list)]
        component = component or (names[0] if names else None)
        if not component or not os.path.isdir(os.path.join(path, component)):
            raise QuantError(
                f"{path}: no component {component!r}; fix: --component one of "
                f"{', '.join(k for k, v in index.items() if isinstance(v, list))}"
            )
        return os.path.join(path, component), component
    if os.path.isfile(os.path.join(path, "config.json")):
        return path, component or os.path.basename(os.path.normpath(path))
    raise QuantError(
        f"{path!r} is neither a pipeline folder (model_index.json) nor a model folder (config.json)"
    )


def _model_class(folder: str):
    import json

    import diffusers
    import transformers

    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    cls = getattr(diffusers, name or "", None) or getattr(transformers, name or "", None)
    if cls is None:
        raise QuantError(f"{folder}: config names class {name!r}, which diffusers/transformers do not have")
    return cls


def cmd_quantize(args) -> int:
    """Quantize one component and write it: a .gguf file for gguf specs, else a saved folder.

    Everything that can refuse is checked first: no refusal comes after the model is loaded."""
    import torch

    from .components import Component, kind_of_class
    from .rules import enforce
    from .spec import Plan, Spec, normalize_dtype

    dtype = getattr(torch, normalize_dtype(args.dtype or "bfloat16"))
    if args.quant.strip().lower() == "fp8":
        return _write_fp8(args, dtype)
    spec = Spec.parse(args.quant)
    out = Path(args.out)
    if spec.backend == "bnb" and spec.qtype in ("nf4", "fp4") and out.suffix.lower() in _FILE_SUFFIXES:
        return _write_forge(args, spec, dtype)
    _refuse_out(spec, out)
    if not os.path.exists(args.model):
        raise QuantError(f"{args.model!r} does not exist; give a pipeline folder or a model folder")
    folder, name = _component_folder(args.model, args.component)
    cls = _model_class(folder)
    kind = kind_of_class(cls)
    plan = Plan(entries=((name, spec),), mode="auto")
    enforce(plan, [Component(name, kind, cls.__name__)])
    if spec.backend == "gguf":
        from .backends import get_backend

        get_backend("gguf").require()
        return _write_gguf(cls, folder, kind, spec, out)
    from . import install, save_quantized

    install()
    model = cls.from_pretrained(folder, dtype=dtype, quant=plan)
    print(model.quant_report)
    print(f"wrote {save_quantized(model, out)}")
    return 0


_FILE_SUFFIXES = (".gguf", ".safetensors")


def _single_file_target(args, quant: str, what: str, suffix: str):
    """(--out, the model class, its folder, its component name) for a single-file writer, everything that
    can refuse checked before the model is loaded."""
    from .layouts import require_original_layout

    out = Path(args.out)
    if out.suffix.lower() != ".safetensors" or out.is_dir():
        raise QuantError(
            f"--out {str(out)!r}: --quant {quant} writes {what}; fix: e.g. --out "
            f"{out.with_suffix('').name}-{suffix}.safetensors"
        )
    if not os.path.exists(args.model):
        raise QuantError(f"{args.model!r} does not exist; give a pipeline folder or a model folder")
    folder, name = _component_folder(args.model, args.component)
    cls = _model_class(folder)
    require_original_layout(cls.__name__, quant)
    return out, cls, folder, name


def _write_fp8(args, dtype) -> int:
    """--quant fp8: one ComfyUI scaled fp8 file, in the model's original key layout."""
    from .fp8_files import write_scaled_fp8

    out, cls, folder, _ = _single_file_target(args, "fp8", "one safetensors file", "fp8")
    written = write_scaled_fp8(cls.from_pretrained(folder, dtype=dtype), str(out))
    print(f"wrote {out} (ComfyUI scaled fp8): {_tally(written.elements())}")
    return 0


def _write_forge(args, spec, dtype) -> int:
    """--quant bnb:nf4 (or fp4) --out FILE.safetensors: one Forge 4-bit file, in the model's original key
    layout."""
    from .nf4_files import write_forge_nf4

    out, cls, folder, name = _single_file_target(args, str(spec), "one Forge safetensors file", spec.qtype)
    from . import install
    from .components import Component, kind_of_class
    from .rules import enforce
    from .spec import Plan

    plan = Plan(entries=((name, spec),), mode="auto")
    enforce(plan, [Component(name, kind_of_class(cls), cls.__name__)])
    install()
    model = cls.from_pretrained(folder, dtype=dtype, quant=plan)
    written = write_forge_nf4(model, str(out))
    print(f"wrote {out} (Forge bitsandbytes {spec.qtype}): {_tally(written.elements())}")
    return 0


def _refuse_out(spec, out: Path) -> None:
    """--out must name what the spec writes: a .gguf file for gguf, else a new folder."""
    from .backends.gguf import is_file_spec

    if is_file_spec(spec):
        raise QuantError(
            f"--quant {spec}: quantize writes a new file, so it takes a type to quantize to; "
            "fix: e.g. --quant gguf:q8_0 (a .gguf file is loaded with the plan transformer=gguf:<file>)"
        )
    if spec.backend == "gguf":
        if out.suffix.lower() != ".gguf":
            raise QuantError(
                f"--out {str(out)!r}: a gguf spec writes one GGUF file; fix: --out {out.with_suffix('.gguf')}"
            )
        if out.is_dir():
            raise QuantError(
                f"--out {str(out)!r} is a folder; fix: name a .gguf file, e.g. {out / 'model.gguf'}"
            )
        return
    if out.suffix.lower() in _FILE_SUFFIXES:
        raise QuantError(
            f"--out {str(out)!r}: {spec} is saved as a folder (config.json + safetensors), not one file; fix: "
            f"--out {out.with_suffix('')} (a new folder), or one of the single-file specs: gguf:<type> (a .gguf "
            "file), fp8 (ComfyUI scaled fp8), bnb:nf4 / bnb:fp4 (Forge's layout)"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QuantError(
            f"--out {str(out)!r} already exists and is not an empty folder; fix: name a new folder"
        )


def _write_gguf(cls, folder: str, kind: str, spec, out: Path) -> int:
    from .backends.gguf import portable_config
    from .backends.gguf.writer import write_gguf
    from .components import _matches_full, default_excludes

    model = cls.from_pretrained(folder)
    # the family table's full-precision layers (families.py), as a quantize plan keeps them
    keep = default_excludes(model, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = write_gguf(
        str(out),
        model.state_dict(),
        spec.qtype.upper(),
        arch=cls.__name__,
        config=portable_config(model.config),
        keep_full_precision=lambda key, _t: _matches_full(key.rpartition(".")[0], keep),
    )
    print(f"wrote {out}: {len(written)} tensors ({_tally(written.values())})")
    return 0


def cmd_inspect(args) -> int:
    """What a checkpoint is, from its headers: GGUF tensor types and config, a safetensors file, or a
    (saved quantized) model folder."""
    from .detect import is_gguf_file

    path = args.path
    if not os.path.exists(path):
        raise QuantError(f"{path!r} does not exist; give a .gguf or .safetensors file, or a model folder")
    if is_gguf_file(path):
        return _inspect_gguf(path)
    if os.path.isdir(path):
        return _inspect_folder(path)
    from .detect import FORMATS, detect_file, read_safetensors_header

    detected = detect_file(path)
    if detected is None:
        raise QuantError(
            f"{path!r} is neither a GGUF nor a safetensors file (from its first bytes); inspect reads .gguf "
            "and .safetensors files and model folders"
        )
    from .backends import all_backends

    header = read_safetensors_header(path)
    print(f"safetensors: {len(header.tensors)} tensors, {os.path.getsize(path) / 2**20:.1f} MiB")
    print("dtypes: " + _tally(info.dtype for info in header.tensors.values()))
    if detected.format != "safetensors":
        state = "loaded as it is" if detected.loadable else "not loadable here"
        print(
            f"format: {detected.format}: {FORMATS[detected.format]}; {detected.layers} quantized layers; {state}"
        )
        if detected.detail:
            print(detected.detail)
        return 0
    found = {b.name: len(b.saved_layers(header.tensors)) for b in all_backends()}
    if any(found.values()):
        print("quantized layers: " + ", ".join(f"{k} x{v}" for k, v in sorted(found.items()) if v))
    else:
        print("no pre-quantized format recognised (plain checkpoint)")
    return 0


def _inspect_gguf(path: str) -> int:
    from .backends.gguf.keys import detect_key_format
    from .backends.gguf.reader import GGUFError, read_gguf

    try:
        f = read_gguf(path)
    except GGUFError as exc:
        raise QuantError(str(exc)) from None
    print(f"GGUF v{f.version}: {len(f.tensors)} tensors, {os.path.getsize(path) / 2**20:.1f} MiB")
    print(f"architecture: {f.architecture}; key format: {detect_key_format(f.names())}")
    print("types: " + _tally(info.type_name for info in f.tensors))
    print("embedded config: " + ("yes" if "diffusers_quant.config" in f.metadata else "no (pass config=)"))
    return 0


def _inspect_folder(path: str) -> int:
    from .saving import foreign_method, read_saved

    saved = read_saved(path)
    if saved:
        backends = sorted({e["backend"] for e in saved.layers.values()})
        print(
            f"quantized component ({saved.method} layout): {len(saved.layers)} quantized layers "
            f"({', '.join(backends)}), {len(saved.files)} weight file(s)"
        )
        return 0
    foreign = foreign_method(path)
    if foreign:
        print(
            f"quantized component (saved by {foreign}): diffusers / transformers load it through {foreign}; "
            "the hooks leave it as it is"
        )
        return 0
    if not any(os.path.isfile(os.path.join(path, n)) for n in ("config.json", "model_index.json")):
        raise QuantError(
            f"{path!r} has no config.json or model_index.json: it is not a model or pipeline folder"
        )
    print(f"{path}: no pre-quantized format recognised (plain model folder)")
    return 0


def _tally(values) -> str:
    """``F32 x3, Q8_0 x12``: how often each value occurs, sorted."""
    from collections import Counter

    return ", ".join(f"{k} x{v}" for k, v in sorted(Counter(values).items()))


def _at_least_one(text: str) -> int:
    # argparse turns this error into "argument --steps: ..." and exit code 2, before anything runs.
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _add_plan_args(
    p: argparse.ArgumentParser, default_quant: str | None = DEFAULT_QUANT, *, from_env: bool = False
) -> None:
    p.add_argument(
        "--quant",
        default=default_quant,
        required=default_quant is None and not from_env,
        help=f"plan, e.g. 'transformer=bnb:nf4,text_encoder_2=quanto:qint8' (default "
        f"{'$DIFFUSERS_QUANT, else ' if from_env else ''}{DEFAULT_QUANT})",
    )
    p.add_argument("--mode", choices=("auto", "on-load", "post-load"), default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: the plan's, else cpu)")
    p.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default bfloat16)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusers-quant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="load a pipeline quantized and generate an image")
    _add_plan_args(gen)
    gen.add_argument("--model", help="local pipeline folder or single file (default: the embedded demo)")
    gen.add_argument(
        "--demo", choices=("flux", "sd"), default="flux", help="which embedded demo (default flux)"
    )
    gen.add_argument(
        "--pipeline", help="pipeline class for a single-file --model, e.g. StableDiffusionPipeline"
    )
    gen.add_argument("--prompt", default="a photo of a red cat on a tree")
    gen.add_argument("--steps", type=_at_least_one, default=4)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--height", type=_at_least_one, help="pixels (default: 64 for the demos, else the pipeline's)"
    )
    gen.add_argument(
        "--width", type=_at_least_one, help="pixels (default: 64 for the demos, else the pipeline's)"
    )
    gen.add_argument("--out", default="diffusers-quant.png")
    gen.add_argument(
        "--no-compare",
        dest="compare",
        action="store_false",
        help="skip the full-precision run and the comparison sheet (<out>-compare.png) beside the image",
    )
    gen.set_defaults(func=cmd_generate)

    chk = sub.add_parser("check", help="check a plan against a pipeline without reading weights")
    _add_plan_args(chk)
    chk.add_argument("--model")
    chk.add_argument("--demo", choices=("flux", "sd"), default="flux")
    chk.set_defaults(func=cmd_check)

    qnt = sub.add_parser("quantize", help="quantize a component and write it (.gguf, or a saved folder)")
    qnt.add_argument("model", help="pipeline folder or model folder")
    qnt.add_argument(
        "--quant", required=True, help="one spec, e.g. gguf:q8_0 or nncf:int8; fp8: a ComfyUI scaled fp8 file"
    )
    qnt.add_argument(
        "--out", required=True, help="file.gguf for gguf specs, file.safetensors for fp8, else a new folder"
    )
    qnt.add_argument(
        "--component", help="which component of a pipeline folder (default: transformer or unet)"
    )
    qnt.add_argument("--dtype", default=None)
    qnt.set_defaults(func=cmd_quantize)

    ins = sub.add_parser("inspect", help="say what a checkpoint is, reading only its headers")
    ins.add_argument("path")
    ins.set_defaults(func=cmd_inspect)

    run = sub.add_parser(
        "run", help="run a diffusers app with the hooks installed (plan: --quant, else $DIFFUSERS_QUANT)"
    )
    _add_plan_args(run, default_quant=None, from_env=True)
    run.add_argument("-m", dest="module", default=None, help="run a module as __main__ (like python -m)")
    run.add_argument("script", nargs="?", default=None)
    run.add_argument("script_args", nargs=argparse.REMAINDER)
    run.set_defaults(func=cmd_run)

    auto = sub.add_parser(
        "autoload", help="install the hooks in every process of this environment where DIFFUSERS_QUANT is set"
    )
    auto.add_argument("action", choices=("enable", "disable", "status"))
    auto.set_defaults(func=cmd_autoload)
    return parser


_RUN_VALUE_OPTIONS = ("--quant", "--mode", "--device", "--dtype")


def _split_run(argv: list[str]) -> tuple[list[str], str | None, list[str], bool]:
    """``run``'s own options, then the app (a script, or ``-m module``) and everything after it, which is
    the app's argv untouched (its ``--flags`` too)."""
    own, i = [], 0
    while i < len(argv):
        token = argv[i]
        if token == "-m":
            return own, argv[i + 1] if i + 1 < len(argv) else None, argv[i + 2 :], True
        if token in _RUN_VALUE_OPTIONS:
            own += argv[i : i + 2]
            i += 2
        elif token.startswith("-"):
            own.append(token)  # --quant=..., -h, or a mistake argparse will name
            i += 1
        else:
            return own, token, argv[i + 1 :], False
    return own, None, [], False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        own, target, rest, module = _split_run(argv[1:])
        args = build_parser().parse_args(["run", *own])
        args.module, args.script, args.script_args = (target, None, rest) if module else (None, target, rest)
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QuantError as exc:
        print(f"diffusers-quant: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
