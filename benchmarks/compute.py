"""compute=fp8 / int8 (W8A8 matmuls) against weight-only quanto and bf16, eager and compiled, in one run.

    python benchmarks/compute.py --device cuda --out benchmarks/results/nvidia-h200

The flux-width transformer (3 + 6 blocks at Flux's width, 1.93 B parameters, random weights) at 1024x1024
(4096 image + 512 text tokens), one denoising step. Rows: bf16; plain optimum-quanto (``quantize`` +
``freeze``, what diffusers' ``QuantoConfig`` does); this package's quanto layers weight-only; the same with
``compute=fp8`` / ``compute=int8``; its bitsandbytes int8 and NNCF int8_sym layers (``ours-bnb:int8``,
``ours-nncf:int8_sym``) weight-only and with ``compute=int8``. Each eager and with diffusers' regional compilation
(``compile_repeated_blocks``: the two block classes compiled once each). Reported: median step time and
its ratio to bf16 eager and to bf16 compiled, the weights' bytes, the GPU peak, and the output's rel-L2
error against bf16 eager. Writes compute.json, compute.md and compute.png.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import diffusers_quant  # noqa: E402
from diffusers_quant.compute import enable_compute  # noqa: E402

CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=3,
    num_single_layers=6,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=False,
    axes_dims_rope=[16, 56, 56],
)
IMG, TXT = 4096, 512


def inputs(device, dtype, img=IMG, txt=TXT, width=64, joint=4096, pooled=768):
    gen = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(1, img, width, generator=gen).to(device, dtype),
        encoder_hidden_states=torch.randn(1, txt, joint, generator=gen).to(device, dtype),
        pooled_projections=torch.randn(1, pooled, generator=gen).to(device, dtype),
        timestep=torch.tensor([0.5], device=device, dtype=dtype),
        img_ids=torch.zeros(img, 3, device=device),
        txt_ids=torch.zeros(txt, 3, device=device),
        return_dict=False,
    )


def step_ms(model, args, device, warmup=3, n=10) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        for _ in range(warmup):
            out = model(**args)[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            out = model(**args)[0]
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[n // 2], out.float()


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def build(kind: str, base, device):
    """One row's model: a deep copy of ``base`` made what ``kind`` says."""
    model = copy.deepcopy(base)
    if kind == "bf16":
        return model
    backend, _, rest = kind.partition(":")
    if backend == "plain-quanto":
        from optimum.quanto import freeze, qfloat8, qint8, quantize

        quantize(model, weights={"qfloat8": qfloat8, "qint8": qint8}[rest])
        freeze(model)
        return model
    qtype, _, compute = rest.partition("+")
    library = {"ours-bnb": "bnb", "ours-nncf": "nncf"}.get(backend, "quanto")
    diffusers_quant.quantize(model, f"{library}:{qtype}", kind="transformer", device=str(device))
    if compute:
        switched = enable_compute(model, compute, device)
        assert switched > 0, kind
    return model


