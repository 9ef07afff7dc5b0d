"""Reach (issue 16): tiny pipelines of every family loaded through the hooks, quantized, generating end to end.

The fast subset (``CELLS``) runs in CI: every family once with the default plan, and every backend and
qtype at least once across the families, on load and after load, in float32, bfloat16 and float16. The
slow sweep (``-m slow``) runs every family with every qtype on its denoiser(s), and every non-GGUF qtype on
its text encoders, on load and after load. Each family's pipeline is built once per session (lazily, in
the session cache) and loaded afresh for each cell.

``python tests/test_reach.py`` prints the README's "What is tested" table from ``CELLS``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from families import FAMILIES, family_path, generate  # noqa: E402

DEFAULT = "model=bnb:nf4,text_encoder*=quanto:qint8"
# Quantized layer types, by backend: what must replace nn.Linear.
LAYER_TYPES = {
    "bnb": ("Linear4bit", "Linear8bitLt"),
    "quanto": ("QLinear",),
    "nncf": ("NNCFLinear",),
    "gguf": ("GGUFLinear",),
}


@dataclass(frozen=True)
class Cell:
    family: str
    denoiser: str  # spec for the denoiser(s)
    text_encoder: str  # spec for the text encoders
    mode: str = "auto"
    dtype: str = "float32"

    @property
    def plan(self) -> str:
        return f"model={self.denoiser},text_encoder*={self.text_encoder};mode={self.mode};dtype={self.dtype}"

    @property
    def id(self) -> str:
        return f"{self.family}-{self.denoiser}-{self.text_encoder}-{self.mode}-{self.dtype}"


# The fast subset: the default plan on every family, then the rest of the backends' qtypes, both modes
# and the half-precision dtypes, spread over the families.
CELLS = [Cell(name, "bnb:nf4", "quanto:qint8") for name in FAMILIES] + [
    Cell("sd3", "bnb:fp4", "nncf:int8", "on-load", "bfloat16"),
    Cell("wan", "gguf:q8_0", "bnb:int8", "post-load", "float32"),
    Cell("qwenimage", "quanto:qint4", "nncf:int4", "post-load", "bfloat16"),
    # quanto's 2/4-bit groups need 128 inputs: a T5 keeps its only such Linear (wo) in float32, a Qwen3 has one
    Cell("flux2_klein", "nncf:int4_sym", "quanto:qint2", "on-load", "float32"),
    Cell("chroma", "gguf:q4_0", "quanto:qfloat8", "on-load", "bfloat16"),
    Cell("sana", "nncf:int8_sym", "bnb:fp4", "post-load", "float16"),
    Cell("ltx", "quanto:qint8", "nncf:int8_sym", "on-load", "float16"),
    Cell("lumina2", "bnb:int8", "nncf:int4_sym", "on-load", "float32"),
    Cell("cogvideox", "quanto:qfloat8", "bnb:nf4", "post-load", "bfloat16"),
    Cell("hunyuanvideo", "nncf:int8", "quanto:qint4", "on-load", "float32"),
    Cell("wan22", "quanto:qint2", "bnb:nf4", "on-load", "float32"),
    Cell("sdxl", "nncf:int4", "bnb:int8", "post-load", "float16"),
    Cell("flux", "gguf:q8_0", "quanto:qint8", "on-load", "float16"),
    Cell("sd", "bnb:fp4", "nncf:int8", "post-load", "bfloat16"),
]

DENOISER_SPECS = [
    "bnb:nf4",
    "bnb:fp4",
    "bnb:int8",
    "quanto:qint8",
    "quanto:qint4",
    "quanto:qint2",
    "quanto:qfloat8",
    "nncf:int8",
    "nncf:int8_sym",
    "nncf:int4",
    "nncf:int4_sym",
    "gguf:q8_0",
    "gguf:q4_0",
]
TEXT_ENCODER_SPECS = [s for s in DENOISER_SPECS if not s.startswith("gguf:")]
DTYPES = ("float32", "bfloat16", "float16")
# Every family x every qtype on its denoiser(s) x both load paths, its text encoders cycling through the
# non-GGUF qtypes and the three dtypes cycling too.
SLOW_CELLS = [
    Cell(name, spec, TEXT_ENCODER_SPECS[i % len(TEXT_ENCODER_SPECS)], mode, DTYPES[(i + m) % len(DTYPES)])
    for name in FAMILIES
    for i, spec in enumerate(DENOISER_SPECS)
    for m, mode in enumerate(("on-load", "post-load"))
]


@pytest.fixture(scope="session")
def family_folders(demo_cache):
    """Each family's folder, built on first use in the session cache (a test of one family builds only it)."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = family_path(name)
        return built[name]

    return get


