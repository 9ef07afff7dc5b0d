"""The compatibility table, as data, and the checker it drives.

A cell is (backend, qtype) x component kind x offload mode x device.  ``RULES`` is read top to bottom and
the first row that matches a cell decides it; the last row refuses everything else as "not supported
yet", so nothing is silently allowed.  The checker, the README table (``python -m diffusers_quant.rules``),
the CLI ``check`` command and the parametrized tests are all generated from this one list.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .components import Component
from .errors import PlanRefused
from .spec import KINDS, OFFLOADS, Plan, Spec, pattern_matches

DEVICES = ("cpu", "cuda")
QUANTIZABLE = "transformer|unet|text_encoder|controlnet"
# Kinds the GPU tests run through a pipeline with each offload mode (a ControlNet needs its own pipeline).
OFFLOADED = "transformer|unet|text_encoder"


@dataclass(frozen=True)
class Rule:
    """One row. Fields are fnmatch patterns; '|' separates alternatives."""

    backend: str = "*"
    qtype: str = "*"
    kind: str = "*"
    offload: str = "*"
    device: str = "*"
    allowed: bool = False
    reason: str = ""
    fix: str = ""

    def matches(self, backend: str, qtype: str, kind: str, offload: str, device: str) -> bool:
        values = (backend, qtype, kind, offload, device)
        fields = (self.backend, self.qtype, self.kind, self.offload, self.device)
        return all(
            any(fnmatch.fnmatchcase(v, alt) for alt in f.split("|"))
            for v, f in zip(values, fields, strict=True)
        )


RULES: tuple[Rule, ...] = (
    Rule(
        backend="gguf",
        kind="text_encoder|vae|controlnet",
        reason="GGUF files (and GGUF quantization) are for the transformer/UNet component only",
        fix="quantize text encoders with bnb, quanto or nncf",
    ),
    Rule(
        kind="vae",
        reason="VAE weights are mostly convolutions and quality-sensitive: quantizing them saves "
        "little memory and shows as artefacts",
        fix="leave the VAE out of the plan (or vae=none)",
    ),
    Rule(
        kind="other",
        reason="this component is neither a transformer, UNet, ControlNet nor text encoder",
        fix="quantize the transformer/UNet and text encoders only",
    ),
    Rule(
        device="mps|xpu|npu|hpu",
        reason="no tested kernels for this device",
        fix="use device=cpu or device=cuda",
    ),
    Rule(
        offload="model|sequential|balanced|group",
        device="cpu",
        reason="offloading moves weights between the CPU and an accelerator; with device=cpu there is nothing "
        "to offload",
        fix="use offload=none on the CPU, or device=cuda",
    ),
    Rule(
        backend="bnb",
        qtype="nf4|fp4",
        offload="sequential",
        reason="sequential offload re-creates bnb 4-bit weights on every move and fails with 'Blockwise "
        "quantization only supports 16/32-bit floats'",
        fix="use offload=model",
    ),
    Rule(
        backend="quanto",
        offload="sequential",
        reason="sequential offload rebuilds quanto tensors through accelerate and fails with "
        "'QBytesTensor.__new__() missing 5 required positional arguments'",
        fix="use offload=model",
    ),
    Rule(
        backend="quanto",
        offload="balanced",
        reason="balanced offload is allowed only for bnb and NNCF; quanto layers split across devices fail with "
        "'Expected all tensors to be on the same device'",
        fix="use offload=model, or a bnb/nncf spec",
    ),
    Rule(
        backend="quanto",
        offload="group",
        reason="diffusers' group offload moves a weight by assigning its .data, which for a tensor subclass "
        "replaces only the outer tensor (diffusers swaps tensors for torchao's subclasses only), leaving a quanto "
        "weight's packed data and scales behind (diffusers #12610)",
        fix="use offload=model, or a bnb/nncf/gguf spec with offload=group",
    ),
    Rule(
        backend="gguf",
        offload="balanced",
        reason="balanced offload is allowed only for bnb and NNCF",
        fix="use offload=model or offload=group for a GGUF transformer",
    ),
    Rule(backend="bnb|quanto|nncf", kind=QUANTIZABLE, offload="none", device="cpu|cuda", allowed=True),
    Rule(backend="gguf", kind="transformer|unet", offload="none", device="cpu|cuda", allowed=True),
    # Every offload cell below is run on CUDA by tests/test_rules.py::test_every_allowed_cuda_cell_runs (a
    # whole pipeline generating, compared with the same spec fully resident) and, for a transformer, by
    # benchmarks/offload.py; the packed layers move as they are (bitsandbytes' scales become buffers for it).
    Rule(
        backend="gguf", kind="transformer|unet", offload="model|sequential|group", device="cuda", allowed=True
    ),
    Rule(backend="bnb|quanto|nncf", kind=QUANTIZABLE, offload="model", device="cuda", allowed=True),
    Rule(backend="bnb|nncf", kind=OFFLOADED, offload="balanced|group", device="cuda", allowed=True),
    Rule(backend="bnb", qtype="int8", kind=OFFLOADED, offload="sequential", device="cuda", allowed=True),
    Rule(backend="nncf", kind=OFFLOADED, offload="sequential", device="cuda", allowed=True),
    Rule(
        reason="not supported yet (no test runs this combination)",
        fix="use offload=none or offload=model, on device=cpu or device=cuda",
    ),
)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str = ""
    fix: str = ""


def device_type(device: str) -> str:
    return str(device).split(":", 1)[0].lower()


def verdict(spec: Spec, kind: str, offload: str, device: str) -> Verdict:
    dev = device_type(device)
    for rule in RULES:
        if rule.matches(spec.backend, spec.qtype, kind, offload, dev):
            return Verdict(rule.allowed, rule.reason, rule.fix)
    raise AssertionError("RULES must end with a catch-all row")  # internal invariant, not user input


def problems(
    plan: Plan,
    components: Iterable[Component],
    *,
    whole_pipeline: bool = False,
    passed: Iterable[Component] = (),
) -> list[str]:
    """Every reason ``plan`` cannot run on these components; empty when it can.

    ``whole_pipeline``: the components are a pipeline's (kind words are then component names).
    ``passed``: components the caller passed in already loaded (a pattern matching one is not unused)."""
    from .backends import get_backend
    from .backends.gguf import is_file_spec

    components = list(components)
    found: list[str] = []
    dev = device_type(plan.device)
    if dev == "cuda":
        import torch

        if not torch.cuda.is_available():
            found.append("device=cuda was asked for but no CUDA device is available; fix: use device=cpu")
        elif missing := [i for i in plan.gpu_indices() if i >= torch.cuda.device_count()]:
            count = torch.cuda.device_count()
            present = ", ".join(str(i) for i in range(count))
            found.append(
                f"max_memory={plan.max_memory} budgets GPU {', '.join(map(str, missing))}, but this machine has "
                f"{count} CUDA device{'s' if count != 1 else ''} (GPU {present}); fix: budget only the GPUs "
                "present (e.g. max_memory=gpu:40|cpu:64 for one), or run on a machine with more GPUs"
            )
    if whole_pipeline:
        every = [*components, *passed]
        names = ", ".join(f"{c.name} ({c.kind})" for c in every)
        unused = [
            p
            for p, _ in plan.entries
            if not any(pattern_matches(p, c.name, c.kind, pipeline=True) for c in every)
        ]
        if unused:
            found.append(
                f"plan pattern(s) {', '.join(repr(p) for p in unused)} match no component; "
                f"this pipeline has: {names}"
            )
    files: list[tuple[str, str]] = []  # (component, GGUF file): their magic is read only if all else is well
    for c in components:
        spec = plan.spec_for(c.name, c.kind, pipeline=whole_pipeline)
        if spec is None:
            found += _saved_problems(plan, c)
            continue
        if is_file_spec(spec):
            if not os.path.exists(spec.qtype):
                found.append(
                    f"{c.name}: GGUF file {spec.qtype!r} does not exist; fix: give the path of an existing "
                    ".gguf file"
                )
                continue
            files.append((c.name, spec.qtype))
        backend = get_backend(spec.backend)
        if not backend.is_available():
            found.append(
                f"{c.name}: backend {spec.backend!r} needs the {backend.module!r} package; "
                f"fix: pip install 'diffusers-quant[{backend.extra}]'"
            )
            continue
        found += _compute_problems(plan, c, spec)
        v = verdict(spec, c.kind, plan.offload, plan.device)
        if not v.allowed:
            found.append(
                f"{c.name} ({c.kind}) with {spec}, offload={plan.offload}, device={dev}: {v.reason}; "
                f"fix: {v.fix}"
            )
    if not found:  # a refused plan opens no weight file, not even for its magic
        found += [f"{name}: {problem}" for name, path in files if (problem := _gguf_file_problem(path))]
    return found


def _saved_problems(plan: Plan, c: Component) -> list[str]:
    """A folder saved quantized, loaded as it is, meets the same offload rules as its formats."""
    found = []
    for spec in c.saved:
        v = verdict(spec, c.kind, plan.offload, plan.device)
        if not v.allowed:
            found.append(
                f"{c.name} ({c.kind}), saved quantized with {spec}, offload={plan.offload}, "
                f"device={device_type(plan.device)}: {v.reason}; fix: {v.fix}"
            )
    return found


# compute mode -> the specs whose weights it runs (per-row fp8 e4m3 / int8 codes)
COMPUTE_SPECS = {"fp8": ("quanto:qfloat8",), "int8": ("quanto:qint8", "bnb:int8", "nncf:int8_sym")}


def _compute_problems(plan: Plan, c: Component, spec: Spec) -> list[str]:
    """compute=fp8 / int8 runs the matmuls of one weight format each; any other spec in the plan is refused
    (compute=auto applies where it can and refuses nothing)."""
    wanted = COMPUTE_SPECS.get(plan.compute)
    if wanted is None or f"{spec.backend}:{spec.qtype}" in wanted:
        if plan.compute == "fp8" and device_type(plan.device) == "cuda":
            import torch

            from .compute import supports_fp8_matmul

            if torch.cuda.is_available() and not supports_fp8_matmul(plan.device):
                return [
                    f"{c.name}: compute=fp8 needs fp8 tensor cores (NVIDIA Ada / Hopper or later); fix: "
                    f"compute=int8 with {' or '.join(COMPUTE_SPECS['int8'])}, or compute=none"
                ]
        return []
    return [
        f"{c.name} ({c.kind}) with {spec}: compute={plan.compute} runs {' or '.join(wanted)} layers only; "
        f"fix: {' or '.join(f'{c.name}={w}' for w in wanted)}, or compute=auto (W8A8 where the weights allow it)"
    ]


def _gguf_file_problem(path: str) -> str | None:
    """Why a plan's GGUF file (``gguf:/path/x.gguf``) cannot be loaded, or None; reads only its magic."""
    from .detect import is_gguf_file

    if not os.path.exists(path):
        return f"GGUF file {path!r} does not exist; fix: give the path of an existing .gguf file"
    if not is_gguf_file(path):
        return f"{path!r} is not a GGUF file (no GGUF magic); fix: give the path of a .gguf file"
    return None


