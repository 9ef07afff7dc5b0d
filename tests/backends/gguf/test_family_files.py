"""GGUF files in the ORIGINAL key layouts published files use (city96's, QuantStack's, ComfyUI-GGUF's
converter: the original repository's names, sometimes under ComfyUI's ``model.diffusion_model.`` prefix; Qwen-
Image and HiDream in diffusers' names), one per family: SD 1.5 and SDXL UNets (LDM / SGM), SD3, Wan 2.1 and
2.2, Flux.2 and Flux.2 Klein, Chroma, HunyuanVideo, Qwen-Image, HiDream, LTX-Video and Lumina2 (Flux's BFL
layout is test_gguf_loading's).

Each file is the family's tiny denoiser (``tests/originals.py``: weights nudged by seeded noise, written in its
original layout, no config inside, as published files) quantized by the project's writer.  It loads with
``<Model>.from_single_file(path, config=folder, subfolder=...)`` into GGUF layers whose decoded weights are
exactly those of the same model written in diffusers' layout (quantization is per row and the layouts only
cut and join rows, so any misplaced, swapped or transposed tensor shows), and which run as the model loaded
from those dequantized weights; and a pipeline load with ``<denoiser>=gguf:<file>`` in the plan generates
what the float pipeline does, within the quantization error.
"""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).parents[2]))
from families import FAMILIES, generate  # noqa: E402
from originals import (  # noqa: E402
    COMFY,
    ORIGINALS,
    float_model,
    float_run,
    folder,
    forward,
    model_class,
    original_state,
    rel_l2,
)

import diffusers_quant  # noqa: E402
from diffusers_quant.backends.gguf.keys import KeyFormatError, detect_key_format, to_diffusers_keys  # noqa: E402
from diffusers_quant.backends.gguf.nn import GGUFLinear  # noqa: E402
from diffusers_quant.backends.gguf.reader import read_gguf  # noqa: E402
from diffusers_quant.backends.gguf.writer import write_gguf  # noqa: E402

# SD 1.5's UNet goes through the same ldm_unet mapping as SDXL's (SDXL adds label_emb); the demo SD UNet's
# size (12 M parameters at 64 x 64) would cost CI 20 s more, so SDXL's tiny one stands for both.
GGUF_FAMILIES = [name for name, o in ORIGINALS.items() if o.gguf_format and name != "sd"]
QTYPES = ("Q8_0", "Q4_0")
# Each family is loaded in both types, one per load path: the model's from_single_file in one, the
# pipeline's plan entry in the other.
MODEL_QTYPE = {name: QTYPES[i % 2] for i, name in enumerate(GGUF_FAMILIES)}
PIPELINE_QTYPE = {name: QTYPES[(i + 1) % 2] for i, name in enumerate(GGUF_FAMILIES)}
# The output of a quantized model against the float one (decoded weights, same inputs); and against the
# same model loaded from the decoded weights (only the float32 summation order differs).
TOLERANCE = {"Q8_0": 0.02, "Q4_0": 0.15}
SAME = 1e-5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``get(family, component, qtype, original=True)``: the path of that GGUF file, written on first use."""
    root = tmp_path_factory.mktemp("family-gguf")
    written: dict[tuple, Path] = {}

    def get(family: str, component: str, qtype: str, original: bool = True) -> Path:
        key = (family, component, qtype, original)
        if key not in written:
            entry = ORIGINALS[family]
            if original:
                state = original_state(family, component)
                if entry.comfy_prefix:
                    state = {COMFY + k: v for k, v in state.items()}
            else:
                state = {k: v.contiguous() for k, v in float_model(family, component).state_dict().items()}
            path = root / f"{family}-{component}-{qtype}-{'original' if original else 'diffusers'}.gguf"
            write_gguf(path, state, qtype, arch=family)
            written[key] = path
        return written[key]

    return get


def _decoded_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` as float32 values, GGUF layers' weights decoded."""
    out = {}
    gguf_layers = {name: m for name, m in model.named_modules() if isinstance(m, GGUFLinear)}
    for name, value in model.state_dict().items():
        module, _, attr = name.rpartition(".")
        if attr == "_extra_state":  # a GGUF layer's qtype and shape, not a weight
            continue
        if module in gguf_layers and attr == "weight":
            value = gguf_layers[module].dequantize_weight(torch.float32)
        out[name] = value.float() if value.is_floating_point() else value
    return out


