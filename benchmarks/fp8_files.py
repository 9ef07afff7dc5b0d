"""fp8 single files: this package's load (fp8 in memory) against plain diffusers' load of the same file.

    python benchmarks/fp8_files.py --device cuda --model flux-width --out benchmarks/results/nvidia-h200
    python benchmarks/fp8_files.py --device cpu --model flux-mini --out /tmp/fp8    # smoke test

One process, one seeded bf16 Flux-width transformer. It is written as a ComfyUI scaled fp8 file in Flux's
original key layout (``write_scaled_fp8``), then loaded with ``from_single_file`` twice: plain diffusers
(hooks off: every weight upcast to bf16 at load, the ``.scale_weight`` tensors ignored) and with the hooks
installed (float8 weights kept, the scales applied). Per row: load time, weight bytes on the device, GPU
peak during a step, step time, and the output error against the bf16 model the file was written from.
Writes fp8_files.json, fp8_files.md, fp8_files.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import MODELS, gpu_name, make_inputs  # noqa: E402
from offload import step as _step  # noqa: E402  (the same measured step as the offload benchmark)

import diffusers_quant  # noqa: E402
from diffusers_quant.fp8_files import write_scaled_fp8  # noqa: E402
from diffusers_quant.post_load import state_nbytes  # noqa: E402


def run(model_name: str, device: str, out: Path) -> dict:
    from diffusers import FluxTransformer2DModel

    defn = MODELS[model_name]
    torch.manual_seed(0)
    base = FluxTransformer2DModel(**defn.config).to(torch.bfloat16).eval()
    inputs = make_inputs(defn, defn.config, device)
    rows = []
    result = dict(
        model=model_name,
        about=defn.about,
        device=device,
        gpu=gpu_name() if device != "cpu" else None,
        rows=rows,
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "config"
        folder.mkdir()
        (folder / "config.json").write_text(
            json.dumps({"_class_name": "FluxTransformer2DModel", **dict(base.config)}, default=list)
        )
        path = Path(tmp) / "flux-fp8.safetensors"
        write_scaled_fp8(base, str(path))
        file_bytes = path.stat().st_size
        ref, ms, peak = _step(base.to(device), inputs, defn, device)
        rows.append(
            dict(row="bf16 model (the file's source)", weights=state_nbytes(base), step_ms=ms, gpu_peak=peak)
        )
        base.to("cpu")
        for label, hooks in (
            ("plain diffusers from_single_file", False),
            ("diffusers_quant from_single_file", True),
        ):
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            if hooks:
                diffusers_quant.install()
            start = time.perf_counter()
            model = FluxTransformer2DModel.from_single_file(
                str(path), config=str(folder), dtype=torch.bfloat16
            )
            model.to(device)
            load_s = time.perf_counter() - start
            diffusers_quant.uninstall()
            output, ms, peak = _step(model, inputs, defn, device)
            err = float((output - ref).norm() / ref.norm())
            rows.append(
                dict(
                    row=label, load_s=load_s, weights=state_nbytes(model), step_ms=ms, gpu_peak=peak, err=err
                )
            )
            print(label, json.dumps(rows[-1]), flush=True)
            model = None
    result["file_bytes"] = file_bytes
    return result


def markdown(result: dict) -> str:
    bf16 = result["rows"][0]
    lines = [
        f"fp8 single file on {result['gpu'] or result['device']}, model {result['model']} ({result['about']}); "
        f"file {result['file_bytes'] / 2**30:.2f} GiB (ComfyUI scaled fp8, original keys). err = output "
        "relative L2 against the bf16 model the file was written from.\n",
        "| load | load s | weights GiB | vs bf16 | GPU peak GiB | step ms | vs bf16 step | err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            "| {} | {} | {:.2f} | {:.2f} | {} | {:.1f} | {:.2f}x | {} |".format(
                r["row"],
                f"{r['load_s']:.1f}" if "load_s" in r else "-",
                r["weights"] / 2**30,
                r["weights"] / bf16["weights"],
                f"{r['gpu_peak'] / 2**30:.2f}" if r.get("gpu_peak") else "-",
                r["step_ms"],
                r["step_ms"] / bf16["step_ms"],
                f"{r['err']:.1e}" if "err" in r else "-",
            )
        )
    return "\n".join(lines) + "\n"


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [r["row"].replace(" from_single_file", "\nfrom_single_file") for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, key, title in zip(
        axes,
        ("weights", "step_ms", "err"),
        ("weight bytes (GiB)", "step (ms)", "output error vs bf16"),
        strict=True,
    ):
        values = [(r.get(key) or 0) / (2**30 if key == "weights" else 1) for r in rows]
        ax.bar(range(len(rows)), values)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"fp8 single file, {result['model']} on {result['gpu'] or result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="flux-width", choices=("flux-mini", "flux-width", "flux-full"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result = run(args.model, args.device, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fp8_files.json").write_text(json.dumps(result, indent=1))
    (args.out / "fp8_files.md").write_text(markdown(result))
    chart(result, args.out / "fp8_files.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
