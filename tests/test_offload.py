"""Offload planning and the offloaders' mechanics on the CPU (no GPU here: the onload device is the CPU, which
still runs every hook, every move and every device map; tests/test_rules.py runs each allowed cell on CUDA).

Sizes are quantization-aware, balanced maps follow the budget without splitting a block, a budget below the
largest block is refused before any weight file is opened, bitsandbytes' scales move with the weight, and
every backend's output is unchanged by each offload mode."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from helpers import wide_flux_transformer
from test_contract import _inputs

import diffusers_quant
from diffusers_quant import offload
from diffusers_quant.cli import main
from diffusers_quant.errors import PlanRefused, SpecError
from diffusers_quant.post_load import state_nbytes
from diffusers_quant.spec import Plan

SPECS = ["bnb:nf4", "bnb:int8", "quanto:qint8", "nncf:int4_sym", "gguf:q4_0"]


def _quantized(spec: str, single_layers: int = 2):
    model = wide_flux_transformer(single_layers).to(torch.bfloat16)
    diffusers_quant.quantize(model, spec, kind="transformer")
    return model


def _run(model):
    with torch.no_grad():
        return model(**_inputs(model, dtype=torch.bfloat16))[0].float()


@pytest.fixture(scope="module", params=SPECS)
def quantized(request):
    model = _quantized(request.param)
    return request.param, model, _run(model)


def test_sizes_count_what_the_layers_store(quantized):
    spec, model, _ = quantized
    sizes = offload.module_sizes(model)
    assert sizes[""] == state_nbytes(model)
    full = sum(p.numel() * 2 for p in wide_flux_transformer(2).parameters())  # bf16 bytes
    assert sizes[""] < 0.75 * full, "a quantized component must be planned at its stored size"
    block = "single_transformer_blocks.0"
    assert sizes[block] == sum(v for k, v in sizes.items() if k.startswith(block + ".") and k.count(".") == 2)


def test_bnb_sizes_include_the_scales():
    model = _quantized("bnb:nf4")
    layer = model.transformer_blocks[0].attn.to_q
    packed = layer.weight.numel() * layer.weight.element_size()
    scales = sum(v.numel() * v.element_size() for v in layer.weight.quant_state.as_dict(packed=True).values())
    bias = layer.bias.numel() * layer.bias.element_size()
    assert offload.module_sizes(model)["transformer_blocks.0.attn.to_q"] == packed + scales + bias


def test_balanced_map_follows_the_budget_and_never_splits_a_block(quantized):
    spec, model, _ = quantized
    sizes = offload.module_sizes(model)
    budget = sizes[""] / 2
    device_map = offload.plan_device_map(
        model, sizes, Plan(offload="balanced", device="cuda", gpu_memory=budget / 2**30)
    )
    assert set(device_map.placement.values()) == {0, "cpu"}
    assert device_map.bytes_on["cuda:0"] <= budget
    assert device_map.bytes_on["cuda:0"] + device_map.bytes_on["cpu"] == sizes[""]
    blocks = [f"transformer_blocks.{i}" for i in range(1)] + [
        f"single_transformer_blocks.{i}" for i in range(2)
    ]
    for part in device_map.placement:
        assert not any(part.startswith(b + ".") for b in blocks), f"{part}: a transformer block was split"
    assert device_map.largest_block[0] in blocks


def test_a_budget_below_the_largest_block_is_refused_with_the_fix():
    model = _quantized("nncf:int4_sym")
    sizes = offload.module_sizes(model)
    name, largest = offload.largest_block(model, sizes)
    with pytest.raises(
        PlanRefused, match=rf"largest block \({name}.*fix: give gpu_memory=.* or use offload=group"
    ):
        offload.plan_device_map(
            model, sizes, Plan(offload="balanced", device="cuda", gpu_memory=largest / 2 / 2**30)
        )


def _digest(folder) -> dict:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_budgets_are_checked_from_the_configs_before_any_weight_is_read(flux_path, tmp_path, capsys):
    import shutil

    folder = tmp_path / "pipe"
    shutil.copytree(flux_path, folder)
    for weights in folder.rglob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")  # any read of a weight would fail on these
    before = _digest(folder)
    plan = Plan.parse("transformer=bnb:nf4;offload=balanced;device=cuda;gpu_memory=0.0001")
    from diffusers_quant.hooks import _pipeline_components

    components = _pipeline_components(object, str(folder), {})
    with pytest.raises(
        PlanRefused, match=r"transformer: offload=balanced with .* less than its largest block"
    ):
        offload.planned_maps(plan, str(folder), components, torch.bfloat16)
    good = Plan.parse(
        "transformer=bnb:nf4,text_encoder_2=nncf:int8;offload=balanced;device=cuda;gpu_memory=0.002"
    )
    maps = offload.planned_maps(good, str(folder), components, torch.bfloat16)
    assert set(maps) == {"transformer", "text_encoder_2"}
    assert set(maps["transformer"].placement.values()) == {0, "cpu"}
    # the CLI prints the same map and the bytes per device
    main(["check", "--model", str(folder), "--quant", str(good)])
    out = capsys.readouterr().out
    assert "transformer: balanced device map (from the configs; no weight read)" in out
    assert "cuda:0:" in out and "cpu:" in out and "largest block: transformer_blocks.0" in out
    assert _digest(folder) == before, "planning must leave the checkpoint untouched"


def test_a_pipeline_load_with_a_too_small_budget_fails_before_reading_weights(flux_path, tmp_path):
    import shutil

    from diffusers import DiffusionPipeline

    folder = tmp_path / "pipe"
    shutil.copytree(flux_path, folder)
    for weights in folder.rglob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    before = _digest(folder)
    diffusers_quant.install()
    with pytest.raises(
        PlanRefused, match=r"(?s)no CUDA device.*less than its largest block .* fix: give gpu_memory="
    ):
        DiffusionPipeline.from_pretrained(
            folder,
            dtype=torch.bfloat16,
            quant="transformer=bnb:nf4;offload=balanced;device=cuda;gpu_memory=0.0001",
        )
    assert _digest(folder) == before


@pytest.mark.parametrize("qtype", ["nf4", "int8"])
def test_bnb_scales_move_with_the_weight(qtype):
    """diffusers' group offload moves a layer by swapping each parameter's and buffer's ``.data``; after
    offload_ready, bitsandbytes' scales are among them and bitsandbytes reads them from there."""
    model = _quantized(f"bnb:{qtype}", single_layers=1)
    expected = _run(model)
    offload.offload_ready(model)
    layer = model.transformer_blocks[0].attn.to_q
    scales = [n for n in layer._buffers if n.startswith("_dq_")]
    assert scales and all(not layer._buffers[n].is_floating_point() for n in scales), "integer views only"
    for module in model.modules():  # what a .data-swapping offloader does, to fresh storage
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            tensor.data = tensor.data.clone()
    if qtype == "nf4":
        qs = layer.weight.quant_state
        assert qs.absmax.untyped_storage().data_ptr() == layer._dq_absmax.untyped_storage().data_ptr()
    else:
        assert layer.state.SCB.untyped_storage().data_ptr() == layer._dq_SCB.untyped_storage().data_ptr()
        assert layer.state.CB is layer.weight.data or torch.equal(layer.state.CB, layer.weight.data)
    assert torch.equal(_run(model), expected)
    assert "_dq_absmax" not in model.state_dict() and not any("_dq_" in k for k in model.state_dict())
    assert torch.equal(_run(copy.deepcopy(model)), expected)


