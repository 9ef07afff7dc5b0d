"""Offload benchmark: every allowed (backend x offload) cell against the same backend fully resident.

    python benchmarks/offload.py --device cuda --out benchmarks/results/nvidia-h200   # flux-width
    python benchmarks/offload.py --device cpu --model tiny --out /tmp/offload          # smoke test

Per cell, in one process and on one model (seeded random weights at the benchmark model's shape): the step
time and its ratio to the resident step, the GPU peak during the step (allocator peak, everything resident
included) and its ratio to the component's stored bytes, the balanced budget where there is one, and the
output error against the resident output. The cells are the rules table's allowed cells for a transformer
on CUDA, so the benchmark and the table cannot drift apart. Writes offload.json, offload.md, offload.png.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import MODELS, gpu_name, make_inputs  # noqa: E402

import diffusers_quant  # noqa: E402
from diffusers_quant import offload  # noqa: E402
from diffusers_quant.rules import verdict  # noqa: E402
from diffusers_quant.spec import Plan, Spec  # noqa: E402

SPECS = ("bnb:nf4", "bnb:int8", "nncf:int4_sym", "gguf:q4_0", "quanto:qint8")
# (label, offload, settings). Balanced budgets: "half" = half the component (the GPU peak target); "half+block"
# = half plus the largest block, which accelerate's map keeps free for a streamed block, so about half the
# component stays on the CPU (the step-time target).
MODES = (
    ("model", "model", {}),
    ("sequential", "sequential", {}),
    ("balanced half", "balanced", {"budget": "half"}),
    ("balanced half on CPU", "balanced", {"budget": "half+block"}),
    ("group block", "group", {}),
    ("group block+stream", "group", {"stream": True}),
    ("group leaf+stream", "group", {"group_type": "leaf", "stream": True}),
)


def build(model_name: str, dtype=torch.bfloat16):
    from diffusers import FluxTransformer2DModel

    defn = MODELS[model_name]
    torch.manual_seed(0)
    # "tiny": Flux's real head width at toy depth and text width (a CPU smoke test of the harness).
    tiny = dict(in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=128)
    tiny.update(num_attention_heads=6, joint_attention_dim=768, pooled_projection_dim=256)
    config = dict(defn.config) if defn.config is not None else dict(tiny, axes_dims_rope=[16, 56, 56])
    with torch.device("cpu"):
        model = FluxTransformer2DModel(**config).to(dtype)
    return model.eval(), defn, config


def quantized(base, spec, device):
    model = copy.deepcopy(base)
    diffusers_quant.quantize(model, spec, kind="transformer", device=device)
    return model


def step(model, inputs, defn, device):
    """Median step time (ms, host clock around a synchronised step: offload hooks run on the host) and the
    GPU allocator peak during the measured steps (everything resident included)."""
    cuda = device.startswith("cuda")
    times = []
    with torch.no_grad():
        for _ in range(defn.warmup):
            out = model(**inputs, return_dict=False)[0]
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(defn.steps):
            start = time.perf_counter()
            out = model(**inputs, return_dict=False)[0]
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return out.float().cpu(), sorted(times)[len(times) // 2], peak


def _budget(kind: str | None, stored: int, largest: int) -> float | None:
    """The balanced budget in GiB for a MODES budget kind."""
    if kind is None:
        return None
    return (stored / 2 + (largest if kind == "half+block" else 0)) / 2**30


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())


def run(model_name: str, device: str, specs, modes, out: Path) -> dict:
    base, defn, config = build(model_name)
    inputs = make_inputs(defn, config, device)
    rows = []
    result = dict(
        model=model_name,
        about=defn.about,
        device=device,
        gpu=gpu_name() if device.startswith("cuda") else None,
        torch=torch.__version__,
        rows=rows,
    )
    out.mkdir(parents=True, exist_ok=True)
    for text in specs:
        spec = Spec.parse(text)
        resident = quantized(base, spec, device)
        sizes = offload.module_sizes(resident)
        stored, (_, largest) = sizes[""], offload.largest_block(resident, sizes)
        ref, ref_ms, ref_peak = step(resident, inputs, defn, device)
        rows.append(dict(spec=text, mode="resident", step_ms=ref_ms, gpu_peak=ref_peak, stored=stored))
        print(
            f"{text:15} resident            {ref_ms:8.1f} ms  peak {ref_peak / 2**30 if ref_peak else 0:.2f} GiB",
            flush=True,
        )
        del resident
        for label, mode, settings in modes:
            if not verdict(spec, "transformer", mode, "cuda").allowed:
                continue
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            settings = dict(settings)
            budget = _budget(settings.pop("budget", None), stored, largest)
            plan = Plan(offload=mode, device=device, gpu_memory=budget, **settings)
            row = dict(spec=text, mode=label, stored=stored, budget=budget and int(budget * 2**30))
            try:
                # Quantized on the GPU, then resting on the CPU as an offloaded load leaves it.
                model = quantized(base, spec, device).to("cpu")
                offload.offload_ready(model)
                device_map = offload.place_model(model, plan, "transformer")
                output, ms, peak = step(model, inputs, defn, device)
                row.update(step_ms=ms, gpu_peak=peak, vs_resident=ms / ref_ms, err=rel_err(output, ref))
                if device_map is not None:
                    row["on_cpu"] = device_map.bytes_on.get("cpu", 0) / stored
                if peak is not None:
                    row["peak_vs_stored"] = peak / stored
                    if budget:
                        row["peak_vs_budget"] = peak / (budget * 2**30)
            except Exception as e:  # a cell that fails is a result: recorded, never hidden
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            (out / "offload.json").write_text(json.dumps(result, indent=1))  # kept if a later cell hangs
            print(
                f"{text:15} {label:19} {json.dumps({k: v for k, v in row.items() if k not in ('spec', 'mode')})}",
                flush=True,
            )
            model = None
    return result


def markdown(result: dict) -> str:
    head = (
        f"Offload on {result['gpu'] or result['device']}, model {result['model']} ({result['about']}); "
        "step = median of the measured steps; GPU peak = allocator peak during the steps (resident parts "
        "and activations included); stored = the quantized transformer's bytes.\n\n"
        "weights at peak = GPU peak minus the activations and workspace the same spec needs fully resident "
        "(its resident peak minus its stored bytes, measured in this run): the part a budget governs. "
        "on CPU = the share of the stored bytes the balanced map leaves on the CPU (streamed in each step).\n\n"
        "| spec | offload | step ms | vs resident | GPU peak GiB | peak / stored | budget GiB | "
        "weights at peak / budget | on CPU | rel err |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    activations = {
        r["spec"]: r["gpu_peak"] - r["stored"]
        for r in result["rows"]
        if r["mode"] == "resident" and r.get("gpu_peak")
    }
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['spec']} | {r['mode']} | failed: {r['error']} | | | | | | | |")
            continue
        peak, budget = r.get("gpu_peak"), r.get("budget")
        weights_vs_budget = (peak - activations[r["spec"]]) / budget if peak and budget else None
        lines.append(
            "| {} | {} | {:.1f} | {} | {} | {} | {} | {} | {} | {} |".format(
                r["spec"],
                r["mode"],
                r["step_ms"],
                f"{r['vs_resident']:.2f}x" if "vs_resident" in r else "1.00x",
                f"{peak / 2**30:.2f}" if peak else "-",
                f"{peak / r['stored']:.2f}" if peak else "-",
                f"{budget / 2**30:.2f}" if budget else "-",
                f"{weights_vs_budget:.2f}" if weights_vs_budget is not None else "-",
                f"{r['on_cpu']:.2f}" if "on_cpu" in r else "-",
                f"{r['err']:.1e}" if "err" in r else "-",
            )
        )
    return "\n".join(lines) + "\n"


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r and r["mode"] != "resident"]
    labels = [f"{r['spec']}\n{r['mode']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, len(rows) * 0.7), 5))
    axes[0].bar(range(len(rows)), [r["vs_resident"] for r in rows])
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_ylabel("step time / resident step")
    if all(r.get("gpu_peak") for r in rows):
        axes[1].bar(range(len(rows)), [r["gpu_peak"] / r["stored"] for r in rows])
        axes[1].set_ylabel("GPU peak during the step / stored bytes")
    for ax in axes:
        ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
    fig.suptitle(f"diffusers_quant offload, {result['model']} on {result['gpu'] or result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="flux-width", choices=sorted(MODELS))
    parser.add_argument("--specs", default=",".join(SPECS))
    parser.add_argument(
        "--modes",
        default=",".join(label for label, _, _ in MODES),
        help="labels of MODES to run, comma-separated",
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--render", action="store_true", help="rewrite the table and chart from OUT/offload.json"
    )
    args = parser.parse_args(argv)
    if args.render:
        result = json.loads((args.out / "offload.json").read_text())
    else:
        labels = args.modes.split(",")
        unknown = sorted(set(labels) - {label for label, _, _ in MODES})
        if unknown:
            parser.error(f"unknown modes {unknown}; expected labels from {[label for label, _, _ in MODES]}")
        modes = [m for m in MODES if m[0] in labels]
        result = run(args.model, args.device, args.specs.split(","), modes, args.out)
    (args.out / "offload.json").write_text(json.dumps(result, indent=1))
    (args.out / "offload.md").write_text(markdown(result))
    chart(result, args.out / "offload.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
