"""The model contract on a CUDA device: plain diffusers' own bitsandbytes path (GPU only) reloads our bnb
folders, inductor compiles every backend, LoRA fuses on the GPU. Run on the GPU machine (``-m gpu``)."""

from __future__ import annotations

import pytest
import torch
from test_contract import SPECS, _err, _inputs, _lora_state_dict

import diffusers_quant

pytestmark = pytest.mark.gpu


def _load(flux_path, spec, dtype=torch.bfloat16):
    from diffusers import FluxTransformer2DModel

    diffusers_quant.install()
    return FluxTransformer2DModel.from_pretrained(
        flux_path / "transformer", dtype=dtype, quant=f"transformer={spec};device=cuda"
    )


def _run(model, dtype=torch.bfloat16):
    inputs = {
        k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _inputs(model, dtype=dtype).items()
    }
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.mark.parametrize("qtype", ["nf4", "int8"])
def test_plain_diffusers_reloads_our_bnb_folder_on_the_gpu(qtype, flux_path, tmp_path):
    from diffusers import FluxTransformer2DModel

    model = _load(flux_path, f"bnb:{qtype}?include=*attn.to_q|*attn.to_k|*attn.to_v")
    expected = _run(model)
    model.save_pretrained(tmp_path / "transformer")
    diffusers_quant.uninstall()
    plain = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer", dtype=torch.bfloat16)
    layer = type(plain.transformer_blocks[0].attn.to_q).__name__
    assert layer == ("Linear4bit" if qtype == "nf4" else "Linear8bitLt")
    assert type(plain.transformer_blocks[0].attn.to_out[0]) is torch.nn.Linear
    assert _err(_run(plain.to("cuda")), expected) < 1e-2


def test_plain_diffusers_refuses_our_format_on_the_gpu(flux_path, tmp_path):
    from diffusers import FluxTransformer2DModel

    model = _load(flux_path, "bnb:nf4")  # default excludes: not expressible as a diffusers skip list
    model.save_pretrained(tmp_path / "transformer")
    diffusers_quant.uninstall()
    with pytest.raises(ValueError, match="diffusers_quant"):
        FluxTransformer2DModel.from_pretrained(tmp_path / "transformer")


@pytest.mark.parametrize("spec", SPECS)
def test_inductor_compiles_every_backend(spec, flux_path):
    import torch._dynamo

    model = _load(flux_path, spec)
    eager = _run(model)
    torch._dynamo.reset()
    inputs = {
        k: v.cuda() if isinstance(v, torch.Tensor) else v
        for k, v in _inputs(model, dtype=torch.bfloat16).items()
    }
    explained = torch._dynamo.explain(model)(**inputs)
    print(f"\n{spec}: {explained.graph_count} graphs, {explained.graph_break_count} graph breaks")
    for reason in {str(b.reason).splitlines()[0] for b in explained.break_reasons}:
        print(f"  break: {reason[:160]}")
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.no_grad():
        out = compiled(**inputs)[0]
    assert _err(out, eager) < 2e-2


@pytest.mark.parametrize("spec", ["bnb:nf4", "quanto:qint4", "nncf:int4", "gguf:q4_0"])
def test_lora_fuse_on_the_gpu(spec, flux_path):
    model = _load(flux_path, spec)
    model.load_lora_adapter(_lora_state_dict(model), adapter_name="style", prefix=None)
    unfused = _run(model)
    model.fuse_lora()
    assert model.transformer_blocks[0].attn.to_q.get_base_layer().weight.device.type == "cuda"
    assert _err(_run(model), unfused) < 5e-2
