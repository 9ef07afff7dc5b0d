"""``diffusers-quant`` command line: generate | check | quantize | inspect | run."""

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


def _model_path(args) -> tuple[str, bool]:
    """The pipeline to load, and whether it is the embedded demo."""
    if args.model:
        if not os.path.exists(args.model):
            raise QuantError(
                f"--model {args.model!r} does not exist; give a local pipeline folder or a single file"
            )
        return args.model, False
    from .demo import demo_path

    return str(demo_path(args.demo)), True


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
    from . import install
    from .demo import generate_kwargs

    plan = _plan(args)
    path, is_demo = _model_path(args)
    install()
    start = time.perf_counter()
    pipe = _load_pipeline(path, plan, args.pipeline)
    load_seconds = time.perf_counter() - start
    print(pipe.quant_report)
    print(f"load time: {load_seconds:.2f}s")
    size = (
        {"height": args.height or 64, "width": args.width or 64}
        if is_demo
        else {"height": args.height, "width": args.width}
    )
    kwargs = generate_kwargs(pipe, prompt=args.prompt, steps=args.steps, seed=args.seed, **size)
    image = pipe(**kwargs).images[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"wrote {out.resolve()}")
    return 0


def cmd_check(args) -> int:
    """Say whether a plan can run on a pipeline, reading no weights."""
    from .hooks import _pipeline_components
    from .rules import problems

    plan = _plan(args)
    path, _ = _model_path(args)
    components = _pipeline_components(object, path, {})
    found = problems(plan, components, whole_pipeline=True)
    for c in components:
        spec = plan.spec_for(c.name, c.kind)
        print(f"{c.name:16} {c.kind:13} {spec or '-'}")
    if found:
        print("refused:\n" + "\n".join(f"  - {p}" for p in found))
        return 1
    print(f"ok: {plan}")
    return 0


def cmd_run(args) -> int:
    """Run a Python script with the hooks installed and the plan in force."""
    import runpy

    from . import install

    install(_plan(args))
    sys.argv = [args.script, *args.script_args]
    runpy.run_path(args.script, run_name="__main__")
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
    """Quantize one component and write it: a .gguf file for gguf specs, else a saved folder."""
    import torch

    from .spec import Spec

    spec = Spec.parse(args.quant)
    if not os.path.exists(args.model):
        raise QuantError(f"{args.model!r} does not exist; give a pipeline folder or a model folder")
    folder, name = _component_folder(args.model, args.component)
    cls = _model_class(folder)
    from .components import kind_of_class

    kind = kind_of_class(cls)
    if spec.backend == "gguf":
        from .backends import get_backend
        from .backends.gguf import portable_config
        from .backends.gguf.writer import write_gguf
        from .components import DEFAULT_EXCLUDE, Component, _matches_full
        from .rules import enforce
        from .spec import Plan

        enforce(Plan(entries=((name, spec),)), [Component(name, kind)])

        get_backend("gguf").require()
        model = cls.from_pretrained(folder)
        keep = DEFAULT_EXCLUDE.get(kind, ())
        written = write_gguf(
            args.out,
            model.state_dict(),
            spec.qtype.upper(),
            arch=cls.__name__,
            config=portable_config(model.config),
            keep_full_precision=lambda key, _t: _matches_full(key.rpartition(".")[0], keep),
        )
        counts: dict[str, int] = {}
        for t in written.values():
            counts[t] = counts.get(t, 0) + 1
        print(
            f"wrote {args.out}: {len(written)} tensors ({', '.join(f'{k} x{v}' for k, v in sorted(counts.items()))})"
        )
        return 0
    from . import install, save_quantized
    from .spec import Plan

    install()
    plan = Plan(entries=((name, spec),), mode="auto")
    model = cls.from_pretrained(folder, dtype=getattr(torch, args.dtype or "bfloat16"), quant=plan)
    print(model.quant_report)
    print(f"wrote {save_quantized(model, args.out)}")
    return 0


def cmd_inspect(args) -> int:
    """What a checkpoint is, from its headers: GGUF tensor types and config, or a saved quantized folder."""
    from .detect import is_gguf_file

    if is_gguf_file(args.path):
        from .backends.gguf.keys import detect_key_format
        from .backends.gguf.reader import GGUFError, read_gguf

        try:
            f = read_gguf(args.path)
        except GGUFError as exc:
            raise QuantError(str(exc)) from None
        counts: dict[str, int] = {}
        for info in f.tensors:
            counts[info.type_name] = counts.get(info.type_name, 0) + 1
        print(f"GGUF v{f.version}: {len(f.tensors)} tensors, {os.path.getsize(args.path) / 2**20:.1f} MiB")
        print(f"architecture: {f.architecture}; key format: {detect_key_format(f.names())}")
        print("types: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
        print(
            "embedded config: " + ("yes" if "diffusers_quant.config" in f.metadata else "no (pass config=)")
        )
        return 0
    from .saving import read_saved

    saved = read_saved(args.path) if os.path.isdir(args.path) else None
    if saved:
        backends = sorted({e["backend"] for e in saved.layers.values()})
        print(
            f"quantized component ({saved.method} layout): {len(saved.layers)} quantized layers "
            f"({', '.join(backends)}), {len(saved.files)} weight file(s)"
        )
        return 0
    print(f"{args.path}: no pre-quantized format recognised (plain checkpoint)")
    return 0


def _add_plan_args(p: argparse.ArgumentParser, default_quant: str | None = DEFAULT_QUANT) -> None:
    p.add_argument(
        "--quant",
        default=default_quant,
        required=default_quant is None,
        help=f"plan, e.g. 'transformer=bnb:nf4,text_encoder_2=quanto:qint8' (default {DEFAULT_QUANT})",
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
    gen.add_argument("--steps", type=int, default=4)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--out", default="diffusers-quant.png")
    gen.set_defaults(func=cmd_generate)

    chk = sub.add_parser("check", help="check a plan against a pipeline without reading weights")
    _add_plan_args(chk)
    chk.add_argument("--model")
    chk.add_argument("--demo", choices=("flux", "sd"), default="flux")
    chk.set_defaults(func=cmd_check)

    qnt = sub.add_parser("quantize", help="quantize a component and write it (.gguf, or a saved folder)")
    qnt.add_argument("model", help="pipeline folder or model folder")
    qnt.add_argument("--quant", required=True, help="one spec, e.g. gguf:q8_0 or nncf:int8")
    qnt.add_argument("--out", required=True, help="file.gguf for gguf specs, else a new folder")
    qnt.add_argument(
        "--component", help="which component of a pipeline folder (default: transformer or unet)"
    )
    qnt.add_argument("--dtype", default=None)
    qnt.set_defaults(func=cmd_quantize)

    ins = sub.add_parser("inspect", help="say what a checkpoint is, reading only its headers")
    ins.add_argument("path")
    ins.set_defaults(func=cmd_inspect)

    run = sub.add_parser("run", help="run a diffusers app with the hooks installed")
    _add_plan_args(run, default_quant=None)
    run.add_argument("script")
    run.add_argument("script_args", nargs=argparse.REMAINDER)
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QuantError as exc:
        print(f"diffusers-quant: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
