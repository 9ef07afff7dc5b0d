"""On-load quantization never holds the full-precision component: measured, in a fresh process."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    import diffusers_quant
    from diffusers import FluxTransformer2DModel
    from diffusers_quant.measure import track_memory
    folder, plan = sys.argv[1], sys.argv[2]
    diffusers_quant.install()
    FluxTransformer2DModel.from_pretrained(folder, dtype=torch.bfloat16, quant="transformer=quanto:qint8")  # warm imports
    with track_memory() as peak:
        model = FluxTransformer2DModel.from_pretrained(folder, dtype=torch.bfloat16, quant=plan)
    row = model.quant_report["transformer"]
    print(json.dumps({"growth": peak.host_growth, "before": row.bytes_before, "after": row.bytes_after,
                      "mode": row.mode}))
""")


@pytest.fixture(scope="module")
def wide_transformer(tmp_path_factory):
    """A Flux transformer of ~60M parameters (120 MB in bf16): large enough to see memory clearly."""
    import torch
    from helpers import wide_flux_transformer

    folder = tmp_path_factory.mktemp("wide") / "transformer"
    model = wide_flux_transformer(num_single_layers=3).to(torch.bfloat16)
    model.save_pretrained(folder)
    return folder


def _run(folder, plan):
    # A fixed mmap threshold stops glibc from keeping freed tensor memory in its heap, so RssAnon
    # follows the live tensors rather than the allocator's history.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", DIFFUSERS_QUANT_PROGRESS="0")
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder), plan], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("spec", ["quanto:qint8", "bnb:nf4"])
def test_on_load_host_peak_stays_well_below_the_full_precision_component(wide_transformer, spec):
    result = _run(wide_transformer, f"transformer={spec};mode=on-load")
    assert result["mode"] == "on-load"
    # The full-precision component never exists: peak growth is the quantized model plus transient
    # per-layer buffers, far below the bf16 component.
    assert result["growth"] < 0.75 * result["before"], result
    assert result["after"] < 0.7 * result["before"], result
