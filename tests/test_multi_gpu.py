"""offload=balanced over several GPUs (issue 17), planned on the CPU with two fake GPUs.

Planning needs no GPU: the maps are accelerate's (``get_balanced_memory`` / ``infer_auto_device_map``) and
diffusers' (``_assign_components_to_devices``) on our quantization-aware sizes, built on the meta device; where
a check needs GPUs to exist, ``torch.cuda`` is faked here. The placement itself runs on the CPU too (the CPU
stands in for each GPU, so accelerate's hooks and diffusers' groups run); the ``gpu`` tests at the end load,
generate and compare on two real GPUs."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
from accelerate import init_empty_weights
from helpers import generate, rel_l2, wide_flux_transformer

import diffusers_quant
from diffusers_quant import offload
from diffusers_quant.cli import main
from diffusers_quant.errors import PlanRefused, SpecError
from diffusers_quant.spec import Plan, Spec

GiB, MiB = 2**30, 2**20
SPECS = ["bnb:nf4", "nncf:int8"]
BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")


def _plan(budgets: dict, device: str = "cuda", entries: str = "transformer=bnb:nf4") -> Plan:
    text = "|".join(f"{k}:{v / GiB:.9f}" for k, v in budgets.items())
    return Plan.parse(f"{entries};offload=balanced;device={device};max_memory={text}")


@pytest.fixture(scope="module")
def meta_transformer():
    with init_empty_weights():
        return wide_flux_transformer(6)


def _sizes(model, spec: str | None) -> dict[str, int]:
    return offload.planned_sizes(model, Spec.parse(spec) if spec else None, "transformer", torch.bfloat16)


def _blocks_whole(device_map) -> bool:
    """No part of the map lies inside a transformer block (a block is never split)."""
    return not any(p.startswith(BLOCKS) and p.count(".") > 1 for p in device_map.placement)


# --- the grammar -------------------------------------------------------------------------------------------


def test_max_memory_names_gpus_by_index():
    plan = Plan.parse("transformer=bnb:nf4;offload=balanced;device=cuda;max_memory=cpu:64|1:40|0:40")
    assert plan.max_memory == "0:40|1:40|cpu:64" and plan.gpu_indices() == [0, 1]
    assert plan.max_memory_bytes() == {0: 40 * GiB, 1: 40 * GiB, "cpu": 64 * GiB}
    assert offload.is_multi_gpu(plan) and offload.main_index(plan) == 0
    assert Plan.parse(str(plan)) == plan and Plan.from_json(plan.to_json()) == plan
    assert Plan.parse("offload=balanced;max_memory=cuda:0:40|cuda:1:40").max_memory == "0:40|1:40"
    one = Plan.parse("offload=balanced;device=cuda:1;max_memory=gpu:8|cpu:64")  # the plan's GPU, as before
    assert not offload.is_multi_gpu(one) and offload.main_index(one) == 1
    assert offload.main_index(Plan.parse("offload=balanced;device=cuda;max_memory=2:8|3:8")) == 2


@pytest.mark.parametrize(
    "max_memory,device,message",
    [
        (
            "gpu:8|1:8",
            "cuda",
            r"mixes gpu \(the plan's GPU\) with GPU indices; fix: name every GPU by its index",
        ),
        ("0:8|0:4", "cuda", r"gives GPU 0 twice"),
        ("0:8|1:-1", "cuda", r"expected 'gpu:GiB\|cpu:GiB' \(the plan's GPU\) or 'N:GiB\|N:GiB\|cpu:GiB'"),
        ("cuda:x:8", "cuda", r"e\.g\. max_memory=gpu:8\|cpu:64 or max_memory=0:40\|1:40\|cpu:64"),
        ("0:8|1:8", "cuda:2", r"device=cuda:2 is not among the GPUs .* fix: device=cuda:0, or add 2:GiB"),
    ],
)
def test_bad_multi_gpu_budgets_name_the_fix(max_memory, device, message):
    with pytest.raises(SpecError, match=message):
        Plan.parse(f"transformer=bnb:nf4;offload=balanced;device={device};max_memory={max_memory}")


# --- one component over two GPUs ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_two_gpus_hold_the_quantized_blocks_within_budgets(meta_transformer, spec):
    model, sizes, full = meta_transformer, _sizes(meta_transformer, spec), _sizes(meta_transformer, None)
    _, largest = offload.largest_block(model, sizes)
    each = int(max(0.6 * sizes[""], 1.3 * largest))
    plan = _plan({0: each, 1: each, "cpu": 64 * GiB}, entries=f"transformer={spec}")
    device_map = offload.plan_device_map(model, sizes, plan, "transformer")
    caps = plan.max_memory_bytes()  # each, as the plan's text rounds it
    assert {0, 1} <= set(device_map.placement.values()) and "cpu" not in device_map.bytes_on
    assert device_map.bytes_on["cuda:0"] <= caps[0] and device_map.bytes_on["cuda:1"] <= caps[1]
    assert sum(device_map.bytes_on.values()) == sizes[""] and _blocks_whole(device_map)
    assert device_map.budgets == {"cuda:0": caps[0], "cuda:1": caps[1], "cpu": 64 * GiB}
    # at bf16 sizes the same two budgets cannot hold it: blocks go to the CPU, or a block fits neither GPU
    assert full[""] > 2 * each
    try:
        assert offload.plan_device_map(model, full, plan, "transformer").bytes_on.get("cpu", 0) > 0
    except PlanRefused as e:
        assert "is less than its largest block" in str(e)


def test_blocks_are_spread_evenly_when_one_gpu_could_hold_them_all(meta_transformer):
    sizes = _sizes(meta_transformer, "bnb:nf4")
    device_map = offload.plan_device_map(
        meta_transformer, sizes, _plan({0: 2 * sizes[""], 1: 2 * sizes[""]}), "transformer"
    )
    assert 0 < device_map.bytes_on["cuda:1"] and device_map.bytes_on["cuda:0"] < sizes[""]


def test_budgets_filled_in_order_where_evening_out_would_leave_blocks_on_the_cpu(meta_transformer):
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    sizes = _sizes(meta_transformer, "bnb:nf4")
    _, largest = offload.largest_block(meta_transformer, sizes)
    budgets = {0: sizes[""] + largest, 1: int(1.05 * largest), "cpu": 64 * GiB}
    with offload._sizes_for_accelerate(sizes):  # what accelerate's balanced split alone does with these
        even = get_balanced_memory(meta_transformer, dict(budgets), ["FluxTransformerBlock"])
        alone = infer_auto_device_map(meta_transformer, max_memory=even)
    assert "cpu" in alone.values()
    device_map = offload.plan_device_map(meta_transformer, sizes, _plan(budgets), "transformer")
    assert "cpu" not in device_map.bytes_on and device_map.bytes_on["cuda:0"] <= budgets[0]


def test_a_gpu_budget_below_the_largest_block_is_refused_with_the_fix(meta_transformer):
    sizes = _sizes(meta_transformer, "nncf:int8")
    name, largest = offload.largest_block(meta_transformer, sizes)
    with pytest.raises(
        PlanRefused,
        match=rf"on GPU 1 is less than its largest block \({name}.*fix: give max_memory 1:[0-9.]+ \(GiB\) or "
        "more, or leave GPU 1 out of max_memory",
    ):
        offload.plan_device_map(
            meta_transformer, sizes, _plan({0: sizes[""], 1: largest // 2}), "transformer"
        )


# --- a pipeline over two GPUs: diffusers' assignment on quantized sizes ---------------------------------


@pytest.fixture(scope="module")
def components(flux_path):
    from diffusers_quant.hooks import _pipeline_components

    return _pipeline_components(object, str(flux_path), {})


def test_components_go_whole_to_the_gpus_as_diffusers_assigns_them(flux_path, components):
    from diffusers.pipelines.pipeline_loading_utils import _assign_components_to_devices

    plan = _plan({0: 5 * MiB, 1: 5 * MiB}, entries="transformer=bnb:nf4,text_encoder_2=nncf:int8")
    maps = offload.planned_maps(plan, str(flux_path), components, torch.bfloat16)
    assert set(maps) == {"transformer", "text_encoder", "text_encoder_2", "vae"}
    assert all(m.whole for m in maps.values()) and {m.placement[""] for m in maps.values()} == {0, 1}
    totals = dict(sorted(((n, sum(m.bytes_on.values())) for n, m in maps.items()), key=lambda x: -x[1]))
    expected = _assign_components_to_devices(totals, {0: 5 * MiB, 1: 5 * MiB})
    assert {n: d for d, names in expected.items() for n in names} == {
        n: m.placement[""] for n, m in maps.items()
    }
    for gpu in (0, 1):
        assert sum(m.bytes_on.get(f"cuda:{gpu}", 0) for m in maps.values()) <= 5 * MiB
    # the bf16 transformer would not fit there: no GPU has room for its largest block beside the others
    bf16 = _plan({0: 5 * MiB, 1: 5 * MiB}, entries="transformer=none,text_encoder_2=nncf:int8")
    with pytest.raises(PlanRefused, match=r"transformer: .* leaves no GPU room for its largest block"):
        offload.planned_maps(bf16, str(flux_path), components, torch.bfloat16)


def test_a_component_too_large_for_one_gpu_is_split_over_both(flux_path, components):
    plan = _plan(
        {0: 6 * MiB, 1: 6 * MiB, "cpu": GiB}, entries="transformer=nncf:int8,text_encoder_2=nncf:int8"
    )
    maps = offload.planned_maps(plan, str(flux_path), components, torch.bfloat16)
    transformer = maps["transformer"]
    assert not transformer.whole and {"cuda:0", "cuda:1"} <= set(transformer.bytes_on)
    assert _blocks_whole(transformer)
    assert all(maps[n].whole for n in ("text_encoder", "text_encoder_2", "vae"))
    for gpu in (0, 1):
        assert sum(m.bytes_on.get(f"cuda:{gpu}", 0) for m in maps.values()) <= 6 * MiB


# --- check: the dry-run map; refusals before any weight is read ------------------------------------------

MULTI = "transformer=bnb:nf4,text_encoder_2=nncf:int8;offload=balanced;device=cuda;max_memory=0:0.004|1:0.004|cpu:1"


def _fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_check_prints_the_map_over_two_gpus(flux_path, capsys, monkeypatch):
    assert main(["check", "--model", str(flux_path), "--quant", MULTI]) == 1  # this CPU has no GPU ...
    out = capsys.readouterr().out
    assert "refused:\n  - device=cuda was asked for but no CUDA device is available" in out
    assert (
        "transformer: balanced device map (from the configs; no weight read)" in out
    )  # ... the map is shown
    _fake_gpus(monkeypatch, 2)
    assert main(["check", "--model", str(flux_path), "--quant", MULTI]) == 0
    out = capsys.readouterr().out
    assert "pipeline over cuda:0, cuda:1 (max_memory=0:0.004|1:0.004|cpu:1):" in out
    assert "vae: balanced device map (from the configs; no weight read)\n  (whole model) -> cuda:0" in out
    assert "  (whole model) -> cuda:1" in out and "  (whole model) -> cuda:0" in out
    assert "  transformer_blocks -> cpu" in out and "(budget " in out
    lines = out.split("pipeline over")[1].splitlines()
    assert any(line.startswith("  cuda:0: ") and " of 4.10 MiB (" in line for line in lines)
    assert any(line.startswith("  cuda:1: ") for line in lines) and any("  cpu: " in line for line in lines)
    assert out.rstrip().endswith("ok: " + str(Plan.parse(MULTI)))


def _digest(folder) -> dict:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_a_budget_for_a_missing_gpu_is_refused_before_any_weight_is_read(flux_path, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    folder = tmp_path / "pipe"
    shutil.copytree(flux_path, folder)
    for weights in folder.rglob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")  # any read of a weight would fail on these
    before = _digest(folder)
    _fake_gpus(monkeypatch, 1)
    diffusers_quant.install()
    with pytest.raises(
        PlanRefused,
        match=r"max_memory=0:0.004\|1:0.004\|cpu:1 budgets GPU 1, but this machine has 1 CUDA device \(GPU 0\); "
        r"fix: budget only the GPUs present",
    ):
        DiffusionPipeline.from_pretrained(folder, quant=MULTI)
    assert _digest(folder) == before


# --- placing on the CPU (standing in for each GPU): accelerate's hooks and diffusers' groups run ----------


def test_a_model_placed_over_two_gpus_gives_the_same_output():
    import copy

    from test_contract import _inputs

    def run(model):
        with torch.no_grad():
            return model(**_inputs(model, dtype=torch.bfloat16))[0].float()

    model = wide_flux_transformer(3).to(torch.bfloat16)
    diffusers_quant.quantize(model, "bnb:nf4", kind="transformer")
    expected, sizes = run(model), offload.module_sizes(model)
    _, largest = offload.largest_block(model, sizes)
    # all on the two GPUs (accelerate's dispatch_model), then some blocks left on the CPU (diffusers' groups)
    for each, cpu_blocks in ((sizes[""], False), (0.2 * sizes[""] + 1.1 * largest, True)):
        placed = copy.deepcopy(model)
        plan = _plan({0: each, 1: each, "cpu": GiB}, device="cpu")
        device_map = offload.place_model(placed, plan, "transformer")
        assert {"cuda:0", "cuda:1"} <= set(device_map.bytes_on) and (
            "cpu" in device_map.bytes_on
        ) == cpu_blocks
        assert {"cuda:0", "cuda:1"} <= set(placed.hf_device_map.values())
        gpu_parts = [p for p, d in device_map.placement.items() if d in (0, 1)]
        assert all(hasattr(placed.get_submodule(p), "_hf_hook") for p in gpu_parts), "accelerate's hooks"
        for _ in range(2):  # the second call runs after the first one's offloads
            assert torch.equal(run(placed), expected)


def test_a_pipeline_placed_over_two_gpus_generates_the_same_image(flux_path):
    from diffusers import DiffusionPipeline

    diffusers_quant.install()
    pipe = DiffusionPipeline.from_pretrained(flux_path, quant="transformer=bnb:nf4,text_encoder_2=nncf:int8")
    expected = generate(pipe, steps=1)
    plan = Plan.parse(MULTI.replace("device=cuda", "device=cpu"))
    maps = offload.place_pipeline(pipe, plan)
    assert pipe.hf_device_map == {
        "vae": 0,
        "text_encoder": 1,
        "text_encoder_2": 1,
        "transformer": "cuda:0+cpu",
    }
    assert set(maps) == set(pipe.hf_device_map) and pipe._is_pipeline_device_mapped()
    assert (generate(pipe, steps=1) == expected).all()


def test_each_gpu_part_runs_with_its_gpu_current(monkeypatch):
    """Kernels that launch on the current CUDA device (Triton's: NNCF's fused dequantization) must find the
    part's GPU current while it runs; the hook composes after accelerate's own and restores the caller's."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook, add_hook_to_module

    current, seen = [0], []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: current.__setitem__(0, index))

    class Probe(torch.nn.Linear):
        def forward(self, x):
            seen.append(current[0])
            return super().forward(x)

    model = torch.nn.Sequential(Probe(2, 2), Probe(2, 2), Probe(2, 2))
    add_hook_to_module(model[1], AlignDevicesHook(execution_device="cpu"))
    offload.set_current_device(model[1], 1)
    offload.set_current_device(model[2], 2)
    assert isinstance(model[1]._hf_hook, SequentialHook)
    model(torch.ones(1, 2))
    assert seen == [0, 1, 2] and current[0] == 0