def test_bnb_int8_moved_after_a_cpu_quantization_keeps_its_scales():
    """bitsandbytes keeps the int8 scales on the parameter, which ``Module.to`` replaces in place without
    them; the linked state follows the move (on the CPU: a move to fresh storage of the same device)."""
    model = _quantized("bnb:int8", single_layers=1)
    expected = _run(model)
    offload.offload_ready(model)
    model.to("cpu")
    assert torch.equal(_run(model), expected)
    assert (
        diffusers_quant.backends.get_backend("bnb")
        .dequantize_weight(model.transformer_blocks[0].attn.to_q)
        .dtype
        == torch.float32
    )


MODES = [
    ("model", {}),
    ("sequential", {}),
    ("balanced", {}),
    ("group", {}),
    ("group", {"group_type": "leaf"}),
    ("group", {"group_blocks": 2}),
]


@pytest.mark.parametrize("mode,settings", MODES, ids=lambda x: str(x))
def test_every_offload_mode_leaves_the_output_unchanged(quantized, mode, settings):
    spec, model, expected = quantized
    if mode == "sequential" and spec in ("bnb:nf4", "quanto:qint8", "bnb:int8"):
        pytest.skip("refused by the rules (bnb 4-bit, quanto) or CUDA-only in bitsandbytes (int8)")
    fresh = _quantized(spec)
    budget = offload.module_sizes(fresh)[""] / 2 / 2**30 if mode == "balanced" else None
    plan = Plan(offload=mode, device="cpu", gpu_memory=budget, **settings)
    device_map = offload.place_model(fresh, plan, "transformer")
    for _ in range(2):  # the second call runs after the first one's offloads
        assert torch.equal(_run(fresh), expected)
    if mode == "balanced":
        assert set(fresh.hf_device_map.values()) == {"cuda:0", "cpu"}
        assert sum(device_map.bytes_on.values()) == offload.module_sizes(fresh)[""]
    else:
        assert device_map is None