def _reference(family: str, component: str, path: Path) -> torch.nn.Module:
    """The family's model from the decoded weights of ``path`` (a file in diffusers' layout), plain Linears."""
    file = read_gguf(path)
    model = model_class(family, component).from_config(float_model(family, component).config)
    model.load_state_dict({name: file.dequantize(name, torch.float32) for name in file.names()}, strict=True)
    return model.eval()


@pytest.mark.parametrize("family,qtype", MODEL_QTYPE.items())
def test_original_layout_file_loads_packed_with_the_right_weights(family, qtype, files):
    entry = ORIGINALS[family]
    component = entry.component
    path = files(family, component, qtype)
    file = read_gguf(path)
    assert detect_key_format(file.names()) == entry.gguf_format
    diffusers_quant.install()
    cls = model_class(family, component)
    model = cls.from_single_file(str(path), config=str(folder(family)), subfolder=component)
    row = model.quant_report.components[0]
    assert (row.spec, row.mode) == (f"gguf:{qtype.lower()}", "pre-quantized"), row
    layers = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    assert layers and {m.qtype for m in layers} == {qtype}
    assert all(m.weight.dtype == torch.uint8 for m in layers)
    assert row.layers_quantized == len(layers) and row.bytes_after < row.bytes_before
    # the same weights, bit for bit, as the model written in diffusers' own layout
    reference = _reference(family, component, files(family, component, qtype, original=False))
    got, want = _decoded_state(model), reference.state_dict()
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name].float()), name
    # every Linear whose weight the diffusers-layout file holds quantized is a packed layer here
    diffusers_file = read_gguf(files(family, component, qtype, original=False))
    assert detect_key_format(diffusers_file.names()) == "diffusers"  # HiDream's and Lumina2's were unknown
    linears = {n for n, m in reference.named_modules() if type(m) is torch.nn.Linear}
    quantized = {
        n[: -len(".weight")] for n in diffusers_file.names() if diffusers_file.info(n).type_name == qtype
    }
    # but those the class keeps in float32, decoded as diffusers' GGUF loader does (Wan's time_embedder: the
    # model casts the timestep to its weight's dtype)
    keep = tuple(cls._keep_in_fp32_modules or ())
    decoded = {n for n in quantized & linears if any(k in n.split(".") for k in keep)}
    assert len(layers) == len(quantized & linears) - len(decoded) > 0
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in decoded)
    assert bool(decoded) == (family in ("wan", "wan22"))
    out = forward(model, family, component)
    assert rel_l2(out, forward(reference, family, component)) < SAME
    err = rel_l2(out, forward(float_model(family, component), family, component))
    assert 0 < err < TOLERANCE[qtype]


@pytest.mark.parametrize("family", [f for f in GGUF_FAMILIES if f != "wan"])  # wan22 has Wan 2.1's files x2
def test_a_plan_entry_loads_the_original_layout_file_and_the_pipeline_generates(family, files):
    import numpy as np
    from diffusers import DiffusionPipeline

    fam = FAMILIES[family]
    qtype = PIPELINE_QTYPE[family]
    paths = {name: files(family, name, qtype) for name in fam.denoisers}
    diffusers_quant.install()
    plan = ",".join(f"{name}=gguf:{path}" for name, path in paths.items())
    pipe = DiffusionPipeline.from_pretrained(folder(family), quant=plan)
    for name in fam.denoisers:
        row = pipe.quant_report[name]
        assert (row.spec, row.mode) == (f"gguf:{qtype.lower()}", "pre-quantized"), row
        assert any(isinstance(m, GGUFLinear) for m in getattr(pipe, name).modules()), name
    out = generate(pipe, fam)
    assert out.shape == fam.shape and np.isfinite(out).all()
    # what the float pipeline (the same nudged weights, unquantized) generates, within quantization error
    err = rel_l2(out, float_run(family).output)
    assert 0 < err < TOLERANCE[qtype]


# ---------------------------------------------------------------------------------------------------------
# The layouts whose diffusers converter hard-codes the real model's widths: ours agrees with it there