# --- on two real GPUs ----------------------------------------------------------------------------------------

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


# budgets (GiB) under which the demo transformer, at bf16, goes over both GPUs and the CPU (by the map of the
# loaded sizes, on the CPU: 0.57 / 1.19 / 2.44 MiB of 4.20 for nf4, 0.57 / 2.29 / 4.45 MiB for int8) and the
# other components go whole
PIPELINE_BUDGETS = {"bnb:nf4": "0:0.0038|1:0.0038|cpu:8", "nncf:int8": "0:0.005|1:0.005|cpu:8"}


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("spec", SPECS)
def test_gpu_pipeline_over_two_gpus_matches_one_gpu(flux_path, spec):
    from diffusers import DiffusionPipeline

    diffusers_quant.install()
    entries = f"transformer={spec},text_encoder_2=nncf:int8"
    one = DiffusionPipeline.from_pretrained(flux_path, dtype=torch.bfloat16, quant=f"{entries};device=cuda")
    expected = generate(one, steps=2)
    del one
    plan = f"{entries};offload=balanced;device=cuda;max_memory={PIPELINE_BUDGETS[spec]}"
    pipe = DiffusionPipeline.from_pretrained(flux_path, dtype=torch.bfloat16, quant=plan)
    assert {"cuda:0", "cuda:1"} <= set(pipe.transformer.hf_device_map.values()), (
        pipe.transformer.hf_device_map
    )
    devices = {
        p.device for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters()
    }
    assert {torch.device("cuda", 0), torch.device("cuda", 1)} <= devices
    assert pipe._is_pipeline_device_mapped()
    assert rel_l2(generate(pipe, steps=2), expected) < 2e-2


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("spec", SPECS)
def test_gpu_model_over_two_gpus_matches_one_gpu(spec):
    from test_contract import _inputs

    def quantized():
        model = wide_flux_transformer(4).to(torch.bfloat16)
        diffusers_quant.quantize(model, spec, kind="transformer", device="cuda")
        return model

    model = quantized()
    inputs = _inputs(model, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(**{k: v.to("cuda") if torch.is_tensor(v) else v for k, v in inputs.items()})[0]
    spread = quantized().to("cpu")
    sizes = offload.module_sizes(spread)
    plan = _plan({0: sizes[""], 1: sizes[""]}, entries=f"transformer={spec}")
    offload.place_model(spread, plan, "transformer")
    assert {p.device.index for p in spread.parameters()} == {0, 1}
    with torch.no_grad():
        out = spread(**{k: v.to("cuda") if torch.is_tensor(v) else v for k, v in inputs.items()})[0]
    assert out.device == torch.device("cuda", 0)
    assert float((out.float() - expected.float()).norm() / expected.float().norm()) < 1e-2