ROWS = (
    "bf16",
    "plain-quanto:qfloat8",
    "ours:qfloat8",
    "ours:qfloat8+fp8",
    "plain-quanto:qint8",
    "ours:qint8",
    "ours:qint8+int8",
    "ours-bnb:int8",
    "ours-bnb:int8+int8",
    "ours-nncf:int8_sym",
    "ours-nncf:int8_sym+int8",
)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiny", action="store_true", help="a small model (a CPU check of the script)")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--no-compile", action="store_true")
    a = parser.parse_args()
    device = torch.device(a.device)
    from diffusers import FluxTransformer2DModel

    config = dict(CONFIG)
    shapes = {}
    if a.tiny:
        config.update(num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=4)
        config.update(joint_attention_dim=128, pooled_projection_dim=64, axes_dims_rope=[8, 12, 12])
        shapes = dict(img=256, txt=32, joint=128, pooled=64)
    torch.manual_seed(0)
    with torch.device(device):
        base = FluxTransformer2DModel.from_config(config).to(torch.bfloat16).eval()
    args = inputs(device, torch.bfloat16, **shapes)
    results, reference = [], None
    for kind in a.rows.split(","):
        for compiled in (False,) if a.no_compile else (False, True):
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            model = build(kind, base, device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            try:
                if compiled:
                    model.compile_repeated_blocks(fullgraph=False)
                ms, out = step_ms(model, args, device)
            except Exception as e:  # a row that cannot run (quanto's Marlin fp8 under compile): say so
                results.append(dict(row=kind, compiled=compiled, error=f"{type(e).__name__}: {str(e)[:160]}"))
                print(json.dumps(results[-1]), flush=True)
                del model
                torch._dynamo.reset()
                continue
            first = time.perf_counter() - t0
            if reference is None:
                reference = out
            row = dict(
                row=kind,
                compiled=compiled,
                step_ms=ms,
                weights_gib=weight_bytes(model) / 2**30,
                gpu_peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                rel_l2=float((out - reference).norm() / reference.norm()),
                warmup_and_timing_s=first,
            )
            results.append(row)
            print(json.dumps(row), flush=True)
            del model, out
            if a.out:  # after every row: a run cut short still leaves its figures
                write(summary(results, device, a, args), Path(a.out))
    return 0


def summary(results: list[dict], device, a, args) -> dict:
    bf16 = {r["compiled"]: r["step_ms"] for r in results if r["row"] == "bf16" and "step_ms" in r}
    for r in results:
        if "step_ms" not in r:
            continue
        r["vs_bf16_eager"] = r["step_ms"] / bf16[False] if False in bf16 else None
        r["vs_bf16_compiled"] = r["step_ms"] / bf16[True] if True in bf16 else None
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return dict(
        machine=machine,
        torch=torch.__version__,
        model="flux-width (3 + 6 blocks, 1.93 B)" if not a.tiny else "tiny",
        tokens=f"{args['hidden_states'].shape[1]} + {args['encoder_hidden_states'].shape[1]}",
        rows=results,
    )


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "compute.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# compute=fp8 / int8 vs weight-only, {report['machine']}, torch {report['torch']}",
        "",
        f"Model: {report['model']}, tokens {report['tokens']}, one step, median of 10 after 3 warm-up steps.",
        "",
        "| row | compiled | step ms | vs bf16 eager | vs bf16 compiled | weights GiB | GPU peak GiB | rel-L2 vs bf16 |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in report["rows"]:
        if "step_ms" not in r:
            error = " ".join(r["error"].split())[:70]
            lines.append(f"| {r['row']} | {'yes' if r['compiled'] else 'no'} | failed: {error} |||||")
            continue
        lines.append(
            f"| {r['row']} | {'yes' if r['compiled'] else 'no'} | {r['step_ms']:.2f} | "
            f"{f(r['vs_bf16_eager'], '.3f')}x | {f(r['vs_bf16_compiled'], '.3f')}x | {r['weights_gib']:.2f} | "
            f"{f(r['gpu_peak_gib'], '.2f')} | {r['rel_l2']:.2e} |"
        )
    (out / "compute.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(10, 4.5))
    rows = [r for r in report["rows"] if "step_ms" in r]
    names = [f"{r['row']}{' (compiled)' if r['compiled'] else ''}" for r in rows]
    values = [r["vs_bf16_eager"] or 0 for r in rows]
    ax.barh(names, values, color=["#888" if r["row"] == "bf16" else "#3a7" for r in rows])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("step time / bf16 eager (lower is faster)")
    ax.set_title(f"W8A8 compute vs weight-only, {report['model']}, {report['machine']}")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "compute.png", dpi=110)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rewrite"]:  # the table and chart again from a committed compute.json
        folder = Path(sys.argv[2])
        write(json.loads((folder / "compute.json").read_text()), folder)
        raise SystemExit(0)
    raise SystemExit(main())