def enforce(plan: Plan, components: Iterable[Component], *, whole_pipeline: bool = False) -> None:
    found = problems(plan, components, whole_pipeline=whole_pipeline)
    if found:
        raise PlanRefused(found)


def cells(devices: Iterable[str] = DEVICES) -> Iterator[tuple[Spec, str, str, str, Verdict]]:
    """Every (spec, kind, offload, device) cell with its verdict, for the docs and the tests."""
    from .backends import all_backends

    for backend in all_backends():
        for qtype in backend.qtypes:
            spec = Spec(backend.name, qtype)
            for kind in KINDS:
                for offload in OFFLOADS:
                    for device in devices:
                        yield spec, kind, offload, device, verdict(spec, kind, offload, device)


TABLE_KINDS = ("transformer", "unet", "text_encoder", "controlnet", "vae")
TABLE_COLUMNS = (
    ("none", "cpu"),
    ("none", "cuda"),
    ("model", "cuda"),
    ("sequential", "cuda"),
    ("balanced", "cuda"),
    ("group", "cuda"),
)


def markdown_table() -> str:
    """The compatibility table as markdown: one row per (backend, kind), one column per offload x device.

    Offloading on the CPU is one refusal row (nothing to offload to), so the table shows CUDA for it."""
    from .backends import all_backends

    head = "| backend:qtype | component | " + " | ".join(f"{o} / {d}" for o, d in TABLE_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(TABLE_COLUMNS) + 2)]
    for backend in all_backends():
        for kind in TABLE_KINDS:
            # Merge qtypes with identical rows, so the table stays readable.
            groups: dict[tuple[bool, ...], list[str]] = {}
            for q in backend.qtypes:
                row = tuple(verdict(Spec(backend.name, q), kind, o, d).allowed for o, d in TABLE_COLUMNS)
                groups.setdefault(row, []).append(q)
            for row, qtypes in groups.items():
                marks = " | ".join("yes" if a else "-" for a in row)
                lines.append(f"| {backend.name}:{'/'.join(qtypes)} | {kind} | {marks} |")
    return "\n".join(lines)


def refusals_markdown() -> str:
    """The refusal rows with reason and fix, for the README."""

    def cell(text: str) -> str:
        return text.replace("|", " or ")

    lines = [
        "| backend | qtype | component | offload | device | reason | fix |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in RULES:
        if not r.allowed:
            fields = (r.backend, r.qtype, r.kind, r.offload, r.device, r.reason, r.fix)
            lines.append("| " + " | ".join(cell(f) for f in fields) + " |")
    return "\n".join(lines)


START, END = "<!-- rules:start -->", "<!-- rules:end -->"


def readme_section() -> str:
    return f"{START}\n{markdown_table()}\n\nRefusals, checked in order (first match decides):\n\n{refusals_markdown()}\n{END}"


def update_readme(path: str) -> None:
    """Replace the generated section of the README (between the markers) with the current table."""
    with open(path) as f:
        text = f.read()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    with open(path, "w") as f:
        f.write(head + readme_section() + tail)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--update-readme"]:
        update_readme(sys.argv[2] if len(sys.argv) > 2 else "README.md")
    else:
        print(readme_section())