def run_cell(cell: Cell, folder: Path, strict: bool = True):
    """Load the family's pipeline through the hooks with the cell's plan and check what came back: each
    denoiser and text encoder quantized with its spec in the expected mode (layer types, report rows,
    bytes, load dtype), and a finite output of the right shape."""
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    import diffusers_quant
    from diffusers_quant.backends import backend_of
    from diffusers_quant.components import count_linears, select_linears
    from diffusers_quant.spec import Spec

    family = FAMILIES[cell.family]
    diffusers_quant.install()
    pipe = DiffusionPipeline.from_pretrained(folder, quant=cell.plan)
    assert type(pipe).__name__ == family.pipeline
    report = pipe.quant_report
    dtype = getattr(torch, cell.dtype)
    for names, spec in ((family.denoisers, cell.denoiser), (family.text_encoders, cell.text_encoder)):
        backend = spec.split(":")[0]
        for name in names:
            model, row = getattr(pipe, name), report[name]
            assert (row.spec, row.mode) == (spec, "on-load" if cell.mode == "auto" else cell.mode), (
                name,
                row,
            )
            layers = [m for m in model.modules() if backend_of(m) is not None]
            # the fast cells are chosen so each component has layers the spec takes; in the sweep, a tiny
            # model may have none (quanto's 2/4-bit groups need 128 inputs; a T5 keeps its wo in float32)
            assert layers or (not strict and not select_linears(model, Spec.parse(spec), row.kind)), name
            assert {type(m).__name__ for m in layers} <= set(LAYER_TYPES[backend]), name
            assert row.layers_quantized == len(layers), (name, row)
            assert row.linears_total == len(layers) + count_linears(model), (name, row)
            assert row.bytes_after < row.bytes_before or not layers, (name, row)
            floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
            assert dtype in floats, (name, floats)
    # the plan's dtype is the whole pipeline's: the VAE left in full precision loads in it too
    assert pipe.vae.dtype == dtype
    out = generate(pipe, family)
    assert out.shape == family.shape
    assert np.isfinite(out).all()
    return pipe


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.id)
def test_family_through_the_hooks(cell, family_folders):
    run_cell(cell, family_folders(cell.family))


@pytest.mark.slow
@pytest.mark.parametrize("cell", SLOW_CELLS, ids=lambda c: c.id)
def test_family_sweep(cell, family_folders):
    run_cell(cell, family_folders(cell.family), strict=False)


def test_the_fast_subset_covers_every_family_backend_mode_and_dtype():
    assert {c.family for c in CELLS if (c.denoiser, c.text_encoder) == ("bnb:nf4", "quanto:qint8")} == set(
        FAMILIES
    )
    assert {c.denoiser for c in CELLS} | {c.text_encoder for c in CELLS} == set(DENOISER_SPECS)
    assert {c.mode for c in CELLS} == {"auto", "on-load", "post-load"}
    assert {c.dtype for c in CELLS} == {"float32", "bfloat16", "float16"}


_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_BACKENDS = ("bnb", "quanto", "nncf", "gguf")


# Original-layout files tested outside the modules ``file_cells`` reads: Flux's BFL GGUF
# (tests/backends/gguf/test_gguf_loading.py::test_original_bfl_key_names_load, the model's from_single_file).
_OTHER_GGUF_FILES = {"flux": "flux_bfl: q8_0 M"}


def file_cells() -> tuple[dict[str, str], dict[str, str]]:
    """Per family, the original-layout files the file tests load: GGUF (its layout, the type the model's
    from_single_file reads, M, and the type a pipeline's plan entry reads, P: test_family_files.py) and
    single-file safetensors with a plan (the spec and load path: test_single_file_families.py)."""
    sys.path.insert(0, str(Path(__file__).parent / "backends" / "gguf"))
    from originals import ORIGINALS
    from test_family_files import MODEL_QTYPE, PIPELINE_QTYPE
    from test_single_file_families import CASES

    gguf = dict(_OTHER_GGUF_FILES)
    for name, qtype in MODEL_QTYPE.items():
        parts = [f"{qtype.lower()} M"]
        if name in PIPELINE_QTYPE and name != "wan":  # wan22's pipeline test loads Wan 2.1's layout, twice
            parts.append(f"{PIPELINE_QTYPE[name].lower()} P")
        gguf[name] = f"{ORIGINALS[name].gguf_format}: " + ", ".join(parts)
    single = {name: f"{spec} on-load" for name, spec, _ in CASES}
    return gguf, single


def table() -> str:
    """The README's "What is tested" table, from ``CELLS`` and ``file_cells``: per family and backend, each
    qtype with the components (D: denoiser, T: text encoders), the load path and the dtype a fast cell runs
    it in; then the original-layout files loaded."""
    gguf_files, single_files = file_cells()
    lines = [
        "| family | pipeline | "
        + " | ".join(_BACKENDS)
        + " | GGUF file, original layout | single file + plan |",
        "|---|---|" + "---|" * (len(_BACKENDS) + 2),
    ]
    for name, family in FAMILIES.items():
        cells = {b: [] for b in _BACKENDS}
        for cell in (c for c in CELLS if c.family == name):
            for spec, part in ((cell.denoiser, "D"), (cell.text_encoder, "T")):
                backend, qtype = spec.split(":")
                cells[backend].append(f"{qtype} {part} {cell.mode} {_DTYPES[cell.dtype]}")
        row = [name, family.pipeline] + ["; ".join(cells[b]) or "-" for b in _BACKENDS]
        row += [gguf_files.get(name, "-"), single_files.get(name, "-")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


README = Path(__file__).parent.parent / "README.md"
_START, _END = "<!-- reach:start -->", "<!-- reach:end -->"


def test_the_readme_table_is_what_this_file_runs():
    text = README.read_text()
    assert text[text.index(_START) + len(_START) : text.index(_END)].strip() == table()


if __name__ == "__main__":
    # python tests/test_reach.py [--update-readme]
    if "--update-readme" in sys.argv:
        text = README.read_text()
        head, rest = text.split(_START)
        README.write_text(head + _START + "\n" + table() + "\n" + _END + rest.split(_END, 1)[1])
    else:
        print(table())
