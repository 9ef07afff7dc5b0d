"""Multi-GPU benchmark (issue 17): one quantized transformer on one GPU against offload=balanced over two.

    python benchmarks/multi_gpu.py --out benchmarks/results/nvidia-h200-x2         # two GPUs, flux-width
    python benchmarks/multi_gpu.py --dry-run --model tiny --out /tmp/multi-gpu     # CPU: the harness only

Per spec (bnb nf4 and nncf int8 by default), on one model (benchmarks/offload.py's ``build``: seeded
weights at the benchmark model's shape), three placements: fully resident on GPU 0; offload=balanced over
GPU 0 and GPU 1 with a budget of the whole component on each (accelerate's balanced split halves it);
and with 0.6 of the component (at least 1.3 blocks) on each, which the map must keep to. Per placement:
the median step time (bench.py's ``time_steps``) and its ratio to one GPU, each GPU's allocator peak over
the steps and its weights after placement, the planned bytes per device, and the output error against one
GPU. Writes multi_gpu.json and multi_gpu.md into --out.

``--dry-run`` runs every placement on the CPU, which stands in for each GPU (the map, accelerate's hooks and
diffusers' groups all run; no peaks): a check of the harness, not a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import MODELS, gpu_name, make_inputs, time_steps  # noqa: E402
from offload import build, quantized, rel_err  # noqa: E402  (benchmarks/offload.py)

from diffusers_quant import offload  # noqa: E402
from diffusers_quant.spec import Plan  # noqa: E402

SPECS = ("bnb:nf4", "nncf:int8")
# (label, GiB budget per GPU from the stored bytes and the largest block); None: resident on one GPU
PLACEMENTS = (
    ("one GPU", None),
    ("two GPUs, even", lambda stored, block: stored),
    ("two GPUs, 0.6 each", lambda stored, block: max(0.6 * stored, 1.3 * block)),
)
GiB = 2**30


def _gpus(dry_run: bool) -> list[int]:
    return [0, 1] if dry_run else list(range(torch.cuda.device_count()))


def _measure(model, inputs: dict, defn, device: str, gpus: list[int]) -> tuple[torch.Tensor, dict]:
    """bench.py's step timing, with each GPU's resident bytes before and allocator peak over the steps."""
    cuda = device == "cuda"
    if cuda:
        for i in gpus:
            torch.cuda.synchronize(i)
            torch.cuda.reset_peak_memory_stats(i)
    resident = {f"cuda:{i}": torch.cuda.memory_allocated(i) for i in gpus} if cuda else None
    out, figures = time_steps(model, inputs, defn, device)
    if cuda:
        for i in gpus:
            torch.cuda.synchronize(i)
    peaks = {f"cuda:{i}": torch.cuda.max_memory_allocated(i) for i in gpus} if cuda else None
    return out, {"step_ms": figures["step_ms"], "resident": resident, "peak": peaks}


def run(model_name: str, specs, out: Path, dry_run: bool) -> dict:
    device = "cpu" if dry_run else "cuda"
    gpus = _gpus(dry_run)
    base, defn, config = build(model_name)
    if dry_run:  # one step each: the harness, not a measurement
        defn = dataclasses.replace(defn, warmup=0, steps=1, img_tokens=16, txt_tokens=8)
    inputs = make_inputs(defn, config, device)
    rows: list[dict] = []
    result = dict(
        model=model_name,
        about=defn.about,
        dry_run=dry_run,
        gpu=None if dry_run else gpu_name(),
        gpus=len(gpus),
        torch=torch.__version__,
        rows=rows,
    )
    out.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        reference, one_ms = None, None
        for label, budget_of in PLACEMENTS:
            gc.collect()
            if not dry_run:
                torch.cuda.empty_cache()
            row: dict = dict(spec=spec, placement=label)
            try:
                model = quantized(base, spec, device)  # quantized on GPU 0 (on the CPU in a dry run)
                sizes = offload.module_sizes(model)
                stored, (_, block) = sizes[""], offload.largest_block(model, sizes)
                row.update(stored=stored, largest_block=block)
                if budget_of is not None:
                    each = budget_of(stored, block)
                    budgets = "|".join(f"{i}:{each / GiB:.6f}" for i in (0, 1))
                    plan = Plan(offload="balanced", device="cpu" if dry_run else "cuda:0", max_memory=budgets)
                    model = model.to("cpu")  # resting on the CPU, as an offloaded load leaves it
                    device_map = offload.place_model(model, plan, "transformer")
                    row.update(budget_per_gpu=plan.max_memory_bytes()[0], planned=device_map.bytes_on)
                    row.update(max_memory=plan.max_memory)
                output, figures = _measure(model, inputs, defn, device, gpus)
                row.update(figures)
                if reference is None:
                    reference, one_ms = output, figures["step_ms"]
                row.update(vs_one_gpu=figures["step_ms"] / one_ms, err=rel_err(output, reference))
            except Exception as e:  # a placement that fails is a result: recorded, never hidden
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            (out / "multi_gpu.json").write_text(json.dumps(result, indent=1))  # kept if a later one hangs
            print(
                f"{spec:10} {label:20} {json.dumps({k: v for k, v in row.items() if k not in ('spec', 'placement')})}",
                flush=True,
            )
            model = None
    return result


def _gib(n) -> str:
    return f"{n / GiB:.2f}" if n is not None else "-"


def markdown(result: dict) -> str:
    where = (
        "the CPU standing in for each GPU (dry run: no peaks, not a measurement)"
        if result["dry_run"]
        else (f"{result['gpus']} x {result['gpu']}")
    )
    lines = [
        f"Multi-GPU offload=balanced on {where}; model {result['model']} ({result['about']}); torch "
        f"{result['torch']}. step = median of the measured steps (bench.py's time_steps); peak = each GPU's "
        "allocator peak over the steps (weights, activations and workspace); weights = what each GPU held "
        "after placement; planned = the balanced map's bytes per device; err = output rel. L2 against one GPU.",
        "",
        "| spec | placement | budget / GPU GiB | step ms | vs one GPU | GPU 0 peak GiB | GPU 1 peak GiB | "
        "GPU 0 weights GiB | GPU 1 weights GiB | planned GiB (0 / 1 / cpu) | err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['spec']} | {r['placement']} | failed: {r['error']} | | | | | | | | |")
            continue
        peak, resident, planned = r.get("peak") or {}, r.get("resident") or {}, r.get("planned")
        plan_text = (
            " / ".join(_gib(planned.get(d, 0)) for d in ("cuda:0", "cuda:1", "cpu")) if planned else "-"
        )
        lines.append(
            "| {} | {} | {} | {:.1f} | {:.2f}x | {} | {} | {} | {} | {} | {:.1e} |".format(
                r["spec"],
                r["placement"],
                _gib(r.get("budget_per_gpu")),
                r["step_ms"],
                r["vs_one_gpu"],
                _gib(peak.get("cuda:0")),
                _gib(peak.get("cuda:1")),
                _gib(resident.get("cuda:0")),
                _gib(resident.get("cuda:1")),
                plan_text,
                r["err"],
            )
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flux-width", choices=sorted(MODELS))
    parser.add_argument("--specs", default=",".join(SPECS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, standing in for each GPU")
    args = parser.parse_args(argv)
    if not args.dry_run and torch.cuda.device_count() < 2:
        print(
            f"benchmarks/multi_gpu.py needs two CUDA devices; this machine has {torch.cuda.device_count()}. "
            "Run it on the two-GPU machine, or with --dry-run (CPU, the harness only).",
            file=sys.stderr,
        )
        return 2
    result = run(args.model, args.specs.split(","), args.out, args.dry_run)
    (args.out / "multi_gpu.json").write_text(json.dumps(result, indent=1))
    (args.out / "multi_gpu.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if all("error" not in r for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
