"""Single-file safetensors in the ORIGINAL key layouts (the files users download: SDXL's SGM UNet, SD3's
``joint_blocks``, Wan's, BFL's Flux.2 and Flux.2 Klein, LTX-Video's, and Qwen-Image's and HiDream's own
names), loaded with ``<Model>.from_single_file(path, config=folder, subfolder=..., quant=plan)``.

Each file is the family's tiny denoiser in its original layout (``tests/originals.py``).  Plain diffusers
loads it back to exactly the model it was written from (the inverse mapping is diffusers' converter's); with
the hooks and a plan, the same file loads quantized (the layers of the plan's backend, counted in the report,
fewer bytes) and runs as plain diffusers' model from the same file does, within the quantization error.

With ``mode=on-load`` diffusers' converter runs on the whole checkpoint, and each selected Linear is
quantized from its converted tensors as diffusers fills the meta model (``single_file.py``), to the same
layers, bit for bit, as the default (``auto``: post-load for single files) gives (tested below).  Chroma,
HunyuanVideo and Lumina2 are not here: diffusers' converters for them hard-code the real models' widths
(``originals.ORIGINALS[...].single_file``), which a tiny model cannot have; their GGUF files, mapped by this
project's own split sizes, are tested in ``tests/backends/gguf/test_family_files.py``.
"""

from __future__ import annotations

import pytest
import torch
from originals import ORIGINALS, float_model, folder, forward, model_class, original_state, rel_l2

import diffusers_quant
from diffusers_quant import QuantError

LAYER_TYPES = {"bnb": ("Linear4bit", "Linear8bitLt"), "quanto": ("QLinear",), "nncf": ("NNCFLinear",)}
# (family, plan spec for its denoiser, the output's rel-L2 bound against plain diffusers' model)
CASES = [
    ("sdxl", "quanto:qint8", 0.03),
    ("sd3", "bnb:nf4", 0.1),
    ("wan", "quanto:qint8", 0.03),
    ("flux2", "bnb:nf4", 0.1),
    ("flux2_klein", "nncf:int8", 0.02),
    ("qwenimage", "quanto:qint8", 0.03),
    ("hidream", "bnb:nf4", 0.1),
    ("ltx", "nncf:int8", 0.02),
]
NOT_AT_TINY_WIDTHS = sorted(f for f, o in ORIGINALS.items() if o.single_file)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``get(family)``: the family's denoiser in its original layout as one safetensors file."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("family-single-files")
    written = {}

    def get(family: str):
        if family not in written:
            path = root / f"{family}-{ORIGINALS[family].component}.safetensors"
            save_file(original_state(family), str(path))
            written[family] = path
        return written[family]

    return get


@pytest.mark.parametrize("family,spec,bound", CASES, ids=[c[0] for c in CASES])
def test_original_layout_single_file_loads_quantized_with_a_plan(family, spec, bound, files):
    component = ORIGINALS[family].component
    cls = model_class(family)
    path = files(family)
    kwargs = dict(config=str(folder(family)), subfolder=component)
    # plain diffusers: its converter gives back exactly the model the file was written from
    plain = cls.from_single_file(str(path), **kwargs)
    want = float_model(family).state_dict()
    got = plain.state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)

    diffusers_quant.install()
    model = cls.from_single_file(str(path), quant=f"{component}={spec};mode=on-load", **kwargs)
    row = model.quant_report[component]
    assert (row.spec, row.mode) == (spec, "on-load"), row
    backend = spec.split(":")[0]
    layers = [m for m in model.modules() if type(m).__name__ in LAYER_TYPES[backend]]
    assert layers and row.layers_quantized == len(layers), row
    assert row.bytes_after < row.bytes_before
    out = forward(model, family)
    err = rel_l2(out, forward(plain, family))
    assert 0 < err < bound
    after = cls.from_single_file(str(path), quant=f"{component}={spec}", **kwargs)
    assert after.quant_report[component].mode == "post-load"
    assert after.quant_report[component].layers_quantized == row.layers_quantized
    assert torch.equal(forward(after, family), out)  # the same layers, whichever way they were made


def test_on_load_without_the_meta_device_is_refused_naming_the_fix(files):
    diffusers_quant.install()
    with pytest.raises(QuantError, match=r"mode=on-load needs .*low_cpu_mem_usage=False.*fix: drop"):
        model_class("ltx").from_single_file(
            str(files("ltx")),
            config=str(folder("ltx")),
            subfolder="transformer",
            low_cpu_mem_usage=False,
            quant="transformer=quanto:qint8;mode=on-load",
        )


@pytest.mark.parametrize("family", NOT_AT_TINY_WIDTHS)
def test_the_families_left_out_are_those_diffusers_cannot_convert_at_tiny_widths(family, files):
    """Their converters split fused tensors at the real models' sizes, which a tiny file cannot match."""
    with pytest.raises(RuntimeError, match=r"split_with_sizes expects split_sizes"):
        model_class(family).from_single_file(
            str(files(family)), config=str(folder(family)), subfolder=ORIGINALS[family].component
        )