@pytest.mark.parametrize(
    "text,message",
    [
        (
            "transformer=bnb:nf4;gpu_memory=4",
            r"gpu_memory is a setting of offload=balanced, .* fix: add offload=balanced",
        ),
        ("transformer=bnb:nf4;offload=model;stream=true", r"stream is a setting of offload=group"),
        ("transformer=bnb:nf4;offload=group;record_stream=true", r"record_stream=true needs stream=true"),
        (
            "transformer=bnb:nf4;offload=group;group_type=tile",
            r"unknown group_type 'tile'; expected one of block, leaf",
        ),
        ("transformer=bnb:nf4;offload=group;group_blocks=0", r"group_blocks=0; expected 1 or more"),
        ("transformer=bnb:nf4;offload=group;stream=maybe", r"stream='maybe'; expected true or false"),
        (
            "transformer=bnb:nf4;offload=balanced;max_memory=gpu:x",
            r"max_memory='gpu:x'; expected 'gpu:GiB\|cpu:GiB' \(the plan's GPU\) or 'N:GiB\|N:GiB\|cpu:GiB'",
        ),
        ("transformer=bnb:nf4;offload=balanced;max_memory=cpu:8", r"gives no GPU budget"),
        (
            "transformer=bnb:nf4;offload=group;strem=true",
            r"unknown setting 'strem'; .* did you mean 'stream'\?",
        ),
        (
            "transformer=bnb:nf4;offload=balanced;gpu_memory=inf",
            r"gpu_memory=inf; expected a positive number",
        ),
        ("transformer=bnb:nf4;offload=balanced;max_memory=gpu:inf", r"max_memory='gpu:inf'; expected"),
        ("transformer=bnb:nf4;offload=balanced;max_memory=gpu:8|gpu:2", r"gives gpu twice"),
        ("transformer=bnb:nf4;offload=balanced;gpu_memory=4;max_memory=gpu:4", r"both set a GPU budget"),
        (
            "transformer=bnb:nf4;offload=group;group_blocks=2.7",
            r"group_blocks='2.7'; expected a whole number",
        ),
        (
            "transformer=bnb:nf4;offload=group;group_type=leaf;group_blocks=2",
            r"group_blocks is for group_type=block",
        ),
    ],
)
def test_bad_offload_settings_name_the_fix(text, message):
    with pytest.raises(SpecError, match=message):
        Plan.parse(text)


def test_offload_settings_round_trip():
    plan = Plan.parse(
        "transformer=bnb:nf4;offload=group;group_type=leaf_level;stream=true;record_stream=true"
    )
    assert plan.group_type == "leaf" and plan.stream is True and plan.record_stream is True
    assert Plan.parse(str(plan)) == plan and Plan.from_json(plan.to_json()) == plan
    balanced = Plan.parse("transformer=nncf:int8;offload=balanced;max_memory=cuda:8|cpu:64")
    assert balanced.max_memory == "gpu:8|cpu:64"  # gpu (or cuda) is the plan's GPU
    assert balanced.max_memory_bytes() == {"gpu": 8 * 2**30, "cpu": 64 * 2**30}
    # an index names that GPU, as accelerate's max_memory={0: ...} does (tests/test_multi_gpu.py: several)
    indexed = Plan.parse("transformer=nncf:int8;offload=balanced;max_memory=0:8|cpu:64")
    assert indexed.max_memory == "0:8|cpu:64" and indexed.max_memory_bytes() == {
        0: 8 * 2**30,
        "cpu": 64 * 2**30,
    }
    assert Plan.parse(str(indexed)) == indexed and Plan.from_json(indexed.to_json()) == indexed
    options = offload.group_options(plan)
    assert (
        options["offload_type"] == "leaf_level"
        and options["use_stream"]
        and "num_blocks_per_group" not in options
    )