def _at_widths(state: dict, rows: dict[str, int], cols: dict[str, int] | None = None) -> dict:
    """``state``'s names with random values: the rows given for names ending in a ``rows`` key, else the
    tensor's own; 2 columns (or ``cols``)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, t in state.items():
        n = next((r for suffix, r in rows.items() if name.endswith(suffix)), t.shape[0])
        c = next((c for suffix, c in (cols or {}).items() if name.endswith(suffix)), 2)
        out[name] = torch.randn((n, c) if t.dim() >= 2 else (n,), generator=g)
    return out


@pytest.mark.parametrize(
    "family,converter,rows,cols",
    [
        (
            "chroma",
            "convert_chroma_transformer_checkpoint_to_diffusers",
            {"linear1.weight": 3 * 3072 + 12288, "linear1.bias": 3 * 3072 + 12288, "linear2.weight": 3072},
            None,
        ),
        (
            "hunyuanvideo",
            "convert_hunyuan_video_transformer_to_diffusers",
            {"linear1.weight": 3 * 3072 + 12288, "linear1.bias": 3 * 3072 + 12288, "linear2.weight": 3072},
            None,
        ),
        (
            "lumina2",
            "convert_lumina2_to_diffusers",
            {"attention.qkv.weight": 2304 + 2 * 768},
            {"attention.out.weight": 2304},
        ),
    ],
)
def test_split_sizes_match_diffusers_converter_at_the_real_widths(family, converter, rows, cols):
    from diffusers.loaders import single_file_utils

    state = _at_widths(original_state(family), rows, cols)
    expected = getattr(single_file_utils, converter)(dict(state))
    got = to_diffusers_keys(state)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_layouts_that_cannot_be_mapped_are_refused_naming_why():
    sd = original_state("lumina2")
    bad = dict(sd, **{"layers.0.attention.qkv.weight": torch.zeros(65, 64)})
    with pytest.raises(
        KeyFormatError, match=r"lumina2: layers\.0\.attention\.qkv\.weight has 65 rows, not 64 query"
    ):
        to_diffusers_keys(bad)
    no_out = {k: v for k, v in sd.items() if k != "layers.0.attention.out.weight"}
    with pytest.raises(
        KeyFormatError, match=r"lumina2: layers\.0\.attention\.out\.weight missing; cannot size"
    ):
        to_diffusers_keys(no_out)
    sd = original_state("hunyuanvideo")
    with pytest.raises(KeyFormatError, match=r"hunyuan_video: single_blocks\.0\.linear2\.weight missing"):
        to_diffusers_keys({k: v for k, v in sd.items() if k != "single_blocks.0.linear2.weight"})
    # a UNet's original layout converts only with its config (the block layout comes from it)
    unet = original_state("sd")
    with pytest.raises(KeyFormatError, match=r"'ldm_unet' is not supported yet without the UNet's config"):
        to_diffusers_keys(unet)
    # a tensor no converter consumes is named, never dropped
    with pytest.raises(KeyFormatError, match=r"ltx: no diffusers name for 1 tensors: vae\.decoder\.x"):
        to_diffusers_keys({**original_state("ltx"), "vae.decoder.x": torch.zeros(2)})


def test_cli_quantize_keeps_the_family_tables_layers_in_full_precision(tmp_path):
    """``diffusers-quant quantize --quant gguf:...`` keeps what a plan keeps (families.py): Qwen-Image's
    txt_in, its text embedder, which the generic defaults' names miss (they quantized it)."""
    from diffusers_quant.cli import main
    from diffusers_quant.components import default_excludes

    out = tmp_path / "qwen.gguf"
    assert main(["quantize", str(folder("qwenimage")), "--quant", "gguf:q8_0", "--out", str(out)]) == 0
    file = read_gguf(out)
    types = {n: file.info(n).type_name for n in file.names()}
    assert types["txt_in.weight"] == "F32" and types["transformer_blocks.0.attn.to_q.weight"] == "Q8_0"
    model = float_model("qwenimage")
    kept = default_excludes(model, "transformer")
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and module.weight.numel() > 1024:
            stays = any(fnmatch.fnmatchcase(name, p) for p in kept)
            assert (types[f"{name}.weight"] == "F32") == stays, name
